/**
 * The blkif ring path against fio on the same raw file, in one run. `tapd tapdisk` serves the
 * file on a ring (at its defaults, and with `--poll-us 1000`); the frontends are
 *   - the C frontend of the ring tests (tests/ring/c/frontend.c, built with gcc against Xen's
 *     ring.h and blkif.h, as a guest's blkfront is), in its `load` mode: sleeping on the notify
 *     eventfd, or spinning on the ring for 1 ms before it sleeps;
 *   - `tapd bench --ring` (the TypeScript frontend), at its defaults, and polling for responses
 *     for 1 ms against the polling tapdisk.
 * fio (libaio, O_DIRECT) is the baseline. Every run is paired with a fio run just before or after
 * it; each ratio is the median over rounds of ring ÷ fio in the pair. `--base DIR` adds the C
 * frontend's two rows against the tapdisk of another checkout (DIR, e.g. a `git worktree` of the
 * previous commit) in the same rounds: an A/B comparison that this machine's drift does not blur.
 *
 *   deno task bench:ring [--seconds 3] [--rounds 5] [--base DIR]
 */
import { parseArgs } from "node:util";
import { buildFrontend } from "../tests/ring/frontend_c.ts";
import {
  ensureDataFile,
  fioReadIops,
  median,
  READ_WORKLOADS,
  ROOT,
  run,
  tapdIops,
  type Workload,
} from "./common.ts";

const { values } = parseArgs({
  options: {
    seconds: { type: "string", default: "3" },
    rounds: { type: "string", default: "5" },
    base: { type: "string" },
  },
});
const seconds = Number(values.seconds), rounds = Number(values.rounds);
const file = await ensureDataFile();
const frontend = await buildFrontend();

/** A tapdisk (of the checkout at `root`) serving the file on a ring at `sock`. */
async function startTapdisk(
  sock: string,
  args: string[],
  root = ROOT,
): Promise<Deno.ChildProcess> {
  try {
    Deno.removeSync(sock);
  } catch { /* not there */ }
  const child = new Deno.Command(`${root}tapd`, {
    args: ["tapdisk", `tap:aio:${file}`, "--ring", `unix:${sock}`, ...args],
    stderr: "null",
  }).spawn();
  for (let i = 0; i < 200; i++) {
    try {
      if (Deno.statSync(sock).isSocket) return child;
    } catch { /* starting */ }
    await new Promise((r) => setTimeout(r, 50));
  }
  child.kill("SIGKILL");
  throw new Error(`tapd tapdisk did not listen on ${sock}`);
}

/** The C frontend's IOPS (1 MiB units for the sequential load). */
async function cIops(sock: string, w: Workload, spinMicros: number): Promise<number> {
  const load = w.rw === "randread" ? "rand4k" : "seq1m";
  const out = await run(frontend, [
    sock,
    "load",
    load,
    String(w.qd),
    String(seconds),
    String(spinMicros),
  ]);
  const m = /^iops (\d+)$/m.exec(out);
  if (m === null) throw new Error(`the C frontend printed no IOPS: ${out}`);
  return Number(m[1]);
}

interface Config {
  label: string;
  iops: (w: Workload) => Promise<number>;
}

const servers: Deno.ChildProcess[] = [];

/**
 * Starts the two tapdisks of the checkout at `root` (defaults, `--poll-us 1000`) on sockets named
 * after `name`; returns their sockets and the C frontend's rows against them.
 */
async function tapdisks(root: string, name: string, what: string) {
  const plain = `/tmp/tapd-ring-bench${name}.sock`,
    polled = `/tmp/tapd-ring-bench${name}-poll.sock`;
  servers.push(
    await startTapdisk(plain, [], root),
    await startTapdisk(polled, ["--poll-us=1000"], root),
  );
  const rows: Config[] = [
    { label: `C frontend, ${what} defaults`, iops: (w) => cIops(plain, w, 0) },
    {
      label: `C frontend spinning 1 ms, ${what} --poll-us 1000`,
      iops: (w) => cIops(polled, w, 1000),
    },
  ];
  return { plain, polled, rows };
}

const { plain, polled, rows } = await tapdisks(ROOT, "", "tapdisk");
const configs: Config[] = [
  ...rows,
  {
    label: "tapd bench --ring, defaults",
    iops: (w) => tapdIops(`--ring=unix:${plain}`, w, seconds),
  },
  {
    label: "tapd bench --ring --poll-us 1000, tapdisk --poll-us 1000",
    iops: (w) => tapdIops(`--ring=unix:${polled}`, w, seconds, ["--poll-us=1000"]),
  },
];
if (values.base !== undefined) {
  const base = values.base.endsWith("/") ? values.base : `${values.base}/`;
  configs.push(...(await tapdisks(base, "-base", "base tapdisk")).rows);
}
try {
  for (const w of READ_WORKLOADS) {
    const f: number[] = [];
    const t: number[][] = configs.map(() => []), ratio: number[][] = configs.map(() => []);
    for (let i = 0; i < rounds; i++) {
      for (const [k, c] of configs.entries()) {
        // Each run is paired with a fio run next to it (before it in even rounds, after it in
        // odd ones): this machine drifts by ±20% within a minute.
        let fio = 0, iops = 0;
        if (i % 2 === 0) fio = await fioReadIops(file, w, seconds);
        iops = await c.iops(w);
        if (i % 2 === 1) fio = await fioReadIops(file, w, seconds);
        f.push(fio), t[k].push(iops), ratio[k].push(iops / fio);
      }
    }
    console.log(`${w.name}: fio ${median(f).toFixed(0)} IOPS`);
    for (const [k, c] of configs.entries()) {
      console.log(
        `  ${c.label.padEnd(56)} ${median(t[k]).toFixed(0).padStart(7)} IOPS  ${
          median(ratio[k]).toFixed(2)
        }×`,
      );
    }
  }
} finally {
  for (const s of servers) s.kill("SIGTERM");
  await Promise.all(servers.map((s) => s.status));
}
