/**
 * `tapd convert -O vmdk -o subformat=streamOptimized`: a stream written front to back (what
 * VMware and OVA/OVF tools import, formats.md §3.6): header with the GD at the end, embedded
 * descriptor, then for each grain table's span its non-zero grains (marker + zlib stream, padded
 * to a sector), a GT marker and the GT; then the GD marker and GD, the footer marker and footer
 * header, and the end-of-stream marker. Zero ranges of the source are skipped unread.
 */
import { basename } from "node:path";
import { deflateSync } from "node:zlib";
import { sharedPool } from "../../io/buffer_pool.ts";
import type { BlockTarget } from "../target.ts";
import { descriptorText, NO_PARENT, randomCid } from "./descriptor.ts";
import {
  FLAG_COMPRESSED,
  FLAG_MARKERS,
  FLAG_NL_TEST,
  GD_AT_END,
  gdSectors,
  gtCount,
  headerBytes,
  MARKER_EOS,
  MARKER_FOOTER,
  MARKER_GD,
  MARKER_GT,
  markerBytes,
  SECTOR,
  type SparseHeader,
} from "./header.ts";
import { DEFAULT_GRAIN_SECTORS, DESCRIPTOR_SECTORS, GTES_PER_GT } from "./layout.ts";

export interface StreamOptions {
  onProgress?(done: number, total: number): void;
  /** Descriptor details (defaults as qemu-img: ide, hwversion 4). */
  adapterType?: string;
  hwVersion?: string;
  /** The name in the descriptor's extent line (default: the base name of `dest`). */
  fileName?: string;
}

/** Sequential writer with a sector-granular position. */
class Out {
  #file: Deno.FsFile;
  pos = 0;

  constructor(file: Deno.FsFile) {
    this.#file = file;
  }

  async put(bytes: Uint8Array): Promise<void> {
    let done = 0;
    while (done < bytes.length) done += await this.#file.write(bytes.subarray(done));
    this.pos += bytes.length;
  }

  /** Writes `bytes` and zeros up to the next sector boundary. */
  async putPadded(bytes: Uint8Array): Promise<void> {
    await this.put(bytes);
    const pad = (SECTOR - (this.pos % SECTOR)) % SECTOR;
    if (pad > 0) await this.put(new Uint8Array(pad));
  }

  get sector(): number {
    return this.pos / SECTOR;
  }
}

function isZero(b: Uint8Array): boolean {
  const words = new BigUint64Array(b.buffer, b.byteOffset, b.length >> 3);
  for (let i = 0; i < words.length; i++) if (words[i] !== 0n) return false;
  for (let i = words.length << 3; i < b.length; i++) if (b[i] !== 0) return false;
  return true;
}

/** The grains in [from, to) of `src` that may hold data, from its block status. */
async function dataGrains(
  src: BlockTarget,
  from: number,
  to: number,
  grain: number,
): Promise<number[]> {
  const out: number[] = [];
  for (let pos = from; pos < to;) {
    const extents = await src.blockStatus(pos, to - pos);
    for (const e of extents) {
      if (!e.zero) {
        const last = Math.floor((e.offset + e.length - 1) / grain);
        const next = out.length === 0 ? 0 : out[out.length - 1] + 1;
        for (let i = Math.max(Math.floor(e.offset / grain), next); i <= last; i++) out.push(i);
      }
      pos = e.offset + e.length;
    }
  }
  return out;
}

/** Writes `src` as a streamOptimized VMDK at `dest` (created or truncated). */
export async function writeStreamOptimized(
  dest: string,
  src: BlockTarget,
  options: StreamOptions = {},
): Promise<void> {
  const grainSectors = DEFAULT_GRAIN_SECTORS, grain = grainSectors * SECTOR;
  const capacity = Math.ceil(src.size / SECTOR);
  const h: SparseHeader = {
    version: 3,
    flags: FLAG_NL_TEST | FLAG_COMPRESSED | FLAG_MARKERS,
    capacity,
    grainSectors,
    descriptorOffset: 1,
    descriptorSize: DESCRIPTOR_SECTORS,
    gtesPerGt: GTES_PER_GT,
    rgdOffset: 0,
    gdOffset: GD_AT_END,
    overHead: grainSectors,
    compressAlgorithm: 1,
  };
  const n = gtCount(h), gdSec = gdSectors(h), gtSec = (GTES_PER_GT * 4) / SECTOR;
  const grains = Math.ceil(capacity / grainSectors);
  const text = descriptorText({
    cid: randomCid(8),
    parentCid: NO_PARENT,
    createType: "streamOptimized",
    extents: [{ sectors: capacity, type: "SPARSE", file: options.fileName ?? basename(dest) }],
    hwVersion: options.hwVersion ?? "4",
    adapterType: options.adapterType ?? "ide",
    toolsVersion: "2147483647",
    size: capacity * SECTOR,
  });
  const gd = new Uint8Array(gdSec * SECTOR), gdView = new DataView(gd.buffer);
  using file = await Deno.open(dest, { write: true, create: true, truncate: true });
  const out = new Out(file);
  const head = new Uint8Array(grainSectors * SECTOR);
  head.set(headerBytes(h));
  head.set(new TextEncoder().encode(text), SECTOR);
  await out.put(head);
  const buf = sharedPool.take(grain);
  const marker = new Uint8Array(12), mv = new DataView(marker.buffer);
  try {
    for (let t = 0; t < n; t++) {
      const gt = new Uint8Array(gtSec * SECTOR), gtView = new DataView(gt.buffer);
      let any = false;
      const spanEnd = Math.min(src.size, (t + 1) * GTES_PER_GT * grain);
      const spanStart = t * GTES_PER_GT * grain;
      const wanted = spanStart < spanEnd ? await dataGrains(src, spanStart, spanEnd, grain) : [];
      for (const i of wanted) {
        if (i >= grains) break;
        const off = i * grain, len = Math.min(grain, capacity * SECTOR - off);
        const view = buf.subarray(0, grain);
        view.fill(0);
        const inSrc = Math.max(0, Math.min(len, src.size - off));
        if (inSrc > 0) await src.read(off, view.subarray(0, Math.ceil(inSrc / SECTOR) * SECTOR));
        if (!isZero(view)) {
          const z = deflateSync(view);
          mv.setBigUint64(0, BigInt(i * grainSectors), true);
          mv.setUint32(8, z.length, true);
          gtView.setUint32((i % GTES_PER_GT) * 4, out.sector, true);
          await out.put(marker);
          await out.putPadded(z);
          any = true;
        }
        options.onProgress?.(Math.min(src.size, off + grain), src.size);
      }
      if (any) {
        await out.put(markerBytes(MARKER_GT, gtSec));
        gdView.setUint32(t * 4, out.sector, true);
        await out.put(gt);
      }
    }
    await out.put(markerBytes(MARKER_GD, gdSec));
    const footer: SparseHeader = { ...h, gdOffset: out.sector };
    await out.put(gd);
    await out.put(markerBytes(MARKER_FOOTER, 1));
    await out.put(headerBytes(footer));
    await out.put(markerBytes(MARKER_EOS, 0));
    await file.syncData();
    options.onProgress?.(src.size, src.size);
  } finally {
    sharedPool.give(buf);
  }
}
