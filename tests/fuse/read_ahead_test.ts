/**
 * Read-ahead behind a FUSE file: a sequential reader's requests are answered from the gate's
 * windows, their replies written from the windows themselves (writev, no copy), byte for byte;
 * a write between the reads is read back. The export runs in this process, so the file is used
 * only from child processes (dd).
 */
import assert from "node:assert/strict";
import { openDisk } from "../../drivers/mod.ts";
import { FuseDevice } from "../../fuse/device.ts";
import { FuseExport } from "../../fuse/export.ts";
import { DiskGate } from "../../serve/gate.ts";
import { assertBytes, rng, withTempDir } from "../util.ts";
import { cleanupMount, fuseUnavailable, MiB, mountPointFile, run } from "./helpers.ts";

Deno.test({
  name: "FUSE file: sequential direct reads are answered from read-ahead windows, byte for " +
    "byte; a write between them is read back",
  ignore: fuseUnavailable() !== null,
  async fn() {
    await withTempDir(async (dir) => {
      const img = `${dir}/disk.img`, mp = mountPointFile(`${dir}/disk`);
      const image = rng(51).fill(new Uint8Array(32 * MiB));
      Deno.writeFileSync(img, image);
      const patch = rng(52).fill(new Uint8Array(64 * 1024));
      Deno.writeFileSync(`${dir}/patch`, patch);
      const gate = new DiskGate(await openDisk(`tap:aio:${img}`, {}));
      const fuse = new FuseExport(gate, mp);
      // Count the replies written from the windows (the export runs in this process).
      const writeParts = FuseDevice.prototype.writeParts;
      let inPlace = 0;
      FuseDevice.prototype.writeParts = function (parts) {
        const sent = writeParts.call(this, parts);
        if (sent !== null) inPlace++;
        return sent;
      };
      try {
        await fuse.mount();
        const readBack = async (skipMiB: number, count: number) => {
          const r = await run("dd", [
            `if=${mp}`,
            `of=${dir}/back`,
            "bs=1M",
            `skip=${skipMiB}`,
            `count=${count}`,
            "iflag=direct",
            "status=none",
          ]);
          assert.equal(r.code, 0, r.stderr);
          const from = skipMiB * MiB;
          assertBytes(
            Deno.readFileSync(`${dir}/back`),
            image.subarray(from, from + count * MiB),
            `${count} MiB read at ${skipMiB} MiB`,
          );
        };
        await readBack(0, 8);
        // Inside the windows read ahead of the reader by now.
        const w = await run("dd", [
          `if=${dir}/patch`,
          `of=${mp}`,
          "bs=64k",
          `seek=${12 * 16 + 3}`,
          "conv=notrunc",
          "oflag=direct",
          "status=none",
        ]);
        assert.equal(w.code, 0, w.stderr);
        image.set(patch, 12 * MiB + 3 * 64 * 1024);
        await readBack(8, 24);
        const s = gate.stats();
        assert.ok(s.readAhead!.hits >= 16, JSON.stringify(s.readAhead));
        assert.ok(inPlace >= 16, `${inPlace} replies written from the windows`);
        assert.ok(s.ops.read.bytes >= 32 * MiB, JSON.stringify(s.ops.read));
        assert.equal(s.ops.read.errors, 0);
        await fuse.close();
      } finally {
        FuseDevice.prototype.writeParts = writeParts;
        await cleanupMount(mp);
        await gate.close();
      }
    });
  },
});
