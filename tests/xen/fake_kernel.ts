/**
 * An in-process stand-in for a guest's memory and dom0's gntdev/evtchn, for the vbd state-machine
 * tests: the guest grants pages of its own memory (ArrayBuffers), the "kernel" maps them, copies
 * to and from them by decoding the real GrantCopyBatch segments, and carries events both ways.
 * It counts what is mapped and bound, so tests can assert that teardown released everything.
 */
import { GNTDEV, type GrantCopyBatch } from "../../ffi/gntdev.ts";
import { foreignMemory } from "../../ffi/memory.ts";
import { GrantSegments } from "../../xen/grant_segments.ts";
import type { EventPort, XenKernel } from "../../xen/kernel.ts";
import type { SegmentData } from "../../ring/segments.ts";

const PAGE = 4096;
const GNTST_BAD_GNTREF = -3;

/** The guest side: its granted pages and its end of the event channels. */
export class FakeGuest {
  readonly pages = new Map<number, Uint8Array>();
  readonly #ports = new Map<number, FakePort>();
  #nextRef = 8;
  #nextPort = 5;
  /** Called when the backend notifies the guest's port. */
  onNotify: (port: number) => void = () => {};

  /** Grants `count` contiguous pages of fresh memory; returns their refs and the memory. */
  grant(count: number): { refs: number[]; bytes: Uint8Array } {
    const bytes = new Uint8Array(count * PAGE);
    const refs: number[] = [];
    for (let i = 0; i < count; i++) {
      const ref = this.#nextRef++;
      this.pages.set(ref, bytes.subarray(i * PAGE, (i + 1) * PAGE));
      refs.push(ref);
    }
    return { refs, bytes };
  }

  revoke(ref: number): void {
    this.pages.delete(ref);
  }

  /** Allocates an unbound port for the backend to bind. */
  allocPort(): number {
    return this.#nextPort++;
  }

  /** The guest kicks its port. */
  kick(port: number): void {
    this.#ports.get(port)?.fire();
  }

  attach(remote: number, port: FakePort): void {
    this.#ports.set(remote, port);
  }

  detach(remote: number): void {
    this.#ports.delete(remote);
  }
}

class FakePort implements EventPort {
  #pending = 0;
  #waiter: (() => void) | null = null;
  #closed = false;

  constructor(
    readonly guest: FakeGuest,
    readonly remote: number,
    readonly kernel: FakeKernel,
  ) {}

  fire(): void {
    this.#pending++;
    this.#waiter?.();
    this.#waiter = null;
  }

  notify(): boolean {
    if (this.#closed) return false;
    queueMicrotask(() => this.guest.onNotify(this.remote));
    return true;
  }

  drain(): number {
    const n = this.#pending;
    this.#pending = 0;
    return n;
  }

  wait(): Promise<void> {
    if (this.#pending > 0) return Promise.resolve();
    return new Promise((resolve) => this.#waiter = resolve);
  }

  wake(): void {
    this.#waiter?.();
    this.#waiter = null;
  }

  [Symbol.dispose](): void {
    if (this.#closed) return;
    this.#closed = true;
    this.guest.detach(this.remote);
    this.kernel.boundPorts--;
  }
}

export class FakeKernel implements XenKernel {
  mappedRings = 0;
  boundPorts = 0;
  openSegments = 0;
  readonly guest: FakeGuest;

  constructor(guest: FakeGuest) {
    this.guest = guest;
  }

  mapRing(_domid: number, refs: readonly number[]) {
    const first = this.guest.pages.get(refs[0]);
    if (first === undefined) throw new Error(`mmap: bad grant ${refs[0]}`);
    refs.forEach((ref, i) => {
      const p = this.guest.pages.get(ref);
      if (p?.buffer !== first.buffer || p.byteOffset !== first.byteOffset + i * PAGE) {
        throw new Error(`mmap: bad grant ${ref}`);
      }
    });
    this.mappedRings++;
    let mapped = true;
    return {
      bytes: new Uint8Array(first.buffer, first.byteOffset, refs.length * PAGE),
      [Symbol.dispose]: () => {
        if (mapped) this.mappedRings--;
        mapped = false;
      },
    };
  }

  bindEvent(_domid: number, remotePort: number): EventPort {
    const port = new FakePort(this.guest, remotePort, this);
    this.guest.attach(remotePort, port);
    this.boundPorts++;
    return port;
  }

  segments(domid: number, maxIndirectSegments: number): SegmentData & Disposable {
    const segs = new GrantSegments(
      { copy: (b, n) => this.#copy(b, n) },
      domid,
      maxIndirectSegments,
    );
    this.openSegments++;
    let open = true;
    return {
      maxIndirectSegments,
      indirectPages: (g, c) => segs.indirectPages(g, c),
      acquire: (s, n, w) => segs.acquire(s, n, w),
      release: (b, s, n, d) => segs.release(b, s, n, d),
      [Symbol.dispose]: () => {
        if (!open) return;
        open = false;
        this.openSegments--;
        segs[Symbol.dispose]();
      },
    };
  }

  /** Decodes each segment as the kernel would and copies between guest pages and local memory. */
  #copy(batch: GrantCopyBatch, count: number): void {
    for (let i = 0; i < count; i++) {
      const v = new DataView(batch.segmentBytes(i).buffer);
      const flags = v.getUint16(18, true), len = v.getUint16(16, true);
      const toGuest = flags === GNTDEV.GNTCOPY_DEST_GREF;
      const local = toGuest ? 0 : 8, foreign = toGuest ? 8 : 0;
      const address = v.getBigUint64(local, true);
      const ref = v.getUint32(foreign, true), offset = v.getUint16(foreign + 4, true);
      const page = this.guest.pages.get(ref);
      if (page === undefined || offset + len > PAGE) {
        batch.setStatus(i, GNTST_BAD_GNTREF);
        continue;
      }
      const mem = new Uint8Array(foreignMemory(address, len));
      if (toGuest) page.set(mem, offset);
      else mem.set(page.subarray(offset, offset + len));
      batch.setStatus(i, 0);
    }
  }
}
