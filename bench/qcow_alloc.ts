/**
 * First writes into a fresh image, where every write allocates: tapd's qcow driver side by side
 * with QEMU (`qemu-img bench -w -t none -i native`) on the same qcow (v1) image kind and on qcow2
 * (QEMU's own format, 64 KiB clusters), with a sparse raw file through tapd as the floor. Each
 * run gets a new 8 GiB image in /var/tmp; sequential writes (qemu-img bench has no random mode),
 * 1 MiB at QD16 and 4 KiB at QD64; rounds interleaved, medians.
 *
 *   deno run -A bench/qcow_alloc.ts [--seconds 3] [--rounds 3]
 */
import { parseArgs } from "node:util";
import { median, ROOT, run, tapdIops, type Workload } from "./common.ts";

const { values } = parseArgs({
  options: {
    seconds: { type: "string", default: "3" },
    rounds: { type: "string", default: "3" },
  },
});
const seconds = Number(values.seconds), rounds = Number(values.rounds);
const dir = await Deno.makeTempDir({ dir: "/var/tmp", prefix: "tapd-qcow-alloc-" });
const SIZE_MIB = 8192;

interface Load extends Workload {
  bytes: number;
  /** Requests for qemu-img bench (it runs a count, not a time): about the same seconds. */
  count: { qcow2: number; qcow: number };
}

const LOADS: Load[] = [
  {
    name: "seq write 1M QD16",
    rw: "write",
    bs: "1M",
    bytes: 2 ** 20,
    qd: 16,
    count: { qcow2: 2048, qcow: 48 },
  },
  {
    name: "seq write 4k QD64",
    rw: "write",
    bs: "4k",
    bytes: 4096,
    qd: 64,
    count: { qcow2: 150_000, qcow: 6000 },
  },
];

type Row = "tapd qcow" | "qemu qcow" | "qemu qcow2" | "tapd raw (sparse)";
const ROWS: Row[] = ["tapd qcow", "qemu qcow", "qemu qcow2", "tapd raw (sparse)"];

async function fresh(kind: "qcow" | "qcow2" | "raw"): Promise<string> {
  const path = `${dir}/img.${kind}`;
  await Deno.remove(path).catch(() => {});
  if (kind === "qcow") await run(`${ROOT}tapd`, ["qcow-create", String(SIZE_MIB), path]);
  else if (kind === "qcow2") {
    await run("qemu-img", ["create", "-q", "-f", "qcow2", path, `${SIZE_MIB}M`]);
  } else await run("truncate", ["-s", `${SIZE_MIB}M`, path]);
  return path;
}

async function qemu(format: "qcow" | "qcow2", path: string, w: Load): Promise<number> {
  const count = w.count[format];
  const out = await run("qemu-img", [
    "bench",
    "-w",
    "-f",
    format,
    "-t",
    "none",
    "-i",
    "native",
    "-c",
    String(count),
    "-d",
    String(w.qd),
    "-s",
    String(w.bytes),
    path,
  ]); // deno-fmt-ignore
  const m = out.match(/Run completed in ([\d.]+) seconds/);
  if (m === null) throw new Error(`qemu-img bench said: ${out}`);
  return count / Number(m[1]);
}

async function measure(row: Row, w: Load): Promise<number> {
  switch (row) {
    case "tapd qcow":
      return tapdIops(`tap:qcow:${await fresh("qcow")}`, w, seconds);
    case "qemu qcow":
      return qemu("qcow", await fresh("qcow"), w);
    case "qemu qcow2":
      return qemu("qcow2", await fresh("qcow2"), w);
    case "tapd raw (sparse)":
      return tapdIops(`tap:aio:${await fresh("raw")}`, w, seconds);
  }
}

try {
  console.log(
    `fresh ${SIZE_MIB} MiB images in ${dir}; ${rounds} interleaved rounds; IOPS medians\n`,
  );
  const header = ["workload", ...ROWS, "tapd ÷ qcow2", "tapd ÷ qemu qcow"];
  const lines: string[][] = [];
  for (const w of LOADS) {
    const got = new Map<Row, number[]>(ROWS.map((r) => [r, []]));
    for (let i = 0; i < rounds; i++) {
      for (const row of ROWS) got.get(row)!.push(await measure(row, w));
    }
    const m = (r: Row) => median(got.get(r)!);
    lines.push([
      w.name,
      ...ROWS.map((r) => Math.round(m(r)).toLocaleString("en-US")),
      `${(m("tapd qcow") / m("qemu qcow2")).toFixed(2)}×`,
      `${(m("tapd qcow") / m("qemu qcow")).toFixed(1)}×`,
    ]);
  }
  const widths = header.map((h, i) => Math.max(h.length, ...lines.map((l) => l[i].length)));
  const fmt = (cells: string[]) => `| ${cells.map((c, i) => c.padEnd(widths[i])).join(" | ")} |`;
  console.log(fmt(header));
  console.log(`| ${widths.map((w) => "-".repeat(w)).join(" | ")} |`);
  for (const l of lines) console.log(fmt(l));
} finally {
  await Deno.remove(dir, { recursive: true });
}
