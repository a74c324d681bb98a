/**
 * Byte channels to xenstored (shared/specs/xen-backend.md §2.1): its unix socket, or the
 * `/dev/xen/xenbus` device of the dom0 kernel, which works wherever xenstored runs.
 */
import * as fs from "node:fs";
import { encodeFrame, nulTerminated, XsType } from "./wire.ts";

export const DEFAULT_SOCKET = "/var/run/xenstored/socket";
export const DEFAULT_DEVICE = "/dev/xen/xenbus";

/** A full-duplex byte stream carrying xenstore frames. */
export interface Transport {
  /** "socket" or "device", for messages. */
  readonly kind: string;
  /** Some bytes into `buf`; null once the stream has ended or the transport is closed. */
  read(buf: Uint8Array): Promise<number | null>;
  /** Sends one whole message (one frame). */
  write(message: Uint8Array): Promise<void>;
  /** Idempotent. A pending read returns null. */
  close(): void;
}

/** The xenstored unix socket. */
export class SocketTransport implements Transport {
  readonly kind = "socket";
  readonly #conn: Deno.UnixConn;
  #closed = false;

  constructor(conn: Deno.UnixConn) {
    this.#conn = conn;
  }

  static async connect(path: string = DEFAULT_SOCKET): Promise<SocketTransport> {
    return new SocketTransport(await Deno.connect({ transport: "unix", path }));
  }

  async read(buf: Uint8Array): Promise<number | null> {
    if (this.#closed) return null;
    try {
      return await this.#conn.read(buf);
    } catch (e) {
      if (this.#closed) return null;
      throw e;
    }
  }

  async write(message: Uint8Array): Promise<void> {
    for (let done = 0; done < message.length;) {
      done += await this.#conn.write(message.subarray(done));
    }
  }

  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    try {
      this.#conn.close();
    } catch {
      // already closed by the peer side
    }
  }
}

/** Raw reads and writes on one open file description; 0 from read means end of file. */
export interface DeviceIo {
  read(buf: Uint8Array): Promise<number>;
  write(bytes: Uint8Array): Promise<number>;
  close(): void;
}

/**
 * A device opened read-write through node:fs on a plain fd. Not Deno.open: a Deno.FsFile runs
 * one op at a time, so a read blocked waiting for a watch event would hold back every write.
 */
export function openDeviceIo(path: string): Promise<DeviceIo> {
  return new Promise((resolve, reject) => {
    fs.open(path, "r+", (err, fd) => err ? reject(err) : resolve(fdIo(fd)));
  });
}

function fdIo(fd: number): DeviceIo {
  return {
    read: (buf) =>
      new Promise((resolve, reject) => {
        fs.read(fd, buf, 0, buf.length, null, (err, n) => err ? reject(err) : resolve(n));
      }),
    write: (bytes) =>
      new Promise((resolve, reject) => {
        fs.write(fd, bytes, 0, bytes.length, null, (err, n) => err ? reject(err) : resolve(n));
      }),
    close: () => fs.close(fd, () => {}),
  };
}

/** Reply id of the wake-up request; the client never uses it. */
const WAKE_REQ_ID = 0xffffffff;

/**
 * `/dev/xen/xenbus`. Each message goes down in one write (the kernel takes whole messages);
 * reads are a byte stream. The kernel answers WATCH itself and its made-up `OK` may follow the
 * first WATCH_EVENT. A read blocked in the kernel cannot be cancelled, and closing the fd under
 * it does not wake it, so close() sends a harmless request whose reply ends that read, and
 * closes the fd after it.
 */
export class DeviceTransport implements Transport {
  readonly kind = "device";
  readonly #io: DeviceIo;
  #closed = false;
  /** The read in progress, and how to end it early. */
  #pending: { reading: Promise<number>; abort: () => void } | null = null;

  constructor(io: DeviceIo) {
    this.#io = io;
  }

  static async open(path: string = DEFAULT_DEVICE): Promise<DeviceTransport> {
    return new DeviceTransport(await openDeviceIo(path));
  }

  read(buf: Uint8Array): Promise<number | null> {
    if (this.#closed) return Promise.resolve(null);
    return new Promise((resolve, reject) => {
      const reading = this.#io.read(buf);
      const pending = { reading, abort: () => resolve(null) };
      this.#pending = pending;
      const done = () => {
        if (this.#pending === pending) this.#pending = null;
      };
      reading.then((n) => {
        done();
        resolve(this.#closed || n === 0 ? null : n);
      }, (e) => {
        done();
        if (this.#closed) resolve(null);
        else reject(e);
      });
    });
  }

  async write(message: Uint8Array): Promise<void> {
    // The kernel takes a whole message per write; the loop only guards against a short count.
    for (let done = 0; done < message.length;) {
      done += await this.#io.write(message.subarray(done));
    }
  }

  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    const pending = this.#pending;
    if (pending === null) {
      this.#io.close();
      return;
    }
    pending.abort();
    const wake = encodeFrame({
      type: XsType.GET_DOMAIN_PATH,
      reqId: WAKE_REQ_ID,
      txId: 0,
      payload: nulTerminated("0"),
    });
    this.#io.write(wake).catch(() => 0);
    pending.reading.catch(() => 0).finally(() => this.#io.close());
  }
}

/** Where to reach xenstored; with neither set, the socket if it answers, else the device. */
export interface TransportOptions {
  socket?: string;
  device?: string;
}

/** Opens the transport `options` choose (see TransportOptions). */
export async function openTransport(options: TransportOptions = {}): Promise<Transport> {
  if (options.socket !== undefined) return await SocketTransport.connect(options.socket);
  if (options.device !== undefined) return await DeviceTransport.open(options.device);
  try {
    return await SocketTransport.connect(DEFAULT_SOCKET);
  } catch (socketError) {
    try {
      return await DeviceTransport.open(DEFAULT_DEVICE);
    } catch (deviceError) {
      throw new Error(
        `Cannot reach xenstored: socket "${DEFAULT_SOCKET}": ${message(socketError)}; ` +
          `device "${DEFAULT_DEVICE}": ${message(deviceError)}`,
        { cause: deviceError },
      );
    }
  }
}

function message(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}
