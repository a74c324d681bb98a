/**
 * The blkif ring path against fio on the same raw file, in one run: `tapd tapdisk` serves the
 * file on a ring, `tapd bench --ring` is the frontend (at its defaults, and polling for responses
 * with `--poll-us 1000`); fio (libaio, O_DIRECT) is the baseline. Runs interleave; each ratio is
 * the median over rounds of ring ÷ fio in the same round.
 *
 *   deno run -A bench/ring_vs_fio.ts [--seconds 3] [--rounds 3]
 */
import { parseArgs } from "node:util";
import { ensureDataFile, fioReadIops, median, READ_WORKLOADS, ROOT, tapdIops } from "./common.ts";

const { values } = parseArgs({
  options: { seconds: { type: "string", default: "3" }, rounds: { type: "string", default: "3" } },
});

const seconds = Number(values.seconds), rounds = Number(values.rounds);
const file = await ensureDataFile(), sock = "/tmp/tapd-ring-bench.sock";
const tapdisk = new Deno.Command(`${ROOT}tapd`, {
  args: ["tapdisk", `tap:aio:${file}`, "--ring", `unix:${sock}`],
  stderr: "null",
}).spawn();
for (let i = 0; i < 100; i++) {
  try {
    if (Deno.statSync(sock).isSocket) break;
  } catch { /* starting */ }
  await new Promise((r) => setTimeout(r, 50));
}

const WORKLOADS = READ_WORKLOADS;
try {
  const configs = [{ label: "ring", args: [] }, {
    label: "ring, frontend --poll-us 1000",
    args: ["--poll-us=1000"],
  }];
  for (const w of WORKLOADS) {
    const f: number[] = [];
    const t: number[][] = configs.map(() => []), ratio: number[][] = configs.map(() => []);
    for (let i = 0; i < rounds; i++) {
      const fio = await fioReadIops(file, w, seconds);
      f.push(fio);
      for (const [k, c] of configs.entries()) {
        const ring = await tapdIops(`--ring=unix:${sock}`, w, seconds, c.args);
        t[k].push(ring), ratio[k].push(ring / fio);
      }
    }
    console.log(`${w.name}: fio ${median(f).toFixed(0)} IOPS`);
    for (const [k, c] of configs.entries()) {
      console.log(
        `  ${c.label.padEnd(30)} ${median(t[k]).toFixed(0).padStart(7)} IOPS  ${
          median(ratio[k]).toFixed(2)
        }×`,
      );
    }
  }
} finally {
  tapdisk.kill("SIGTERM");
  await tapdisk.status;
}
