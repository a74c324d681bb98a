/**
 * The kill -9 crash tests of the image formats (qcow, vmdk, vhd), shared: a child process
 * (crash_child.ts) writes to an image, flushing every 20 writes and saying so on stdout, and is
 * killed with SIGKILL at a random moment. Afterwards the image must open in tapd with every
 * flushed write in it (and each later write either there or not, sector by sector). Many rounds
 * on the same image; each format adds its own checks after every round (QEMU's view of the
 * image, `tapd check`, the parent left alone).
 */
import assert from "node:assert/strict";
import { openDisk } from "../../drivers/mod.ts";
import { rng, withTempDir } from "../util.ts";
import {
  assertSame,
  crashData,
  crashPlan,
  MiB,
  qemuImg,
  qemuInfo,
  readAll,
  sameBytes,
  SECTOR,
} from "./qcow/helpers.ts";

export const SIZE = 8 * MiB;
const PLAN = 3000;
const FLUSH_EVERY = 20;
const CHILD = new URL("./crash_child.ts", import.meta.url).pathname;

export interface Round {
  killed: boolean;
  flushed: number;
  planned: number;
  /** Sectors of unflushed writes found with their new data, and without. */
  present: number;
  absent: number;
}

/**
 * Runs the child until it ends or is killed: `delay` ms after it starts, or — when `afterFlush`
 * is not null — `delay` ms after it reports a flush covering write `afterFlush` or later.
 * Returns its stdout lines.
 */
async function runChild(
  spec: string,
  seed: number,
  engine: string,
  delay: number,
  afterFlush: number | null,
): Promise<{ killed: boolean; lines: string[] }> {
  const child = new Deno.Command(Deno.execPath(), {
    args: [
      "run",
      "-A",
      "--quiet",
      "--no-lock",
      CHILD,
      spec,
      String(seed),
      engine,
      String(PLAN),
      String(FLUSH_EVERY),
    ],
    stdout: "piped",
    stderr: "piped",
    env: { RUST_BACKTRACE: "0", NO_COLOR: "1" },
  }).spawn();
  const stderr = new Response(child.stderr).text();
  let killed = false, timer: ReturnType<typeof setTimeout> | undefined;
  const killLater = () => {
    timer ??= setTimeout(() => {
      try {
        child.kill("SIGKILL");
        killed = true;
      } catch {
        // already exited
      }
    }, delay);
  };
  if (afterFlush === null) killLater();
  const lines: string[] = [];
  let pending = "";
  for await (const text of child.stdout.pipeThrough(new TextDecoderStream())) {
    pending += text;
    const parts = pending.split("\n");
    pending = parts.pop()!;
    for (const line of parts) {
      lines.push(line);
      const m = /^flushed (\d+)$/.exec(line);
      if (afterFlush !== null && m && Number(m[1]) >= afterFlush) killLater();
    }
  }
  lines.push(pending);
  const status = await child.status;
  clearTimeout(timer);
  if (!(status.success || (killed && status.signal === "SIGKILL"))) {
    throw new Error(
      `crash child failed (code ${status.code}, signal ${status.signal}): ${await stderr}`,
    );
  }
  await stderr;
  return { killed: killed && !status.success, lines };
}

/**
 * Checks the image after a round against `before` (its contents when the round started) and
 * returns what it now holds.
 */
async function checkRound(
  spec: string,
  before: Uint8Array,
  seed: number,
  flushed: number,
  round: Round,
): Promise<Uint8Array> {
  const plan = crashPlan(seed, SIZE, PLAN);
  round.planned = plan.length;
  const disk = await openDisk(spec, { readOnly: true });
  let got: Uint8Array;
  try {
    assert.equal(disk.size, SIZE);
    got = await readAll(disk);
  } finally {
    await disk.close();
  }
  // Flushed writes must be there; a later one may be, sector by sector; nothing else changes.
  const expected = before.slice();
  for (let i = 0; i < plan.length; i++) {
    const { offset, length } = plan[i];
    const data = crashData(seed, i, length);
    if (i <= flushed) {
      expected.set(data, offset);
      continue;
    }
    for (let s = 0; s < length; s += SECTOR) {
      const now = got.subarray(offset + s, offset + s + SECTOR);
      if (sameBytes(now, data.subarray(s, s + SECTOR))) {
        expected.set(now, offset + s);
        round.present++;
      } else round.absent++;
    }
  }
  assertSame(got, expected, `image after round with seed ${seed} (flushed up to write ${flushed})`);
  return got;
}

/** An image made for a crash test, and its format's checks. */
export interface CrashImage {
  /** The image file (of SIZE bytes) the child writes. */
  path: string;
  /** What the disk reads as before the first round (its parent's contents, or null: zeros). */
  initial: Uint8Array | null;
  /** The parent's file, which no round may change (null: none). */
  parentFile: string | null;
  /** The format's own checks after a round; `ref` is what tapd read from the image. */
  afterRound(round: number, ref: Uint8Array): Promise<void>;
}

export interface CrashTest<C extends { name: string }> {
  /** The driver (tapd's disk spec prefix, and QEMU's format name). */
  driver: string;
  /** What `qemu-img info` calls the format, when it is not the driver's name. */
  qemuFormat?: string;
  rounds: number;
  configs: C[];
  /** Makes the image in `dir` for configuration number `ci`. */
  create(dir: string, c: C, ci: number): Promise<CrashImage>;
}

/** Registers one crash test (`rounds` rounds of SIGKILL during writes) per configuration. */
export function crashTests<C extends { name: string }>(t: CrashTest<C>): void {
  const fmt = t.qemuFormat ?? t.driver;
  for (const [ci, c] of t.configs.entries()) {
    Deno.test(`${t.driver} crash: ${c.name}: SIGKILL during writes, ${t.rounds} rounds`, () =>
      withTempDir(async (dir) => {
        const image = await t.create(dir, c, ci);
        const spec = `${t.driver}:${image.path}`;
        const parent = image.parentFile === null ? null : Deno.readFileSync(image.parentFile);
        let ref: Uint8Array = image.initial?.slice() ?? new Uint8Array(SIZE);
        const r = rng(0xc4 + ci);
        const rounds: Round[] = [];
        for (let round = 0; round < t.rounds; round++) {
          const seed = 1000 * (ci + 1) + round;
          const engine = round % 3 === 2 ? "uring" : "aio";
          // Odd rounds: killed 100-600 ms after the start (maybe before it opens, maybe after
          // it is done); even rounds: a few ms after a random flush, in the middle of writing.
          const { killed, lines } = round % 2 === 1
            ? await runChild(spec, seed, engine, 100 + r.below(500), null)
            : await runChild(spec, seed, engine, r.below(15), r.below(PLAN * 0.8));
          let flushed = -1;
          for (const line of lines) {
            const m = /^flushed (\d+)$/.exec(line);
            if (m) flushed = Math.max(flushed, Number(m[1]));
          }
          const stats: Round = { killed, flushed, planned: 0, present: 0, absent: 0 };
          rounds.push(stats);
          ref = await checkRound(spec, ref, seed, flushed, stats);
          await image.afterRound(round, ref);
          if (parent !== null) {
            assertSame(Deno.readFileSync(image.parentFile!), parent, "the parent file");
          }
        }
        // Plain qemu-img info, now that no child writes any more.
        const info = await qemuInfo(image.path, undefined, fmt);
        assert.equal(info["format"], fmt);
        assert.equal(info["virtual-size"], SIZE);
        // The rounds must have exercised something: kills in the middle of the writing.
        const midway = rounds.filter((x) =>
          x.killed && x.flushed >= 0 && x.flushed < x.planned - 1
        );
        assert.ok(
          midway.length >= t.rounds / 2 - 1,
          `${midway.length} mid-write kills: ${JSON.stringify(rounds)}`,
        );
        // Some kills caught writes in flight (unflushed writes found, wholly or partly).
        assert.ok(rounds.some((x) => x.present > 0), JSON.stringify(rounds));
      }));
  }
}

/**
 * QEMU reads the image after a round: `qemu-img info` works (size; the format and the backing
 * file name when `opts` has them) and, unless `convert` is false, the whole disk converts to
 * `ref` (through `DIR/out.raw`). (QEMU reads with O_DIRECT: page-cache pages of the image would
 * collide with the next child's direct writes, and the kernel then fails its fdatasync with EIO.)
 */
export async function assertQemuReads(
  driver: string,
  dir: string,
  path: string,
  ref: Uint8Array,
  round: number,
  opts: { format?: string; backing?: string | undefined; convert?: boolean },
): Promise<void> {
  const info = JSON.parse(
    await qemuImg([
      "info",
      "--output=json",
      "--image-opts",
      `driver=${driver},file.driver=file,file.filename=${path},cache.direct=on`,
    ]),
  );
  if (opts.format !== undefined) assert.equal(info["format"], opts.format);
  assert.equal(info["virtual-size"], SIZE);
  if ("backing" in opts) assert.equal(info["backing-filename"], opts.backing);
  if (opts.convert === false) return;
  await qemuImg(["convert", "-T", "none", "-f", driver, "-O", "raw", path, `${dir}/out.raw`]);
  assertSame(Deno.readFileSync(`${dir}/out.raw`), ref, `qemu-img convert, round ${round}`);
}
