import assert from "node:assert/strict";
import { HUGE_SLOTS, SLOT_SIZE, SlotPool } from "../../fuse/slots.ts";
import { addressOf } from "../../ffi/memory.ts";
import { MAX_IO } from "../../fuse/protocol.ts";

const HUGE_PAGE = 2 * 1024 * 1024;

Deno.test("slot pool: large requests get huge-page slots, small ones plain slots, each kind lending to the other at its cap", () => {
  using pool = new SlotPool(5, 3);
  const large = [pool.take(true)!, pool.take(true)!, pool.take(true)!];
  assert.deepEqual(large.map((s) => s.huge), [true, true, true]);
  const small = [pool.take(false)!, pool.take(false)!];
  assert.deepEqual(small.map((s) => s.huge), [false, false]);
  assert.equal(pool.take(true), null);
  assert.equal(pool.take(false), null);
  assert.equal(pool.busy, 5);

  // No two slots share a byte; every data area is page-aligned and holds the largest request.
  const all = [...large, ...small];
  const spans = all.map((s) => [addressOf(s.bytes)!, addressOf(s.bytes)! + s.bytes.length])
    .sort((a, b) => a[0] - b[0]);
  for (let i = 1; i < spans.length; i++) assert.ok(spans[i][0] >= spans[i - 1][1]);
  for (const s of all) {
    assert.equal(s.bytes.length, SLOT_SIZE);
    assert.equal(addressOf(s.data(MAX_IO))! % 4096, 0);
    assert.equal(s.data(MAX_IO).length, MAX_IO);
  }
  // A huge slot's data area crosses at most one huge-page boundary (two contiguous pieces).
  for (const s of large) {
    const start = addressOf(s.data(MAX_IO))!;
    const pages = Math.floor((start + MAX_IO - 1) / HUGE_PAGE) - Math.floor(start / HUGE_PAGE);
    assert.ok(pages <= 1, `data area over ${pages + 1} huge pages`);
  }

  // Freed slots go to requests of their kind first, then to the other kind.
  pool.give(large[1]);
  pool.give(small[0]);
  assert.equal(pool.take(false), small[0]);
  assert.equal(pool.take(false), large[1]);
  pool.give(small[1]);
  assert.equal(pool.take(true), small[1]);

  // Slots keep separate memory.
  large[0].data(8).fill(7);
  small[1].data(8).fill(9);
  assert.deepEqual([...large[0].data(8)], Array(8).fill(7));
});

Deno.test("slot pool: the huge-page block stays bounded, and a small pool is all huge slots", () => {
  assert.ok(HUGE_SLOTS * SLOT_SIZE <= 40 * 1024 * 1024);
  using pool = new SlotPool(2);
  const a = pool.take(false)!, b = pool.take(false)!;
  assert.ok(a.huge && b.huge);
  assert.equal(pool.take(false), null);
});
