/**
 * The sync engine: pread/pwrite/fsync on Deno's blocking thread pool (`nonblocking` FFI), a few
 * at a time, no O_DIRECT requirement. The pool has 32 threads shared with all file-system work,
 * so in-flight calls are capped (default 8).
 */
import { pooled } from "../ffi/errno.ts";
import type { FileHandle } from "../ffi/file.ts";
import { libc } from "../ffi/libc.ts";
import { addressOf } from "../ffi/memory.ts";
import { sharedPool } from "./buffer_pool.ts";
import type { Buffers, EngineOptions, IoDone, IoEngine } from "./engine.ts";

export class SyncEngine implements IoEngine {
  readonly kind = "sync";
  readonly #limit: number;
  #running = 0;
  #queue: Array<() => void> = [];
  #idle: (() => void) | null = null;
  #closed: Promise<void> | null = null;

  constructor(options: EngineOptions = {}) {
    this.#limit = Math.min(options.depth ?? 8, 16);
  }

  read(file: FileHandle, offset: number, bufs: Buffers): Promise<number> {
    return this.#run(() => transfer(file, offset, bufs, false));
  }

  write(file: FileHandle, offset: number, bufs: Buffers): Promise<number> {
    return this.#run(() => transfer(file, offset, bufs, true));
  }

  submit(write: boolean, file: FileHandle, offset: number, bufs: Buffers, done: IoDone): void {
    (write ? this.write(file, offset, bufs) : this.read(file, offset, bufs)).then(done, done);
  }

  fsync(file: FileHandle, dataOnly: boolean): Promise<void> {
    return this.#run(async () => {
      const fd = file.fd;
      await pooled(
        dataOnly ? "fdatasync" : "fsync",
        file.path,
        dataOnly ? () => libc.fdatasync_nb(fd) : () => libc.fsync_nb(fd),
        dataOnly ? () => libc.fdatasync(fd) : () => libc.fsync(fd),
      );
    });
  }

  fallocate(file: FileHandle, mode: number, offset: number, length: number): Promise<void> {
    return this.#run(() => file.fallocate(mode, offset, length));
  }

  async #run<T>(fn: () => Promise<T>): Promise<T> {
    if (this.#closed !== null) throw new Error("The sync engine is closed");
    // A finishing request hands its slot straight to the next one waiting, so the count never
    // drops to zero (and close() never resolves) while a woken request has yet to start.
    if (this.#running >= this.#limit) await new Promise<void>((go) => this.#queue.push(go));
    else this.#running++;
    try {
      return await fn();
    } finally {
      const next = this.#queue.shift();
      if (next !== undefined) next();
      else if (--this.#running === 0 && this.#idle !== null) this.#idle();
    }
  }

  close(): Promise<void> {
    this.#closed ??= this.#running === 0
      ? Promise.resolve()
      : new Promise((resolve) => this.#idle = resolve);
    return this.#closed;
  }
}

/**
 * Moves every byte (short only at end of file), one buffer at a time. Memory the kernel could not
 * use with O_DIRECT (unregistered, or not 512-aligned) goes through a pool buffer.
 */
async function transfer(
  file: FileHandle,
  offset: number,
  bufs: Buffers,
  write: boolean,
): Promise<number> {
  const list = bufs instanceof Uint8Array ? [bufs] : bufs;
  let total = 0;
  for (const buf of list) {
    const addr = addressOf(buf);
    const direct = addr !== null && ((addr | buf.length) & 511) === 0;
    const io = direct ? buf : sharedPool.take(buf.length);
    try {
      if (!direct && write) io.set(buf);
      const n = await transferOne(file, offset + total, io, write);
      if (!direct && !write) buf.set(io.subarray(0, n));
      if (n < buf.length) return total + n; // end of file
    } finally {
      if (!direct) sharedPool.give(io as Uint8Array<ArrayBuffer>);
    }
    total += buf.length;
  }
  return total;
}

async function transferOne(
  file: FileHandle,
  offset: number,
  buf: Uint8Array,
  write: boolean,
): Promise<number> {
  const fd = file.fd, call = write ? "pwrite" : "pread";
  let done = 0;
  while (done < buf.length) {
    const chunk = buf.subarray(done), len = BigInt(chunk.length), off = BigInt(offset + done);
    const n = Number(
      await pooled(
        call,
        file.path,
        write
          ? () => libc.pwrite_nb(fd, chunk, len, off)
          : () => libc.pread_nb(fd, chunk, len, off),
        write ? () => libc.pwrite(fd, chunk, len, off) : () => libc.pread(fd, chunk, len, off),
      ),
    );
    if (n === 0) break;
    done += n;
  }
  return done;
}
