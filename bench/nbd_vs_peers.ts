/**
 * tapd's NBD export against the peers, all driven by fio's nbd engine over Unix sockets: random
 * 4k reads and writes at QD64 and sequential 1M reads at QD16, each for a fixed time.
 *
 *   (a) raw:  `tapd serve tap:aio:RAW` · `qemu-nbd -f raw --cache=none --aio=native RAW` ·
 *             `qemu-nbd -f raw RAW` (its defaults: page cache, thread pool) · `nbdkit file RAW`
 *   (b) qcow: `tapd serve tap:qcow:IMG.qcow` · `qemu-nbd -f qcow --cache=none --aio=native
 *             IMG.qcow` · `qemu-nbd -f qcow2 --cache=none --aio=native IMG.qcow2`
 *   (c) vmdk, vhd: `tapd serve tap:vmdk:IMG.vmdk` and `tap:vhd:IMG.vhd` · qemu-nbd on IMG.qcow2
 *
 * The raw file is filled with data by fio; the qcow and qcow2 images are `qemu-img convert`ed
 * from it (fully allocated, same data). Every server is started for its runs and stopped after,
 * in an order that rotates from round to round; each ratio is the median over rounds of
 * tapd ÷ peer within the same round (the machine is shared and noisy: only ratios mean much).
 * The page-cache peers (qemu-nbd's defaults, nbdkit's file plugin) read from memory once the file
 * is cached: their figures are not disk figures.
 *
 *   deno task bench:nbd [--seconds 10] [--rounds 3] [--size 1G] [--dir /var/tmp]
 *                       [--only raw|qcow|vmdk] [--engine aio|uring] [--json]
 */
import { parseArgs } from "node:util";
import { median, ROOT, run } from "./common.ts";

const { values } = parseArgs({
  options: {
    seconds: { type: "string", default: "10" },
    rounds: { type: "string", default: "3" },
    size: { type: "string", default: "1G" },
    dir: { type: "string", default: "/var/tmp" },
    only: { type: "string" },
    engine: { type: "string" },
    json: { type: "boolean", default: false },
  },
});
const seconds = Number(values.seconds), rounds = Number(values.rounds);
const size = parseSize(values.size);
if (!(seconds > 0) || !(rounds >= 1) || !(size >= 16 * 2 ** 20)) {
  console.error("usage: nbd_vs_peers.ts [--seconds N>0] [--rounds N≥1] [--size ≥16M] [--json]");
  Deno.exit(2);
}
const log = values.json ? (..._: unknown[]) => {} : console.log;

function parseSize(text: string): number {
  const m = /^(\d+(?:\.\d+)?)([KMGT]?)i?B?$/i.exec(text.trim());
  if (!m) return NaN;
  const unit = { "": 1, K: 2 ** 10, M: 2 ** 20, G: 2 ** 30, T: 2 ** 40 }[m[2].toUpperCase()]!;
  return Math.round(Number(m[1]) * unit / 2 ** 20) * 2 ** 20;
}

function human(bytes: number): string {
  return bytes % 2 ** 30 === 0 ? `${bytes / 2 ** 30}G` : `${bytes / 2 ** 20}M`;
}

async function exists(path: string): Promise<boolean> {
  try {
    await Deno.stat(path);
    return true;
  } catch {
    return false;
  }
}

// ---------------------------------------------------------------------------------------------
// The images

const base = `${values.dir}/tapd-bench-nbd-${human(size)}`;
const RAW = `${base}.img`, QCOW = `${base}.qcow`, QCOW2 = `${base}.qcow2`;
const VMDK = `${base}.vmdk`, VHD = `${base}.vhd`;

async function ensureImages(): Promise<void> {
  const rawOk = (await exists(RAW)) && (await Deno.stat(RAW)).size === size;
  if (!rawOk) {
    log(`creating ${RAW} (${human(size)} of data, written by fio) ...`);
    await run("fio", [
      "--name=fill",
      `--filename=${RAW}`,
      `--size=${size}`,
      "--rw=write",
      "--bs=1M",
      "--direct=1",
      "--ioengine=libaio",
      "--iodepth=16",
    ]);
    for (const f of [QCOW, QCOW2, VMDK, VHD]) await Deno.remove(f).catch(() => {});
  }
  if (values.only !== "raw") {
    const images = [[QCOW, "qcow"], [QCOW2, "qcow2"], [VMDK, "vmdk"], [VHD, "vpc"]];
    for (const [path, format] of images) {
      if (await exists(path)) continue;
      log(`creating ${path} (qemu-img convert -O ${format}) ...`);
      await run("qemu-img", ["convert", "-f", "raw", "-O", format, RAW, path]);
    }
  }
  await run("sync", []); // O_DIRECT reads of files with dirty pages wait for write-back
}

/**
 * Between servers: write back what a buffered peer left dirty (an O_DIRECT reader of those
 * pages would wait for that write-back) and drop the page cache, so every server starts cold.
 */
async function settle(): Promise<void> {
  await run("sync", []);
  try {
    await Deno.writeTextFile("/proc/sys/vm/drop_caches", "3");
  } catch { /* not root: the cache stays */ }
}

// ---------------------------------------------------------------------------------------------
// The servers

interface Peer {
  label: string;
  /** The command line; SOCK is replaced by the socket path. */
  cmd: string[];
  /** Prints its URI on stdout (tapd) or is ready when its socket accepts (the others). */
  printsUri: boolean;
}

const tapdExtra = values.engine ? ["--engine", values.engine] : [];
const tapd = (spec: string): Peer => ({
  label: `tapd ${spec.split(":")[1]}`,
  cmd: [`${ROOT}tapd`, "serve", spec, "--nbd", "unix:SOCK", ...tapdExtra],
  printsUri: true,
});
// -t: keep serving after a client leaves (fio's setup probe connects and leaves first);
// -e 4: room for that probe and the job's connection at once.
const qemuNbd = (label: string, format: string, file: string, direct: boolean): Peer => ({
  label,
  cmd: [
    "qemu-nbd",
    "-f",
    format,
    ...(direct ? ["--cache=none", "--aio=native"] : []),
    "-t",
    "-e",
    "4",
    "-k",
    "SOCK",
    file,
  ],
  printsUri: false,
});

const GROUPS: { name: string; peers: Peer[]; ratios: [number, number][] }[] = [
  {
    name: `raw ${human(size)} file`,
    peers: [
      tapd(`tap:aio:${RAW}`),
      qemuNbd("qemu-nbd raw direct", "raw", RAW, true),
      qemuNbd("qemu-nbd raw defaults", "raw", RAW, false),
      { label: "nbdkit file", cmd: ["nbdkit", "-f", "-U", "SOCK", "file", RAW], printsUri: false },
    ],
    ratios: [[0, 1], [0, 2], [0, 3]] as [number, number][],
  },
  {
    name: `qcow ${human(size)}, fully allocated`,
    peers: [
      tapd(`tap:qcow:${QCOW}`),
      qemuNbd("qemu-nbd qcow direct", "qcow", QCOW, true),
      qemuNbd("qemu-nbd qcow2 direct", "qcow2", QCOW2, true),
    ],
    ratios: [[0, 1], [0, 2]] as [number, number][],
  },
  {
    name: `vmdk and vhd ${human(size)} (qemu-img made), against the same data as qcow2`,
    peers: [
      tapd(`tap:vmdk:${VMDK}`),
      tapd(`tap:vhd:${VHD}`),
      qemuNbd("qemu-nbd qcow2 direct", "qcow2", QCOW2, true),
    ],
    ratios: [[0, 2], [1, 2]] as [number, number][],
  },
].filter((g) => !values.only || g.name.startsWith(values.only));

class Running {
  readonly #child: Deno.ChildProcess;
  readonly #status: Promise<Deno.CommandStatus>;
  #exited = false;
  #stderr = "";
  readonly #drained: Promise<void>;
  stdout = "";

  constructor(readonly peer: Peer, readonly sock: string) {
    const [cmd, ...args] = peer.cmd.map((a) => a.replaceAll("SOCK", sock));
    this.#child = new Deno.Command(cmd, {
      args,
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
      env: { TAPD_LOG_LEVEL: "warn" },
    }).spawn();
    this.#status = this.#child.status.then((s) => {
      this.#exited = true;
      return s;
    });
    const drain = async (s: ReadableStream<Uint8Array>, sink: (t: string) => void) => {
      const d = new TextDecoder();
      for await (const chunk of s) sink(d.decode(chunk, { stream: true }));
    };
    this.#drained = Promise.all([
      drain(this.#child.stdout, (t) => this.stdout += t),
      drain(this.#child.stderr, (t) => this.#stderr = (this.#stderr + t).slice(-8192)),
    ]).then(() => {}, () => {});
  }

  /** Waits until the server takes connections (tapd: prints its URI). */
  async ready(timeoutMs = 30_000): Promise<string> {
    const deadline = Date.now() + timeoutMs;
    while (Date.now() < deadline) {
      if (this.#exited) throw new Error(`${this.peer.label} exited early: ${this.#stderr}`);
      if (this.peer.printsUri) {
        const line = this.stdout.split("\n").find((l) => l.startsWith("nbd+unix:"));
        if (line) return line.trim();
      } else {
        try {
          (await Deno.connect({ transport: "unix", path: this.sock })).close();
          return `nbd+unix:///?socket=${this.sock}`;
        } catch { /* not yet */ }
      }
      await new Promise((r) => setTimeout(r, 25));
    }
    await this.stop();
    throw new Error(`${this.peer.label}: not serving after ${timeoutMs} ms: ${this.#stderr}`);
  }

  /** SIGTERM, then SIGKILL after 10 s. */
  async stop(): Promise<void> {
    const kill = (sig: Deno.Signal) => {
      try {
        this.#child.kill(sig);
      } catch { /* gone */ }
    };
    if (!this.#exited) kill("SIGTERM");
    const timer = setTimeout(() => kill("SIGKILL"), 10_000);
    await this.#status;
    clearTimeout(timer);
    await this.#drained;
    await Deno.remove(this.sock).catch(() => {});
  }
}

// ---------------------------------------------------------------------------------------------
// The workloads

interface Load {
  name: string;
  rw: "randread" | "randwrite" | "read";
  bs: string;
  qd: number;
}

const LOADS: Load[] = [
  { name: "rand read 4k QD64", rw: "randread", bs: "4k", qd: 64 },
  { name: "rand write 4k QD64", rw: "randwrite", bs: "4k", qd: 64 },
  { name: "seq read 1M QD16", rw: "read", bs: "1M", qd: 16 },
];

interface Figure {
  iops: number;
  mbps: number;
}

async function fio(uri: string, w: Load): Promise<Figure> {
  const out = await run("fio", [
    "--name=nbd",
    "--ioengine=nbd", // before --uri, an option of this engine
    `--uri=${uri}`,
    `--size=${size}`,
    `--rw=${w.rw}`,
    `--bs=${w.bs}`,
    `--iodepth=${w.qd}`,
    `--runtime=${seconds}`,
    "--time_based",
    "--output-format=json",
  ]);
  const job = JSON.parse(out.slice(out.indexOf("{"))).jobs[0];
  if (job.error) throw new Error(`fio ${w.name} on ${uri}: error ${job.error}`);
  const side = w.rw === "randwrite" ? job.write : job.read;
  return { iops: side.iops, mbps: side.bw_bytes / 1e6 };
}

// ---------------------------------------------------------------------------------------------

await ensureImages();
const sockDir = await Deno.makeTempDir({ prefix: "tapd-bench-nbd-" });
const out: {
  size: number;
  seconds: number;
  rounds: number;
  groups: {
    name: string;
    peers: string[];
    loads: {
      name: string;
      runs: Figure[][]; // [peer][round]
      median: Figure[];
      ratios: { of: string; to: string; median: number; rounds: number[] }[];
    }[];
  }[];
} = { size, seconds, rounds, groups: [] };

log(
  `fio --ioengine=nbd over Unix sockets, ${
    human(size)
  }; ${rounds} rounds of ${seconds} s per run, ` +
    `the order of the servers rotating; ratio = median over rounds of tapd ÷ peer\n`,
);
try {
  for (const g of GROUPS) {
    const runs: Figure[][][] = LOADS.map(() => g.peers.map(() => []));
    for (let round = 0; round < rounds; round++) {
      for (let k = 0; k < g.peers.length; k++) {
        const p = (k + round) % g.peers.length;
        const server = new Running(g.peers[p], `${sockDir}/${p}.sock`);
        try {
          const uri = await server.ready();
          for (const [li, w] of LOADS.entries()) {
            const f = await fio(uri, w);
            runs[li][p].push(f);
            if (!values.json) {
              Deno.stderr.writeSync(
                new TextEncoder().encode(
                  `  round ${round + 1}: ${g.peers[p].label.padEnd(24)} ${w.name.padEnd(20)} ` +
                    `${f.iops.toFixed(0).padStart(8)} IOPS ${f.mbps.toFixed(0).padStart(6)} MB/s\n`,
                ),
              );
            }
          }
        } finally {
          await server.stop();
          await settle();
        }
      }
    }
    const group = {
      name: g.name,
      peers: g.peers.map((p) => p.label),
      loads: LOADS.map((w, li) => ({
        name: w.name,
        runs: runs[li],
        median: runs[li].map((rs) => ({
          iops: median(rs.map((f) => f.iops)),
          mbps: median(rs.map((f) => f.mbps)),
        })),
        ratios: g.ratios.map(([a, b]) => {
          const per = runs[li][a].map((f, r) => f.iops / runs[li][b][r].iops);
          return { of: g.peers[a].label, to: g.peers[b].label, median: median(per), rounds: per };
        }),
      })),
    };
    out.groups.push(group);
    printGroup(group);
  }
} finally {
  await Deno.remove(sockDir, { recursive: true }).catch(() => {});
}
if (values.json) console.log(JSON.stringify(out, null, 2));
else log(`\n(images kept for the next run: ${base}.*; delete them when done)`);

function printGroup(g: typeof out.groups[number]): void {
  log(`\n${g.name}`);
  const header = [
    "workload",
    ...g.peers,
    ...g.loads[0].ratios.map((r) => `${r.of} ÷ ${r.to}`),
  ];
  const rows = g.loads.map((l) => [
    l.name,
    ...l.median.map((f) =>
      `${Math.round(f.iops).toLocaleString("en")} IOPS, ${f.mbps.toFixed(0)} MB/s`
    ),
    ...l.ratios.map((r) => `${r.median.toFixed(2)}×`),
  ]);
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i].length)));
  const line = (cells: string[]) => `| ${cells.map((c, i) => c.padEnd(widths[i])).join(" | ")} |`;
  log(line(header));
  log(`| ${widths.map((w) => "-".repeat(w)).join(" | ")} |`);
  for (const r of rows) log(line(r));
}
