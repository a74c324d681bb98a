/**
 * Unix-domain sockets that pass file descriptors (SCM_RIGHTS), which Deno's own socket API
 * cannot do. Layouts (x86-64): sockaddr_un {u16 family; char path[108]}; msghdr (56 bytes):
 * name @0, namelen @8, iov @16, iovlen @24, control @32, controllen @40, flags @48;
 * cmsghdr: len u64 @0, level i32 @8, type i32 @12, data @16.
 */
import { check, pooled, SysError } from "./errno.ts";
import { FileHandle } from "./file.ts";
import { cString, libc } from "./libc.ts";
import { AlignedMemory } from "./memory.ts";

const AF_UNIX = 1;
const SOCK_STREAM = 1;
const SOCK_CLOEXEC = 0o2000000;
const SOL_SOCKET = 1;
const SCM_RIGHTS = 1;
const SO_PEERCRED = 17;
const MSG_DONTWAIT = 0x40;
const MSG_NOSIGNAL = 0x4000;
const MSG_CMSG_CLOEXEC = 0x40000000;
const SHUT_RDWR = 2;
const MAX_FDS = 8;

function sockaddr(path: string): Uint8Array {
  const addr = new Uint8Array(110);
  const name = cString(path);
  if (name.length > 108) throw new RangeError(`Socket path too long: ${path}`);
  new DataView(addr.buffer).setUint16(0, AF_UNIX, true);
  addr.set(name, 2);
  return addr;
}

function unixSocket(what: string): FileHandle {
  return new FileHandle(
    check(libc.socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0), "socket", what),
    what,
  );
}

/**
 * A listening Unix socket at `path` (an old socket file there is replaced). With `mode`, the
 * socket file is created with exactly that mode (the umask is narrowed around bind(), so it is
 * never wider, then the mode is set explicitly).
 */
export class UnixListener implements Disposable {
  readonly handle: FileHandle;
  readonly path: string;

  constructor(path: string, options: { mode?: number } = {}) {
    try {
      if (Deno.lstatSync(path).isSocket) Deno.removeSync(path);
    } catch { /* not there */ }
    this.path = path;
    this.handle = unixSocket(path);
    try {
      const addr = sockaddr(path);
      if (options.mode === undefined) {
        check(libc.bind(this.handle.fd, addr, addr.length), "bind", path);
      } else {
        const old = Deno.umask(0o777 & ~options.mode);
        try {
          check(libc.bind(this.handle.fd, addr, addr.length), "bind", path);
        } finally {
          Deno.umask(old);
        }
        Deno.chmodSync(path, options.mode);
      }
      check(libc.listen(this.handle.fd, 64), "listen", path);
    } catch (e) {
      this.handle.close();
      throw e;
    }
  }

  /** Waits (on the thread pool) for a connection; null once the listener is shut down. */
  async accept(): Promise<FileHandle | null> {
    if (this.handle.closed) return null;
    const fd = await libc.accept4_nb(this.handle.fd, null, null, SOCK_CLOEXEC);
    if (fd < 0) return null; // shut down (EINVAL) or closed
    return new FileHandle(fd, `${this.path} (connection)`);
  }

  /** Wakes a pending accept() and stops listening. */
  [Symbol.dispose](): void {
    if (this.handle.closed) return;
    libc.shutdown(this.handle.fd, SHUT_RDWR);
    this.handle.close();
    try {
      Deno.removeSync(this.path);
    } catch { /* already gone */ }
  }
}

/** Who is at the other end of a connected Unix socket (SO_PEERCRED, taken at connect time). */
export function peerCredentials(sock: FileHandle): { pid: number; uid: number; gid: number } {
  const ucred = new Uint8Array(12); // struct ucred { pid_t pid; uid_t uid; gid_t gid; }
  const len = new Uint32Array([ucred.length]);
  check(
    libc.getsockopt(sock.fd, SOL_SOCKET, SO_PEERCRED, ucred, new Uint8Array(len.buffer)),
    "getsockopt(SO_PEERCRED)",
    sock.path,
  );
  const v = new DataView(ucred.buffer);
  return { pid: v.getInt32(0, true), uid: v.getUint32(4, true), gid: v.getUint32(8, true) };
}

/**
 * Reads what has arrived on a stream socket, waiting on the thread pool; 0 at end of stream,
 * after shutdown(), or when the connection failed (a read error cannot be told apart here).
 */
export async function receiveSome(sock: FileHandle, buf: Uint8Array<ArrayBuffer>): Promise<number> {
  const n = Number(await libc.read_nb(sock.fd, buf, BigInt(buf.length)));
  return n < 0 ? 0 : n;
}

/** Sends all of `data` on a stream socket (no SIGPIPE: a closed peer is an EPIPE SysError). */
export async function sendAll(sock: FileHandle, data: Uint8Array<ArrayBuffer>): Promise<void> {
  for (let done = 0; done < data.length;) {
    const rest = data.subarray(done);
    const n = await pooled(
      "send",
      sock.path,
      () => libc.send_nb(sock.fd, rest, BigInt(rest.length), MSG_NOSIGNAL),
      () => libc.send(sock.fd, rest, BigInt(rest.length), MSG_NOSIGNAL | MSG_DONTWAIT),
    );
    done += Number(n);
  }
}

/** Ends the receiving side of a connection: a pending or later receiveSome() returns 0. */
export function shutdownRead(sock: FileHandle): void {
  if (!sock.closed) libc.shutdown(sock.fd, 0 /* SHUT_RD */);
}

/** Connects to a Unix socket. */
export function connectUnix(path: string): FileHandle {
  const sock = unixSocket(path);
  const addr = sockaddr(path);
  try {
    check(libc.connect(sock.fd, addr, addr.length), "connect", path);
  } catch (e) {
    sock.close();
    throw e;
  }
  return sock;
}

/** Scratch memory for one message: msghdr, iovec, control buffer (addresses must be known). */
function message(
  data: Uint8Array,
  fdCount: number,
): { msg: Uint8Array; mem: AlignedMemory; control: DataView } {
  const mem = new AlignedMemory(4096);
  mem.bytes.fill(0);
  const base = mem.address;
  const iovAt = 64, controlAt = 128, dataAt = 256;
  const controlLen = 16 + Math.ceil((4 * fdCount) / 8) * 8;
  mem.bytes.set(data, dataAt);
  const v = new DataView(mem.bytes.buffer);
  v.setBigUint64(iovAt, BigInt(base + dataAt), true);
  v.setBigUint64(iovAt + 8, BigInt(data.length), true);
  v.setBigUint64(16, BigInt(base + iovAt), true);
  v.setBigUint64(24, 1n, true);
  if (fdCount > 0) {
    v.setBigUint64(32, BigInt(base + controlAt), true);
    v.setBigUint64(40, BigInt(controlLen), true);
  }
  return {
    msg: mem.bytes.subarray(0, 56),
    mem,
    control: new DataView(mem.bytes.buffer, controlAt, 128),
  };
}

/** Sends `data` with file descriptors attached, in one sendmsg. */
export function sendWithFds(sock: FileHandle, data: Uint8Array, fds: readonly number[]): void {
  if (data.length > 3800 || fds.length > MAX_FDS) throw new RangeError("Message too large");
  const { msg, mem, control } = message(data, fds.length);
  using _ = mem;
  if (fds.length > 0) {
    control.setBigUint64(0, BigInt(16 + 4 * fds.length), true);
    control.setInt32(8, SOL_SOCKET, true);
    control.setInt32(12, SCM_RIGHTS, true);
    fds.forEach((fd, i) => control.setInt32(16 + 4 * i, fd, true));
  }
  const n = check(libc.sendmsg(sock.fd, msg, MSG_NOSIGNAL), "sendmsg", sock.path);
  if (Number(n) !== data.length) throw new Error(`sendmsg ${sock.path}: short send`);
}

/** Receives up to `length` bytes and the file descriptors sent with them (blocking). */
export function receiveWithFds(
  sock: FileHandle,
  length: number,
): { data: Uint8Array; fds: FileHandle[] } {
  const { msg, mem, control } = message(new Uint8Array(length), MAX_FDS);
  using _ = mem;
  const n = Number(check(libc.recvmsg(sock.fd, msg, MSG_CMSG_CLOEXEC), "recvmsg", sock.path));
  if (n === 0) throw new SysError(104, "recvmsg", sock.path); // ECONNRESET: closed before the message
  const fds: FileHandle[] = [];
  const controlLen = Number(new DataView(msg.buffer, msg.byteOffset).getBigUint64(40, true));
  if (
    controlLen >= 16 && control.getInt32(8, true) === SOL_SOCKET &&
    control.getInt32(12, true) === SCM_RIGHTS
  ) {
    const count = (Number(control.getBigUint64(0, true)) - 16) / 4;
    for (let i = 0; i < count; i++) {
      fds.push(new FileHandle(control.getInt32(16 + 4 * i, true), `fd from ${sock.path}`));
    }
  }
  return { data: mem.bytes.slice(256, 256 + n), fds };
}
