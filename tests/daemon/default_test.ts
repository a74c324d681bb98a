/**
 * `tapd daemon` with no arguments serves the embedded default disk: a sparse 10 GiB qcow image
 * created once in the state directory, over NBD, and tells a newcomer how to connect.
 * (The test asks for any free port instead of 10809.)
 */
import assert from "node:assert/strict";
import { qemuIo, TestDaemon } from "./helpers.ts";
import { tempDir } from "../util.ts";

async function run(cmd: string, ...args: string[]): Promise<string> {
  const r = await new Deno.Command(cmd, { args, stdout: "piped", stderr: "piped" }).output();
  const dec = new TextDecoder();
  assert.equal(r.code, 0, `${cmd} ${args.join(" ")}: ${dec.decode(r.stderr)}`);
  return dec.decode(r.stdout);
}

Deno.test("daemon: the default disk is a 10 GiB qcow served over NBD, created once", async () => {
  const dir = tempDir("tapd-daemon-");
  let d = await TestDaemon.start(dir, ["--nbd-port", "0"]);
  try {
    const m = /\n {2}nbdinfo (nbd:\/\/127\.0\.0\.1:(\d+))\n/.exec(d.stdout);
    assert.ok(m, d.stdout);
    const uri = m[1];
    assert.notEqual(m[2], "0");
    assert.match(
      d.stdout,
      /^tapd daemon: serving the default disk, a 10 GiB qcow image \(.*\/state\/default\.qcow\)\n/,
    );
    assert.match(d.stdout, new RegExp(`\\n  qemu-img info ${uri}\\n`));
    assert.match(d.stdout, /\n {2}nbd\+unix:\/\/\/\?socket=.*\/state\/nbd\/default\.sock\n/);
    assert.match(d.stdout, new RegExp(`ctl --control ${d.control} list\\n`));

    assert.equal((await run("nbdinfo", "--size", uri)).trim(), String(10 * 1024 ** 3));
    assert.match(await run("qemu-img", "info", uri), /virtual size: 10 GiB/);
    const image = `${d.stateDir}/default.qcow`;
    assert.match(await run("qemu-img", "info", "-U", image), /file format: qcow\n/);
    assert.ok((Deno.statSync(image).blocks ?? 0) * 512 < 1024 * 1024, "the image is not sparse");
    const [disk] = await d.list();
    assert.equal(disk.id, 0);
    assert.equal(disk.spec, `tap:qcow:${image}`);
    await qemuIo(uri, "write -P 0x42 1G 64k");
    const inode = Deno.statSync(image).ino;

    assert.equal((await d.stop()).code, 0, d.stderr);
    d = await TestDaemon.start(dir, ["--nbd-port", "0"]);
    assert.equal(Deno.statSync(image).ino, inode, "the default image was created again");
    const again = /\n {2}nbdinfo (nbd:\/\/127\.0\.0\.1:\d+)\n/.exec(d.stdout)![1];
    await qemuIo(again, "read -P 0x42 1G 64k");
  } finally {
    await d.dispose();
  }
});
