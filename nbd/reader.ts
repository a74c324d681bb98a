/**
 * Buffered reading from a socket: one 256 KiB buffer that holds many pipelined requests, so
 * one read() system call usually brings a whole batch of them.
 */

export interface ReadableConn {
  read(p: Uint8Array): Promise<number | null>;
}

export class SocketReader {
  readonly #conn: ReadableConn;
  readonly #buf: Uint8Array<ArrayBuffer>;
  readonly view: DataView;
  #start = 0;
  #end = 0;
  #abort!: () => void;
  readonly #aborted = new Promise<null>((resolve) => this.#abort = () => resolve(null));

  constructor(conn: ReadableConn, capacity = 128 * 1024) {
    this.#conn = conn;
    this.#buf = new Uint8Array(capacity);
    this.view = new DataView(this.#buf.buffer);
  }

  /** Makes every pending and later read end as if the stream had ended. */
  abort(): void {
    this.#abort();
  }

  #read(dst: Uint8Array): Promise<number | null> {
    return Promise.race([this.#conn.read(dst), this.#aborted]);
  }

  /** Bytes buffered and not yet consumed. */
  get buffered(): number {
    return this.#end - this.#start;
  }

  /** Offset of the next unconsumed byte in `view`. */
  get position(): number {
    return this.#start;
  }

  /**
   * Makes at least `n` (≤ capacity) bytes available from `position`; false at end of stream
   * (or a broken connection) before that.
   */
  async fill(n: number): Promise<boolean> {
    if (this.#end - this.#start >= n) return true;
    if (this.#start + n > this.#buf.length) {
      this.#buf.copyWithin(0, this.#start, this.#end);
      this.#end -= this.#start;
      this.#start = 0;
    }
    while (this.#end - this.#start < n) {
      let got: number | null;
      try {
        got = await this.#read(this.#buf.subarray(this.#end));
      } catch {
        return false;
      }
      if (got === null || got === 0) return false;
      this.#end += got;
    }
    return true;
  }

  /** The next `n` buffered bytes (a view valid until the next fill), consumed. */
  take(n: number): Uint8Array {
    const bytes = this.#buf.subarray(this.#start, this.#start + n);
    this.#start += n;
    if (this.#start === this.#end) this.#start = this.#end = 0;
    return bytes;
  }

  /** Fills `dst` from the stream (buffered bytes first, then straight from the socket). */
  async readInto(dst: Uint8Array): Promise<boolean> {
    const have = Math.min(this.buffered, dst.length);
    dst.set(this.take(have));
    let done = have;
    while (done < dst.length) {
      let got: number | null;
      try {
        got = await this.#read(dst.subarray(done));
      } catch {
        return false;
      }
      if (got === null || got === 0) return false;
      done += got;
    }
    return true;
  }

  /** Discards `n` bytes of the stream. */
  async skip(n: number): Promise<boolean> {
    for (let left = n; left > 0;) {
      const chunk = Math.min(left, this.#buf.length);
      if (!await this.fill(chunk)) return false;
      this.take(chunk);
      left -= chunk;
    }
    return true;
  }
}
