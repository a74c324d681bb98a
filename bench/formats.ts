/**
 * Image formats side by side (issue: VMDK and VHD drivers):
 *  1. `tapd convert` against `qemu-img convert` making the same image from the 2 GiB data file
 *     (raw→vmdk, raw→vhd, raw→qcow, and vmdk→qcow), page cache dropped before each run;
 *  2. in process, `tapd bench` on each format's image against the raw file: 4k random read and
 *     write QD64, 1M sequential read QD16, ratios per round.
 * Rounds are interleaved so that the machine's drift hits every contender alike.
 *
 *   deno run -A bench/formats.ts [--rounds 3] [--seconds 4] [--formats vmdk,vhd,qcow] [--json]
 */
import { parseArgs } from "node:util";
import { IMAGE_FORMATS } from "../tools/formats.ts";
import { ensureDataFile, median, ROOT, run, tapdIops, type Workload } from "./common.ts";

const { values } = parseArgs({
  options: {
    rounds: { type: "string", default: "3" },
    seconds: { type: "string", default: "4" },
    formats: { type: "string", default: "vmdk,vhd,qcow" },
    json: { type: "boolean", default: false },
    "skip-convert": { type: "boolean", default: false },
  },
});
const rounds = Number(values.rounds), seconds = Number(values.seconds);
const formats = values.formats.split(",").filter((f) => IMAGE_FORMATS.has(f));
const QEMU_NAME: Record<string, string> = { vhd: "vpc", vmdk: "vmdk", qcow: "qcow" };

const WORKLOADS: Workload[] = [
  { name: "rand read 4k QD64", rw: "randread", bs: "4k", qd: 64 },
  { name: "rand write 4k QD64", rw: "randwrite", bs: "4k", qd: 64 },
  { name: "seq read 1M QD16", rw: "read", bs: "1M", qd: 16 },
];

function dropCaches(): void {
  try {
    Deno.writeTextFileSync("/proc/sys/vm/drop_caches", "3");
  } catch { /* not root: timings include the page cache */ }
}

async function timed(cmd: string, args: string[]): Promise<number> {
  dropCaches();
  const t = performance.now();
  await run(cmd, args);
  return (performance.now() - t) / 1000;
}

const data = await ensureDataFile();
const image = (f: string, who: string) => `/var/tmp/tapd-bench-2g.${who}.${f}`;
const results: Record<string, unknown> = {};

if (!values["skip-convert"]) {
  const jobs: { name: string; tapd: string[]; qemu: string[] }[] = [];
  for (const f of formats) {
    jobs.push({
      name: `raw→${f}`,
      tapd: ["convert", "--force", "-O", f, data, image(f, "tapd")],
      qemu: ["convert", "-f", "raw", "-O", QEMU_NAME[f], data, image(f, "qemu")],
    });
  }
  if (formats.includes("vmdk")) {
    jobs.push({
      name: "vmdk→qcow",
      tapd: [
        "convert",
        "--force",
        "-O",
        "qcow",
        image("vmdk", "tapd"),
        "/var/tmp/tapd-bench-vq.qcow",
      ],
      qemu: [
        "convert",
        "-f",
        "vmdk",
        "-O",
        "qcow",
        image("vmdk", "tapd"),
        "/var/tmp/tapd-bench-vq.q",
      ],
    });
  }
  const times: Record<string, { tapd: number[]; qemu: number[] }> = {};
  for (let r = 0; r < rounds; r++) {
    for (const j of jobs) {
      times[j.name] ??= { tapd: [], qemu: [] };
      try {
        Deno.removeSync(j.qemu[j.qemu.length - 1]); // qemu-img has no --force
      } catch { /* not there */ }
      times[j.name].tapd.push(await timed(`${ROOT}tapd`, j.tapd));
      times[j.name].qemu.push(await timed("qemu-img", j.qemu));
    }
  }
  console.log("\nconvert of the 2 GiB data file (seconds, median of rounds; lower is better)");
  console.log(
    "job".padEnd(12),
    "tapd".padStart(8),
    "qemu-img".padStart(10),
    "tapd/qemu".padStart(10),
  );
  for (const [name, t] of Object.entries(times)) {
    const a = median(t.tapd), b = median(t.qemu);
    console.log(
      name.padEnd(12),
      a.toFixed(2).padStart(8),
      b.toFixed(2).padStart(10),
      `${(a / b).toFixed(2)}×`.padStart(10),
    );
  }
  results.convert = times;
}

// In process: each format's tapd-made image against the raw file.
for (const f of formats) {
  try {
    Deno.statSync(image(f, "tapd"));
  } catch {
    await run(`${ROOT}tapd`, ["convert", "-O", f, data, image(f, "tapd")]);
  }
}
const iops: Record<string, Record<string, number[]>> = {};
for (let r = 0; r < rounds; r++) {
  for (const w of WORKLOADS) {
    iops[w.name] ??= {};
    const raw = await tapdIops(`tap:aio:${data}`, w, seconds);
    (iops[w.name].raw ??= []).push(raw);
    for (const f of formats) {
      const x = await tapdIops(`tap:${f}:${image(f, "tapd")}`, w, seconds);
      (iops[w.name][f] ??= []).push(x);
      (iops[w.name][`${f}/raw`] ??= []).push(x / raw);
    }
  }
}
console.log(
  `\nin process, tapd bench (IOPS, median of ${rounds} rounds of ${seconds} s; ratio = median of per-round ratios)`,
);
console.log("workload".padEnd(20), "raw".padStart(9), ...formats.map((f) => `${f}`.padStart(16)));
for (const w of WORKLOADS) {
  const row = iops[w.name];
  console.log(
    w.name.padEnd(20),
    Math.round(median(row.raw)).toString().padStart(9),
    ...formats.map((f) =>
      `${Math.round(median(row[f]))} ${median(row[`${f}/raw`]).toFixed(2)}×`.padStart(16)
    ),
  );
}
results.inProcess = iops;
if (values.json) console.log(JSON.stringify(results));
