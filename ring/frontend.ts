/**
 * A blkif frontend in TypeScript for the local ring (docs/ring.md): attaches to `tapd tapdisk`,
 * and offers read/write/flush/discard on the remote disk. Used by the tests and by
 * `tapd bench --ring unix:PATH`. Requests larger than 11 pages are split; at most 32 are in
 * flight (the ring's size), the rest wait.
 */
import { EventFd, type FileHandle } from "../ffi/file.ts";
import { fullBarrier, Mapping } from "../ffi/memory.ts";
import { connectUnix, receiveWithFds } from "../ffi/socket.ts";
import {
  BLKIF_LAYOUT as L,
  BLKIF_OP_DISCARD,
  BLKIF_OP_FLUSH_DISKCACHE,
  BLKIF_OP_READ,
  BLKIF_OP_WRITE,
  BLKIF_RSP_OKAY,
} from "./blkif.ts";
import { ATTACH_MAGIC, ATTACH_SIZE, ATTACH_VERSION, FLAG_READ_ONLY } from "./local.ts";

const SECTOR = 512;
const SLOT_BYTES = L.MAX_SEGMENTS * L.PAGE_SIZE;

export class RingFrontendError extends Error {
  override name = "RingFrontendError";
}

export class RingFrontend {
  readonly size: number;
  readonly readOnly: boolean;
  readonly #conn: FileHandle;
  readonly #map: Mapping;
  readonly #words: Uint32Array;
  readonly #view: DataView;
  readonly #data: Uint8Array;
  readonly #kick: EventFd;
  readonly #notify: EventFd;
  #reqProdPvt = 0;
  #rspCons = 0;
  readonly #free: number[] = [];
  readonly #waiting: Array<(slot: number) => void> = [];
  readonly #pending = new Map<number, (status: number) => void>();
  #reaping = false; // a #wait loop is running
  #closed = false;

  constructor(path: string) {
    this.#conn = connectUnix(path);
    try {
      const { data, fds } = receiveWithFds(this.#conn, ATTACH_SIZE);
      const v = new DataView(data.buffer, data.byteOffset, data.length);
      if (
        data.length !== ATTACH_SIZE ||
        new TextDecoder().decode(data.subarray(0, 8)) !== ATTACH_MAGIC
      ) {
        throw new RingFrontendError(`${path}: not a tapd ring socket`);
      }
      if (v.getUint32(8, true) !== ATTACH_VERSION || fds.length !== 3) {
        throw new RingFrontendError(`${path}: unsupported attach message`);
      }
      const ringPages = v.getUint32(12, true), dataPages = v.getUint32(16, true);
      this.size = Number(v.getBigUint64(24, true)) * SECTOR;
      this.readOnly = (v.getUint32(36, true) & FLAG_READ_ONLY) !== 0;
      const [mem, kick, notify] = fds;
      this.#map = new Mapping(mem.fd, (ringPages + dataPages) * L.PAGE_SIZE, {
        what: "ring memory",
      });
      mem.close();
      this.#kick = EventFd.adopt(kick);
      this.#notify = EventFd.adopt(notify);
      this.#words = new Uint32Array(this.#map.bytes.buffer, 0, L.PAGE_SIZE / 4);
      this.#view = new DataView(this.#map.bytes.buffer, 0, L.PAGE_SIZE);
      this.#data = this.#map.bytes.subarray(ringPages * L.PAGE_SIZE);
      for (let i = 0; i < L.RING_SIZE; i++) this.#free.push(i);
    } catch (e) {
      this.#conn.close();
      throw e;
    }
  }

  async read(offset: number, buf: Uint8Array): Promise<void> {
    await this.#split(offset, buf, BLKIF_OP_READ);
  }

  async write(offset: number, buf: Uint8Array): Promise<void> {
    await this.#split(offset, buf, BLKIF_OP_WRITE);
  }

  async flush(): Promise<void> {
    const slot = await this.#slot();
    try {
      this.#check(await this.#submit(slot, BLKIF_OP_FLUSH_DISKCACHE, 0, 0), "flush");
    } finally {
      this.#release(slot);
    }
  }

  async discard(offset: number, length: number): Promise<void> {
    const slot = await this.#slot();
    try {
      this.#check(
        await this.#submit(slot, BLKIF_OP_DISCARD, offset / SECTOR, length / SECTOR),
        "discard",
      );
    } finally {
      this.#release(slot);
    }
  }

  #split(offset: number, buf: Uint8Array, op: number): Promise<void[]> {
    const parts: Promise<void>[] = [];
    for (let done = 0; done < buf.length; done += SLOT_BYTES) {
      parts.push(
        this.#io(offset + done, buf.subarray(done, Math.min(buf.length, done + SLOT_BYTES)), op),
      );
    }
    return Promise.all(parts);
  }

  async #io(offset: number, buf: Uint8Array, op: number): Promise<void> {
    if (offset % SECTOR !== 0 || buf.length % SECTOR !== 0) {
      throw new RingFrontendError(`unaligned request: ${buf.length} bytes at ${offset}`);
    }
    const slot = await this.#slot();
    try {
      if (this.#closed) throw new RingFrontendError("the frontend is closed");
      const pages = this.#data.subarray(slot * SLOT_BYTES, slot * SLOT_BYTES + buf.length);
      if (op === BLKIF_OP_WRITE) pages.set(buf);
      const status = await this.#submit(slot, op, offset / SECTOR, buf.length / SECTOR);
      this.#check(status, op === BLKIF_OP_READ ? "read" : "write");
      if (op === BLKIF_OP_READ) buf.set(pages);
    } finally {
      // Only now may another request use these pages: the response may have been consumed
      // well before this continuation runs (even inside #submit, when the backend is quick).
      this.#release(slot);
    }
  }

  #check(status: number, what: string): void {
    if (status !== BLKIF_RSP_OKAY) throw new RingFrontendError(`${what} failed: status ${status}`);
  }

  /** Gives a slot to the next request waiting for one, or back to the free list. */
  #release(slot: number): void {
    const waiter = this.#waiting.shift();
    if (waiter !== undefined) waiter(slot);
    else this.#free.push(slot);
  }

  #slot(): Promise<number> | number {
    const slot = this.#free.pop();
    if (slot !== undefined) return slot;
    return new Promise<number>((resolve) => this.#waiting.push(resolve));
  }

  /**
   * Puts one request in the ring: for read/write, `count` sectors in the slot's own pages
   * (segment s = page slot × 11 + s); for discard, `count` sectors; flush ignores both.
   */
  #submit(slot: number, op: number, sector: number, count: number): Promise<number> {
    if (this.#closed) return Promise.reject(new RingFrontendError("the frontend is closed"));
    const v = this.#view;
    const base = L.RING_OFFSET + (this.#reqProdPvt & (L.RING_SIZE - 1)) * L.ENTRY_SIZE;
    this.#reqProdPvt = (this.#reqProdPvt + 1) >>> 0;
    new Uint8Array(v.buffer, base, L.ENTRY_SIZE).fill(0);
    v.setUint8(base + L.OFF_OPERATION, op);
    v.setUint32(base + L.OFF_ID, slot, true);
    v.setUint32(base + L.OFF_SECTOR_NUMBER, sector % 0x100000000, true);
    v.setUint32(base + L.OFF_SECTOR_NUMBER + 4, Math.floor(sector / 0x100000000), true);
    if (op === BLKIF_OP_DISCARD) {
      v.setUint32(base + L.OFF_DISCARD_NR_SECTORS, count % 0x100000000, true);
      v.setUint32(base + L.OFF_DISCARD_NR_SECTORS + 4, Math.floor(count / 0x100000000), true);
    } else if (op === BLKIF_OP_READ || op === BLKIF_OP_WRITE) {
      const segs = Math.ceil(count / 8);
      v.setUint8(base + L.OFF_NR_SEGMENTS, segs);
      for (let s = 0; s < segs; s++) {
        const at = base + L.OFF_SEG + s * L.SEGMENT_SIZE;
        v.setUint32(at + L.OFF_SEG_GREF, slot * L.MAX_SEGMENTS + s, true);
        v.setUint8(at + L.OFF_SEG_FIRST_SECT, 0);
        v.setUint8(at + L.OFF_SEG_LAST_SECT, Math.min(8, count - s * 8) - 1);
      }
    }
    const done = new Promise<number>((resolve) => this.#pending.set(slot, resolve));
    // RING_PUSH_REQUESTS_AND_CHECK_NOTIFY
    const w = this.#words;
    const old = Atomics.load(w, L.OFF_REQ_PROD / 4), next = this.#reqProdPvt;
    Atomics.store(w, L.OFF_REQ_PROD / 4, next);
    fullBarrier();
    const event = Atomics.load(w, L.OFF_REQ_EVENT / 4);
    if (((next - event) >>> 0) < ((next - old) >>> 0)) this.#kick.signal();
    if (!this.#reaping) {
      // Set before the call: the loop may finish before returning (the response can already be
      // there: the backend is another process).
      this.#reaping = true;
      this.#wait().catch(() => {
        // The notify eventfd failed (closed under us): fail what is outstanding.
        for (const resolve of this.#pending.values()) resolve(-1);
        this.#pending.clear();
      });
    }
    return done;
  }

  /** Consumes responses while requests are outstanding; sleeps on the notify eventfd. */
  async #wait(): Promise<void> {
    const w = this.#words, v = this.#view;
    try {
      while (this.#pending.size > 0) {
        const prod = Atomics.load(w, L.OFF_RSP_PROD / 4);
        while (this.#rspCons !== prod) {
          const base = L.RING_OFFSET + (this.#rspCons & (L.RING_SIZE - 1)) * L.ENTRY_SIZE;
          this.#rspCons = (this.#rspCons + 1) >>> 0;
          const slot = v.getUint32(base + L.OFF_RSP_ID, true);
          const status = v.getInt16(base + L.OFF_RSP_STATUS, true);
          const resolve = this.#pending.get(slot);
          this.#pending.delete(slot);
          resolve?.(status); // its request releases the slot once done with the pages
        }
        if (this.#pending.size === 0) break;
        // RING_FINAL_CHECK_FOR_RESPONSES
        Atomics.store(w, L.OFF_RSP_EVENT / 4, (this.#rspCons + 1) >>> 0);
        fullBarrier();
        if (Atomics.load(w, L.OFF_RSP_PROD / 4) !== this.#rspCons) continue;
        await this.#notify.wait();
        // Closed while asleep: the ring memory is gone, touching it would be a use-after-free.
        if (this.#closed) throw new RingFrontendError("the frontend was closed");
      }
    } finally {
      this.#reaping = false;
    }
  }

  /** Detaches (tapdisk finishes what is in flight and forgets the ring). */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    for (const resolve of this.#pending.values()) resolve(-1);
    this.#pending.clear();
    this.#conn.close();
    this.#map[Symbol.dispose]();
    this.#kick[Symbol.dispose]();
    this.#notify[Symbol.dispose]();
  }
}
