/**
 * /dev/xen/gntdev (Linux uapi xen/gntdev.h; shared/specs/xen-backend.md §4): mapping a foreign
 * domain's granted pages (the blkif ring) and grant copy (the data). Structs are built once in
 * foreign memory, so the kernel reads them at fixed addresses and no call allocates.
 * In a PV dom0 a gntdev descriptor belongs to the address space that opened it: open and map in
 * the same process, never pass the descriptor on.
 */
import { check } from "./errno.ts";
import { FileHandle } from "./file.ts";
import { libc } from "./libc.ts";
import { AlignedMemory, Mapping } from "./memory.ts";
import { MAP_SHARED, O_RDWR, PROT_READ, PROT_WRITE } from "./constants.ts";

/** _IOC(_IOC_NONE, 'G', nr, size), checked against the C header in tests/ffi/xen_devices_test.ts. */
export const GNTDEV = {
  IOCTL_MAP_GRANT_REF: 0x00184700n,
  IOCTL_UNMAP_GRANT_REF: 0x00104701n,
  IOCTL_SET_UNMAP_NOTIFY: 0x00104707n,
  IOCTL_GRANT_COPY: 0x00104708n,
  UNMAP_NOTIFY_CLEAR_BYTE: 1,
  UNMAP_NOTIFY_SEND_EVENT: 2,
  /** sizeof(struct ioctl_gntdev_grant_copy_segment) */
  COPY_SEGMENT_SIZE: 24,
  GNTCOPY_SOURCE_GREF: 1,
  GNTCOPY_DEST_GREF: 2,
} as const;

const PAGE = 4096;

/** GNTST_* status codes (xen/grant_table.h), by negated value. */
const GNTST_NAMES = [
  "okay",
  "general_error",
  "bad_domain",
  "bad_gntref",
  "bad_handle",
  "bad_virt_addr",
  "bad_dev_addr",
  "no_device_space",
  "permission_denied",
  "bad_page",
  "bad_copy_arg",
  "address_too_big",
  "eagain",
  "no_space",
];

/** A grant status code's name, e.g. -3 → "bad_gntref". */
export function grantStatusName(status: number): string {
  return GNTST_NAMES[-status] ?? `status ${status}`;
}

/** An open gntdev descriptor. */
export class GrantDevice implements Disposable {
  readonly handle: FileHandle;

  constructor(path = "/dev/xen/gntdev") {
    this.handle = FileHandle.open(path, O_RDWR);
  }

  /**
   * Maps `refs` of domain `domid` as one contiguous range (a multi-page ring is contiguous in
   * our mapping). A bad ref fails here: the grant hypercall happens at mmap.
   */
  map(domid: number, refs: readonly number[], options: { writable?: boolean } = {}): GrantMapping {
    const count = refs.length;
    if (count === 0) throw new RangeError("No grant references to map");
    const arg = new Uint8Array(16 + 8 * count);
    const v = new DataView(arg.buffer);
    v.setUint32(0, count, true);
    for (let i = 0; i < count; i++) {
      v.setUint32(16 + 8 * i, domid, true);
      v.setUint32(20 + 8 * i, refs[i], true);
    }
    check(libc.ioctl(this.handle.fd, GNTDEV.IOCTL_MAP_GRANT_REF, arg), "ioctl(MAP_GRANT_REF)");
    const index = v.getBigUint64(8, true);
    try {
      const prot = options.writable === false ? PROT_READ : PROT_READ | PROT_WRITE;
      const mapping = new Mapping(this.handle.fd, count * PAGE, {
        offset: Number(index),
        prot,
        flags: MAP_SHARED,
        what: `grants ${refs.join(",")} of domain ${domid}`,
      });
      return new GrantMapping(this, mapping, index, count);
    } catch (e) {
      this.unmapIndex(index, count);
      throw e;
    }
  }

  /** Releases a reservation made by MAP_GRANT_REF (after munmap). */
  unmapIndex(index: bigint, count: number): void {
    const arg = new Uint8Array(16);
    const v = new DataView(arg.buffer);
    v.setBigUint64(0, index, true);
    v.setUint32(8, count, true);
    check(libc.ioctl(this.handle.fd, GNTDEV.IOCTL_UNMAP_GRANT_REF, arg), "ioctl(UNMAP_GRANT_REF)");
  }

  /** Runs the first `count` segments of `batch`; per-segment results are in batch.status(i). */
  copy(batch: GrantCopyBatch, count: number): void {
    batch.setCount(count);
    check(libc.ioctl(this.handle.fd, GNTDEV.IOCTL_GRANT_COPY, batch.arg), "ioctl(GRANT_COPY)");
  }

  [Symbol.dispose](): void {
    this.handle.close();
  }
}

/** Foreign pages mapped through gntdev; dispose unmaps them and releases the grants. */
export class GrantMapping implements Disposable {
  readonly bytes: Uint8Array<ArrayBuffer>;
  readonly index: bigint;
  readonly pages: number;
  readonly #device: GrantDevice;
  #mapping: Mapping | null;

  constructor(device: GrantDevice, mapping: Mapping, index: bigint, pages: number) {
    this.#device = device;
    this.#mapping = mapping;
    this.bytes = mapping.bytes;
    this.index = index;
    this.pages = pages;
  }

  [Symbol.dispose](): void {
    if (this.#mapping === null) return;
    this.#mapping[Symbol.dispose]();
    this.#mapping = null;
    this.#device.unmapIndex(this.index, this.pages);
  }
}

/**
 * An array of grant-copy segments (struct ioctl_gntdev_grant_copy_segment) and the ioctl
 * argument pointing at it, allocated once. A segment copies between a local address and a
 * (gref, offset, domid) of a foreign domain, in either direction.
 */
export class GrantCopyBatch implements Disposable {
  readonly capacity: number;
  readonly #memory: AlignedMemory;
  readonly #view: DataView;
  readonly #arg = new Uint8Array(16);
  readonly #argView = new DataView(this.#arg.buffer);

  constructor(capacity: number) {
    this.capacity = capacity;
    this.#memory = new AlignedMemory(capacity * GNTDEV.COPY_SEGMENT_SIZE, 64);
    const b = this.#memory.bytes;
    this.#view = new DataView(b.buffer, b.byteOffset, b.byteLength);
    this.#argView.setBigUint64(8, BigInt(this.#memory.address), true);
  }

  /** The ioctl argument (struct ioctl_gntdev_grant_copy). */
  get arg(): Uint8Array {
    return this.#arg;
  }

  setCount(count: number): void {
    if (count > this.capacity) throw new RangeError(`${count} grant copies > ${this.capacity}`);
    this.#argView.setUint32(0, count, true);
  }

  /**
   * Segment `i`: `len` bytes between local `address` and foreign page `gref` at `offset`;
   * `toGuest` copies local → foreign (a read's data), otherwise foreign → local.
   */
  set(
    i: number,
    address: number,
    domid: number,
    gref: number,
    offset: number,
    len: number,
    toGuest: boolean,
  ): void {
    const v = this.#view, at = i * GNTDEV.COPY_SEGMENT_SIZE;
    const local = toGuest ? at : at + 8, foreign = toGuest ? at + 8 : at;
    v.setBigUint64(local, BigInt(address), true);
    v.setUint32(foreign, gref, true);
    v.setUint16(foreign + 4, offset, true);
    v.setUint16(foreign + 6, domid, true);
    v.setUint16(at + 16, len, true);
    v.setUint16(at + 18, toGuest ? GNTDEV.GNTCOPY_DEST_GREF : GNTDEV.GNTCOPY_SOURCE_GREF, true);
    v.setInt16(at + 20, 0, true);
  }

  /** A copy of segment `i`'s 24 bytes (for diagnostics and the layout test). */
  segmentBytes(i: number): Uint8Array {
    const at = i * GNTDEV.COPY_SEGMENT_SIZE;
    return new Uint8Array(this.#view.buffer, this.#view.byteOffset + at, GNTDEV.COPY_SEGMENT_SIZE)
      .slice();
  }

  /** Sets segment `i`'s result, as the kernel does (for fakes standing in for gntdev). */
  setStatus(i: number, status: number): void {
    this.#view.setInt16(i * GNTDEV.COPY_SEGMENT_SIZE + 20, status, true);
  }

  /** Segment `i`'s GNTST_* result after copy(). */
  status(i: number): number {
    return this.#view.getInt16(i * GNTDEV.COPY_SEGMENT_SIZE + 20, true);
  }

  [Symbol.dispose](): void {
    this.#memory[Symbol.dispose]();
  }
}

/** A grant copy whose segment failed: names the grant and Xen's status. */
export class GrantError extends Error {
  constructor(readonly gref: number, readonly status: number) {
    super(`grant copy of grant ${gref} failed: ${grantStatusName(status)}`);
  }
}
