/**
 * Reusable 4 KiB-aligned I/O buffers for O_DIRECT. Buffers come in power-of-two size classes
 * carved from 4 MiB slabs aligned to and advised for 2 MiB transparent huge pages (so a buffer is
 * physically contiguous and a 1 MiB request is one segment for the device); `take` hands out a
 * view of exactly the size asked for, `give` returns it. Slabs live until the pool is disposed.
 */
import { AlignedMemory } from "../ffi/memory.ts";

const MIN_CLASS = 4096;
const SLAB_SIZE = 4 * 1024 * 1024;
const HUGE_PAGE = 2 * 1024 * 1024;

/** The memory a buffer of `size` bytes takes from the pool: its power-of-two size class. */
export function pooledSize(size: number): number {
  let c = MIN_CLASS;
  while (c < size) c *= 2;
  return c;
}

export class BufferPool implements Disposable {
  #slabs: AlignedMemory[] = [];
  #free = new Map<number, Uint8Array<ArrayBuffer>[]>();
  #out = 0;

  /** A buffer of `size` bytes (contents undefined), aligned to 4 KiB. */
  take(size: number): Uint8Array<ArrayBuffer> {
    const cls = pooledSize(size);
    let list = this.#free.get(cls);
    if (list === undefined) this.#free.set(cls, list = []);
    if (list.length === 0) this.#grow(cls, list);
    this.#out++;
    const chunk = list.pop()!;
    return size === cls ? chunk : chunk.subarray(0, size);
  }

  /** Returns a buffer obtained from `take`. */
  give(buf: Uint8Array<ArrayBuffer>): void {
    const cls = pooledSize(buf.length);
    const chunk = buf.length === cls ? buf : new Uint8Array(buf.buffer, buf.byteOffset, cls);
    this.#free.get(cls)!.push(chunk);
    this.#out--;
  }

  /** Buffers taken and not yet given back. */
  get outstanding(): number {
    return this.#out;
  }

  #grow(cls: number, list: Uint8Array<ArrayBuffer>[]): void {
    const slab = new AlignedMemory(Math.max(cls, SLAB_SIZE), HUGE_PAGE, { hugePages: true });
    this.#slabs.push(slab);
    for (let off = 0; off + cls <= slab.bytes.length; off += cls) {
      list.push(slab.bytes.subarray(off, off + cls));
    }
  }

  [Symbol.dispose](): void {
    for (const slab of this.#slabs) slab[Symbol.dispose]();
    this.#slabs = [];
    this.#free.clear();
  }
}

/** The process-wide pool (lives as long as the process). */
export const sharedPool: BufferPool = new BufferPool();
