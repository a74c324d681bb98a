/** DiskGate: pause holds requests and drains those in flight; resume may switch images. */
import assert from "node:assert/strict";
import { openDisk } from "../../drivers/mod.ts";
import { DiskError } from "../../drivers/errors.ts";
import { sharedPool } from "../../io/buffer_pool.ts";
import { DiskGate } from "../../serve/gate.ts";
import { OpStats, STATS_CELLS } from "../../serve/stats.ts";
import { assertBytes, withTempDir } from "../util.ts";

const MiB = 1024 * 1024;

function filled(size: number, value: number): Uint8Array {
  const buf = sharedPool.take(size).subarray(0, size);
  buf.fill(value);
  return buf;
}

Deno.test("gate: a request issued while paused waits for resume, then lands", async () => {
  await withTempDir(async (dir) => {
    Deno.writeFileSync(`${dir}/a.img`, new Uint8Array(MiB));
    const gate = new DiskGate(await openDisk(`aio:${dir}/a.img`));
    try {
      await gate.write(0, filled(4096, 1));
      await gate.pause();
      assert.equal(gate.stats().paused, true);
      let landed = false;
      const held = gate.write(4096, filled(4096, 2)).then(() => landed = true);
      await new Promise((r) => setTimeout(r, 50));
      assert.equal(landed, false, "a write completed while paused");
      await gate.resume();
      await held;
      const back = sharedPool.take(8192);
      await gate.read(0, back);
      assertBytes(back.subarray(0, 4096), new Uint8Array(4096).fill(1));
      assertBytes(back.subarray(4096, 8192), new Uint8Array(4096).fill(2));
    } finally {
      await gate.close();
    }
  });
});

Deno.test("gate: pause waits for requests in flight", async () => {
  await withTempDir(async (dir) => {
    Deno.writeFileSync(`${dir}/a.img`, new Uint8Array(4 * MiB));
    const gate = new DiskGate(await openDisk(`aio:${dir}/a.img`));
    try {
      let done = 0;
      const writes = Array.from(
        { length: 32 },
        (_, i) => gate.write(i * 65536, filled(65536, i)).then(() => done++),
      );
      await gate.pause();
      assert.equal(done, 32, "pause returned before the writes in flight finished");
      assert.equal(gate.stats().inFlight, 0);
      await gate.resume();
      await Promise.all(writes);
    } finally {
      await gate.close();
    }
  });
});

Deno.test("gate: resume on another image switches every later request to it", async () => {
  await withTempDir(async (dir) => {
    Deno.writeFileSync(`${dir}/a.img`, new Uint8Array(MiB).fill(0xaa));
    Deno.writeFileSync(`${dir}/b.img`, new Uint8Array(MiB).fill(0xbb));
    Deno.writeFileSync(`${dir}/small.img`, new Uint8Array(4096));
    const gate = new DiskGate(await openDisk(`aio:${dir}/a.img`));
    try {
      const early = await openDisk(`aio:${dir}/b.img`);
      await assert.rejects(gate.resume(early), DiskError);
      await early.close();
      await gate.pause();
      const small = await openDisk(`aio:${dir}/small.img`);
      await assert.rejects(gate.resume(small), /clients know/);
      await small.close();
      assert.equal(gate.paused, true, "a failed resume must leave the gate paused");
      await gate.resume(await openDisk(`aio:${dir}/b.img`));
      const back = sharedPool.take(4096);
      await gate.read(0, back);
      assertBytes(back, new Uint8Array(4096).fill(0xbb));
    } finally {
      await gate.close();
    }
  });
});

Deno.test("gate: stats count requests, bytes and errors per operation", async () => {
  await withTempDir(async (dir) => {
    Deno.writeFileSync(`${dir}/a.img`, new Uint8Array(MiB));
    const gate = new DiskGate(await openDisk(`aio:${dir}/a.img`));
    try {
      for (let i = 0; i < 10; i++) await gate.write(i * 4096, filled(4096, i));
      await gate.read(0, sharedPool.take(8192));
      await assert.rejects(gate.read(MiB, sharedPool.take(4096)));
      await gate.flush();
      const s = gate.stats();
      assert.equal(s.ops.write.requests, 10);
      assert.equal(s.ops.write.bytes, 40960);
      assert.equal(s.ops.read.requests, 2);
      assert.equal(s.ops.read.errors, 1);
      assert.equal(s.ops.read.bytes, 8192);
      assert.equal(s.ops.flush.requests, 1);
      assert.ok(s.ops.write.p99Micros >= s.ops.write.p50Micros);
    } finally {
      await gate.close();
    }
  });
});

Deno.test("stats: percentiles come from the histogram within 12.5%", () => {
  const s = new OpStats();
  for (let us = 1; us <= 10000; us++) s.record(us, 1, false);
  for (const [q, exact] of [[0.5, 5000], [0.99, 9900]]) {
    const got = s.percentile(q);
    assert.ok(got <= exact && got >= exact * 0.875, `p${q * 100}: ${got} vs ${exact}`);
  }
  assert.equal(new OpStats().percentile(0.5), 0);
});

Deno.test("stats: counters in shared memory (another thread's) add up with plus()", () => {
  const shared = new Float64Array(new SharedArrayBuffer(STATS_CELLS * 8));
  const theirs = new OpStats(shared), ours = new OpStats();
  for (let us = 1; us <= 100; us++) theirs.record(us, 10, false);
  theirs.record(-1, 10, true);
  ours.record(1000, 5, false);
  const sum = ours.plus(new OpStats(shared)); // a second view of the same cells
  assert.equal(sum.requests, 102);
  assert.equal(sum.bytes, 1005);
  assert.equal(sum.errors, 1);
  assert.ok(sum.percentile(1) >= 875, String(sum.percentile(1)));
  assert.equal(ours.requests, 1, "plus() leaves its operands alone");
  assert.throws(() => new OpStats(new Float64Array(3)), /wrong number of cells/);
});

Deno.test("gate: submit (the ring's and FUSE's path) is held while paused and counted", async () => {
  await withTempDir(async (dir) => {
    Deno.writeFileSync(`${dir}/a.img`, new Uint8Array(MiB));
    const gate = new DiskGate(await openDisk(`aio:${dir}/a.img`));
    const submit = (write: boolean, offset: number, buf: Uint8Array) =>
      new Promise<void>((resolve, reject) =>
        gate.submit(write, offset, buf, (e) => e === null ? resolve() : reject(e))
      );
    try {
      for (let i = 0; i < 20; i++) await submit(true, i * 4096, filled(4096, i + 1));
      await gate.pause();
      let landed = false;
      const held = submit(true, 20 * 4096, filled(4096, 0x77)).then(() => landed = true);
      await new Promise((r) => setTimeout(r, 50));
      assert.equal(landed, false, "a submitted write completed while paused");
      assert.equal(gate.stats().inFlight, 0, "pause did not drain");
      await gate.resume();
      await held;
      const back = sharedPool.take(21 * 4096);
      await submit(false, 0, back);
      for (let i = 0; i < 21; i++) {
        assert.equal(back[i * 4096], i < 20 ? i + 1 : 0x77, `block ${i}`);
      }
      await assert.rejects(submit(false, MiB, back.subarray(0, 4096)), DiskError);
      const s = gate.stats();
      assert.equal(s.ops.write.requests, 21);
      assert.equal(s.ops.write.bytes, 21 * 4096);
      assert.equal(s.ops.read.requests, 2);
      assert.equal(s.ops.read.errors, 1);
      // One request in 8 is timed, the first included.
      assert.ok(s.ops.write.p50Micros > 0 && s.ops.write.p99Micros >= s.ops.write.p50Micros);
    } finally {
      await gate.close();
    }
  });
});

Deno.test("stats: one request in 8 is timed; counts and bytes cover them all", () => {
  const s = new OpStats();
  const starts = Array.from({ length: 80 }, () => s.start());
  assert.equal(starts.filter((t) => t >= 0).length, 10);
  assert.ok(starts[0] >= 0, "the first request is timed");
  for (const t of starts) s.end(t, 512, false);
  assert.equal(s.requests, 80);
  assert.equal(s.bytes, 80 * 512);
  assert.ok(s.percentile(0.5) >= 0);
});
