/**
 * What every image-format driver does around its own read planning: settling a request's parts
 * together, and turning a scatter list (whose pieces may start or end inside a sector) into
 * whole-sector reads.
 */
import type { Buffers } from "../io/engine.ts";
import { sharedPool } from "../io/buffer_pool.ts";

const SECTOR = 512;

/**
 * Waits for every promise, then fails with the first error: no request is left running (and no
 * buffer handed back while the kernel still uses it) when one of its parts fails.
 */
export function settleAll(parts: Promise<unknown>[]): Promise<void> {
  if (parts.length === 1) return parts[0] as Promise<void>; // the usual case: no extra tick
  return Promise.allSettled(parts).then((results) => {
    for (const r of results) if (r.status === "rejected") throw r.reason;
  });
}

/**
 * Reads `bufs` (in order) from `offset` with `readInto`, which takes sector-aligned ranges only:
 * a piece that starts or ends inside a sector is read through a pool buffer of whole sectors.
 */
export function readScattered(
  offset: number,
  bufs: Buffers,
  readInto: (offset: number, target: Uint8Array) => Promise<void>,
): Promise<void> {
  if (bufs instanceof Uint8Array) return readInto(offset, bufs);
  let pos = offset;
  const parts: Promise<void>[] = [];
  for (const b of bufs) {
    parts.push(readPiece(pos, b, readInto));
    pos += b.length;
  }
  return settleAll(parts);
}

async function readPiece(
  offset: number,
  target: Uint8Array,
  readInto: (offset: number, target: Uint8Array) => Promise<void>,
): Promise<void> {
  if (offset % SECTOR === 0 && target.length % SECTOR === 0) return readInto(offset, target);
  const start = Math.floor(offset / SECTOR) * SECTOR;
  const end = Math.ceil((offset + target.length) / SECTOR) * SECTOR;
  const tmp = sharedPool.take(end - start);
  try {
    await readInto(start, tmp.subarray(0, end - start));
    target.set(tmp.subarray(offset - start, offset - start + target.length));
  } finally {
    sharedPool.give(tmp);
  }
}

/**
 * Writes `bufs` (in order) at `offset` with `writeFrom`, which takes one contiguous source: a
 * scatter list is gathered into a pool buffer first.
 */
export async function writeGathered(
  offset: number,
  bufs: Buffers,
  writeFrom: (offset: number, src: Uint8Array) => Promise<void>,
): Promise<void> {
  if (bufs instanceof Uint8Array) return writeFrom(offset, bufs);
  const total = bufs.reduce((n, b) => n + b.length, 0);
  const tmp = sharedPool.take(total);
  try {
    let o = 0;
    for (const b of bufs) {
      tmp.set(b, o);
      o += b.length;
    }
    await writeFrom(offset, tmp.subarray(0, total));
  } finally {
    sharedPool.give(tmp);
  }
}
