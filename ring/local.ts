/**
 * The local ring transport (docs/ring.md): any process on the host attaches by connecting to a
 * Unix socket and receives the ring memory (a memfd holding the ring pages and the data pages)
 * and two eventfds, kick and notify. Each connection is one ring, served by a RingServer until
 * the frontend closes its end.
 */
import type { BlockTarget } from "../drivers/target.ts";
import { EventFd, type FileHandle, memfd } from "../ffi/file.ts";
import { libc } from "../ffi/libc.ts";
import { Mapping } from "../ffi/memory.ts";
import { sendWithFds, UnixListener } from "../ffi/socket.ts";
import { BLKIF_LAYOUT, ringEntries } from "./blkif.ts";
import { PageSegments } from "./segments.ts";
import { RingServer, type RingTransport } from "./server.ts";

export const ATTACH_MAGIC = "TAPDRING";
export const ATTACH_VERSION = 2;
export const ATTACH_SIZE = 64;
/** Four ring pages: 128 requests in flight (Xen's blkback offers up to 16 pages). */
export const RING_PAGES = 4;
export const MAX_INDIRECT_SEGMENTS = 256;
/**
 * Data pages: 65 per ring entry, so that a frontend can give each entry a 256 KiB request and
 * its indirect descriptor page. The memfd is sparse: only pages in use cost memory.
 */
export const DATA_PAGES = ringEntries(RING_PAGES * BLKIF_LAYOUT.PAGE_SIZE) * 65;
export const FLAG_READ_ONLY = 1;
export const FLAG_FLUSH = 2;
export const FLAG_DISCARD = 4;

/** The 64-byte attach message. */
export function attachMessage(disk: BlockTarget): Uint8Array {
  const msg = new Uint8Array(ATTACH_SIZE);
  const v = new DataView(msg.buffer);
  msg.set(new TextEncoder().encode(ATTACH_MAGIC), 0);
  v.setUint32(8, ATTACH_VERSION, true);
  v.setUint32(12, RING_PAGES, true);
  v.setUint32(16, DATA_PAGES, true);
  v.setUint32(20, BLKIF_LAYOUT.PAGE_SIZE, true);
  v.setBigUint64(24, BigInt(disk.size / 512), true);
  v.setUint32(32, disk.info.logicalSectorSize, true);
  v.setUint32(36, (disk.info.readOnly ? FLAG_READ_ONLY : 0) | FLAG_FLUSH | FLAG_DISCARD, true);
  v.setUint32(40, BLKIF_LAYOUT.MAX_SEGMENTS, true);
  v.setUint32(44, MAX_INDIRECT_SEGMENTS, true);
  return msg;
}

/** One attached frontend: its memory, its eventfds, and the watch on its connection. */
class LocalRing implements RingTransport {
  readonly ring: Uint8Array;
  readonly data: PageSegments;
  readonly #conn: FileHandle;
  readonly #map: Mapping;
  readonly #kick = new EventFd();
  readonly #notify = new EventFd();
  readonly #eof = new Uint8Array(1);
  #gone = false;

  constructor(conn: FileHandle, memfdFd: number) {
    this.#conn = conn;
    const size = (RING_PAGES + DATA_PAGES) * BLKIF_LAYOUT.PAGE_SIZE;
    this.#map = new Mapping(memfdFd, size, { what: "ring memory" });
    this.ring = this.#map.bytes.subarray(0, RING_PAGES * BLKIF_LAYOUT.PAGE_SIZE);
    this.data = new PageSegments(
      this.#map.bytes.subarray(RING_PAGES * BLKIF_LAYOUT.PAGE_SIZE),
      MAX_INDIRECT_SEGMENTS,
    );
  }

  /** Sends the attach message with the memfd and both eventfds (after the ring is initialised). */
  attach(disk: BlockTarget, memfdFd: number): void {
    sendWithFds(this.#conn, attachMessage(disk), [memfdFd, this.#kick.fd, this.#notify.fd]);
  }

  /** Resolves when the frontend closes its end (or the connection is shut down). */
  async watch(): Promise<void> {
    await libc.read_nb(this.#conn.fd, this.#eof, 1n);
    this.#gone = true;
    this.#kick.signal(); // wake the server's wait
  }

  async waitKick(): Promise<boolean> {
    if (this.#gone) return false;
    await this.#kick.wait();
    return !this.#gone;
  }

  notify(): void {
    if (!this.#gone) this.#notify.signal();
  }

  /** Ends the connection: wakes watch() and, through it, the server. */
  hangUp(): void {
    if (!this.#conn.closed) libc.shutdown(this.#conn.fd, 2 /* SHUT_RDWR */);
  }

  close(): void {
    this.#map[Symbol.dispose]();
    this.#kick[Symbol.dispose]();
    this.#notify[Symbol.dispose]();
    this.#conn.close();
  }
}

/** Serves a disk to every frontend that connects to `path`. */
export class LocalRingListener {
  readonly #disk: BlockTarget;
  readonly #listener: UnixListener;
  readonly #rings = new Set<{ ring: LocalRing; server: RingServer }>();
  readonly #running = new Set<Promise<void>>();
  #log: (line: string) => void;
  readonly #pollMicros: number;

  /** `pollMicros`: see RingServerOptions. */
  constructor(
    disk: BlockTarget,
    path: string,
    log: (line: string) => void = () => {},
    pollMicros = 0,
  ) {
    this.#disk = disk;
    this.#listener = new UnixListener(path);
    this.#log = log;
    this.#pollMicros = pollMicros;
  }

  /** Accepts frontends until stop(); resolves once every ring has finished. */
  async serve(): Promise<void> {
    for (;;) {
      const conn = await this.#listener.accept();
      if (conn === null) break;
      try {
        this.#start(conn);
      } catch (e) {
        this.#log(`attach failed: ${(e as Error).message}`);
        conn.close(); // idempotent: the ring may have closed it already
      }
    }
    await Promise.all(this.#running);
  }

  #start(conn: FileHandle): void {
    const size = (RING_PAGES + DATA_PAGES) * BLKIF_LAYOUT.PAGE_SIZE;
    using mem = memfd("tapd-ring", size);
    const ring = new LocalRing(conn, mem.fd);
    let server: RingServer;
    try {
      server = new RingServer(this.#disk, ring, true, { pollMicros: this.#pollMicros });
      ring.attach(this.#disk, mem.fd);
    } catch (e) {
      ring.close();
      throw e;
    }
    const entry = { ring, server };
    this.#rings.add(entry);
    this.#log("frontend attached");
    const watching = ring.watch();
    const run = server.run().then(async () => {
      ring.hangUp();
      await watching;
    }).catch((e) => this.#log(`ring failed: ${(e as Error).message}`)).finally(() => {
      ring.close();
      this.#rings.delete(entry);
      this.#running.delete(run);
      this.#log(
        `frontend detached (${server.stats.requests} requests, ${server.stats.errors} errors)`,
      );
    });
    this.#running.add(run);
  }

  /** Stops accepting and ends every ring after its requests in flight. */
  stop(): void {
    this.#listener[Symbol.dispose]();
    for (const { ring, server } of this.#rings) {
      server.stop();
      ring.hangUp();
    }
  }
}
