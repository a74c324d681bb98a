/**
 * The seed table's targets (issue 7), checked against a run's median ratios to native: tapd aio
 * ≥0.9× on bonnie++'s block columns and ≥0.8× on fio's 4k random columns, tapd qcow ≥0.8× on
 * those columns and the sequential ones, and both ahead of the peers on every column.
 */

/** The median ratio to native of a row's column; null where none was measured. */
export type RatioOf = (row: string, column: string) => number | null;

const BLOCK = ["block out", "rewrite", "block in"];
const RANDOM = ["rand write 4k QD64", "rand read 4k QD64"];
const SEQUENTIAL = ["seq write 1M QD16", "seq read 1M QD16"];
const PEERS = ["nbdfuse+qemu-nbd", "qsd fuse"];

function x(r: number): string {
  return `${r.toFixed(2)}×`;
}

/** `row` at least `min` on each of `columns`: one line saying whether, with the figures. */
function atLeast(ratioOf: RatioOf, row: string, min: number, columns: string[]): string {
  const figures = columns.map((c) => [c, ratioOf(row, c)] as const);
  const measured = figures.filter((f): f is readonly [string, number] => f[1] !== null);
  const below = measured.filter(([, r]) => r < min);
  const what = `- ${row} ≥${min.toFixed(2)}× native on ${columns.join(", ")}`;
  if (measured.length === 0) return `${what}: not measured`;
  const shown = measured.map(([c, r]) => (columns.length > 3 ? `${c} ` : "") + x(r)).join(", ");
  const unmeasured = figures.filter(([, r]) => r === null).map(([c]) => c);
  // A column without a figure shows nothing: the target is not shown to be met.
  const missing = unmeasured.length > 0 ? `; not measured: ${unmeasured.join(", ")}` : "";
  return below.length === 0 && unmeasured.length === 0
    ? `${what}: met (${shown})`
    : `${what}: NOT MET (${shown}${missing})`;
}

/** `row` ahead of every peer present on every column both measured. */
function ahead(ratioOf: RatioOf, row: string, columns: string[], rows: Set<string>): string {
  const peers = PEERS.filter((p) => rows.has(p));
  const what = `- ${row} ahead of ${peers.join(" and ")} on every column`;
  const behind: string[] = [];
  let compared = 0;
  for (const c of columns) {
    const mine = ratioOf(row, c);
    if (mine === null) continue;
    for (const p of peers) {
      const theirs = ratioOf(p, c);
      if (theirs === null) continue; // failed, or too fast to time: nothing to be ahead of
      compared++;
      if (mine <= theirs) behind.push(`${c} ${x(mine)} against ${p} ${x(theirs)}`);
    }
  }
  if (compared === 0) return `${what}: not measured`;
  return behind.length === 0 ? `${what}: met` : `${what}: NOT MET (${behind.join("; ")})`;
}

/**
 * Lines for the targets whose rows the run measured. `columns` are every column of both tables,
 * for the comparison with the peers.
 */
export function targetLines(ratioOf: RatioOf, rows: Set<string>, columns: string[]): string[] {
  const out: string[] = [];
  if (rows.has("tapd aio")) {
    out.push(atLeast(ratioOf, "tapd aio", 0.9, BLOCK));
    out.push(atLeast(ratioOf, "tapd aio", 0.8, RANDOM));
  }
  if (rows.has("tapd qcow")) {
    out.push(atLeast(ratioOf, "tapd qcow", 0.8, [...BLOCK, ...SEQUENTIAL, ...RANDOM]));
  }
  if (PEERS.some((p) => rows.has(p))) {
    for (const row of ["tapd aio", "tapd qcow"]) {
      if (rows.has(row)) out.push(ahead(ratioOf, row, columns, rows));
    }
  }
  return out.length === 0
    ? []
    : ["", "Targets (issue 7; by the medians of the ratios to native):", ...out];
}
