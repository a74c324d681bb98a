/** ReadAhead: sequential readers are answered from windows read ahead, never with stale data. */
import assert from "node:assert/strict";
import { openDisk } from "../../drivers/mod.ts";
import type { DiskDone } from "../../drivers/driver.ts";
import { BufferPool, sharedPool } from "../../io/buffer_pool.ts";
import type { Buffers } from "../../io/engine.ts";
import { DiskGate } from "../../serve/gate.ts";
import { ReadAhead } from "../../serve/read_ahead.ts";
import { assertBytes, withTempDir } from "../util.ts";

const KiB = 1024, MiB = 1024 * KiB;

/**
 * A disk in memory whose reads take the data when issued and complete when `settle` is called,
 * so a test can put a write between a window's read and its completion.
 */
class SlowDisk {
  readonly data: Uint8Array;
  readonly pending: (() => void)[] = [];
  reads = 0;
  fetches = 0;
  failFetches = false;

  constructor(size: number) {
    this.data = new Uint8Array(size);
    for (let i = 0; i < size; i += 4) this.data[i] = (i / 4) & 0xff;
  }

  issuer(fetch: boolean): (offset: number, bufs: Buffers, done: DiskDone) => void {
    return (offset, bufs, done) => {
      if (fetch) this.fetches++;
      else this.reads++;
      let at = offset;
      for (const b of bufs instanceof Uint8Array ? [bufs] : bufs) {
        b.set(this.data.subarray(at, at + b.length));
        at += b.length;
      }
      const failed = fetch && this.failFetches;
      this.pending.push(() => done(failed ? new Error("EIO") : null));
    };
  }

  /** Completes every read issued so far (and those they issue in turn). */
  async settle(): Promise<void> {
    while (this.pending.length > 0) this.pending.shift()!();
    await Promise.resolve();
  }

  write(offset: number, value: number, length: number): void {
    this.data.fill(value, offset, offset + length);
  }
}

function readAhead(disk: SlowDisk, pool: BufferPool, maxAhead?: number): ReadAhead {
  return new ReadAhead(disk.issuer(false), disk.issuer(true), disk.data.length, {
    pool,
    maxAhead,
  });
}

/** Reads [offset, offset + size) for each offset in turn, completing each before the next. */
async function readInTurn(ra: ReadAhead, disk: SlowDisk, offsets: number[], size: number) {
  for (const offset of offsets) {
    const got = read(ra, offset, size);
    await disk.settle();
    assertBytes(await got, disk.data.subarray(offset, offset + size), `read at ${offset}`);
  }
}

/** Drops every window: every buffer must go back to the pool. */
async function clearAll(ra: ReadAhead, disk: SlowDisk, pool: BufferPool): Promise<void> {
  ra.clear();
  await disk.settle();
  assert.equal(pool.outstanding, 0, "window buffers not given back");
}

/** Starts a read; resolves with the buffer once it completes. */
function read(ra: ReadAhead, offset: number, length: number): Promise<Uint8Array> {
  const buf = new Uint8Array(length);
  return new Promise((resolve, reject) => {
    ra.read(offset, buf, (e) => e === null ? resolve(buf) : reject(e));
  });
}

Deno.test("read-ahead: a sequential reader is answered from windows, byte for byte", async () => {
  using pool = new BufferPool();
  const disk = new SlowDisk(16 * MiB);
  const ra = readAhead(disk, pool);
  const size = 256 * KiB;
  await readInTurn(ra, disk, Array.from({ length: 48 }, (_, i) => i * size), size);
  // The first two reads go to the disk (the second shows the reader is sequential).
  assert.equal(disk.reads, 2);
  assert.equal(ra.stats().hits, 12 * MiB / size - 2);
  await clearAll(ra, disk, pool);
});

Deno.test("read-ahead: a read that spans windows, into scattered buffers", async () => {
  using pool = new BufferPool();
  const disk = new SlowDisk(8 * MiB);
  const ra = readAhead(disk, pool);
  await readInTurn(ra, disk, [0, 128 * KiB, 256 * KiB], 128 * KiB);
  // Windows of 128 KiB from 384 KiB: this read covers parts of three of them.
  const parts = [new Uint8Array(100 * KiB), new Uint8Array(156 * KiB)];
  const done = new Promise<void>((resolve, reject) => {
    ra.read(400 * KiB, parts, (e) => e === null ? resolve() : reject(e));
  });
  await disk.settle();
  await done;
  assertBytes(parts[0], disk.data.subarray(400 * KiB, 500 * KiB));
  assertBytes(parts[1], disk.data.subarray(500 * KiB, 656 * KiB));
  assert.equal(disk.reads, 2, "the spanning read went to the disk");
  await clearAll(ra, disk, pool);
});

Deno.test("read-ahead: a change dropped the windows it overlaps, loaded or loading", async () => {
  using pool = new BufferPool();
  const disk = new SlowDisk(8 * MiB);
  const ra = readAhead(disk, pool);
  const size = 256 * KiB;
  await readInTurn(ra, disk, [0, size], size);
  // Windows over 512 KiB..1 MiB are loaded. A write over 768 KiB..1 MiB, acknowledged:
  ra.changed(3 * size, 4 * size);
  disk.write(3 * size, 0xee, size);
  ra.changed(3 * size, 4 * size);
  // A hit at 512 KiB starts windows over 1..1.75 MiB; a write over 1.25..1.5 MiB starts and
  // ends while they load (their reads took the old data).
  const reader = read(ra, 2 * size, size);
  ra.changed(5 * size, 6 * size);
  disk.write(5 * size, 0xdd, size);
  ra.changed(5 * size, 6 * size);
  await disk.settle();
  await reader;
  const rest = Array.from({ length: 21 }, (_, i) => (i + 3) * size);
  await readInTurn(ra, disk, rest, size);
  assert.ok(ra.stats().hits >= 15, JSON.stringify(ra.stats()));
  await clearAll(ra, disk, pool);
});

Deno.test("read-ahead: a reader waiting for a window that a change drops reads the disk", async () => {
  using pool = new BufferPool();
  const disk = new SlowDisk(8 * MiB);
  const ra = readAhead(disk, pool);
  const size = 256 * KiB;
  await readInTurn(ra, disk, [0, size], size);
  // A hit on a loaded window; it starts windows from 1 MiB, still loading when read.
  const next = read(ra, 2 * size, size);
  const at = 5 * size;
  const later = read(ra, at, size);
  ra.changed(at, at + size);
  disk.write(at, 0x11, size);
  ra.changed(at, at + size);
  await disk.settle();
  assertBytes(await next, disk.data.subarray(2 * size, 3 * size));
  assert.equal(disk.reads, 3, "the reader of the dropped window did not read the disk");
  assertBytes(await later, new Uint8Array(size).fill(0x11));
  await clearAll(ra, disk, pool);
});

Deno.test("read-ahead: windows that fail to load leave the reads to the disk", async () => {
  using pool = new BufferPool();
  const disk = new SlowDisk(8 * MiB);
  disk.failFetches = true;
  const ra = readAhead(disk, pool);
  const size = 512 * KiB;
  await readInTurn(ra, disk, Array.from({ length: 8 }, (_, i) => i * size), size);
  assert.equal(ra.stats().hits, 0);
  assert.ok(disk.fetches > 0);
  await clearAll(ra, disk, pool);
});

Deno.test("read-ahead: small and random reads start nothing; memory stays within budget", async () => {
  using pool = new BufferPool();
  const disk = new SlowDisk(64 * MiB);
  const ra = readAhead(disk, pool, 4 * MiB);
  for (let i = 0; i < 64; i++) {
    const got = read(ra, ((i * 37) % 64) * MiB, i % 2 === 0 ? 4 * KiB : 256 * KiB);
    await disk.settle();
    await got;
  }
  assert.equal(disk.fetches, 0);
  // A sequential reader at unaligned offsets: windows there would be refused by O_DIRECT.
  for (let at = 100; at < 100 + 4 * 256 * KiB; at += 256 * KiB) {
    const got = read(ra, at, 256 * KiB);
    await disk.settle();
    await got;
  }
  assert.equal(disk.fetches, 0);
  // Four readers at once, each sequential: windows ahead of each, 8 MiB at most in all.
  let most = 0;
  for (let step = 0; step < 16; step++) {
    const reads = [0, 1, 2, 3].map((r) => read(ra, r * 16 * MiB + step * MiB, MiB));
    most = Math.max(most, pool.outstanding);
    await disk.settle();
    await Promise.all(reads);
  }
  assert.ok(ra.stats().hits > 0);
  assert.ok(most <= 8, `${most} window buffers of 1 MiB outstanding`);
  await clearAll(ra, disk, pool);
});

Deno.test("read-ahead: peek hands loaded windows over in place, never loading or dropped ones", async () => {
  const disk = new SlowDisk(16 * MiB), pool = new BufferPool();
  const ra = readAhead(disk, pool);
  const size = 256 * KiB;
  // Two reads in turn: windows of 256 KiB now load from 512 KiB on.
  const first = read(ra, 0, size), second = read(ra, size, size);
  const joined = (parts: Uint8Array[]): Uint8Array => {
    const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
    let at = 0;
    for (const p of parts) {
      out.set(p, at);
      at += p.length;
    }
    return out;
  };
  let seen: Uint8Array | null = null;
  assert.equal(ra.peek(2 * size, 3 * size, (p) => seen = joined(p)), false, "a loading window");
  await disk.settle();
  await first;
  await second;
  // Across two loaded windows, from the middle of one to the middle of the next.
  const from = 2 * size + 4096, to = 3 * size + 8192;
  assert.equal(ra.peek(from, to, (p) => seen = joined(p)), true);
  assertBytes(seen!, disk.data.subarray(from, to), "the bytes handed over");
  assert.equal(ra.stats().hits, 1);
  assert.equal(ra.peek(10 * MiB, 10 * MiB + size, () => {}), false, "no window there");
  ra.changed(to, to + 4096);
  assert.equal(ra.peek(to, to + 8192, () => {}), false, "a dropped window");
  await clearAll(ra, disk, pool);
});

Deno.test("read-ahead: peek over windows of two readers that overlap takes each byte once", async () => {
  const disk = new SlowDisk(4 * MiB), pool = new BufferPool();
  const ra = readAhead(disk, pool);
  const size = 128 * KiB;
  // Reader one: windows [256K, 384K) and [384K, 512K). Reader two, 64 KiB behind it: its
  // second read starts [320K, 448K) and [448K, 576K), over reader one's.
  await readInTurn(ra, disk, [0, size], size);
  await readInTurn(ra, disk, [64 * KiB, 64 * KiB + size], size);
  await disk.settle();
  const from = 256 * KiB, to = 576 * KiB;
  let got: Uint8Array[] = [];
  assert.equal(ra.peek(from, to, (p) => got = p), true);
  assert.equal(got.reduce((n, p) => n + p.length, 0), to - from);
  let at = from;
  for (const p of got) {
    assertBytes(p, disk.data.subarray(at, at + p.length), `the part at ${at}`);
    at += p.length;
  }
  await clearAll(ra, disk, pool);
});

Deno.test("gate: reads ahead on an image file; writes through it are read back", async () => {
  await withTempDir(async (dir) => {
    const image = new Uint8Array(8 * MiB);
    crypto.getRandomValues(image.subarray(0, 65536));
    for (let i = 65536; i < image.length; i += 65536) image.copyWithin(i, 0, 65536);
    for (let i = 0; i < image.length; i += 4096) image[i] = i / 4096;
    Deno.writeFileSync(`${dir}/a.img`, image);
    const gate = new DiskGate(await openDisk(`aio:${dir}/a.img`));
    try {
      const buf = sharedPool.take(512 * KiB);
      for (let offset = 0; offset < 4 * MiB; offset += buf.length) {
        await gate.read(offset, buf);
        assertBytes(buf, image.subarray(offset, offset + buf.length), `read at ${offset}`);
        if (offset === MiB) {
          // Windows now cover what comes next: overwrite part of it, then read it all back.
          const patch = sharedPool.take(64 * KiB).fill(0x5a);
          await gate.write(2 * MiB + 4096, patch);
          image.fill(0x5a, 2 * MiB + 4096, 2 * MiB + 4096 + patch.length);
          sharedPool.give(patch);
        }
      }
      sharedPool.give(buf);
      assert.ok(gate.stats().readAhead!.hits >= 4, JSON.stringify(gate.stats().readAhead));
      // Reads answered in place count as reads; a read that finds no window does not.
      const before = gate.stats().ops.read.requests;
      assert.equal(gate.readInPlace(0, 64 * KiB, () => {}), false, "no window behind the reader");
      assert.equal(gate.stats().ops.read.requests, before);
      let hits = 0, seen: Uint8Array | null = null;
      for (let tries = 0; hits < 16 && tries < 200; tries++) {
        const at = 4 * MiB + (hits % 4) * 64 * KiB;
        if (gate.readInPlace(at, 64 * KiB, (parts) => seen = parts[0])) {
          assertBytes(seen!, image.subarray(at, at + seen!.length), `in place at ${at}`);
          hits++;
        } else await new Promise((r) => setTimeout(r, 10));
      }
      assert.equal(hits, 16, "the windows ahead of the reader loaded");
      assert.equal(gate.stats().ops.read.requests, before + 16);
    } finally {
      await gate.close();
    }
  });
});

Deno.test("gate: no read-ahead when asked, for a RAM disk (until resumed on a file), or while writers bypass the gate", async () => {
  await withTempDir(async (dir) => {
    Deno.writeFileSync(`${dir}/a.img`, new Uint8Array(MiB));
    const off = new DiskGate(await openDisk(`aio:${dir}/a.img`), { readAhead: false });
    assert.equal(off.stats().readAhead, null);
    await off.close();
    const ram = new DiskGate(await openDisk(`ram:${dir}/a.img`));
    assert.equal(ram.stats().readAhead, null);
    // Resumed on an image file (a snapshot's overlay, say): it reads ahead from then on.
    await ram.pause();
    await ram.resume(await openDisk(`aio:${dir}/a.img`));
    assert.notEqual(ram.stats().readAhead, null);
    await ram.close();
    const lent = new DiskGate(await openDisk(`aio:${dir}/a.img`));
    assert.notEqual(lent.stats().readAhead, null);
    const access = lent.directAccess(), second = lent.directAccess();
    assert.notEqual(access, null);
    assert.equal(lent.stats().readAhead, null);
    // Back on once every bypass has ended: the lent files disposed (threads gone, or the
    // kernel refused FUSE over io_uring), the passthrough file returned.
    access![Symbol.dispose]();
    assert.equal(lent.stats().readAhead, null, "one lent file is still out");
    second![Symbol.dispose]();
    second![Symbol.dispose]();
    assert.notEqual(lent.stats().readAhead, null);
    assert.notEqual(lent.passthroughFile(), null);
    assert.equal(lent.stats().readAhead, null);
    lent.passthroughReturned();
    assert.notEqual(lent.stats().readAhead, null);
    await lent.close();
    assert.equal(lent.stats().readAhead, null);
  });
});
