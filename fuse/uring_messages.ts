/** What the main thread and the FUSE-over-io_uring thread (fuse/uring_thread.ts) send each other. */

/**
 * The layout of one ring entry's memory, shared by both threads: a header area (the kernel's
 * struct fuse_uring_req_header: in_out 128 bytes, op_in 128, ring_ent_in_out 32) and a payload
 * buffer as large as the biggest request.
 */
export const URING_HEADER = {
  size: 288,
  stride: 512,
  inOut: 0,
  opIn: 128,
  /** fuse_uring_ent_in_out: flags u64, commit_id u64, payload_sz u32. */
  commitId: 256 + 8,
  payloadSize: 256 + 16,
} as const;

/** The one message the thread gets: what to serve, and where. */
export interface UringSetup {
  /** The connection's /dev/fuse descriptor (the commands name the connection by it). */
  fuseFd: number;
  /** The raw image (DirectAccess.fd), its size and the alignment of what the thread serves. */
  imageFd: number;
  size: number;
  alignment: number;
  readOnly: boolean;
  /** The kernel's queue this thread serves (one per possible CPU), and its entries there. */
  queue: number;
  entries: number;
  /** Addresses of the entries' headers (URING_HEADER.stride apart) and payloads. */
  headers: number;
  payloads: number;
  payloadSize: number;
  /**
   * Entries the main thread has answered, for the thread to commit: an Int32Array of
   * [next slot written, next slot taken, ring of entry numbers (one slot more than entries)];
   * `wakeFd` (an eventfd) is written after each.
   */
  commits: SharedArrayBuffer;
  wakeFd: number;
  /** DirectAccess.fence's memory. */
  fence: SharedArrayBuffer;
  /** Where the thread counts its reads and writes (DirectAccess.statsArea). */
  stats: SharedArrayBuffer;
  statsAt: number;
}

/** What the thread sends. */
export type UringMessage =
  /** The entries are registered: the kernel sends every request through them from now on. */
  | { kind: "ready" }
  /** A request the thread does not serve itself, to be answered through entry `ent`. */
  | { kind: "request"; ent: number; bytes: Uint8Array<ArrayBuffer> }
  /** The connection ended (unmounted or aborted). */
  | { kind: "ended" }
  /** The thread failed; `lost`: after "ready", so requests on its queue wait for nobody. */
  | { kind: "failed"; message: string; lost: boolean };
