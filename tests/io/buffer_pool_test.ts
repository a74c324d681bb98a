import assert from "node:assert/strict";
import { BufferPool, sharedPool } from "../../io/buffer_pool.ts";
import { addressOf } from "../../ffi/memory.ts";

function address(buf: Uint8Array): number {
  const a = addressOf(buf);
  assert.ok(a !== null, "pool buffer is not over registered memory");
  return a;
}

Deno.test("BufferPool buffers are 4 KiB-aligned and exactly the size asked for", () => {
  using pool = new BufferPool();
  for (const size of [1, 100, 4095, 4096, 4097, 5000, 12_288, 65_536, 100_000, 1_048_576]) {
    const buf = pool.take(size);
    assert.equal(buf.length, size);
    assert.equal(address(buf) % 4096, 0, `size ${size}`);
    buf[0] = 1;
    buf[size - 1] = 2;
    pool.give(buf);
  }
  assert.equal(pool.outstanding, 0);
});

Deno.test("BufferPool take after give reuses the same memory", () => {
  using pool = new BufferPool();
  const a = pool.take(4096);
  const at = address(a);
  a.fill(0x77);
  pool.give(a);
  const b = pool.take(4096);
  assert.equal(address(b), at);
  assert.ok(b.every((x) => x === 0x77), "reused buffer is the same memory");
  pool.give(b);
});

Deno.test("BufferPool sizes in the same class share buffers", () => {
  using pool = new BufferPool();
  // 5000 and 8192 are both in the 8 KiB class; 12 KiB goes to the 16 KiB class.
  const a = pool.take(5000);
  const at = address(a);
  pool.give(a);
  const b = pool.take(8192);
  assert.equal(address(b), at);
  assert.equal(b.length, 8192);
  pool.give(b);
  const c = pool.take(6000);
  assert.equal(address(c), at);
  assert.equal(c.length, 6000);
  pool.give(c);
  const d = pool.take(12_288);
  assert.notEqual(address(d), at);
  assert.equal(d.length, 12_288);
  pool.give(d);
});

Deno.test("BufferPool outstanding counts buffers taken and not given back", () => {
  using pool = new BufferPool();
  assert.equal(pool.outstanding, 0);
  const bufs = [pool.take(4096), pool.take(10_000), pool.take(300_000)];
  assert.equal(pool.outstanding, 3);
  pool.give(bufs.pop()!);
  assert.equal(pool.outstanding, 2);
  for (const b of bufs) pool.give(b);
  assert.equal(pool.outstanding, 0);
});

Deno.test("BufferPool buffers taken together do not overlap", () => {
  using pool = new BufferPool();
  const sizes = [4096, 4096, 5000, 8192, 12_288, 4096, 70_000, 3, 16_384];
  const taken = [];
  // Enough 4 KiB buffers to need a second slab (a slab is 4 MiB).
  for (let i = 0; i < 1100; i++) sizes.push(4096);
  for (const size of sizes) {
    const buf = pool.take(size);
    buf.fill(taken.length & 0xff);
    taken.push(buf);
  }
  const ranges = taken.map((b) => [address(b), address(b) + b.length] as const)
    .sort((x, y) => x[0] - y[0]);
  for (let i = 1; i < ranges.length; i++) {
    assert.ok(ranges[i][0] >= ranges[i - 1][1], `buffers ${i - 1} and ${i} overlap`);
  }
  taken.forEach((b, i) =>
    assert.ok(b.every((x) => x === (i & 0xff)), `buffer ${i} was overwritten`)
  );
  for (const b of taken) pool.give(b);
  assert.equal(pool.outstanding, 0);
});

Deno.test("BufferPool serves buffers larger than a slab", () => {
  using pool = new BufferPool();
  const big = pool.take(6 * 1024 * 1024 + 1);
  assert.equal(big.length, 6 * 1024 * 1024 + 1);
  assert.equal(address(big) % 4096, 0);
  big[big.length - 1] = 9;
  assert.equal(big[big.length - 1], 9);
  pool.give(big);
  const again = pool.take(7 * 1024 * 1024);
  assert.equal(address(again), address(big));
  pool.give(again);
});

Deno.test("BufferPool can be used again after dispose", () => {
  const pool = new BufferPool();
  pool.give(pool.take(4096));
  pool[Symbol.dispose]();
  const buf = pool.take(4096);
  assert.equal(address(buf) % 4096, 0);
  buf.fill(1);
  pool.give(buf);
  pool[Symbol.dispose]();
  pool[Symbol.dispose]();
});

Deno.test("sharedPool is a BufferPool", () => {
  assert.ok(sharedPool instanceof BufferPool);
  const before = sharedPool.outstanding;
  const buf = sharedPool.take(8192);
  assert.equal(address(buf) % 4096, 0);
  assert.equal(sharedPool.outstanding, before + 1);
  sharedPool.give(buf);
  assert.equal(sharedPool.outstanding, before);
});
