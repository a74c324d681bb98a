/** The seed table's target lines, from the seventeenth session's medians (README). */
import assert from "node:assert/strict";
import { type RatioOf, targetLines } from "../../bench/seed_targets.ts";

const COLUMNS = [
  "per-char out",
  "block out",
  "rewrite",
  "per-char in",
  "block in",
  "seeks",
  "seq write 1M QD16",
  "rand write 4k QD64",
  "seq read 1M QD16",
  "rand read 4k QD64",
];
// Each row's ratios in COLUMNS' order; null: not measured (seeks too fast to time natively).
const TABLE: Record<string, (number | null)[]> = {
  "tapd aio": [1.14, 0.99, 1.02, 1.10, 1.19, null, 1.37, 0.53, 1.62, 0.85],
  "tapd qcow": [1.00, 0.94, 0.89, 1.12, 1.10, null, 1.09, 0.46, 1.45, 0.79],
  "nbdfuse+qemu-nbd": [1.01, 0.68, 0.47, 1.13, 0.50, null, 0.43, 0.15, 0.87, 0.25],
  "qsd fuse": [1.03, 0.26, 0.28, 1.19, 0.34, null, 0.29, 0.10, 0.37, 0.17],
};
const ratioOf: RatioOf = (row, column) => TABLE[row]?.[COLUMNS.indexOf(column)] ?? null;

Deno.test("seed targets: met and not met, with the figures and what is behind", () => {
  const lines = targetLines(ratioOf, new Set(["native", ...Object.keys(TABLE)]), COLUMNS);
  assert.deepEqual(lines, [
    "",
    "Targets (issue 7; by the medians of the ratios to native):",
    "- tapd aio ≥0.90× native on block out, rewrite, block in: met (0.99×, 1.02×, 1.19×)",
    "- tapd aio ≥0.80× native on rand write 4k QD64, rand read 4k QD64: NOT MET (0.53×, 0.85×)",
    "- tapd qcow ≥0.80× native on block out, rewrite, block in, seq write 1M QD16, " +
    "seq read 1M QD16, rand write 4k QD64, rand read 4k QD64: NOT MET (block out 0.94×, " +
    "rewrite 0.89×, block in 1.10×, seq write 1M QD16 1.09×, seq read 1M QD16 1.45×, " +
    "rand write 4k QD64 0.46×, rand read 4k QD64 0.79×)",
    "- tapd aio ahead of nbdfuse+qemu-nbd and qsd fuse on every column: NOT MET (per-char in " +
    "1.10× against nbdfuse+qemu-nbd 1.13×; per-char in 1.10× against qsd fuse 1.19×)",
    "- tapd qcow ahead of nbdfuse+qemu-nbd and qsd fuse on every column: NOT MET (per-char out " +
    "1.00× against nbdfuse+qemu-nbd 1.01×; per-char out 1.00× against qsd fuse 1.03×; per-char " +
    "in 1.12× against nbdfuse+qemu-nbd 1.13×; per-char in 1.12× against qsd fuse 1.19×)",
  ]);
});

Deno.test("seed targets: only for the rows measured; a failed peer is nothing to be ahead of", () => {
  assert.deepEqual(targetLines(ratioOf, new Set(["native"]), COLUMNS), []);
  const aio = (row: string, column: string) =>
    row === "tapd aio" ? 0.95 : row === "qsd fuse" ? null : ratioOf(row, column);
  assert.deepEqual(
    targetLines(aio, new Set(["native", "tapd aio", "qsd fuse"]), COLUMNS).slice(2),
    [
      "- tapd aio ≥0.90× native on block out, rewrite, block in: met (0.95×, 0.95×, 0.95×)",
      "- tapd aio ≥0.80× native on rand write 4k QD64, rand read 4k QD64: met (0.95×, 0.95×)",
      "- tapd aio ahead of qsd fuse on every column: not measured",
    ],
  );
  // A column without a figure does not count as met.
  const gap = (row: string, column: string) =>
    column === "rand read 4k QD64" ? null : aio(row, column);
  assert.equal(
    targetLines(gap, new Set(["native", "tapd aio"]), COLUMNS)[3],
    "- tapd aio ≥0.80× native on rand write 4k QD64, rand read 4k QD64: NOT MET (0.95×; " +
      "not measured: rand read 4k QD64)",
  );
});
