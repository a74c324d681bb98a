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
