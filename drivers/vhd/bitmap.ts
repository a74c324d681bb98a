/**
 * A block's sector bitmap (shared/specs/formats.md §4.6): bit `i` is sector `i` of the block,
 * most significant bit first. Set: the sector is in this file; clear: zeros, or the parent's.
 */

export function bitSet(bm: Uint8Array, i: number): boolean {
  return (bm[i >> 3] & (0x80 >> (i & 7))) !== 0;
}

/** How many sectors from `from` (at most `max`) share the bit of sector `from`. */
export function runLength(bm: Uint8Array, from: number, max: number): number {
  const value = bitSet(bm, from);
  let n = 1;
  while (n < max) {
    const i = from + n;
    if ((i & 7) === 0 && n + 8 <= max && bm[i >> 3] === (value ? 0xff : 0)) {
      n += 8;
      continue;
    }
    if (bitSet(bm, i) !== value) break;
    n++;
  }
  return n;
}

/** Whether sectors [from, from + count) are all set. */
export function allSet(bm: Uint8Array, from: number, count: number): boolean {
  return bitSet(bm, from) && runLength(bm, from, count) === count;
}

/** Sets sectors [from, from + count). */
export function setBits(bm: Uint8Array, from: number, count: number): void {
  for (let i = from; i < from + count; i++) bm[i >> 3] |= 0x80 >> (i & 7);
}

/** Whether the first `sectors` bits are all set. */
export function isFull(bm: Uint8Array, sectors: number): boolean {
  return allSet(bm, 0, sectors);
}
