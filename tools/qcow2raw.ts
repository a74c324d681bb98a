/**
 * `tapd qcow2raw`: a qcow image (with its backing chain) → a raw file or a block device
 * (blktap's qcow2raw). Into a file only data is written: unallocated and all-zero ranges stay
 * holes. Onto a block device everything is written, zeros included.
 */
import { parseCommandLine } from "../cli/args.ts";
import { type Command, UsageError } from "../cli/command.ts";
import type { Disk } from "../drivers/disk.ts";
import { DRIVERS, openDisk } from "../drivers/mod.ts";
import { lockImageFile } from "../drivers/image_lock.ts";
import { O_RDWR } from "../ffi/constants.ts";
import { FileHandle } from "../ffi/file.ts";
import { sharedPool } from "../io/buffer_pool.ts";
import type { IoEngine } from "../io/engine.ts";
import { createEngine } from "../io/mod.ts";
import { checkDestination, sameFile, writeAtomically } from "./output.ts";
import { Progress } from "./progress.ts";

const CHUNK = 4 * 1024 * 1024;
const DEPTH = 4;
/** Granularity of the zero check: a file system block. */
const BLOCK = 4096;

interface Piece {
  offset: number;
  length: number;
  /** Known to read as zeros (no need to read it). */
  zero: boolean;
}

/** The disk in pieces of at most CHUNK bytes, following its allocation map. */
async function* piecesOf(disk: Disk): AsyncGenerator<Piece> {
  let pos = 0;
  while (pos < disk.size) {
    const extents = await disk.blockStatus(pos, disk.size - pos);
    for (const e of extents) {
      const end = e.offset + e.length;
      for (let off = e.offset; off < end; off += CHUNK) {
        yield { offset: off, length: Math.min(CHUNK, end - off), zero: e.zero };
      }
      pos = end;
    }
  }
}

/** Runs [start, end) (relative to `buf`) of file-system blocks that hold a non-zero byte. */
function dataRuns(buf: Uint8Array, offset: number): [number, number][] {
  // Lengths and offsets are whole sectors, so the words cover every byte.
  const words = new Int32Array(buf.buffer, buf.byteOffset, buf.length >> 2);
  const runs: [number, number][] = [];
  for (let pos = offset, end = offset + buf.length; pos < end;) {
    const next = Math.min(end, (Math.floor(pos / BLOCK) + 1) * BLOCK);
    let w = (pos - offset) >> 2;
    const stop = (next - offset) >> 2;
    while (w < stop && words[w] === 0) w++;
    if (w < stop) {
      const last = runs[runs.length - 1];
      if (last !== undefined && last[1] === pos - offset) last[1] = next - offset;
      else runs.push([pos - offset, next - offset]);
    }
    pos = next;
  }
  return runs;
}

async function writeFully(
  engine: IoEngine,
  file: FileHandle,
  offset: number,
  buf: Uint8Array,
): Promise<void> {
  const n = await engine.write(file, offset, buf);
  if (n !== buf.length) {
    throw new Error(`write ${file.path}: short write (${n} of ${buf.length} bytes at ${offset})`);
  }
}

/**
 * Copies every byte of `disk` into `out` at the same offsets. With `sparse`, ranges that read as
 * zeros are skipped (the destination must read as zeros there already); otherwise they are
 * written.
 */
export async function copyDisk(
  disk: Disk,
  out: FileHandle,
  engine: IoEngine,
  sparse: boolean,
  onProgress?: (done: number) => void,
): Promise<void> {
  const pieces = piecesOf(disk);
  let done = 0;
  let zeros: Uint8Array<ArrayBuffer> | null = null;
  if (!sparse) zeros = sharedPool.take(CHUNK).fill(0);
  let stop = false;
  const worker = async () => {
    const buf = sharedPool.take(CHUNK);
    try {
      while (!stop) {
        const next = await pieces.next();
        if (next.done) return;
        const p = next.value;
        if (p.zero) {
          if (zeros !== null) await writeFully(engine, out, p.offset, zeros.subarray(0, p.length));
        } else {
          const data = buf.subarray(0, p.length);
          await disk.read(p.offset, data);
          if (sparse) {
            for (const [a, b] of dataRuns(data, p.offset)) {
              await writeFully(engine, out, p.offset + a, data.subarray(a, b));
            }
          } else {
            await writeFully(engine, out, p.offset, data);
          }
        }
        done += p.length;
        onProgress?.(done);
      }
    } catch (e) {
      stop = true;
      throw e;
    } finally {
      sharedPool.give(buf);
    }
  };
  try {
    const results = await Promise.allSettled(Array.from({ length: DEPTH }, worker));
    const failed = results.find((r) => r.status === "rejected");
    if (failed !== undefined) throw (failed as PromiseRejectedResult).reason;
  } finally {
    if (zeros !== null) sharedPool.give(zeros);
  }
}

export interface Qcow2RawRequest {
  dest: string;
  source: string;
  force: boolean;
  quiet: boolean;
  /** Read the source even while another process writes it (-U). */
  forceShare?: boolean;
}

/** Opens a qcow image read-only, through the qcow driver. */
export async function openQcow(path: string, forceShare = false): Promise<Disk> {
  if (!DRIVERS.has("qcow")) throw new Error("This tapd has no qcow driver");
  return await openDisk({ type: "qcow", path, readOnly: true, persist: false }, {
    direct: "auto",
    depth: 64,
    forceShare,
  });
}

export async function qcow2raw(r: Qcow2RawRequest): Promise<void> {
  await using disk = await openQcow(r.source, r.forceShare);
  const existing = checkDestination(r.dest, { force: r.force, flag: "--force", allowDevice: true });
  if (sameFile(r.dest, r.source)) throw new Error(`"${r.dest}" is the source image itself`);
  const progress = new Progress("qcow2raw", disk.size, r.quiet);
  const engine = createEngine("sync", { depth: 8 });
  let ok = false;
  try {
    if (existing === "block-device") {
      using dev = FileHandle.open(r.dest, O_RDWR);
      lockImageFile(dev, r.dest, { readOnly: false }); // not a device a VM or a disk uses
      const size = dev.blockDeviceSize();
      if (size < disk.size) {
        throw new Error(
          `Block device "${r.dest}" (${size} bytes) is smaller than the image (${disk.size} bytes)`,
        );
      }
      await copyDisk(disk, dev, engine, false, (d) => progress.update(d));
      await engine.fsync(dev, true);
    } else {
      await writeAtomically(r.dest, r.force, "--force", async (p) => {
        p.file.truncate(disk.size);
        await copyDisk(disk, p.file, engine, true, (d) => progress.update(d));
        await engine.fsync(p.file, true);
      });
    }
    ok = true;
  } finally {
    progress.finish(ok);
    await engine.close();
  }
}

export const qcow2rawCommand: Command = {
  name: "qcow2raw",
  summary: "convert a qcow image (and its backing chain) to a raw file or block device",
  usage: `Usage: tapd qcow2raw [-f] [-q] [-U] <DEST_FILENAME> <QCOW_FILENAME>

Writes the contents of the qcow (version 1) image QCOW_FILENAME, read through its backing chain,
to DEST_FILENAME:
  - a raw file (created under a temporary name and renamed once complete and synced): only data
    is written, so unallocated and all-zero ranges stay holes; its size is the virtual size;
  - an existing block device (a partition, a loop device; needs --force): every byte of the
    virtual size is written, zeros included. The device must be at least that large.

Options:
  -f, --force    replace DEST_FILENAME if it exists, or write onto the block device it names
  -q, --quiet    no progress bar (it is only drawn when stderr is a terminal)
  -U, --force-share
                 read the image (and its backing chain) even while another process writes it:
                 the copy is then only as consistent as that writer leaves it
  -h, --help     this text`,

  async run(args: string[]): Promise<number> {
    const { values, positionals } = parseCommandLine("qcow2raw", args, {
      force: { type: "boolean", short: "f", default: false },
      quiet: { type: "boolean", short: "q", default: false },
      "force-share": { type: "boolean", short: "U", default: false },
    });
    if (positionals.length !== 2) {
      throw new UsageError(
        `qcow2raw: expected <DEST_FILENAME> <QCOW_FILENAME>, got ${positionals.length} argument${
          positionals.length === 1 ? "" : "s"
        }`,
      );
    }
    const [dest, source] = positionals;
    if (dest === "" || source === "") throw new UsageError("qcow2raw: empty file name");
    await qcow2raw({
      dest,
      source,
      force: values.force,
      quiet: values.quiet,
      forceShare: values["force-share"],
    });
    return 0;
  },
};
