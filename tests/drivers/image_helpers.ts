/**
 * Helpers shared by the image-format driver tests (qcow, vmdk, vhd): random writes through tapd
 * that a reference buffer receives too.
 */
import type { Disk } from "../../drivers/disk.ts";
import { sharedPool } from "../../io/buffer_pool.ts";
import type { Rng } from "../util.ts";
import { type Range, SECTOR } from "./qcow/helpers.ts";

const overlaps = (a: Range, b: Range) =>
  a.offset < b.offset + b.length && b.offset < a.offset + a.length;

/**
 * `count` random writes through tapd (at least; batches are whole), in concurrent batches of up
 * to 8 non-overlapping ranges from `pick` (some written as scatter-gather lists, some from pool
 * memory); `ref` receives the same writes. `pick` draws its ranges from `r` too.
 */
export async function randomWriteBatches(
  disk: Disk,
  ref: Uint8Array,
  r: Rng,
  count: number,
  pick: () => Range,
): Promise<void> {
  for (let done = 0; done < count;) {
    const ranges: Range[] = [];
    for (let tries = 0; ranges.length < 8 && tries < 32; tries++) {
      const x = pick();
      if (!ranges.some((y) => overlaps(x, y))) ranges.push(x);
    }
    done += ranges.length;
    await Promise.all(ranges.map(async ({ offset, length }) => {
      const data = r.fill(new Uint8Array(length));
      ref.set(data, offset);
      const sectors = length / SECTOR;
      if (sectors >= 2 && r.below(3) === 0) {
        const cut = (1 + r.below(sectors - 1)) * SECTOR;
        await disk.write(offset, [data.subarray(0, cut), data.subarray(cut)]);
      } else if (r.below(2) === 0) {
        const buf = sharedPool.take(length);
        try {
          buf.set(data);
          await disk.write(offset, buf);
        } finally {
          sharedPool.give(buf);
        }
      } else await disk.write(offset, data);
    }));
  }
}
