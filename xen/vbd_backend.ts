/**
 * The backend half of one vbd's xenbus state machine (xen-backend.md §3): advertise the disk's
 * limits and features, wait for the guest's blkfront to publish its ring(s), map them, bind
 * their event channels, serve them with the same RingServer as every other ring, and run the
 * close protocol. Every xenstore event only triggers a re-read of the frontend's state
 * (level-triggered), one reconciliation at a time.
 */
import type { BlockTarget } from "../drivers/target.ts";
import { RingProtocolError, RingServer, type RingTransport } from "../ring/server.ts";
import type { SegmentData } from "../ring/segments.ts";
import { removeIfEmpty } from "./hotplug.ts";
import type { EventPort, XenKernel } from "./kernel.ts";
import { backendPath, frontendPath, type VbdLocation } from "./vbd_paths.ts";
import type { XenStore } from "./xenstore/client.ts";

export const XenbusState = {
  Unknown: 0,
  Initialising: 1,
  InitWait: 2,
  Initialised: 3,
  Connected: 4,
  Closing: 5,
  Closed: 6,
} as const;

const S = XenbusState;
const PAGE = 4096;
const VDISK_READONLY = 4;

export interface VbdLimits {
  /** Largest ring the guest may use: 2^order pages (Linux caps at 4). */
  maxRingPageOrder: number;
  maxQueues: number;
  /** Segments per INDIRECT request (0: indirect requests are not offered). */
  maxIndirectSegments: number;
}

export const DEFAULT_LIMITS: VbdLimits = {
  maxRingPageOrder: 4,
  maxQueues: 4,
  maxIndirectSegments: 256,
};

/** One connected ring (a queue): its mapping, event channel, data path and server. */
interface Queue {
  ring: { readonly bytes: Uint8Array } & Disposable;
  port: EventPort;
  data: SegmentData & Disposable;
  server: RingServer;
  running: Promise<void>;
  stopped: boolean;
}

/** Counters for logs and `tapd ctl stats`. */
export interface VbdStats {
  connects: number;
  requests: number;
  errors: number;
}

export class VbdBackend {
  readonly be: string;
  readonly fe: string;
  readonly stats: VbdStats = { connects: 0, requests: 0, errors: 0 };
  readonly #xs: XenStore;
  readonly #v: VbdLocation;
  readonly #disk: BlockTarget;
  readonly #kernel: XenKernel;
  readonly #limits: VbdLimits;
  readonly #log: (line: string) => void;
  readonly #token: string;
  #queues: Queue[] = [];
  #state: number = S.Unknown;
  #chain: Promise<void> = Promise.resolve();
  #finished = false;
  #resolveDone!: (reason: string) => void;
  /** Resolves (with why) once the device is gone for good: unplugged, or its guest vanished. */
  readonly done: Promise<string> = new Promise((resolve) => this.#resolveDone = resolve);

  readonly #pollMicros: number;

  constructor(
    xs: XenStore,
    location: VbdLocation,
    disk: BlockTarget,
    kernel: XenKernel,
    options: {
      limits?: Partial<VbdLimits>;
      log?: (line: string) => void;
      pollMicros?: number;
    } = {},
  ) {
    this.#xs = xs;
    this.#v = location;
    this.#disk = disk;
    this.#kernel = kernel;
    this.#limits = { ...DEFAULT_LIMITS, ...options.limits };
    this.#log = options.log ?? (() => {});
    this.#pollMicros = options.pollMicros ?? 0;
    this.be = backendPath(location);
    this.fe = frontendPath(location);
    this.#token = `tapd-vbd-${location.frontendDomid}-${location.devid}`;
  }

  /** Current backend state (XenbusState). */
  get state(): number {
    return this.#state;
  }

  /** Writes the limits and features, goes to InitWait and starts following the frontend. */
  async start(): Promise<void> {
    const disk = this.#disk, l = this.#limits;
    const discard = (await this.#xs.read(`${this.be}/discard-enable`)) !== "0";
    await this.#xs.transaction(async (tx) => {
      const w = (k: string, value: string | number) =>
        this.#xs.write(`${this.be}/${k}`, String(value), tx);
      await w("max-ring-page-order", l.maxRingPageOrder);
      await w("max-ring-pages", 2 ** l.maxRingPageOrder);
      await w("multi-queue-max-queues", l.maxQueues);
      if (l.maxIndirectSegments > 0) {
        await w("feature-max-indirect-segments", l.maxIndirectSegments);
      }
      await w("feature-flush-cache", 1);
      await w("feature-barrier", 0);
      await w("feature-persistent", 0);
      await w("feature-discard", discard ? 1 : 0);
      if (discard) {
        await w("discard-granularity", Math.max(disk.info.physicalSectorSize, 512));
        await w("discard-alignment", 0);
        await w("discard-secure", 0);
      }
      await w("hotplug-status", "connected");
      await w("state", S.InitWait);
    });
    this.#state = S.InitWait;
    for (const [path, token] of this.#watches()) {
      await this.#xs.watch(path, token, () => this.#kick());
    }
    this.#log(`vbd ${this.be}: waiting for the frontend`);
  }

  /** Toolstack unplug: asks the guest to let go (online=0, Closing); `done` follows. */
  async unplug(): Promise<void> {
    await this.#xs.transaction(async (tx) => {
      await this.#xs.write(`${this.be}/online`, "0", tx);
      await this.#xs.write(`${this.be}/state`, String(S.Closing), tx);
    });
    this.#state = S.Closing;
  }

  /** Tears down at once (the guest is not asked); for shutdown after unplug timed out. */
  async forceClose(reason: string): Promise<void> {
    await this.#serialised(() => this.#finish(reason));
  }

  /** What we watch: the frontend's state, our `online` node, and domain deaths. */
  #watches(): [string, string][] {
    return [
      [`${this.fe}/state`, `${this.#token}-fe`],
      [`${this.be}/online`, `${this.#token}-online`],
      ["@releaseDomain", `${this.#token}-release`],
    ];
  }

  #kick(): void {
    void this.#serialised(() => this.#reconcile());
  }

  #serialised(fn: () => Promise<void>): Promise<void> {
    const next = this.#chain.then(fn).catch((e) => {
      this.#log(`vbd ${this.be}: ${(e as Error).message}`);
    });
    this.#chain = next;
    return next;
  }

  async #reconcile(): Promise<void> {
    if (this.#finished) return;
    const xs = this.#xs;
    const feState = parseState(await xs.read(`${this.fe}/state`));
    const online = (await xs.read(`${this.be}/online`)) !== "0";
    if (feState === null) {
      // The guest's directory is gone: the domain was destroyed (or the device removed).
      return this.#finish("the frontend vanished");
    }
    switch (feState) {
      case S.Initialising:
        if (this.#state === S.Closed && online) await this.#setState(S.InitWait);
        return;
      case S.Initialised:
        if (this.#queues.length === 0 && this.#state === S.InitWait) await this.#connect();
        return;
      case S.Connected:
        if (this.#queues.length === 0 && this.#state === S.InitWait) {
          // Connected to a backend before us: its requests in flight are unknown; make it reconnect.
          await this.#fail("the frontend is connected to an earlier backend");
        }
        return;
      case S.Closing:
        await this.#disconnect();
        if (this.#state !== S.Closing) await this.#setState(S.Closing);
        return;
      case S.Closed:
      case S.Unknown:
        await this.#disconnect();
        if (this.#state !== S.Closed) await this.#setState(S.Closed);
        if (!online) return this.#finish("unplugged");
        return;
    }
  }

  async #connect(): Promise<void> {
    const xs = this.#xs, fe = this.fe, l = this.#limits, domid = this.#v.frontendDomid;
    const protocol = await xs.read(`${fe}/protocol`);
    if (protocol !== null && protocol !== "x86_64-abi") {
      return this.#fail(`frontend protocol "${protocol}" is not supported (only x86_64-abi)`);
    }
    const orderText = await xs.read(`${fe}/ring-page-order`);
    const order = orderText === null ? 0 : strictInt(orderText, 0, l.maxRingPageOrder);
    if (order === null) return this.#fail(`bad ring-page-order "${orderText}"`);
    const queuesText = await xs.read(`${fe}/multi-queue-num-queues`);
    const queues = queuesText === null ? 1 : strictInt(queuesText, 1, l.maxQueues);
    if (queues === null) return this.#fail(`bad multi-queue-num-queues "${queuesText}"`);
    const dirs = queuesText === null
      ? [fe]
      : Array.from({ length: queues }, (_, i) => `${fe}/queue-${i}`);
    const rings: { refs: number[]; port: number }[] = [];
    for (const dir of dirs) {
      const refs: number[] = [];
      for (let i = 0; i < 2 ** order; i++) {
        const node = order === 0 ? "ring-ref" : `ring-ref${i}`;
        const text = await xs.read(`${dir}/${node}`);
        const ref = text === null ? null : strictInt(text, 0, 0xffffffff);
        if (ref === null) return this.#fail(`missing or bad ${dir}/${node}`);
        refs.push(ref);
      }
      const portText = await xs.read(`${dir}/event-channel`);
      const port = portText === null ? null : strictInt(portText, 1, 0xfffffffe);
      if (port === null) return this.#fail(`missing or bad ${dir}/event-channel`);
      rings.push({ refs, port });
    }
    try {
      for (const r of rings) this.#queues.push(this.#openQueue(domid, r.refs, r.port));
    } catch (e) {
      await this.#disconnect();
      return this.#fail(`cannot connect: ${(e as Error).message}`);
    }
    const disk = this.#disk;
    await xs.transaction(async (tx) => {
      const w = (k: string, value: string | number) =>
        xs.write(`${this.be}/${k}`, String(value), tx);
      await w("sectors", Math.floor(disk.size / 512));
      await w("info", disk.info.readOnly ? VDISK_READONLY : 0);
      await w("sector-size", 512);
      await w("physical-sector-size", Math.max(disk.info.physicalSectorSize, 512));
      await w("state", S.Connected);
    });
    this.#state = S.Connected;
    this.stats.connects++;
    const size = this.#queues[0].server.ringSize;
    this.#log(
      `vbd ${this.be}: connected to domain ${domid}: ${queues} queue(s), ${2 ** order}-page ` +
        `ring(s) of ${size} requests, ${disk.size} bytes${disk.info.readOnly ? ", read-only" : ""}`,
    );
  }

  #openQueue(domid: number, refs: number[], remotePort: number): Queue {
    const kernel = this.#kernel;
    const ring = kernel.mapRing(domid, refs);
    let port: EventPort | null = null, data: (SegmentData & Disposable) | null = null;
    try {
      port = kernel.bindEvent(domid, remotePort);
      data = kernel.segments(domid, this.#limits.maxIndirectSegments);
    } catch (e) {
      data?.[Symbol.dispose]();
      port?.[Symbol.dispose]();
      ring[Symbol.dispose]();
      throw e;
    }
    const q = { ring, port, data, stopped: false } as Queue;
    const transport: RingTransport = {
      ring: ring.bytes.subarray(0, refs.length * PAGE),
      data,
      // Called once the ring is empty: sleep until an event (one that came while we worked is
      // still pending, so poll returns at once), then take and re-arm it.
      waitKick: async () => {
        if (q.stopped) return false;
        await q.port.wait();
        if (q.stopped) return false;
        q.port.drain();
        return true;
      },
      notify: () => {
        q.port.notify();
      },
    };
    q.server = new RingServer(
      this.#disk,
      transport,
      false,
      {
        onError: (message) => this.#log(`vbd ${this.be}: bad request: ${message}`),
        pollMicros: this.#pollMicros,
      },
    );
    q.running = q.server.run().catch((e) => {
      const why = e instanceof RingProtocolError
        ? e.message
        : `ring failed: ${(e as Error).message}`;
      this.#log(`vbd ${this.be}: ${why}`);
      q.stopped = true;
      void this.#serialised(() => this.#fail(why));
    });
    return q;
  }

  /** Stops every ring after its requests in flight, then unmaps and unbinds it. */
  async #disconnect(): Promise<void> {
    const queues = this.#queues;
    if (queues.length === 0) return;
    this.#queues = [];
    for (const q of queues) {
      q.stopped = true;
      q.server.stop();
      q.port.wake();
    }
    for (const q of queues) {
      await q.running;
      this.stats.requests += q.server.stats.requests;
      this.stats.errors += q.server.stats.errors;
      q.data[Symbol.dispose]();
      q.ring[Symbol.dispose]();
      q.port[Symbol.dispose]();
    }
    this.#log(
      `vbd ${this.be}: disconnected (${this.stats.requests} requests, ${this.stats.errors} errors so far)`,
    );
  }

  /** A fatal problem with the frontend: report it where xenbus tools look, and close. */
  async #fail(message: string): Promise<void> {
    this.#log(`vbd ${this.be}: ${message}`);
    await this.#disconnect();
    const errorPath = `/local/domain/${this.#v.backendDomid}/error${this.be}/error`;
    await this.#xs.write(errorPath, message).catch(() => {});
    if (!this.#finished) await this.#setState(S.Closing).catch(() => {});
  }

  async #setState(state: number): Promise<void> {
    await this.#xs.write(`${this.be}/state`, String(state));
    this.#state = state;
  }

  /** The end: everything released, our watch gone, the backend directory removed. */
  async #finish(reason: string): Promise<void> {
    if (this.#finished) return;
    this.#finished = true;
    await this.#disconnect();
    const xs = this.#xs;
    for (const [path, token] of this.#watches()) await xs.unwatch(path, token).catch(() => {});
    await xs.rm(this.be).catch(() => {});
    await removeIfEmpty(xs, this.be.replace(/\/[^/]+$/, "")).catch(() => {});
    await xs.rm(`/local/domain/${this.#v.backendDomid}/error${this.be}`).catch(() => {});
    this.#state = S.Closed;
    this.#log(`vbd ${this.be}: closed: ${reason}`);
    this.#resolveDone(reason);
  }
}

function parseState(text: string | null): number | null {
  if (text === null) return null;
  const n = strictInt(text, 0, 8);
  return n ?? S.Unknown;
}

/** A strict decimal in [min, max] (xenstore values come from the guest: untrusted). */
function strictInt(text: string, min: number, max: number): number | null {
  if (!/^[0-9]{1,10}$/.test(text)) return null;
  const n = Number(text);
  return n >= min && n <= max ? n : null;
}
