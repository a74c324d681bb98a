/**
 * How far a FUSE export can go on this host, and how much of that tapd keeps: fio's 4 KiB random
 * I/O on `losetup --direct-io=on` over
 *
 *   native     the raw file itself
 *   floor      bench/fuse_floor.c's file: a C FUSE server that does no I/O (WRITE dropped, READ
 *              zeros; one blocking read(2) and one write(2) a request): the kernel's own cost of
 *              loop → FUSE → server → reply, the most any FUSE server could reach here
 *   tapd ram   `tapd serve tap:ram:… --fuse`: tapd's request path with memory behind it
 *   tapd aio   `tapd serve tap:aio:RAW --fuse`: the seed table's tapd aio row, on the loop device
 *   tapd aio io-threads   the same with `--io-threads 2`: reads and writes served by two Workers
 *              with their own aio contexts (fuse/io_threads.ts)
 *   tapd aio uring   the same with `--fuse-uring`: requests through io_uring ring entries, reads and
 *              writes by a thread per CPU with io_uring I/O (fuse/uring.ts)
 *   tapd aio passthrough   the same with `--passthrough`: the kernel reads and writes RAW itself
 *
 * each with its ratio to the same round's native figure. Run as root:
 *   deno task bench:fuse-floor [--rounds N] [--seconds S] [--dir DIR]
 */
import { parseArgs } from "node:util";
import { median, ROOT, run } from "./common.ts";

const { values: opts } = parseArgs({
  options: {
    rounds: { type: "string", default: "3" },
    seconds: { type: "string", default: "8" },
    dir: { type: "string", default: "/var/tmp" },
  },
});
const rounds = Number(opts.rounds), seconds = Number(opts.seconds);
if (!Number.isInteger(rounds) || rounds < 1 || !Number.isInteger(seconds) || seconds < 1) {
  console.error("fuse_floor: --rounds and --seconds want whole numbers of at least 1");
  Deno.exit(2);
}
if (Deno.uid() !== 0) {
  console.error("fuse_floor: needs root (loop devices, mounts)");
  Deno.exit(1);
}
{
  const ensure = await new Deno.Command("bash", {
    args: ["-c", `source "${ROOT}scripts/bootstrap.sh" && ensure_packages fio:fio gcc:gcc`],
  }).output();
  if (ensure.code !== 0) Deno.exit(1);
}

const GiB = 2 ** 30;
const JOBS = [
  { name: "rand write 4k QD64", rw: "randwrite", qd: 64 },
  { name: "rand read 4k QD64", rw: "randread", qd: 64 },
  { name: "rand read 4k QD1", rw: "randread", qd: 1 },
];

function log(msg: string): void {
  console.error(`fuse_floor: ${msg}`);
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

function isMountPoint(path: string): boolean {
  return Deno.readTextFileSync("/proc/self/mountinfo").split("\n").some((l) =>
    l.split(" ")[4] === path
  );
}

/** Starts `cmd` serving a FUSE file at `file`; resolves once mounted, with its stop. */
async function serve(cmd: string, args: string[], file: string): Promise<() => Promise<void>> {
  Deno.writeFileSync(file, new Uint8Array(0));
  const child = new Deno.Command(cmd, { args, stdin: "null", stdout: "null", stderr: "inherit" })
    .spawn();
  for (let i = 0; i < 200 && !isMountPoint(file); i++) await sleep(50);
  if (!isMountPoint(file)) {
    child.kill("SIGKILL");
    await child.status;
    throw new Error(`${cmd} did not mount ${file}`);
  }
  return async () => {
    if (cmd.endsWith("fuse_floor")) await run("umount", [file]); // it serves until unmounted
    try {
      child.kill("SIGTERM");
    } catch { /* already gone */ }
    await child.status;
  };
}

async function fio(dev: string, job: (typeof JOBS)[number]): Promise<number> {
  const out = await run("fio", [
    "--name=floor",
    `--filename=${dev}`,
    "--ioengine=libaio",
    "--direct=1",
    `--rw=${job.rw}`,
    "--bs=4k",
    `--iodepth=${job.qd}`,
    `--runtime=${seconds}`,
    "--time_based",
    "--output-format=json",
  ]);
  const j = JSON.parse(out.slice(out.indexOf("{"))).jobs[0];
  return Math.round(job.rw === "randwrite" ? j.write.iops : j.read.iops);
}

/** fio's jobs on a direct-I/O loop device over `file`. */
async function onLoop(file: string): Promise<number[]> {
  const dev = (await run("losetup", ["--direct-io=on", "--find", "--show", file])).trim();
  try {
    const out: number[] = [];
    for (const job of JOBS) out.push(await fio(dev, job));
    return out;
  } finally {
    await run("losetup", ["-d", dev]);
  }
}

const work = Deno.makeTempDirSync({ dir: opts.dir, prefix: "tapd-floor-" });
try {
  const raw = `${work}/disk.raw`, zeros = `${work}/ram.raw`, file = `${work}/export`;
  const server = `${work}/fuse_floor`;
  await run("gcc", ["-O2", "-o", server, `${ROOT}bench/fuse_floor.c`]);
  log("writing a 2 GiB raw file");
  await run("fio", [
    "--name=fill",
    `--filename=${raw}`,
    "--size=2G",
    "--rw=write",
    "--bs=1M",
    "--direct=1",
    "--ioengine=libaio",
    "--iodepth=8",
  ]);
  Deno.writeFileSync(zeros, new Uint8Array(0));
  Deno.truncateSync(zeros, 2 * GiB);
  const rows: { name: string; start: () => Promise<[string, () => Promise<void>]> }[] = [
    { name: "native", start: () => Promise.resolve([raw, () => Promise.resolve()]) },
    {
      name: "floor (C, no I/O)",
      start: async () => [file, await serve(server, [file, String(2 * GiB)], file)],
    },
    {
      name: "tapd ram",
      start: async () => [
        file,
        await serve(`${ROOT}tapd`, ["serve", `tap:ram:${zeros}`, "--fuse", file], file),
      ],
    },
    {
      name: "tapd aio",
      start: async () => [
        file,
        await serve(`${ROOT}tapd`, ["serve", `tap:aio:${raw}`, "--fuse", file], file),
      ],
    },
    {
      name: "tapd aio io-threads",
      start: async () => [
        file,
        await serve(
          `${ROOT}tapd`,
          ["serve", `tap:aio:${raw}`, "--fuse", file, "--io-threads", "2"],
          file,
        ),
      ],
    },
    {
      name: "tapd aio uring",
      start: async () => [
        file,
        await serve(
          `${ROOT}tapd`,
          ["serve", `tap:aio:${raw}`, "--fuse", file, "--fuse-uring"],
          file,
        ),
      ],
    },
    {
      name: "tapd aio passthrough",
      start: async () => [
        file,
        await serve(
          `${ROOT}tapd`,
          ["serve", `tap:aio:${raw}`, "--fuse", file, "--passthrough"],
          file,
        ),
      ],
    },
  ];
  const results: number[][][] = rows.map(() => []); // [row][round][job]
  for (let round = 0; round < rounds; round++) {
    for (let k = 0; k < rows.length; k++) {
      const i = (k + round) % rows.length; // rotated, so none always runs first
      log(`${rows[i].name} (round ${round + 1} of ${rounds})`);
      const [target, stop] = await rows[i].start();
      try {
        results[i].push(await onLoop(target));
      } finally {
        await stop();
      }
    }
  }
  const header = ["", ...JOBS.map((j) => j.name)];
  const lines = rows.map((row, i) => [
    row.name,
    ...JOBS.map((_, j) => {
      const iops = median(results[i].map((r) => r[j]));
      if (i === 0) return iops.toLocaleString("en-US");
      const ratios = results[i].map((r, round) => r[j] / results[0][round][j]);
      const lo = Math.min(...ratios).toFixed(2), hi = Math.max(...ratios).toFixed(2);
      return `${iops.toLocaleString("en-US")} (${median(ratios).toFixed(2)}×, ${lo}–${hi})`;
    }),
  ]);
  const widths = header.map((_, c) => Math.max(...[header, ...lines].map((l) => l[c].length)));
  const fmt = (l: string[]) => `| ${l.map((s, c) => s.padEnd(widths[c])).join(" | ")} |`;
  console.log(
    `fio --direct=1 --ioengine=libaio --bs=4k, ${seconds} s, on losetup --direct-io=on over each ` +
      `(IOPS; median of ${rounds} rounds, ratio to native and its range):\n`,
  );
  console.log([fmt(header), fmt(widths.map((w) => "-".repeat(w))), ...lines.map(fmt)].join("\n"));
} finally {
  for (const f of ["export"]) {
    const path = `${work}/${f}`;
    if (isMountPoint(path)) await run("umount", ["-l", path]).catch(() => {});
  }
  Deno.removeSync(work, { recursive: true });
}
