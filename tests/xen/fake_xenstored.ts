/**
 * FakeXenStored: an in-process xenstored on a unix socket in a temporary directory, for tests
 * (shared/specs/xen-backend.md §2). Every client counts as dom0: permissions are stored and
 * returned, never enforced.
 *
 *   const fake = await FakeXenStored.start();
 *   const xs = await XenStore.connect({ socket: fake.socketPath });
 *   …
 *   xs.close();
 *   await fake.close();
 *
 * Semantics, after C xenstored:
 * - A tree of nodes with a value and a permission list. WRITE and MKDIR create missing parents
 *   (empty value); a new node copies its parent's permission list. The tree starts with `/`
 *   (perms `n0`) and `/local/domain/0`. MKDIR of an existing node changes nothing. RM is
 *   recursive; a missing node is fine if its parent exists, else ENOENT; RM of `/` is EINVAL.
 * - READ (value with no trailing NUL), WRITE, MKDIR, RM, DIRECTORY (children in creation
 *   order), GET_PERMS, SET_PERMS, GET_DOMAIN_PATH, WATCH, UNWATCH, RESET_WATCHES,
 *   TRANSACTION_START/END. Anything else gets ENOSYS. Errors are ERROR replies carrying the
 *   errno name. A frame announcing more than 4096 payload bytes drops the connection.
 * - WATCH fires once at once (after the OK, or before it with `eventBeforeWatchReply`, as
 *   through /dev/xen/xenbus), then on every change at or under its path, and for a removed
 *   ancestor (event path = the watch path). `@releaseDomain`/`@introduceDomain` fire only
 *   through releaseDomain()/introduceDomain(). Events caused by a request go out before its
 *   reply.
 * - A transaction works on a snapshot. Its commit gets EAGAIN if any change committed since it
 *   started touched a path the transaction read, wrote, or whose child list it changed. Its
 *   events fire at commit. Transaction ids count from 1 on each connection.
 *
 * Test-side API (synchronous, as dom0, firing watches like a client write would):
 *   start(options?)                 → a running fake; `socketPath` to connect to
 *   read(path)                      → value, or null if missing
 *   write(path, value), mkdir(path), rm(path), setPerms(path, perms)
 *   directory(path)                 → child names ([] if missing)
 *   getPerms(path)                  → permission list, or null if missing
 *   onChange(prefix, cb)            → cb(path) for each change at/under prefix; returns an
 *                                     unsubscribe function
 *   waitFor(path, predicate?, ms?)  → resolves with the value once predicate(value) holds
 *                                     (default: node exists), rejects after ms (default 5000)
 *   releaseDomain(), introduceDomain() fire the special watches
 *   stall(), resume()               → hold incoming requests unanswered, then process them
 *   dropConnections()               → closes every client connection (the clients see EOF)
 *   requests                        → every request received: { type, txId, path }
 *   connectionCount, watches()      → live connections; every registered { path, token }
 *   eventBeforeWatchReply           → settable, see above
 *   close()                         → stops listening, drops clients, removes the temp dir
 */
import {
  encodeFrame,
  type Frame,
  FrameParser,
  nulTerminated,
  pathProblem,
  payloadText,
  permProblem,
  splitStrings,
  XsType,
} from "../../xen/xenstore/wire.ts";

/** One request as the fake received it; `path` is the first string of the payload. */
export interface FakeRequest {
  type: number;
  txId: number;
  path: string;
}

export interface FakeXenStoredOptions {
  /** Send a WATCH's initial event before its OK, as the xenbus device does. */
  eventBeforeWatchReply?: boolean;
}

interface Node {
  value: string;
  perms: string[];
  children: string[];
}

/** An error reply. */
class XsFail {
  constructor(readonly code: string) {}
}

function parentOf(path: string): string {
  const i = path.lastIndexOf("/");
  return i <= 0 ? "/" : path.slice(0, i);
}

function baseName(path: string): string {
  return path.slice(path.lastIndexOf("/") + 1);
}

/** True if `path` is `dir` or below it. */
function isAtOrUnder(path: string, dir: string): boolean {
  if (path === dir) return true;
  return dir === "/" ? path.startsWith("/") : path.startsWith(dir + "/");
}

/** The node tree. Mutations return every path whose node or child list changed. */
class Tree {
  readonly nodes: Map<string, Node>;

  constructor(nodes?: Map<string, Node>) {
    this.nodes = nodes ?? new Map([["/", { value: "", perms: ["n0"], children: [] }]]);
  }

  clone(): Tree {
    const nodes = new Map<string, Node>();
    for (const [path, n] of this.nodes) {
      nodes.set(path, { value: n.value, perms: [...n.perms], children: [...n.children] });
    }
    return new Tree(nodes);
  }

  get(path: string): Node {
    const node = this.nodes.get(path);
    if (node === undefined) throw new XsFail("ENOENT");
    return node;
  }

  #create(path: string, changed: string[]): Node {
    const existing = this.nodes.get(path);
    if (existing !== undefined) return existing;
    const parent = this.#create(parentOf(path), changed);
    const node: Node = { value: "", perms: [...parent.perms], children: [] };
    this.nodes.set(path, node);
    parent.children.push(baseName(path));
    changed.push(path, parentOf(path));
    return node;
  }

  write(path: string, value: string): string[] {
    const changed: string[] = [path];
    this.#create(path, changed).value = value;
    return changed;
  }

  mkdir(path: string): string[] {
    const changed: string[] = [];
    this.#create(path, changed);
    return changed;
  }

  rm(path: string): string[] {
    if (path === "/") throw new XsFail("EINVAL");
    if (!this.nodes.has(path)) {
      if (!this.nodes.has(parentOf(path))) throw new XsFail("ENOENT");
      return [];
    }
    const changed: string[] = [parentOf(path)];
    for (const p of [...this.nodes.keys()]) {
      if (isAtOrUnder(p, path)) {
        this.nodes.delete(p);
        changed.push(p);
      }
    }
    const parent = this.get(parentOf(path));
    parent.children = parent.children.filter((c) => c !== baseName(path));
    return changed;
  }

  setPerms(path: string, perms: string[]): string[] {
    this.get(path).perms = [...perms];
    return [path];
  }
}

/** A mutation, kept by a transaction to replay at commit. */
interface Op {
  path: string;
  recursive: boolean;
  apply(tree: Tree): string[];
}

interface Transaction {
  tree: Tree;
  startSeq: number;
  touched: Set<string>;
  ops: Op[];
}

interface Watch {
  path: string;
  token: string;
}

class Client {
  readonly conn: Deno.UnixConn;
  readonly watches = new Map<string, Watch>();
  readonly txs = new Map<number, Transaction>();
  nextTx = 1;
  closed = false;
  #sending: Promise<void> = Promise.resolve();

  constructor(conn: Deno.UnixConn) {
    this.conn = conn;
  }

  send(type: number, reqId: number, txId: number, payload: Uint8Array): void {
    if (this.closed) return;
    const bytes = encodeFrame({ type, reqId, txId, payload });
    this.#sending = this.#sending.then(async () => {
      for (let done = 0; done < bytes.length && !this.closed;) {
        done += await this.conn.write(bytes.subarray(done));
      }
    }).catch(() => {});
  }

  event(path: string, token: string): void {
    this.send(XsType.WATCH_EVENT, 0, 0, nulTerminated(path, token));
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    try {
      this.conn.close();
    } catch {
      // closed already
    }
  }

  /** Resolves once queued writes have settled. */
  flushed(): Promise<void> {
    return this.#sending;
  }
}

const decoder = new TextDecoder();

/** See the top of this file. */
export class FakeXenStored {
  readonly socketPath: string;
  /** Every request received, in order. */
  readonly requests: FakeRequest[] = [];
  /** Send a WATCH's initial event before its OK (as /dev/xen/xenbus does). */
  eventBeforeWatchReply: boolean;

  readonly #dir: string;
  readonly #listener: Deno.Listener<Deno.UnixConn, Deno.UnixAddr>;
  readonly #clients = new Set<Client>();
  readonly #loops = new Set<Promise<void>>();
  readonly #listeners = new Set<{ prefix: string; cb: (path: string) => void }>();
  #tree = new Tree();
  #seq = 0;
  /** Committed changes, kept only while some transaction is open. */
  #changes: { seq: number; paths: string[] }[] = [];
  #stalled = false;
  #held: { client: Client; frame: Frame }[] = [];
  #accepting: Promise<void> = Promise.resolve();
  #closed = false;

  private constructor(dir: string, options: FakeXenStoredOptions) {
    this.#dir = dir;
    this.socketPath = `${dir}/socket`;
    this.eventBeforeWatchReply = options.eventBeforeWatchReply ?? false;
    this.#listener = Deno.listen({ transport: "unix", path: this.socketPath });
    this.#tree.mkdir("/local/domain/0");
  }

  /** A fake listening on a socket in a fresh temporary directory. */
  static start(options: FakeXenStoredOptions = {}): Promise<FakeXenStored> {
    const fake = new FakeXenStored(Deno.makeTempDirSync({ prefix: "fake-xenstored-" }), options);
    fake.#accepting = fake.#accept();
    return Promise.resolve(fake);
  }

  // --- test-side API ---------------------------------------------------------------------

  read(path: string): string | null {
    return this.#tree.nodes.get(path)?.value ?? null;
  }

  write(path: string, value: string): void {
    this.#local(path, false, (t) => t.write(path, value));
  }

  mkdir(path: string): void {
    this.#local(path, false, (t) => t.mkdir(path));
  }

  /** Removes `path` and everything under it; a missing node is fine. */
  rm(path: string): void {
    this.#local(path, true, (t) => this.#tree.nodes.has(path) ? t.rm(path) : []);
  }

  setPerms(path: string, perms: string[]): void {
    const bad = perms.find((p) => permProblem(p) !== null);
    if (perms.length === 0 || bad !== undefined) {
      throw new Error(`Invalid permission list for ${path}: ${JSON.stringify(perms)}`);
    }
    this.#local(path, false, (t) => t.setPerms(path, perms));
  }

  directory(path: string): string[] {
    return [...this.#tree.nodes.get(path)?.children ?? []];
  }

  getPerms(path: string): string[] | null {
    const node = this.#tree.nodes.get(path);
    return node === undefined ? null : [...node.perms];
  }

  /** Calls cb(path) for every change at or under `prefix` (or removal above it). */
  onChange(prefix: string, cb: (path: string) => void): () => void {
    const entry = { prefix, cb };
    this.#listeners.add(entry);
    return () => this.#listeners.delete(entry);
  }

  /** Resolves with the value at `path` once `predicate` accepts it (checked now and on change). */
  waitFor(
    path: string,
    predicate: (value: string | null) => boolean = (v) => v !== null,
    timeoutMs = 5000,
  ): Promise<string | null> {
    if (predicate(this.read(path))) return Promise.resolve(this.read(path));
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        off();
        reject(
          new Error(`Timed out after ${timeoutMs} ms waiting for ${path}: "${this.read(path)}"`),
        );
      }, timeoutMs);
      const off = this.onChange(path, () => {
        const value = this.read(path);
        if (!predicate(value)) return;
        clearTimeout(timer);
        off();
        resolve(value);
      });
    });
  }

  releaseDomain(): void {
    this.#fireSpecial("@releaseDomain");
  }

  introduceDomain(): void {
    this.#fireSpecial("@introduceDomain");
  }

  /** Holds incoming requests unanswered until resume(). */
  stall(): void {
    this.#stalled = true;
  }

  /** Processes the held requests (of clients still connected), in order. */
  resume(): void {
    this.#stalled = false;
    const held = this.#held;
    this.#held = [];
    for (const { client, frame } of held) if (!client.closed) this.#handle(client, frame);
  }

  /** Closes every client connection, with their watches and transactions. */
  dropConnections(): void {
    for (const client of this.#clients) client.close();
    this.#clients.clear();
    this.#pruneChanges();
  }

  get connectionCount(): number {
    return this.#clients.size;
  }

  /** Every registered watch, over all connections. */
  watches(): { path: string; token: string }[] {
    return [...this.#clients].flatMap((c) => [...c.watches.values()].map((w) => ({ ...w })));
  }

  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    this.#listener.close();
    const clients = [...this.#clients];
    this.dropConnections();
    await this.#accepting;
    await Promise.all([...this.#loops, ...clients.map((c) => c.flushed())]);
    Deno.removeSync(this.#dir, { recursive: true });
  }

  // --- connections -----------------------------------------------------------------------

  async #accept(): Promise<void> {
    try {
      for await (const conn of this.#listener) {
        const client = new Client(conn);
        this.#clients.add(client);
        const loop = this.#serve(client).finally(() => this.#loops.delete(loop));
        this.#loops.add(loop);
      }
    } catch {
      // listener closed
    }
  }

  async #serve(client: Client): Promise<void> {
    const parser = new FrameParser();
    const buf = new Uint8Array(64 * 1024);
    try {
      for (;;) {
        const n = await client.conn.read(buf);
        if (n === null) break;
        for (const frame of parser.push(buf.subarray(0, n))) {
          if (client.closed) break;
          const path = splitStrings(frame.payload)[0] ?? "";
          this.requests.push({ type: frame.type, txId: frame.txId, path });
          if (this.#stalled) this.#held.push({ client, frame });
          else this.#handle(client, frame);
        }
      }
    } catch {
      // dropped, or an oversized frame: xenstored drops such a connection too
    }
    client.close();
    this.#clients.delete(client);
    await client.flushed();
    this.#pruneChanges();
  }

  // --- requests --------------------------------------------------------------------------

  #handle(client: Client, frame: Frame): void {
    const strings = splitStrings(frame.payload);
    let after: (() => void) | undefined;
    let reply: Uint8Array;
    try {
      const result = this.#execute(client, frame, strings);
      reply = result.reply;
      after = result.after;
    } catch (e) {
      if (!(e instanceof XsFail)) throw e;
      client.send(XsType.ERROR, frame.reqId, frame.txId, nulTerminated(e.code));
      return;
    }
    client.send(frame.type, frame.reqId, frame.txId, reply);
    after?.();
  }

  #execute(
    client: Client,
    frame: Frame,
    strings: string[],
  ): { reply: Uint8Array; after?: () => void } {
    const ok = { reply: nulTerminated("OK") };
    const tx = frame.txId === 0 ? undefined : client.txs.get(frame.txId);
    if (frame.txId !== 0 && tx === undefined) throw new XsFail("ENOENT");
    const tree = tx?.tree ?? this.#tree;
    const path = strings[0] ?? "";
    switch (frame.type) {
      case XsType.READ:
        this.#readIn(tx, this.#check(path));
        return { reply: new TextEncoder().encode(tree.get(path).value) };
      case XsType.DIRECTORY:
        this.#readIn(tx, this.#check(path));
        return { reply: nulTerminated(...tree.get(path).children) };
      case XsType.GET_PERMS:
        this.#readIn(tx, this.#check(path));
        return { reply: nulTerminated(...tree.get(path).perms) };
      case XsType.WRITE: {
        const nul = frame.payload.indexOf(0);
        if (nul < 0) throw new XsFail("EINVAL");
        const value = decoder.decode(frame.payload.subarray(nul + 1));
        this.#mutate(tx, this.#check(path), false, (t) => t.write(path, value));
        return ok;
      }
      case XsType.MKDIR:
        this.#mutate(tx, this.#check(path), false, (t) => t.mkdir(path));
        return ok;
      case XsType.RM:
        this.#mutate(tx, this.#check(path), true, (t) => t.rm(path));
        return ok;
      case XsType.SET_PERMS: {
        const perms = strings.slice(1);
        if (perms.length === 0 || perms.some((p) => permProblem(p) !== null)) {
          throw new XsFail("EINVAL");
        }
        this.#mutate(tx, this.#check(path), false, (t) => t.setPerms(path, perms));
        return ok;
      }
      case XsType.GET_DOMAIN_PATH:
        if (!/^(0|[1-9][0-9]*)$/.test(path)) throw new XsFail("EINVAL");
        return { reply: nulTerminated(`/local/domain/${path}`) };
      case XsType.WATCH:
        return this.#watch(client, this.#check(path, true), strings[1]);
      case XsType.UNWATCH:
        if (!client.watches.delete(`${path}\0${strings[1]}`)) throw new XsFail("ENOENT");
        return ok;
      case XsType.RESET_WATCHES:
        client.watches.clear();
        client.txs.clear();
        this.#pruneChanges();
        return ok;
      case XsType.TRANSACTION_START: {
        if (frame.txId !== 0) throw new XsFail("EBUSY");
        const id = client.nextTx++;
        client.txs.set(id, {
          tree: this.#tree.clone(),
          startSeq: this.#seq,
          touched: new Set(),
          ops: [],
        });
        return { reply: nulTerminated(String(id)) };
      }
      case XsType.TRANSACTION_END:
        this.#end(client, frame.txId, tx, payloadText(frame.payload));
        return ok;
      default:
        throw new XsFail("ENOSYS");
    }
  }

  #watch(client: Client, path: string, token: string | undefined): {
    reply: Uint8Array;
    after?: () => void;
  } {
    if (token === undefined) throw new XsFail("EINVAL");
    const key = `${path}\0${token}`;
    if (client.watches.has(key)) throw new XsFail("EEXIST");
    client.watches.set(key, { path, token });
    const reply = nulTerminated("OK");
    if (this.eventBeforeWatchReply) {
      client.event(path, token);
      return { reply };
    }
    return { reply, after: () => client.event(path, token) };
  }

  #end(client: Client, txId: number, tx: Transaction | undefined, how: string): void {
    if (tx === undefined) throw new XsFail("ENOENT");
    if (how !== "T" && how !== "F") throw new XsFail("EINVAL");
    client.txs.delete(txId);
    try {
      if (how === "F") return;
      const conflict = this.#changes.some((c) =>
        c.seq > tx.startSeq && c.paths.some((p) => tx.touched.has(p))
      );
      if (conflict) throw new XsFail("EAGAIN");
      for (const op of tx.ops) {
        try {
          this.#mutateLive(op.path, op.recursive, op.apply);
        } catch (e) {
          if (!(e instanceof XsFail)) throw e;
        }
      }
    } finally {
      this.#pruneChanges();
    }
  }

  /** A change made through the test-side API: plain Errors instead of error replies. */
  #local(path: string, recursive: boolean, apply: (tree: Tree) => string[]): void {
    const problem = pathProblem(path);
    if (problem !== null) throw new Error(`Invalid xenstore path "${path}": ${problem}`);
    try {
      this.#mutateLive(path, recursive, apply);
    } catch (e) {
      if (e instanceof XsFail) throw new Error(`Cannot change ${path}: ${e.code}`);
      throw e;
    }
  }

  /** Throws EINVAL unless `path` is valid; returns it. */
  #check(path: string, special = false): string {
    if (pathProblem(path, special) !== null) throw new XsFail("EINVAL");
    return path;
  }

  #readIn(tx: Transaction | undefined, path: string): void {
    tx?.touched.add(path);
  }

  #mutate(
    tx: Transaction | undefined,
    path: string,
    recursive: boolean,
    apply: (tree: Tree) => string[],
  ): void {
    if (tx === undefined) {
      this.#mutateLive(path, recursive, apply);
      return;
    }
    tx.touched.add(path);
    for (const p of apply(tx.tree)) tx.touched.add(p);
    tx.ops.push({ path, recursive, apply });
  }

  #mutateLive(path: string, recursive: boolean, apply: (tree: Tree) => string[]): void {
    const changed = apply(this.#tree);
    if (changed.length === 0) return; // e.g. MKDIR of an existing node
    this.#seq++;
    if (this.#anyTransactionOpen()) this.#changes.push({ seq: this.#seq, paths: changed });
    this.#fire(path, recursive);
  }

  // --- watches ---------------------------------------------------------------------------

  #fire(path: string, recursive: boolean): void {
    for (const client of this.#clients) {
      for (const w of client.watches.values()) {
        if (isAtOrUnder(path, w.path)) client.event(path, w.token);
        else if (recursive && isAtOrUnder(w.path, path)) client.event(w.path, w.token);
      }
    }
    for (const { prefix, cb } of [...this.#listeners]) {
      if (isAtOrUnder(path, prefix)) cb(path);
      else if (recursive && isAtOrUnder(prefix, path)) cb(prefix);
    }
  }

  #fireSpecial(path: string): void {
    for (const client of this.#clients) {
      for (const w of client.watches.values()) if (w.path === path) client.event(path, w.token);
    }
  }

  #anyTransactionOpen(): boolean {
    for (const client of this.#clients) if (client.txs.size > 0) return true;
    return false;
  }

  #pruneChanges(): void {
    if (!this.#anyTransactionOpen()) this.#changes = [];
  }
}
