/**
 * tapd's qcow driver against tapd's raw (aio) driver on the same blocks, in one run: a fully
 * allocated 2 GiB qcow image made by `tapd img2qcow` (its data clusters lie contiguously, in
 * guest order, after the header), driven once as `tap:qcow:IMG` and once as raw through
 * `tap:aio:IMG --offset DATA --size 2G` — the very same file blocks, so what differs is only the
 * driver (on this VM, two files of the same size can differ 5× in write speed depending on where
 * the file system put them). Random 4k reads and writes at QD64, sequential 1M reads at QD16;
 * runs interleaved over rounds; each ratio is the median of qcow ÷ raw within a round.
 *
 *   deno run -A bench/qcow_vs_raw.ts [--seconds 3] [--rounds 5]
 */
import { parseArgs } from "node:util";
import { ensureDataFile, median, ROOT, run } from "./common.ts";

const { values } = parseArgs({
  options: {
    seconds: { type: "string", default: "3" },
    rounds: { type: "string", default: "5" },
  },
});
const seconds = Number(values.seconds), rounds = Number(values.rounds);
const raw = "/var/tmp/tapd-bench-2g.img";
const qcow = "/var/tmp/tapd-bench-2g.qcow";

async function exists(path: string): Promise<boolean> {
  try {
    await Deno.stat(path);
    return true;
  } catch {
    return false;
  }
}

await ensureDataFile(raw);
if (!(await exists(qcow))) {
  console.log(`creating ${qcow} with tapd img2qcow ...`);
  await run(`${ROOT}tapd`, ["img2qcow", "-q", qcow, raw]);
}
await run("sync", []); // O_DIRECT reads of a file with dirty pages wait for write-back
const map = JSON.parse(await run("qemu-img", ["map", "--output=json", "-f", "qcow", qcow]));
if (map.length !== 1 || !map[0].data || map[0].length !== 2 ** 31) {
  throw new Error(`${qcow} is not one contiguous run of data clusters; delete it to remake it`);
}
const dataStart: number = map[0].offset;

const WORKLOADS = [
  { name: "rand read 4k QD64", args: ["--rw=randread", "--bs=4k", "--qd=64"] },
  { name: "rand write 4k QD64", args: ["--rw=randwrite", "--bs=4k", "--qd=64"] },
  { name: "seq read 1M QD16", args: ["--rw=read", "--bs=1M", "--qd=16"] },
];

async function bench(spec: string, args: string[]): Promise<number> {
  const out = await run(`${ROOT}tapd`, ["bench", spec, `--seconds=${seconds}`, "--json", ...args]);
  return JSON.parse(out).iops;
}

console.log(
  `${rounds} interleaved rounds of ${seconds} s; ratio = median of qcow ÷ raw per round\n`,
);
let met = true;
for (const w of WORKLOADS) {
  const r: number[] = [], q: number[] = [], ratio: number[] = [];
  for (let i = 0; i < rounds; i++) {
    const a = await bench(`tap:aio:${qcow}`, [...w.args, `--offset=${dataStart}`, "--size=2G"]);
    const b = await bench(`tap:qcow:${qcow}`, w.args);
    r.push(a), q.push(b), ratio.push(b / a);
  }
  met &&= median(ratio) >= 0.8;
  console.log(
    `${w.name.padEnd(20)} raw ${median(r).toFixed(0).padStart(7)} IOPS  qcow ${
      median(q).toFixed(0).padStart(7)
    } IOPS  ${median(ratio).toFixed(2)}×`,
  );
}
console.log(`\ntarget qcow ≥ 0.8× raw on all three: ${met ? "met" : "NOT met"}`);
