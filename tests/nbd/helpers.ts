/**
 * Helpers for the NBD tests: running `tapd serve` (and waiting for the URIs it prints), running
 * the real clients with a time limit, and a raw NBD client over Deno.connect that speaks the
 * wire protocol byte by byte (shared/specs/protocols.md, Part 1) for the fuzz and byte-exact
 * tests.
 *
 * TAPD_NBD_TEST_SERVER=nbdkit runs nbdkit's file plugin instead of tapd (raw specs only), to
 * check the tests themselves against a reference server; tests of tapd-only behaviour fail there.
 */
import assert from "node:assert/strict";

export const ROOT = new URL("../../", import.meta.url).pathname;
export const KiB = 1024, MiB = 1024 * KiB;
const dec = new TextDecoder();
const enc = new TextEncoder();

// ---------------------------------------------------------------------------------------------
// Running commands

export interface Run {
  code: number;
  signal: string | null;
  stdout: string;
  stderr: string;
}

/** Runs a command to completion; killed (and the Run says so) after `timeoutMs`. */
export async function run(
  cmd: string,
  args: string[],
  { timeoutMs = 60_000, env, cwd }: {
    timeoutMs?: number;
    env?: Record<string, string>;
    cwd?: string;
  } = {},
): Promise<Run> {
  const abort = new AbortController();
  const timer = setTimeout(() => abort.abort(), timeoutMs);
  try {
    const out = await new Deno.Command(cmd, {
      args,
      env,
      cwd,
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
      signal: abort.signal,
    }).output();
    const r: Run = {
      code: out.code,
      signal: out.signal,
      stdout: dec.decode(out.stdout),
      stderr: dec.decode(out.stderr),
    };
    if (abort.signal.aborted) r.stderr += `\n(killed after ${timeoutMs} ms)`;
    return r;
  } finally {
    clearTimeout(timer);
  }
}

/** Describes a finished command for an assertion message. */
export function describe(cmd: string, args: string[], r: Run): string {
  return `${cmd} ${args.map((a) => (/^[\w.,:/=@%+-]+$/.test(a) ? a : `'${a}'`)).join(" ")}` +
    ` → exit ${r.code}${r.signal ? ` (${r.signal})` : ""}\nstdout: ${r.stdout.slice(-3000)}` +
    `\nstderr: ${r.stderr.slice(-3000)}`;
}

/** Runs a command and fails the test unless it exits 0. */
export async function runOk(
  cmd: string,
  args: string[],
  options: { timeoutMs?: number; env?: Record<string, string>; cwd?: string } = {},
): Promise<Run> {
  const r = await run(cmd, args, options);
  assert.equal(r.code, 0, describe(cmd, args, r));
  return r;
}

/** Runs the tapd launcher and fails the test unless it exits 0. */
export function tapdOk(...args: string[]): Promise<Run> {
  return runOk(`${ROOT}tapd`, args);
}

/** qemu-io with its usual output checks: exit 0 and no "failed"/"error" in what it printed. */
export async function qemuIoOk(args: string[], timeoutMs = 60_000): Promise<Run> {
  const r = await run("qemu-io", args, { timeoutMs });
  assert.equal(r.code, 0, describe("qemu-io", args, r));
  assert.doesNotMatch(r.stdout + r.stderr, /error|failed/i, describe("qemu-io", args, r));
  return r;
}

export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

// ---------------------------------------------------------------------------------------------
// tapd serve

export interface ServeOptions {
  /** Unix socket path to listen on. */
  unix?: string;
  /** Also listen on tcp:127.0.0.1:0 (the kernel picks the port). */
  tcp?: boolean;
  readOnly?: boolean;
  exportName?: string;
  engine?: string;
  /** TAPD_LOG_LEVEL for the server (default warn: the fuzzer makes thousands of connections). */
  logLevel?: string;
}

/** A running `tapd serve`: its URIs, its pid, and what it wrote on stderr. */
export class Serve {
  readonly #child: Deno.ChildProcess;
  #stderr = "";
  #stdout = "";
  #status: Deno.CommandStatus | undefined;
  readonly #statusPromise: Promise<Deno.CommandStatus>;
  readonly #drained: Promise<void>;
  readonly uris: string[] = [];
  #proxy: Deno.Listener | undefined;
  readonly spec: string;
  readonly options: ServeOptions;

  private constructor(child: Deno.ChildProcess, spec: string, options: ServeOptions) {
    this.#child = child;
    this.spec = spec;
    this.options = options;
    this.#statusPromise = child.status.then((s) => this.#status = s);
    this.#drained = Promise.all([
      this.#drain(child.stdout, (t) => this.#stdout += t),
      this.#drain(child.stderr, (t) => {
        // Keep the last 256 KiB: enough to explain a failure, bounded under the fuzzer.
        this.#stderr = (this.#stderr + t).slice(-256 * KiB);
      }),
    ]).then(() => {});
  }

  async #drain(stream: ReadableStream<Uint8Array>, sink: (text: string) => void): Promise<void> {
    const decoder = new TextDecoder();
    try {
      for await (const chunk of stream) sink(decoder.decode(chunk, { stream: true }));
    } catch { /* the process went away */ }
  }

  /**
   * Starts `tapd serve SPEC` on the listeners asked for and waits (up to 15 s) until it has
   * printed one URI per listener.
   */
  static async start(spec: string, options: ServeOptions): Promise<Serve> {
    const peer = Deno.env.get("TAPD_NBD_TEST_SERVER");
    const { cmd, args, expected } = peer === "nbdkit"
      ? nbdkitCommand(spec, options)
      : tapdCommand(spec, options);
    const child = new Deno.Command(cmd, {
      args,
      env: { TAPD_LOG_LEVEL: options.logLevel ?? "warn" },
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    const s = new Serve(child, spec, options);
    const deadline = Date.now() + 15_000;
    for (;;) {
      if (peer === "nbdkit") {
        // nbdkit prints nothing: wait for its socket, the URIs are known in advance. It listens
        // on a socket or a port, not both: a TCP listener here forwards to its socket.
        if (await reachable(expected[0])) {
          s.uris.push(...expected);
          if (options.tcp) s.#proxy = tcpToUnix(options.unix!, s.uris, options.exportName ?? "");
          return s;
        }
      } else {
        const lines = s.#stdout.split("\n").filter((l) => l.trim() !== "");
        if (lines.length >= expected.length) {
          s.uris.push(...lines.slice(0, expected.length).map((l) => l.trim()));
          return s;
        }
      }
      if (s.#status !== undefined) {
        await s.#drained;
        throw new Error(
          `${cmd} ${args.join(" ")} exited ${s.#status.code} before listening:\n${s.#stderr}`,
        );
      }
      if (Date.now() > deadline) {
        await s.kill();
        throw new Error(`${cmd} ${args.join(" ")}: no URI after 15 s:\n${s.#stderr}`);
      }
      await sleep(20);
    }
  }

  get pid(): number {
    return this.#child.pid;
  }

  /** The nbd+unix:// URI (the first listener must be the Unix one). */
  get unixUri(): string {
    const u = this.uris.find((u) => u.startsWith("nbd+unix:"));
    assert.ok(u, `no nbd+unix URI among ${this.uris.join(", ")}`);
    return u;
  }

  /** The nbd:// URI of the TCP listener. */
  get tcpUri(): string {
    const u = this.uris.find((u) => u.startsWith("nbd://"));
    assert.ok(u, `no nbd:// URI among ${this.uris.join(", ")}`);
    return u;
  }

  /** The TCP port the kernel picked. */
  get tcpPort(): number {
    const m = /^nbd:\/\/[^/]*:(\d+)\//.exec(this.tcpUri);
    assert.ok(m, `no port in ${this.tcpUri}`);
    return Number(m[1]);
  }

  get socket(): string {
    assert.ok(this.options.unix, "no unix listener");
    return this.options.unix;
  }

  get stderr(): string {
    return this.#stderr;
  }

  get stdout(): string {
    return this.#stdout;
  }

  get alive(): boolean {
    return this.#status === undefined;
  }

  /** VmRSS of the server process in KiB (the launcher execs deno, so the pid is the server). */
  rssKiB(): number {
    const status = Deno.readTextFileSync(`/proc/${this.pid}/status`);
    const m = /^VmRSS:\s+(\d+)\s+kB/m.exec(status);
    assert.ok(m, `no VmRSS in /proc/${this.pid}/status`);
    return Number(m[1]);
  }

  /** SIGTERM, then waits (up to `timeoutMs`) for the exit; SIGKILL and throw if it does not. */
  async stop(timeoutMs = 15_000): Promise<{ code: number; signal: string | null; stderr: string }> {
    this.#closeProxy();
    if (this.#status === undefined) {
      try {
        this.#child.kill("SIGTERM");
      } catch { /* already gone */ }
    }
    let timer: ReturnType<typeof setTimeout> | undefined;
    const timedOut = new Promise<"timeout">((resolve) => {
      timer = setTimeout(() => resolve("timeout"), timeoutMs);
    });
    const r = await Promise.race([this.#statusPromise, timedOut]);
    clearTimeout(timer);
    if (r === "timeout") {
      await this.kill();
      throw new Error(
        `tapd serve did not exit within ${timeoutMs} ms of SIGTERM:\n${this.#stderr}`,
      );
    }
    await this.#drained;
    return { code: r.code, signal: r.signal, stderr: this.#stderr };
  }

  #closeProxy(): void {
    try {
      this.#proxy?.close();
    } catch { /* closed */ }
  }

  /** SIGKILL and wait (for cleanup after a failure). */
  async kill(): Promise<void> {
    this.#closeProxy();
    if (this.#status === undefined) {
      try {
        this.#child.kill("SIGKILL");
      } catch { /* already gone */ }
    }
    await this.#statusPromise;
    await this.#drained;
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.kill();
  }
}

function tapdCommand(spec: string, o: ServeOptions) {
  const args = ["serve", spec];
  const expected: string[] = [];
  if (o.unix !== undefined) args.push("--nbd", `unix:${o.unix}`), expected.push("unix");
  if (o.tcp) args.push("--nbd", "tcp:127.0.0.1:0"), expected.push("tcp");
  if (o.readOnly) args.push("--read-only");
  if (o.exportName !== undefined) args.push("--export-name", o.exportName);
  if (o.engine !== undefined) args.push("--engine", o.engine);
  return { cmd: `${ROOT}tapd`, args, expected };
}

/** The reference server, for checking the tests (TAPD_NBD_TEST_SERVER=nbdkit). */
function nbdkitCommand(spec: string, o: ServeOptions) {
  const path = spec.replace(/^(tap:)?(aio|sync):/, "");
  assert.ok(o.unix !== undefined, "nbdkit mode needs a unix socket");
  const name = o.exportName ?? "";
  const args = ["-f", "--exit-with-parent", "-U", o.unix, "-e", name];
  const expected = [`nbd+unix:///${encodeURIComponent(name)}?socket=${o.unix}`];
  try {
    Deno.removeSync(o.unix); // nbdkit leaves its socket behind
  } catch { /* none */ }
  if (o.readOnly) args.push("-r");
  args.push("file", path);
  return { cmd: "nbdkit", args, expected };
}

async function reachable(uri: string): Promise<boolean> {
  try {
    await Deno.stat(uri.replace(/^.*\?socket=/, ""));
    return true;
  } catch {
    return false;
  }
}

/** A TCP listener on 127.0.0.1 that forwards every connection to a Unix socket. */
function tcpToUnix(path: string, uris: string[], name: string): Deno.Listener {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  uris.push(`nbd://127.0.0.1:${(listener.addr as Deno.NetAddr).port}/${encodeURIComponent(name)}`);
  (async () => {
    for await (const conn of listener) {
      const unix = await Deno.connect({ transport: "unix", path });
      conn.readable.pipeTo(unix.writable).catch(() => {});
      unix.readable.pipeTo(conn.writable).catch(() => {});
    }
  })().catch(() => {});
  return listener;
}

/** Whether the server under test is the reference (some tapd-only checks are then skipped). */
export const REFERENCE_SERVER = Deno.env.get("TAPD_NBD_TEST_SERVER") === "nbdkit";

// ---------------------------------------------------------------------------------------------
// Images

/** Makes a sparse raw file of `size` bytes with `pieces` written at their offsets. */
export function sparseImage(path: string, size: number, pieces: [number, Uint8Array][]): void {
  using f = Deno.openSync(path, { write: true, create: true, truncate: true });
  for (const [off, data] of pieces) {
    f.seekSync(off, Deno.SeekMode.Start);
    for (let done = 0; done < data.length;) done += f.writeSync(data.subarray(done));
  }
  f.truncateSync(size);
}

// ---------------------------------------------------------------------------------------------
// The NBD wire protocol

export const NBDMAGIC = 0x4e42444d41474943n;
export const IHAVEOPT = 0x49484156454f5054n;
export const REP_MAGIC = 0x0003e889045565a9n;
export const REQUEST_MAGIC = 0x25609513;
export const SIMPLE_REPLY_MAGIC = 0x67446698;
export const STRUCTURED_REPLY_MAGIC = 0x668e33ef;

export const OPT = {
  EXPORT_NAME: 1,
  ABORT: 2,
  LIST: 3,
  PEEK_EXPORT: 4,
  STARTTLS: 5,
  INFO: 6,
  GO: 7,
  STRUCTURED_REPLY: 8,
  LIST_META_CONTEXT: 9,
  SET_META_CONTEXT: 10,
  EXTENDED_HEADERS: 11,
} as const;

export const REP = {
  ACK: 1,
  SERVER: 2,
  INFO: 3,
  META_CONTEXT: 4,
  ERR_UNSUP: 0x80000001,
  ERR_POLICY: 0x80000002,
  ERR_INVALID: 0x80000003,
  ERR_PLATFORM: 0x80000004,
  ERR_TLS_REQD: 0x80000005,
  ERR_UNKNOWN: 0x80000006,
  ERR_SHUTDOWN: 0x80000007,
  ERR_BLOCK_SIZE_REQD: 0x80000008,
  ERR_TOO_BIG: 0x80000009,
} as const;

export const INFO = { EXPORT: 0, NAME: 1, DESCRIPTION: 2, BLOCK_SIZE: 3 } as const;

export const CMD = {
  READ: 0,
  WRITE: 1,
  DISC: 2,
  FLUSH: 3,
  TRIM: 4,
  CACHE: 5,
  WRITE_ZEROES: 6,
  BLOCK_STATUS: 7,
} as const;

export const CMD_FLAG = { FUA: 1, NO_HOLE: 2, DF: 4, REQ_ONE: 8, FAST_ZERO: 16 } as const;

export const FLAG = {
  HAS_FLAGS: 0x1,
  READ_ONLY: 0x2,
  SEND_FLUSH: 0x4,
  SEND_FUA: 0x8,
  ROTATIONAL: 0x10,
  SEND_TRIM: 0x20,
  SEND_WRITE_ZEROES: 0x40,
  SEND_DF: 0x80,
  CAN_MULTI_CONN: 0x100,
  SEND_RESIZE: 0x200,
  SEND_CACHE: 0x400,
  SEND_FAST_ZERO: 0x800,
} as const;

export const CHUNK = {
  NONE: 0,
  OFFSET_DATA: 1,
  OFFSET_HOLE: 2,
  BLOCK_STATUS: 5,
  ERROR: 0x8001,
  ERROR_OFFSET: 0x8002,
} as const;

export const REPLY_FLAG_DONE = 1;

export const ERR = {
  EPERM: 1,
  EIO: 5,
  ENOMEM: 12,
  EINVAL: 22,
  ENOSPC: 28,
  EOVERFLOW: 75,
  ENOTSUP: 95,
  ESHUTDOWN: 108,
} as const;

/** The 18 bytes every connection must start with (FIXED_NEWSTYLE | NO_ZEROES). */
export const GREETING = new Uint8Array([
  0x4e,
  0x42,
  0x44,
  0x4d,
  0x41,
  0x47,
  0x49,
  0x43, // NBDMAGIC
  0x49,
  0x48,
  0x41,
  0x56,
  0x45,
  0x4f,
  0x50,
  0x54, // IHAVEOPT
  0x00,
  0x03,
]);

/** Big-endian byte building. */
export class Bytes {
  #parts: Uint8Array[] = [];
  u8(v: number): this {
    this.#parts.push(new Uint8Array([v & 0xff]));
    return this;
  }
  u16(v: number): this {
    const b = new Uint8Array(2);
    new DataView(b.buffer).setUint16(0, v);
    this.#parts.push(b);
    return this;
  }
  u32(v: number): this {
    const b = new Uint8Array(4);
    new DataView(b.buffer).setUint32(0, v >>> 0);
    this.#parts.push(b);
    return this;
  }
  u64(v: bigint | number): this {
    const b = new Uint8Array(8);
    new DataView(b.buffer).setBigUint64(0, BigInt.asUintN(64, BigInt(v)));
    this.#parts.push(b);
    return this;
  }
  bytes(b: Uint8Array): this {
    this.#parts.push(b);
    return this;
  }
  str(s: string): this {
    return this.bytes(enc.encode(s));
  }
  /** A u32 length followed by the string's bytes. */
  lstr(s: string | Uint8Array): this {
    const b = typeof s === "string" ? enc.encode(s) : s;
    return this.u32(b.length).bytes(b);
  }
  build(): Uint8Array {
    const n = this.#parts.reduce((a, p) => a + p.length, 0);
    const out = new Uint8Array(n);
    let at = 0;
    for (const p of this.#parts) out.set(p, at), at += p.length;
    return out;
  }
}

export function be(): Bytes {
  return new Bytes();
}

export function hex(b: Uint8Array): string {
  return [...b].map((x) => x.toString(16).padStart(2, "0")).join("");
}

/** An option request: IHAVEOPT, code, length, data (the length may lie, for the fuzzer). */
export function option(
  code: number,
  data: Uint8Array = new Uint8Array(0),
  length = data.length,
): Uint8Array {
  return be().u64(IHAVEOPT).u32(code).u32(length).bytes(data).build();
}

/** INFO/GO data: name, then the requested info codes. */
export function goData(name: string | Uint8Array, infos: number[] = []): Uint8Array {
  const b = be().lstr(name).u16(infos.length);
  for (const i of infos) b.u16(i);
  return b.build();
}

/** LIST/SET_META_CONTEXT data: export name, then queries. */
export function metaData(name: string, queries: string[]): Uint8Array {
  const b = be().lstr(name).u32(queries.length);
  for (const q of queries) b.lstr(q);
  return b.build();
}

export interface Request {
  flags?: number;
  type: number;
  cookie: bigint;
  offset: bigint | number;
  length: number;
  magic?: number;
}

/** A 28-byte transmission request header. */
export function request(r: Request): Uint8Array {
  return be().u32(r.magic ?? REQUEST_MAGIC).u16(r.flags ?? 0).u16(r.type).u64(r.cookie)
    .u64(r.offset).u32(r.length).build();
}

export class Eof extends Error {
  constructor(readonly got: number, wanted: number) {
    super(`connection closed after ${got} of ${wanted} bytes`);
  }
}

export class Timeout extends Error {}

/** One raw connection: buffered exact reads, writes that report a closed peer, deadlines. */
export class RawConn {
  readonly #conn: Deno.Conn;
  #buf = new Uint8Array(64 * KiB);
  #start = 0;
  #end = 0;
  #eof = false;
  #closed = false;
  /** Every byte received (only when recording, for byte-exact checks of small exchanges). */
  readonly received: number[] | undefined;

  private constructor(conn: Deno.Conn, record: boolean) {
    this.#conn = conn;
    this.received = record ? [] : undefined;
  }

  static async unix(path: string, record = false): Promise<RawConn> {
    return new RawConn(await Deno.connect({ transport: "unix", path }), record);
  }

  static async tcp(port: number, record = false): Promise<RawConn> {
    return new RawConn(await Deno.connect({ hostname: "127.0.0.1", port }), record);
  }

  get buffered(): number {
    return this.#end - this.#start;
  }

  async #fill(): Promise<boolean> {
    if (this.#eof) return false;
    if (this.#start === this.#end) this.#start = this.#end = 0;
    if (this.#end === this.#buf.length) {
      const live = this.#end - this.#start;
      const bigger = new Uint8Array(Math.max(this.#buf.length, live * 2));
      bigger.set(this.#buf.subarray(this.#start, this.#end));
      this.#buf = bigger;
      this.#start = 0;
      this.#end = live;
    }
    let n: number | null;
    try {
      n = await this.#conn.read(this.#buf.subarray(this.#end));
    } catch (e) {
      if (e instanceof Deno.errors.ConnectionReset) n = null;
      else if (this.#closed) throw new Timeout("connection closed by the deadline");
      else throw e;
    }
    if (n === null) {
      this.#eof = true;
      return false;
    }
    if (this.received) {
      for (const b of this.#buf.subarray(this.#end, this.#end + n)) this.received.push(b);
    }
    this.#end += n;
    return true;
  }

  /** Exactly `n` bytes, or Eof (with how many bytes there were). */
  async read(n: number): Promise<Uint8Array> {
    while (this.#end - this.#start < n) {
      if (!(await this.#fill())) throw new Eof(this.#end - this.#start, n);
    }
    const out = this.#buf.slice(this.#start, this.#start + n);
    this.#start += n;
    return out;
  }

  /** Skips `n` bytes without keeping them. */
  async skip(n: number): Promise<void> {
    while (n > 0) {
      if (this.#start === this.#end && !(await this.#fill())) throw new Eof(0, n);
      const k = Math.min(n, this.#end - this.#start);
      this.#start += k;
      n -= k;
    }
  }

  /** Whether the peer closed with nothing more to read (waits for data or EOF). */
  async atEof(): Promise<boolean> {
    if (this.#end > this.#start) return false;
    return !(await this.#fill());
  }

  /** Reads until EOF; returns what came (at most `max` bytes are kept). */
  async readToEof(max = 1 * MiB): Promise<Uint8Array> {
    while (await this.#fill()) {
      if (this.#end - this.#start > max) this.#start = this.#end - max;
    }
    const out = this.#buf.slice(this.#start, this.#end);
    this.#start = this.#end;
    return out;
  }

  /** Writes all of `data`; false if the peer had closed (EPIPE, ECONNRESET). */
  async write(data: Uint8Array): Promise<boolean> {
    try {
      for (let done = 0; done < data.length;) {
        done += await this.#conn.write(data.subarray(done));
      }
      return true;
    } catch (e) {
      if (
        e instanceof Deno.errors.BrokenPipe || e instanceof Deno.errors.ConnectionReset ||
        e instanceof Deno.errors.NotConnected
      ) return false;
      if (this.#closed) throw new Timeout("connection closed by the deadline");
      throw e;
    }
  }

  /** Shuts down our sending side (the server then sees EOF). */
  async closeWrite(): Promise<void> {
    try {
      await (this.#conn as Deno.UnixConn | Deno.TcpConn).closeWrite();
    } catch { /* already closed */ }
  }

  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    try {
      this.#conn.close();
    } catch { /* already closed */ }
  }

  /**
   * Runs `fn` on this connection; after `ms` the connection is closed and Timeout thrown. The
   * connection is closed afterwards either way.
   */
  async within<T>(ms: number, what: string, fn: (c: this) => Promise<T>): Promise<T> {
    let timer: ReturnType<typeof setTimeout> | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(() => {
        this.close();
        reject(new Timeout(`${what}: no end within ${ms} ms`));
      }, ms);
    });
    const work = fn(this);
    work.catch(() => {}); // a late rejection after the timeout is expected
    try {
      return await Promise.race([work, timeout]);
    } finally {
      clearTimeout(timer);
      this.close();
    }
  }

  // --- handshake ---

  async greeting(): Promise<Uint8Array> {
    return await this.read(18);
  }

  async sendOption(code: number, data: Uint8Array = new Uint8Array(0)): Promise<boolean> {
    return await this.write(option(code, data));
  }

  /** One option reply; asserts the magic and the echoed option code. */
  async optionReply(expectOption?: number): Promise<OptionReply> {
    const h = await this.read(20);
    const v = new DataView(h.buffer);
    assert.equal(v.getBigUint64(0), REP_MAGIC, `option reply magic: ${hex(h)}`);
    const reply: OptionReply = {
      option: v.getUint32(8),
      type: v.getUint32(12),
      data: new Uint8Array(0),
    };
    const length = v.getUint32(16);
    assert.ok(length <= 64 * KiB, `option reply of ${length} bytes (type ${reply.type})`);
    reply.data = await this.read(length);
    if (expectOption !== undefined) {
      assert.equal(reply.option, expectOption, `reply echoes option ${reply.option}`);
    }
    if (reply.type === REP.ACK) assert.equal(length, 0, "ACK with data");
    if (reply.type >= 0x80000000) assert.ok(length <= 4096, "error message > 4096 bytes");
    return reply;
  }

  /** Replies to one option up to and including the final one (ACK or an error). */
  async optionReplies(code: number): Promise<OptionReply[]> {
    const replies: OptionReply[] = [];
    for (;;) {
      const r = await this.optionReply(code);
      replies.push(r);
      if (r.type === REP.ACK || r.type >= 0x80000000) return replies;
      assert.ok(
        r.type === REP.SERVER || r.type === REP.INFO || r.type === REP.META_CONTEXT,
        `unknown option reply type ${r.type.toString(16)} to option ${code}`,
      );
    }
  }

  /**
   * The handshake of a well-behaved client: greeting, flags, optionally STRUCTURED_REPLY and
   * SET_META_CONTEXT base:allocation, then GO asking for BLOCK_SIZE (or EXPORT_NAME).
   */
  async negotiate(
    { name = "", structured = true, meta = structured, exportName = false }: {
      name?: string;
      structured?: boolean;
      meta?: boolean;
      exportName?: boolean;
    } = {},
  ): Promise<Session> {
    const g = await this.greeting();
    assert.equal(hex(g), hex(GREETING), "greeting");
    await this.write(be().u32(3).build());
    const s: Session = {
      size: 0,
      flags: 0,
      structured: false,
      contextId: undefined,
      blockSize: undefined,
    };
    if (structured) {
      await this.sendOption(OPT.STRUCTURED_REPLY);
      const [r] = await this.optionReplies(OPT.STRUCTURED_REPLY);
      assert.equal(r.type, REP.ACK, "STRUCTURED_REPLY");
      s.structured = true;
    }
    if (meta) {
      await this.sendOption(OPT.SET_META_CONTEXT, metaData(name, ["base:allocation"]));
      const replies = await this.optionReplies(OPT.SET_META_CONTEXT);
      assert.equal(replies.length, 2, "SET_META_CONTEXT: one context, then ACK");
      assert.equal(replies[0].type, REP.META_CONTEXT);
      assert.equal(replies[1].type, REP.ACK);
      const v = new DataView(replies[0].data.buffer);
      s.contextId = v.getUint32(0);
      assert.notEqual(s.contextId, 0, "context id 0");
      assert.equal(dec.decode(replies[0].data.subarray(4)), "base:allocation");
    }
    if (exportName) {
      await this.sendOption(OPT.EXPORT_NAME, enc.encode(name));
      const r = await this.read(10);
      const v = new DataView(r.buffer);
      s.size = Number(v.getBigUint64(0));
      s.flags = v.getUint16(8);
      return s;
    }
    await this.sendOption(OPT.GO, goData(name, [INFO.BLOCK_SIZE]));
    for (const r of await this.optionReplies(OPT.GO)) {
      if (r.type >= 0x80000000) {
        throw new Error(`GO failed: ${r.type.toString(16)} ${dec.decode(r.data)}`);
      }
      if (r.type !== REP.INFO) continue;
      const v = new DataView(r.data.buffer);
      const info = v.getUint16(0);
      if (info === INFO.EXPORT) {
        assert.equal(r.data.length, 12, "NBD_INFO_EXPORT length");
        s.size = Number(v.getBigUint64(2));
        s.flags = v.getUint16(10);
      } else if (info === INFO.BLOCK_SIZE) {
        assert.equal(r.data.length, 14, "NBD_INFO_BLOCK_SIZE length");
        s.blockSize = { min: v.getUint32(2), pref: v.getUint32(6), max: v.getUint32(10) };
      }
    }
    assert.ok(s.flags & FLAG.HAS_FLAGS, "GO: no NBD_INFO_EXPORT (or flags without HAS_FLAGS)");
    return s;
  }

  // --- transmission ---

  async send(r: Request, payload?: Uint8Array): Promise<boolean> {
    if (payload === undefined) return await this.write(request(r));
    const h = request(r);
    const all = new Uint8Array(h.length + payload.length);
    all.set(h);
    all.set(payload, h.length);
    return await this.write(all);
  }

  /**
   * The next reply message: a simple reply (its READ data is read when `readLength` gives the
   * length for its cookie and the error is 0) or one structured chunk.
   */
  async reply(readLength: (cookie: bigint) => number = () => 0): Promise<Reply> {
    const m = await this.read(4);
    const magic = new DataView(m.buffer).getUint32(0);
    if (magic === SIMPLE_REPLY_MAGIC) {
      const rest = await this.read(12);
      const v = new DataView(rest.buffer);
      const error = v.getUint32(0), cookie = v.getBigUint64(4);
      const n = error === 0 ? readLength(cookie) : 0;
      return {
        kind: "simple",
        error,
        cookie,
        data: n > 0 ? await this.read(n) : new Uint8Array(0),
      };
    }
    if (magic === STRUCTURED_REPLY_MAGIC) {
      const rest = await this.read(16);
      const v = new DataView(rest.buffer);
      const length = v.getUint32(12);
      assert.ok(length <= 64 * MiB + 8, `structured chunk of ${length} bytes`);
      return {
        kind: "chunk",
        flags: v.getUint16(0),
        type: v.getUint16(2),
        cookie: v.getBigUint64(4),
        payload: await this.read(length),
      };
    }
    throw new Error(`bad reply magic ${hex(m)}`);
  }

  /** Sends one request and collects its whole reply (all chunks up to DONE). */
  async command(r: Request, payload?: Uint8Array): Promise<Outcome> {
    await this.send(r, payload);
    return await this.outcome(r);
  }

  /** Collects the reply to `r` (the next replies on the wire must all be for it). */
  async outcome(r: Request): Promise<Outcome> {
    const o = new OutcomeBuilder(r);
    while (!o.done) {
      const rep = await this.reply((c) => (c === r.cookie && r.type === CMD.READ ? r.length : 0));
      assert.equal(rep.cookie, r.cookie, `reply for cookie ${rep.cookie}, expected ${r.cookie}`);
      o.add(rep);
    }
    return o.finish();
  }
}

export interface OptionReply {
  option: number;
  type: number;
  data: Uint8Array;
}

export interface Session {
  size: number;
  flags: number;
  structured: boolean;
  contextId: number | undefined;
  blockSize: { min: number; pref: number; max: number } | undefined;
}

export type Reply =
  | { kind: "simple"; error: number; cookie: bigint; data: Uint8Array }
  | { kind: "chunk"; flags: number; type: number; cookie: bigint; payload: Uint8Array };

/** What one request got: an error (the first error seen) or success, with data or extents. */
export interface Outcome {
  error: number;
  /** READ: the bytes assembled from simple data or OFFSET_DATA/OFFSET_HOLE chunks. */
  data?: Uint8Array;
  /** BLOCK_STATUS: per context id, the extents [length, flags]. */
  extents?: Map<number, [number, number][]>;
  replies: Reply[];
  /** How the READ data came: "simple" or the chunk types in order. */
  shape: string[];
}

/**
 * Assembles a request's reply and checks the structured-reply rules on the way: chunk types fit
 * the command, content inside the range without overlap, full coverage on success, exactly one
 * DONE at the end, no simple reply for READ once structured replies are on (the caller checks
 * that through `shape`).
 */
export class OutcomeBuilder {
  readonly #r: Request;
  readonly #replies: Reply[] = [];
  #error = 0;
  #data: Uint8Array | undefined;
  #covered: [number, number][] = [];
  #extents = new Map<number, [number, number][]>();
  #shape: string[] = [];
  done = false;

  constructor(r: Request) {
    this.#r = r;
    if (r.type === CMD.READ && r.length <= 64 * MiB) this.#data = new Uint8Array(r.length);
  }

  add(rep: Reply): void {
    const r = this.#r;
    assert.ok(!this.done, "reply after DONE");
    this.#replies.push(rep);
    if (rep.kind === "simple") {
      assert.equal(this.#replies.length, 1, "simple reply after structured chunks");
      this.#error = rep.error;
      this.#shape.push("simple");
      if (r.type === CMD.READ && rep.error === 0 && this.#data) this.#data.set(rep.data);
      this.done = true;
      return;
    }
    const p = rep.payload, v = new DataView(p.buffer, p.byteOffset, p.byteLength);
    const start = Number(BigInt.asUintN(64, BigInt(r.offset)));
    const what = `cookie ${r.cookie} type ${r.type}`;
    switch (rep.type) {
      case CHUNK.NONE:
        assert.equal(p.length, 0, `${what}: NONE chunk with payload`);
        assert.ok(rep.flags & REPLY_FLAG_DONE, `${what}: NONE chunk without DONE`);
        this.#shape.push("none");
        break;
      case CHUNK.OFFSET_DATA:
      case CHUNK.OFFSET_HOLE: {
        assert.equal(r.type, CMD.READ, `${what}: content chunk for a non-READ`);
        const isData = rep.type === CHUNK.OFFSET_DATA;
        assert.ok(isData ? p.length >= 9 : p.length === 12, `${what}: chunk length ${p.length}`);
        const off = Number(v.getBigUint64(0));
        const n = isData ? p.length - 8 : v.getUint32(8);
        assert.ok(n > 0, `${what}: empty content chunk`);
        assert.ok(
          off >= start && off + n <= start + r.length,
          `${what}: chunk ${off}+${n} outside ${start}+${r.length}`,
        );
        for (const [a, b] of this.#covered) {
          assert.ok(off + n <= a || off >= b, `${what}: chunk ${off}+${n} overlaps ${a}..${b}`);
        }
        this.#covered.push([off, off + n]);
        if (this.#data) {
          if (isData) this.#data.set(p.subarray(8), off - start);
          else this.#data.fill(0, off - start, off - start + n);
        }
        this.#shape.push(isData ? "data" : "hole");
        break;
      }
      case CHUNK.BLOCK_STATUS: {
        assert.equal(r.type, CMD.BLOCK_STATUS, `${what}: block status chunk for another command`);
        assert.ok(p.length >= 12 && (p.length - 4) % 8 === 0, `${what}: length ${p.length}`);
        const id = v.getUint32(0);
        const list: [number, number][] = [];
        for (let at = 4; at < p.length; at += 8) list.push([v.getUint32(at), v.getUint32(at + 4)]);
        for (const [len] of list) assert.ok(len > 0, `${what}: zero-length extent`);
        assert.ok(!this.#extents.has(id), `${what}: two chunks for context ${id}`);
        this.#extents.set(id, list);
        this.#shape.push("status");
        break;
      }
      case CHUNK.ERROR:
      case CHUNK.ERROR_OFFSET: {
        assert.ok(p.length >= 6, `${what}: error chunk of ${p.length} bytes`);
        const error = v.getUint32(0), m = v.getUint16(4);
        assert.notEqual(error, 0, `${what}: error chunk with error 0`);
        const expected = rep.type === CHUNK.ERROR ? 6 + m : 14 + m;
        assert.equal(p.length, expected, `${what}: error chunk length vs message length ${m}`);
        if (this.#error === 0) this.#error = error;
        this.#shape.push("error");
        break;
      }
      default:
        throw new Error(`${what}: unexpected chunk type ${rep.type.toString(16)}`);
    }
    if (rep.flags & REPLY_FLAG_DONE) this.done = true;
    assert.equal(rep.flags & ~REPLY_FLAG_DONE, 0, `${what}: unknown reply flags ${rep.flags}`);
  }

  finish(): Outcome {
    const r = this.#r;
    if (r.type === CMD.READ && this.#error === 0 && this.#shape[0] !== "simple") {
      const total = this.#covered.reduce((a, [s, e]) => a + e - s, 0);
      assert.equal(total, r.length, `READ cookie ${r.cookie}: chunks cover ${total} bytes`);
    }
    return {
      error: this.#error,
      data: r.type === CMD.READ && this.#error === 0 ? this.#data : undefined,
      extents: r.type === CMD.BLOCK_STATUS ? this.#extents : undefined,
      replies: this.#replies,
      shape: this.#shape,
    };
  }
}
