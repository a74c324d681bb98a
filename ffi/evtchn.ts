/**
 * /dev/xen/evtchn (Linux uapi xen/evtchn.h; shared/specs/xen-backend.md §5): interdomain event
 * channels. The descriptor is non-blocking: fired ports are drained with plain read(2)s and
 * unmasked by writing them back, and only an idle backend parks one poll(2) on Deno's thread
 * pool (woken early through an eventfd by wake()).
 */
import { check, lastErrno, SysError } from "./errno.ts";
import { FileHandle } from "./file.ts";
import { libc } from "./libc.ts";
import { EAGAIN, EFD_CLOEXEC, EFD_NONBLOCK, EINTR, O_RDWR } from "./constants.ts";

/** _IOC(_IOC_NONE, 'E', nr, size), checked against the C header in tests/ffi/xen_devices_test.ts. */
export const EVTCHN = {
  IOCTL_BIND_VIRQ: 0x00044500n,
  IOCTL_BIND_INTERDOMAIN: 0x00084501n,
  IOCTL_BIND_UNBOUND_PORT: 0x00044502n,
  IOCTL_UNBIND: 0x00044503n,
  IOCTL_NOTIFY: 0x00044504n,
  IOCTL_RESET: 0x00004505n,
  IOCTL_RESTRICT_DOMID: 0x00024506n,
} as const;

const O_NONBLOCK = 0o4000;
const EFBIG = 27;
const POLLIN = 1;
const MAX_PORTS_PER_READ = 64;

/** One evtchn descriptor: the ports bound on it fire together. */
export class EventChannels implements Disposable {
  readonly handle: FileHandle;
  readonly #wakeFd: FileHandle;
  readonly #arg = new Uint32Array(2);
  readonly #ports = new Uint32Array(MAX_PORTS_PER_READ);
  readonly #pollfds = new Int32Array(4);
  readonly #one = new BigUint64Array([1n]);
  readonly #scratch = new BigUint64Array(1);
  readonly #bound = new Set<number>();

  constructor(path = "/dev/xen/evtchn") {
    this.handle = FileHandle.open(path, O_RDWR | O_NONBLOCK);
    try {
      const fd = check(libc.eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK), "eventfd");
      this.#wakeFd = new FileHandle(fd, "eventfd");
    } catch (e) {
      this.handle.close();
      throw e;
    }
    this.#pollfds[0] = this.handle.fd;
    this.#pollfds[2] = this.#wakeFd.fd;
  }

  /** Binds to `remotePort` of domain `domid`; returns our local port. */
  bindInterdomain(domid: number, remotePort: number): number {
    this.#arg[0] = domid;
    this.#arg[1] = remotePort;
    const port = check(
      libc.ioctl(this.handle.fd, EVTCHN.IOCTL_BIND_INTERDOMAIN, this.#arg),
      "ioctl(EVTCHN_BIND_INTERDOMAIN)",
    );
    this.#bound.add(port);
    return port;
  }

  unbind(port: number): void {
    if (!this.#bound.delete(port)) return;
    this.#arg[0] = port;
    check(libc.ioctl(this.handle.fd, EVTCHN.IOCTL_UNBIND, this.#arg), "ioctl(EVTCHN_UNBIND)");
  }

  /** Signals the other end of local `port`; false if the channel is closed (the peer died). */
  notify(port: number): boolean {
    this.#arg[0] = port;
    return libc.ioctl(this.handle.fd, EVTCHN.IOCTL_NOTIFY, this.#arg) >= 0;
  }

  /** Limits this descriptor to binding ports of one domain (one-way). */
  restrictDomain(domid: number): void {
    const arg = new Uint16Array([domid]);
    check(
      libc.ioctl(this.handle.fd, EVTCHN.IOCTL_RESTRICT_DOMID, arg),
      "ioctl(EVTCHN_RESTRICT_DOMID)",
    );
  }

  /**
   * Takes every fired port and unmasks it again (a fired port stays masked until written
   * back). Returns how many events were pending; an overflowed event queue counts as one.
   */
  drain(): number {
    let total = 0;
    for (;;) {
      const n = Number(libc.read(this.handle.fd, this.#ports, BigInt(this.#ports.byteLength)));
      if (n < 0) {
        const errno = lastErrno();
        if (errno === EINTR) continue;
        if (errno === EAGAIN) return total;
        if (errno === EFBIG) { // the kernel's queue overflowed: reset it and rescan every ring
          check(libc.ioctl_value(this.handle.fd, EVTCHN.IOCTL_RESET, 0n), "ioctl(EVTCHN_RESET)");
          for (const port of this.#bound) this.#unmask(port);
          return total + 1;
        }
        throw new SysError(errno, "read", this.handle.path);
      }
      if (n === 0) return total;
      check(libc.write(this.handle.fd, this.#ports, BigInt(n)), "write", this.handle.path);
      total += n / 4;
      if (n < this.#ports.byteLength) return total;
    }
  }

  #unmask(port: number): void {
    this.#arg[0] = port;
    libc.write(this.handle.fd, this.#arg, 4n);
  }

  /** Resolves when an event may be pending or wake() was called. */
  async wait(): Promise<void> {
    this.#pollfds[1] = POLLIN; // short events = POLLIN, short revents = 0 (little-endian)
    this.#pollfds[3] = POLLIN;
    await libc.poll_nb(this.#pollfds, 2n, -1);
    // reset the wake counter only when it fired (saves a syscall on every event)
    if (this.#pollfds[3] >>> 16 !== 0) libc.read(this.#wakeFd.fd, this.#scratch, 8n);
  }

  /** Ends a pending wait(). */
  wake(): void {
    libc.write(this.#wakeFd.fd, this.#one, 8n);
  }

  /** Unbinds every port and closes the descriptors. */
  [Symbol.dispose](): void {
    if (this.handle.closed) return;
    for (const port of [...this.#bound]) {
      try {
        this.unbind(port);
      } catch { /* closing the descriptor unbinds it anyway */ }
    }
    this.handle.close();
    this.#wakeFd.close();
  }
}
