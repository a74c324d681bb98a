/**
 * NBD wire constants (../shared/specs/protocols.md Part 1). Everything on the wire is
 * big-endian.
 */

export const NBDMAGIC = 0x4e42444d41474943n;
export const IHAVEOPT = 0x49484156454f5054n;
export const REP_MAGIC = 0x0003e889045565a9n;
export const REQUEST_MAGIC = 0x25609513;
export const SIMPLE_REPLY_MAGIC = 0x67446698;
export const STRUCTURED_REPLY_MAGIC = 0x668e33ef;

/** Handshake flags (server) and client flags. */
export const FLAG_FIXED_NEWSTYLE = 1;
export const FLAG_NO_ZEROES = 2;

export const OPT = {
  EXPORT_NAME: 1,
  ABORT: 2,
  LIST: 3,
  STARTTLS: 5,
  INFO: 6,
  GO: 7,
  STRUCTURED_REPLY: 8,
  LIST_META_CONTEXT: 9,
  SET_META_CONTEXT: 10,
} as const;

export const REP = {
  ACK: 1,
  SERVER: 2,
  INFO: 3,
  META_CONTEXT: 4,
  ERR_UNSUP: 0x80000001,
  ERR_POLICY: 0x80000002,
  ERR_INVALID: 0x80000003,
  ERR_UNKNOWN: 0x80000006,
  ERR_SHUTDOWN: 0x80000007,
  ERR_TOO_BIG: 0x80000009,
} as const;

export const INFO = { EXPORT: 0, NAME: 1, DESCRIPTION: 2, BLOCK_SIZE: 3 } as const;

export const CMD = {
  READ: 0,
  WRITE: 1,
  DISC: 2,
  FLUSH: 3,
  TRIM: 4,
  CACHE: 5,
  WRITE_ZEROES: 6,
  BLOCK_STATUS: 7,
} as const;

export const CMD_FLAG = {
  FUA: 1,
  NO_HOLE: 2,
  DF: 4,
  REQ_ONE: 8,
  FAST_ZERO: 16,
} as const;

/** Transmission flags. */
export const TX = {
  HAS_FLAGS: 0x0001,
  READ_ONLY: 0x0002,
  SEND_FLUSH: 0x0004,
  SEND_FUA: 0x0008,
  SEND_TRIM: 0x0020,
  SEND_WRITE_ZEROES: 0x0040,
  SEND_DF: 0x0080,
  CAN_MULTI_CONN: 0x0100,
  SEND_CACHE: 0x0400,
  SEND_FAST_ZERO: 0x0800,
} as const;

export const REPLY_FLAG_DONE = 1;
export const REPLY_TYPE = {
  NONE: 0,
  OFFSET_DATA: 1,
  OFFSET_HOLE: 2,
  BLOCK_STATUS: 5,
  ERROR: 0x8001,
} as const;

/** NBD error values (never raw host errnos). */
export const NBD_ERR = {
  EPERM: 1,
  EIO: 5,
  ENOMEM: 12,
  EINVAL: 22,
  ENOSPC: 28,
  EOVERFLOW: 75,
  ENOTSUP: 95,
  ESHUTDOWN: 108,
} as const;

export const STATE_HOLE = 1;
export const STATE_ZERO = 2;

export const BASE_ALLOCATION = "base:allocation";
/** The id our one metadata context gets. */
export const BASE_ALLOCATION_ID = 1;

/** Block sizes advertised in NBD_INFO_BLOCK_SIZE (the minimum is the disk's sector size). */
export const PREFERRED_BLOCK = 4096;
export const MAX_PAYLOAD = 32 * 1024 * 1024;
/** READ/WRITE lengths accepted even above MAX_PAYLOAD (libnbd allows 64 MiB); more is refused. */
export const MAX_REQUEST = 64 * 1024 * 1024;
/** Strings (export names, context names) are at most this long. */
export const MAX_STRING = 4096;
