/**
 * The vbd backend's xenbus state machine and request path, end to end in one process: a fake
 * xenstored (tests/xen/fake_xenstored.ts), a fake guest + gntdev/evtchn (tests/xen/fake_kernel.ts)
 * and a scripted blkfront that does what Linux 6.1's does (xen-backend.md §3.2, §3.5, §6).
 * The real kernel, hypervisor and blkfront are exercised by tests/xen/xen_guest_test.ts.
 */
import assert from "node:assert/strict";
import { openDisk } from "../../drivers/mod.ts";
import type { Disk } from "../../drivers/disk.ts";
import { silentLogger } from "../../cli/log.ts";
import {
  BLKIF_LAYOUT as L,
  BLKIF_OP_DISCARD,
  BLKIF_OP_FLUSH_DISKCACHE,
  BLKIF_OP_INDIRECT,
  BLKIF_OP_READ,
  BLKIF_OP_WRITE,
  ringEntries,
} from "../../ring/blkif.ts";
import { serveXenVbd } from "../../xen/serve.ts";
import { XenStore } from "../../xen/xenstore/client.ts";
import { FakeXenStored } from "./fake_xenstored.ts";
import { FakeGuest, FakeKernel } from "./fake_kernel.ts";

const DOMID = 7;
const DEVID = 51712; // xvda
const BE = `/local/domain/0/backend/vbd3/${DOMID}/${DEVID}`;
const FE = `/local/domain/${DOMID}/device/vbd/${DEVID}`;
const SIZE = 16 << 20;

interface Segment {
  gref: number;
  first: number;
  last: number;
}

/** A scripted blkfront: xenstore handshake, one ring, requests and responses by id. */
class Blkfront {
  readonly guest: FakeGuest;
  readonly xs: XenStore;
  ring!: Uint8Array;
  words!: Uint32Array;
  view!: DataView;
  size = 0;
  port = 0;
  #prod = 0;
  #cons = 0;
  #nextId = 1n;
  #waiting = new Map<bigint, (r: { op: number; status: number }) => void>();

  constructor(guest: FakeGuest, xs: XenStore) {
    this.guest = guest;
    this.xs = xs;
    guest.onNotify = () => this.#reap();
  }

  async waitBackend(state: number): Promise<void> {
    await waitFor(
      async () => (await this.xs.read(`${BE}/state`)) === String(state),
      `backend ${state}`,
    );
  }

  /** Publishes a ring of 2^order pages and goes to Initialised. */
  async connect(order: number, protocol = "x86_64-abi"): Promise<void> {
    const { refs, bytes } = this.guest.grant(2 ** order);
    this.ring = bytes;
    this.words = new Uint32Array(bytes.buffer, bytes.byteOffset, 16);
    this.view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    this.size = ringEntries(bytes.byteLength);
    this.words[1] = 1; // req_event
    this.words[3] = 1; // rsp_event
    this.#prod = this.#cons = 0;
    this.port = this.guest.allocPort();
    await this.xs.transaction(async (tx) => {
      if (order > 0) {
        await this.xs.write(`${FE}/ring-page-order`, String(order), tx);
        for (let i = 0; i < refs.length; i++) {
          await this.xs.write(`${FE}/ring-ref${i}`, String(refs[i]), tx);
        }
      } else {
        await this.xs.rm(`${FE}/ring-page-order`, tx);
        await this.xs.write(`${FE}/ring-ref`, String(refs[0]), tx);
      }
      await this.xs.write(`${FE}/event-channel`, String(this.port), tx);
      await this.xs.write(`${FE}/protocol`, protocol, tx);
      await this.xs.write(`${FE}/state`, "3", tx);
    });
  }

  async setState(state: number): Promise<void> {
    await this.xs.write(`${FE}/state`, String(state));
  }

  /** Grants data pages for `bytes` laid out as the segments say; returns the segments. */
  segments(layout: [number, number][]): { segs: Segment[]; pages: Uint8Array[] } {
    const segs: Segment[] = [], pages: Uint8Array[] = [];
    for (const [first, last] of layout) {
      const { refs, bytes } = this.guest.grant(1);
      segs.push({ gref: refs[0], first, last });
      pages.push(bytes);
    }
    return { segs, pages };
  }

  /** Puts one request in the ring (not yet published). */
  request(
    op: number,
    sector: number,
    segs: Segment[],
    extra: { nrSectors?: number | bigint; indirect?: number } = {},
  ): Promise<{ op: number; status: number }> {
    const id = this.#nextId++;
    const base = L.RING_OFFSET + (this.#prod++ & (this.size - 1)) * L.ENTRY_SIZE;
    const v = this.view;
    this.ring.fill(0, base, base + L.ENTRY_SIZE);
    v.setUint8(base, op);
    v.setBigUint64(base + 8, id, true);
    v.setBigUint64(base + 16, BigInt(sector), true);
    if (op === BLKIF_OP_INDIRECT) {
      v.setUint8(base + 1, extra.indirect!);
      v.setUint16(base + 2, segs.length, true);
      v.setUint16(base + 24, DEVID & 0xffff, true);
      const pages = Math.ceil(segs.length / 512);
      const { refs, bytes } = this.guest.grant(pages);
      const d = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
      segs.forEach((s, i) => {
        d.setUint32(i * 8, s.gref, true);
        d.setUint8(i * 8 + 4, s.first);
        d.setUint8(i * 8 + 5, s.last);
      });
      refs.forEach((r, i) => v.setUint32(base + 28 + 4 * i, r, true));
    } else if (op === BLKIF_OP_DISCARD) {
      v.setBigUint64(base + 24, BigInt(extra.nrSectors ?? 0), true);
    } else {
      v.setUint8(base + 1, segs.length);
      v.setUint16(base + 2, DEVID & 0xffff, true);
      segs.forEach((s, i) => {
        v.setUint32(base + 24 + i * 8, s.gref, true);
        v.setUint8(base + 28 + i * 8, s.first);
        v.setUint8(base + 29 + i * 8, s.last);
      });
    }
    return new Promise((resolve) => this.#waiting.set(id, resolve));
  }

  /** Publishes the requests written so far and kicks the backend. */
  publish(): void {
    Atomics.store(this.words, 0, this.#prod);
    this.guest.kick(this.port);
  }

  /** Publishes a producer index that claims more requests than the ring holds. */
  publishBogus(): void {
    Atomics.store(this.words, 0, (this.#cons + this.size + 5) >>> 0);
    this.guest.kick(this.port);
  }

  #reap(): void {
    const prod = Atomics.load(this.words, 2);
    while (this.#cons !== prod) {
      const base = L.RING_OFFSET + (this.#cons++ & (this.size - 1)) * L.ENTRY_SIZE;
      const id = this.view.getBigUint64(base, true);
      const op = this.view.getUint8(base + 8), status = this.view.getInt16(base + 10, true);
      const done = this.#waiting.get(id);
      assert.ok(done !== undefined, `response for unknown id ${id}`);
      this.#waiting.delete(id);
      done({ op, status });
    }
    this.words[3] = this.#cons + 1; // rsp_event: notify on the next response
  }
}

async function waitFor(check: () => Promise<boolean>, what: string, ms = 5000): Promise<void> {
  const end = Date.now() + ms;
  while (!(await check())) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 5));
  }
}

function pattern(bytes: Uint8Array, seed: number): void {
  for (let i = 0; i < bytes.length; i++) bytes[i] = (i * 31 + seed * 7 + (i >> 9)) & 0xff;
}

interface World {
  store: FakeXenStored;
  xs: XenStore;
  guest: FakeGuest;
  kernel: FakeKernel;
  disk: Disk;
  front: Blkfront;
  stop: () => void;
  served: Promise<string>;
  lines: string[];
}

async function world(fn: (w: World) => Promise<void>): Promise<void> {
  const dir = await Deno.makeTempDir();
  const store = await FakeXenStored.start();
  const image = `${dir}/disk.raw`;
  await Deno.writeFile(image, new Uint8Array(0));
  await Deno.truncate(image, SIZE);
  const disk = await openDisk(`aio:${image}`);
  const xs = await XenStore.connect({ socket: store.socketPath });
  await xs.write(`/local/domain/${DOMID}/domid`, String(DOMID));
  const guest = new FakeGuest();
  const kernel = new FakeKernel(guest);
  let stop!: () => void;
  const stopped = new Promise<void>((r) => stop = r);
  const lines: string[] = [];
  const log = {
    ...silentLogger,
    info: (m: string) => lines.push(m),
    warn: (m: string) => lines.push(m),
  };
  log.with = () => log;
  const served = serveXenVbd(disk, {
    frontendDomid: DOMID,
    devid: DEVID,
    xenstore: store.socketPath,
    kernel,
    stop: stopped,
    log,
    unplugTimeoutMs: 2000,
  });
  const front = new Blkfront(guest, xs);
  try {
    await fn({ store, xs, guest, kernel, disk, front, stop, served, lines });
  } finally {
    stop();
    await served.catch(() => {});
    xs.close();
    await disk.close();
    await store.close();
    await Deno.remove(dir, { recursive: true });
  }
}

Deno.test("xen vbd: handshake, direct and indirect I/O, errors, close, reconnect, guest gone", async () => {
  await world(async ({ xs, kernel, disk, front, served, store }) => {
    // the toolstack part: both directories, guest-owned frontend dir
    await front.waitBackend(2);
    assert.equal(await xs.read(`${FE}/backend`), BE);
    assert.equal(await xs.read(`${FE}/virtual-device`), String(DEVID));
    assert.deepEqual(await xs.getPerms(FE), [`n${DOMID}`, "r0"]);
    assert.deepEqual(await xs.getPerms(BE), ["n0", `r${DOMID}`]);
    assert.equal(await xs.read(`${BE}/max-ring-page-order`), "4");
    assert.equal(await xs.read(`${BE}/feature-max-indirect-segments`), "256");
    assert.equal(await xs.read(`${BE}/feature-flush-cache`), "1");
    assert.equal(await xs.read(`${BE}/feature-persistent`), "0");

    await front.connect(2); // a 4-page ring
    await front.waitBackend(4);
    assert.equal(front.size, 128);
    assert.equal(await xs.read(`${BE}/sectors`), String(SIZE / 512));
    assert.equal(await xs.read(`${BE}/info`), "0");
    assert.equal(await xs.read(`${BE}/sector-size`), "512");
    assert.equal(kernel.mappedRings, 1);
    assert.equal(kernel.boundPorts, 1);

    // direct write with segments starting mid-page, then read back through other pages
    const layout: [number, number][] = [[1, 7], [0, 7], [0, 3]];
    const w = front.segments(layout);
    w.pages.forEach((p, i) => pattern(p, i + 1));
    const write = front.request(BLKIF_OP_WRITE, 24, w.segs);
    front.publish();
    assert.deepEqual(await write, { op: BLKIF_OP_WRITE, status: 0 });
    const r = front.segments(layout);
    const read = front.request(BLKIF_OP_READ, 24, r.segs);
    front.publish();
    assert.deepEqual(await read, { op: BLKIF_OP_READ, status: 0 });
    layout.forEach(([first, last], i) => {
      const range = [first * 512, (last + 1) * 512];
      assert.deepEqual(
        r.pages[i].subarray(range[0], range[1]),
        w.pages[i].subarray(range[0], range[1]),
      );
    });
    const onDisk = new Uint8Array(4096);
    await disk.read(24 * 512, onDisk);
    assert.deepEqual(onDisk.subarray(0, 7 * 512), w.pages[0].subarray(512, 4096));

    // indirect: 600 segments (two descriptor pages), the response carries the inner op
    const big: [number, number][] = Array.from({ length: 600 }, () => [0, 7]);
    const iw = front.segments(big);
    iw.pages.forEach((p, i) => pattern(p, 100 + i));
    // 600 > 256 advertised: refused
    const tooMany = front.request(BLKIF_OP_INDIRECT, 4096, iw.segs, { indirect: BLKIF_OP_WRITE });
    front.publish();
    assert.deepEqual(await tooMany, { op: BLKIF_OP_WRITE, status: -1 });
    const segs256 = iw.segs.slice(0, 256);
    const iwrite = front.request(BLKIF_OP_INDIRECT, 4096, segs256, { indirect: BLKIF_OP_WRITE });
    const ir = front.segments(big.slice(0, 256));
    const iread = front.request(BLKIF_OP_INDIRECT, 4096, ir.segs, { indirect: BLKIF_OP_READ });
    front.publish(); // both in one batch: the read may run before the write, so check after
    assert.deepEqual(await iwrite, { op: BLKIF_OP_WRITE, status: 0 });
    await iread;
    const again = front.segments(big.slice(0, 256));
    const iread2 = front.request(BLKIF_OP_INDIRECT, 4096, again.segs, { indirect: BLKIF_OP_READ });
    front.publish();
    assert.deepEqual(await iread2, { op: BLKIF_OP_READ, status: 0 });
    again.pages.forEach((p, i) => assert.deepEqual(p, iw.pages[i], `indirect page ${i}`));

    // flush, discard, and the errors: bad grant, out of range, bad sectors, unknown op
    const flush = front.request(BLKIF_OP_FLUSH_DISKCACHE, 0, []);
    const discard = front.request(BLKIF_OP_DISCARD, 2048, [], { nrSectors: 64 });
    const badGrant = front.request(BLKIF_OP_WRITE, 0, [{ gref: 999999, first: 0, last: 7 }]);
    const past = front.request(BLKIF_OP_READ, SIZE / 512 - 4, front.segments([[0, 7]]).segs);
    const hugeDiscard = front.request(BLKIF_OP_DISCARD, 8, [], { nrSectors: 0xffffffffffffffffn });
    const badSect = front.request(BLKIF_OP_WRITE, 0, [{ ...w.segs[0], first: 6, last: 2 }]);
    const unknown = front.request(99, 0, []);
    front.publish();
    assert.equal((await flush).status, 0);
    assert.equal((await discard).status, 0);
    assert.equal((await badGrant).status, -1);
    assert.equal((await past).status, -1);
    assert.equal((await hugeDiscard).status, -1);
    assert.equal((await badSect).status, -1);
    assert.deepEqual(await unknown, { op: 99, status: -2 });
    // still serving
    const after = front.request(BLKIF_OP_READ, 24, front.segments([[0, 7]]).segs);
    front.publish();
    assert.equal((await after).status, 0);

    // the guest closes the device: backend Closing, then Closed, everything released
    await front.setState(5);
    await front.waitBackend(5);
    await front.setState(6);
    await front.waitBackend(6);
    assert.equal(kernel.mappedRings, 0);
    assert.equal(kernel.boundPorts, 0);
    assert.equal(kernel.openSegments, 0);

    // ... and reopens it (module reload): InitWait again, a one-page ring this time
    await front.setState(1);
    await front.waitBackend(2);
    await front.connect(0);
    await front.waitBackend(4);
    assert.equal(front.size, 32);
    const r2 = front.segments([[0, 7]]);
    const read2 = front.request(BLKIF_OP_READ, 24, r2.segs);
    front.publish();
    assert.equal((await read2).status, 0);
    assert.deepEqual(r2.pages[0].subarray(0, 512), w.pages[0].subarray(512, 1024));

    // the domain is destroyed: its directory vanishes, @releaseDomain fires
    await xs.rm(`/local/domain/${DOMID}`);
    store.releaseDomain();
    assert.equal(await served, "the frontend vanished");
    assert.equal(kernel.mappedRings, 0);
    assert.equal(kernel.boundPorts, 0);
    assert.equal(await xs.read(`${BE}/state`), null);
  });
});

Deno.test("xen vbd: unplug on stop waits for the guest to let go, then removes both directories", async () => {
  await world(async ({ xs, kernel, front, stop, served }) => {
    await front.waitBackend(2);
    await front.connect(1);
    await front.waitBackend(4);
    stop();
    await waitFor(async () => (await xs.read(`${BE}/online`)) === "0", "online=0");
    await front.waitBackend(5);
    assert.equal(kernel.mappedRings, 1); // the guest has not let go yet
    await front.setState(6);
    assert.equal(await served, "unplugged");
    assert.equal(kernel.mappedRings, 0);
    assert.equal(await xs.read(`${BE}/state`), null);
    assert.equal(await xs.read(`${FE}/state`), null);
  });
});

Deno.test("xen vbd: a guest that keeps the disk is disconnected after the unplug timeout", async () => {
  await world(async ({ kernel, front, stop, served, lines }) => {
    await front.waitBackend(2);
    await front.connect(0);
    await front.waitBackend(4);
    stop();
    assert.equal(await served, "unplug timed out");
    assert.equal(kernel.mappedRings, 0);
    assert.ok(lines.some((l) => l.includes("did not release")), lines.join("\n"));
  });
});

Deno.test("xen vbd: a frontend with another ABI or a bad ring is refused with an error node", async () => {
  await world(async ({ xs, kernel, front, lines }) => {
    await front.waitBackend(2);
    await front.connect(0, "x86_32-abi");
    await front.waitBackend(5);
    assert.equal(kernel.mappedRings, 0);
    assert.match((await xs.read(`/local/domain/0/error${BE}/error`))!, /x86_32-abi/);
    assert.ok(lines.some((l) => l.includes("only x86_64-abi")));
    // after the guest closes and retries properly, it connects
    await front.setState(6);
    await front.waitBackend(6);
    await front.setState(1);
    await front.waitBackend(2);
    await front.connect(0);
    await front.waitBackend(4);
    // a producer index jumping past the ring stops it: Closing, nothing left mapped
    front.publishBogus();
    await front.waitBackend(5);
    assert.equal(kernel.mappedRings, 0);
    assert.equal(kernel.boundPorts, 0);
    assert.ok(lines.some((l) => l.includes("more requests than the ring holds")), lines.join("\n"));
  });
});

Deno.test("xen vbd: ring-ref and event-channel from the guest are parsed strictly", async () => {
  await world(async ({ xs, kernel, front }) => {
    await front.waitBackend(2);
    await xs.transaction(async (tx) => {
      await xs.write(`${FE}/ring-ref`, "12abc", tx);
      await xs.write(`${FE}/event-channel`, "5", tx);
      await xs.write(`${FE}/state`, "3", tx);
    });
    await front.waitBackend(5);
    assert.match((await xs.read(`/local/domain/0/error${BE}/error`))!, /ring-ref/);
    assert.equal(kernel.mappedRings, 0);
  });
});
