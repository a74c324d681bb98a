/**
 * `tapd img2qcow`: a raw image file, partition or other block device → a sparse standalone qcow
 * image (blktap's img2qcow; the peer is `qemu-img convert -O qcow`). All-zero clusters are not
 * stored. The work is done by the streaming writer in qcow_writer.ts.
 */
import { parseCommandLine } from "../cli/args.ts";
import { type Command, UsageError } from "../cli/command.ts";
import { createEngine } from "../io/mod.ts";
import { checkDestination, sameFile, writeAtomically } from "./output.ts";
import { Progress } from "./progress.ts";
import { checkVirtualSize, geometryFor, parseClusterSize } from "./qcow_layout.ts";
import { openRawSource, writeQcow, type WriterResult } from "./qcow_writer.ts";

export interface Img2QcowRequest {
  dest: string;
  source: string;
  clusterBits?: number;
  force: boolean;
  quiet: boolean;
  /** Read the source even while another process writes it (-U). */
  forceShare?: boolean;
}

const READ_DEPTH = 4;

export async function img2qcow(r: Img2QcowRequest): Promise<WriterResult> {
  const src = openRawSource(r.source, READ_DEPTH, r.forceShare);
  try {
    if (src.size === 0) throw new Error(`"${r.source}" is empty: a qcow image cannot be`);
    const geometry = geometryFor(r.clusterBits, false);
    checkVirtualSize(src.size, geometry);
    checkDestination(r.dest, { force: r.force, flag: "--force", allowDevice: false });
    if (sameFile(r.dest, r.source)) {
      throw new Error(`"${r.dest}" is the source image itself`);
    }
    const progress = new Progress("img2qcow", src.size, r.quiet);
    const outEngine = createEngine("sync", { depth: 8 });
    let result: WriterResult | undefined;
    try {
      await writeAtomically(r.dest, r.force, "--force", async (p) => {
        result = await writeQcow(src, p.file, outEngine, {
          geometry,
          onProgress: (done) => progress.update(done),
        });
      });
    } finally {
      progress.finish(result !== undefined);
      await outEngine.close();
    }
    return result!;
  } finally {
    await src.close();
  }
}

export const img2qcowCommand: Command = {
  name: "img2qcow",
  summary: "convert a raw image or block device to a sparse qcow image",
  usage: `Usage: tapd img2qcow [-f] [-q] [-U] [--cluster-size SIZE] <QCOW_FILENAME> <SRC_IMAGE>

Writes QCOW_FILENAME, a standalone qcow (version 1) image with the contents of SRC_IMAGE, a raw
image file or a block device (a partition, a loop device). Clusters that are all zeros are not
stored, and holes in a sparse source file are not even read. The image's virtual size is the
source's size rounded up to a multiple of 512 bytes (the last cluster is zero-padded).

The source is read with O_DIRECT where the file system allows it. The image is written under a
temporary name next to QCOW_FILENAME and renamed once complete and synced, so a failure leaves
nothing behind.

Options:
  -f, --force           replace QCOW_FILENAME if it exists
  -q, --quiet           no progress bar (it is only drawn when stderr is a terminal)
  -U, --force-share     read SRC_IMAGE even while another process (a VM, qemu-nbd, a tapd disk)
                        writes it: the copy is then only as consistent as that writer leaves it
  --cluster-size SIZE   512 to 64k, a power of two (default 4k, as qemu-img)
  -h, --help            this text`,

  async run(args: string[]): Promise<number> {
    const { values, positionals } = parseCommandLine("img2qcow", args, {
      force: { type: "boolean", short: "f", default: false },
      quiet: { type: "boolean", short: "q", default: false },
      "force-share": { type: "boolean", short: "U", default: false },
      "cluster-size": { type: "string" },
    });
    if (positionals.length !== 2) {
      throw new UsageError(
        `img2qcow: expected <QCOW_FILENAME> <SRC_IMAGE>, got ${positionals.length} argument${
          positionals.length === 1 ? "" : "s"
        }`,
      );
    }
    const [dest, source] = positionals;
    if (dest === "" || source === "") throw new UsageError("img2qcow: empty file name");
    await img2qcow({
      dest,
      source,
      clusterBits: values["cluster-size"] === undefined
        ? undefined
        : parseClusterSize(values["cluster-size"]),
      force: values.force,
      quiet: values.quiet,
      forceShare: values["force-share"],
    });
    return 0;
  },
};
