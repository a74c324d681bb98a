/**
 * The control socket: a Unix socket created with mode 0600 (never wider, not even for a moment),
 * whose peers must run as the daemon's user (or root), checked with SO_PEERCRED on every
 * connection. Each connection sends JSON-line requests and gets one reply line per request, in
 * order (daemon/control_protocol.ts).
 */
import type { Logger } from "../cli/log.ts";
import type { FileHandle } from "../ffi/file.ts";
import {
  peerCredentials,
  receiveSome,
  sendAll,
  shutdownRead,
  UnixListener,
} from "../ffi/socket.ts";
import {
  type ControlReply,
  type ControlRequest,
  errorReply,
  parseRequest,
} from "./control_protocol.ts";
import { encodeLine, LineSplitter } from "./lines.ts";

export type Handler = (req: ControlRequest) => Promise<ControlReply>;

export class ControlServer {
  readonly path: string;
  readonly #listener: UnixListener;
  readonly #handler: Handler;
  readonly #log: Logger;
  readonly #connections = new Set<FileHandle>();
  readonly #running = new Set<Promise<void>>();
  readonly #uid = Deno.uid() ?? 0;

  /** Creates the socket (an old socket file at `path` is replaced). */
  constructor(path: string, handler: Handler, log: Logger) {
    this.path = path;
    this.#listener = new UnixListener(path, { mode: 0o600 });
    this.#handler = handler;
    this.#log = log;
  }

  /** Accepts connections until stop(); resolves once every connection has ended. */
  async serve(): Promise<void> {
    for (;;) {
      const conn = await this.#listener.accept();
      if (conn === null) break;
      const run = this.#serveConnection(conn).catch((e) => {
        this.#log.warn("control connection failed", { error: (e as Error).message });
      }).finally(() => {
        this.#connections.delete(conn);
        this.#running.delete(run);
        conn.close();
      });
      this.#connections.add(conn);
      this.#running.add(run);
    }
    await Promise.all(this.#running);
  }

  async #serveConnection(conn: FileHandle): Promise<void> {
    const peer = peerCredentials(conn);
    if (peer.uid !== this.#uid && peer.uid !== 0) {
      this.#log.warn("refused a control connection", { peerUid: peer.uid, peerPid: peer.pid });
      await sendAll(
        conn,
        encodeLine(errorReply(
          `permission denied: uid ${peer.uid} may not control a daemon running as uid ${this.#uid}`,
        )),
      );
      return;
    }
    const splitter = new LineSplitter();
    const buf = new Uint8Array(65536);
    for (;;) {
      const n = await receiveSome(conn, buf);
      if (n === 0) break;
      let lines: string[];
      try {
        lines = splitter.push(buf.subarray(0, n));
      } catch (e) {
        await sendAll(conn, encodeLine(errorReply(e)));
        return;
      }
      for (const line of lines) {
        if (line.trim() === "") continue;
        await sendAll(conn, encodeLine(await this.#answer(line, peer.pid)));
      }
    }
  }

  async #answer(line: string, pid: number): Promise<ControlReply> {
    let req: ControlRequest;
    try {
      req = parseRequest(line);
    } catch (e) {
      this.#log.warn("bad control request", { peerPid: pid, error: (e as Error).message });
      return errorReply(e);
    }
    this.#log.info("control request", {
      peerPid: pid,
      verb: req.verb,
      id: "id" in req ? req.id : undefined,
    });
    return await this.#handler(req);
  }

  /** Stops accepting and removes the socket; connections end after their current request. */
  stop(): void {
    this.#listener[Symbol.dispose]();
    for (const conn of this.#connections) shutdownRead(conn);
  }
}
