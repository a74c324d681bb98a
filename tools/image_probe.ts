/**
 * What an image file is, without opening it as a disk: its format (qcow by magic, else raw), its
 * virtual size, its qcow header, and the backing chain named in the headers.
 */
import { openDisk, probeFormat } from "../drivers/mod.ts";
import { parseHeader, QCOW_MAGIC, type QcowHeader } from "../drivers/qcow/header.ts";
import { FileHandle } from "../ffi/file.ts";
import { O_RDONLY } from "../ffi/constants.ts";
import type { IoEngine } from "../io/engine.ts";
import { createEngine } from "../io/mod.ts";

/** "qcow", "raw", or another driver's type (vmdk, vhd) as probeFormat names it. */
export type ImageFormat = string;

export interface ImageProbe {
  path: string;
  format: ImageFormat;
  /** The size a reader sees (QEMU's rounding: qcow down, raw up to whole sectors). */
  virtualSize: number;
  /** Bytes in the file, or of the block device. */
  fileSize: number;
  /** Bytes allocated on disk (st_blocks × 512; 0 for devices). */
  allocated: number;
  blockDevice: boolean;
  header: QcowHeader | null;
  /** The backing file name as stored in the image, or null. */
  backing: string | null;
}

const HEAD_BYTES = 4096;

/** Reads up to `length` bytes at `offset` (fewer only at end of file). */
async function readAt(
  engine: IoEngine,
  file: FileHandle,
  offset: number,
  length: number,
): Promise<Uint8Array> {
  const buf = new Uint8Array(length);
  const got = length === 0 ? 0 : await engine.read(file, offset, buf);
  return buf.subarray(0, got);
}

/** Probes the image at `path`; throws for a file that is neither raw nor a valid qcow v1 image. */
export async function probeImage(path: string): Promise<ImageProbe> {
  using file = FileHandle.open(path, O_RDONLY);
  const engine = createEngine("sync");
  try {
    const st = file.stat();
    if (!st.isRegular && !st.isBlockDevice) {
      throw new Error(`"${path}" is neither a regular file nor a block device`);
    }
    const fileSize = st.isBlockDevice ? file.blockDeviceSize() : st.size;
    const head = await readAt(engine, file, 0, Math.min(HEAD_BYTES, fileSize));
    const magic = head.length >= 4 ? new DataView(head.buffer).getUint32(0) : 0;
    const probe: ImageProbe = {
      path,
      format: "raw",
      virtualSize: Math.ceil(fileSize / 512) * 512,
      fileSize,
      allocated: st.allocated,
      blockDevice: st.isBlockDevice,
      header: null,
      backing: null,
    };
    if (magic !== QCOW_MAGIC) {
      const format = await probeFormat(path);
      if (format === "raw") return probe;
      // Another format: its driver reads the headers (and checks them).
      // Headers only, as qemu-img info -U: an image in use is described, not refused.
      const disk = await openDisk(`${format}:${path}`, {
        readOnly: true,
        forceShare: true,
        direct: "auto",
      });
      try {
        probe.format = format;
        probe.virtualSize = disk.size;
        probe.backing = disk.info.backing;
      } finally {
        await disk.close();
      }
      return probe;
    }
    const header = parseHeader(head, fileSize, path); // throws for qcow2 and broken headers
    probe.format = "qcow";
    probe.virtualSize = Math.floor(header.size / 512) * 512;
    probe.header = header;
    if (header.backingOffset !== 0) {
      const name = await readAt(engine, file, header.backingOffset, header.backingLength);
      probe.backing = new TextDecoder().decode(name);
    }
    return probe;
  } finally {
    await engine.close();
  }
}

/**
 * Where a backing file name points, as QEMU combines it: an absolute name as it is, a relative
 * one against the directory of the image that names it.
 */
export function resolveBacking(imagePath: string, name: string): string {
  if (name.startsWith("/")) return name;
  const slash = imagePath.lastIndexOf("/");
  return slash < 0 ? name : imagePath.slice(0, slash + 1) + name;
}

/** One layer below an image: what it resolved to, or why it could not be probed. */
export type ChainLayer =
  | { filename: string; probe: ImageProbe; error?: undefined }
  | { filename: string; probe?: undefined; error: string };

const MAX_CHAIN = 64;

/** The layers below `top`, nearest first; stops at the first layer that cannot be probed. */
export async function backingChain(top: ImageProbe): Promise<ChainLayer[]> {
  const layers: ChainLayer[] = [];
  const seen = new Set<string>([realPath(top.path)]);
  let current = top;
  while (current.backing !== null) {
    const filename = resolveBacking(current.path, current.backing);
    if (layers.length >= MAX_CHAIN) {
      layers.push({ filename, error: `backing chain longer than ${MAX_CHAIN} layers` });
      break;
    }
    let probe: ImageProbe;
    try {
      if (seen.has(realPath(filename))) throw new Error("the backing chain loops back to itself");
      probe = await probeImage(filename);
    } catch (e) {
      layers.push({ filename, error: (e as Error).message });
      break;
    }
    seen.add(realPath(filename));
    layers.push({ filename, probe });
    current = probe;
  }
  return layers;
}

function realPath(path: string): string {
  try {
    return Deno.realPathSync(path);
  } catch {
    return path;
  }
}
