/**
 * FUSE I/O threads: Workers that each take requests off the connection's queue through their own
 * clone of its /dev/fuse descriptor and serve the reads and writes of a raw disk themselves, with
 * their own aio context (fuse/io_thread.ts). The main thread's event loop then sees only the
 * rest (attributes, fsync, fallocate, unaligned requests), which the threads hand it, and the
 * data path runs on every core without the event loop's or the thread pool's hand-offs
 * (docs/performance.md: +25% random 4 KiB writes, +70% at queue depth 1 on this VM).
 * The disk's front still holds (pause) and counts their requests, through DirectAccess.
 */
import type { Logger } from "../cli/log.ts";
import type { DirectAccess } from "../drivers/direct_access.ts";
import type { FuseDevice } from "./device.ts";
import type { IoThreadMessage, IoThreadSetup } from "./io_thread_messages.ts";
import { MAX_BACKGROUND } from "./protocol.ts";

/**
 * I/O threads of a raw disk's FUSE export unless told otherwise: none. On this 2-vCPU VM two
 * threads gave +25–45% random 4 KiB writes and +50% at queue depth 1, but 10–25% fewer random
 * 4 KiB reads at QD64 than the event loop (docs/performance.md), so they are an opt-in.
 */
export const DEFAULT_IO_THREADS = 0;
/** The most a command line or attach request may ask for. */
export const MAX_IO_THREADS = 64;
/** Requests in flight per thread at most: the kernel sends at most MAX_BACKGROUND at once. */
const DEPTH = MAX_BACKGROUND;

export interface IoThreadsOptions {
  count: number;
  /** The session's descriptor: each thread gets a clone of it. */
  device: FuseDevice;
  access: DirectAccess;
  readOnly: boolean;
  log: Logger;
  /** A request a thread hands back, to be answered on `device` (that thread's clone). */
  onRequest(bytes: Uint8Array<ArrayBuffer>, device: FuseDevice): void;
  /**
   * A thread failed with requests unanswered: the kernel waits for them for ever, so the
   * connection has to end (told at once, while the other threads may still run).
   */
  onLost(error: string): void;
}

export class IoThreads implements Disposable {
  readonly #devices: FuseDevice[] = [];
  readonly #workers: Worker[] = [];
  /** All threads have stopped: "gone" once one saw the connection end, else "failed". */
  readonly ended: Promise<"gone" | "failed">;

  constructor(options: IoThreadsOptions) {
    const { count, access, log } = options;
    const done = Promise.withResolvers<"gone" | "failed">();
    this.ended = done.promise;
    let running = 0, gone = false;
    const stopped = (worker: Worker): void => {
      worker.terminate();
      if (--running === 0) done.resolve(gone ? "gone" : "failed");
    };
    try {
      for (let i = 0; i < count; i++) this.#devices.push(options.device.clone());
    } catch (e) {
      this[Symbol.dispose]();
      throw e;
    }
    // A thread blocked in read(2) cannot be terminated without losing the request it then
    // reads: once started, a thread runs until the connection ends.
    this.#devices.forEach((device, i) => {
      const area = access.statsArea();
      const worker = new Worker(new URL("./io_thread.ts", import.meta.url).href, {
        type: "module",
        name: `fuse-io-${i}`,
      });
      this.#workers.push(worker);
      running++;
      worker.onmessage = (event: MessageEvent<IoThreadMessage>): void => {
        const message = event.data;
        if (message.kind === "request") return options.onRequest(message.bytes, device);
        if (message.kind === "ended") gone = true;
        else {
          log.error("FUSE I/O thread failed", { thread: i, error: message.message });
          if (message.lost) options.onLost(message.message);
        }
        stopped(worker);
      };
      // Only what escapes the thread's own try (its module failing to load) comes here: it
      // never read a request.
      worker.onerror = (event: ErrorEvent): void => {
        event.preventDefault();
        log.error("FUSE I/O thread failed", { thread: i, error: event.message });
        stopped(worker);
      };
      const setup: IoThreadSetup = {
        fuseFd: device.fd,
        imageFd: access.fd,
        size: access.size,
        alignment: access.alignment,
        readOnly: options.readOnly,
        depth: DEPTH,
        fence: access.fence.buffer as SharedArrayBuffer,
        stats: area.buffer,
        statsAt: area.at,
      };
      worker.postMessage(setup);
    });
  }

  /** Closes the clones: only once `ended` has resolved (or the threads never started). */
  [Symbol.dispose](): void {
    for (const worker of this.#workers) worker.terminate();
    for (const device of this.#devices) device[Symbol.dispose]();
  }
}
