/**
 * One disk served by one tapdisk process: the disk behind a DiskGate, exported on a blkif ring,
 * NBD listeners, a FUSE file and/or a Xen guest's vbd. pause/resume/stats act on the gate; stop()
 * unmounts the FUSE file, unplugs the vbd, then drains and closes everything else.
 */
import type { Logger } from "../cli/log.ts";
import { openDisk, rawOverImage } from "../drivers/mod.ts";
import { type FuseCloseOptions, FuseExport } from "../fuse/export.ts";
import { type EngineKind, type EngineOptions, RING_ENGINE, SERVER_ENGINE } from "../io/engine.ts";
import { formatNbdAddress, type NbdAddress, nbdUri } from "../nbd/address.ts";
import { NbdServer } from "../nbd/server.ts";
import { LocalRingListener } from "../ring/local.ts";
import { DiskGate, type GateStats } from "../serve/gate.ts";
import { serveXenVbd } from "../xen/serve.ts";
import { xenExport, type XenTarget } from "./xen_target.ts";

export interface TapdiskOptions {
  spec: string;
  readOnly: boolean;
  engine?: EngineKind;
  /**
   * Poll (the rings and the engine) instead of sleeping until this many µs pass without a
   * request arriving or completing; 0: always sleep until woken.
   */
  pollMicros?: number;
  /** A Unix socket path for the blkif ring, or null. */
  ring: string | null;
  nbd: NbdAddress[];
  /** A regular file to mount the disk over (FUSE), or null. */
  fuse: string | null;
  /** FUSE passthrough for `fuse` (a raw disk): its reads and writes bypass the gate. */
  passthrough?: boolean;
  /** I/O threads for `fuse` (a raw disk; default DEFAULT_IO_THREADS, 0: the event loop). */
  ioThreads?: number;
  /** FUSE over io_uring for `fuse` (a raw disk; where the kernel lacks it: /dev/fuse). */
  uring?: boolean;
  /** Read ahead of sequential readers (serve/read_ahead.ts; default true). */
  readAhead?: boolean;
  /** A Xen guest device to serve the disk to (from dom0), or null. */
  xen: XenTarget | null;
  /** xenstored's socket, or the xenbus device if it starts with /dev/ (default: either). */
  xenstore?: string;
  /** How long a stop waits for the Xen guest to release its device (default 10 s). */
  xenUnplugTimeoutMs?: number;
  /** An export ended on its own while the disk serves on (the Xen guest was destroyed). */
  onExportEnded?: (exportName: string, reason: string) => void;
  exportName: string;
  log: Logger;
}

/** The running Xen export. */
interface XenServing {
  name: string;
  /** Asks serveXenVbd to unplug the device. */
  stop: () => void;
  stopRequested: boolean;
  /** Settles when serveXenVbd has returned (never rejects). */
  done: Promise<void>;
}

export interface Serving {
  size: number;
  /** ring:unix:PATH, unix:PATH, tcp:HOST:PORT (the bound port), fuse:PATH, xen:DOMID:VDEV. */
  exports: string[];
  uris: string[];
  /** The spec's warning, also logged (a writable raw spec over an image file). */
  warning?: string;
}

export class TapdiskServer {
  readonly #options: TapdiskOptions;
  readonly #log: Logger;
  #gate: DiskGate | null = null;
  #nbd: NbdServer | null = null;
  #ring: LocalRingListener | null = null;
  #fuse: FuseExport | null = null;
  #xen: XenServing | null = null;
  #ringServing: Promise<void> = Promise.resolve();
  #stopping: Promise<void> | null = null;

  constructor(options: TapdiskOptions) {
    this.#options = options;
    this.#log = options.log;
  }

  /** The engine tuning for the exports asked for: rings alone batch smaller (io/engine.ts). */
  #tuning(): Readonly<EngineOptions> {
    const o = this.#options;
    return o.nbd.length === 0 && o.fuse === null ? RING_ENGINE : SERVER_ENGINE;
  }

  /** Opens the disk and starts every export; on failure, undoes what was started and throws. */
  async start(): Promise<Serving> {
    const o = this.#options;
    const warning = await this.#warnRawOverImage(o.spec);
    const disk = await openDisk(o.spec, {
      readOnly: o.readOnly,
      engine: o.engine,
      ...this.#tuning(),
      pollMicros: o.pollMicros,
    });
    const gate = this.#gate = new DiskGate(disk, { readAhead: o.readAhead });
    const exports: string[] = [], uris: string[] = [];
    try {
      if (o.ring !== null) {
        const ring = this.#ring = new LocalRingListener(
          gate,
          o.ring,
          (line) => this.#log.info(line),
          o.pollMicros,
        );
        this.#ringServing = ring.serve().catch((e) => {
          this.#log.error("ring listener failed", { error: (e as Error).message });
        });
        exports.push(`ring:unix:${o.ring}`);
      }
      if (o.nbd.length > 0) {
        const nbd = this.#nbd = new NbdServer(gate, {
          exportName: o.exportName,
          readOnly: o.readOnly,
          log: this.#log.with({ component: "nbd" }),
        });
        for (const address of o.nbd) {
          const bound = await nbd.listen(address);
          exports.push(formatNbdAddress(bound));
          uris.push(nbdUri(bound));
        }
      }
      if (o.fuse !== null) {
        const fuse = new FuseExport(gate, o.fuse, {
          readOnly: o.readOnly,
          // Other exports write behind the file's page cache: the file must not cache.
          directIo: o.nbd.length > 0 || o.ring !== null,
          log: this.#log.with({ component: "fuse" }),
          pollMicros: o.pollMicros,
          passthrough: o.passthrough,
          ioThreads: o.ioThreads,
          uring: o.uring,
        });
        await fuse.mount();
        this.#fuse = fuse;
        exports.push(`fuse:${o.fuse}`);
        fuse.ended.then(() => {
          if (this.#stopping !== null) return;
          const name = `fuse:${o.fuse}`;
          if (fuse.failure !== null) {
            this.#log.error("the FUSE export failed", { mount: o.fuse, error: fuse.failure });
            this.#options.onExportEnded?.(name, fuse.failure);
          } else {
            this.#log.warn("the FUSE file was unmounted from outside", { mount: o.fuse });
            this.#options.onExportEnded?.(name, "unmounted from outside");
          }
        });
      }
      if (o.xen !== null) exports.push(await this.#startXen(gate, o.xen));
    } catch (e) {
      await this.stop();
      throw e;
    }
    this.#log.info("serving", { spec: o.spec, size: gate.size, exports: exports.join(" ") });
    return warning === null
      ? { size: gate.size, exports, uris }
      : { size: gate.size, exports, uris, warning };
  }

  /**
   * Plugs the vbd into xenstore and returns once it waits for the guest; throws if it cannot
   * (no such domain, no xenstored). Should it end on its own later (the guest domain was
   * destroyed), the disk serves on without it and onExportEnded is told.
   */
  async #startXen(gate: DiskGate, target: XenTarget): Promise<string> {
    const o = this.#options;
    const name = xenExport(target);
    let stop!: () => void, plugged!: () => void;
    const stopped = new Promise<void>((resolve) => stop = resolve);
    const ready = new Promise<void>((resolve) => plugged = resolve);
    const serving = serveXenVbd(gate, {
      frontendDomid: target.domid,
      devid: target.devid,
      xenstore: o.xenstore,
      unplugTimeoutMs: o.xenUnplugTimeoutMs,
      pollMicros: o.pollMicros,
      stop: stopped,
      log: this.#log.with({ component: "xen" }),
      ready: () => plugged(),
    });
    const early = serving.then((reason) => {
      throw new Error(`${name} ended before the device was plugged: ${reason}`);
    });
    await Promise.race([ready, early]); // serveXenVbd's errors are one-line already
    const xen: XenServing = {
      name,
      stop: () => {
        xen.stopRequested = true;
        stop();
      },
      stopRequested: false,
      done: serving.then(
        (reason) => this.#xenEnded(xen, reason, false),
        (e) => this.#xenEnded(xen, (e as Error).message.split("\n")[0], true),
      ),
    };
    this.#xen = xen;
    return name;
  }

  #xenEnded(xen: XenServing, reason: string, failed: boolean): void {
    const fields = { export: xen.name, reason };
    if (xen.stopRequested) {
      if (failed) this.#log.error("unplugging the Xen device failed", fields);
      else this.#log.info("the Xen device is unplugged", fields);
    } else {
      this.#log.warn("the Xen export ended: the disk serves on without it", fields);
      this.#options.onExportEnded?.(xen.name, reason);
    }
  }

  /** True from start() until a stop begins (again after a stop refused for a busy FUSE file). */
  get serving(): boolean {
    return this.#gate !== null && this.#stopping === null;
  }

  #requireGate(): DiskGate {
    if (this.#gate === null || this.#stopping !== null) {
      throw new Error("the disk is not being served");
    }
    return this.#gate;
  }

  /** Holds new requests, waits for those in flight and flushes. */
  async pause(): Promise<void> {
    const gate = this.#requireGate();
    if (this.#fuse?.passthrough) {
      throw new Error(
        "cannot pause: the kernel writes this disk's image directly (FUSE passthrough); " +
          "attach it without --passthrough to pause it",
      );
    }
    await gate.pause();
    this.#log.info("paused");
  }

  /**
   * Continues; with `reopen`, on that image (same size, same read-only flag). Returns the new
   * spec's warning, if it has one.
   */
  async resume(reopen?: string): Promise<string | null> {
    const gate = this.#requireGate();
    if (reopen === undefined) {
      await gate.resume();
      this.#log.info("resumed");
      return null;
    }
    if (!gate.paused) throw new Error("resume --reopen: the disk is not paused (pause it first)");
    const warning = await this.#warnRawOverImage(reopen);
    const next = await openDisk(reopen, {
      readOnly: this.#options.readOnly,
      engine: this.#options.engine,
      ...this.#tuning(),
      pollMicros: this.#options.pollMicros,
    });
    try {
      await gate.resume(next);
    } catch (e) {
      await next.close();
      throw e;
    }
    this.#log.info("resumed on a new image", { spec: reopen });
    return warning;
  }

  async #warnRawOverImage(spec: string): Promise<string | null> {
    const warning = await rawOverImage(spec, { readOnly: this.#options.readOnly });
    if (warning !== null) this.#log.warn(warning);
    return warning;
  }

  stats(): GateStats {
    return this.#requireGate().stats();
  }

  /**
   * Unmounts the FUSE file first (`fuse`: how long to wait while it is in use, or abort it);
   * then stops accepting, lets the requests in flight (and any held by a pause) finish, flushes
   * and closes the disk. While the FUSE file is in use after the grace time it rejects with a
   * one-line MountError (EBUSY) having touched nothing else: the disk goes on serving, and
   * stop() may be called again. Otherwise every call resolves when the one stop has finished;
   * a call with `fuse.force` while a stop waits for the file aborts the FUSE connection.
   */
  stop(fuse: FuseCloseOptions = {}): Promise<void> {
    if (this.#stopping !== null) {
      if (fuse.force) this.#fuse?.close({ force: true }).catch(() => {});
      return this.#stopping;
    }
    const stopping = this.#stopping = this.#stop(fuse);
    return stopping;
  }

  async #stop(fuseOptions: FuseCloseOptions): Promise<void> {
    if (this.#fuse !== null) {
      try {
        // Before anything else: if the file is in use, nothing has been stopped yet.
        await this.#fuse.close(fuseOptions);
      } catch (e) {
        this.#stopping = null;
        throw e;
      }
    }
    const gate = this.#gate;
    this.#ring?.stop();
    this.#xen?.stop(); // the guest is asked to let go; it may still send requests until then
    if (gate?.paused) await gate.resume(); // held requests were accepted: let them complete
    await this.#nbd?.close();
    await this.#xen?.done;
    await this.#ringServing;
    if (gate !== null) {
      try {
        if (!gate.info.readOnly) await gate.flush();
      } finally {
        await gate.close();
      }
    }
    this.#log.info("stopped");
  }
}
