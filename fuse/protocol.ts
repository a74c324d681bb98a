/**
 * The FUSE kernel protocol as tapd uses it (shared/specs/protocols.md §17–§20): opcodes, INIT and
 * FOPEN flags, and the byte offsets of the structs read and written. x86-64, little-endian; every
 * struct is a multiple of 8 bytes. Nothing here does I/O.
 */

/** The protocol version tapd speaks; the reply carries min(kernel minor, ours). */
export const KERNEL_MAJOR = 7;
export const OUR_MINOR = 36;

/** Request opcodes (fuse_in_header.opcode). */
export const OP = {
  LOOKUP: 1,
  FORGET: 2,
  GETATTR: 3,
  SETATTR: 4,
  OPEN: 14,
  READ: 15,
  WRITE: 16,
  STATFS: 17,
  RELEASE: 18,
  FSYNC: 20,
  FLUSH: 25,
  INIT: 26,
  INTERRUPT: 36,
  DESTROY: 38,
  NOTIFY_REPLY: 41,
  BATCH_FORGET: 42,
  FALLOCATE: 43,
  LSEEK: 46,
} as const;

/** Opcodes that never get a reply. */
export function isNoReply(opcode: number): boolean {
  return opcode === OP.FORGET || opcode === OP.BATCH_FORGET || opcode === OP.NOTIFY_REPLY;
}

/** fuse_in_header (40 bytes). */
export const IN_HEADER = {
  size: 40,
  len: 0,
  opcode: 4,
  unique: 8,
  nodeid: 16,
  uid: 24,
  gid: 28,
  pid: 32,
} as const;

/** fuse_out_header (16 bytes): len u32, error i32 (0 or -errno), unique u64. */
export const OUT_HEADER_SIZE = 16;

/** INIT flag bits (fuse_init_in.flags / fuse_init_out.flags). */
export const INIT_FLAG = {
  ASYNC_READ: 1 << 0,
  BIG_WRITES: 1 << 5,
  ASYNC_DIO: 1 << 15,
  PARALLEL_DIROPS: 1 << 18,
  MAX_PAGES: 1 << 22,
  /** flags2 is meaningful (fuse_init_in.flags2, fuse_init_out.flags2). */
  INIT_EXT: 1 << 30,
} as const;

/** flags2 bits (bit 32 + n of the 64-bit flag set). */
export const INIT_FLAG2 = {
  /** Opens may name a backing file that the kernel reads and writes itself (Linux 6.9+). */
  PASSTHROUGH: 1 << 5,
  /** Requests may come through io_uring ring entries instead of /dev/fuse (Linux 6.14+). */
  OVER_IO_URING: 1 << 9,
} as const;

/** What tapd asks for (masked by the kernel's offer): no writeback cache, no splice, no locks. */
export const WANTED_INIT_FLAGS = INIT_FLAG.ASYNC_READ | INIT_FLAG.BIG_WRITES |
  INIT_FLAG.ASYNC_DIO | INIT_FLAG.PARALLEL_DIROPS | INIT_FLAG.MAX_PAGES;

/** fuse_init_in: major, minor, max_readahead, flags at these offsets of the body. */
export const INIT_IN = { major: 0, minor: 4, maxReadahead: 8, flags: 12, flags2: 16 } as const;

/** fuse_init_out (64 bytes; 24 for kernel minors below 23). */
export const INIT_OUT = {
  size: 64,
  compatSize: 24,
  major: 0,
  minor: 4,
  maxReadahead: 8,
  flags: 12,
  maxBackground: 16,
  congestionThreshold: 18,
  maxWrite: 20,
  timeGran: 24,
  maxPages: 28,
  flags2: 32,
  /** How deep file systems may stack over the backing files of passthrough opens. */
  maxStackDepth: 36,
} as const;

/** fuse_attr (88 bytes), inside attr_out at 16 and entry_out at 40. */
export const ATTR = {
  size: 88,
  ino: 0,
  fileSize: 8,
  blocks: 16,
  atime: 24,
  mtime: 32,
  ctime: 40,
  atimensec: 48,
  mtimensec: 52,
  ctimensec: 56,
  mode: 60,
  nlink: 64,
  uid: 68,
  gid: 72,
  rdev: 76,
  blksize: 80,
} as const;

/** fuse_attr_out (104 bytes): attr_valid u64, attr_valid_nsec u32, dummy, attr. */
export const ATTR_OUT = { size: 104, attrValid: 0, attrValidNsec: 8, attr: 16 } as const;

/** fuse_setattr_in (88 bytes) and its `valid` bits. */
export const SETATTR_IN = {
  valid: 0,
  size: 16,
  atime: 32,
  mtime: 40,
  ctime: 48,
  atimensec: 56,
  mtimensec: 60,
  ctimensec: 64,
  mode: 68,
  uid: 76,
  gid: 80,
} as const;
export const FATTR = {
  MODE: 1,
  UID: 2,
  GID: 4,
  SIZE: 8,
  ATIME: 16,
  MTIME: 32,
  ATIME_NOW: 128,
  MTIME_NOW: 256,
  CTIME: 1024,
} as const;

/**
 * fuse_open_in (8): flags u32 (the open(2) flags). fuse_open_out (16): fh u64, open_flags u32,
 * backing_id i32 (with FOPEN.PASSTHROUGH).
 */
export const OPEN_IN = { flags: 0 } as const;
export const OPEN_OUT = { size: 16, fh: 0, openFlags: 8, backingId: 12 } as const;

/** FOPEN flags. */
export const FOPEN = {
  DIRECT_IO: 0x01,
  KEEP_CACHE: 0x02,
  PARALLEL_DIRECT_WRITES: 0x40,
  PASSTHROUGH: 0x80,
} as const;

/**
 * FUSE_DEV_IOC_BACKING_OPEN = _IOW(229, 1, struct fuse_backing_map { i32 fd; u32 flags; u64 }):
 * registers a backing file on the connection and returns its id (needs CAP_SYS_ADMIN).
 */
export const FUSE_DEV_IOC_BACKING_OPEN = 0x4010e501;
/** _IOR(229, 0, uint32_t): attaches a new /dev/fuse descriptor to the connection of another. */
export const FUSE_DEV_IOC_CLONE = 0x8004e500;
export const BACKING_MAP_SIZE = 16;

/** fuse_read_in / fuse_write_in (40 bytes each): fh, offset u64 @8, size u32 @16. */
export const RW_IN = { size: 40, offset: 8, length: 16 } as const;

/** fuse_write_out (8): size u32. */
export const WRITE_OUT_SIZE = 8;

/** fuse_fallocate_in (32): fh, offset u64 @8, length u64 @16, mode u32 @24. */
export const FALLOCATE_IN = { offset: 8, length: 16, mode: 24 } as const;

/** fuse_lseek_in (24): fh, offset u64 @8, whence u32 @16. fuse_lseek_out (8): offset u64. */
export const LSEEK_IN = { offset: 8, whence: 16 } as const;
export const LSEEK_OUT_SIZE = 8;

/** fuse_interrupt_in (8): the unique of the interrupted request. */
export const INTERRUPT_IN = { unique: 0 } as const;

/** fuse_statfs_out (80). */
export const STATFS_OUT = {
  size: 80,
  blocks: 0,
  bfree: 8,
  bavail: 16,
  files: 24,
  ffree: 32,
  bsize: 40,
  namelen: 44,
  frsize: 48,
} as const;

/** The request offset where a WRITE's data starts: in header + fuse_write_in. */
export const WRITE_DATA_OFFSET = IN_HEADER.size + RW_IN.size;

/** The most data one READ or WRITE carries: max_write, and max_pages × 4 KiB. */
export const MAX_IO = 1024 * 1024;
export const MAX_PAGES = MAX_IO / 4096;
/** Background requests (async direct I/O from a loop device, readahead) in flight at once. */
export const MAX_BACKGROUND = 128;

/** The root inode: in a file-root mount it is the disk. */
export const ROOT_ID = 1n;
