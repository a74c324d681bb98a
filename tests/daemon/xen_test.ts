/**
 * Xen exports under the daemon, against the fake xenstored (TAPD_XENSTORE, inherited by the
 * tapdisks): `tapd ctl attach SPEC --xen 3:xvdb` plugs the vbd (backend in InitWait, frontend
 * pointing at it), `list` shows `xen:3:xvdb`; a taken device, bad targets and a missing domain
 * are refused and leave nothing behind; a device whose frontend vanishes ends alone (the disk
 * serves on); `detach` unplugs politely, the test answering as the guest would.
 */
import assert from "node:assert/strict";
import { FakeXenStored } from "../xen/fake_xenstored.ts";
import { MiB, rawImage, TestDaemon } from "./helpers.ts";

const BE = "/local/domain/0/backend/vbd3/3";
const FE = "/local/domain/3/device/vbd";
const XVDB = 51728, XVDC = 51744;

/** Answers an unplug as a guest's blkfront would: backend Closing (5) → frontend Closed (6). */
function actAsGuest(store: FakeXenStored, devid: number): () => void {
  const be = `${BE}/${devid}`;
  return store.onChange(`${be}/state`, () => {
    if (store.read(`${be}/state`) !== "5") return;
    setTimeout(() => store.write(`${FE}/${devid}/state`, "6"), 0);
  });
}

Deno.test("daemon: attach --xen plugs a vbd, refuses duplicates and bad targets, detach unplugs", async () => {
  const store = await FakeXenStored.start();
  let d: TestDaemon | null = null;
  try {
    d = await TestDaemon.start(undefined, undefined, { TAPD_XENSTORE: store.socketPath });
    store.write("/local/domain/3/domid", "3");
    const img = rawImage(d, "a.img", 16 * MiB);
    const be = `${BE}/${XVDB}`, fe = `${FE}/${XVDB}`;

    // --xen alone is an export: no NBD socket is added.
    const disk = await d.attach(`tap:aio:${img}`, "--xen", "3:xvdb");
    assert.equal(disk.state, "running");
    assert.deepEqual(disk.exports, ["xen:3:xvdb"]);
    assert.deepEqual(disk.uris, []);
    assert.equal(disk.size, 16 * MiB);
    assert.equal(await store.waitFor(`${be}/state`, (v) => v === "2"), "2");
    assert.equal(store.read(`${be}/frontend`), fe);
    assert.equal(store.read(`${be}/mode`), "w");
    assert.equal(store.read(`${fe}/backend`), be);
    assert.equal(store.read(`${fe}/virtual-device`), String(XVDB));
    assert.match((await d.ctlOk("list")).stdout, /\n0\s+running\s+\d+\s.*\sxen:3:xvdb\n$/);

    // The device is taken, however it is spelled.
    for (const target of ["3:xvdb", `3:${XVDB}`]) {
      const taken = await d.ctl("attach", img, "--xen", target);
      assert.equal(taken.code, 1);
      assert.equal(taken.stderr, "tapd: ctl: xen:3:xvdb is already used by disk 0\n");
    }
    // Bad targets are refused before anything starts.
    const dom0 = await d.ctl("attach", img, "--xen", "0:xvda");
    assert.equal(dom0.code, 1);
    assert.equal(
      dom0.stderr,
      'tapd: ctl: invalid Xen target "0:xvda": expected DOMID[:VDEV] with a guest domain id 1..32751\n',
    );
    const bogus = await d.ctl("attach", img, "--xen", "3:bogus");
    assert.equal(bogus.code, 1);
    assert.equal(
      bogus.stderr,
      'tapd: ctl: invalid Xen target "3:bogus": "bogus" is not a virtual device name (e.g. xvda, xvdb1)\n',
    );
    // A domain that does not exist: the tapdisk says so, and no disk is left.
    const img2 = rawImage(d, "b.img", 16 * MiB);
    const missing = await d.ctl("attach", img2, "--xen", "9");
    assert.equal(missing.code, 1);
    assert.equal(missing.stderr, `tapd: ctl: attach ${img2}: Xen domain 9 does not exist\n`);
    assert.deepEqual((await d.list()).map((x) => x.id), [0]);
    assert.deepEqual(store.directory("/local/domain/0/backend/vbd3"), ["3"]);

    // A device whose frontend vanishes (the guest removed it) ends; the disk serves on.
    const other = await d.ctlOk("attach", img2, "--xen", "3:xvdc");
    assert.match(other.stdout, /^disk 1: running .*\n {2}xen:3:xvdc\n$/);
    await store.waitFor(`${BE}/${XVDC}/state`, (v) => v === "2");
    store.rm(`${FE}/${XVDC}`);
    let ended = (await d.list())[1];
    for (let i = 0; i < 50 && ended.exports.length > 0; i++) {
      await new Promise((resolve) => setTimeout(resolve, 100));
      ended = (await d.list())[1];
    }
    assert.equal(ended.state, "running");
    assert.deepEqual(ended.exports, []);
    assert.equal(ended.reason, "xen:3:xvdc ended: the frontend vanished");
    assert.equal(store.read(`${BE}/${XVDC}`), null);
    await d.ctlOk("detach", "1");

    // Detach: the backend asks the guest to let go (Closing), the "guest" closes, and both
    // directories are removed — well before the 10 s unplug timeout.
    const off = actAsGuest(store, XVDB);
    const started = Date.now();
    await d.ctlOk("detach", "0");
    off();
    assert.ok(Date.now() - started < 5000, `detach took ${Date.now() - started} ms`);
    assert.equal(store.read(be), null);
    assert.equal(store.read(fe), null);
    assert.deepEqual(await d.list(), []);
    assert.match(d.stderr, /export=xen:3:xvdb reason=unplugged msg="the Xen device is unplugged"/);
  } finally {
    await d?.dispose();
    await store.close();
  }
});
