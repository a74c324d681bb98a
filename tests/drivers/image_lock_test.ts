/**
 * Image locks between processes (drivers/image_lock.ts), against QEMU's own: qemu-img and qemu-io
 * are refused an image a tapd disk writes, tapd is refused an image qemu-io writes, readers share
 * with readers, -U / --force-share reads anyway, and one process may hold an image both ways
 * while a disk is reopened on an overlay of it.
 */
import assert from "node:assert/strict";
import { openDisk } from "../../drivers/mod.ts";
import { ImageLockError } from "../../drivers/image_lock.ts";
import { lockedBytes, qemuIoHolding, withTempDir } from "../util.ts";
import { assertOneLineError, MiB, qemuImg, qemuImgOk, tapd, tapdOk } from "../tools/helpers.ts";

async function refused(promise: Promise<unknown>, pattern: RegExp): Promise<void> {
  await assert.rejects(promise, (e: unknown) => {
    assert.ok(e instanceof ImageLockError, `not an ImageLockError: ${e}`);
    assert.match(e.message, pattern);
    assert.doesNotMatch(e.message, /\n/);
    return true;
  });
}

Deno.test("image locks: a disk tapd writes keeps qemu-img and qemu-io out, as a qemu-nbd would", async () => {
  await withTempDir(async (dir) => {
    const qcow = `${dir}/a.qcow`, raw = `${dir}/b.raw`;
    await qemuImgOk("create", "-q", "-f", "qcow", qcow, "64M");
    await qemuImgOk("create", "-q", "-f", "raw", raw, "64M");
    {
      await using disk = await openDisk(`qcow:${qcow}`);
      // qemu-nbd's bytes for a qcow2 image it writes: uses 100, 101, 103; shares neither 201 nor 203.
      assert.deepEqual(lockedBytes(qcow), [100, 101, 103, 201, 203]);
      const info = await qemuImg("info", qcow);
      assert.notEqual(info.code, 0);
      assert.match(info.stderr, /Failed to get shared "write" lock/);
      await qemuImgOk("info", "-U", qcow);
      const io = await qemuImg("check", qcow);
      assert.match(io.stderr, /Failed to get shared "write" lock/);
      const write = await new Deno.Command("qemu-io", {
        args: ["-c", "write 0 4k", qcow],
        stdout: "piped",
        stderr: "piped",
      }).output();
      assert.match(new TextDecoder().decode(write.stderr), /Failed to get "write" lock/);
      assert.ok(disk.size > 0);

      await using rawDisk = await openDisk(`aio:${raw}`);
      const rawWrite = await qemuImg("convert", "-f", "qcow", "-O", "raw", "-n", qcow, raw);
      assert.notEqual(rawWrite.code, 0);
      assert.ok(rawDisk.size > 0);
    }
    assert.deepEqual(lockedBytes(qcow), [], "closing the disk left locks");
    assert.deepEqual(lockedBytes(raw), []);
    await qemuImgOk("info", qcow);
    await qemuImgOk("convert", "-f", "qcow", "-O", "raw", "-n", qcow, raw);
  });
});

Deno.test("image locks: tapd refuses an image qemu-io writes (as an overlay's backing file too), and readers share with readers", async () => {
  await withTempDir(async (dir) => {
    const qcow = `${dir}/a.qcow`;
    await qemuImgOk("create", "-q", "-f", "qcow", qcow, "64M");
    {
      await using _writer = await qemuIoHolding(qcow);
      await refused(openDisk(`qcow:${qcow}`), /for writing: another process writes it/);
      await refused(openDisk(`qcow:${qcow}`, { readOnly: true }), /another process writes it.*-U/);
      // -U: read anyway, taking only the "consistent read" byte.
      await using shared = await openDisk(`qcow:${qcow}`, { readOnly: true, forceShare: true });
      assert.equal(shared.size, 64 * MiB);
      await assert.rejects(openDisk(`qcow:${qcow}`, { forceShare: true }), /only for reading/);
      // An overlay of it: one line that names each file once.
      const overlay = `${dir}/overlay.qcow`;
      await tapdOk("create", "-f", "qcow", "-b", qcow, overlay);
      await assert.rejects(openDisk(`qcow:${overlay}`), (e: unknown) => {
        const message = (e as Error).message;
        assert.match(
          message,
          /^Cannot open ".*overlay\.qcow": cannot open its backing file ".*a\.qcow": another process writes it \(.*\); stop that first, or read it anyway with --force-share/,
        );
        assert.equal(message.split("Cannot open").length, 2, message);
        return true;
      });
    }
    {
      await using _reader = await qemuIoHolding(qcow, "-r");
      await using reader = await openDisk(`qcow:${qcow}`, { readOnly: true });
      assert.equal(reader.size, 64 * MiB);
      await refused(openDisk(`qcow:${qcow}`), /for writing: another process uses it/);
    }
    // A refused open leaves nothing behind: the image opens for writing once the others are gone.
    await using disk = await openDisk(`qcow:${qcow}`);
    assert.equal(disk.size, 64 * MiB);
  });
});

Deno.test("image locks: one process writes an image and opens an overlay of it (resume --reopen)", async () => {
  await withTempDir(async (dir) => {
    const base = `${dir}/base.qcow`, overlay = `${dir}/overlay.qcow`;
    await qemuImgOk("create", "-q", "-f", "qcow", base, "64M");
    const old = await openDisk(`qcow:${base}`);
    // Made while the base is written (a snapshot of a running disk): create reads its size only.
    await tapdOk("create", "-f", "qcow", "-b", base, overlay);
    const next = await openDisk(`qcow:${overlay}`);
    await old.close();
    // The base is now a backing file: read, shared with readers, written by nobody.
    assert.deepEqual(lockedBytes(base), [100, 201, 203]);
    assert.deepEqual(lockedBytes(overlay), [100, 101, 103, 201, 203]);
    await qemuImgOk("info", base);
    const write = await qemuImg("convert", "-n", "-f", "qcow", "-O", "qcow", overlay, base);
    assert.notEqual(write.code, 0);
    await next.close();
    assert.deepEqual([...lockedBytes(base), ...lockedBytes(overlay)], []);
  });
});

Deno.test("image locks: the commands refuse an image in use with one line, and -U reads it (check, convert, qcow2raw, img2qcow)", async () => {
  await withTempDir(async (dir) => {
    const qcow = `${dir}/a.qcow`;
    await qemuImgOk("create", "-q", "-f", "qcow", qcow, "64M");
    await using _writer = await qemuIoHolding(qcow);
    assertOneLineError(await tapd("check", qcow), 1, /another process writes it/);
    await tapdOk("check", "-U", qcow);
    assertOneLineError(
      await tapd("convert", "-O", "raw", qcow, `${dir}/copy.raw`),
      1,
      /another process writes it/,
    );
    await tapdOk("convert", "-U", "-O", "raw", qcow, `${dir}/copy.raw`);
    // blktap's two converters, with -U as convert's.
    assertOneLineError(
      await tapd("qcow2raw", `${dir}/flat.raw`, qcow),
      1,
      /another process writes it/,
    );
    await tapdOk("qcow2raw", "-U", `${dir}/flat.raw`, qcow);
    const raw = `${dir}/b.raw`;
    await qemuImgOk("create", "-q", "-f", "raw", raw, "16M");
    {
      await using _rawWriter = await qemuIoHolding(raw, "-f", "raw");
      assertOneLineError(
        await tapd("img2qcow", `${dir}/b.qcow`, raw),
        1,
        /another process writes it/,
      );
      await tapdOk("img2qcow", "--force-share", `${dir}/b.qcow`, raw);
    }
    await tapdOk("info", qcow);
    assertOneLineError(
      await tapd("serve", `tap:qcow:${qcow}`, "--nbd", `unix:${dir}/s`),
      1,
      /for writing: another process writes it/,
    );
    assertOneLineError(
      await tapd("serve", `tap:qcow:${qcow}`, "--nbd", `unix:${dir}/s`, "--force-share"),
      2,
      /--force-share is only for a --read-only export/,
    );
  });
});

Deno.test("image locks: raw and ram disks take what they use", async () => {
  await withTempDir(async (dir) => {
    const raw = `${dir}/a.raw`;
    Deno.writeFileSync(raw, new Uint8Array(4 * MiB));
    {
      // A raw file never grows: no "resize" byte, so qemu-nbd -r (which lets nobody resize) fits.
      await using _disk = await openDisk(`aio:${raw}`);
      assert.deepEqual(lockedBytes(raw), [100, 101, 201, 203]);
    }
    {
      // Loaded while nothing writes the file; after that a volatile ram disk holds no lock.
      await using _ram = await openDisk(`ram:${raw}`);
      assert.deepEqual(lockedBytes(raw), []);
    }
    {
      // Written back: a writer sharing writing with the other users of its memory only.
      await using _ram = await openDisk(`ram:${raw},persist`);
      await using _again = await openDisk(`ram:${raw},persist`);
      assert.deepEqual(lockedBytes(raw), [100, 101, 203]);
      const serve = await tapd("serve", `tap:aio:${raw}`, "--nbd", `unix:${dir}/s`);
      assertOneLineError(serve, 1, /for writing: another process writes it/);
    }
    assert.deepEqual(lockedBytes(raw), []);
  });
});

Deno.test("image locks: --force does not replace an image another process uses", async () => {
  await withTempDir(async (dir) => {
    const qcow = `${dir}/a.qcow`;
    await qemuImgOk("create", "-q", "-f", "qcow", qcow, "64M");
    const inode = Deno.statSync(qcow).ino;
    await using _writer = await qemuIoHolding(qcow);
    const cases = [
      ["create", "-f", "qcow", "--force", qcow, "32M"],
      ["convert", "-O", "qcow", "--force", `${dir}/missing-source.raw`, qcow],
      ["qcow2raw", "-f", qcow, qcow],
    ];
    Deno.writeFileSync(`${dir}/src.raw`, new Uint8Array(MiB));
    cases[1][4] = `${dir}/src.raw`;
    for (const args of cases) {
      const r = await tapd(...args);
      assert.notEqual(r.code, 0, args.join(" "));
      assert.equal(r.stderr.trim().split("\n").length, 1, r.stderr);
      assert.equal(Deno.statSync(qcow).ino, inode, `${args.join(" ")} replaced the image`);
    }
    assertOneLineError(
      await tapd("create", "-f", "qcow", "--force", qcow, "32M"),
      1,
      /for writing: another process writes it/,
    );
  });
});

Deno.test("image locks: a VMDK's descriptor file is locked with its extents", async () => {
  await withTempDir(async (dir) => {
    const vmdk = `${dir}/d.vmdk`;
    await tapdOk("create", "-f", "vmdk", "-o", "subformat=twoGbMaxExtentSparse", vmdk, "64M");
    const extent = [...Deno.readDirSync(dir)].map((e) => `${dir}/${e.name}`)
      .find((p) => p !== vmdk)!;
    {
      await using _disk = await openDisk(`vmdk:${vmdk}`);
      assert.deepEqual(lockedBytes(vmdk), [100, 101, 201, 203]);
      assert.deepEqual(lockedBytes(extent), [100, 101, 103, 201, 203]);
      // tapd check locks the descriptor it reads: refused while a disk writes the image.
      assertOneLineError(await tapd("check", vmdk), 1, /another process writes it/);
    }
    assert.deepEqual([...lockedBytes(vmdk), ...lockedBytes(extent)], []);
    await tapdOk("check", vmdk);
  });
});
