/**
 * Crash safety (crash_harness.ts, the qcow crash test's approach): a child process writes to a
 * VHD (flushing every 20 writes and saying so on stdout) and is killed with SIGKILL at a random
 * moment. Afterwards the image must open in tapd with every flushed write in it (and each later
 * write either there or not, sector by sector), `tapd check` must find no error (leaked blocks
 * are allowed), and QEMU must read a dynamic disk the same way. Many rounds on the same image.
 */
import assert from "node:assert/strict";
import { vhdFormat } from "../../../drivers/vhd/format.ts";
import { rng } from "../../util.ts";
import { assertQemuReads, crashTests, SIZE } from "../crash_harness.ts";
import { qemuImg, randomContent, writeFile } from "./helpers.ts";

crashTests({
  driver: "vhd",
  qemuFormat: "vpc",
  rounds: 10,
  configs: [
    { name: "dynamic, 64 KiB blocks", blockSize: 64 * 1024, backed: false },
    { name: "differencing over a dynamic parent, 16 KiB blocks", blockSize: 16384, backed: true },
  ],
  async create(dir, c, ci) {
    const path = `${dir}/img.vhd`;
    let parent: Uint8Array | null = null;
    if (c.backed) {
      parent = writeFile(`${dir}/parent.raw`, randomContent(rng(0xc0 + ci), SIZE));
      await qemuImg([
        "convert",
        "-O",
        "vpc",
        "-o",
        "force_size=on",
        `${dir}/parent.raw`,
        `${dir}/parent.vhd`,
      ]);
    }
    await vhdFormat.create(path, {
      size: SIZE,
      clusterSize: c.blockSize,
      backing: c.backed ? "parent.vhd" : undefined,
    });
    return {
      path,
      initial: parent,
      parentFile: c.backed ? `${dir}/parent.vhd` : null,
      async afterRound(round, ref) {
        const report = await vhdFormat.check(path);
        assert.deepEqual(report.errors, [], `round ${round}: ${JSON.stringify(report)}`);
        // QEMU reads a dynamic disk the same way (it would ignore a differencing disk's parent).
        await assertQemuReads("vpc", dir, path, ref, round, { convert: !c.backed });
      },
    };
  },
});
