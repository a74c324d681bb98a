/**
 * One disk served by one tapdisk process: the disk behind a DiskGate, exported on a blkif ring
 * and/or NBD listeners. pause/resume/stats act on the gate; stop() drains and closes everything.
 */
import type { Logger } from "../cli/log.ts";
import { openDisk } from "../drivers/mod.ts";
import type { EngineKind } from "../io/engine.ts";
import { formatNbdAddress, type NbdAddress, nbdUri } from "../nbd/address.ts";
import { NbdServer } from "../nbd/server.ts";
import { LocalRingListener } from "../ring/local.ts";
import { DiskGate, type GateStats } from "../serve/gate.ts";

export interface TapdiskOptions {
  spec: string;
  readOnly: boolean;
  engine?: EngineKind;
  /** A Unix socket path for the blkif ring, or null. */
  ring: string | null;
  nbd: NbdAddress[];
  exportName: string;
  log: Logger;
}

export interface Serving {
  size: number;
  /** ring:unix:PATH, unix:PATH, tcp:HOST:PORT (the bound port). */
  exports: string[];
  uris: string[];
}

export class TapdiskServer {
  readonly #options: TapdiskOptions;
  readonly #log: Logger;
  #gate: DiskGate | null = null;
  #nbd: NbdServer | null = null;
  #ring: LocalRingListener | null = null;
  #ringServing: Promise<void> = Promise.resolve();
  #stopping: Promise<void> | null = null;

  constructor(options: TapdiskOptions) {
    this.#options = options;
    this.#log = options.log;
  }

  /** Opens the disk and starts every export; on failure, undoes what was started and throws. */
  async start(): Promise<Serving> {
    const o = this.#options;
    const disk = await openDisk(o.spec, { readOnly: o.readOnly, engine: o.engine });
    const gate = this.#gate = new DiskGate(disk);
    const exports: string[] = [], uris: string[] = [];
    try {
      if (o.ring !== null) {
        const ring = this.#ring = new LocalRingListener(
          gate,
          o.ring,
          (line) => this.#log.info(line),
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
    } catch (e) {
      await this.stop();
      throw e;
    }
    this.#log.info("serving", { spec: o.spec, size: gate.size, exports: exports.join(" ") });
    return { size: gate.size, exports, uris };
  }

  #requireGate(): DiskGate {
    if (this.#gate === null || this.#stopping !== null) {
      throw new Error("the disk is not being served");
    }
    return this.#gate;
  }

  /** Holds new requests, waits for those in flight and flushes. */
  async pause(): Promise<void> {
    await this.#requireGate().pause();
    this.#log.info("paused");
  }

  /** Continues; with `reopen`, on that image (same size, same read-only flag). */
  async resume(reopen?: string): Promise<void> {
    const gate = this.#requireGate();
    if (reopen === undefined) {
      await gate.resume();
      this.#log.info("resumed");
      return;
    }
    if (!gate.paused) throw new Error("resume --reopen: the disk is not paused (pause it first)");
    const next = await openDisk(reopen, {
      readOnly: this.#options.readOnly,
      engine: this.#options.engine,
    });
    try {
      await gate.resume(next);
    } catch (e) {
      await next.close();
      throw e;
    }
    this.#log.info("resumed on a new image", { spec: reopen });
  }

  stats(): GateStats {
    return this.#requireGate().stats();
  }

  /**
   * Stops accepting, lets the requests in flight (and any held by a pause) finish, flushes and
   * closes the disk. Idempotent: every call resolves when the one stop has finished.
   */
  stop(): Promise<void> {
    this.#stopping ??= this.#stop();
    return this.#stopping;
  }

  async #stop(): Promise<void> {
    const gate = this.#gate;
    this.#ring?.stop();
    if (gate?.paused) await gate.resume(); // held requests were accepted: let them complete
    await this.#nbd?.close();
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
