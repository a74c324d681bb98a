/**
 * RingServer in process, with a frontend written by hand into a one-page ring: the serving loop's
 * ends (a transport whose kick wait fails; polling without kicks; stop()), and how responses are
 * pushed to a frontend that sleeps and to one that looks at the ring.
 */
import assert from "node:assert/strict";
import type { DiskDone, DiskInfo, Extent } from "../../drivers/driver.ts";
import { openDisk } from "../../drivers/mod.ts";
import type { BlockTarget } from "../../drivers/target.ts";
import type { Buffers } from "../../io/engine.ts";
import {
  BLKIF_LAYOUT as L,
  BLKIF_OP_READ,
  BLKIF_OP_WRITE,
  BLKIF_RSP_OKAY,
} from "../../ring/blkif.ts";
import { PageSegments } from "../../ring/segments.ts";
import { RingServer, type RingTransport } from "../../ring/server.ts";
import { withTempDir } from "../util.ts";

const PAGES = 8;

/** A transport over plain memory whose kick wait the test controls. */
class FakeTransport implements RingTransport {
  readonly ring = new Uint8Array(L.PAGE_SIZE);
  readonly pages = new Uint8Array(PAGES * L.PAGE_SIZE);
  readonly data = new PageSegments(this.pages);
  readonly #v = new DataView(this.ring.buffer);
  waitKick: () => Promise<boolean> = () => new Promise(() => {});
  notifies = 0;
  #prod = 0;
  #cons = 0;

  notify(): void {
    this.notifies++;
  }

  /** Publishes a one-page read or write of data page `page` at `sector`. */
  publish(write: boolean, id: number, sector: number, page: number): void {
    const v = this.#v, at = L.RING_OFFSET + (this.#prod % L.RING_SIZE) * L.ENTRY_SIZE;
    v.setUint8(at + L.OFF_OPERATION, write ? BLKIF_OP_WRITE : BLKIF_OP_READ);
    v.setUint8(at + L.OFF_NR_SEGMENTS, 1);
    v.setUint32(at + L.OFF_ID, id, true);
    v.setUint32(at + L.OFF_ID + 4, 0, true);
    v.setUint32(at + L.OFF_SECTOR_NUMBER, sector, true);
    v.setUint32(at + L.OFF_SECTOR_NUMBER + 4, 0, true);
    v.setUint32(at + L.OFF_SEG + L.OFF_SEG_GREF, page, true);
    v.setUint8(at + L.OFF_SEG + L.OFF_SEG_FIRST_SECT, 0);
    v.setUint8(at + L.OFF_SEG + L.OFF_SEG_LAST_SECT, 7);
    this.#prod++;
    v.setUint32(L.OFF_REQ_PROD, this.#prod, true);
  }

  /** The responses pushed since the last call, as [id, status]. */
  responses(): [number, number][] {
    const v = this.#v, out: [number, number][] = [];
    const prod = v.getUint32(L.OFF_RSP_PROD, true);
    for (; this.#cons !== prod; this.#cons++) {
      const at = L.RING_OFFSET + (this.#cons % L.RING_SIZE) * L.ENTRY_SIZE;
      out.push([v.getUint32(at + L.OFF_RSP_ID, true), v.getInt16(at + L.OFF_RSP_STATUS, true)]);
    }
    return out;
  }
}

/** Waits (up to ~1 s) until `ok()` returns true once. */
async function until(what: string, ok: () => boolean): Promise<void> {
  for (let i = 0; i < 500; i++) {
    if (ok()) return;
    await new Promise((r) => setTimeout(r, 2));
  }
  assert.fail(`timed out: ${what}`);
}

Deno.test("ring server: a failing kick wait ends run() with its error, after the requests in flight", async () => {
  await withTempDir(async (dir) => {
    Deno.writeFileSync(`${dir}/d.img`, new Uint8Array(1024 * 1024));
    const disk = await openDisk(`aio:${dir}/d.img`);
    const t = new FakeTransport();
    const server = new RingServer(disk, t, true);
    for (let i = 0; i < 4; i++) {
      t.pages.fill(i + 1, i * L.PAGE_SIZE, (i + 1) * L.PAGE_SIZE);
      t.publish(true, 100 + i, i * 8, i);
    }
    t.waitKick = () => Promise.reject(new Error("the transport broke"));
    await assert.rejects(server.run(), /the transport broke/);
    assert.deepEqual(
      t.responses().sort(),
      [100, 101, 102, 103].map((id) => [id, BLKIF_RSP_OKAY]),
    );
    const back = new Uint8Array(4 * L.PAGE_SIZE);
    await disk.read(0, back);
    for (let i = 0; i < 4; i++) assert.equal(back[i * L.PAGE_SIZE], i + 1, `block ${i}`);
    await disk.close();
  });
});

Deno.test("ring server: polling serves requests published without a kick; stop() ends it", async () => {
  await withTempDir(async (dir) => {
    const image = new Uint8Array(1024 * 1024);
    for (let i = 0; i < 32; i++) image.fill(0x40 + i, i * 4096, (i + 1) * 4096);
    Deno.writeFileSync(`${dir}/d.img`, image);
    const disk = await openDisk(`aio:${dir}/d.img`);
    const t = new FakeTransport();
    let kickWaits = 0;
    t.waitKick = () => {
      kickWaits++;
      return new Promise(() => {}); // a frontend that never kicks
    };
    const server = new RingServer(disk, t, true, { pollMicros: 200_000 });
    const running = server.run();
    for (let i = 0; i < 20; i++) {
      t.publish(false, i, (i % 32) * 8, i % PAGES);
      await until(`response ${i}`, () => {
        const r = t.responses();
        if (r.length === 0) return false;
        assert.deepEqual(r, [[i, BLKIF_RSP_OKAY]]);
        return true;
      });
      assert.equal(t.pages[(i % PAGES) * L.PAGE_SIZE], 0x40 + (i % 32), `read ${i}`);
      await new Promise((r) => setTimeout(r, 1));
    }
    assert.equal(kickWaits, 0, "the server slept while polling");
    server.stop();
    await running;
    assert.equal(server.stats.requests, 20);
    await disk.close();
  });
});

/** A disk whose reads complete only when the test says so. */
class HeldDisk implements BlockTarget {
  readonly size = 1024 * 1024;
  readonly name = "held";
  readonly info: DiskInfo = {
    size: this.size,
    logicalSectorSize: 512,
    physicalSectorSize: 4096,
    readOnly: false,
    backing: null,
    discardFreesSpace: false,
  };
  held: DiskDone[] = [];
  submit(_write: boolean, _offset: number, _bufs: Buffers, done: DiskDone): void {
    this.held.push(done);
  }
  read(): Promise<void> {
    return Promise.reject(new Error("not used"));
  }
  write(): Promise<void> {
    return Promise.reject(new Error("not used"));
  }
  flush(): Promise<void> {
    return Promise.resolve();
  }
  discard(): Promise<void> {
    return Promise.resolve();
  }
  writeZeroes(): Promise<void> {
    return Promise.resolve();
  }
  blockStatus(): Promise<Extent[]> {
    return Promise.resolve([]);
  }
}

const microtask = () => new Promise<void>((resolve) => queueMicrotask(resolve));

for (const asleep of [true, false]) {
  const who = asleep ? "asleep until notified" : "looking at the ring";
  Deno.test(`ring server: a frontend ${who} gets ${asleep ? "one push of a turn's responses" : "each response as it is ready"}`, async () => {
    const disk = new HeldDisk(), t = new FakeTransport();
    const server = new RingServer(disk, t, true);
    const v = new DataView(t.ring.buffer);
    const arm = () => v.setUint32(L.OFF_RSP_EVENT, v.getUint32(L.OFF_RSP_PROD, true) + 1, true);
    for (let i = 0; i < 8; i++) t.publish(false, i, i * 8, i);
    if (asleep) arm();
    else v.setUint32(L.OFF_RSP_EVENT, 0, true); // stale: the frontend asked for no notification
    let kicked: (more: boolean) => void = () => {};
    t.waitKick = () => new Promise((resolve) => kicked = resolve);
    const running = server.run();
    await until("the requests reach the disk", () => disk.held.length === 8);
    // Completions come one per microtask, as the engines hand them out; a sleeping frontend
    // re-arms after each notification it gets.
    const seen: number[] = [];
    for (const done of disk.held) {
      done(null);
      await microtask();
      await microtask();
      seen.push(t.responses().length);
      if (asleep && t.notifies > 0) arm();
    }
    if (asleep) {
      assert.deepEqual(seen, [0, 0, 0, 0, 0, 0, 0, 0], "nothing pushed within the turn");
      await new Promise((r) => setTimeout(r, 0));
      assert.equal(t.responses().length, 8, "the turn's responses, pushed together");
      assert.equal(t.notifies, 1);
    } else {
      assert.deepEqual(seen, [1, 1, 1, 1, 1, 1, 1, 1], "each response pushed as it came");
      assert.equal(t.notifies, 0);
    }
    kicked(false);
    await running;
  });
}

Deno.test("ring server: run() pushes the last responses itself before it returns", async () => {
  const disk = new HeldDisk(), t = new FakeTransport();
  const server = new RingServer(disk, t, true);
  const v = new DataView(t.ring.buffer);
  for (let i = 0; i < 3; i++) t.publish(false, i, i * 8, i);
  v.setUint32(L.OFF_RSP_EVENT, 1, true); // asleep: responses wait for the end of the turn
  let kicked: (more: boolean) => void = () => {};
  t.waitKick = () => new Promise((resolve) => kicked = resolve);
  const running = server.run();
  await until("the requests reach the disk", () => disk.held.length === 3);
  server.stop();
  kicked(true);
  for (const done of disk.held) done(null);
  await running; // returns before the turn ends: the transport may be closed right after
  assert.equal(t.responses().length, 3);
  assert.equal(t.notifies, 1);
});
