/**
 * The layout of a new hosted sparse extent as `qemu-img create -f vmdk` makes it (formats.md
 * §3.10): header, descriptor area at sectors 1–20, redundant GD and GTs, primary GD and GTs, all
 * GTs preallocated and empty, metadata padded to a whole grain.
 */
import {
  FLAG_COMPRESSED,
  FLAG_MARKERS,
  FLAG_NL_TEST,
  FLAG_RGD,
  FLAG_ZEROED_GRAIN,
  gdSectors,
  gtCount,
  headerBytes,
  SECTOR,
  type SparseHeader,
} from "./header.ts";

export const DESCRIPTOR_SECTORS = 20;
export const GTES_PER_GT = 512;
export const DEFAULT_GRAIN_SECTORS = 128;

export interface NewExtent {
  capacity: number;
  grainSectors: number;
  zeroedGrain?: boolean;
  /** QEMU's streamOptimized: version 3, compressed, markers, GD at the front. */
  compressed?: boolean;
}

/** A piece of the new file: bytes at an offset (the rest of the file is zeros). */
export interface Chunk {
  offset: number;
  bytes: Uint8Array;
}

export interface ExtentLayout {
  header: SparseHeader;
  /** Bytes of the file (its metadata; grains come after). */
  fileSize: number;
  chunks: Chunk[];
}

/** The header and metadata of a new, empty sparse extent; `descriptor` goes at sector 1. */
export function sparseLayout(x: NewExtent, descriptor: string | null): ExtentLayout {
  let flags = FLAG_NL_TEST | FLAG_RGD, version = 1;
  if (x.zeroedGrain) {
    flags |= FLAG_ZEROED_GRAIN;
    version = 2;
  }
  if (x.compressed) {
    flags |= FLAG_COMPRESSED | FLAG_MARKERS;
    version = 3;
  }
  const h: SparseHeader = {
    version,
    flags,
    capacity: x.capacity,
    grainSectors: x.grainSectors,
    descriptorOffset: 1,
    descriptorSize: DESCRIPTOR_SECTORS,
    gtesPerGt: GTES_PER_GT,
    rgdOffset: 1 + DESCRIPTOR_SECTORS,
    gdOffset: 0,
    overHead: 0,
    compressAlgorithm: x.compressed ? 1 : 0,
  };
  const n = gtCount(h), gdSec = gdSectors(h), gtSec = (GTES_PER_GT * 4) / SECTOR;
  h.gdOffset = h.rgdOffset + gdSec + gtSec * n;
  const metaEnd = h.gdOffset + gdSec + gtSec * n;
  h.overHead = Math.ceil(metaEnd / x.grainSectors) * x.grainSectors;
  const gd = (at: number, first: number) => {
    const bytes = new Uint8Array(gdSec * SECTOR);
    const v = new DataView(bytes.buffer);
    for (let i = 0; i < n; i++) v.setUint32(i * 4, first + gdSec + gtSec * i, true);
    return { offset: at * SECTOR, bytes };
  };
  const chunks: Chunk[] = [
    { offset: 0, bytes: headerBytes(h) },
    gd(h.rgdOffset, h.rgdOffset),
    gd(h.gdOffset, h.gdOffset),
  ];
  if (descriptor !== null) {
    const text = new TextEncoder().encode(descriptor);
    if (text.length >= DESCRIPTOR_SECTORS * SECTOR) {
      throw new RangeError(`descriptor of ${text.length} bytes does not fit in its 10 KiB area`);
    }
    chunks.push({ offset: SECTOR, bytes: text });
  }
  return { header: h, fileSize: h.overHead * SECTOR, chunks };
}
