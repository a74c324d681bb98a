/**
 * Crash safety (crash_harness.ts): a child process writes to a qcow image (flushing every 20
 * writes and saying so on stdout) and is killed with SIGKILL at a random moment. Afterwards the
 * image must open in tapd with every flushed write in it (and each later write either there or
 * not, sector by sector), and QEMU must read the whole of it the same way. Many rounds on the
 * same image.
 */
import { newImageBytes } from "../../../drivers/qcow/header.ts";
import { rng } from "../../util.ts";
import { assertQemuReads, crashTests, SIZE } from "../crash_harness.ts";
import { randomContent, writeFile } from "./helpers.ts";

crashTests({
  driver: "qcow",
  rounds: 16,
  configs: [
    { name: "cluster_bits 9 overlay over a raw parent", clusterBits: 9, backed: true },
    { name: "cluster_bits 12, standalone", clusterBits: 12, backed: false },
  ],
  create(dir, c, ci) {
    const path = `${dir}/img.qcow`;
    let parent: Uint8Array | null = null;
    if (c.backed) parent = writeFile(`${dir}/parent.raw`, randomContent(rng(0xc0 + ci), SIZE));
    writeFile(
      path,
      newImageBytes({
        size: SIZE,
        clusterBits: c.clusterBits,
        l2Bits: c.backed ? 12 : 9,
        backingFile: c.backed ? "parent.raw" : undefined,
      }),
    );
    return Promise.resolve({
      path,
      initial: parent,
      parentFile: c.backed ? `${dir}/parent.raw` : null,
      // QEMU reads the same image: info works, and the whole disk converts to what tapd read.
      afterRound: (round, ref) =>
        assertQemuReads("qcow", dir, path, ref, round, {
          format: "qcow",
          backing: c.backed ? "parent.raw" : undefined,
        }),
    });
  },
});
