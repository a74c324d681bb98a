/** PageSegments: the local ring's data pages as buffers, merged where they continue each other. */
import assert from "node:assert/strict";
import { PageSegments } from "../../ring/segments.ts";

const PAGE = 4096;

function pages(n: number): Uint8Array {
  const data = new Uint8Array(n * PAGE);
  for (let p = 0; p < n; p++) data.fill(p + 1, p * PAGE, (p + 1) * PAGE);
  return data;
}

Deno.test("segments: pages that continue each other become one buffer, others stay apart", () => {
  const data = pages(8), s = new PageSegments(data);
  // Pages 2, 3 (whole) and the first half of 4: one buffer over all three.
  const one = s.acquire(new Uint32Array([2, 0, 7, 3, 0, 7, 4, 0, 3]), 3);
  assert.ok(one instanceof Uint8Array);
  assert.equal(one.length, 2 * PAGE + 2048);
  assert.equal(one.byteOffset, 2 * PAGE);
  // The second half of page 5, then page 6: contiguous in memory, so merged too.
  const tail = s.acquire(new Uint32Array([5, 4, 7, 6, 0, 7]), 2);
  assert.ok(tail instanceof Uint8Array);
  assert.equal(tail.byteOffset, 5 * PAGE + 2048);
  assert.equal(tail.length, 2048 + PAGE);
  // Page 1, then page 0, then part of page 0 again: three buffers, in request order.
  const apart = s.acquire(new Uint32Array([1, 0, 7, 0, 0, 7, 0, 2, 2]), 3);
  assert.ok(Array.isArray(apart));
  assert.deepEqual(apart.map((b) => [b.byteOffset, b.length]), [
    [PAGE, PAGE],
    [0, PAGE],
    [1024, 512],
  ]);
  assert.throws(() => s.acquire(new Uint32Array([8, 0, 7]), 1), /no data page 8/);
});

Deno.test("segments: indirect descriptor pages, offered or not, checked, copied when several", () => {
  const data = pages(8);
  assert.throws(
    () => new PageSegments(data).indirectPages(new Uint32Array([1]), 1),
    /not offered/,
  );
  const s = new PageSegments(data, 256);
  const single = s.indirectPages(new Uint32Array([3]), 1);
  assert.equal(single.byteOffset, 3 * PAGE);
  assert.equal(single.length, PAGE);
  const two = s.indirectPages(new Uint32Array([6, 2]), 2);
  assert.equal(two.length, 2 * PAGE);
  assert.ok(two.subarray(0, PAGE).every((b) => b === 7));
  assert.ok(two.subarray(PAGE).every((b) => b === 3));
  assert.throws(() => s.indirectPages(new Uint32Array([1, 8]), 2), /no data page 8/);
});
