/**
 * The snapshot flow: pause (requests held, nothing in flight, flushed), make a qcow overlay over
 * the image, resume on the overlay. No write is lost: one issued while paused completes after
 * the resume, on the overlay; the base image keeps exactly the data from before the pause.
 */
import assert from "node:assert/strict";
import { MiB, qemuIo, tapd, unixUri, withDaemon } from "./helpers.ts";

async function qemuIoFile(format: string, path: string, ...commands: string[]): Promise<void> {
  const { code, stdout, stderr } = await new Deno.Command("qemu-io", {
    args: ["-r", "-f", format, ...commands.flatMap((c) => ["-c", c]), path],
    stdout: "piped",
    stderr: "piped",
  }).output();
  const out = new TextDecoder().decode(stdout) + new TextDecoder().decode(stderr);
  assert.equal(code, 0, out);
  assert.doesNotMatch(out, /error|failed|Pattern verification/i, out);
}

Deno.test("daemon: pause, qcow overlay, resume --reopen: no write lost, base untouched", async () => {
  await withDaemon(async (d) => {
    const base = `${d.dir}/base.qcow`, overlay = `${d.dir}/overlay.qcow`;
    assert.equal((await tapd("qcow-create", "16M", base)).code, 0);
    const disk = await d.attach(`tap:qcow:${base}`);
    const uri = unixUri(disk);
    await qemuIo(uri, `write -P 0x11 0 ${MiB}`);

    const paused = JSON.parse((await d.ctlOk("pause", "0", "--json")).stdout);
    assert.equal(paused.state, "paused");
    // A write issued while paused is held: it must not complete until the resume.
    const attached = () => d.stderr.split('msg="client attached"').length;
    const clientsBefore = attached();
    const held = new Deno.Command("qemu-io", {
      args: ["-f", "raw", "-c", `write -P 0x22 ${MiB} ${MiB}`, uri],
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    let done = false;
    const finished = held.output().then((r) => {
      done = true;
      return r;
    });
    // Once the client is connected (the handshake is not held), give its write time to arrive.
    for (let i = 0; i < 100 && attached() === clientsBefore; i++) {
      await new Promise((r) => setTimeout(r, 50));
    }
    assert.ok(attached() > clientsBefore, `qemu-io did not connect: ${d.stderr}`);
    await new Promise((r) => setTimeout(r, 700));
    assert.equal(done, false, "a write completed while the disk was paused");
    const stats = await d.stats(0);
    assert.equal(stats.paused, true);
    assert.equal(stats.inFlight, 0);

    // The overlay (size 0: the backing file's), then resume on it.
    const created = await tapd("qcow-create", "0", overlay, base);
    assert.equal(created.code, 0, created.stderr);
    const resumed = JSON.parse(
      (await d.ctlOk("resume", "0", "--reopen", `tap:qcow:${overlay}`, "--json")).stdout,
    );
    assert.equal(resumed.state, "running");
    assert.equal(resumed.spec, `tap:qcow:${overlay}`);
    const r = await finished;
    const out = new TextDecoder().decode(r.stdout) + new TextDecoder().decode(r.stderr);
    assert.equal(r.code, 0, out);
    assert.match(out, /wrote 1048576\/1048576 bytes/);

    await qemuIo(uri, `write -P 0x33 ${2 * MiB} ${MiB}`);
    await qemuIo(
      uri,
      `read -P 0x11 0 ${MiB}`,
      `read -P 0x22 ${MiB} ${MiB}`,
      `read -P 0x33 ${2 * MiB} ${MiB}`,
      `read -P 0 ${3 * MiB} ${MiB}`,
    );
    const list = await d.list();
    assert.equal(list[0].spec, `tap:qcow:${overlay}`);
    await d.ctlOk("detach", "0");

    // On disk: the base holds only what was written before the pause; the overlay has the rest
    // and reads the base through its backing file.
    await qemuIoFile("qcow", base, `read -P 0x11 0 ${MiB}`, `read -P 0 ${MiB} ${3 * MiB}`);
    await qemuIoFile(
      "qcow",
      overlay,
      `read -P 0x11 0 ${MiB}`,
      `read -P 0x22 ${MiB} ${MiB}`,
      `read -P 0x33 ${2 * MiB} ${MiB}`,
    );
  });
});
