/**
 * tapd's in-process bench against fio on the same raw file, in one run: random 4k reads at QD64
 * and sequential 1M reads at QD16, fio with libaio and O_DIRECT (its defaults otherwise) as the
 * baseline. Runs are interleaved, and each round's tapd figure is divided by the fio figure of
 * the same round, because this machine is shared and noisy: only ratios mean anything.
 *
 *   deno task bench [--file PATH] [--size 2G] [--seconds 3] [--rounds 5] [--cpu 0]
 */
import { parseArgs } from "node:util";
import { ensureDataFile, fioReadIops, median, READ_WORKLOADS, tapdIops } from "./common.ts";

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

const WORKLOADS = READ_WORKLOADS;

/** tapd configurations compared with fio's defaults. */
const CONFIGS: { label: string; args: string[] }[] = [
  { label: "tapd aio", args: ["--engine=aio"] },
  { label: "tapd uring", args: ["--engine=uring"] },
  {
    label: `tapd aio --cpus ${values.cpu} --poll-us 200`,
    args: ["--engine=aio", `--cpus=${values.cpu}`, "--poll-us=200"],
  },
];

async function ensureFile(): Promise<{ path: string; temporary: boolean }> {
  if (values.file) return { path: values.file, temporary: false };
  return {
    path: await ensureDataFile(`/var/tmp/tapd-bench-${sizeGiB}g.img`, sizeGiB),
    temporary: true,
  };
}

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
    const base = await fioReadIops(path, w, seconds);
    fioRuns.push(base);
    for (const [i, c] of CONFIGS.entries()) {
      const t = await tapdIops(`tap:aio:${path}`, w, seconds, c.args);
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
