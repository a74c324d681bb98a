/**
 * Per-disk processes: a tapdisk killed with SIGKILL fails only its own disk — the other keeps
 * serving, `list` says which failed and why — and the failed disk can be detached and its id
 * reused.
 */
import assert from "node:assert/strict";
import { alive, qemuIo, rawImage, unixUri, withDaemon } from "./helpers.ts";

Deno.test("daemon: SIGKILL on one tapdisk fails that disk only; the other still serves", async () => {
  await withDaemon(async (d) => {
    const a = await d.attach(rawImage(d, "a.img"));
    const b = await d.attach(`tap:aio:${rawImage(d, "b.img")}`);
    assert.deepEqual([a.id, b.id], [0, 1]);
    assert.equal(a.state, "running");
    assert.equal(a.exports[0], `unix:${d.stateDir}/nbd/0.sock`);
    await qemuIo(unixUri(a), "write -P 0xa1 0 1M");
    await qemuIo(unixUri(b), "write -P 0xb1 0 1M");

    const pid = (await d.list()).find((x) => x.id === 0)!.pid!;
    assert.ok(pid > 0 && pid !== b.pid);
    Deno.kill(pid, "SIGKILL");
    let disks = await d.list();
    for (let i = 0; i < 50 && disks[0].state !== "failed"; i++) {
      await new Promise((r) => setTimeout(r, 100));
      disks = await d.list();
    }
    assert.equal(disks[0].state, "failed");
    assert.equal(disks[0].reason, "tapdisk killed by SIGKILL");
    assert.equal(disks[0].pid, null);
    assert.equal(disks[1].state, "running");
    assert.ok(alive(b.pid!));

    // The other disk serves reads and writes as before.
    await qemuIo(unixUri(b), "read -P 0xb1 0 1M", "write -P 0xb2 1M 1M", "read -P 0xb2 1M 1M");
    // The table says which failed, and why.
    const table = (await d.ctlOk("list")).stdout;
    assert.match(table, /^ID\s+STATE\s+PID/);
    assert.match(table, /\n0\s+failed\s+-\s.*tapdisk killed by SIGKILL/);
    assert.match(table, new RegExp(`\\n1\\s+running\\s+${b.pid}\\s`));
    // Its socket is gone; requests on it are refused with the reason.
    assert.throws(() => Deno.statSync(`${d.stateDir}/nbd/0.sock`));
    const paused = await d.ctl("pause", "0");
    assert.equal(paused.code, 1);
    assert.match(paused.stderr, /^tapd: ctl: disk 0 has failed \(tapdisk killed by SIGKILL\)/);

    // Detaching the failed disk frees id 0 for the next attach.
    await d.ctlOk("detach", "0");
    const again = await d.attach(rawImage(d, "c.img"));
    assert.equal(again.id, 0);
    await qemuIo(unixUri(again), "write -P 0xc1 0 64k", "read -P 0xc1 0 64k");
    assert.deepEqual((await d.list()).map((x) => [x.id, x.state]), [[0, "running"], [
      1,
      "running",
    ]]);
  });
});

Deno.test("daemon: a tapdisk that exits with an error is reported with its exit code", async () => {
  await withDaemon(async (d) => {
    const a = await d.attach(rawImage(d, "a.img"));
    // SIGTERM straight to the child (not through the daemon): it stops cleanly, exit 0,
    // but the daemon did not ask for it, so the disk is failed all the same.
    Deno.kill(a.pid!, "SIGTERM");
    let disk = (await d.list())[0];
    for (let i = 0; i < 50 && disk.state !== "failed"; i++) {
      await new Promise((r) => setTimeout(r, 100));
      disk = (await d.list())[0];
    }
    assert.equal(disk.state, "failed");
    assert.equal(disk.reason, "tapdisk exited normally");
  });
});
