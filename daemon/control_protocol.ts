/**
 * The control socket's protocol: one JSON request per line, one JSON reply per line, in order.
 *
 *   {"verb":"attach","spec":"tap:qcow:/v/a.qcow","nbd":["tcp:127.0.0.1:10810"],"readOnly":false}
 *   {"verb":"attach","spec":"tap:aio:/v/b.img","fuse":"/run/tapd/b.img","uring":true}
 *   {"verb":"attach","spec":"tap:aio:/v/c.img","xen":"3:xvdb"}
 *   {"verb":"attach","spec":"tap:aio:/v/d.img","ring":"unix:/run/d.ring","pollMicros":200}
 *   {"verb":"list"}   {"verb":"detach","id":1}   {"verb":"pause","id":1}   {"verb":"stats","id":1}
 *   {"verb":"resume","id":1,"reopen":"tap:qcow:/v/overlay.qcow"}
 *
 * Replies are {"ok":true, …} (attach, pause and resume carry "disk", list "disks", stats
 * "stats") or {"ok":false,"error":"one line"}. This module checks only the shape of a request;
 * daemon/validate.ts checks what it names (specs, paths, addresses).
 */
import type { GateStats } from "../serve/gate.ts";
import { MAX_IO_THREADS } from "../fuse/io_threads.ts";

export const VERBS = ["attach", "list", "detach", "pause", "resume", "stats"] as const;
export type Verb = typeof VERBS[number];

export type ControlRequest =
  | {
    verb: "attach";
    spec: string;
    nbd: string[];
    ring: string | null;
    /** A FUSE export: the regular file to mount the disk over. */
    fuse: string | null;
    /** A Xen export: "DOMID[:VDEV]", the guest domain and its device (default xvda). */
    xen: string | null;
    readOnly: boolean;
    /** tapdisk's --poll-us (0: sleep until woken). */
    pollMicros: number;
    /** FUSE passthrough for the `fuse` export (a raw disk; it cannot be paused then). */
    passthrough: boolean;
    /** The `fuse` export's I/O threads for a raw disk (null: the default; 0: none). */
    ioThreads: number | null;
    /** FUSE over io_uring for the `fuse` export (a raw disk; else /dev/fuse, with a warning). */
    uring: boolean;
    /** Read ahead of sequential readers (tapdisk's default; false: --no-read-ahead). */
    readAhead: boolean;
  }
  | { verb: "list" }
  | { verb: "detach" | "pause" | "stats"; id: number }
  | { verb: "resume"; id: number; reopen: string | null };

export const DISK_STATES = ["starting", "running", "paused", "stopping", "failed"] as const;
export type DiskState = typeof DISK_STATES[number];

/** One disk as `list` reports it. */
export interface DiskRecord {
  id: number;
  state: DiskState;
  /** The tapdisk process serving it (null once it is gone). */
  pid: number | null;
  spec: string;
  readOnly: boolean;
  /** Bound export addresses: unix:PATH, tcp:HOST:PORT, ring:unix:PATH, fuse:PATH, xen:D:VDEV. */
  exports: string[];
  /** NBD URIs for the exports (the default export, ""). */
  uris: string[];
  /** Virtual size in bytes, once open. */
  size: number | null;
  /**
   * Why a failed disk failed, e.g. "tapdisk killed by SIGKILL"; on a serving disk, why an
   * export ended on its own ("xen:3:xvdb ended: the frontend vanished").
   */
  reason: string | null;
}

export type DiskStats = GateStats & { id: number };

export type ControlReply =
  | {
    ok: true;
    disk?: DiskRecord;
    disks?: DiskRecord[];
    stats?: DiskStats;
    /** Something the user should know about the disk just attached or resumed. */
    warning?: string;
  }
  | { ok: false; error: string };

/** A request the daemon refuses before acting on it. */
export class RequestError extends Error {
  override name = "RequestError";
}

type Json = Record<string, unknown>;

function field<T>(
  req: Json,
  name: string,
  type: "string" | "boolean" | "number",
  fallback?: T,
): T {
  const value = req[name];
  if (value === undefined || value === null) {
    if (fallback !== undefined) return fallback;
    throw new RequestError(`${String(req.verb)}: missing "${name}"`);
  }
  const actual: string = typeof value;
  if (actual !== type) {
    throw new RequestError(`${String(req.verb)}: "${name}" must be a ${type}`);
  }
  return value as T;
}

function pollMicros(req: Json): number {
  const n = field<number>(req, "pollMicros", "number", 0);
  if (!Number.isSafeInteger(n) || n < 0 || n > 1_000_000) {
    throw new RequestError(`attach: "pollMicros" must be a whole number from 0 to 1000000`);
  }
  return n;
}

function ioThreads(req: Json): number | null {
  const n = field<number | null>(req, "ioThreads", "number", null);
  if (n !== null && (!Number.isSafeInteger(n) || n < 0 || n > MAX_IO_THREADS)) {
    throw new RequestError(
      `attach: "ioThreads" must be a whole number from 0 to ${MAX_IO_THREADS}`,
    );
  }
  return n;
}

function diskId(req: Json): number {
  const id = req.id;
  if (typeof id !== "number" || !Number.isSafeInteger(id) || id < 0) {
    throw new RequestError(`${String(req.verb)}: "id" must be a disk number (0, 1, …)`);
  }
  return id;
}

/** Parses one request line; throws a RequestError naming what is wrong. */
export function parseRequest(line: string): ControlRequest {
  let value: unknown;
  try {
    value = JSON.parse(line);
  } catch {
    throw new RequestError("request is not JSON: expected one JSON object per line");
  }
  if (typeof value !== "object" || value === null || Array.isArray(value)) {
    throw new RequestError('request must be a JSON object with a "verb"');
  }
  const req = value as Json;
  if (typeof req.verb !== "string") throw new RequestError('request has no "verb"');
  const verb = req.verb;
  switch (verb) {
    case "list":
      return { verb };
    case "detach":
    case "pause":
    case "stats":
      return { verb, id: diskId(req) };
    case "resume": {
      const reopen = field<string | null>(req, "reopen", "string", null);
      return { verb, id: diskId(req), reopen };
    }
    case "attach": {
      const nbd = req.nbd ?? [];
      if (!Array.isArray(nbd) || nbd.some((a) => typeof a !== "string")) {
        throw new RequestError(`attach: "nbd" must be a list of addresses`);
      }
      const fuse = field<string | null>(req, "fuse", "string", null);
      const passthrough = field<boolean>(req, "passthrough", "boolean", false);
      if (passthrough && fuse === null) {
        throw new RequestError(`attach: "passthrough" is an option of a "fuse" export`);
      }
      const threads = ioThreads(req);
      if (threads !== null && fuse === null) {
        throw new RequestError(`attach: "ioThreads" is an option of a "fuse" export`);
      }
      const uring = field<boolean>(req, "uring", "boolean", false);
      if (uring && fuse === null) {
        throw new RequestError(`attach: "uring" is an option of a "fuse" export`);
      }
      if (passthrough && (uring || (threads ?? 0) > 0)) {
        throw new RequestError(
          `attach: "passthrough" and "${uring ? "uring" : "ioThreads"}" both choose who ` +
            `serves reads and writes: give one`,
        );
      }
      return {
        verb,
        spec: field<string>(req, "spec", "string"),
        nbd: nbd as string[],
        ring: field<string | null>(req, "ring", "string", null),
        fuse,
        xen: field<string | null>(req, "xen", "string", null),
        readOnly: field<boolean>(req, "readOnly", "boolean", false),
        pollMicros: pollMicros(req),
        passthrough,
        ioThreads: threads,
        uring,
        readAhead: field<boolean>(req, "readAhead", "boolean", true),
      };
    }
    default:
      throw new RequestError(
        `unknown verb ${JSON.stringify(verb).slice(0, 40)}: expected one of ${VERBS.join(", ")}`,
      );
  }
}

/** The reply for a failure. */
export function errorReply(e: unknown): ControlReply {
  const message = e instanceof Error ? e.message : String(e);
  return { ok: false, error: message.split("\n")[0] };
}
