/** Errors a disk reports for a request it refuses, with the errno an export should answer. */

const ERRNO: Readonly<Record<DiskErrorCode, number>> = {
  EINVAL: 22,
  ENOSPC: 28,
  EROFS: 30,
  EIO: 5,
  EOPNOTSUPP: 95,
};

export type DiskErrorCode = "EINVAL" | "ENOSPC" | "EROFS" | "EIO" | "EOPNOTSUPP";

export class DiskError extends Error {
  override name = "DiskError";
  readonly code: DiskErrorCode;
  readonly errno: number;

  constructor(code: DiskErrorCode, message: string, options?: ErrorOptions) {
    super(`${code} ${message}`, options);
    this.code = code;
    this.errno = ERRNO[code];
  }
}

/** An image file that is not what it claims to be, or that tapd does not support. */
export class ImageError extends Error {
  override name = "ImageError";
  readonly path: string;

  constructor(path: string, why: string) {
    super(`Cannot open ${JSON.stringify(path)}: ${why}`);
    this.path = path;
  }
}

/** Thrown when another process's locks keep this one out of an image (drivers/image_lock.ts). */
export class ImageLockError extends Error {
  override name = "ImageLockError";
  /** What refused the open, without the `Cannot open "PATH"` before it. */
  readonly reason: string;

  constructor(opening: string, reason: string) {
    super(`${opening}: ${reason}`);
    this.reason = reason;
  }
}

/**
 * The error of an image whose backing file (`what`: "its backing file NAME", "its parent NAME")
 * failed to open with `e`: a deeper image's own ImageError as it is, else one line that names
 * each file once (a lock's reason without its "Cannot open").
 */
export function backingError(path: string, what: string, e: unknown): Error {
  if (e instanceof ImageError) return e;
  const why = e instanceof ImageLockError ? e.reason : (e as Error).message;
  return new ImageError(path, `cannot open ${what}: ${why}`);
}
