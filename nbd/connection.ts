/**
 * One client in the transmission phase (protocols.md §6–§11). Every request in a received chunk
 * is parsed and started at once (the engine batches them), replies go out in completion order
 * through a ReplyWriter. Memory is bounded: a client may have at most MAX_INFLIGHT requests and
 * MAX_INFLIGHT_BYTES of buffers in flight; beyond that, the server stops reading its socket
 * until replies have been sent.
 */
import type { Extent } from "../drivers/driver.ts";
import { DiskError } from "../drivers/errors.ts";
import type { BlockTarget } from "../drivers/target.ts";
import { SysError } from "../ffi/errno.ts";
import { type BufferPool, sharedPool } from "../io/buffer_pool.ts";
import type { Logger } from "../cli/log.ts";
import type { Negotiated } from "./handshake.ts";
import {
  BASE_ALLOCATION_ID,
  CMD,
  CMD_FLAG,
  MAX_REQUEST,
  NBD_ERR,
  REPLY_TYPE,
  REQUEST_MAGIC,
  STATE_HOLE,
  STATE_ZERO,
} from "./protocol.ts";
import type { SocketReader } from "./reader.ts";
import type { Cookie, ReplyWriter } from "./reply_writer.ts";

const MAX_INFLIGHT = 256;
const MAX_INFLIGHT_BYTES = 64 * 1024 * 1024;
/** Structured reads at least this long ask the disk for holes first and send them as holes. */
const SPARSE_READ_MIN = 128 * 1024;
/** Block-status descriptors in one reply at most. */
const MAX_DESCRIPTORS = 4096;
/** A block-status descriptor's length is a u32; we keep them to 2 GiB. */
const MAX_EXTENT = 0x80000000;

/** Flags each command accepts (FUA is accepted everywhere; clients set it loosely). */
const ALLOWED_FLAGS: Readonly<Record<number, number>> = {
  [CMD.READ]: CMD_FLAG.FUA | CMD_FLAG.DF,
  [CMD.WRITE]: CMD_FLAG.FUA,
  [CMD.DISC]: 0xffff,
  [CMD.FLUSH]: CMD_FLAG.FUA,
  [CMD.TRIM]: CMD_FLAG.FUA,
  [CMD.CACHE]: CMD_FLAG.FUA,
  [CMD.WRITE_ZEROES]: CMD_FLAG.FUA | CMD_FLAG.NO_HOLE | CMD_FLAG.FAST_ZERO,
  [CMD.BLOCK_STATUS]: CMD_FLAG.FUA | CMD_FLAG.REQ_ONE,
};

/** The NBD error value for an error from a disk. */
export function nbdError(e: unknown): number {
  const errno = e instanceof DiskError || e instanceof SysError ? e.errno : 5;
  switch (errno) {
    case 1:
    case 13:
    case 30:
      return NBD_ERR.EPERM;
    case 22:
      return NBD_ERR.EINVAL;
    case 27: // EFBIG
    case 28:
    case 122: // EDQUOT
      return NBD_ERR.ENOSPC;
    case 95:
      return NBD_ERR.ENOTSUP;
    case 12:
      return NBD_ERR.ENOMEM;
    default:
      return NBD_ERR.EIO;
  }
}

class RequestError extends Error {
  readonly error: number;
  constructor(error: number, message: string) {
    super(message);
    this.error = error;
  }
}

export class Connection {
  readonly #target: BlockTarget;
  readonly #reader: SocketReader;
  readonly #writer: ReplyWriter;
  readonly #nego: Negotiated;
  readonly #readOnly: boolean;
  readonly #log: Logger;
  readonly #pool: BufferPool;
  #inflight = 0;
  #inflightBytes = 0;
  #wake: (() => void) | null = null;
  #stopping = false;
  /** Requests served, for the log. */
  requests = 0;

  constructor(
    target: BlockTarget,
    reader: SocketReader,
    writer: ReplyWriter,
    nego: Negotiated,
    readOnly: boolean,
    log: Logger,
    pool: BufferPool = sharedPool,
  ) {
    this.#target = target;
    this.#reader = reader;
    this.#writer = writer;
    this.#nego = nego;
    this.#readOnly = readOnly;
    this.#log = log;
    this.#pool = pool;
  }

  /** Stops reading requests; those in flight are still answered. */
  stop(): void {
    this.#stopping = true;
    this.#reader.abort();
  }

  /**
   * Reads and starts requests until DISC, end of stream or a fatal protocol error; resolves
   * once every started request has been answered.
   */
  async serve(): Promise<void> {
    const reader = this.#reader;
    for (;;) {
      if (reader.buffered < 28 && !await reader.fill(28)) break;
      const v = reader.view, at = reader.position;
      if (v.getUint32(at) !== REQUEST_MAGIC) {
        this.#log.warn("bad request magic: closing the connection");
        break;
      }
      const flags = v.getUint16(at + 4);
      const type = v.getUint16(at + 6);
      const cookie: Cookie = { hi: v.getUint32(at + 8), lo: v.getUint32(at + 12) };
      // Offsets past 2^53 are out of range anyway; keep them as such.
      const offset = v.getUint32(at + 16) * 0x100000000 + v.getUint32(at + 20);
      const length = v.getUint32(at + 24);
      reader.take(28);
      if (type === CMD.DISC) break;
      this.requests++;
      const proceed = type === CMD.WRITE
        ? await this.#write(cookie, flags, offset, length)
        : this.#command(cookie, type, flags, offset, length);
      if (!proceed) break;
      if (this.#inflight >= MAX_INFLIGHT || this.#inflightBytes > MAX_INFLIGHT_BYTES) {
        await this.#settle((n, bytes) => n < MAX_INFLIGHT && bytes <= MAX_INFLIGHT_BYTES);
      }
      // A client that does not read its replies stops being read from, too.
      if (this.#writer.pendingBytes > MAX_INFLIGHT_BYTES) await this.#writer.drained();
    }
    await this.#settle((n) => n === 0);
    await this.#writer.drained();
  }

  /** Waits until `ok(requests, bytes)` holds for what is in flight. */
  async #settle(ok: (requests: number, bytes: number) => boolean): Promise<void> {
    while (!ok(this.#inflight, this.#inflightBytes)) {
      await new Promise<void>((resolve) => this.#wake = resolve);
    }
  }

  #begin(bytes: number): void {
    this.#inflight++;
    this.#inflightBytes += bytes;
  }

  #end = (bytes: number): void => {
    this.#inflight--;
    this.#inflightBytes -= bytes;
    const wake = this.#wake;
    if (wake !== null) {
      this.#wake = null;
      wake();
    }
  };

  /** Answers an error the right way for the command and the negotiated reply style. */
  #fail(cookie: Cookie, error: number, message: string): void {
    this.#log.debug("request failed", { error, message });
    if (this.#nego.structuredReplies) this.#writer.error(cookie, error, message);
    else this.#writer.simple(cookie, error);
  }

  #ok(cookie: Cookie): void {
    this.#writer.simple(cookie, 0);
  }

  /** Reads a WRITE's payload (always, even when refusing it) and starts it; false = hang up. */
  async #write(cookie: Cookie, flags: number, offset: number, length: number): Promise<boolean> {
    if (length > MAX_REQUEST) {
      this.#log.warn("write payload too large: closing the connection", { length });
      return false;
    }
    const refusal = this.#stopping
      ? new RequestError(NBD_ERR.ESHUTDOWN, "server is shutting down")
      : (flags & ~ALLOWED_FLAGS[CMD.WRITE]) !== 0
      ? new RequestError(NBD_ERR.EINVAL, `invalid flags 0x${flags.toString(16)} for WRITE`)
      : this.#readOnly
      ? new RequestError(NBD_ERR.EPERM, "the export is read-only")
      : this.#rangeError(offset, length, NBD_ERR.ENOSPC);
    if (refusal !== null) {
      if (!await this.#reader.skip(length)) return false;
      this.#fail(cookie, refusal.error, refusal.message);
      return true;
    }
    if (length === 0) {
      this.#ok(cookie);
      return true;
    }
    const buf = this.#pool.take(length);
    const data = buf.length === length ? buf : buf.subarray(0, length);
    if (!await this.#reader.readInto(data)) {
      this.#pool.give(buf);
      return false;
    }
    this.#begin(length);
    const written = (e: unknown): void => {
      this.#pool.give(buf);
      if (e === null) this.#ok(cookie);
      else this.#fail(cookie, nbdError(e), (e as Error).message);
      this.#end(length);
    };
    if ((flags & CMD_FLAG.FUA) !== 0) {
      this.#target.write(offset, data).then(() => this.#target.flush()).then(
        () => written(null),
        written,
      );
    } else {
      this.#target.submit(true, offset, data, written);
    }
    return true;
  }

  /** Starts any command without payload; false = hang up. */
  #command(cookie: Cookie, type: number, flags: number, offset: number, length: number): boolean {
    const allowed = ALLOWED_FLAGS[type];
    let refusal: RequestError | null = null;
    if (this.#stopping) refusal = new RequestError(NBD_ERR.ESHUTDOWN, "server is shutting down");
    else if (allowed === undefined) {
      refusal = new RequestError(NBD_ERR.EINVAL, `unknown command ${type}`);
    } else if ((flags & ~allowed) !== 0) {
      refusal = new RequestError(NBD_ERR.EINVAL, `invalid flags 0x${flags.toString(16)}`);
    } else if ((flags & CMD_FLAG.DF) !== 0 && !this.#nego.structuredReplies) {
      refusal = new RequestError(NBD_ERR.EINVAL, "DF needs structured replies");
    }
    if (refusal !== null) {
      this.#fail(cookie, refusal.error, refusal.message);
      return true;
    }
    switch (type) {
      case CMD.READ:
        this.#read(cookie, flags, offset, length);
        break;
      case CMD.FLUSH:
        if (offset !== 0 || length !== 0) {
          this.#fail(cookie, NBD_ERR.EINVAL, "FLUSH takes no offset or length");
        } else this.#run(cookie, 0, this.#target.flush());
        break;
      case CMD.TRIM:
      case CMD.WRITE_ZEROES:
        this.#zero(cookie, type, flags, offset, length);
        break;
      case CMD.CACHE: {
        const error = this.#rangeError(offset, length, NBD_ERR.EINVAL);
        if (error !== null) this.#fail(cookie, error.error, error.message);
        else this.#ok(cookie);
        break;
      }
      case CMD.BLOCK_STATUS:
        this.#blockStatus(cookie, flags, offset, length);
        break;
    }
    return true;
  }

  /** Out of range or misaligned, as the error to answer; null if fine. */
  #rangeError(offset: number, length: number, pastEnd: number): RequestError | null {
    const sector = this.#target.info.logicalSectorSize;
    if (offset % sector !== 0 || length % sector !== 0) {
      return new RequestError(
        NBD_ERR.EINVAL,
        `offset ${offset} and length ${length} must be multiples of ${sector}`,
      );
    }
    if (offset + length > this.#target.size) {
      return new RequestError(
        pastEnd,
        `${length} bytes at ${offset} go past the end of the export (${this.#target.size} bytes)`,
      );
    }
    return null;
  }

  #run(cookie: Cookie, bytes: number, work: Promise<unknown>): void {
    this.#begin(bytes);
    work.then(
      () => this.#ok(cookie),
      (e) => this.#fail(cookie, nbdError(e), (e as Error).message),
    ).finally(() => this.#end(bytes));
  }

  #zero(cookie: Cookie, type: number, flags: number, offset: number, length: number): void {
    const zeroes = type === CMD.WRITE_ZEROES;
    const error = this.#readOnly
      ? new RequestError(NBD_ERR.EPERM, "the export is read-only")
      : this.#rangeError(offset, length, zeroes ? NBD_ERR.ENOSPC : NBD_ERR.EINVAL);
    if (error !== null) return this.#fail(cookie, error.error, error.message);
    if (length === 0) return this.#ok(cookie);
    const noHole = (flags & CMD_FLAG.NO_HOLE) !== 0;
    if (
      zeroes && (flags & CMD_FLAG.FAST_ZERO) !== 0 &&
      (noHole || this.#target.info.backing !== null)
    ) {
      // Zeroing without unmapping, or over a backing file, may mean writing every byte.
      return this.#fail(cookie, NBD_ERR.ENOTSUP, "zeroing this range would not be fast");
    }
    const target = this.#target;
    let work = zeroes
      ? target.writeZeroes(offset, length, { mayUnmap: !noHole })
      : target.discard(offset, length);
    if ((flags & CMD_FLAG.FUA) !== 0) work = work.then(() => target.flush());
    this.#run(cookie, 0, work);
  }

  #read(cookie: Cookie, flags: number, offset: number, length: number): void {
    if (length > MAX_REQUEST) {
      return this.#fail(cookie, NBD_ERR.EINVAL, `READ of ${length} bytes is too large`);
    }
    const error = this.#rangeError(offset, length, NBD_ERR.EINVAL);
    if (error !== null) return this.#fail(cookie, error.error, error.message);
    const structured = this.#nego.structuredReplies;
    if (length === 0) {
      if (structured) this.#writer.none(cookie);
      else this.#ok(cookie);
      return;
    }
    const buf = this.#pool.take(length);
    const data = buf.length === length ? buf : buf.subarray(0, length);
    const release = () => this.#pool.give(buf);
    this.#begin(length);
    if (structured && length >= SPARSE_READ_MIN && (flags & CMD_FLAG.DF) === 0) {
      this.#sparseRead(cookie, offset, data).catch((e) => {
        this.#fail(cookie, nbdError(e), (e as Error).message);
      }).finally(() => {
        release();
        this.#end(length);
      });
      return;
    }
    this.#target.submit(false, offset, data, (e) => {
      if (e === null) {
        if (structured) this.#writer.data(cookie, offset, data, release);
        else this.#writer.simple(cookie, 0, data, release);
      } else {
        release();
        this.#fail(cookie, nbdError(e), e.message);
      }
      this.#end(length);
    });
  }

  /** The disk's extents covering exactly [offset, end). */
  async #extents(offset: number, end: number): Promise<Extent[]> {
    const extents: Extent[] = [];
    for (let pos = offset; pos < end;) {
      const got = await this.#target.blockStatus(pos, end - pos);
      for (const e of got) {
        const length = Math.min(e.length, end - e.offset);
        if (length > 0) extents.push({ ...e, length });
      }
      const next = got[got.length - 1].offset + got[got.length - 1].length;
      if (next <= pos) throw new DiskError("EIO", `block status made no progress at ${pos}`);
      pos = next;
    }
    return extents;
  }

  /**
   * A structured read that also asks the disk where its holes are, and sends those as
   * OFFSET_HOLE chunks. Resolves only once every data chunk has left `data` (copied
   * into the staging buffer or written to the socket): the caller then releases the buffer.
   */
  async #sparseRead(cookie: Cookie, offset: number, data: Uint8Array): Promise<void> {
    // The whole range is read while the map is asked for, so that the map costs no latency
    // (holes read cheaply: no device I/O); a failing map just means no holes are reported.
    const [, mapped] = await Promise.all([
      this.#target.read(offset, data),
      this.#extents(offset, offset + data.length).catch(() => null),
    ]);
    const extents = mapped ?? [{ offset, length: data.length, allocated: true, zero: false }];
    // Merge neighbours of the same kind, then send; the last chunk carries DONE and, through
    // `after`, keeps the buffer alive until its bytes have been written.
    const runs: { offset: number; length: number; zero: boolean }[] = [];
    for (const e of extents) {
      const last = runs[runs.length - 1];
      if (last !== undefined && last.zero === e.zero) last.length += e.length;
      else runs.push({ offset: e.offset, length: e.length, zero: e.zero });
    }
    await new Promise<void>((resolve) => {
      // One count for queueing itself: a small chunk is copied (and `written` called) at once,
      // which must not release the buffer while later chunks still point into it.
      let pending = 1;
      const written = () => {
        if (--pending === 0) resolve();
      };
      runs.forEach((run, i) => {
        const done = i === runs.length - 1;
        if (run.zero) {
          this.#writer.chunk(cookie, done, REPLY_TYPE.OFFSET_HOLE, 12, (v, at) => {
            v.setBigUint64(at, BigInt(run.offset));
            v.setUint32(at + 8, run.length);
          });
        } else {
          pending++;
          const start = run.offset - offset;
          this.#writer.chunk(
            cookie,
            done,
            REPLY_TYPE.OFFSET_DATA,
            8,
            (v, at) => v.setBigUint64(at, BigInt(run.offset)),
            data.subarray(start, start + run.length),
            written,
          );
        }
      });
      written();
    });
  }

  #blockStatus(cookie: Cookie, flags: number, offset: number, length: number): void {
    if (!this.#nego.structuredReplies || !this.#nego.blockStatus) {
      return this.#fail(cookie, NBD_ERR.EINVAL, "base:allocation was not negotiated");
    }
    const size = this.#target.size, sector = this.#target.info.logicalSectorSize;
    if (length === 0 || offset % sector !== 0 || offset + length > size) {
      return this.#fail(
        cookie,
        NBD_ERR.EINVAL,
        `block status of ${length} bytes at ${offset} is misaligned or past the end (${size})`,
      );
    }
    const reqOne = (flags & CMD_FLAG.REQ_ONE) !== 0;
    const span = Math.min(Math.ceil(length / sector) * sector, size - offset, MAX_EXTENT);
    this.#begin(0);
    this.#target.blockStatus(offset, span).then((extents) => {
      const descriptors: { length: number; flags: number }[] = [];
      for (const e of extents) {
        const state = e.zero ? (e.allocated ? STATE_ZERO : STATE_HOLE | STATE_ZERO) : 0;
        const last = descriptors[descriptors.length - 1];
        if (last !== undefined && last.flags === state && last.length + e.length <= MAX_EXTENT) {
          last.length += e.length;
        } else descriptors.push({ length: e.length, flags: state });
      }
      if (reqOne) {
        descriptors.length = 1;
        descriptors[0].length = Math.min(descriptors[0].length, length);
      }
      const list = descriptors.slice(0, MAX_DESCRIPTORS);
      this.#writer.chunk(cookie, true, REPLY_TYPE.BLOCK_STATUS, 4 + 8 * list.length, (v, at) => {
        v.setUint32(at, BASE_ALLOCATION_ID);
        for (let i = 0; i < list.length; i++) {
          v.setUint32(at + 4 + 8 * i, list[i].length);
          v.setUint32(at + 8 + 8 * i, list[i].flags);
        }
      });
    }, (e) => this.#fail(cookie, nbdError(e), (e as Error).message)).finally(() => this.#end(0));
  }
}
