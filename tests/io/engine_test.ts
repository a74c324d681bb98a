import assert from "node:assert/strict";
import { createEngine } from "../../io/mod.ts";
import { ENGINE_KINDS, type EngineKind, type IoEngine } from "../../io/engine.ts";
import { sharedPool } from "../../io/buffer_pool.ts";
import { FileHandle } from "../../ffi/file.ts";
import { SysError } from "../../ffi/errno.ts";
import {
  FALLOC_FL_KEEP_SIZE,
  FALLOC_FL_PUNCH_HOLE,
  FALLOC_FL_ZERO_RANGE,
  O_CREAT,
  O_DIRECT,
  O_RDONLY,
  O_RDWR,
} from "../../ffi/constants.ts";
import { assertBytes, rng, withTempDir } from "../util.ts";

const KiB = 1024, MiB = 1024 * KiB;
const BLOCK = 4096;

interface Setup {
  engine: IoEngine;
  file: FileHandle;
  path: string;
  dir: string;
  /** Whether the file is open with O_DIRECT (aio and uring). */
  direct: boolean;
}

/** The open flags a kind is tested with: O_DIRECT for the kernel queues, buffered for sync. */
function flagsFor(kind: EngineKind): number {
  return O_RDWR | O_CREAT | (kind === "sync" ? 0 : O_DIRECT);
}

/**
 * Runs `fn` with an engine of `kind` and a file of `size` bytes in a fresh directory under
 * /var/tmp; closes the engine (waiting for its requests), the file and the directory afterwards,
 * and checks every bounce buffer went back to the shared pool.
 */
async function withEngine(
  kind: EngineKind,
  options: { size?: number; depth?: number; batch?: number; coalesceAbove?: number },
  fn: (s: Setup) => Promise<void>,
): Promise<void> {
  await withTempDir(async (dir) => {
    const path = `${dir}/disk`;
    const direct = kind !== "sync";
    const file = FileHandle.open(path, flagsFor(kind));
    const outstanding = sharedPool.outstanding;
    let engine: IoEngine | undefined;
    try {
      file.truncate(options.size ?? 16 * MiB);
      engine = createEngine(kind, {
        depth: options.depth,
        batch: options.batch,
        coalesceAbove: options.coalesceAbove,
      });
      assert.equal(engine.kind, kind);
      await fn({ engine, file, path, dir, direct });
      await engine.close();
      assert.equal(sharedPool.outstanding, outstanding, "pool buffers not given back");
    } finally {
      await engine?.close();
      file.close();
    }
  });
}

/** A pool buffer filled with `byte` (so a read that does nothing is noticed). */
function poolBuffer(length: number, byte = 0xa5): Uint8Array<ArrayBuffer> {
  return sharedPool.take(length).fill(byte);
}

/** Splits `length` (a multiple of 4 KiB) into up to `parts` block-multiple lengths. */
function split(length: number, parts: number, r: ReturnType<typeof rng>): number[] {
  const blocks = length / BLOCK;
  const cuts = new Set<number>();
  for (let i = 1; i < parts; i++) cuts.add(1 + r.below(Math.max(1, blocks - 1)));
  const points = [0, ...[...cuts].filter((c) => c < blocks).sort((a, b) => a - b), blocks];
  const out: number[] = [];
  for (let i = 1; i < points.length; i++) {
    if (points[i] > points[i - 1]) out.push((points[i] - points[i - 1]) * BLOCK);
  }
  return out;
}

function concat(bufs: readonly Uint8Array[]): Uint8Array {
  const out = new Uint8Array(bufs.reduce((n, b) => n + b.length, 0));
  let off = 0;
  for (const b of bufs) {
    out.set(b, off);
    off += b.length;
  }
  return out;
}

/**
 * A rejection check: a SysError with `code`, from one of `calls` (the kernel-queue engines name
 * transfers "read"/"write", the sync engine "pread"/"pwrite").
 */
function isEngineError(code: string, ...calls: string[]) {
  return (e: unknown) => {
    assert.ok(e instanceof SysError, `expected a SysError, got ${e}`);
    assert.equal(e.code, code);
    assert.ok(calls.includes(e.call), `call "${e.call}" is not one of ${calls.join(", ")}`);
    return true;
  };
}

/** Whether `p` has already settled (a settled promise wins a race against a fresh one). */
async function isSettled(p: Promise<unknown>): Promise<boolean> {
  const pending = {};
  const winner = await Promise.race([p, pending]).catch(() => null);
  return winner !== pending;
}

for (const kind of ENGINE_KINDS) {
  Deno.test(`${kind}: 3000 random reads and writes in batches of 64 match a reference`, async () => {
    const size = 64 * MiB;
    await withEngine(kind, { size }, async ({ engine, file, path }) => {
      const r = rng(0x7a9d + kind.length);
      const ref = new Uint8Array(size);
      const blocks = size / BLOCK;
      const owner = new Int32Array(blocks); // the batch that uses each block
      const TOTAL = 3000, BATCH = 64, MAX_BLOCKS = 256 * KiB / BLOCK;
      let issued = 0, batch = 0, reads = 0, writes = 0;
      while (issued < TOTAL) {
        batch++;
        const ops: Promise<void>[] = [];
        while (ops.length < BATCH && issued < TOTAL) {
          const n = 1 + r.below(MAX_BLOCKS);
          const start = r.below(blocks - n + 1);
          let free = true;
          for (let b = start; b < start + n && free; b++) free = owner[b] !== batch;
          if (!free) continue;
          owner.fill(batch, start, start + n);
          issued++;
          const offset = start * BLOCK, length = n * BLOCK;
          // Buffers: one pool buffer, a list of pool buffers, or plain JS memory (bounced).
          const shape = r.below(8);
          let bufs: Uint8Array[];
          if (shape < 4) bufs = [poolBuffer(length)];
          else if (shape < 7) bufs = split(length, 2 + r.below(4), r).map((l) => poolBuffer(l));
          else bufs = [new Uint8Array(length).fill(0xa5)];
          const pooled = shape < 7;
          const arg = bufs.length === 1 && r.below(2) === 0 ? bufs[0] : bufs;
          const give = () => {
            if (pooled) { for (const b of bufs) sharedPool.give(b as Uint8Array<ArrayBuffer>); }
          };
          if (r.below(2) === 0) {
            writes++;
            for (const b of bufs) r.fill(b);
            ref.set(concat(bufs), offset);
            ops.push(
              engine.write(file, offset, arg).then((done) => {
                assert.equal(done, length);
                give();
              }),
            );
          } else {
            reads++;
            ops.push(
              engine.read(file, offset, arg).then((done) => {
                assert.equal(done, length);
                // No write in the same batch touches this range, so the reference is current.
                assertBytes(
                  concat(bufs),
                  ref.subarray(offset, offset + length),
                  `read at ${offset}`,
                );
                give();
              }),
            );
          }
        }
        await Promise.all(ops);
      }
      assert.ok(reads > 1000 && writes > 1000, `${reads} reads, ${writes} writes`);

      // The whole file, read back through the engine and, independently, through the page cache.
      const chunk = poolBuffer(4 * MiB);
      try {
        for (let off = 0; off < size; off += chunk.length) {
          assert.equal(await engine.read(file, off, chunk), chunk.length);
          assertBytes(chunk, ref.subarray(off, off + chunk.length), `file at ${off}`);
        }
      } finally {
        sharedPool.give(chunk);
      }
      assertBytes(Deno.readFileSync(path), ref, "file contents");
    });
  });

  Deno.test(`${kind}: scatter-gather with pool buffers and plain buffers`, async () => {
    await withEngine(kind, { size: 4 * MiB }, async ({ engine, file, path }) => {
      const r = rng(42);
      const taken: Uint8Array<ArrayBuffer>[] = [];
      const take = (n: number) => {
        const b = poolBuffer(n);
        taken.push(b);
        return b;
      };
      try {
        // Gather from four pool buffers, scatter into three of other sizes.
        const out = [take(4096), take(8192), take(4096), take(16384)].map((b) => r.fill(b));
        assert.equal(await engine.write(file, 64 * KiB, out), 32 * KiB);
        const back = [take(12288), take(4096), take(16384)];
        assert.equal(await engine.read(file, 64 * KiB, back), 32 * KiB);
        assertBytes(concat(back), concat(out), "pool scatter-gather");

        // Plain JS buffers of odd lengths (bounced through pool memory as one block).
        const plain = [new Uint8Array(1000), new Uint8Array(3096), new Uint8Array(8192)]
          .map((b) => r.fill(b));
        assert.equal(await engine.write(file, 1 * MiB, plain), 12 * KiB);
        const plainBack = [new Uint8Array(5000), new Uint8Array(7288)];
        assert.equal(await engine.read(file, 1 * MiB, plainBack), 12 * KiB);
        assertBytes(concat(plainBack), concat(plain), "plain scatter-gather");

        // One plain buffer, read back into a pool buffer and the other way round.
        const single = r.fill(new Uint8Array(20 * KiB));
        assert.equal(await engine.write(file, 2 * MiB, single), single.length);
        const singleBack = take(20 * KiB);
        assert.equal(await engine.read(file, 2 * MiB, singleBack), single.length);
        assertBytes(singleBack, single, "plain write, pool read");
        const plainRead = new Uint8Array(20 * KiB);
        assert.equal(await engine.read(file, 2 * MiB, plainRead), single.length);
        assertBytes(plainRead, single, "pool-backed file, plain read");

        // A list mixing pool and plain memory.
        const mixed = [r.fill(take(4096)), r.fill(new Uint8Array(4096)), r.fill(take(8192))];
        assert.equal(await engine.write(file, 3 * MiB, mixed), 16 * KiB);
        const mixedBack = [new Uint8Array(8192), take(8192)];
        assert.equal(await engine.read(file, 3 * MiB, mixedBack), 16 * KiB);
        assertBytes(concat(mixedBack), concat(mixed), "mixed scatter-gather");

        // More segments than fit in one iovec table (64): bounced whole.
        const many = Array.from({ length: 80 }, () => r.fill(take(4096)));
        assert.equal(await engine.write(file, 3.5 * MiB, many), 80 * 4096);
        const manyBack = Array.from({ length: 80 }, () => take(4096));
        assert.equal(await engine.read(file, 3.5 * MiB, manyBack), 80 * 4096);
        assertBytes(concat(manyBack), concat(many), "80-segment list");

        // A one-element list.
        const one = [r.fill(take(8192))];
        assert.equal(await engine.write(file, 512 * KiB, one), 8192);
        const oneBack = [take(8192)];
        assert.equal(await engine.read(file, 512 * KiB, oneBack), 8192);
        assertBytes(oneBack[0], one[0], "one-element list");

        // The page cache agrees with what went through the engine.
        const disk = Deno.readFileSync(path);
        assertBytes(disk.subarray(64 * KiB, 96 * KiB), concat(out), "disk (pool)");
        assertBytes(disk.subarray(1 * MiB, 1 * MiB + 12 * KiB), concat(plain), "disk (plain)");
        assertBytes(disk.subarray(3.5 * MiB, 3.5 * MiB + 80 * 4096), concat(many), "disk (many)");
      } finally {
        for (const b of taken) sharedPool.give(b);
      }
    });
  });

  Deno.test(`${kind}: reads at the end of the file are short`, async () => {
    const size = 1 * MiB;
    await withEngine(kind, { size }, async ({ engine, file }) => {
      const r = rng(7);
      const tail = r.fill(poolBuffer(4096));
      const a = poolBuffer(8192), b = poolBuffer(4096), c = poolBuffer(4096);
      try {
        assert.equal(await engine.write(file, size - 4096, tail), 4096);
        assert.equal(await engine.read(file, size - 4096, a), 4096);
        assertBytes(a.subarray(0, 4096), tail, "short read");
        assert.equal(await engine.read(file, size, a), 0);
        assert.equal(await engine.read(file, size - 4096, [b, c]), 4096);
        assertBytes(b, tail, "short vector read");
        const plain = [new Uint8Array(4096), new Uint8Array(4096).fill(3)];
        assert.equal(await engine.read(file, size - 4096, plain), 4096);
        assertBytes(plain[0], tail, "short bounced read");
        assert.ok(plain[1].every((x) => x === 3), "bytes past the end were touched");
      } finally {
        for (const buf of [tail, a, b, c]) sharedPool.give(buf);
      }
    });
  });

  Deno.test(`${kind}: 200 concurrent requests on a depth-8 engine`, async () => {
    await withEngine(kind, { size: 4 * MiB, depth: 8 }, async ({ engine, file }) => {
      const N = 200;
      const expected = new Uint8Array(N * BLOCK);
      for (let i = 0; i < N; i++) expected.fill(i & 0xff, i * BLOCK, (i + 1) * BLOCK);
      const bufs = Array.from({ length: N }, (_, i) => poolBuffer(BLOCK, i & 0xff));
      try {
        // Writes interleaved with flushes; block i goes to block (i * 7) % N, scrambling order.
        const at = (i: number) => ((i * 7) % N) * BLOCK;
        const writes: Promise<unknown>[] = [];
        for (let i = 0; i < N; i++) {
          writes.push(engine.write(file, at(i), bufs[i]));
          if (i % 50 === 0) writes.push(engine.fsync(file, i % 100 === 0));
        }
        const results = await Promise.all(writes);
        for (const n of results) assert.ok(n === BLOCK || n === undefined);

        for (const b of bufs) b.fill(0xa5);
        const reads = bufs.map((b, i) => engine.read(file, at(i), b));
        assert.deepEqual(await Promise.all(reads), new Array(N).fill(BLOCK));
        assertBytes(concat(bufs), expected, "depth-8 reads");
      } finally {
        for (const b of bufs) sharedPool.give(b);
      }
    });
  });

  Deno.test(`${kind}: fsync, fdatasync and fallocate`, async () => {
    await withEngine(kind, { size: 1 * MiB }, async ({ engine, file, path }) => {
      const data = poolBuffer(64 * KiB, 0x5a);
      const back = poolBuffer(64 * KiB);
      try {
        assert.equal(await engine.write(file, 0, data), data.length);
        assert.equal(await engine.fsync(file, false), undefined);
        assert.equal(await engine.fsync(file, true), undefined);

        // Punch a hole in the middle: it reads back as zeros, the size stays.
        await engine.fallocate(
          file,
          FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
          16 * KiB,
          16 * KiB,
        );
        assert.equal(file.stat().size, 1 * MiB);
        assert.equal(await engine.read(file, 0, back), back.length);
        assert.ok(back.subarray(0, 16 * KiB).every((b) => b === 0x5a));
        assert.ok(back.subarray(16 * KiB, 32 * KiB).every((b) => b === 0), "hole not zero");
        assert.ok(back.subarray(32 * KiB).every((b) => b === 0x5a));

        // Zero a range.
        await engine.fallocate(file, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, 48 * KiB, 8 * KiB);
        back.fill(1);
        assert.equal(await engine.read(file, 0, back), back.length);
        assert.ok(back.subarray(32 * KiB, 48 * KiB).every((b) => b === 0x5a));
        assert.ok(back.subarray(48 * KiB, 56 * KiB).every((b) => b === 0), "zero range not zero");
        assert.ok(back.subarray(56 * KiB).every((b) => b === 0x5a));

        // Preallocate past the end: the file grows.
        await engine.fallocate(file, 0, 1 * MiB, 1 * MiB);
        assert.equal(file.stat().size, 2 * MiB);
        assert.equal(Deno.statSync(path).size, 2 * MiB);

        // Many flushes at once.
        const flushes = Array.from({ length: 20 }, (_, i) => engine.fsync(file, i % 2 === 0));
        await Promise.all(flushes);

        // The kernel wants KEEP_SIZE with PUNCH_HOLE.
        await assert.rejects(
          engine.fallocate(file, FALLOC_FL_PUNCH_HOLE, 0, 4096),
          isEngineError("EOPNOTSUPP", "fallocate"),
        );
      } finally {
        sharedPool.give(data);
        sharedPool.give(back);
      }
    });
  });

  Deno.test(`${kind}: failed requests reject with a SysError`, async () => {
    await withEngine(kind, { size: 1 * MiB }, async ({ engine, file, path, direct }) => {
      const buf = poolBuffer(8192, 0x11);
      try {
        // Allocate the blocks first: the kernel fills a hole without checking O_DIRECT alignment.
        assert.equal(await engine.write(file, 0, buf), 8192);
        assert.equal(await engine.fsync(file, true), undefined);
        if (direct) {
          // O_DIRECT wants aligned offsets, lengths and addresses.
          await assert.rejects(engine.read(file, 1, buf), isEngineError("EINVAL", "read"));
          await assert.rejects(engine.write(file, 512 + 1, buf), isEngineError("EINVAL", "write"));
          // Memory the kernel cannot take (misaligned address or length) is bounced instead.
          const odd = buf.subarray(1, 4097);
          assert.equal(await engine.read(file, 0, odd), 4096);
          assert.ok(odd.every((b) => b === 0x11));
          assert.equal(
            await engine.read(file, 0, [buf.subarray(0, 4096), buf.subarray(4096, 4608)]),
            4608,
          );
          // The message names the errno, the call and the path.
          await assert.rejects(
            engine.read(file, 1, buf),
            (e: unknown) =>
              e instanceof SysError && e.message === `EINVAL read ${path}: Invalid argument`,
          );
        }

        // A write on a read-only descriptor: EBADF, between successful requests of the same batch.
        using readOnly = FileHandle.open(path, O_RDONLY | (direct ? O_DIRECT : 0));
        const [good1, bad, good2, badRead] = await Promise.allSettled([
          engine.write(file, 0, buf),
          engine.write(readOnly, 8192, buf),
          engine.write(file, 16384, buf),
          engine.read(file, 3, buf),
        ]);
        assert.deepEqual(good1, { status: "fulfilled", value: 8192 });
        assert.deepEqual(good2, { status: "fulfilled", value: 8192 });
        assert.equal(bad.status, "rejected");
        isEngineError("EBADF", "write", "pwrite")(bad.reason);
        if (direct) {
          assert.equal(badRead.status, "rejected");
          isEngineError("EINVAL", "read")(badRead.reason);
        } else {
          assert.deepEqual(badRead, { status: "fulfilled", value: 8192 });
        }
        // The descriptor still reads.
        assert.equal(await engine.read(readOnly, 0, buf), 8192);

        // A closed FileHandle rejects every operation, and the engine goes on working.
        const closed = FileHandle.open(path, flagsFor(kind));
        closed.close();
        await assert.rejects(engine.read(closed, 0, buf), /closed/);
        await assert.rejects(engine.write(closed, 0, buf), /closed/);
        await assert.rejects(engine.read(closed, 0, [buf]), /closed/);
        await assert.rejects(engine.read(closed, 0, new Uint8Array(4096)), /closed/);
        await assert.rejects(engine.fsync(closed, false), /closed/);
        await assert.rejects(engine.fallocate(closed, 0, 0, 4096), /closed/);
        assert.equal(await engine.read(file, 0, buf), 8192);
      } finally {
        sharedPool.give(buf);
      }
    });
  });

  Deno.test(`${kind}: submit (the callback form): bytes or the error, later than the call`, async () => {
    await withEngine(kind, { size: 4 * MiB, depth: 8 }, async ({ engine, file, path }) => {
      // Resolves with what `done` got; rejects when it came from within submit or twice.
      const submit = (write: boolean, f: FileHandle, offset: number, buf: Uint8Array) =>
        new Promise<number | Error>((resolve, reject) => {
          let returned = false, calls = 0;
          engine.submit(write, f, offset, buf, (result) => {
            if (!returned || ++calls > 1) reject(new Error("done called early or twice"));
            else resolve(result);
          });
          returned = true;
        });
      const N = 64; // more than the depth: the rest wait in the engine's queue
      const bufs = Array.from({ length: N }, (_, i) => poolBuffer(BLOCK, i));
      try {
        const writes = bufs.map((b, i) => submit(true, file, i * BLOCK, b));
        assert.deepEqual(await Promise.all(writes), new Array(N).fill(BLOCK));
        for (const b of bufs) b.fill(0xee);
        const reads = bufs.map((b, i) => submit(false, file, i * BLOCK, b));
        assert.deepEqual(await Promise.all(reads), new Array(N).fill(BLOCK));
        bufs.forEach((b, i) => assert.ok(b.every((x) => x === i), `block ${i}`));
        // Plain memory is bounced; past the end of the file a read is short.
        const plain = new Uint8Array(4096);
        assert.equal(await submit(false, file, 0, plain), 4096);
        assert.ok(plain.every((x) => x === 0));
        assert.equal(await submit(false, file, 4 * MiB, bufs[0]), 0);
        // Errors arrive as the Error, not thrown: a closed handle, a read-only descriptor.
        const closed = FileHandle.open(path, flagsFor(kind));
        closed.close();
        assert.match(String(await submit(false, closed, 0, bufs[0])), /closed/);
        using readOnly = FileHandle.open(path, O_RDONLY);
        const bad = await submit(true, readOnly, 0, bufs[0]);
        isEngineError("EBADF", "write", "pwrite")(bad);
        await engine.close();
        assert.match(String(await submit(false, file, 0, bufs[0])), /closed/);
      } finally {
        for (const b of bufs) sharedPool.give(b);
      }
    });
  });

  Deno.test(`${kind}: close waits for requests in flight, then refuses new ones`, async () => {
    await withEngine(kind, { size: 8 * MiB, depth: 16 }, async ({ engine, file }) => {
      const N = 100;
      const r = rng(99);
      const bufs = Array.from({ length: N }, () => r.fill(poolBuffer(64 * KiB)));
      try {
        // More requests than the depth (the rest wait in the engine's queue), a flush, a bounce.
        const ops: Promise<unknown>[] = bufs.map((b, i) => engine.write(file, i * 64 * KiB, b));
        ops.push(engine.fsync(file, false));
        const plain = r.fill(new Uint8Array(8192));
        ops.push(engine.write(file, 7 * MiB, plain));
        const closing = engine.close();
        assert.equal(engine.close(), closing, "close is not idempotent");
        await closing;
        for (const [i, op] of ops.entries()) {
          assert.ok(await isSettled(op), `request ${i} still in flight after close`);
        }
        assert.deepEqual(
          await Promise.all(ops),
          [...new Array(N).fill(64 * KiB), undefined, 8192],
        );

        await assert.rejects(engine.read(file, 0, bufs[0]), /closed/);
        await assert.rejects(engine.write(file, 0, bufs[0]), /closed/);
        await assert.rejects(engine.read(file, 0, new Uint8Array(4096)), /closed/);
        await assert.rejects(engine.fsync(file, true), /closed/);
        await assert.rejects(engine.fallocate(file, 0, 0, 4096), /closed/);
        await engine.close();

        // What was written is on disk: read it through a fresh engine.
        const again = createEngine(kind);
        try {
          const back = poolBuffer(64 * KiB);
          try {
            for (const i of [0, 37, N - 1]) {
              assert.equal(await again.read(file, i * 64 * KiB, back), 64 * KiB);
              assertBytes(back, bufs[i], `block ${i}`);
            }
          } finally {
            sharedPool.give(back);
          }
        } finally {
          await again.close();
        }
      } finally {
        for (const b of bufs) sharedPool.give(b);
      }
    });
  });

  Deno.test({
    name: `${kind}: fallocate obeys close like every other request`,
    fn: async () => {
      await withEngine(kind, { size: 1 * MiB }, async ({ engine, file }) => {
        const inFlight = engine.fallocate(file, FALLOC_FL_ZERO_RANGE, 0, 64 * MiB);
        await engine.close();
        assert.ok(await isSettled(inFlight), "close resolved with a fallocate in flight");
        await inFlight;
        await assert.rejects(engine.fallocate(file, 0, 0, 4096), /closed/);
      });
    },
  });

  Deno.test(`${kind}: an idle engine closes at once, and engines can be made and closed repeatedly`, async () => {
    for (let i = 0; i < 20; i++) {
      const engine = createEngine(kind, { depth: 4 + i });
      await engine.close();
      await engine.close();
    }
    await withEngine(kind, { size: 1 * MiB }, async ({ engine, file }) => {
      // After a burst, the engine goes idle (no parked wait keeps the test alive).
      const buf = poolBuffer(4096);
      try {
        for (let i = 0; i < 10; i++) assert.equal(await engine.write(file, i * 4096, buf), 4096);
        await new Promise((resolve) => setTimeout(resolve, 10));
        assert.equal(await engine.read(file, 0, buf), 4096);
      } finally {
        sharedPool.give(buf);
      }
    });
  });

  Deno.test(`${kind}: coalesced submission (batch 16, held above 8 in flight): a closed loop of 4000 verified ops`, async () => {
    const size = 16 * MiB, blocks = size / BLOCK, QD = 40, TOTAL = 4000;
    await withEngine(kind, { size, batch: 16, coalesceAbove: 8 }, async ({ engine, file }) => {
      const r = rng(0xc0a1 + kind.length);
      const ref = new Uint8Array(size);
      const busy = new Uint8Array(blocks);
      let issued = 0;
      // Each worker keeps one 4 KiB request in flight: a write of fresh data, or a read checked
      // against what the last completed write there left; a block is never used twice at once.
      const worker = async () => {
        const buf = poolBuffer(BLOCK);
        try {
          while (issued < TOTAL) {
            issued++;
            let b = r.below(blocks);
            while (busy[b]) b = (b + 1) % blocks;
            busy[b] = 1;
            if (r.below(2) === 0) {
              r.fill(buf);
              assert.equal(await engine.write(file, b * BLOCK, buf), BLOCK);
              ref.set(buf, b * BLOCK);
            } else {
              buf.fill(0xa5);
              assert.equal(await engine.read(file, b * BLOCK, buf), BLOCK);
              assertBytes(buf, ref.subarray(b * BLOCK, (b + 1) * BLOCK), `block ${b}`);
            }
            busy[b] = 0;
          }
        } finally {
          sharedPool.give(buf);
        }
      };
      await Promise.all(Array.from({ length: QD }, worker));
      // A lone request after the burst still goes out (nothing is held below the threshold).
      const buf = poolBuffer(BLOCK);
      try {
        assert.equal(await engine.read(file, 0, buf), BLOCK);
        assertBytes(buf, ref.subarray(0, BLOCK), "block 0 after the loop");
      } finally {
        sharedPool.give(buf);
      }
    });
  });
}
