/** The one error class of the xenstore client. */

/**
 * A failed xenstore operation: `xenstore write /local/domain/0/x: EACCES`. `code` is the errno
 * name xenstored sent (`ENOENT`, `EACCES`, `EAGAIN`, …), or one of the client's own:
 * `EINVAL`/`E2BIG` for a request refused before sending, `ECONNRESET` when the connection was
 * lost with the request unanswered, `ESHUTDOWN` once the client is closed.
 */
export class XenStoreError extends Error {
  override name = "XenStoreError";
  readonly code: string;

  constructor(code: string, message: string, options?: ErrorOptions) {
    super(message, options);
    this.code = code;
  }
}

/** `path` shortened for a one-line message. */
export function shortPath(path: string): string {
  return path.length > 96 ? `${path.slice(0, 64)}…(${path.length} bytes)` : path;
}

/** `xenstore <op> <path>: <detail>` (detail defaults to the code). */
export function xsError(
  code: string,
  op: string,
  path: string,
  detail: string = code,
  cause?: unknown,
): XenStoreError {
  const where = path === "" ? op : `${op} ${shortPath(path)}`;
  return new XenStoreError(
    code,
    `xenstore ${where}: ${detail}`,
    cause === undefined ? undefined : { cause },
  );
}
