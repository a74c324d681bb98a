/**
 * The blkif ring path against fio on the same raw file, in one run: `tapd tapdisk` serves the
 * file on a ring, `tapd bench --ring` is the frontend; fio (libaio, O_DIRECT) is the baseline.
 * Runs interleave; each ratio is the median over rounds of ring ÷ fio in the same round.
 *
 *   deno run -A bench/ring_vs_fio.ts [--seconds 3] [--rounds 3]
 */
import { parseArgs } from "node:util";

const root = new URL("../", import.meta.url).pathname;
const { values } = parseArgs({
  options: { seconds: { type: "string", default: "3" }, rounds: { type: "string", default: "3" } },
});
const seconds = Number(values.seconds), rounds = Number(values.rounds);
const file = "/var/tmp/tapd-bench-2g.img", sock = "/tmp/tapd-ring-bench.sock";

async function run(cmd: string, args: string[]): Promise<string> {
  const r = await new Deno.Command(cmd, { args, stdout: "piped", stderr: "piped" }).output();
  if (r.code !== 0) {
    throw new Error(`${cmd} ${args.join(" ")}: ${new TextDecoder().decode(r.stderr)}`);
  }
  return new TextDecoder().decode(r.stdout);
}

try {
  await Deno.stat(file);
} catch {
  console.log(`creating ${file} ...`);
  await run("fio", [
    "--name=fill",
    `--filename=${file}`,
    "--size=2G",
    "--rw=write",
    "--bs=1M",
    "--direct=1",
  ]);
}
const tapdisk = new Deno.Command(`${root}tapd`, {
  args: ["tapdisk", `tap:aio:${file}`, "--ring", `unix:${sock}`],
  stderr: "null",
}).spawn();
for (let i = 0; i < 100; i++) {
  try {
    if (Deno.statSync(sock).isSocket) break;
  } catch { /* starting */ }
  await new Promise((r) => setTimeout(r, 50));
}

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
const WORKLOADS = [
  { name: "rand read 4k QD64", rw: "randread", bs: "4k", qd: 64 },
  { name: "seq read 1M QD16", rw: "read", bs: "1M", qd: 16 },
];
try {
  for (const w of WORKLOADS) {
    const f: number[] = [], t: number[] = [], ratio: number[] = [];
    for (let i = 0; i < rounds; i++) {
      const fio = JSON.parse(
        await run("fio", [
          "--name=b",
          `--filename=${file}`,
          "--ioengine=libaio",
          "--direct=1",
          `--rw=${w.rw}`,
          `--bs=${w.bs}`,
          `--iodepth=${w.qd}`,
          `--runtime=${seconds}`,
          "--time_based",
          "--output-format=json",
        ]),
      ).jobs[0].read.iops;
      const ring = JSON.parse(
        await run(`${root}tapd`, [
          "bench",
          "--ring",
          `unix:${sock}`,
          `--rw=${w.rw}`,
          `--bs=${w.bs}`,
          `--qd=${w.qd}`,
          `--seconds=${seconds}`,
          "--json",
        ]),
      ).iops;
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
