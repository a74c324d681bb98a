/**
 * Replies of one connection, coalesced: headers and small payloads are encoded straight into a
 * staging buffer; large payloads go out as their own write, without a copy. Everything queued
 * while one socket write is in progress leaves in the next, so a burst of completions costs one
 * system call. Whole messages only: replies never interleave mid-chunk.
 */
import {
  REPLY_FLAG_DONE,
  REPLY_TYPE,
  SIMPLE_REPLY_MAGIC,
  STRUCTURED_REPLY_MAGIC,
} from "./protocol.ts";

export interface WritableConn {
  write(p: Uint8Array): Promise<number>;
}

/** Payloads up to this size are copied into the staging buffer. */
const COPY_LIMIT = 64 * 1024;
const STAGING = 1024 * 1024;
/** Staging buffers kept for reuse (more are allocated only under a burst). */
const KEEP_STAGING = 4;

/** A request's cookie: 8 opaque bytes kept as two u32s (no bigint per request). */
export interface Cookie {
  hi: number;
  lo: number;
}

export class ReplyWriter {
  readonly #conn: WritableConn;
  #staging = new Uint8Array(STAGING);
  /** Staging buffers whose bytes have been written, ready for reuse. */
  readonly #free: Uint8Array<ArrayBuffer>[] = [];
  #view = new DataView(this.#staging.buffer);
  #fill = 0;
  /** Start of the staged bytes not yet in #parts. */
  #mark = 0;
  #parts: Uint8Array[] = [];
  #after: (() => void)[] = [];
  #writing = false;
  #broken = false;
  /** Bytes in #parts, and bytes being written now. */
  #queued = 0;
  #inWrite = 0;
  #idle: (() => void) | null = null;

  constructor(conn: WritableConn) {
    this.#conn = conn;
  }

  /** Bytes accepted and not yet written to the socket. */
  get pendingBytes(): number {
    return this.#queued + this.#inWrite + this.#fill - this.#mark;
  }

  /** False once a write failed (the peer is gone). */
  get alive(): boolean {
    return !this.#broken;
  }

  /** A simple reply (16 bytes) with an optional payload (READ data). */
  simple(cookie: Cookie, error: number, data?: Uint8Array, after?: () => void): void {
    const v = this.#room(16, data);
    v.setUint32(this.#fill, SIMPLE_REPLY_MAGIC);
    v.setUint32(this.#fill + 4, error);
    this.#cookie(this.#fill + 8, cookie);
    this.#fill += 16;
    this.#payload(data, after);
  }

  /**
   * A structured chunk: `fields` is its fixed payload head (written by `head` into `size`
   * bytes), then optional `data`.
   */
  chunk(
    cookie: Cookie,
    done: boolean,
    type: number,
    headSize: number,
    head: ((v: DataView, at: number) => void) | null,
    data?: Uint8Array,
    after?: () => void,
  ): void {
    const v = this.#room(20 + headSize, data);
    v.setUint32(this.#fill, STRUCTURED_REPLY_MAGIC);
    v.setUint16(this.#fill + 4, done ? REPLY_FLAG_DONE : 0);
    v.setUint16(this.#fill + 6, type);
    this.#cookie(this.#fill + 8, cookie);
    v.setUint32(this.#fill + 16, headSize + (data?.length ?? 0));
    if (head !== null) head(v, this.#fill + 20);
    this.#fill += 20 + headSize;
    this.#payload(data, after);
  }

  /** NBD_REPLY_TYPE_NONE with DONE. */
  none(cookie: Cookie): void {
    this.chunk(cookie, true, REPLY_TYPE.NONE, 0, null);
  }

  /** An error chunk (with DONE unless `done` is false). */
  error(cookie: Cookie, error: number, message: string, done = true): void {
    const text = new TextEncoder().encode(message.slice(0, 1024));
    this.chunk(cookie, done, REPLY_TYPE.ERROR, 6 + text.length, (v, at) => {
      v.setUint32(at, error);
      v.setUint16(at + 4, text.length);
      new Uint8Array(v.buffer, at + 6, text.length).set(text);
    });
  }

  /** Resolves when everything queued so far has been written (or the connection broke). */
  drained(): Promise<void> {
    if (!this.#writing && this.#fill === this.#mark && this.#parts.length === 0) {
      return Promise.resolve();
    }
    return new Promise((resolve) => {
      const previous = this.#idle;
      this.#idle = () => {
        previous?.();
        resolve();
      };
    });
  }

  #cookie(at: number, cookie: Cookie): void {
    this.#view.setUint32(at, cookie.hi);
    this.#view.setUint32(at + 4, cookie.lo);
  }

  /** Makes room for `bytes` of header (and a small payload) in the staging buffer. */
  #room(bytes: number, data?: Uint8Array): DataView {
    const need = bytes + (data !== undefined && data.length <= COPY_LIMIT ? data.length : 0);
    if (this.#fill + need > this.#staging.length) {
      this.#cut();
      // The old buffer stays referenced by #parts until written; continue in another one.
      this.#switchStaging();
    }
    return this.#view;
  }

  #payload(data: Uint8Array | undefined, after: (() => void) | undefined): void {
    if (data !== undefined && data.length > 0) {
      if (data.length <= COPY_LIMIT) {
        this.#staging.set(data, this.#fill);
        this.#fill += data.length;
        after?.();
        after = undefined;
      } else {
        this.#cut();
        this.#parts.push(data);
        this.#queued += data.length;
      }
    }
    if (after !== undefined) this.#after.push(after);
    if (!this.#writing) {
      this.#writing = true;
      queueMicrotask(this.#drain);
    }
  }

  /** Moves on to a free staging buffer; the current one is returned to #free after its write. */
  #switchStaging(): void {
    this.#retire.push(this.#staging);
    this.#staging = this.#free.pop() ?? new Uint8Array(STAGING);
    this.#view = new DataView(this.#staging.buffer);
    this.#fill = this.#mark = 0;
  }

  /** Staging buffers in #parts, free again once those are written. */
  #retire: Uint8Array<ArrayBuffer>[] = [];

  /** A structured OFFSET_DATA chunk with DONE: READ data at `offset`. */
  data(cookie: Cookie, offset: number, data: Uint8Array, after?: () => void): void {
    const v = this.#room(28, data);
    const at = this.#fill;
    v.setUint32(at, STRUCTURED_REPLY_MAGIC);
    v.setUint16(at + 4, REPLY_FLAG_DONE);
    v.setUint16(at + 6, REPLY_TYPE.OFFSET_DATA);
    this.#cookie(at + 8, cookie);
    v.setUint32(at + 16, 8 + data.length);
    v.setUint32(at + 20, Math.floor(offset / 0x100000000));
    v.setUint32(at + 24, offset >>> 0);
    this.#fill += 28;
    this.#payload(data, after);
  }

  /** Moves the staged bytes into #parts. */
  #cut(): void {
    if (this.#fill > this.#mark) {
      this.#parts.push(this.#staging.subarray(this.#mark, this.#fill));
      this.#queued += this.#fill - this.#mark;
    }
    this.#mark = this.#fill;
  }

  #drain = async (): Promise<void> => {
    while (!this.#broken) {
      this.#cut();
      if (this.#parts.length === 0) break;
      const parts = this.#parts;
      const after = this.#after;
      this.#parts = [];
      this.#after = [];
      // New replies go to another staging buffer while these bytes are being written.
      this.#switchStaging();
      const retired = this.#retire;
      this.#retire = [];
      this.#inWrite = this.#queued;
      this.#queued = 0;
      try {
        for (const part of parts) await this.#writeAll(part);
      } catch {
        this.#broken = true;
      }
      this.#inWrite = 0;
      for (const f of after) f();
      for (const b of retired) if (this.#free.length < KEEP_STAGING) this.#free.push(b);
    }
    if (this.#broken) {
      for (const f of this.#after) f();
      this.#after = [];
      this.#parts = [];
      this.#fill = this.#mark = this.#queued = 0;
    }
    this.#writing = false;
    const idle = this.#idle;
    this.#idle = null;
    idle?.();
  };

  async #writeAll(bytes: Uint8Array): Promise<void> {
    for (let done = 0; done < bytes.length;) {
      done += await this.#conn.write(bytes.subarray(done));
    }
  }
}
