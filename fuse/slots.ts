/**
 * Request slots: one block of registered, page-aligned memory per request in flight, laid out so
 * that nothing is copied on the data path.
 *
 *   0 … DATA-80   unused (room for a READ reply's header when the data starts late)
 *   DATA-80       a request is read here: 40-byte fuse_in_header + 40-byte fuse_write_in, so a
 *                 WRITE's data lands at DATA, page-aligned, and goes to the disk as it is
 *   DATA          READ data is read here from the disk; its reply header goes just before it
 *                 and header + data leave in one write(2)
 *
 * Up to HUGE_SLOTS slots are packed into memory advised for 2 MiB transparent huge pages, so a
 * slot's data area spans at most two physically contiguous pieces: a 1 MiB request is then one or
 * two segments for the disk instead of 256 (this VM's virtio disk has no indirect descriptors, so
 * 256 segments fill its queue), and the kernel pins two pages, not 256, when it copies the request
 * in or the reply out (docs/performance.md). Large requests take those; small ones take slots of
 * ordinary pages, since a huge page is all resident once touched and random small requests
 * measured slower from them.
 * Slots are made on first use, up to a cap; a slot is free again once its request has been
 * answered.
 */
import { AlignedMemory } from "../ffi/memory.ts";
import { MAX_IO, WRITE_DATA_OFFSET } from "./protocol.ts";

/** Where a slot's data area starts. */
export const DATA = 4096;
/** Where a request is read into a slot. */
export const READ_AT = DATA - WRITE_DATA_OFFSET;
/** Room after DATA: the largest request, plus two sectors of slack for unaligned reads. */
const DATA_ROOM = MAX_IO + 2 * 4096;
export const SLOT_SIZE = DATA + DATA_ROOM;
/** Slots in huge pages at most (~33 MiB once all have been used). */
export const HUGE_SLOTS = 32;
const HUGE_PAGE = 2 * 1024 * 1024;
/** A READ or WRITE of at least this many bytes is a large request (SlotPool.take). */
export const LARGE_REQUEST = 64 * 1024;

export class Slot {
  /** The slot's own memory; null for a slot inside the pool's huge-page block. */
  readonly #memory: AlignedMemory | null;
  /** The whole slot. */
  readonly bytes: Uint8Array<ArrayBuffer>;
  readonly view: DataView;
  /** Where requests are read (its length is what the kernel may fill). */
  readonly readArea: Uint8Array<ArrayBuffer>;

  /** A slot over `bytes` (SLOT_SIZE long, page-aligned) of the pool's block, or its own memory. */
  constructor(bytes?: Uint8Array<ArrayBuffer>) {
    this.#memory = bytes === undefined ? new AlignedMemory(SLOT_SIZE, 4096) : null;
    this.bytes = bytes ?? this.#memory!.bytes;
    this.view = new DataView(this.bytes.buffer, this.bytes.byteOffset, this.bytes.byteLength);
    this.readArea = this.bytes.subarray(READ_AT);
  }

  /** The slot lies in the pool's huge-page block. */
  get huge(): boolean {
    return this.#memory === null;
  }

  /** The data area, `length` bytes from DATA (at most MAX_IO + 8 KiB). */
  data(length: number): Uint8Array<ArrayBuffer> {
    return this.bytes.subarray(DATA, DATA + length);
  }

  [Symbol.dispose](): void {
    this.#memory?.[Symbol.dispose]();
  }
}

/** A bounded set of slots, made lazily: huge-page ones for large requests, plain for small. */
export class SlotPool implements Disposable {
  readonly #all: Slot[] = [];
  readonly #free: Slot[] = [];
  readonly #hugeFree: Slot[] = [];
  readonly #cap: number;
  readonly #hugeCap: number;
  #huge: AlignedMemory | null = null;
  #hugeMade = 0;
  #waiters: (() => void)[] = [];

  constructor(cap: number, hugeSlots = HUGE_SLOTS) {
    this.#cap = cap;
    this.#hugeCap = Math.min(cap, hugeSlots);
  }

  /**
   * A free slot, or null when `cap` are in use. `large`: the request will likely carry much
   * data (the session goes by the last one), so a huge-page slot is wanted; small requests take
   * plain slots first (random 4 KiB reads through a loop device measured ~4% slower from huge
   * ones).
   */
  take(large: boolean): Slot | null {
    const [first, second] = large ? [this.#hugeFree, this.#free] : [this.#free, this.#hugeFree];
    return first.pop() ?? this.#make(large) ?? second.pop() ?? this.#make(!large);
  }

  give(slot: Slot): void {
    (slot.huge ? this.#hugeFree : this.#free).push(slot);
    const waiters = this.#waiters;
    if (waiters.length > 0) {
      this.#waiters = [];
      for (const wake of waiters) wake();
    }
  }

  /** Resolves once a slot has been given back. */
  freed(): Promise<void> {
    return new Promise((resolve) => this.#waiters.push(resolve));
  }

  /** Slots in use. */
  get busy(): number {
    return this.#all.length - this.#free.length - this.#hugeFree.length;
  }

  /** A new slot of the kind asked for, or null when that kind (or the pool) is at its cap. */
  #make(huge: boolean): Slot | null {
    if (this.#all.length >= this.#cap) return null;
    const plain = this.#all.length - this.#hugeMade;
    if (huge ? this.#hugeMade >= this.#hugeCap : plain >= this.#cap - this.#hugeCap) return null;
    const slot = huge ? this.#hugeSlot(this.#hugeMade++) : new Slot();
    this.#all.push(slot);
    return slot;
  }

  /** Slot `i` of the huge-page block (reserved on first use; pages become resident as used). */
  #hugeSlot(i: number): Slot {
    if (this.#huge === null) {
      const size = Math.ceil(this.#hugeCap * SLOT_SIZE / HUGE_PAGE) * HUGE_PAGE;
      this.#huge = new AlignedMemory(size, HUGE_PAGE, { hugePages: true });
    }
    return new Slot(this.#huge.bytes.subarray(i * SLOT_SIZE, (i + 1) * SLOT_SIZE));
  }

  [Symbol.dispose](): void {
    for (const slot of this.#all) slot[Symbol.dispose]();
    this.#all.length = 0;
    this.#free.length = 0;
    this.#hugeFree.length = 0;
    this.#huge?.[Symbol.dispose]();
    this.#huge = null;
  }
}
