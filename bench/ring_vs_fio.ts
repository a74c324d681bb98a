/**
 * The blkif ring path against fio on the same raw file, in one run: `tapd tapdisk` serves the
 * file on a ring, `tapd bench --ring` is the frontend; fio (libaio, O_DIRECT) is the baseline.
 * Runs interleave; each ratio is the median over rounds of ring ÷ fio in the same round.
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
  for (const w of WORKLOADS) {
    const f: number[] = [], t: number[] = [], ratio: number[] = [];
    for (let i = 0; i < rounds; i++) {
      const fio = await fioReadIops(file, w, seconds);
      const ring = await tapdIops(`--ring=unix:${sock}`, w, seconds);
      f.push(fio), t.push(ring), ratio.push(ring / fio);
    }
    console.log(
      `${w.name.padEnd(20)} fio ${median(f).toFixed(0).padStart(7)} IOPS  ring ${
        median(t).toFixed(0).padStart(7)
      } IOPS  ${median(ratio).toFixed(2)}×`,
    );
  }
} finally {
  tapdisk.kill("SIGTERM");
  await tapdisk.status;
}
