/**
 * The one error funnel for foreign calls: every failing libc, libaio or io_uring call becomes a
 * SysError that names the errno, the call and (when there is one) the path.
 */
import { libc } from "./libc.ts";

// errno numbers on Linux x86-64, indexed by value.
const ERRNO_NAMES: readonly string[] = [
  "OK",
  "EPERM",
  "ENOENT",
  "ESRCH",
  "EINTR",
  "EIO",
  "ENXIO",
  "E2BIG",
  "ENOEXEC",
  "EBADF",
  "ECHILD",
  "EAGAIN",
  "ENOMEM",
  "EACCES",
  "EFAULT",
  "ENOTBLK",
  "EBUSY",
  "EEXIST",
  "EXDEV",
  "ENODEV",
  "ENOTDIR",
  "EISDIR",
  "EINVAL",
  "ENFILE",
  "EMFILE",
  "ENOTTY",
  "ETXTBSY",
  "EFBIG",
  "ENOSPC",
  "ESPIPE",
  "EROFS",
  "EMLINK",
  "EPIPE",
  "EDOM",
  "ERANGE",
  "EDEADLK",
  "ENAMETOOLONG",
  "ENOLCK",
  "ENOSYS",
  "ENOTEMPTY",
  "ELOOP",
];
const HIGH_ERRNO_NAMES: Readonly<Record<number, string>> = {
  61: "ENODATA",
  75: "EOVERFLOW",
  95: "EOPNOTSUPP",
  104: "ECONNRESET",
  110: "ETIMEDOUT",
  111: "ECONNREFUSED",
  121: "EREMOTEIO",
  122: "EDQUOT",
  125: "ECANCELED",
};

/** The symbolic name of an errno value (`22` → `"EINVAL"`). */
export function errnoName(errno: number): string {
  return ERRNO_NAMES[errno] ?? HIGH_ERRNO_NAMES[errno] ?? `E${errno}`;
}

/** The C library's description of an errno value. */
export function errnoMessage(errno: number): string {
  const p = libc.strerror(errno);
  return p === null ? `error ${errno}` : Deno.UnsafePointerView.getCString(p);
}

/** A path as it goes into a one-line message: control characters escaped, JSON-style. */
export function printable(path: string): string {
  // deno-lint-ignore no-control-regex
  return /[\x00-\x1f\x7f]/.test(path) ? JSON.stringify(path) : path;
}

/** A failed system or library call: `EINVAL open /x: Invalid argument`. */
export class SysError extends Error {
  override name = "SysError";
  /** The errno value, e.g. 22. */
  readonly errno: number;
  /** The errno name, e.g. "EINVAL". */
  readonly code: string;
  /** The call that failed, e.g. "open". */
  readonly call: string;
  readonly path: string | undefined;

  constructor(errno: number, call: string, path?: string) {
    const code = errnoName(errno);
    super(
      `${code} ${call}${path === undefined ? "" : " " + printable(path)}: ${errnoMessage(errno)}`,
    );
    this.errno = errno;
    this.code = code;
    this.call = call;
    this.path = path;
  }
}

// errno lives in thread-local storage; this view is the JS thread's slot, made once.
const errnoSlot = new Int32Array(
  Deno.UnsafePointerView.getArrayBuffer(libc.__errno_location()!, 4),
);

/** The calling thread's errno. Meaningful only right after a synchronous call that failed. */
export function lastErrno(): number {
  return errnoSlot[0];
}

/**
 * Checks the result of a synchronous libc call that returns -1 and sets errno on failure.
 * Must be called right after the call, with no `await` in between.
 */
export function check<T extends number | bigint>(rc: T, call: string, path?: string): T {
  if (rc < 0) throw new SysError(errnoSlot[0], call, path);
  return rc;
}

/** Checks the result of a call that returns -errno on failure (libaio, io_uring). */
export function checkNeg<T extends number | bigint>(rc: T, call: string, path?: string): T {
  if (rc < 0) throw new SysError(-Number(rc), call, path);
  return rc;
}

/**
 * Runs a blocking libc call on Deno's thread pool (`nonblocking` symbol) so the event loop stays
 * free. errno set on a pool thread cannot be read back, so on failure the call is repeated once
 * synchronously to learn it: the calls used this way (pread, pwrite, fsync, fallocate, lseek,
 * ioctl) fail deterministically, and the repeat is only ever paid on the error path.
 */
export async function pooled<T extends number | bigint>(
  call: string,
  path: string | undefined,
  onPool: () => Promise<T>,
  onThread: () => T,
): Promise<T> {
  const rc = await onPool();
  if (rc >= 0) return rc;
  const again = onThread();
  if (again >= 0) return again;
  throw new SysError(errnoSlot[0], call, path);
}
