/** What the side-by-side benchmarks share: running peers, fio, tapd bench, medians, the data file. */

export const ROOT = new URL("../", import.meta.url).pathname;

/** Runs a command and returns its stdout; a failure throws with its stderr. */
export async function run(cmd: string, args: string[]): Promise<string> {
  const r = await new Deno.Command(cmd, { args, stdout: "piped", stderr: "piped" }).output();
  if (r.code !== 0) {
    throw new Error(`${cmd} ${args.join(" ")} failed: ${new TextDecoder().decode(r.stderr)}`);
  }
  return new TextDecoder().decode(r.stdout);
}

export function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
}

export interface Workload {
  name: string;
  rw: string;
  bs: string;
  qd: number;
}

export const READ_WORKLOADS: Workload[] = [
  { name: "rand read 4k QD64", rw: "randread", bs: "4k", qd: 64 },
  { name: "seq read 1M QD16", rw: "read", bs: "1M", qd: 16 },
];

/** fio's read IOPS with libaio and O_DIRECT, its defaults otherwise. */
export async function fioReadIops(file: string, w: Workload, seconds: number): Promise<number> {
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

/** `tapd bench … --json` IOPS; `target` is a spec, or `--ring=unix:PATH`. */
export async function tapdIops(
  target: string,
  w: Workload,
  seconds: number,
  extra: string[] = [],
): Promise<number> {
  const out = await run(`${ROOT}tapd`, [
    "bench",
    target,
    `--rw=${w.rw}`,
    `--bs=${w.bs}`,
    `--qd=${w.qd}`,
    `--seconds=${seconds}`,
    "--json",
    ...extra,
  ]);
  return JSON.parse(out).iops;
}

/** The shared 2 GiB data file (fully written by fio, so reads reach the device). */
export async function ensureDataFile(
  path = "/var/tmp/tapd-bench-2g.img",
  gib = 2,
): Promise<string> {
  try {
    if ((await Deno.stat(path)).size === gib * 2 ** 30) return path;
  } catch { /* create it */ }
  console.log(`creating ${path} (${gib} GiB of data) ...`);
  await run("fio", [
    "--name=fill",
    `--filename=${path}`,
    `--size=${gib}G`,
    "--rw=write",
    "--bs=1M",
    "--direct=1",
    "--ioengine=libaio",
    "--iodepth=16",
  ]);
  return path;
}
