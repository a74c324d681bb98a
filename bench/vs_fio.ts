/**
 * tapd's in-process bench against fio on the same raw file, in one run: random 4k reads at QD64
 * and sequential 1M reads at QD16, fio with libaio and O_DIRECT as the baseline. The runs are
 * interleaved over several rounds and the medians compared, because this machine is shared and
 * noisy: only ratios mean anything.
 *
 *   deno task bench [--file PATH] [--size 2G] [--seconds 5] [--rounds 3]
 */
import { parseArgs } from "node:util";

const root = new URL("../", import.meta.url).pathname;
const { values } = parseArgs({
  options: {
    file: { type: "string" },
    size: { type: "string", default: "2" },
    seconds: { type: "string", default: "5" },
    rounds: { type: "string", default: "3" },
  },
});
const seconds = Number(values.seconds), rounds = Number(values.rounds);
const sizeGiB = Number(values.size.replace(/G$/i, ""));

interface Workload {
  name: string;
  rw: string;
  bs: string;
  qd: number;
}
const WORKLOADS: Workload[] = [
  { name: "rand read 4k QD64", rw: "randread", bs: "4k", qd: 64 },
  { name: "seq read 1M QD16", rw: "read", bs: "1M", qd: 16 },
];

async function run(cmd: string, args: string[]): Promise<string> {
  const r = await new Deno.Command(cmd, { args, stdout: "piped", stderr: "piped" }).output();
  if (r.code !== 0) {
    throw new Error(`${cmd} ${args.join(" ")} failed: ${new TextDecoder().decode(r.stderr)}`);
  }
  return new TextDecoder().decode(r.stdout);
}

async function fio(file: string, w: Workload): Promise<number> {
  const out = await run("fio", [
    "--name=bench",
    `--filename=${file}`,
    "--ioengine=libaio",
    "--direct=1",
    `--rw=${w.rw}`,
    `--bs=${w.bs}`,
    `--iodepth=${w.qd}`,
    `--runtime=${seconds}`,
    "--time_based",
    "--output-format=json",
  ]);
  return JSON.parse(out).jobs[0].read.iops;
}

async function tapd(file: string, w: Workload, engine: string): Promise<number> {
  const out = await run(`${root}tapd`, [
    "bench",
    `tap:aio:${file}`,
    `--rw=${w.rw}`,
    `--bs=${w.bs}`,
    `--qd=${w.qd}`,
    `--seconds=${seconds}`,
    `--engine=${engine}`,
    "--json",
  ]);
  return JSON.parse(out).iops;
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
}

async function ensureFile(): Promise<{ path: string; temporary: boolean }> {
  if (values.file) return { path: values.file, temporary: false };
  const path = `/var/tmp/tapd-bench-${sizeGiB}g.img`;
  try {
    if ((await Deno.stat(path)).size === sizeGiB * 2 ** 30) return { path, temporary: true };
  } catch { /* create it */ }
  console.log(`creating ${path} (${sizeGiB} GiB of data) ...`);
  await run("fio", [
    "--name=fill",
    `--filename=${path}`,
    `--size=${sizeGiB}G`,
    "--rw=write",
    "--bs=1M",
    "--direct=1",
    "--ioengine=libaio",
    "--iodepth=16",
  ]);
  return { path, temporary: true };
}

const { path, temporary } = await ensureFile();
console.log(`file ${path}, ${rounds} rounds of ${seconds} s per run, medians (IOPS)\n`);
const rows: string[] = [];
let allMet = true;
for (const w of WORKLOADS) {
  const results: Record<string, number[]> = { fio: [], aio: [], uring: [] };
  for (let r = 0; r < rounds; r++) {
    results.fio.push(await fio(path, w));
    results.aio.push(await tapd(path, w, "aio"));
    results.uring.push(await tapd(path, w, "uring"));
  }
  const base = median(results.fio), aio = median(results.aio), uring = median(results.uring);
  const best = Math.max(aio / base, uring / base);
  allMet &&= aio / base >= 0.95;
  rows.push(
    `${w.name.padEnd(20)} ${base.toFixed(0).padStart(9)} ${aio.toFixed(0).padStart(9)} ` +
      `${uring.toFixed(0).padStart(9)} ${(aio / base).toFixed(2).padStart(8)} ` +
      `${(uring / base).toFixed(2).padStart(10)}` + (best >= 0.95 ? "" : "  (below 0.95)"),
  );
}
console.log(
  `${"workload".padEnd(20)} ${"fio".padStart(9)} ${"tapd aio".padStart(9)} ${
    "tapd urng".padStart(9)
  } ` +
    `${"aio/fio".padStart(8)} ${"uring/fio".padStart(10)}`,
);
for (const r of rows) console.log(r);
console.log(`\ntarget tapd aio ≥ 0.95× fio libaio: ${allMet ? "met" : "NOT met"}`);
if (temporary) console.log(`(kept ${path} for the next run; delete it when done)`);
