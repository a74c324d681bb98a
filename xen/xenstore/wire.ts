/**
 * The xenstore wire protocol (shared/specs/xen-backend.md §2; Xen `io/xs_wire.h`): message
 * types, error names, limits, the 16-byte little-endian header, a frame parser that works on a
 * byte stream split anywhere, payload helpers and path checks. Numbers are checked against the
 * C header by tests/xen/xs_wire_check_test.ts.
 */

/** `enum xsd_sockmsg_type`. 20 was XS_RESTRICT and is gone. */
export const XsType = {
  CONTROL: 0,
  DIRECTORY: 1,
  READ: 2,
  GET_PERMS: 3,
  WATCH: 4,
  UNWATCH: 5,
  TRANSACTION_START: 6,
  TRANSACTION_END: 7,
  INTRODUCE: 8,
  RELEASE: 9,
  GET_DOMAIN_PATH: 10,
  WRITE: 11,
  MKDIR: 12,
  RM: 13,
  SET_PERMS: 14,
  WATCH_EVENT: 15,
  ERROR: 16,
  IS_DOMAIN_INTRODUCED: 17,
  RESUME: 18,
  SET_TARGET: 19,
  RESET_WATCHES: 21,
  DIRECTORY_PART: 22,
} as const;
export type XsType = typeof XsType[keyof typeof XsType];

/** `xsd_errors[]`, in the header's order. */
export const XS_ERRORS = [
  "EINVAL",
  "EACCES",
  "EEXIST",
  "EISDIR",
  "ENOENT",
  "ENOMEM",
  "ENOSPC",
  "EIO",
  "ENOTEMPTY",
  "ENOSYS",
  "EROFS",
  "EBUSY",
  "EAGAIN",
  "EISCONN",
  "E2BIG",
  "EPERM",
] as const;

/** `sizeof(struct xsd_sockmsg)`. */
export const HEADER_SIZE = 16;
/** `XENSTORE_PAYLOAD_MAX`: a longer message makes xenstored drop the connection. */
export const PAYLOAD_MAX = 4096;
/** `XENSTORE_ABS_PATH_MAX`. */
export const ABS_PATH_MAX = 3072;
/** `XENSTORE_REL_PATH_MAX` (relative paths are for domains; this client uses absolute ones). */
export const REL_PATH_MAX = 2048;

/** Watch-only paths that xenstored fires on domain release and introduction. */
export const SPECIAL_PATHS: readonly string[] = ["@releaseDomain", "@introduceDomain"];

/** The name of a message type, for messages and logs: `WRITE`, or `type 99`. */
export function typeName(type: number): string {
  for (const [name, value] of Object.entries(XsType)) if (value === type) return name;
  return `type ${type}`;
}

/** One message, either direction. */
export interface Frame {
  type: number;
  reqId: number;
  txId: number;
  payload: Uint8Array;
}

/** Header plus payload in one buffer. Throws if the payload is over PAYLOAD_MAX. */
export function encodeFrame(frame: Frame): Uint8Array<ArrayBuffer> {
  const len = frame.payload.length;
  if (len > PAYLOAD_MAX) {
    throw new RangeError(`xenstore payload of ${len} bytes is over the ${PAYLOAD_MAX}-byte limit`);
  }
  const bytes = new Uint8Array(HEADER_SIZE + len);
  const view = new DataView(bytes.buffer);
  view.setUint32(0, frame.type, true);
  view.setUint32(4, frame.reqId, true);
  view.setUint32(8, frame.txId, true);
  view.setUint32(12, len, true);
  bytes.set(frame.payload, HEADER_SIZE);
  return bytes;
}

/** The total length (header + payload) of the frame starting `bytes`, or null if < 16 bytes. */
export function frameLength(bytes: Uint8Array): number | null {
  if (bytes.length < HEADER_SIZE) return null;
  const view = new DataView(bytes.buffer, bytes.byteOffset, HEADER_SIZE);
  return HEADER_SIZE + view.getUint32(12, true);
}

/**
 * Cuts a byte stream into frames. Bytes may arrive split at any boundary; `push` returns every
 * frame completed so far (payloads are copies) and keeps the rest. A header announcing more than
 * PAYLOAD_MAX bytes throws: the stream cannot be trusted after that.
 */
export class FrameParser {
  #pending: Uint8Array = new Uint8Array(0);

  /** Bytes held back as the start of an incomplete frame. */
  get buffered(): number {
    return this.#pending.length;
  }

  push(chunk: Uint8Array): Frame[] {
    let bytes = chunk;
    if (this.#pending.length > 0) {
      bytes = new Uint8Array(this.#pending.length + chunk.length);
      bytes.set(this.#pending);
      bytes.set(chunk, this.#pending.length);
    }
    const frames: Frame[] = [];
    let at = 0;
    while (bytes.length - at >= HEADER_SIZE) {
      const view = new DataView(bytes.buffer, bytes.byteOffset + at, HEADER_SIZE);
      const len = view.getUint32(12, true);
      if (len > PAYLOAD_MAX) {
        throw new RangeError(
          `xenstore frame announces ${len} payload bytes, over the ${PAYLOAD_MAX}-byte limit`,
        );
      }
      if (bytes.length - at < HEADER_SIZE + len) break;
      frames.push({
        type: view.getUint32(0, true),
        reqId: view.getUint32(4, true),
        txId: view.getUint32(8, true),
        payload: bytes.slice(at + HEADER_SIZE, at + HEADER_SIZE + len),
      });
      at += HEADER_SIZE + len;
    }
    this.#pending = bytes.slice(at);
    return frames;
  }
}

const encoder = new TextEncoder();
const decoder = new TextDecoder();

/** `a\0b\0…`: each string followed by a NUL. */
export function nulTerminated(...parts: string[]): Uint8Array {
  return encoder.encode(parts.map((p) => p + "\0").join(""));
}

/** `path\0` followed by `value` with no terminator (the WRITE payload). */
export function pathAndValue(path: string, value: string): Uint8Array {
  return encoder.encode(path + "\0" + value);
}

/** The NUL-terminated strings of a payload (a missing final NUL is tolerated; empties dropped). */
export function splitStrings(payload: Uint8Array): string[] {
  return decoder.decode(payload).split("\0").filter((s) => s.length > 0);
}

/** A payload as text, without a trailing NUL if there is one (READ values have none). */
export function payloadText(payload: Uint8Array): string {
  const end = payload.length > 0 && payload[payload.length - 1] === 0
    ? payload.length - 1
    : payload.length;
  return decoder.decode(payload.subarray(0, end));
}

/** A READ reply value: the payload exactly (xenstored sends no trailing NUL). */
export function payloadValue(payload: Uint8Array): string {
  return decoder.decode(payload);
}

const PATH_CHARS = /^[A-Za-z0-9\-/_@]*$/;

/**
 * Why `path` is not a valid absolute xenstore path, or null if it is. With `special`, the
 * watch-only paths `@releaseDomain` and `@introduceDomain` are accepted too.
 */
export function pathProblem(path: string, special = false): string | null {
  if (special && SPECIAL_PATHS.includes(path)) return null;
  if (!path.startsWith("/")) return "not an absolute path";
  if (!PATH_CHARS.test(path)) return "characters outside [A-Za-z0-9-/_@]";
  if (path.length > ABS_PATH_MAX) return `longer than ${ABS_PATH_MAX} bytes`;
  if (path.includes("//")) return `contains "//"`;
  if (path.length > 1 && path.endsWith("/")) return `ends with "/"`;
  return null;
}

/** Why `perm` is not a permission string (`n0`, `r5`, `w1`, `b7`), or null if it is one. */
export function permProblem(perm: string): string | null {
  const m = /^[nrwb](0|[1-9][0-9]{0,4})$/.exec(perm);
  if (m === null || Number(m[1]) > 0xffff) return `bad permission "${perm}"`;
  return null;
}
