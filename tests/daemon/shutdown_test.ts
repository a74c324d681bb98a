/** SIGTERM (and SIGINT): stop accepting, drain and close every disk, remove the sockets, exit 0. */
import assert from "node:assert/strict";
import { RingFrontend } from "../../ring/frontend.ts";
import { alive, MiB, qemuIo, rawImage, TestDaemon, unixUri } from "./helpers.ts";

for (const signal of ["SIGTERM", "SIGINT"] as const) {
  Deno.test(`daemon: ${signal} stops every tapdisk, removes the sockets and exits 0`, async () => {
    const d = await TestDaemon.start();
    try {
      const a = await d.attach(rawImage(d, "a.img"));
      const ring = `${d.dir}/b.ring`;
      const b = await d.attach(rawImage(d, "b.img"), "--ring", `unix:${ring}`);
      assert.deepEqual(b.exports, [`ring:unix:${ring}`]);
      await qemuIo(unixUri(a), `write -P 0x5a 0 ${MiB}`);
      const fe = new RingFrontend(ring);
      const data = new Uint8Array(32768).fill(0x6b);
      await fe.write(0, data);
      fe.close();
      const pids = [a.pid!, b.pid!];

      const status = await d.stop(signal);
      assert.equal(status.code, 0, d.stderr);
      assert.equal(status.signal, null);
      for (const pid of pids) assert.ok(!alive(pid), `tapdisk ${pid} is still running`);
      for (const path of [d.control, `${d.stateDir}/nbd/0.sock`, ring]) {
        assert.throws(() => Deno.lstatSync(path), Deno.errors.NotFound, `${path} was left behind`);
      }
      assert.match(d.stderr, /component=tapdisk .*disk=0 msg=stopped/);
      assert.match(d.stderr, /component=tapdisk .*disk=1 msg=stopped/);
      assert.match(d.stderr, /component=daemon .*msg=stopped/);
      // The data written reached the images.
      const img = Deno.readFileSync(`${d.dir}/a.img`).subarray(0, MiB);
      assert.ok(img.every((x) => x === 0x5a));
      const imgB = Deno.readFileSync(`${d.dir}/b.img`).subarray(0, 32768);
      assert.ok(imgB.every((x) => x === 0x6b));
    } finally {
      await d.dispose();
    }
  });
}

Deno.test("daemon: killed with SIGKILL, its tapdisks stop on their own; a new daemon starts", async () => {
  const d = await TestDaemon.start();
  try {
    const a = await d.attach(rawImage(d, "a.img"));
    await qemuIo(unixUri(a), "write -P 0x77 0 64k");
    assert.equal((await d.stop("SIGKILL")).signal, "SIGKILL");
    // End of stdin tells the tapdisk its daemon is gone: it drains, flushes and exits.
    for (let i = 0; i < 100 && alive(a.pid!); i++) await new Promise((r) => setTimeout(r, 50));
    assert.ok(!alive(a.pid!), "the tapdisk outlived its daemon");
    assert.match(d.stderr, /component=tapdisk .*msg="control channel closed: stopping"/);
    assert.throws(() => Deno.lstatSync(`${d.stateDir}/nbd/0.sock`), Deno.errors.NotFound);
    // The stale control socket does not stop the next daemon.
    const next = await TestDaemon.start(d.dir);
    assert.deepEqual(await next.list(), []);
    assert.equal((await next.stop()).code, 0);
  } finally {
    await d.dispose();
  }
});
