/**
 * The blktap kernel device (`/dev/xen/blktapN`, the 2006 "blktap1" driver): its ioctls and the
 * layout of its mmap, per shared/specs/blktap-ring.md §3. There is no Xen on these machines, so
 * this transport is written against the documented ABI and its constants are tested; the request
 * path behind it is the same RingServer the local transport drives.
 */
import { check } from "../ffi/errno.ts";
import { FileHandle } from "../ffi/file.ts";
import { libc } from "../ffi/libc.ts";
import { Mapping } from "../ffi/memory.ts";
import { O_RDWR } from "../ffi/constants.ts";
import { BLKIF_LAYOUT } from "./blkif.ts";

export const BLKTAP = {
  IOCTL_KICK_FE: 1,
  IOCTL_KICK_BE: 2,
  IOCTL_SETMODE: 3,
  IOCTL_SENDPID: 4,
  IOCTL_NEWINTF: 5,
  IOCTL_MINOR: 6,
  IOCTL_MAJOR: 7,
  IOCTL_QUERY_ALLOC_REQS: 8,
  IOCTL_FREEINTF: 9,
  IOCTL_NEWINTF_EXT: 50,
  IOCTL_PRINT_IDXS: 100,
  MODE_PASSTHROUGH: 0,
  MODE_INTERCEPT_FE: 1,
  MODE_INTERCEPT_BE: 2,
  MODE_INTERPOSE: 3,
  RING_PAGES: 1,
  MAX_PENDING_REQS: 32,
  MMAP_PAGES: 32 * 11,
} as const;

/** An open blktap ring device: its ring page and data pages mapped, as tapdisk used them. */
export class BlktapDevice implements Disposable {
  readonly file: FileHandle;
  readonly mapping: Mapping;

  constructor(minor: number) {
    this.file = FileHandle.open(`/dev/xen/blktap${minor}`, O_RDWR);
    try {
      this.#ioctl(BLKTAP.IOCTL_SETMODE, BLKTAP.MODE_INTERCEPT_FE);
      this.#ioctl(BLKTAP.IOCTL_SENDPID, Deno.pid);
      const pages = BLKTAP.RING_PAGES + BLKTAP.MMAP_PAGES;
      this.mapping = new Mapping(this.file.fd, pages * BLKIF_LAYOUT.PAGE_SIZE, {
        what: this.file.path,
      });
    } catch (e) {
      this.file.close();
      throw e;
    }
  }

  /** The ring page. */
  get ring(): Uint8Array {
    return this.mapping.bytes.subarray(0, BLKIF_LAYOUT.PAGE_SIZE);
  }

  /** The data pages; the kernel puts request slot `id`'s segment `s` at page `id × 11 + s`. */
  get data(): Uint8Array {
    return this.mapping.bytes.subarray(BLKTAP.RING_PAGES * BLKIF_LAYOUT.PAGE_SIZE);
  }

  /** Tells the kernel new responses are on the ring. */
  kick(): void {
    this.#ioctl(BLKTAP.IOCTL_KICK_FE, 0);
  }

  #ioctl(request: number, arg: number): void {
    // These ioctls take their argument by value, not through a pointer.
    check(
      libc.ioctl_value(this.file.fd, BigInt(request), BigInt(arg)),
      `ioctl(${request})`,
      this.file.path,
    );
  }

  [Symbol.dispose](): void {
    this.mapping[Symbol.dispose]();
    this.file.close();
  }
}
