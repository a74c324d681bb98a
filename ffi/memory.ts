/**
 * Foreign memory the kernel can address: page-aligned heap blocks (posix_memalign) and mappings
 * (mmap). Each is wrapped once in an ArrayBuffer view; the address of any byte of such a view is
 * found with `addressOf()` without an FFI call, so the I/O engines can hand it to the kernel.
 */
import { check, SysError } from "./errno.ts";
import { libc } from "./libc.ts";
import { MADV_HUGEPAGE, MAP_SHARED, PROT_READ, PROT_WRITE } from "./constants.ts";

const bases = new WeakMap<ArrayBufferLike, number>();

/** The address of a view's first byte, or null when the view is not over registered memory. */
export function addressOf(view: ArrayBufferView): number | null {
  const base = bases.get(view.buffer);
  return base === undefined ? null : base + view.byteOffset;
}

function wrap(p: Deno.PointerObject, size: number): Uint8Array<ArrayBuffer> {
  const buffer = Deno.UnsafePointerView.getArrayBuffer(p, size);
  bases.set(buffer, Number(Deno.UnsafePointer.value(p)));
  return new Uint8Array(buffer);
}

/**
 * A view over memory owned elsewhere (the kernel's aio completion ring, a library's buffer),
 * made once: valid only while the owner keeps it mapped.
 */
export function foreignMemory(address: bigint, size: number): ArrayBuffer {
  const p = Deno.UnsafePointer.create(address);
  if (p === null) throw new RangeError("Cannot view memory at address 0");
  return Deno.UnsafePointerView.getArrayBuffer(p, size);
}

const barrierWord = new Int32Array(1);

/**
 * A full memory barrier (a store is not reordered with a later load), for memory shared with
 * another process. JS Atomics on a non-shared ArrayBuffer (which foreign memory is) carry no
 * cross-process guarantee, so the barrier is glibc's pthread_spin_trylock: one `lock cmpxchg`.
 */
export function fullBarrier(): void {
  libc.pthread_spin_trylock(barrierWord);
}

// Safety net: memory dropped without dispose is reported (tests turn this into a failure).
const leaks = new FinalizationRegistry<string>((what) => {
  leakCount++;
  console.error(`tapd: leaked ${what} (not disposed)`);
});
let leakCount = 0;

/** How many foreign blocks were garbage-collected without being disposed. */
export function leakedBlocks(): number {
  return leakCount;
}

/** A block of `size` bytes aligned to `alignment` from posix_memalign; dispose frees it. */
export class AlignedMemory implements Disposable {
  /** The memory. Never touch it after dispose. */
  readonly bytes: Uint8Array<ArrayBuffer>;
  /** The address of bytes[0]. */
  readonly address: number;
  #ptr: Deno.PointerObject | null;

  /**
   * `hugePages` asks for transparent huge pages (madvise; best effort): physically contiguous
   * buffers let a large O_DIRECT request reach the device in few segments, without being split.
   */
  constructor(size: number, alignment = 4096, options: { hugePages?: boolean } = {}) {
    if (!(size > 0)) throw new RangeError(`Cannot allocate ${size} bytes`);
    const out = new BigUint64Array(1);
    const rc = libc.posix_memalign(out, BigInt(alignment), BigInt(size));
    if (rc !== 0) throw new SysError(rc, "posix_memalign");
    this.#ptr = Deno.UnsafePointer.create(out[0])!;
    if (options.hugePages) libc.madvise(this.#ptr, BigInt(size), MADV_HUGEPAGE);
    this.bytes = wrap(this.#ptr, size);
    this.address = Number(out[0]);
    leaks.register(this, `${size}-byte aligned block`, this);
  }

  [Symbol.dispose](): void {
    if (this.#ptr === null) return;
    leaks.unregister(this);
    libc.free(this.#ptr);
    this.#ptr = null;
  }
}

/** A mapping from mmap; dispose unmaps it. */
export class Mapping implements Disposable {
  readonly bytes: Uint8Array<ArrayBuffer>;
  readonly address: number;
  readonly size: number;
  #ptr: Deno.PointerObject | null;

  /** Maps `size` bytes of `fd` at `offset` (shared, read-write unless `prot` says otherwise). */
  constructor(
    fd: number,
    size: number,
    options: { offset?: number; prot?: number; flags?: number; what?: string } = {},
  ) {
    const prot = options.prot ?? (PROT_READ | PROT_WRITE);
    const flags = options.flags ?? MAP_SHARED;
    const p = libc.mmap(null, BigInt(size), prot, flags, fd, BigInt(options.offset ?? 0));
    // MAP_FAILED is (void *)-1.
    if (p === null || Deno.UnsafePointer.value(p) === 0xffffffffffffffffn) {
      check(-1, "mmap", options.what);
    }
    this.#ptr = p!;
    this.size = size;
    this.bytes = wrap(this.#ptr, size);
    this.address = Number(Deno.UnsafePointer.value(this.#ptr));
    leaks.register(this, `${size}-byte mapping`, this);
  }

  [Symbol.dispose](): void {
    if (this.#ptr === null) return;
    leaks.unregister(this);
    check(libc.munmap(this.#ptr, BigInt(this.size)), "munmap");
    this.#ptr = null;
  }
}
