/**
 * A xenstore client over one connection (shared/specs/xen-backend.md §2, §9.3).
 *
 * Requests are pipelined (at most `maxInFlight` unanswered) and matched to replies by req_id;
 * one reader loop parses frames and accepts WATCH_EVENTs at any time, also between a request
 * and its reply. Watch callbacks are keyed by token.
 *
 * When the connection ends without close(), the client reconnects with backoff and registers
 * every watch again, which fires each once so level-triggered users resynchronise. Requests
 * not yet sent wait for the new connection. Sent, unanswered ones:
 * - READ, DIRECTORY, GET_PERMS, GET_DOMAIN_PATH, MKDIR and WATCH are sent again (repeating
 *   them cannot change the outcome);
 * - WRITE, RM, SET_PERMS and a transaction commit fail with code ECONNRESET (they may or may
 *   not have been applied);
 * - UNWATCH and a transaction abort succeed (the connection's watches and transactions died
 *   with it).
 * A transaction cannot outlive its connection: its later requests fail with ECONNRESET, and
 * transaction() runs fn again on the new connection. If reconnecting fails for good, every
 * request fails with ECONNRESET and `closed` resolves.
 */
import type { Logger } from "../../cli/log.ts";
import { XenStoreError, xsError } from "./error.ts";
import { openTransport, type Transport } from "./transport.ts";
import {
  encodeFrame,
  type Frame,
  FrameParser,
  nulTerminated,
  pathAndValue,
  pathProblem,
  PAYLOAD_MAX,
  payloadText,
  payloadValue,
  permProblem,
  splitStrings,
  typeName,
  XsType,
} from "./wire.ts";

export { XenStoreError } from "./error.ts";

export interface XenStoreOptions {
  /** The xenstored unix socket (default `/var/run/xenstored/socket`). */
  socket?: string;
  /** The xenbus device (default `/dev/xen/xenbus`), used when no socket is given or answers. */
  device?: string;
  /** Opens the transport instead of `socket`/`device`, on connect and every reconnect (tests). */
  openTransport?: () => Promise<Transport>;
  /** Waits before each reconnect attempt; the default totals 10 s. [] never reconnects. */
  reconnectDelaysMs?: readonly number[];
  /** Requests sent and not yet answered, at most (default 8; 1 serialises). */
  maxInFlight?: number;
  /** transaction() runs fn at most this often before giving up on EAGAIN (default 10). */
  maxTransactionAttempts?: number;
  /** Receives reconnects and background errors (watch callback exceptions, lost watches). */
  log?: Logger;
}

const DEFAULT_RECONNECT_DELAYS_MS: readonly number[] = [100, 200, 400, 800, 1500, 3000, 4000];
const DEFAULT_MAX_IN_FLIGHT = 8;
const DEFAULT_TRANSACTION_ATTEMPTS = 10;
const READ_BUFFER_SIZE = 64 * 1024;
const EMPTY = new Uint8Array(0);

/** What becomes of a sent, unanswered request when the connection is lost (see top). */
type OnLost = "replay" | "fail" | "resolve";

interface Reply {
  payload: Uint8Array;
  /** The connection it came on. */
  generation: number;
}

interface RequestSpec {
  op: string;
  path: string;
  type: XsType;
  tx: number;
  payload: Uint8Array;
  onLost: OnLost;
  /** Replays only while this holds. */
  replayIf?: () => boolean;
  /** A watch re-registration after a reconnect. */
  rewatch?: boolean;
}

interface Request extends RequestSpec {
  resolve(reply: Reply): void;
  reject(error: XenStoreError): void;
}

interface Watch {
  readonly path: string;
  readonly cb: (path: string) => void;
  /** Known to the server on the current or a lost connection. */
  registered: boolean;
}

interface OpenTransaction {
  wireId: number;
  generation: number;
}

function hasCode(e: unknown, code: string): boolean {
  return e instanceof XenStoreError && e.code === code;
}

/** One xenstore connection. Everything is asynchronous; many callers may share it. */
export class XenStore implements Disposable {
  readonly #open: () => Promise<Transport>;
  readonly #delays: readonly number[];
  readonly #maxInFlight: number;
  readonly #maxAttempts: number;
  readonly #log: Logger | undefined;

  #conn: Transport | null = null;
  /** Counts connections; requests and transactions belong to one. */
  #generation = 0;
  #state: "open" | "reconnecting" | "closed" = "open";
  #queue: Request[] = [];
  readonly #inflight = new Map<number, Request>();
  readonly #watches = new Map<string, Watch>();
  /** transaction() hands fn a handle of ours, never reused, not the wire id. */
  readonly #txs = new Map<number, OpenTransaction>();
  #nextTx = 1;
  #nextReqId = 1;
  #pumping: Promise<void> | null = null;
  #reader: Promise<void> = Promise.resolve();
  /** Pending sleeps (reconnect backoff, transaction retry), ended early by close(). */
  readonly #sleeps = new Map<ReturnType<typeof setTimeout>, () => void>();
  #resolveClosed!: () => void;

  /** Resolves when the connection is closed by close() or lost for good. */
  readonly closed: Promise<void> = new Promise((resolve) => this.#resolveClosed = resolve);

  private constructor(open: () => Promise<Transport>, options: XenStoreOptions) {
    this.#open = open;
    this.#delays = options.reconnectDelaysMs ?? DEFAULT_RECONNECT_DELAYS_MS;
    this.#maxInFlight = Math.max(1, options.maxInFlight ?? DEFAULT_MAX_IN_FLIGHT);
    this.#maxAttempts = Math.max(1, options.maxTransactionAttempts ?? DEFAULT_TRANSACTION_ATTEMPTS);
    this.#log = options.log;
  }

  /** Connects to xenstored: `socket`, else `device`, else the default socket, else the device. */
  static async connect(options: XenStoreOptions = {}): Promise<XenStore> {
    const open = options.openTransport ??
      (() => openTransport({ socket: options.socket, device: options.device }));
    const xs = new XenStore(open, options);
    xs.#attach(await open());
    return xs;
  }

  /** The value at `path`, or null if there is no such node. */
  async read(path: string, tx = 0): Promise<string | null> {
    this.#checkPath("read", path);
    try {
      const reply = await this.#call(
        { op: "read", path, type: XsType.READ, tx, payload: nulTerminated(path), onLost: "replay" },
      );
      return payloadValue(reply.payload);
    } catch (e) {
      if (hasCode(e, "ENOENT")) return null;
      throw e;
    }
  }

  /** Sets the value at `path`, creating it (and missing parents) if needed. */
  async write(path: string, value: string, tx = 0): Promise<void> {
    this.#checkPath("write", path);
    const payload = pathAndValue(path, value);
    await this.#call({ op: "write", path, type: XsType.WRITE, tx, payload, onLost: "fail" });
  }

  /** Creates `path` (and missing parents) with an empty value; fine if it exists. */
  async mkdir(path: string, tx = 0): Promise<void> {
    this.#checkPath("mkdir", path);
    const payload = nulTerminated(path);
    await this.#call({ op: "mkdir", path, type: XsType.MKDIR, tx, payload, onLost: "replay" });
  }

  /** Removes `path` and everything under it; fine if it does not exist. */
  async rm(path: string, tx = 0): Promise<void> {
    this.#checkPath("rm", path);
    try {
      const payload = nulTerminated(path);
      await this.#call({ op: "rm", path, type: XsType.RM, tx, payload, onLost: "fail" });
    } catch (e) {
      if (!hasCode(e, "ENOENT")) throw e;
    }
  }

  /** The names of the children of `path`; [] if there is no such node. */
  async directory(path: string, tx = 0): Promise<string[]> {
    this.#checkPath("directory", path);
    try {
      const reply = await this.#call({
        op: "directory",
        path,
        type: XsType.DIRECTORY,
        tx,
        payload: nulTerminated(path),
        onLost: "replay",
      });
      return splitStrings(reply.payload);
    } catch (e) {
      if (hasCode(e, "ENOENT")) return [];
      throw e;
    }
  }

  /** The permission list of `path`, owner first (`["n0", "r5"]`). */
  async getPerms(path: string, tx = 0): Promise<string[]> {
    this.#checkPath("getPerms", path);
    const payload = nulTerminated(path);
    const reply = await this.#call(
      { op: "getPerms", path, type: XsType.GET_PERMS, tx, payload, onLost: "replay" },
    );
    return splitStrings(reply.payload);
  }

  /** Replaces the permission list of `path`; the first entry names the owner. */
  async setPerms(path: string, perms: string[], tx = 0): Promise<void> {
    this.#checkPath("setPerms", path);
    if (perms.length === 0) {
      throw xsError("EINVAL", "setPerms", path, "an empty permission list");
    }
    for (const perm of perms) {
      const problem = permProblem(perm);
      if (problem !== null) throw xsError("EINVAL", "setPerms", path, problem);
    }
    const payload = nulTerminated(path, ...perms);
    await this.#call(
      { op: "setPerms", path, type: XsType.SET_PERMS, tx, payload, onLost: "fail" },
    );
  }

  /** `/local/domain/<domid>` as xenstored names it. */
  async getDomainPath(domid: number): Promise<string> {
    const path = String(domid);
    if (!Number.isInteger(domid) || domid < 0 || domid > 0xffff) {
      throw xsError("EINVAL", "getDomainPath", path, "not a domain id");
    }
    const reply = await this.#call({
      op: "getDomainPath",
      path,
      type: XsType.GET_DOMAIN_PATH,
      tx: 0,
      payload: nulTerminated(path),
      onLost: "replay",
    });
    return payloadText(reply.payload);
  }

  /**
   * Registers a watch; cb runs for every WATCH_EVENT with this token (incl. the initial one,
   * which may come before this resolves). Level-triggered use: events may be merged or
   * spurious, so re-read state. A token names one watch at a time. `path` may also be
   * `@releaseDomain` or `@introduceDomain`.
   */
  async watch(path: string, token: string, cb: (path: string) => void): Promise<void> {
    this.#checkPath("watch", path, true);
    this.#checkToken("watch", path, token);
    if (this.#watches.has(token)) {
      throw xsError("EEXIST", "watch", path, `token "${token}" is already in use`);
    }
    const watch: Watch = { path, cb, registered: false };
    this.#watches.set(token, watch);
    try {
      await this.#call({
        op: "watch",
        path,
        type: XsType.WATCH,
        tx: 0,
        payload: nulTerminated(path, token),
        onLost: "replay",
        replayIf: () => this.#watches.get(token) === watch,
      });
      watch.registered = true;
    } catch (e) {
      if (this.#watches.get(token) === watch) this.#watches.delete(token);
      throw e;
    }
  }

  /** Removes the watch registered with `path` and `token`; its callback runs no more. */
  async unwatch(path: string, token: string): Promise<void> {
    this.#checkPath("unwatch", path, true);
    this.#checkToken("unwatch", path, token);
    const watch = this.#watches.get(token);
    if (watch === undefined || watch.path !== path) {
      throw xsError("ENOENT", "unwatch", path, `no watch with token "${token}"`);
    }
    this.#watches.delete(token);
    try {
      await this.#call({
        op: "unwatch",
        path,
        type: XsType.UNWATCH,
        tx: 0,
        payload: nulTerminated(path, token),
        onLost: "resolve",
      });
    } catch (e) {
      // Gone already: the watch was on a connection that has since been replaced.
      if (!hasCode(e, "ENOENT")) throw e;
    }
  }

  /**
   * Runs fn in a transaction and commits. On EAGAIN, or when the connection was lost before
   * the commit was sent, runs fn again in a new transaction (at most `maxTransactionAttempts`
   * times in all, then throws). A throw inside fn aborts the transaction and is rethrown. Keep
   * fn short: no slow awaits inside.
   */
  async transaction<T>(fn: (tx: number) => Promise<T>): Promise<T> {
    for (let attempt = 1;; attempt++) {
      const tx = await this.#startTransaction();
      let result: T;
      try {
        result = await fn(tx);
      } catch (e) {
        const lost = this.#txLost(tx);
        if (!lost) await this.#endTransaction(tx, false).catch(() => {});
        this.#txs.delete(tx);
        if (lost && hasCode(e, "ECONNRESET") && attempt < this.#maxAttempts) continue;
        throw e;
      }
      try {
        await this.#endTransaction(tx, true);
        return result;
      } catch (e) {
        if (hasCode(e, "EAGAIN") && attempt < this.#maxAttempts) {
          await this.#sleep(Math.random() * Math.min(50, 2 ** attempt));
          continue;
        }
        if (hasCode(e, "EAGAIN")) {
          throw xsError("EAGAIN", "transaction commit", "", `EAGAIN ${attempt} times in a row`);
        }
        throw e;
      } finally {
        this.#txs.delete(tx);
      }
    }
  }

  /** Closes the connection; pending and later requests fail with ESHUTDOWN. Idempotent. */
  close(): void {
    this.#shutdown("ESHUTDOWN", "the connection is closed");
  }

  [Symbol.dispose](): void {
    this.close();
  }

  // --- transactions ----------------------------------------------------------------------

  async #startTransaction(): Promise<number> {
    const reply = await this.#call({
      op: "transaction start",
      path: "",
      type: XsType.TRANSACTION_START,
      tx: 0,
      payload: nulTerminated(""),
      onLost: "replay",
    });
    const wireId = Number(payloadText(reply.payload));
    if (!Number.isInteger(wireId) || wireId <= 0 || wireId > 0xffffffff) {
      throw xsError(
        "EIO",
        "transaction start",
        "",
        `bad transaction id "${payloadText(reply.payload)}"`,
      );
    }
    const tx = this.#nextTx++;
    this.#txs.set(tx, { wireId, generation: reply.generation });
    return tx;
  }

  async #endTransaction(tx: number, commit: boolean): Promise<void> {
    await this.#call({
      op: commit ? "transaction commit" : "transaction abort",
      path: "",
      type: XsType.TRANSACTION_END,
      tx,
      payload: nulTerminated(commit ? "T" : "F"),
      onLost: commit ? "fail" : "resolve",
    });
  }

  #txLost(tx: number): boolean {
    const open = this.#txs.get(tx);
    return open === undefined || open.generation !== this.#generation ||
      this.#state !== "open";
  }

  // --- requests --------------------------------------------------------------------------

  #checkPath(op: string, path: string, special = false): void {
    const problem = pathProblem(path, special);
    if (problem !== null) throw xsError("EINVAL", op, path, `invalid path: ${problem}`);
  }

  #checkToken(op: string, path: string, token: string): void {
    if (token === "" || token.includes("\0")) {
      throw xsError("EINVAL", op, path, `invalid token ${JSON.stringify(token)}`);
    }
  }

  #call(spec: RequestSpec): Promise<Reply> {
    if (this.#state === "closed") {
      return Promise.reject(xsError("ESHUTDOWN", spec.op, spec.path, "the connection is closed"));
    }
    if (spec.payload.length > PAYLOAD_MAX) {
      return Promise.reject(xsError(
        "E2BIG",
        spec.op,
        spec.path,
        `payload of ${spec.payload.length} bytes is over the ${PAYLOAD_MAX}-byte limit`,
      ));
    }
    if (spec.tx !== 0 && !this.#txs.has(spec.tx)) {
      return Promise.reject(
        xsError("EINVAL", spec.op, spec.path, `no open transaction ${spec.tx}`),
      );
    }
    return new Promise<Reply>((resolve, reject) => {
      this.#queue.push({ ...spec, resolve, reject });
      this.#pump();
    });
  }

  /** Sends queued requests while the window allows; one writer at a time. */
  #pump(): void {
    if (this.#pumping !== null) return;
    this.#pumping = this.#sendQueued().finally(() => {
      this.#pumping = null;
      if (this.#canSend()) this.#pump(); // queued while the last loop was finishing
    });
  }

  #canSend(): boolean {
    return this.#conn !== null && this.#queue.length > 0 &&
      this.#inflight.size < this.#maxInFlight;
  }

  async #sendQueued(): Promise<void> {
    while (this.#canSend()) {
      const conn = this.#conn!;
      const generation = this.#generation;
      const req = this.#queue.shift()!;
      let txId = 0;
      if (req.tx !== 0) {
        const open = this.#txs.get(req.tx);
        if (open === undefined || open.generation !== generation) {
          req.reject(
            xsError("ECONNRESET", req.op, req.path, "transaction lost with the connection"),
          );
          continue;
        }
        txId = open.wireId;
      }
      const reqId = this.#takeReqId();
      this.#inflight.set(reqId, req);
      try {
        await conn.write(encodeFrame({ type: req.type, reqId, txId, payload: req.payload }));
      } catch (e) {
        this.#lost(generation, e);
      }
    }
  }

  #takeReqId(): number {
    do {
      this.#nextReqId = (this.#nextReqId + 1) >>> 0 || 1;
    } while (this.#inflight.has(this.#nextReqId));
    return this.#nextReqId;
  }

  // --- reading ---------------------------------------------------------------------------

  #attach(conn: Transport): void {
    this.#conn = conn;
    this.#reader = this.#readLoop(conn, this.#generation);
  }

  async #readLoop(conn: Transport, generation: number): Promise<void> {
    const parser = new FrameParser();
    const buf = new Uint8Array(READ_BUFFER_SIZE);
    let failure: unknown = undefined;
    try {
      while (generation === this.#generation) {
        const n = await conn.read(buf);
        if (n === null) break;
        for (const frame of parser.push(buf.subarray(0, n))) {
          if (generation !== this.#generation) break;
          this.#dispatch(frame, generation);
        }
      }
    } catch (e) {
      failure = e;
    }
    this.#lost(generation, failure);
  }

  #dispatch(frame: Frame, generation: number): void {
    if (frame.type === XsType.WATCH_EVENT) {
      this.#fire(frame.payload);
      return;
    }
    const req = this.#inflight.get(frame.reqId);
    if (req === undefined) return; // not ours, e.g. the device transport's wake-up reply
    this.#inflight.delete(frame.reqId);
    if (frame.type === XsType.ERROR) {
      req.reject(xsError(payloadText(frame.payload) || "EIO", req.op, req.path));
    } else if (frame.type !== req.type) {
      const detail = `${typeName(frame.type)} reply to ${typeName(req.type)}`;
      req.reject(xsError("EIO", req.op, req.path, detail));
    } else {
      req.resolve({ payload: frame.payload, generation });
    }
    this.#pump();
  }

  #fire(payload: Uint8Array): void {
    const [path, token] = splitStrings(payload);
    if (path === undefined || token === undefined) return;
    const watch = this.#watches.get(token);
    if (watch === undefined) return; // unwatched since, or left over from a lost connection
    try {
      const result: unknown = watch.cb(path);
      if (result instanceof Promise) {
        result.catch((e: unknown) => this.#callbackFailed(watch, token, e));
      }
    } catch (e) {
      this.#callbackFailed(watch, token, e);
    }
  }

  #callbackFailed(watch: Watch, token: string, e: unknown): void {
    this.#report(`xenstore watch ${watch.path} (token "${token}"): callback failed`, e);
  }

  #report(msg: string, e: unknown): void {
    const error = e instanceof Error ? e.message : String(e);
    if (this.#log !== undefined) this.#log.error(msg, { error });
    else console.error(`${msg}: ${error}`);
  }

  // --- losing and regaining the connection -----------------------------------------------

  #lost(generation: number, cause: unknown): void {
    if (generation !== this.#generation || this.#state !== "open") return;
    this.#generation++;
    this.#conn?.close();
    this.#conn = null;
    const replay: Request[] = [];
    for (const req of this.#inflight.values()) {
      if (req.onLost === "replay" && (req.replayIf?.() ?? true)) replay.push(req);
      else if (req.onLost === "fail") {
        req.reject(
          xsError("ECONNRESET", req.op, req.path, "connection lost before the reply", cause),
        );
      } else req.resolve({ payload: EMPTY, generation });
    }
    this.#inflight.clear();
    this.#queue.unshift(...replay);
    this.#state = "reconnecting";
    this.#log?.warn("xenstore connection lost; reconnecting", {
      error: cause instanceof Error
        ? cause.message
        : cause === undefined
        ? "end of stream"
        : String(cause),
    });
    this.#reconnect(cause);
  }

  async #reconnect(cause: unknown): Promise<void> {
    let lastError = cause;
    for (const [i, ms] of this.#delays.entries()) {
      await this.#sleep(ms);
      if (this.#isClosed()) return;
      try {
        const conn = await this.#open();
        if (this.#isClosed()) {
          conn.close();
          return;
        }
        this.#state = "open";
        this.#attach(conn);
        this.#rewatch();
        this.#log?.info("xenstore reconnected", { attempt: i + 1, watches: this.#watches.size });
        this.#pump();
        return;
      } catch (e) {
        lastError = e;
      }
    }
    const detail = `connection lost; ${this.#delays.length} reconnect attempts failed`;
    this.#report(`xenstore ${detail}`, lastError);
    this.#shutdown("ECONNRESET", detail, lastError);
  }

  /** Queues, ahead of everything else, a WATCH for each watch the old connection had. */
  #rewatch(): void {
    const rewatches: Request[] = [];
    for (const [token, watch] of this.#watches) {
      if (!watch.registered) continue; // its own WATCH is still queued
      rewatches.push({
        op: "watch",
        path: watch.path,
        type: XsType.WATCH,
        tx: 0,
        payload: nulTerminated(watch.path, token),
        onLost: "fail",
        rewatch: true,
        resolve: () => {},
        reject: (e) => {
          if (hasCode(e, "ECONNRESET") || hasCode(e, "ESHUTDOWN")) return;
          if (this.#watches.get(token) === watch) this.#watches.delete(token);
          this.#report(`xenstore watch ${watch.path} (token "${token}"): lost on reconnect`, e);
        },
      });
    }
    this.#queue = [...rewatches, ...this.#queue.filter((req) => !req.rewatch)];
  }

  /** A method, so that TypeScript does not narrow #state across awaits. */
  #isClosed(): boolean {
    return this.#state === "closed";
  }

  #sleep(ms: number): Promise<void> {
    return new Promise((resolve) => {
      const timer = setTimeout(() => {
        this.#sleeps.delete(timer);
        resolve();
      }, ms);
      this.#sleeps.set(timer, resolve);
    });
  }

  #shutdown(code: string, detail: string, cause?: unknown): void {
    if (this.#state === "closed") return;
    this.#state = "closed";
    this.#generation++;
    for (const [timer, wake] of this.#sleeps) {
      clearTimeout(timer);
      wake();
    }
    this.#sleeps.clear();
    this.#conn?.close();
    this.#conn = null;
    const pending = [...this.#inflight.values(), ...this.#queue];
    this.#inflight.clear();
    this.#queue = [];
    for (const req of pending) req.reject(xsError(code, req.op, req.path, detail, cause));
    const settled = [this.#reader, this.#pumping ?? Promise.resolve()];
    Promise.all(settled).finally(() => this.#resolveClosed());
  }
}
