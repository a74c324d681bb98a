/**
 * `tapd qcow-create`: a new, empty qcow (v1) image, laid out exactly as `qemu-img create -f qcow`
 * lays it out, standalone or copy-on-write over a backing file (blktap's qcow-create, extended).
 */
import { parseCommandLine, parseSize } from "../cli/args.ts";
import { type Command, UsageError } from "../cli/command.ts";
import { newImageBytes } from "../drivers/qcow/header.ts";
import { FALLOC_FL_KEEP_SIZE } from "../ffi/constants.ts";
import { SysError } from "../ffi/errno.ts";
import { createEngine } from "../io/mod.ts";
import { type ImageFormat, probeImage, resolveBacking } from "./image_probe.ts";
import { checkDestination, writeAtomically } from "./output.ts";
import {
  checkVirtualSize,
  fullImageBytes,
  type Geometry,
  geometryFor,
  parseClusterSize,
} from "./qcow_layout.ts";

const MIB = 1024 * 1024;

/** SIZE: a plain number is MiB (blktap's unit); otherwise a size such as 512k or 10G. 0 → null. */
export function parseImageSize(text: string): number | null {
  if (/^\d+$/.test(text)) {
    const bytes = Number(text) * MIB;
    if (!Number.isSafeInteger(bytes)) {
      throw new UsageError(`Invalid size "${text}": too large`);
    }
    return bytes === 0 ? null : bytes;
  }
  return parseSize(text, "size");
}

export interface CreateRequest {
  path: string;
  /** Bytes; null takes the backing file's size. */
  size: number | null;
  backing: string | null;
  clusterBits?: number;
  reserve: boolean;
  force: boolean;
}

export interface Created {
  size: number;
  geometry: Geometry;
  backingFormat: ImageFormat | null;
}

/** Creates the image (through a temporary file that becomes `path` once complete). */
export async function createQcow(r: CreateRequest): Promise<Created> {
  let size = r.size, backingFormat: ImageFormat | null = null;
  if (r.backing !== null) {
    if (r.backing === "") throw new UsageError("qcow-create: empty backing file name");
    const name = new TextEncoder().encode(r.backing);
    if (name.length > 1023) {
      throw new UsageError(`qcow-create: backing file name longer than 1023 bytes`);
    }
    const probe = await probeBacking(resolveBacking(r.path, r.backing));
    backingFormat = probe.format;
    size ??= probe.virtualSize;
  }
  if (size === null) throw new UsageError("qcow-create: the size must not be zero");
  const geometry = geometryFor(r.clusterBits, r.backing !== null);
  checkVirtualSize(size, geometry);
  checkDestination(r.path, { force: r.force, flag: "--force", allowDevice: false });
  const bytes = newImageBytes({ size, ...geometry, backingFile: r.backing ?? undefined });
  const engine = createEngine("sync");
  try {
    await writeAtomically(r.path, r.force, "--force", async (p) => {
      const n = await engine.write(p.file, 0, bytes);
      if (n !== bytes.length) throw new Error(`write ${p.path}: short write`);
      if (r.reserve) {
        const total = fullImageBytes(bytes.length, size, geometry);
        try {
          await p.file.fallocate(FALLOC_FL_KEEP_SIZE, 0, total);
        } catch (e) {
          if (e instanceof SysError && e.code === "EOPNOTSUPP") {
            throw new Error(
              `Cannot reserve space for "${r.path}": its file system has no fallocate`,
            );
          }
          throw e;
        }
      }
      await engine.fsync(p.file, true);
    });
  } finally {
    await engine.close();
  }
  return { size: Math.ceil(size / 512) * 512, geometry, backingFormat };
}

async function probeBacking(path: string): Promise<{ format: ImageFormat; virtualSize: number }> {
  try {
    return await probeImage(path);
  } catch (e) {
    throw new Error(`Cannot use backing file "${path}": ${(e as Error).message}`, { cause: e });
  }
}

export const qcowCreateCommand: Command = {
  name: "qcow-create",
  summary: "create an empty qcow image, sparse or over a backing file (qemu-img create -f qcow)",
  usage: `Usage: tapd qcow-create [-h] [-r] [-f qcow] [--cluster-size SIZE] [--force]
                         <SIZE> <FILENAME> [<BACKING_FILENAME>]

Creates FILENAME, an empty qcow (version 1) image laid out as \`qemu-img create -f qcow\` lays it
out: header, backing file name, zeroed L1 table; nothing else is allocated.

SIZE is the virtual size: a plain number is in MiB (as blktap's qcow-create took it), or give a
unit: 512k, 100M, 10G, 1T. Sizes are rounded up to a multiple of 512 bytes.

With BACKING_FILENAME the image is a copy-on-write overlay: unwritten clusters read from the
backing file. The name is stored as given; a relative name is resolved against FILENAME's
directory (by tapd and QEMU alike). The backing file must exist; its format is probed (qcow
magic: qcow, otherwise raw). A SIZE of 0 takes the backing file's virtual size (blktap always
did); any other SIZE is used as given.

Options:
  -r, --reserve         reserve the disk space the image can ever need (every cluster, every L2
                        table) with fallocate, so writes to it never fail for lack of space. The
                        image stays sparse in content: qcow cannot describe preallocated clusters
                        (blktap's -r filled the file with zeros instead).
  -f, --format qcow     the image format (qcow is the only one; accepted for blktap's usage)
  --cluster-size SIZE   512 to 64k, a power of two (default: 4k, or 512 with a backing file, as
                        QEMU). Over a backing file QEMU copies partial writes correctly only with
                        512-byte clusters; tapd copies on write with any size.
  --force               replace FILENAME if it exists
  -h, --help            this text`,

  async run(args: string[]): Promise<number> {
    const { values, positionals } = parseCommandLine("qcow-create", args, {
      reserve: { type: "boolean", short: "r", default: false },
      format: { type: "string", short: "f" },
      "cluster-size": { type: "string" },
      force: { type: "boolean", default: false },
    });
    if (values.format !== undefined && values.format !== "qcow") {
      throw new UsageError(
        `qcow-create: Invalid format "${values.format}": only qcow is supported`,
      );
    }
    if (positionals.length < 2 || positionals.length > 3) {
      throw new UsageError(
        `qcow-create: expected <SIZE> <FILENAME> [<BACKING_FILENAME>], got ${positionals.length} ` +
          `argument${positionals.length === 1 ? "" : "s"}`,
      );
    }
    const [sizeText, path, backing] = positionals;
    if (path === "") throw new UsageError("qcow-create: empty file name");
    await createQcow({
      path,
      size: parseImageSize(sizeText),
      backing: backing ?? null,
      clusterBits: values["cluster-size"] === undefined
        ? undefined
        : parseClusterSize(values["cluster-size"]),
      reserve: values.reserve,
      force: values.force,
    });
    return 0;
  },
};
