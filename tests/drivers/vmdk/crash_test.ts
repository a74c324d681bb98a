/**
 * Crash safety (crash_harness.ts): a child process writes to a monolithicSparse vmdk image
 * (flushing every 20 writes and saying so on stdout) and is killed with SIGKILL at a random
 * moment. Afterwards the image must open in tapd with every flushed write in it (and each later
 * write either there or not, sector by sector), `tapd check` must find no error, and QEMU must
 * read the whole of it the same way. Many rounds on the same image.
 */
import assert from "node:assert/strict";
import { openDisk } from "../../../drivers/mod.ts";
import { vmdkFormat } from "../../../drivers/vmdk/format.ts";
import { rng } from "../../util.ts";
import { assertQemuReads, crashTests, SIZE } from "../crash_harness.ts";
import { randomContent } from "./helpers.ts";

crashTests({
  driver: "vmdk",
  rounds: 8,
  configs: [
    { name: "4 KiB grains, delta child over a vmdk parent", grain: 4096, backed: true },
    { name: "64 KiB grains, standalone", grain: 65536, backed: false },
  ],
  async create(dir, c, ci) {
    const path = `${dir}/img.vmdk`;
    let parent: Uint8Array | null = null;
    if (c.backed) {
      parent = randomContent(rng(0xc0 + ci), SIZE);
      await vmdkFormat.create(`${dir}/parent.vmdk`, { size: SIZE });
      const p = await openDisk(`vmdk:${dir}/parent.vmdk`);
      try {
        await p.write(0, parent);
      } finally {
        await p.close();
      }
    }
    await vmdkFormat.create(path, {
      size: SIZE,
      clusterSize: c.grain,
      backing: c.backed ? "parent.vmdk" : undefined,
    });
    return {
      path,
      initial: parent,
      parentFile: c.backed ? `${dir}/parent.vmdk` : null,
      async afterRound(round, ref) {
        // QEMU reads the same image; tapd check finds no errors.
        await assertQemuReads("vmdk", dir, path, ref, round, {
          format: "vmdk",
          backing: c.backed ? "parent.vmdk" : undefined,
        });
        const report = await vmdkFormat.check(path);
        assert.deepEqual(report.errors, [], `tapd check after round ${round}`);
      },
    };
  },
});
