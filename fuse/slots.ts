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
 * Slots are allocated on first use, up to a cap; a slot is free again once its request has been
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
const SLOT_SIZE = DATA + DATA_ROOM;

export class Slot {
  readonly #memory: AlignedMemory;
  /** The whole slot. */
  readonly bytes: Uint8Array<ArrayBuffer>;
  readonly view: DataView;
  /** Where requests are read (its length is what the kernel may fill). */
  readonly readArea: Uint8Array<ArrayBuffer>;

  constructor() {
    this.#memory = new AlignedMemory(SLOT_SIZE, 4096);
    this.bytes = this.#memory.bytes;
    this.view = new DataView(this.bytes.buffer, this.bytes.byteOffset, this.bytes.byteLength);
    this.readArea = this.bytes.subarray(READ_AT);
  }

  /** The data area, `length` bytes from DATA (at most MAX_IO + 8 KiB). */
  data(length: number): Uint8Array<ArrayBuffer> {
    return this.bytes.subarray(DATA, DATA + length);
  }

  [Symbol.dispose](): void {
    this.#memory[Symbol.dispose]();
  }
}

/** A bounded set of slots, allocated lazily. */
export class SlotPool implements Disposable {
  readonly #all: Slot[] = [];
  readonly #free: Slot[] = [];
  readonly #cap: number;
  #waiters: (() => void)[] = [];

  constructor(cap: number) {
    this.#cap = cap;
  }

  /** A free slot, or null when `cap` are in use. */
  take(): Slot | null {
    const slot = this.#free.pop();
    if (slot !== undefined) return slot;
    if (this.#all.length >= this.#cap) return null;
    const fresh = new Slot();
    this.#all.push(fresh);
    return fresh;
  }

  give(slot: Slot): void {
    this.#free.push(slot);
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
    return this.#all.length - this.#free.length;
  }

  [Symbol.dispose](): void {
    for (const slot of this.#all) slot[Symbol.dispose]();
    this.#all.length = 0;
    this.#free.length = 0;
  }
}
