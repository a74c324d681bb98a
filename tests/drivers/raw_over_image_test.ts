import assert from "node:assert/strict";
import { rawOverImage } from "../../drivers/mod.ts";
import { createQcow } from "../../tools/qcow_create.ts";
import { Serve } from "../nbd/helpers.ts";
import { withTempDir } from "../util.ts";
import { withDaemon } from "../daemon/helpers.ts";

const MiB = 1024 * 1024;

async function qcowAndRaw(dir: string): Promise<{ qcow: string; raw: string }> {
  const qcow = `${dir}/disk.qcow`, raw = `${dir}/disk.raw`;
  await createQcow({ path: qcow, size: 16 * MiB, backing: null, reserve: false, force: false });
  Deno.writeFileSync(raw, new Uint8Array(MiB));
  return { qcow, raw };
}

Deno.test("rawOverImage: a writable raw spec over a qcow image is named, with the right spec", async () => {
  await withTempDir(async (dir) => {
    const { qcow, raw } = await qcowAndRaw(dir);
    const message = await rawOverImage(`tap:aio:${qcow}`);
    assert.ok(message !== null);
    assert.match(message, /holds a qcow image, served as raw by tap:aio/);
    assert.ok(message.includes(`tap:qcow:${qcow}`), message);
    assert.match((await rawOverImage(`tap:sync:${qcow}`))!, /tap:sync/);
    // Nothing to say: the image's own driver, read-only, a raw file, a missing file.
    assert.equal(await rawOverImage(`tap:qcow:${qcow}`), null);
    assert.equal(await rawOverImage(`tap:aio:${qcow},ro`), null);
    assert.equal(await rawOverImage(`tap:aio:${qcow}`, { readOnly: true }), null);
    assert.equal(await rawOverImage(`tap:aio:${raw}`), null);
    assert.equal(await rawOverImage(`tap:aio:${dir}/missing`), null);
  });
});

Deno.test("tapd serve tap:aio over a qcow image warns, and serves it as asked", async () => {
  await withTempDir(async (dir) => {
    const { qcow } = await qcowAndRaw(dir);
    const before = Deno.readFileSync(qcow);
    const s = await Serve.start(`tap:aio:${qcow}`, { unix: `${dir}/nbd.sock`, logLevel: "warn" });
    const { code, stderr } = await s.stop();
    assert.equal(code, 0, stderr);
    assert.match(stderr, /level=warn .*holds a qcow image, served as raw by tap:aio/);
    assert.deepEqual(Deno.readFileSync(qcow), before); // warned, not touched
  });
});

Deno.test("tapd ctl attach tap:aio over a qcow image prints the warning; tap:qcow does not", async () => {
  await withDaemon(async (d) => {
    const { qcow } = await qcowAndRaw(d.dir);
    const raw = await d.ctlOk("attach", `tap:aio:${qcow}`);
    assert.match(raw.stderr, /^tapd ctl: warning: .*holds a qcow image, served as raw by tap:aio/m);
    assert.match(raw.stdout, /^disk 0: running/m);
    await d.ctlOk("detach", "0");
    const right = await d.ctlOk("attach", `tap:qcow:${qcow}`);
    assert.equal(right.stderr, "");
    await d.ctlOk("detach", "0");
    const ro = await d.ctlOk("attach", `tap:aio:${qcow}`, "--read-only");
    assert.equal(ro.stderr, "");
  });
});

Deno.test("tapd ctl resume --reopen onto a raw spec over a qcow image prints the warning", async () => {
  await withDaemon(async (d) => {
    const { qcow, raw } = await qcowAndRaw(d.dir);
    // A raw file of the qcow file's size, so that the reopened disk keeps the size.
    Deno.writeFileSync(raw, new Uint8Array(Deno.statSync(qcow).size));
    await d.ctlOk("attach", `tap:aio:${raw}`);
    await d.ctlOk("pause", "0");
    const resumed = await d.ctlOk("resume", "0", "--reopen", `tap:aio:${qcow}`);
    assert.match(resumed.stderr, /^tapd ctl: warning: .*holds a qcow image, served as raw/m);
    await d.ctlOk("pause", "0");
    const back = await d.ctlOk("resume", "0", "--reopen", `tap:aio:${raw}`);
    assert.equal(back.stderr, "");
  });
});
