/**
 * `tapd convert`: any supported image format to any other, like `qemu-img convert`. Sparse-aware:
 * the source's holes are never read, all-zero stretches of its data are not written (so they
 * stay holes in raw and unallocated in image formats), and many requests are in flight at once.
 * The destination is built under a temporary name and renamed into place when complete.
 */
import { parseCommandLine, parseSize } from "../cli/args.ts";
import { type Command, UsageError } from "../cli/command.ts";
import type { Disk } from "../drivers/disk.ts";
import type { CreateOptions } from "../drivers/image_format.ts";
import { openDisk } from "../drivers/mod.ts";
import { writeStreamOptimized } from "../drivers/vmdk/stream.ts";
import { sharedPool } from "../io/buffer_pool.ts";
import {
  driverType,
  formatNamed,
  IMAGE_FORMATS,
  imageFormat,
  parseCreateOptions,
} from "./formats.ts";
import { checkDestination, PartialFile, sameFile } from "./output.ts";
import { Progress } from "./progress.ts";

/** Bytes per copy request. */
const CHUNK = 1024 * 1024;
/** Copy requests in flight. */
const IN_FLIGHT = 16;
/** Zero detection granularity inside data: all-zero pieces this big are not written. */
const ZERO_GRAIN = 64 * 1024;
/** Source map window per blockStatus call. */
const MAP_WINDOW = 256 * 1024 * 1024;

/** Whether `buf` is all zeros (eight bytes at a time). */
export function isZero(buf: Uint8Array): boolean {
  if (buf.byteOffset % 8 === 0 && buf.length % 8 === 0) {
    const words = new BigUint64Array(buf.buffer, buf.byteOffset, buf.length / 8);
    for (let i = 0; i < words.length; i++) if (words[i] !== 0n) return false;
    return true;
  }
  for (let i = 0; i < buf.length; i++) if (buf[i] !== 0) return false;
  return true;
}

/** Ranges of the source that may hold non-zero data, in order, cut into CHUNK pieces. */
async function* dataChunks(src: Disk): AsyncGenerator<{ offset: number; length: number }> {
  for (let window = 0; window < src.size; window += MAP_WINDOW) {
    const end = Math.min(window + MAP_WINDOW, src.size);
    for (let pos = window; pos < end;) {
      const extents = await src.blockStatus(pos, end - pos);
      for (const e of extents) {
        if (e.zero) continue;
        for (let off = e.offset; off < e.offset + e.length; off += CHUNK) {
          yield { offset: off, length: Math.min(CHUNK, e.offset + e.length - off) };
        }
      }
      const last = extents[extents.length - 1];
      pos = last.offset + last.length;
    }
  }
}

/** Copies every non-zero byte of `src` into `dest` (which reads as zeros to begin with). */
export async function copyData(
  src: Disk,
  dest: Disk,
  onProgress: (done: number) => void = () => {},
): Promise<void> {
  const chunks = dataChunks(src);
  let done = 0;
  const worker = async () => {
    const buf = sharedPool.take(CHUNK);
    try {
      for (;;) {
        const next = await chunks.next();
        if (next.done) return;
        const { offset, length } = next.value;
        const data = buf.subarray(0, length);
        await src.read(offset, data);
        // Write the non-zero runs only, in ZERO_GRAIN pieces.
        let runStart = -1;
        const writes: Promise<void>[] = [];
        for (let at = 0; at <= length; at += ZERO_GRAIN) {
          const piece = data.subarray(at, Math.min(at + ZERO_GRAIN, length));
          const zero = at === length || isZero(piece);
          if (!zero && runStart < 0) runStart = at;
          if (zero && runStart >= 0) {
            writes.push(dest.write(offset + runStart, data.subarray(runStart, at)));
            runStart = -1;
          }
        }
        if (runStart >= 0) writes.push(dest.write(offset + runStart, data.subarray(runStart)));
        await Promise.all(writes);
        done = Math.max(done, offset + length);
        onProgress(done);
      }
    } finally {
      sharedPool.give(buf);
    }
  };
  // Several workers share one generator: each next() hands out the following chunk.
  await Promise.all(Array.from({ length: IN_FLIGHT }, worker));
}

/** Opens the new image at `path` and copies `src` into it. */
async function copyInto(src: Disk, path: string, type: string, progress: Progress): Promise<void> {
  const dest = await openDisk(`${driverType(type)}:${path}`, { direct: "auto" });
  try {
    await copyData(src, dest, (done) => progress.update(done));
    await dest.flush();
  } finally {
    await dest.close();
  }
}

/**
 * Runs `build`, which creates `dest` (and maybe files beside it) in place; on failure removes
 * every file it created in that directory.
 */
async function buildInPlace(dest: string, force: boolean, build: () => Promise<void>) {
  const slash = dest.lastIndexOf("/");
  const dir = slash < 0 ? "." : dest.slice(0, slash) || "/";
  const before = new Set([...Deno.readDirSync(dir)].map((e) => e.name));
  if (force) {
    try {
      Deno.removeSync(dest);
      before.delete(dest.slice(slash + 1));
    } catch { /* not there */ }
  }
  try {
    await build();
  } catch (e) {
    for (const entry of Deno.readDirSync(dir)) {
      if (!before.has(entry.name)) {
        try {
          Deno.removeSync(`${dir}/${entry.name}`);
        } catch { /* gone */ }
      }
    }
    throw e;
  }
}

export const convertCommand: Command = {
  name: "convert",
  summary: "convert an image between raw, qcow, vmdk and vhd (like qemu-img convert)",
  usage: `Usage: tapd convert [-f FMT] -O FMT [-o OPTIONS] [-p] [-q] [-U] [--force] SRC DEST

Copies the image SRC (format probed, or given with -f) into a new image DEST of format -O
(${[...IMAGE_FORMATS.keys()].join(", ")}; vpc is vhd). OPTIONS are as for tapd create
(subformat=…, cluster_size=…, …). Only data is copied: holes in SRC and all-zero stretches of
64 KiB are left unallocated in DEST (holes in a raw DEST). A backing chain of SRC is read
through, so DEST is standalone.

SRC is refused while another process writes it (a VM, qemu-nbd, a tapd disk: QEMU's image
locks); -U (--force-share) reads it anyway, like qemu-img convert -U, and the copy is then only
as consistent as the image was while it was read. -p draws a progress bar on a terminal; -q
prints nothing. DEST is written under a temporary
name and renamed when complete; an existing DEST is refused unless --force.`,

  async run(args: string[]): Promise<number> {
    const { values, positionals } = parseCommandLine("convert", args, {
      f: { type: "string", short: "f" },
      O: { type: "string", short: "O" },
      o: { type: "string", short: "o", multiple: true },
      p: { type: "boolean", short: "p", default: false },
      q: { type: "boolean", short: "q", default: false },
      "force-share": { type: "boolean", short: "U", default: false },
      force: { type: "boolean", default: false },
    });
    if (values.O === undefined) throw new UsageError("convert: -O FMT is required");
    if (positionals.length !== 2) throw new UsageError("convert: expected SRC and DEST");
    const [srcPath, destPath] = positionals;
    const format = formatNamed(values.O, "-O");
    const options = parseCreateOptions(values.o ?? [], parseSize);
    if (sameFile(srcPath, destPath)) {
      throw new UsageError(`convert: SRC and DEST are the same file ("${destPath}")`);
    }
    const srcFormat = await imageFormat(srcPath, values.f);
    const src = await openDisk(`${driverType(srcFormat)}:${srcPath}`, {
      readOnly: true,
      forceShare: values["force-share"],
      direct: "auto",
    });
    try {
      checkDestination(destPath, { force: values.force, flag: "--force", allowDevice: false });
      const create: CreateOptions = { size: src.size, ...options };
      const progress = new Progress("convert", src.size, values.q || !values.p);
      if (format.type === "vmdk" && create.subformat !== "streamOptimized") {
        // A VMDK descriptor names its extent files after the image: build it in place.
        let built = false;
        try {
          await buildInPlace(destPath, values.force, async () => {
            await format.create(destPath, create);
            await copyInto(src, destPath, format.type, progress);
          });
          built = true;
        } finally {
          progress.finish(built);
        }
        return 0;
      }
      const partial = PartialFile.create(destPath);
      let ok = false;
      try {
        // The format creates its own file: give it the reserved temporary name.
        Deno.removeSync(partial.path);
        if (format.type === "vmdk") {
          // A stream is written in one sequential pass, compressed, never as a disk.
          await writeStreamOptimized(partial.path, src, {
            fileName: destPath.slice(destPath.lastIndexOf("/") + 1),
            adapterType: create.extra?.adapter_type,
            onProgress: (done) => progress.update(done),
          });
        } else {
          await format.create(partial.path, create);
          await copyInto(src, partial.path, format.type, progress);
        }
        ok = true;
        partial.commit(values.force, "--force");
      } finally {
        progress.finish(ok);
        partial.abort();
      }
    } finally {
      await src.close();
    }
    return 0;
  },
};
