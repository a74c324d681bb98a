/**
 * Crash safety: a child process writes to a monolithicSparse vmdk image (flushing every 20 writes and saying so
 * on stdout) and is killed with SIGKILL at a random moment. Afterwards the image must open in
 * tapd with every flushed write in it (and each later write either there or not, sector by
 * sector), and QEMU must read the whole of it the same way. Many rounds on the same image.
 */
import assert from "node:assert/strict";
import { openDisk } from "../../../drivers/mod.ts";
import { vmdkFormat } from "../../../drivers/vmdk/format.ts";
import { rng, withTempDir } from "../../util.ts";
import {
  assertSame,
  crashData,
  crashPlan,
  MiB,
  qemuImg,
  randomContent,
  readAll,
  sameBytes,
  SECTOR,
} from "./helpers.ts";
import { vmdkInfo } from "./helpers.ts";

const SIZE = 8 * MiB;
const PLAN = 3000;
const ROUNDS = 8;
const FLUSH_EVERY = 20;

const root = new URL("../../../", import.meta.url).href;

/** The child: opens the image, writes the round's plan (8 in flight), flushes every 20. */
const CHILD = `
import { openDisk } from "${root}drivers/mod.ts";
import { crashData, crashPlan } from "${root}tests/drivers/qcow/helpers.ts";
const [path, seedText, engine] = Deno.args;
const seed = Number(seedText);
const disk = await openDisk("vmdk:" + path, { engine });
console.log("open");
const plan = crashPlan(seed, disk.size, ${PLAN});
const inflight = new Set();
for (let i = 0; i < plan.length; i++) {
  const p = disk.write(plan[i].offset, crashData(seed, i, plan[i].length)).then(() => {
    inflight.delete(p);
  });
  inflight.add(p);
  if (inflight.size >= 8) await Promise.race(inflight);
  if ((i + 1) % ${FLUSH_EVERY} === 0 || i === plan.length - 1) {
    await Promise.all(inflight);
    await disk.flush();
    console.log("flushed " + i);
  }
}
await disk.close();
console.log("closed");
`;

interface Round {
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
  script: string,
  path: string,
  seed: number,
  engine: string,
  delay: number,
  afterFlush: number | null,
): Promise<{ killed: boolean; lines: string[] }> {
  const child = new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", "--quiet", script, path, String(seed), engine],
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
  path: string,
  before: Uint8Array,
  seed: number,
  flushed: number,
  round: Round,
): Promise<Uint8Array> {
  const plan = crashPlan(seed, SIZE, PLAN);
  round.planned = plan.length;
  const disk = await openDisk(`vmdk:${path}`, { readOnly: true });
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

interface Config {
  name: string;
  grain: number;
  backed: boolean;
}

const CONFIGS: Config[] = [
  { name: "4 KiB grains, delta child over a vmdk parent", grain: 4096, backed: true },
  { name: "64 KiB grains, standalone", grain: 65536, backed: false },
];

for (const [ci, c] of CONFIGS.entries()) {
  Deno.test(`vmdk crash: ${c.name}: SIGKILL during writes, ${ROUNDS} rounds`, async () => {
    await withTempDir(async (dir) => {
      const script = `${dir}/child.ts`;
      Deno.writeTextFileSync(script, CHILD);
      const path = `${dir}/img.vmdk`;
      let parent: Uint8Array | null = null;
      if (c.backed) {
        parent = randomContent(rng(0xc0 + ci), SIZE);
        await vmdkFormat.create(`${dir}/parent.vmdk`, { size: SIZE });
        const p = await openDisk(`vmdk:${dir}/parent.vmdk`);
        try {
          await p.write(0, parent);
        } finally {
          await p.close();
        }
      }
      await vmdkFormat.create(path, {
        size: SIZE,
        clusterSize: c.grain,
        backing: c.backed ? "parent.vmdk" : undefined,
      });
      const parentBytes = c.backed ? Deno.readFileSync(`${dir}/parent.vmdk`) : null;
      let ref: Uint8Array = parent?.slice() ?? new Uint8Array(SIZE);
      const r = rng(0xc4 + ci);
      const rounds: Round[] = [];
      for (let round = 0; round < ROUNDS; round++) {
        const seed = 1000 * (ci + 1) + round;
        const engine = round % 3 === 2 ? "uring" : "aio";
        // Odd rounds: killed 100-600 ms after the start (maybe before it opens, maybe after
        // it is done); even rounds: a few ms after a random flush, in the middle of writing.
        const { killed, lines } = round % 2 === 1
          ? await runChild(script, path, seed, engine, 100 + r.below(500), null)
          : await runChild(script, path, seed, engine, r.below(15), r.below(PLAN * 0.8));
        let flushed = -1;
        for (const line of lines) {
          const m = /^flushed (\d+)$/.exec(line);
          if (m) flushed = Math.max(flushed, Number(m[1]));
        }
        const stats: Round = { killed, flushed, planned: 0, present: 0, absent: 0 };
        rounds.push(stats);
        ref = await checkRound(path, ref, seed, flushed, stats);

        // QEMU reads the same image (with O_DIRECT: page-cache pages of the image would collide
        // with the next child's direct writes); tapd check finds no errors.
        const info = JSON.parse(
          await qemuImg([
            "info",
            "--output=json",
            "--image-opts",
            `driver=vmdk,file.driver=file,file.filename=${path},cache.direct=on`,
          ]),
        );
        assert.equal(info["format"], "vmdk");
        assert.equal(info["virtual-size"], SIZE);
        assert.equal(info["backing-filename"], c.backed ? "parent.vmdk" : undefined);
        await qemuImg(["convert", "-T", "none", "-f", "vmdk", "-O", "raw", path, `${dir}/out.raw`]);
        assertSame(Deno.readFileSync(`${dir}/out.raw`), ref, `qemu-img convert, round ${round}`);
        const report = await vmdkFormat.check(path);
        assert.deepEqual(report.errors, [], `tapd check after round ${round}`);
        if (parentBytes !== null) {
          assertSame(Deno.readFileSync(`${dir}/parent.vmdk`), parentBytes, "the parent file");
        }
      }
      const info = await vmdkInfo(path);
      assert.equal(info["format"], "vmdk");
      assert.equal(info["virtual-size"], SIZE);
      // The rounds must have exercised something: kills in the middle of the writing.
      const midway = rounds.filter((x) => x.killed && x.flushed >= 0 && x.flushed < x.planned - 1);
      assert.ok(
        midway.length >= ROUNDS / 2 - 1,
        `${midway.length} mid-write kills: ${JSON.stringify(rounds)}`,
      );
      // Some kills caught writes in flight (unflushed writes found, wholly or partly).
      assert.ok(rounds.some((x) => x.present > 0), JSON.stringify(rounds));
    });
  });
}
