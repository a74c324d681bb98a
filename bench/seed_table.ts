/**
 * The seed's table: ext4 on a loop device (direct I/O) over each way of turning an image into a
 * file, measured with bonnie++ (in a memory-limited cgroup v1) and fio --direct=1, each row with
 * its ratio to native.
 *
 *   native           ext4 on `losetup --direct-io=on` over the raw file itself
 *   tapd aio         … over `tapd serve tap:aio:RAW --fuse FILE`
 *   tapd aio io-threads … the same with `--io-threads 2` (reads and writes served by two Workers
 *                    with their own aio contexts; fuse/io_threads.ts)
 *   tapd aio uring   … the same with `--fuse-uring` (FUSE over io_uring, Linux 6.14+: a thread per
 *                    CPU takes requests from io_uring ring entries and serves the reads and writes
 *                    with io_uring I/O; fuse/uring.ts)
 *   tapd aio passthrough … over `tapd serve tap:aio:RAW --fuse FILE --passthrough` (the kernel
 *                    reads and writes RAW itself; tapd serves attributes, fsync, discard, seeks)
 *   tapd qcow        … over `tapd serve tap:qcow:QCOW --fuse FILE` (a sparse qcow image)
 *   nbdfuse+qemu-nbd … over nbdfuse's file, connected to `qemu-nbd --cache=none` on the raw file
 *   qsd fuse         … over `qemu-storage-daemon --export type=fuse` of the raw file
 *
 * A peer that fails is shown as failed, with what failed. Run as root:
 *   deno task bench:seed [--quick] [--rounds N] [--json] [--dir DIR] [--only NAME,NAME]
 *
 * With --rounds N every configuration runs N times, each round in a rotated order, and each cell
 * shows the median, the median ratio to the same round's native figure and that ratio's range.
 */
import { parseArgs } from "node:util";
import { median, ROOT } from "./common.ts";
import { targetLines } from "./seed_targets.ts";

const { values: opts } = parseArgs({
  options: {
    quick: { type: "boolean", default: false },
    json: { type: "boolean", default: false },
    dir: { type: "string", default: "/var/tmp" },
    only: { type: "string" },
    rounds: { type: "string", default: "1" },
  },
});

// The peers only this benchmark drives (bonnie++, qemu-storage-daemon), installed as the README's
// commands install theirs: apt-get as root, else the apt-get line to run.
{
  const ensure = await new Deno.Command("bash", {
    args: [
      "-c",
      `source "${ROOT}scripts/bootstrap.sh" && ensure_packages "\${TAPD_BENCH_PACKAGES[@]}"`,
    ],
    stdout: "inherit",
    stderr: "inherit",
  }).output();
  if (ensure.code !== 0) Deno.exit(1);
}

const MiB = 1024 * 1024;
const QUICK = opts.quick;
/** Image size, bonnie++ file size and RAM (-s, -r, MiB), cgroup limit, fio file and run time. */
const P = QUICK
  ? { imageMiB: 1024, bonnieS: 512, bonnieR: 256, cgroupMiB: 256, fioMiB: 256, fioSeconds: 3 }
  : { imageMiB: 4096, bonnieS: 2048, bonnieR: 512, cgroupMiB: 512, fioMiB: 1024, fioSeconds: 10 };

const dec = new TextDecoder();

function log(msg: string): void {
  console.error(`seed_table: ${msg}`);
}

interface Out {
  code: number;
  stdout: string;
  stderr: string;
}

async function sh(cmd: string, args: string[], timeoutMs = 30 * 60_000): Promise<Out> {
  const abort = new AbortController();
  const timer = setTimeout(() => abort.abort(), timeoutMs);
  try {
    const r = await new Deno.Command(cmd, {
      args,
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
      signal: abort.signal,
    }).output();
    return { code: r.code, stdout: dec.decode(r.stdout), stderr: dec.decode(r.stderr) };
  } finally {
    clearTimeout(timer);
  }
}

async function ok(cmd: string, args: string[], timeoutMs?: number): Promise<string> {
  const r = await sh(cmd, args, timeoutMs);
  if (r.code !== 0) {
    const why = (r.stderr || r.stdout).trim().split("\n").slice(-2).join(" / ");
    throw new Error(`${cmd} ${args.slice(0, 3).join(" ")}: ${why || `exit ${r.code}`}`);
  }
  return r.stdout;
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

function isMountPoint(path: string): boolean {
  const info = Deno.readTextFileSync("/proc/self/mountinfo");
  return info.split("\n").some((l) => l.split(" ")[4] === path);
}

async function waitFor(what: string, cond: () => boolean, ms = 20_000): Promise<void> {
  for (const end = Date.now() + ms; Date.now() < end; await sleep(100)) if (cond()) return;
  throw new Error(`timed out waiting for ${what}`);
}

/** A background process, killed at teardown; its stderr kept for error messages. */
class Background {
  readonly child: Deno.ChildProcess;
  stderr = "";
  readonly done: Promise<Deno.CommandStatus>;

  constructor(cmd: string, args: string[]) {
    const child = new Deno.Command(cmd, {
      args,
      stdin: "null",
      stdout: "null",
      stderr: "piped",
    }).spawn();
    this.child = child;
    (async () => {
      for await (const c of child.stderr) this.stderr = (this.stderr + dec.decode(c)).slice(-4096);
    })().catch(() => {});
    this.done = this.child.status;
  }

  async stop(signal: Deno.Signal = "SIGTERM"): Promise<void> {
    try {
      this.child.kill(signal);
    } catch { /* gone */ }
    const t = setTimeout(() => {
      try {
        this.child.kill("SIGKILL");
      } catch { /* gone */ }
    }, 15_000);
    await this.done;
    clearTimeout(t);
  }
}

/** How one configuration provides the file the loop device sits on. */
interface Kind {
  name: string;
  /** Starts whatever serves the file; returns the file and a teardown. */
  setup(work: string, raw: string): Promise<{ file: string; teardown: () => Promise<void> }>;
}

async function tapdServe(spec: string, file: string, extra: string[] = []) {
  Deno.writeFileSync(file, new Uint8Array(0));
  const p = new Background(`${ROOT}tapd`, ["serve", spec, "--fuse", file, ...extra]);
  await waitFor("tapd serve to mount", () => isMountPoint(file)).catch((e) => {
    throw new Error(`${(e as Error).message}: ${p.stderr.trim().split("\n").pop()}`);
  });
  await sleep(200);
  return {
    file,
    stderr: () => p.stderr,
    teardown: async () => {
      await p.stop();
      if (isMountPoint(file)) await sh("umount", ["-l", file]);
    },
  };
}

const KINDS: Kind[] = [
  {
    name: "native",
    setup: (_work, raw) => Promise.resolve({ file: raw, teardown: () => Promise.resolve() }),
  },
  {
    name: "tapd aio",
    setup: (work, raw) => tapdServe(`tap:aio:${raw}`, `${work}/tapd-aio.file`),
  },
  {
    // Reads and writes on two Workers, off the event loop (fuse/io_threads.ts).
    name: "tapd aio io-threads",
    setup: (work, raw) =>
      tapdServe(`tap:aio:${raw}`, `${work}/tapd-io.file`, ["--io-threads", "2"]),
  },
  {
    // Requests through io_uring ring entries, reads and writes by a thread per CPU (Linux 6.14+).
    name: "tapd aio uring",
    async setup(work, raw) {
      const served = await tapdServe(`tap:aio:${raw}`, `${work}/tapd-uring.file`, ["--fuse-uring"]);
      if (!/uring=true/.test(served.stderr())) {
        await served.teardown();
        throw new Error("this kernel has no FUSE over io_uring (Linux 6.14+)");
      }
      return served;
    },
  },
  {
    // The kernel reads and writes the raw file itself (Linux 6.9+); tapd serves the rest.
    name: "tapd aio passthrough",
    async setup(work, raw) {
      const served = await tapdServe(`tap:aio:${raw}`, `${work}/tapd-pt.file`, ["--passthrough"]);
      if (!/passthrough=true/.test(served.stderr())) {
        await served.teardown();
        throw new Error("this kernel has no FUSE passthrough (Linux 6.9+)");
      }
      return served;
    },
  },
  {
    name: "tapd qcow",
    async setup(work) {
      const qcow = `${work}/disk.qcow`;
      try {
        Deno.removeSync(qcow);
      } catch { /* none */ }
      await ok(`${ROOT}tapd`, ["qcow-create", String(P.imageMiB), qcow]);
      const served = await tapdServe(`tap:qcow:${qcow}`, `${work}/tapd-qcow.file`);
      return {
        file: served.file,
        teardown: async () => {
          await served.teardown();
          Deno.removeSync(qcow);
        },
      };
    },
  },
  {
    name: "nbdfuse+qemu-nbd",
    async setup(work, raw) {
      const sock = `${work}/qemu-nbd.sock`, dir = `${work}/nbdfuse`;
      Deno.mkdirSync(dir, { recursive: true });
      const nbd = new Background("qemu-nbd", [
        "-f",
        "raw",
        "-t",
        "-k",
        sock,
        "--cache=none",
        "--aio=native",
        raw,
      ]);
      try {
        await waitFor("qemu-nbd's socket", () => {
          try {
            return Deno.statSync(sock).isSocket === true;
          } catch {
            return false;
          }
        });
      } catch (e) {
        await nbd.stop();
        throw new Error(`qemu-nbd: ${(e as Error).message}: ${nbd.stderr.trim()}`);
      }
      let fuse: Background | null = null;
      try {
        fuse = new Background("nbdfuse", [dir, "--unix", sock]);
        await waitFor("nbdfuse to mount", () => isMountPoint(dir));
      } catch (e) {
        // qemu-nbd -t would otherwise outlive the row, holding the image's lock.
        await fuse?.stop();
        await nbd.stop();
        throw new Error(`nbdfuse: ${(e as Error).message}: ${fuse?.stderr.trim() ?? ""}`);
      }
      const served = fuse;
      return {
        file: `${dir}/nbd`,
        teardown: async () => {
          await sh("umount", [dir]);
          await served.stop();
          await nbd.stop();
          if (isMountPoint(dir)) await sh("umount", ["-l", dir]);
        },
      };
    },
  },
  {
    name: "qsd fuse",
    async setup(work, raw) {
      const file = `${work}/qsd.file`;
      Deno.writeFileSync(file, new Uint8Array(0));
      const qsd = new Background("qemu-storage-daemon", [
        "--blockdev",
        `driver=file,node-name=disk,filename=${raw},cache.direct=on,aio=native`,
        "--export",
        `type=fuse,id=exp0,node-name=disk,mountpoint=${file},writable=on`,
      ]);
      try {
        await waitFor("qemu-storage-daemon to mount", () => isMountPoint(file));
      } catch (e) {
        await qsd.stop();
        throw new Error(`qemu-storage-daemon: ${(e as Error).message}: ${qsd.stderr.trim()}`);
      }
      return {
        file,
        teardown: async () => {
          await qsd.stop();
          if (isMountPoint(file)) await sh("umount", ["-l", file]);
        },
      };
    },
  },
];

// ---- the tests ----

/** bonnie++'s six figures (KiB/s; seeks/s), null where it printed +++++ (too fast to time). */
interface Bonnie {
  putc: number | null;
  putBlock: number | null;
  rewrite: number | null;
  getc: number | null;
  getBlock: number | null;
  seeks: number | null;
}
const BONNIE_COLUMNS: [keyof Bonnie, string][] = [
  ["putc", "per-char out"],
  ["putBlock", "block out"],
  ["rewrite", "rewrite"],
  ["getc", "per-char in"],
  ["getBlock", "block in"],
  ["seeks", "seeks"],
];

const CGROUP_ROOT = "/sys/fs/cgroup/memory";

async function bonnie(mnt: string): Promise<{ result: Bonnie; cgroup: boolean }> {
  const args = [
    "-d",
    mnt,
    "-s",
    String(P.bonnieS),
    "-r",
    String(P.bonnieR),
    "-n",
    "0",
    "-u",
    "root",
    "-q",
  ];
  let cgroup: string | null = null;
  try {
    if (Deno.statSync(`${CGROUP_ROOT}/memory.limit_in_bytes`).isFile) {
      cgroup = `${CGROUP_ROOT}/tapd-seed-${Deno.pid}`;
      Deno.mkdirSync(cgroup, { recursive: true });
      Deno.writeTextFileSync(`${cgroup}/memory.limit_in_bytes`, String(P.cgroupMiB * MiB));
    }
  } catch {
    cgroup = null;
  }
  try {
    const script = cgroup === null
      ? `exec bonnie++ "$@"`
      : `echo $$ > ${cgroup}/cgroup.procs && exec bonnie++ "$@"`;
    const out = await ok("sh", ["-c", script, "bonnie", ...args], 60 * 60_000);
    const line = out.trim().split("\n").filter((l) => /^\d/.test(l)).pop() ?? "";
    const f = line.split(",");
    const num = (s: string | undefined) => (s === undefined || !/^\d+$/.test(s) ? null : Number(s));
    return {
      result: {
        putc: num(f[9]),
        putBlock: num(f[11]),
        rewrite: num(f[13]),
        getc: num(f[15]),
        getBlock: num(f[17]),
        seeks: num(f[19]),
      },
      cgroup: cgroup !== null,
    };
  } finally {
    if (cgroup !== null) {
      try {
        Deno.removeSync(cgroup);
      } catch { /* still busy for a moment */ }
    }
  }
}

interface FioJob {
  name: string;
  rw: string;
  bs: string;
  qd: number;
}
const FIO_JOBS: FioJob[] = [
  { name: "seq write 1M QD16", rw: "write", bs: "1M", qd: 16 },
  { name: "rand write 4k QD64", rw: "randwrite", bs: "4k", qd: 64 },
  { name: "seq read 1M QD16", rw: "read", bs: "1M", qd: 16 },
  { name: "rand read 4k QD64", rw: "randread", bs: "4k", qd: 64 },
];

async function fio(file: string, job: FioJob): Promise<number> {
  const out = await ok("fio", [
    "--name=seed",
    `--filename=${file}`,
    `--size=${P.fioMiB}M`,
    "--ioengine=libaio",
    "--direct=1",
    `--rw=${job.rw}`,
    `--bs=${job.bs}`,
    `--iodepth=${job.qd}`,
    `--runtime=${P.fioSeconds}`,
    "--time_based",
    "--output-format=json",
  ]);
  const j = JSON.parse(out.slice(out.indexOf("{"))).jobs[0];
  return job.rw.includes("write") ? j.write.iops : j.read.iops;
}

interface Row {
  name: string;
  error?: string;
  /** Why the row was measured on a buffered loop device instead. */
  note?: string;
  loopDirectIo?: boolean;
  cgroup?: boolean;
  bonnie?: Bonnie;
  fio?: Record<string, number>;
}

/**
 * One configuration, on a direct-I/O loop device; if the file system cannot even be made and
 * mounted that way, once more on a buffered loop device (the row says why).
 */
async function measure(kind: Kind, work: string, raw: string): Promise<Row> {
  const row = await measureOnce(kind, work, raw, true);
  if (row.error === undefined || !/^(losetup|mkfs|mount)/.test(row.error)) return row;
  log(`${kind.name}: again on a buffered loop device`);
  const again = await measureOnce(kind, work, raw, false);
  if (again.error !== undefined) return row;
  again.note = `direct-I/O loop: ${row.error}`;
  return again;
}

async function measureOnce(kind: Kind, work: string, raw: string, direct: boolean): Promise<Row> {
  const row: Row = { name: kind.name };
  let step = "setup";
  let served: { file: string; teardown: () => Promise<void> } | null = null;
  let loop = "";
  const mnt = `${work}/mnt`;
  let mounted = false;
  try {
    // The same blocks for every row: the raw image is allocated once, then zeroed in place
    // (unwritten extents) before each row, and mkfs does not discard. A fresh sparse file per row
    // let the host file system place each row's data elsewhere, which alone moved 4k random
    // writes 2× between rows.
    await ok("fallocate", ["-l", `${P.imageMiB}MiB`, raw]);
    await ok("fallocate", ["--zero-range", "-o", "0", "-l", `${P.imageMiB}MiB`, raw]);
    served = await kind.setup(work, raw);
    step = "losetup";
    loop = (await ok("losetup", [
      `--direct-io=${direct ? "on" : "off"}`,
      "--find",
      "--show",
      served.file,
    ]))
      .trim();
    const dio = await ok("losetup", ["--list", "--noheadings", "--output", "DIO", loop]);
    row.loopDirectIo = dio.trim() === "1";
    step = "mkfs.ext4";
    await ok("mkfs.ext4", ["-q", "-F", "-E", "nodiscard", loop], 10 * 60_000);
    Deno.mkdirSync(mnt, { recursive: true });
    step = "mount";
    await ok("mount", [loop, mnt]);
    mounted = true;
    step = "bonnie++";
    log(`${kind.name}: bonnie++ -s ${P.bonnieS} -r ${P.bonnieR}`);
    const b = await bonnie(mnt);
    row.bonnie = b.result;
    row.cgroup = b.cgroup;
    row.fio = {};
    for (const job of FIO_JOBS) {
      step = `fio ${job.name}`;
      log(`${kind.name}: fio ${job.name}`);
      row.fio[job.name] = await fio(`${mnt}/fio.dat`, job);
    }
  } catch (e) {
    row.error = `${step}: ${(e as Error).message.replace(/\s+/g, " ").trim()}`;
    log(`${kind.name} failed: ${row.error}`);
  } finally {
    if (mounted && (await sh("umount", [mnt])).code !== 0) await sh("umount", ["-l", mnt]);
    if (loop !== "") await sh("losetup", ["-d", loop]);
    if (served !== null) await served.teardown().catch(() => {});
  }
  return row;
}

// ---- output ----

/** One configuration over every round: its rows, in round order. */
interface Series {
  name: string;
  rounds: Row[];
}

/** The rounds' figures that are numbers, or null where bonnie++ mostly printed +++++. */
function timed(values: (number | null | undefined)[]): number[] | null {
  const measured = values.filter((v) => v !== undefined);
  const nums = measured.filter((v): v is number => v !== null);
  return nums.length * 2 <= measured.length ? null : nums;
}

/**
 * The ratios of `values` to the same round's native figures, or null where a cell shows none:
 * the row, or native itself, mostly too fast to measure.
 */
function ratiosTo(
  values: (number | null | undefined)[],
  bases: (number | null | undefined)[],
): number[] | null {
  const nums = timed(values);
  if (nums === null) return null;
  const ratios: number[] = [];
  values.forEach((v, i) => {
    const b = bases[i];
    if (typeof v === "number" && typeof b === "number" && b > 0) ratios.push(v / b);
  });
  return ratios.length * 2 <= nums.length ? null : ratios;
}

/**
 * A cell: the median of the rounds' values and the median of their ratios to the same round's
 * native figure, with the ratios' range when there was more than one round.
 */
function cell(
  values: (number | null | undefined)[],
  /** The same round's native figures; null for native's own row. */
  bases: (number | null | undefined)[] | null,
): string {
  if (values.every((v) => v === undefined)) return "-";
  const nums = timed(values);
  if (nums === null) return "+++++"; // bonnie++: too fast to measure
  const mid = median(nums);
  let out = Math.round(mid).toLocaleString("en-US");
  if (bases === null) { // native: how far its rounds spread around their median
    const spread = Math.max(...nums.map((v) => Math.abs(v / mid - 1)));
    return nums.length > 1 ? `${out} (±${Math.round(spread * 100)}%)` : `${out} (1.00×)`;
  }
  const ratios = ratiosTo(values, bases);
  if (ratios === null) return out;
  out += ` (${median(ratios).toFixed(2)}×`;
  if (ratios.length > 1) {
    out += `, ${Math.min(...ratios).toFixed(2)}–${Math.max(...ratios).toFixed(2)}`;
  }
  return out + ")";
}

function table(head: string[], rows: string[][]): string {
  const widths = head.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? "").length)));
  const line = (cells: string[]) =>
    "| " + cells.map((c, i) => (c ?? "").padEnd(widths[i])).join(" | ") + " |";
  return [line(head), "| " + widths.map((w) => "-".repeat(w)).join(" | ") + " |", ...rows.map(line)]
    .join("\n");
}

/** A failure as a table cell: short; the whole message goes under the table. */
function failed(r: Row): string {
  const e = r.error ?? "";
  return `failed: ${e.length > 70 ? e.slice(0, 67) + "…" : e}`;
}

function label(s: Series): string {
  return s.name + (s.rounds.some((r) => r.loopDirectIo === false) ? " (buffered loop)" : "");
}

/** What failed or fell back, once per configuration and message, with the rounds it happened in. */
function notes(series: Series[]): string[] {
  const out: string[] = [];
  for (const s of series) {
    const seen = new Map<string, number[]>();
    s.rounds.forEach((r, i) => {
      const texts = [
        r.error === undefined ? undefined : `failed at ${r.error}`,
        r.note === undefined ? undefined : `ran on a buffered loop device; ${r.note}`,
      ];
      for (const t of texts) if (t !== undefined) seen.set(t, [...(seen.get(t) ?? []), i + 1]);
    });
    for (const [text, when] of seen) {
      const rounds = s.rounds.length === 1
        ? ""
        : when.length === s.rounds.length
        ? " (every round)"
        : ` (round${when.length > 1 ? "s" : ""} ${when.join(", ")})`;
      out.push(`- ${s.name}${rounds} ${text}`);
    }
  }
  return out.length > 0 ? ["", ...out] : [];
}

function render(series: Series[], rounds: number): string {
  const native = series.find((s) => s.name === "native");
  /** Native's rows by round, undefined where native failed. */
  const base = (i: number): Row | undefined => {
    const r = native?.rounds[i];
    return r?.error === undefined ? r : undefined;
  };
  const rowsOf = (s: Series, cells: (ok: Row[], idx: number[]) => string[]): string[] => {
    const ok = s.rounds.filter((r) => r.error === undefined);
    if (ok.length === 0) return [s.name, failed(s.rounds[s.rounds.length - 1])];
    const idx = s.rounds.flatMap((r, i) => (r.error === undefined ? [i] : []));
    return [label(s), ...cells(ok, idx)];
  };
  /** Native's figures for the rounds `idx`, undefined where native failed. */
  const basesOf = (idx: number[], pick: (r: Row) => number | null | undefined) =>
    idx.map((i) => {
      const b = base(i);
      return b === undefined ? undefined : pick(b);
    });
  /** One column of one configuration: native's own spread, or ratios to native by round. */
  const column = (
    s: Series,
    ok: Row[],
    idx: number[],
    pick: (r: Row) => number | null | undefined,
  ): string => cell(ok.map(pick), s === native ? null : basesOf(idx, pick));
  /** The median of what a configuration's cell shows as its ratio to native, or null. */
  const ratio = (s: Series, pick: (r: Row) => number | null | undefined): number | null => {
    const idx = s.rounds.flatMap((r, i) => (r.error === undefined ? [i] : []));
    const ratios = ratiosTo(idx.map((i) => pick(s.rounds[i])), basesOf(idx, pick));
    return ratios === null ? null : median(ratios);
  };
  const pickOf = (column: string): (r: Row) => number | null | undefined => {
    const b = BONNIE_COLUMNS.find(([, h]) => h === column);
    return b !== undefined ? (r) => r.bonnie?.[b[0]] : (r) => r.fio?.[column];
  };
  const ratioOf = (row: string, column: string): number | null => {
    const s = series.find((x) => x.name === row);
    return s === undefined ? null : ratio(s, pickOf(column));
  };
  const bonnieRows = series.map((s) =>
    rowsOf(s, (ok, idx) => BONNIE_COLUMNS.map(([k]) => column(s, ok, idx, (r) => r.bonnie?.[k])))
  );
  const fioRows = series.map((s) =>
    rowsOf(s, (ok, idx) => FIO_JOBS.map((j) => column(s, ok, idx, (r) => r.fio?.[j.name])))
  );
  const cg = series.some((s) => s.rounds.some((r) => r.cgroup))
    ? `, in a ${P.cgroupMiB} MiB memory cgroup`
    : "";
  const how = rounds > 1
    ? `median of ${rounds} rounds; native: how far its rounds spread; the others: the median of their ratios to the same round's native, and the ratios' range`
    : "ratio to native";
  return [
    `bonnie++ -s ${P.bonnieS} -r ${P.bonnieR} -n 0${cg} (K/sec; seeks /sec; ${how}):`,
    "",
    table(["", ...BONNIE_COLUMNS.map(([, h]) => h)], bonnieRows),
    "",
    `fio --direct=1 --ioengine=libaio, ${P.fioMiB} MiB file, ${P.fioSeconds} s each (IOPS; ${how}):`,
    "",
    table(["", ...FIO_JOBS.map((j) => j.name)], fioRows),
    ...notes(series),
    ...(native === undefined ? [] : targetLines(
      ratioOf,
      new Set(series.filter((s) => s.rounds.some((r) => r.error === undefined)).map((s) => s.name)),
      [...BONNIE_COLUMNS.map(([, h]) => h), ...FIO_JOBS.map((j) => j.name)],
    )),
  ].join("\n");
}

// ---- main ----

if (Deno.uid() !== 0) {
  console.error("seed_table: needs root (loop devices, mounts, cgroups)");
  Deno.exit(1);
}
const rounds = Number(opts.rounds);
if (!Number.isInteger(rounds) || rounds < 1) {
  console.error(`seed_table: --rounds wants a whole number of rounds, not "${opts.rounds}"`);
  Deno.exit(2);
}
const only = opts.only?.split(",").map((s) => s.trim());
const kinds = KINDS.filter((k) =>
  only === undefined || only.includes(k.name) || k.name === "native"
);
const series: Series[] = kinds.map((k) => ({ name: k.name, rounds: [] }));
const work = Deno.makeTempDirSync({ dir: opts.dir, prefix: "tapd-seed-" });
try {
  const raw = `${work}/disk.raw`;
  for (let round = 0; round < rounds; round++) {
    // Each round starts one configuration later, so none always runs first (or right after
    // another one's writes).
    for (let k = 0; k < kinds.length; k++) {
      const i = (k + round) % kinds.length;
      const when = rounds > 1 ? ` (round ${round + 1} of ${rounds})` : "";
      log(`${kinds[i].name}: setting up${when}`);
      series[i].rounds.push(await measure(kinds[i], work, raw));
    }
  }
} finally {
  Deno.removeSync(work, { recursive: true });
}
if (opts.json) {
  console.log(
    JSON.stringify(
      { quick: QUICK, parameters: P, rounds, date: new Date().toISOString(), series },
      null,
      2,
    ),
  );
} else {
  const what = `${QUICK ? "--quick" : "full"}${rounds > 1 ? `, ${rounds} rounds` : ""}`;
  console.log(`Seed table (${what}; ${new Date().toISOString()})\n`);
  console.log(render(series, rounds));
}
