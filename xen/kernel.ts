/**
 * What a vbd backend needs of the dom0 kernel, behind one small interface: map a frontend's ring,
 * bind its event channel, and reach its data pages. `Dom0Kernel` is the real one (gntdev and
 * evtchn); the state-machine tests plug in an in-process fake.
 */
import { EventChannels } from "../ffi/evtchn.ts";
import { GrantDevice } from "../ffi/gntdev.ts";
import type { SegmentData } from "../ring/segments.ts";
import { GrantSegments } from "./grant_segments.ts";
import { MappedSegments } from "./mapped_segments.ts";

/** One bound event channel. */
export interface EventPort extends Disposable {
  /** Signals the frontend; false once the channel is closed (the peer died). */
  notify(): boolean;
  /** Takes and re-arms pending events; how many there were. */
  drain(): number;
  /** Resolves when an event may be pending, or after wake(). */
  wait(): Promise<void>;
  wake(): void;
}

export interface XenKernel {
  /** Maps the frontend's ring pages, contiguous, in order. */
  mapRing(domid: number, refs: readonly number[]): { readonly bytes: Uint8Array } & Disposable;
  bindEvent(domid: number, remotePort: number): EventPort;
  /** The data path of one ring (grant copy). */
  segments(domid: number, maxIndirectSegments: number): SegmentData & Disposable;
}

class Dom0Port implements EventPort {
  readonly local: number;
  readonly #ch: EventChannels;

  constructor(domid: number, remotePort: number) {
    this.#ch = new EventChannels();
    try {
      try {
        this.#ch.restrictDomain(domid);
      } catch { /* older kernels lack it: defence in depth only */ }
      this.local = this.#ch.bindInterdomain(domid, remotePort);
    } catch (e) {
      this.#ch[Symbol.dispose]();
      throw e;
    }
  }

  notify(): boolean {
    return this.#ch.notify(this.local);
  }

  drain(): number {
    return this.#ch.drain();
  }

  wait(): Promise<void> {
    return this.#ch.wait();
  }

  wake(): void {
    this.#ch.wake();
  }

  [Symbol.dispose](): void {
    this.#ch[Symbol.dispose]();
  }
}

/** How a request's data reaches the guest's pages (docs/xen.md). */
export type DataPath = "copy" | "map";
export const DATA_PATHS: readonly DataPath[] = ["copy", "map"];

/** gntdev + evtchn of the running dom0 kernel. */
export class Dom0Kernel implements XenKernel, Disposable {
  #gnt: GrantDevice | null = null;
  readonly #dataPath: DataPath;

  constructor(dataPath: DataPath = "copy") {
    this.#dataPath = dataPath;
  }

  get #grants(): GrantDevice {
    return this.#gnt ??= new GrantDevice();
  }

  mapRing(domid: number, refs: readonly number[]) {
    return this.#grants.map(domid, refs);
  }

  bindEvent(domid: number, remotePort: number): EventPort {
    return new Dom0Port(domid, remotePort);
  }

  segments(domid: number, maxIndirectSegments: number): SegmentData & Disposable {
    if (this.#dataPath === "map") {
      return new MappedSegments(this.#grants, domid, maxIndirectSegments);
    }
    return new GrantSegments(this.#grants, domid, maxIndirectSegments);
  }

  [Symbol.dispose](): void {
    this.#gnt?.[Symbol.dispose]();
    this.#gnt = null;
  }
}
