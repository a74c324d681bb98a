/** What the main thread and a FUSE I/O thread (fuse/io_thread.ts) send each other. */

/** The one message a thread gets: what to serve. */
export interface IoThreadSetup {
  /** The thread's clone of the connection's /dev/fuse descriptor (blocking). */
  fuseFd: number;
  /** The raw image (DirectAccess.fd), its size and the alignment of what the thread serves. */
  imageFd: number;
  size: number;
  alignment: number;
  readOnly: boolean;
  /** Requests the thread keeps in flight at most. */
  depth: number;
  /** DirectAccess.fence's memory. */
  fence: SharedArrayBuffer;
  /** Where the thread counts its reads and writes (DirectAccess.statsArea). */
  stats: SharedArrayBuffer;
  statsAt: number;
}

/** What a thread sends: a request for the main thread, or its end. */
export type IoThreadMessage =
  /** A request the thread does not serve itself, to be answered on its descriptor. */
  | { kind: "request"; bytes: Uint8Array<ArrayBuffer> }
  /** The connection ended (unmounted or aborted). */
  | { kind: "ended" }
  /** The thread failed; `lost`: requests it had read were left unanswered. */
  | { kind: "failed"; message: string; lost: boolean };
