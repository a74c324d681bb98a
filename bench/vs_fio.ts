/**
 * tapd's in-process bench against fio on the same raw file, in one run: random 4k reads at QD64
 * and sequential 1M reads at QD16, fio with libaio and O_DIRECT (its defaults otherwise) as the
 * baseline. Runs are interleaved, and each round's tapd figure is divided by the fio figure of
 * the same round, because this machine is shared and noisy: only ratios mean anything.
 *
 *   deno task bench [--file PATH] [--size 2G] [--seconds 3] [--rounds 5] [--cpu 0]
 */
import { parseArgs } from "node:util";

const root = new URL("../", import.meta.url).pathname;
const { values } = parseArgs({
  options: {
    file: { type: "string" },
    size: { type: "string", default: "2" },
    seconds: { type: "string", default: "3" },
    rounds: { type: "string", default: "5" },
    cpu: { type: "string", default: "0" },
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

async function tapd(file: string, w: Workload, extra: string[]): Promise<number> {
  const out = await run(`${root}tapd`, [
    "bench",
    `tap:aio:${file}`,
    `--rw=${w.rw}`,
    `--bs=${w.bs}`,
    `--qd=${w.qd}`,
    `--seconds=${seconds}`,
    "--json",
    ...extra,
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

/** tapd configurations compared with fio's defaults. */
const CONFIGS: { label: string; args: string[] }[] = [
  { label: "tapd aio", args: ["--engine=aio"] },
  { label: "tapd uring", args: ["--engine=uring"] },
  {
    label: `tapd aio --cpus ${values.cpu} --poll-us 200`,
    args: ["--engine=aio", `--cpus=${values.cpu}`, "--poll-us=200"],
  },
];

const { path, temporary } = await ensureFile();
console.log(
  `file ${path}; ${rounds} interleaved rounds of ${seconds} s per run; ` +
    `ratio = median over rounds of (tapd / fio in the same round)\n`,
);
let met = true;
for (const w of WORKLOADS) {
  const fioRuns: number[] = [];
  const ratios: number[][] = CONFIGS.map(() => []);
  const iops: number[][] = CONFIGS.map(() => []);
  for (let r = 0; r < rounds; r++) {
    const base = await fio(path, w);
    fioRuns.push(base);
    for (const [i, c] of CONFIGS.entries()) {
      const t = await tapd(path, w, c.args);
      iops[i].push(t);
      ratios[i].push(t / base);
    }
  }
  console.log(`${w.name}: fio ${median(fioRuns).toFixed(0)} IOPS`);
  for (const [i, c] of CONFIGS.entries()) {
    const ratio = median(ratios[i]);
    if (i === 0) met &&= ratio >= 0.95;
    console.log(
      `  ${c.label.padEnd(36)} ${median(iops[i]).toFixed(0).padStart(8)} IOPS  ${
        ratio.toFixed(2)
      }× fio`,
    );
  }
}
console.log(`\ntarget (tapd aio, defaults) ≥ 0.95× fio libaio on both: ${met ? "met" : "NOT met"}`);
if (temporary) console.log(`(kept ${path} for the next run; delete it when done)`);
