/**
 * The NBD server: serves one BlockTarget as an export on any number of TCP and Unix listeners.
 * All connections share the one target (one driver instance, one cache), so a FLUSH on any
 * connection covers writes acknowledged on every other, and CAN_MULTI_CONN is advertised.
 */
import type { BlockTarget } from "../drivers/target.ts";
import { type Logger, silentLogger } from "../cli/log.ts";
import { formatNbdAddress, type NbdAddress } from "./address.ts";
import { Connection } from "./connection.ts";
import { type ExportDescription, handshake, type Negotiated } from "./handshake.ts";
import { SocketReader } from "./reader.ts";
import { ReplyWriter } from "./reply_writer.ts";

export interface NbdServerOptions {
  /** The export's name; clients asking for "" (the default export) get it too. */
  exportName?: string;
  /** Refuse writes even if the target accepts them. */
  readOnly?: boolean;
  description?: string;
  log?: Logger;
}

/** Connections at once; more are closed right after accept. */
export const MAX_CLIENTS = 128;
/** A client must choose an export within this time. */
const HANDSHAKE_TIMEOUT_MS = 10_000;
/** How long close() lets clients finish before cutting them off. */
const CLOSE_GRACE_MS = 10_000;

interface Client {
  conn: Deno.Conn;
  connection: Connection | null;
}

export class NbdServer {
  readonly target: BlockTarget;
  readonly exportName: string;
  readonly #readOnly: boolean;
  readonly #description: string;
  readonly #log: Logger;
  readonly #listeners: { listener: Deno.Listener; address: NbdAddress }[] = [];
  readonly #clients = new Set<Client>();
  readonly #running = new Set<Promise<void>>();
  #closing: Promise<void> | null = null;
  #nextClient = 1;

  constructor(target: BlockTarget, options: NbdServerOptions = {}) {
    this.target = target;
    this.exportName = options.exportName ?? "";
    this.#readOnly = (options.readOnly ?? false) || target.info.readOnly;
    this.#description = options.description ?? `tapd ${target.name}`;
    this.#log = options.log ?? silentLogger;
  }

  /** Starts listening; resolves with the bound address (TCP port 0 becomes the real port). */
  async listen(address: NbdAddress): Promise<NbdAddress> {
    if (this.#closing !== null) throw new Error("the NBD server is closed");
    let listener: Deno.Listener;
    let bound: NbdAddress;
    if (address.transport === "unix") {
      await removeStaleSocket(address.path);
      listener = Deno.listen({ transport: "unix", path: address.path });
      bound = address;
    } else {
      listener = Deno.listen({ hostname: address.hostname, port: address.port });
      bound = { ...address, port: (listener.addr as Deno.NetAddr).port };
    }
    this.#listeners.push({ listener, address: bound });
    this.#track(this.#accept(listener, bound));
    return bound;
  }

  /** Clients connected now. */
  get connections(): number {
    return this.#clients.size;
  }

  /**
   * Stops accepting; clients still negotiating are hung up on; requests in flight finish and
   * are answered; new requests are answered ESHUTDOWN; then every connection closes.
   */
  close(): Promise<void> {
    this.#closing ??= (async () => {
      for (const { listener, address } of this.#listeners) {
        try {
          listener.close();
        } catch { /* already closed */ }
        if (address.transport === "unix") {
          try {
            Deno.removeSync(address.path);
          } catch { /* gone */ }
        }
      }
      for (const client of this.#clients) {
        if (client.connection === null) closeQuietly(client.conn);
        else client.connection.stop();
      }
      const cutOff = setTimeout(() => {
        for (const client of this.#clients) closeQuietly(client.conn);
      }, CLOSE_GRACE_MS);
      while (this.#running.size > 0) await Promise.all([...this.#running]);
      clearTimeout(cutOff);
    })();
    return this.#closing;
  }

  #track(p: Promise<void>): void {
    this.#running.add(p);
    p.finally(() => this.#running.delete(p));
  }

  async #accept(listener: Deno.Listener, address: NbdAddress): Promise<void> {
    for (;;) {
      let conn: Deno.Conn;
      try {
        conn = await listener.accept();
      } catch (e) {
        if (this.#closing === null) {
          this.#log.error("accept failed", {
            address: formatNbdAddress(address),
            error: String(e),
          });
        }
        return;
      }
      if (this.#closing !== null) {
        closeQuietly(conn);
        continue;
      }
      if (this.#clients.size >= MAX_CLIENTS) {
        this.#log.warn("too many clients: refusing a connection", { limit: MAX_CLIENTS });
        closeQuietly(conn);
        continue;
      }
      if (address.transport === "tcp") (conn as Deno.TcpConn).setNoDelay(true);
      this.#track(this.#serve(conn, address));
    }
  }

  async #serve(conn: Deno.Conn, address: NbdAddress): Promise<void> {
    const id = this.#nextClient++;
    const log = this.#log.with({ client: id });
    const client: Client = { conn, connection: null };
    this.#clients.add(client);
    const peer = conn.remoteAddr.transport === "tcp"
      ? `${conn.remoteAddr.hostname}:${conn.remoteAddr.port}`
      : formatNbdAddress(address);
    log.debug("client connected", { peer });
    try {
      const reader = new SocketReader(conn);
      const description: ExportDescription = {
        name: this.exportName,
        description: this.#description,
        size: this.target.size,
        minimumBlock: this.target.info.logicalSectorSize,
        readOnly: this.#readOnly,
      };
      const timer = setTimeout(() => {
        log.debug("handshake timed out", { peer });
        closeQuietly(conn);
      }, HANDSHAKE_TIMEOUT_MS);
      let nego: Negotiated | null;
      try {
        nego = await handshake(reader, conn, description, () => this.#closing !== null);
      } finally {
        clearTimeout(timer);
      }
      if (nego === null) {
        log.debug("handshake ended without an export", { peer });
        return;
      }
      const writer = new ReplyWriter(conn);
      const connection = new Connection(this.target, reader, writer, nego, this.#readOnly, log);
      client.connection = connection;
      if (this.#closing !== null) connection.stop();
      log.info("client attached", {
        peer,
        structured: nego.structuredReplies,
        blockStatus: nego.blockStatus,
      });
      await connection.serve();
      log.info("client detached", { peer, requests: connection.requests });
    } catch (e) {
      // A client that vanishes mid-handshake (a probe, a port scan) is not worth a warning.
      const level = client.connection === null ? "debug" : "warn";
      log[level]("connection failed", { peer, error: (e as Error).message });
    } finally {
      this.#clients.delete(client);
      closeQuietly(conn);
    }
  }
}

function closeQuietly(conn: Deno.Conn): void {
  try {
    conn.close();
  } catch { /* already closed */ }
}

/** Removes a Unix socket file nobody listens on; refuses to steal a live one. */
async function removeStaleSocket(path: string): Promise<void> {
  let info: Deno.FileInfo;
  try {
    info = Deno.lstatSync(path);
  } catch {
    return;
  }
  if (!info.isSocket) throw new Error(`${path} exists and is not a socket`);
  try {
    const probe = await Deno.connect({ transport: "unix", path });
    probe.close();
    throw new Error(`${path} is in use by another server`);
  } catch (e) {
    if (!(e instanceof Deno.errors.ConnectionRefused)) throw e;
    Deno.removeSync(path);
  }
}
