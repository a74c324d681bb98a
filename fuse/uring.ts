/**
 * FUSE over io_uring (Linux 6.14+, with the fuse module's `enable_uring` parameter on): once INIT
 * has agreed on it, a Worker (fuse/uring_thread.ts) registers ring entries on every queue of the
 * connection, and the kernel sends requests through them instead of /dev/fuse. The thread serves
 * a raw disk's aligned reads and writes with io_uring I/O on the image straight from and into the
 * entries' buffers, and hands everything else to the session on the main thread, which answers
 * through a ReplyChannel that writes into the entry and asks the thread to commit it. The disk's
 * front still holds (pause) and counts the thread's requests, through DirectAccess.
 */
import type { Logger } from "../cli/log.ts";
import type { DirectAccess } from "../drivers/direct_access.ts";
import { EventFd } from "../ffi/file.ts";
import { AlignedMemory } from "../ffi/memory.ts";
import type { ReplyChannel } from "./device.ts";
import { MAX_IO, OUT_HEADER_SIZE } from "./protocol.ts";
import { URING_HEADER, type UringMessage, type UringSetup } from "./uring_messages.ts";

/** The fuse module's switch: off by default, and read by the kernel at each INIT. */
export const ENABLE_URING = "/sys/module/fuse/parameters/enable_uring";
/** Entries registered on each queue (one queue per possible CPU). */
const PER_QUEUE = 128;
const HUGE_PAGE = 2 * 1024 * 1024;

/** The number of queues the kernel makes: one per possible CPU. */
function possibleCpus(): number {
  try {
    const text = Deno.readTextFileSync("/sys/devices/system/cpu/possible").trim();
    let count = 0;
    for (const part of text.split(",")) {
      const [a, b] = part.split("-").map(Number);
      count += b === undefined ? 1 : b - a + 1;
    }
    return count > 0 ? count : navigator.hardwareConcurrency;
  } catch {
    return navigator.hardwareConcurrency;
  }
}

/**
 * Makes the kernel offer FUSE over io_uring at the next INIT: the fuse module's `enable_uring`
 * parameter (off by default; it lets a server that asks use it, and changes nothing for the
 * others) is turned on when it is off. Returns why it cannot be had, or null.
 */
export function enableUring(log: Logger): string | null {
  let value: string;
  try {
    value = Deno.readTextFileSync(ENABLE_URING).trim();
  } catch {
    return "the kernel has no FUSE over io_uring (Linux 6.14+, CONFIG_FUSE_IO_URING)";
  }
  if (value === "Y") return null;
  try {
    Deno.writeTextFileSync(ENABLE_URING, "Y");
    log.info("turned on FUSE over io_uring in the kernel", { parameter: ENABLE_URING });
    return null;
  } catch (e) {
    return `FUSE over io_uring is off in the kernel and cannot be turned on (${ENABLE_URING}: ${
      (e as Error).message
    })`;
  }
}

export interface FuseUringOptions {
  /** The connection's /dev/fuse descriptor. */
  fuseFd: number;
  access: DirectAccess;
  readOnly: boolean;
  log: Logger;
  /** A request the thread hands over, to be answered on `channel`. */
  onRequest(bytes: Uint8Array<ArrayBuffer>, channel: ReplyChannel): void;
  /**
   * A thread failed after its entries were registered: the kernel waits for its queue's
   * requests for ever, so the connection has to end (told at once).
   */
  onLost(error: string): void;
}

/** One queue's thread, and how the main thread asks it to commit. */
interface Lane {
  worker: Worker;
  commits: Int32Array;
  wake: EventFd;
}

export class FuseUring implements Disposable {
  readonly #cleanup = new DisposableStack();
  readonly #lanes: Lane[] = [];
  readonly #headers: AlignedMemory;
  readonly #payloads: AlignedMemory;
  readonly #payloadSize = MAX_IO;
  readonly #channels: ReplyChannel[] = [];
  /** The entries are registered (the kernel sends requests through them). */
  readonly ready: Promise<void>;
  /** Every thread has stopped: "gone" once the connection ended, else "failed". */
  readonly ended: Promise<"gone" | "failed">;

  constructor(options: FuseUringOptions) {
    const queues = possibleCpus(), count = queues * PER_QUEUE;
    const { access, log } = options;
    try {
      this.#headers = this.#cleanup.use(new AlignedMemory(count * URING_HEADER.stride));
      this.#headers.bytes.fill(0);
      const size = Math.ceil(count * this.#payloadSize / HUGE_PAGE) * HUGE_PAGE;
      this.#payloads = this.#cleanup.use(new AlignedMemory(size, HUGE_PAGE, { hugePages: true }));
      for (let q = 0; q < queues; q++) {
        const wake = this.#cleanup.use(new EventFd());
        const commits = new Int32Array(new SharedArrayBuffer((PER_QUEUE + 3) * 4));
        this.#lanes.push({ worker: null as unknown as Worker, commits, wake });
      }
    } catch (e) {
      this.#cleanup.dispose();
      throw e;
    }
    const ready = Promise.withResolvers<void>();
    const ended = Promise.withResolvers<"gone" | "failed">();
    this.ready = ready.promise;
    this.ended = ended.promise;
    let running = queues, registered = 0, failed = false;
    this.#lanes.forEach((lane, q) => {
      const worker = lane.worker = new Worker(
        new URL("./uring_thread.ts", import.meta.url).href,
        { type: "module", name: `fuse-uring-${q}` },
      );
      let registeredHere = false;
      const stop = (error?: string, lost = registeredHere): void => {
        if (error !== undefined) {
          failed = true;
          log.error("FUSE io_uring thread failed", { queue: q, error });
          ready.reject(new Error(error));
          if (lost) options.onLost(error);
        }
        worker.terminate();
        if (--running === 0) ended.resolve(failed ? "failed" : "gone");
      };
      worker.onmessage = (event: MessageEvent<UringMessage>): void => {
        const message = event.data;
        switch (message.kind) {
          case "request":
            return options.onRequest(
              message.bytes,
              this.#channel(q * PER_QUEUE + message.ent, lane, message.ent),
            );
          case "ready":
            registeredHere = true;
            if (++registered === queues) ready.resolve();
            return;
          case "ended":
            return stop();
          case "failed":
            return stop(message.message, message.lost);
        }
      };
      worker.onerror = (event: ErrorEvent): void => {
        event.preventDefault();
        stop(event.message);
      };
      const area = access.statsArea();
      const setup: UringSetup = {
        fuseFd: options.fuseFd,
        imageFd: access.fd,
        size: access.size,
        alignment: access.alignment,
        readOnly: options.readOnly,
        queue: q,
        entries: PER_QUEUE,
        headers: this.#headers.address + q * PER_QUEUE * URING_HEADER.stride,
        payloads: this.#payloads.address + q * PER_QUEUE * this.#payloadSize,
        payloadSize: this.#payloadSize,
        commits: lane.commits.buffer as SharedArrayBuffer,
        wakeFd: lane.wake.fd,
        fence: access.fence.buffer as SharedArrayBuffer,
        stats: area.buffer,
        statsAt: area.at,
      };
      worker.postMessage(setup);
    });
  }

  /** Where the answer to a request handed over in entry `ent` (`local` on its lane) goes. */
  #channel(ent: number, lane: Lane, local: number): ReplyChannel {
    let channel = this.#channels[ent];
    if (channel !== undefined) return channel;
    const at = ent * URING_HEADER.stride;
    const header = this.#headers.bytes.subarray(at, at + URING_HEADER.size);
    const view = new DataView(header.buffer, header.byteOffset, header.byteLength);
    const payload = this.#payloads.bytes.subarray(
      ent * this.#payloadSize,
      (ent + 1) * this.#payloadSize,
    );
    const { commits, wake } = lane, slots = commits.length - 2;
    channel = {
      write: (reply: Uint8Array): boolean => {
        header.set(reply.subarray(0, OUT_HEADER_SIZE));
        payload.set(reply.subarray(OUT_HEADER_SIZE));
        view.setUint32(URING_HEADER.payloadSize, reply.length - OUT_HEADER_SIZE, true);
        const w = commits[0];
        commits[2 + w] = local;
        Atomics.store(commits, 0, w + 1 === slots ? 0 : w + 1);
        wake.signal();
        return true;
      },
    };
    this.#channels[ent] = channel;
    return channel;
  }

  /** Frees the entries' memory: only once `ended` has resolved (or the threads never started). */
  [Symbol.dispose](): void {
    for (const lane of this.#lanes) lane.worker?.terminate();
    this.#cleanup.dispose();
  }
}
