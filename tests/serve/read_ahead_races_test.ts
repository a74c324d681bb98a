/**
 * ReadAhead and DiskGate in races: coherence when read-ahead comes back during a write, pause and
 * close with windows loading, the memory the windows take, buffers kept while still in use.
 */
import assert from "node:assert/strict";
import { Disk } from "../../drivers/disk.ts";
import type { DiskDone, DiskImpl, DiskInfo, Extent } from "../../drivers/driver.ts";
import type { FileHandle } from "../../ffi/file.ts";
import { BufferPool } from "../../io/buffer_pool.ts";
import type { Buffers } from "../../io/engine.ts";
import { DiskGate } from "../../serve/gate.ts";
import { ReadAhead } from "../../serve/read_ahead.ts";
import { assertBytes } from "../util.ts";

const KiB = 1024, MiB = 1024 * KiB;

function pattern(size: number): Uint8Array {
  const data = new Uint8Array(size);
  for (let i = 0; i < size; i += 4) data[i] = (i / 4) & 0xff;
  return data;
}

function partsOf(bufs: Buffers): readonly Uint8Array[] {
  return bufs instanceof Uint8Array ? [bufs] : bufs;
}

/** Resolves after the microtasks queued so far (and those they queue, a few levels deep). */
async function ticks(n = 10): Promise<void> {
  for (let i = 0; i < n; i++) await Promise.resolve();
}

/** Resolves with `p`'s outcome, or with "timeout" after `ms`. */
async function within<T>(p: Promise<T>, ms: number): Promise<T | "timeout"> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<"timeout">((r) => timer = setTimeout(() => r("timeout"), ms));
  try {
    return await Promise.race([p, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

/**
 * A driver in memory whose requests complete only when the test says so. A read takes the data
 * when issued; a write lands when it completes (so a read issued while a write is in flight gets
 * the old data, as a real disk may give it). `passthroughFile` makes the gate see a bypass.
 */
class HeldDriver implements DiskImpl {
  readonly info: DiskInfo;
  readonly data: Uint8Array;
  readonly pending: { write: boolean; run: () => void }[] = [];

  constructor(size: number) {
    this.data = pattern(size);
    this.info = {
      size,
      logicalSectorSize: 512,
      physicalSectorSize: 4096,
      readOnly: false,
      backing: null,
      discardFreesSpace: true,
    };
  }

  submit(write: boolean, offset: number, bufs: Buffers, done: DiskDone): void {
    if (!write) {
      let at = offset;
      for (const b of partsOf(bufs)) {
        b.set(this.data.subarray(at, at + b.length));
        at += b.length;
      }
      this.pending.push({ write, run: () => done(null) });
      return;
    }
    const copies = partsOf(bufs).map((b) => b.slice());
    this.pending.push({
      write,
      run: () => {
        let at = offset;
        for (const b of copies) {
          this.data.set(b, at);
          at += b.length;
        }
        done(null);
      },
    });
  }

  read(offset: number, bufs: Buffers): Promise<void> {
    return new Promise((resolve, reject) => {
      this.submit(false, offset, bufs, (e) => e === null ? resolve() : reject(e));
    });
  }

  write(offset: number, bufs: Buffers): Promise<void> {
    return new Promise((resolve, reject) => {
      this.submit(true, offset, bufs, (e) => e === null ? resolve() : reject(e));
    });
  }

  flush(): Promise<void> {
    return Promise.resolve();
  }

  discard(offset: number, length: number): Promise<void> {
    return this.writeZeroes(offset, length);
  }

  writeZeroes(offset: number, length: number): Promise<void> {
    return this.write(offset, new Uint8Array(length));
  }

  blockStatus(offset: number, length: number): Promise<Extent[]> {
    return Promise.resolve([{ offset, length, allocated: true, zero: false }]);
  }

  close(): Promise<void> {
    return Promise.resolve();
  }

  passthroughFile(): FileHandle | null {
    return {} as FileHandle;
  }

  /** Completes the reads issued so far (and those they issue in turn); writes stay in flight. */
  async settleReads(): Promise<void> {
    for (let i = this.pending.findIndex((p) => !p.write); i >= 0;) {
      this.pending.splice(i, 1)[0].run();
      i = this.pending.findIndex((p) => !p.write);
    }
    await ticks();
  }

  /** Completes everything issued so far (and what that issues in turn). */
  async settle(): Promise<void> {
    while (this.pending.length > 0) this.pending.shift()!.run();
    await ticks();
  }
}

/** A gate over a HeldDriver; reads complete as the test settles them. */
function heldGate(size: number): { gate: DiskGate; driver: HeldDriver } {
  const driver = new HeldDriver(size);
  return { gate: new DiskGate(new Disk(driver, "held")), driver };
}

/** A gate read of [offset, offset + length) that completes its reads (not writes) at once. */
async function gateRead(
  gate: DiskGate,
  driver: HeldDriver,
  offset: number,
  length: number,
): Promise<Uint8Array> {
  const buf = new Uint8Array(length);
  const done = gate.read(offset, buf);
  await ticks();
  await driver.settleReads();
  await done;
  return buf;
}

Deno.test("gate: a write submitted while read-ahead was off drops what is read ahead meanwhile", async () => {
  const { gate, driver } = heldGate(8 * MiB);
  const size = 256 * KiB, at = MiB;
  // A writer bypasses the gate (passthrough): no read-ahead. A write is submitted meanwhile.
  assert.notEqual(gate.passthroughFile(), null);
  assert.equal(gate.stats().readAhead, null);
  let acked = false;
  gate.submit(true, at, new Uint8Array(size).fill(0xee), (e) => {
    assert.equal(e, null);
    acked = true;
  });
  // The bypass ends while the write is in flight: read-ahead is back on, and a sequential reader
  // gets windows read over the write's range (they take the data from before it).
  gate.passthroughReturned();
  assert.notEqual(gate.stats().readAhead, null);
  for (const offset of [0, size, 2 * size]) await gateRead(gate, driver, offset, size);
  assert.ok(gate.stats().readAhead!.fetchedBytes >= 4 * size, "windows over the write's range");
  // The write completes and is acknowledged; a read that arrives after that must see it.
  await driver.settle();
  assert.ok(acked);
  const got = await gateRead(gate, driver, at, size);
  assertBytes(got, new Uint8Array(size).fill(0xee), "a read after the write's acknowledgment");
  await gate.close();
});

Deno.test("gate: two pauses at once both return once the requests in flight are done", async () => {
  const { gate, driver } = heldGate(MiB);
  const reading = gate.read(0, new Uint8Array(4096));
  await ticks();
  const first = gate.pause(), second = gate.pause();
  await ticks();
  await driver.settle();
  await reading;
  assert.notEqual(await within(second, 500), "timeout", "the second pause did not return");
  assert.notEqual(await within(first, 500), "timeout", "the first pause never returned");
  await gate.resume();
  await gate.close();
});

Deno.test("gate: close lets a read waiting for a window that loads complete", async () => {
  const { gate, driver } = heldGate(8 * MiB);
  const size = 256 * KiB;
  await gateRead(gate, driver, 0, size);
  // The second read starts windows from 512 KiB; the third waits for the first of them.
  const second = new Uint8Array(size), third = new Uint8Array(size);
  const reads = [gate.read(size, second), gate.read(2 * size, third)];
  await ticks();
  const closing = gate.close();
  await ticks(); // the disk's close has begun; the windows' reads end after that
  await driver.settle();
  const outcome = await Promise.allSettled(reads);
  await closing;
  // Both reads were in flight when close() was called: they complete, as without read-ahead.
  assert.deepEqual(
    outcome.map((o) => o.status),
    ["fulfilled", "fulfilled"],
    String(
      outcome.map((o) => o.status === "rejected" ? (o.reason as Error).message : "ok"),
    ),
  );
  assertBytes(third, driver.data.subarray(2 * size, 3 * size));
});

/** A pool that keeps count of the memory out (each buffer costs its power-of-two size class). */
class CountingPool extends BufferPool {
  bytes = 0;
  most = 0;

  static classOf(size: number): number {
    let c = 4096;
    while (c < size) c *= 2;
    return c;
  }

  override take(size: number): Uint8Array<ArrayBuffer> {
    this.bytes += CountingPool.classOf(size);
    this.most = Math.max(this.most, this.bytes);
    return super.take(size);
  }

  override give(buf: Uint8Array<ArrayBuffer>): void {
    this.bytes -= CountingPool.classOf(buf.length);
    super.give(buf);
  }
}

/**
 * A disk in memory for ReadAhead alone (as in read_ahead_test.ts): reads take the data when
 * issued and complete on `settle`; it remembers the buffers windows are read into.
 */
class SlowDisk {
  readonly data: Uint8Array;
  readonly pending: (() => void)[] = [];
  readonly fetched: { offset: number; buf: Uint8Array }[] = [];
  reads = 0;

  constructor(size: number) {
    this.data = pattern(size);
  }

  issuer(fetch: boolean): (offset: number, bufs: Buffers, done: DiskDone) => void {
    return (offset, bufs, done) => {
      if (fetch) this.fetched.push({ offset, buf: bufs as Uint8Array });
      else this.reads++;
      assert.ok(offset + partsOf(bufs).reduce((n, b) => n + b.length, 0) <= this.data.length);
      let at = offset;
      for (const b of partsOf(bufs)) {
        b.set(this.data.subarray(at, at + b.length));
        at += b.length;
      }
      this.pending.push(() => done(null));
    };
  }

  async settle(): Promise<void> {
    while (this.pending.length > 0) this.pending.shift()!();
    await ticks(2);
  }
}

function readAhead(disk: SlowDisk, pool: BufferPool, maxAhead?: number): ReadAhead {
  return new ReadAhead(disk.issuer(false), disk.issuer(true), disk.data.length, {
    pool,
    maxAhead,
  });
}

function read(ra: ReadAhead, offset: number, length: number): Promise<Uint8Array> {
  const buf = new Uint8Array(length);
  return new Promise((resolve, reject) => {
    ra.read(offset, buf, (e) => e === null ? resolve(buf) : reject(e));
  });
}

/** Whether two views share any byte of memory. */
function overlaps(a: Uint8Array, b: Uint8Array): boolean {
  return a.buffer === b.buffer && a.byteOffset < b.byteOffset + b.length &&
    b.byteOffset < a.byteOffset + a.length;
}

Deno.test("read-ahead: the windows' memory stays within the budget whatever the request size", async () => {
  using pool = new CountingPool();
  const disk = new SlowDisk(64 * MiB);
  const maxAhead = 4 * MiB, request = 136 * KiB; // a loop device's or NBD client's odd size
  const ra = readAhead(disk, pool, maxAhead);
  for (let step = 0; step < 24; step++) {
    const reads = [0, 1, 2, 3].map((r) => read(ra, r * 16 * MiB + step * request, request));
    await disk.settle();
    await Promise.all(reads);
  }
  assert.ok(ra.stats().hits > 0);
  ra.clear();
  await disk.settle();
  assert.equal(pool.outstanding, 0);
  assert.ok(
    pool.most <= 2 * maxAhead,
    `${pool.most / MiB} MiB of pool memory for windows, budget ${2 * maxAhead / MiB} MiB`,
  );
});

Deno.test("read-ahead: a write that starts while a window loads and ends after it loaded", async () => {
  using pool = new BufferPool();
  const disk = new SlowDisk(8 * MiB);
  const ra = readAhead(disk, pool);
  const size = 256 * KiB;
  for (const offset of [0, size]) {
    const got = read(ra, offset, size);
    await disk.settle();
    await got;
  }
  // A hit at 512 KiB starts windows over 1..1.75 MiB. A write over 1.25..1.5 MiB starts while they
  // load; they load (with the old data) before the write ends.
  const hit = read(ra, 2 * size, size);
  ra.changed(5 * size, 6 * size);
  await disk.settle();
  await hit;
  // A read during the write may see either; one after its acknowledgment sees the new data.
  disk.data.fill(0x77, 5 * size, 6 * size);
  ra.changed(5 * size, 6 * size);
  for (const offset of [3 * size, 4 * size, 5 * size, 6 * size]) {
    const got = read(ra, offset, size);
    await disk.settle();
    assertBytes(await got, disk.data.subarray(offset, offset + size), `read at ${offset}`);
  }
  ra.clear();
  await disk.settle();
  assert.equal(pool.outstanding, 0);
});

Deno.test("read-ahead: a window cleared while it loads keeps its buffer until its read ends", async () => {
  using pool = new BufferPool();
  const disk = new SlowDisk(8 * MiB);
  const ra = readAhead(disk, pool);
  const size = 256 * KiB;
  const first = read(ra, 0, size);
  await disk.settle();
  await first;
  const second = read(ra, size, size); // starts windows: their reads stay in flight
  const third = read(ra, 2 * size, size); // waits for the first of them
  assert.ok(disk.fetched.length >= 2);
  ra.clear(); // the disk is closing, or read-ahead turned off
  // The kernel may still write into the windows' buffers: the pool must not hand them out.
  const taken = Array.from({ length: 8 }, () => pool.take(size));
  for (const t of taken) {
    for (const f of disk.fetched) assert.ok(!overlaps(t, f.buf), `window at ${f.offset} reused`);
  }
  for (const t of taken) pool.give(t);
  await disk.settle();
  assertBytes(await second, disk.data.subarray(size, 2 * size));
  assertBytes(await third, disk.data.subarray(2 * size, 3 * size));
  assert.equal(disk.reads, 3, "the reader of the cleared window read the disk");
  assert.equal(pool.outstanding, 0);
});

Deno.test("read-ahead: a loaded window evicted while a reader waits on it is kept for that reader", async () => {
  using pool = new BufferPool();
  const disk = new SlowDisk(32 * MiB);
  const ra = readAhead(disk, pool, MiB); // windows within 2 MiB
  const size = 128 * KiB;
  // Reader one: windows [256K, 384K), [384K, 512K), loaded. Reader two, 64 KiB behind it: its
  // windows [320K, 448K), [448K, 576K) overlap them and stay loading.
  for (const offset of [0, size]) {
    const got = read(ra, offset, size);
    await disk.settle();
    await got;
  }
  const reader2 = [read(ra, 64 * KiB, size)];
  await disk.settle();
  await reader2[0];
  const loaded = disk.fetched.slice();
  reader2.push(read(ra, 64 * KiB + size, size));
  // A read over [352K, 480K): the loaded [256K, 384K) and [384K, 512K), and the loading
  // [320K, 448K) and [448K, 576K). It waits, holding the loaded ones.
  const waiting = read(ra, 352 * KiB, size);
  // [384K, 512K) is in the list, loaded (and held by the waiting read).
  assert.equal(ra.peek(400 * KiB, 440 * KiB, () => {}), true);
  // Two readers far away: their second reads start windows of 1 MiB, and the second of those
  // needs room: [384K, 512K) is evicted while the read above still waits.
  const far: Promise<Uint8Array>[] = [];
  for (let step = 0; step < 2; step++) {
    for (const r of [0, 1]) far.push(read(ra, (8 + 8 * r) * MiB + step * MiB, MiB));
  }
  assert.equal(ra.peek(400 * KiB, 440 * KiB, () => {}), false, "the window was not evicted");
  const taken = Array.from({ length: 8 }, () => pool.take(size));
  for (const t of taken) {
    for (const f of loaded) assert.ok(!overlaps(t, f.buf), `window at ${f.offset} reused`);
  }
  for (const t of taken) pool.give(t);
  await disk.settle();
  assertBytes(await waiting, disk.data.subarray(352 * KiB, 480 * KiB));
  await Promise.all([...reader2, ...far]);
  ra.clear();
  await disk.settle();
  assert.equal(pool.outstanding, 0);
});

Deno.test("read-ahead: windows stop at the end of the disk; reads up to it are right", async () => {
  using pool = new BufferPool();
  const disk = new SlowDisk(MiB + 192 * KiB);
  const ra = readAhead(disk, pool);
  const size = 128 * KiB;
  for (let offset = 0; offset < disk.data.length; offset += size) {
    const length = Math.min(size, disk.data.length - offset);
    const got = read(ra, offset, length);
    await disk.settle();
    assertBytes(await got, disk.data.subarray(offset, offset + length), `read at ${offset}`);
  }
  assert.ok(ra.stats().hits >= 5, JSON.stringify(ra.stats()));
  ra.clear();
  await disk.settle();
  assert.equal(pool.outstanding, 0);
});
