/**
 * A blkif frontend in TypeScript for the local ring (docs/ring.md): attaches to `tapd tapdisk`,
 * and offers read/write/flush/discard on the remote disk. Used by the tests and by
 * `tapd bench --ring unix:PATH`. Ring entry i owns a fixed run of data pages; requests of up
 * to 11 pages go direct, larger ones (up to 64 pages) INDIRECT, larger still are split. As many
 * requests as the ring has entries are in flight; the rest wait.
 */
import { setImmediate } from "node:timers";
import { EventFd, type FileHandle } from "../ffi/file.ts";
import { fullBarrier, Mapping } from "../ffi/memory.ts";
import { connectUnix, receiveWithFds } from "../ffi/socket.ts";
import { PollWindow } from "../io/poll_window.ts";
import {
  BLKIF_LAYOUT as L,
  BLKIF_OP_DISCARD,
  BLKIF_OP_FLUSH_DISKCACHE,
  BLKIF_OP_INDIRECT,
  BLKIF_OP_READ,
  BLKIF_OP_WRITE,
  BLKIF_RSP_OKAY,
  ringEntries,
} from "./blkif.ts";
import { ATTACH_MAGIC, ATTACH_SIZE, ATTACH_VERSION, FLAG_READ_ONLY } from "./local.ts";

const SECTOR = 512;
/** The most data pages one request of this frontend carries (with one descriptor page). */
const MAX_SLOT_PAGES = 64;

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
  readonly #ringBytes: Uint8Array;
  readonly #entries: number;
  /** Data pages per ring entry, and how many of them carry data (the last may hold descriptors). */
  readonly #stride: number;
  readonly #slotPages: number;
  readonly #indirect: boolean;
  readonly #slotBytes: number;
  readonly #data: Uint8Array;
  readonly #kick: EventFd;
  readonly #notify: EventFd;
  #reqProdPvt = 0;
  #rspCons = 0;
  readonly #free: number[] = [];
  readonly #waiting: Array<(slot: number) => void> = [];
  readonly #pending: Array<((status: number) => void) | undefined>;
  #outstanding = 0;
  #reaping = false; // responses are being looked for, or the notify eventfd is being waited on
  #closed = false;

  /** Keeps looking for responses for a while after the last one before sleeping. */
  readonly #poll: PollWindow | null;

  /**
   * Attaches to the tapdisk listening at `path`. `pollMicros`: keep looking for responses that
   * long after the last one before sleeping on the notify eventfd; CPU for latency, as the
   * engines' `--poll-us`.
   */
  constructor(path: string, options: { pollMicros?: number } = {}) {
    this.#poll = options.pollMicros ? new PollWindow(options.pollMicros) : null;
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
      const maxIndirect = v.getUint32(44, true);
      this.size = Number(v.getBigUint64(24, true)) * SECTOR;
      this.readOnly = (v.getUint32(36, true) & FLAG_READ_ONLY) !== 0;
      const [mem, kick, notify] = fds;
      if (ringPages < 1 || ringPages > 16) {
        for (const fd of fds) fd.close();
        throw new RingFrontendError(`${path}: a ring of ${ringPages} pages`);
      }
      const ringBytes = ringPages * L.PAGE_SIZE;
      this.#entries = ringEntries(ringBytes);
      this.#stride = Math.floor(dataPages / this.#entries);
      this.#indirect = maxIndirect > L.MAX_SEGMENTS && this.#stride > L.MAX_SEGMENTS + 1;
      this.#slotPages = this.#indirect
        ? Math.min(this.#stride - 1, maxIndirect, MAX_SLOT_PAGES)
        : Math.min(this.#stride, L.MAX_SEGMENTS);
      if (this.#slotPages < 1) {
        for (const fd of fds) fd.close();
        throw new RingFrontendError(
          `${path}: ${dataPages} data pages for ${this.#entries} entries`,
        );
      }
      this.#slotBytes = this.#slotPages * L.PAGE_SIZE;
      this.#map = new Mapping(mem.fd, (ringPages + dataPages) * L.PAGE_SIZE, {
        what: "ring memory",
      });
      mem.close();
      this.#kick = EventFd.adopt(kick);
      this.#notify = EventFd.adopt(notify);
      this.#words = new Uint32Array(this.#map.bytes.buffer, 0, L.RING_OFFSET / 4);
      this.#view = new DataView(this.#map.bytes.buffer, 0, ringBytes);
      this.#ringBytes = this.#map.bytes.subarray(0, ringBytes);
      this.#data = this.#map.bytes.subarray(ringBytes);
      this.#pending = new Array(this.#entries);
      for (let i = this.#entries - 1; i >= 0; i--) this.#free.push(i);
    } catch (e) {
      this.#conn.close();
      throw e;
    }
  }

  read(offset: number, buf: Uint8Array): Promise<void> {
    return this.#split(offset, buf, BLKIF_OP_READ);
  }

  write(offset: number, buf: Uint8Array): Promise<void> {
    return this.#split(offset, buf, BLKIF_OP_WRITE);
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

  /** One request when it fits a slot (the usual case: no array, no Promise.all), else several. */
  #split(offset: number, buf: Uint8Array, op: number): Promise<void> {
    const step = this.#slotBytes;
    if (buf.length === 0) return Promise.resolve();
    if (buf.length <= step) return this.#io(offset, buf, op);
    const parts: Promise<void>[] = [];
    for (let done = 0; done < buf.length; done += step) {
      parts.push(
        this.#io(offset + done, buf.subarray(done, Math.min(buf.length, done + step)), op),
      );
    }
    return Promise.all(parts).then(() => {});
  }

  async #io(offset: number, buf: Uint8Array, op: number): Promise<void> {
    if (offset % SECTOR !== 0 || buf.length % SECTOR !== 0) {
      throw new RingFrontendError(`unaligned request: ${buf.length} bytes at ${offset}`);
    }
    const slot = this.#free.pop() ?? await this.#slot();
    try {
      if (this.#closed) throw new RingFrontendError("the frontend is closed");
      const at = slot * this.#stride * L.PAGE_SIZE;
      const pages = this.#data.subarray(at, at + buf.length);
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
   * (direct, or INDIRECT with its descriptors in the slot's last page); for discard, `count`
   * sectors; flush ignores both.
   */
  #submit(slot: number, op: number, sector: number, count: number): Promise<number> {
    if (this.#closed) return Promise.reject(new RingFrontendError("the frontend is closed"));
    const v = this.#view;
    const base = L.RING_OFFSET + (this.#reqProdPvt & (this.#entries - 1)) * L.ENTRY_SIZE;
    this.#reqProdPvt = (this.#reqProdPvt + 1) >>> 0;
    this.#ringBytes.fill(0, base, base + L.ENTRY_SIZE);
    v.setUint32(base + L.OFF_ID, slot, true);
    v.setUint32(base + L.OFF_SECTOR_NUMBER, sector % 0x100000000, true);
    v.setUint32(base + L.OFF_SECTOR_NUMBER + 4, Math.floor(sector / 0x100000000), true);
    const segs = Math.ceil(count / 8), firstPage = slot * this.#stride;
    if (op === BLKIF_OP_DISCARD) {
      v.setUint8(base + L.OFF_OPERATION, op);
      v.setUint32(base + L.OFF_DISCARD_NR_SECTORS, count % 0x100000000, true);
      v.setUint32(base + L.OFF_DISCARD_NR_SECTORS + 4, Math.floor(count / 0x100000000), true);
    } else if ((op === BLKIF_OP_READ || op === BLKIF_OP_WRITE) && segs > L.MAX_SEGMENTS) {
      const table = firstPage + this.#stride - 1;
      v.setUint8(base + L.OFF_OPERATION, BLKIF_OP_INDIRECT);
      v.setUint8(base + L.OFF_INDIRECT_OP, op);
      v.setUint16(base + L.OFF_INDIRECT_NR_SEGMENTS, segs, true);
      v.setUint32(base + L.OFF_INDIRECT_GREFS, table, true);
      const d = new DataView(this.#data.buffer, this.#data.byteOffset + table * L.PAGE_SIZE);
      for (let s = 0; s < segs; s++) {
        const at = s * L.SEGMENT_SIZE;
        d.setUint32(at + L.OFF_SEG_GREF, firstPage + s, true);
        d.setUint8(at + L.OFF_SEG_FIRST_SECT, 0);
        d.setUint8(at + L.OFF_SEG_LAST_SECT, Math.min(8, count - s * 8) - 1);
      }
    } else {
      v.setUint8(base + L.OFF_OPERATION, op);
      if (op === BLKIF_OP_READ || op === BLKIF_OP_WRITE) {
        v.setUint8(base + L.OFF_NR_SEGMENTS, segs);
        for (let s = 0; s < segs; s++) {
          const at = base + L.OFF_SEG + s * L.SEGMENT_SIZE;
          v.setUint32(at + L.OFF_SEG_GREF, firstPage + s, true);
          v.setUint8(at + L.OFF_SEG_FIRST_SECT, 0);
          v.setUint8(at + L.OFF_SEG_LAST_SECT, Math.min(8, count - s * 8) - 1);
        }
      }
    }
    const done = new Promise<number>((resolve) => this.#pending[slot] = resolve);
    this.#outstanding++;
    // RING_PUSH_REQUESTS_AND_CHECK_NOTIFY
    const w = this.#words;
    const old = Atomics.load(w, L.OFF_REQ_PROD / 4), next = this.#reqProdPvt;
    Atomics.store(w, L.OFF_REQ_PROD / 4, next);
    fullBarrier();
    const event = Atomics.load(w, L.OFF_REQ_EVENT / 4);
    if (((next - event) >>> 0) < ((next - old) >>> 0)) this.#kick.signal();
    if (!this.#reaping) {
      this.#reaping = true;
      queueMicrotask(this.#look);
    }
    return done;
  }

  /**
   * Hands out responses one per microtask, so that the request each one's continuation issues
   * is in the ring before the next response is looked at; with none there, sleeps on the
   * notify eventfd (after RING_FINAL_CHECK_FOR_RESPONSES) while requests are outstanding.
   */
  #look = (): void => {
    if (this.#closed) {
      this.#reaping = false;
      return;
    }
    const w = this.#words, v = this.#view;
    if (this.#rspCons !== Atomics.load(w, L.OFF_RSP_PROD / 4)) {
      const base = L.RING_OFFSET + (this.#rspCons & (this.#entries - 1)) * L.ENTRY_SIZE;
      this.#rspCons = (this.#rspCons + 1) >>> 0;
      const slot = v.getUint32(base + L.OFF_RSP_ID, true);
      const status = v.getInt16(base + L.OFF_RSP_STATUS, true);
      const resolve = slot < this.#entries ? this.#pending[slot] : undefined;
      if (resolve !== undefined) {
        this.#pending[slot] = undefined;
        this.#outstanding--;
        resolve(status); // its request releases the slot once done with the pages
      }
      this.#poll?.touch();
      if (++this.#run < 256) queueMicrotask(this.#look);
      else {
        this.#run = 0;
        setImmediate(this.#look);
      }
      return;
    }
    this.#run = 0;
    if (this.#outstanding === 0) {
      this.#reaping = false;
      return;
    }
    if (this.#poll?.keepLooking()) {
      this.#poll.schedule(this.#look);
      return;
    }
    // RING_FINAL_CHECK_FOR_RESPONSES
    Atomics.store(w, L.OFF_RSP_EVENT / 4, (this.#rspCons + 1) >>> 0);
    fullBarrier();
    if (Atomics.load(w, L.OFF_RSP_PROD / 4) !== this.#rspCons) {
      queueMicrotask(this.#look);
      return;
    }
    this.#notify.wait().then(this.#look, this.#failAll);
  };

  /** The notify eventfd failed (closed under us): fail what is outstanding. */
  #failAll = (): void => {
    this.#reaping = false;
    this.#fail();
  };

  #run = 0;

  #fail(): void {
    for (let i = 0; i < this.#entries; i++) {
      const resolve = this.#pending[i];
      this.#pending[i] = undefined;
      resolve?.(-1);
    }
    this.#outstanding = 0;
  }

  /** Detaches (tapdisk finishes what is in flight and forgets the ring). */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#fail();
    this.#conn.close();
    this.#map[Symbol.dispose]();
    this.#kick[Symbol.dispose]();
    this.#notify[Symbol.dispose]();
  }
}
