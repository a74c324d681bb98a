/** The control protocol refuses bad requests with one-line error replies; the daemon keeps going. */
import assert from "node:assert/strict";
import { qemuIo, rawImage, tapd, unixUri, withDaemon } from "./helpers.ts";
import { lockedBytes, qemuIoHolding } from "../util.ts";

Deno.test("daemon: bad requests get error replies and the daemon keeps serving", async () => {
  await withDaemon(async (d) => {
    const img = rawImage(d, "a.img");
    const cases: Array<[unknown, RegExp]> = [
      [{ verb: "explode" }, /^unknown verb "explode": expected one of attach, list, detach/],
      ["hello", /^request must be a JSON object/],
      [{ id: 1 }, /^request has no "verb"/],
      [{ verb: "attach" }, /^attach: missing "spec"/],
      [{ verb: "attach", spec: "tap:nope:/x" }, /^Unknown disk type "nope"/],
      [{ verb: "attach", spec: "tap:aio:" }, /^Missing path in disk spec/],
      [{ verb: "attach", spec: `${d.dir}/missing.img` }, /^no such file: .*missing\.img$/],
      [{ verb: "attach", spec: "tap:aio:relative.img" }, /is not absolute/],
      [{ verb: "attach", spec: img, nbd: ["ftp:x"] }, /^invalid nbd address "ftp:x"/],
      [{ verb: "attach", spec: img, nbd: "unix:/x" }, /"nbd" must be a list/],
      [{ verb: "attach", spec: img, ring: "tcp:1.2.3.4" }, /^invalid ring address/],
      [
        { verb: "attach", spec: img, nbd: [`unix:${d.dir}/no/such/dir.sock`] },
        /^no such directory/,
      ],
      [{ verb: "attach", spec: `tap:qcow:${img}` }, /^attach tap:qcow:.*a\.img: .*qcow/i],
      [{ verb: "pause", id: 7 }, /^no disk 7 \(see tapd ctl list\)$/],
      [{ verb: "detach", id: -1 }, /^detach: "id" must be a disk number/],
      [{ verb: "stats", id: "0" }, /^stats: "id" must be a disk number/],
      [{ verb: "resume", id: 0, reopen: 5 }, /^resume: "reopen" must be a string/],
      [{ verb: "attach", spec: img, pollMicros: "200" }, /^attach: "pollMicros" must be a number/],
      [{ verb: "attach", spec: img, pollMicros: 1.5 }, /^attach: "pollMicros" must be a whole/],
      [{ verb: "attach", spec: img, pollMicros: -1 }, /^attach: "pollMicros" must be a whole/],
    ];
    for (const [request, pattern] of cases) {
      const reply = await d.request(request);
      assert.equal(reply.ok, false, `${JSON.stringify(request)} was accepted`);
      if (!reply.ok) {
        assert.match(reply.error, pattern, JSON.stringify(request));
        assert.ok(!reply.error.includes("\n"));
      }
    }
    // Nothing was left behind by the refused or failed attaches.
    assert.deepEqual(await d.request({ verb: "list" }), { ok: true, disks: [] });

    // Through tapd ctl: one line, exit 1; a bad command line is exit 2 before any request.
    const missing = await d.ctl("attach", `${d.dir}/missing.img`);
    assert.equal(missing.code, 1);
    assert.equal(missing.stderr, `tapd: ctl: no such file: ${d.dir}/missing.img\n`);
    const unknown = await d.ctl("stats", "3");
    assert.equal(unknown.stderr, "tapd: ctl: no disk 3 (see tapd ctl list)\n");
    const badPoll = await d.ctl("attach", img, "--poll-us", "soon");
    assert.equal(badPoll.code, 2);
    assert.match(badPoll.stderr, /^tapd: Invalid --poll-us "soon": expected a whole number/);
    const pollStats = await d.ctl("stats", "0", "--poll-us", "5");
    assert.equal(pollStats.stderr, "tapd: ctl: stats takes no --poll-us\n");

    // Conflicting exports and resume --reopen on a disk that is not paused.
    const a = await d.attach(img, "--nbd", `unix:${d.dir}/a.sock`);
    const clash = await d.request({ verb: "attach", spec: img, nbd: [`unix:${d.dir}/a.sock`] });
    assert.deepEqual(clash, { ok: false, error: `unix:${d.dir}/a.sock is already used by disk 0` });
    const reopen = await d.ctl("resume", String(a.id), "--reopen", img);
    assert.equal(reopen.code, 1);
    assert.match(reopen.stderr, /^tapd: ctl: resume --reopen: disk 0 is not paused/);
    // And a resume --reopen whose image has another size fails; the disk stays paused.
    await d.ctlOk("pause", "0");
    const small = rawImage(d, "small.img", 1024 * 1024);
    const wrongSize = await d.ctl("resume", "0", "--reopen", small);
    assert.equal(wrongSize.code, 1);
    assert.match(
      wrongSize.stderr,
      /^tapd: ctl: resume disk 0: EINVAL resume: .*small\.img has 1048576 bytes/,
    );
    assert.equal((await d.list())[0].state, "paused");
    assert.equal((await d.stats(0)).paused, true);
    await d.ctlOk("resume", "0");
    assert.equal((await d.list())[0].state, "running");

    // --poll-us reaches the tapdisk's command line, and the disk serves.
    const polled = await d.attach(
      rawImage(d, "p.img"),
      "--nbd",
      `unix:${d.dir}/p.sock`,
      "--poll-us",
      "200",
    );
    const cmdline = Deno.readTextFileSync(`/proc/${polled.pid}/cmdline`).split("\0");
    assert.equal(cmdline[cmdline.indexOf("--poll-us") + 1], "200", cmdline.join(" "));
    const io = await qemuIo(unixUri(polled), "write -P 0x5a 0 64k", "read -P 0x5a 0 64k");
    assert.equal(io.code, 0, io.stdout + io.stderr);
  });
});

Deno.test("daemon: an image file a disk writes is not attached again (nor its qcow parent)", async () => {
  await withDaemon(async (d) => {
    const img = rawImage(d, "a.img");
    const a = await d.attach(img, "--nbd", `unix:${d.dir}/a.sock`);
    // The same file under another name, read-write or read-only: refused, one line.
    const link = `${d.dir}/link.img`;
    Deno.symlinkSync(img, link);
    const cases: [string[], string][] = [
      [[`tap:aio:${link}`], `${link} (the same file as ${img})`],
      [[img, "--read-only"], img],
      [[`${img},ro`], img],
      [[`tap:ram:${img},persist`], img], // writes it back
      [[`tap:ram:${img}`], img], // reads it when it loads
    ];
    for (const [args, name] of cases) {
      const again = await d.ctl("attach", ...args);
      assert.equal(again.code, 1, args.join(" "));
      assert.equal(
        again.stderr,
        `tapd: ctl: ${name} is written by disk ${a.id}: a file that a disk writes cannot be ` +
          `shared (detach disk ${a.id} first, or attach both read-only)\n`,
      );
    }
    // A qcow overlay over it would read a parent that changes under it.
    const overlay = `${d.dir}/o.qcow`;
    const made = await tapd("qcow-create", "64M", overlay, img);
    assert.equal(made.code, 0, made.stderr);
    const over = await d.ctl("attach", `tap:qcow:${overlay}`);
    assert.match(over.stderr, /^tapd: ctl: .*a\.img is written by disk 0: /);
    // Read-only twice is fine; then the overlay (reading the parent) is fine too, and the parent
    // cannot be attached writable while the overlay reads it.
    await d.ctlOk("detach", String(a.id));
    const ro1 = await d.attach(img, "--read-only");
    const ro2 = await d.attach(`${img},ro`);
    const o = await d.attach(`tap:qcow:${overlay}`);
    const rw = await d.ctl("attach", img);
    assert.match(rw.stderr, /^tapd: ctl: .*a\.img is read by disk \d: /);
    // The overlay itself is written by disk o: not twice.
    const o2 = await d.ctl("attach", `tap:qcow:${overlay}`);
    assert.match(o2.stderr, new RegExp(`o\\.qcow is written by disk ${o.id}: `));
    // A failed disk holds nothing: once its tapdisk is gone, its image can be attached.
    assert.ok(o.pid !== null);
    Deno.kill(o.pid, "SIGKILL");
    for (
      let i = 0;
      i < 100 && (await d.list()).find((x) => x.id === o.id)?.state !== "failed";
      i++
    ) {
      await new Promise((r) => setTimeout(r, 50));
    }
    const back = await d.attach(`tap:qcow:${overlay}`);
    assert.equal(back.state, "running");
    assert.deepEqual([ro1.state, ro2.state], ["running", "running"]);
    // A VHD differencing child reads its parent the same way.
    const pv = `${d.dir}/p.vhd`, cv = `${d.dir}/c.vhd`;
    assert.equal((await tapd("create", "-f", "vhd", pv, "64M")).code, 0);
    assert.equal((await tapd("create", "-f", "vhd", "-b", pv, cv)).code, 0);
    const parent = await d.attach(`tap:vhd:${pv}`);
    const child = await d.ctl("attach", `tap:vhd:${cv}`);
    assert.match(
      child.stderr,
      new RegExp(`^tapd: ctl: .*p\\.vhd is written by disk ${parent.id}: `),
    );
    // ram disks of one file share its memory: two of them may write it; an aio disk may not.
    const shm = rawImage(d, "shm.img");
    await d.attach(`tap:ram:${shm},persist`);
    await d.attach(`tap:ram:${shm}`);
    const beside = await d.ctl("attach", shm);
    assert.match(beside.stderr, /^tapd: ctl: .*shm\.img is written by disk \d: /);
    // resume --reopen onto a file another disk writes: refused, the disk stays paused.
    const x = await d.attach(rawImage(d, "x.img"));
    await d.ctlOk("pause", String(x.id));
    const reopen = await d.ctl("resume", String(x.id), "--reopen", `tap:qcow:${overlay}`);
    assert.equal(
      reopen.stderr,
      `tapd: ctl: ${overlay} is written by disk ${back.id}: a file that a disk writes cannot ` +
        `be shared (detach disk ${back.id} first)\n`,
    );
    assert.equal((await d.list()).find((r) => r.id === x.id)?.state, "paused");
    await d.ctlOk("resume", String(x.id));
  });
});

Deno.test("daemon: image locks keep a disk and other programs (QEMU) out of each other's images", async () => {
  await withDaemon(async (d) => {
    const qcow = `${d.dir}/l.qcow`;
    assert.equal((await tapd("create", "-f", "qcow", qcow, "64M")).code, 0);
    const a = await d.attach(`tap:qcow:${qcow}`);
    assert.deepEqual(lockedBytes(qcow), [100, 101, 103, 201, 203]);
    const info = await new Deno.Command("qemu-img", { args: ["info", qcow], stderr: "piped" })
      .output();
    assert.match(new TextDecoder().decode(info.stderr), /Failed to get shared "write" lock/);
    await d.ctlOk("detach", String(a.id));
    assert.deepEqual(lockedBytes(qcow), []);
    // An image qemu-io writes: the attach fails with the tapdisk's one line; nothing is left.
    await using _writer = await qemuIoHolding(qcow);
    const refused = await d.ctl("attach", `tap:qcow:${qcow}`);
    assert.equal(refused.code, 1);
    assert.match(
      refused.stderr,
      /^tapd: ctl: .*Cannot open ".*l\.qcow" for writing: another process writes it .*\n$/,
    );
    assert.equal(refused.stderr.trim().split("\n").length, 1, refused.stderr);
    assert.deepEqual((await d.list()).map((x) => x.id), []);
  });
});
