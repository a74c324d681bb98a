/** What `tapd ctl` prints for people: the disk table and a disk's statistics. */
import { formatSize } from "../cli/args.ts";
import { OPS } from "../serve/stats.ts";
import type { DiskRecord, DiskStats } from "./control_protocol.ts";

/** Left-aligned columns, two spaces apart; the last column is not padded. */
export function table(rows: readonly string[][]): string {
  const widths = rows[0].map((_, c) => Math.max(...rows.map((r) => r[c].length)));
  return rows.map((r) =>
    r.map((cell, c) => c === r.length - 1 ? cell : cell.padEnd(widths[c])).join("  ").trimEnd()
  ).join("\n");
}

export function diskTable(disks: readonly DiskRecord[]): string {
  if (disks.length === 0) return "no disks (attach one: tapd ctl attach tap:TYPE:PATH)";
  const rows = [["ID", "STATE", "PID", "SIZE", "SPEC", "EXPORTS", "REASON"]];
  for (const d of disks) {
    rows.push([
      String(d.id),
      d.state,
      d.pid === null ? "-" : String(d.pid),
      d.size === null ? "-" : formatSize(d.size),
      d.spec + (d.readOnly && !d.spec.endsWith(",ro") ? " (ro)" : ""),
      d.exports.join(",") || "-",
      d.reason ?? "",
    ]);
  }
  return table(rows);
}

export function statsTable(s: DiskStats): string {
  const rows = [["OP", "REQUESTS", "BYTES", "ERRORS", "P50", "P99"]];
  for (const op of OPS) {
    const o = s.ops[op];
    rows.push([
      op,
      String(o.requests),
      formatSize(o.bytes),
      String(o.errors),
      `${o.p50Micros} µs`,
      `${o.p99Micros} µs`,
    ]);
  }
  const ahead = s.readAhead === null
    ? "read-ahead off"
    : `read-ahead: ${s.readAhead.hits} reads answered from ${
      formatSize(s.readAhead.fetchedBytes)
    } read ahead`;
  return `disk ${s.id}: ${s.paused ? "paused" : "running"}, ${s.inFlight} in flight\n` +
    table(rows) + `\n${ahead}`;
}
