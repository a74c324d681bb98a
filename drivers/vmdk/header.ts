/**
 * The VMDK hosted sparse extent header (one little-endian sector), stream markers, and the
 * recognisers for the other magics (COWD, seSparse) that tapd refuses by name.
 * Format reference: shared/specs/formats.md §3.2, §3.6, §3.8.
 */
import { ImageError } from "../errors.ts";

export const SECTOR = 512;
/** "KDMV" read as a little-endian u32. */
export const VMDK_MAGIC = 0x564d444b;
/** "COWD" (ESX vmfsSparse) as a little-endian u32. */
export const COWD_MAGIC = 0x44574f43;
export const SESPARSE_MAGIC = 0xcafebabe;
/** gdOffset in a stream's leading header: the real one is in the footer. */
export const GD_AT_END = Number.MAX_SAFE_INTEGER;

export const FLAG_NL_TEST = 1 << 0;
export const FLAG_RGD = 1 << 1;
export const FLAG_ZEROED_GRAIN = 1 << 2;
export const FLAG_COMPRESSED = 1 << 16;
export const FLAG_MARKERS = 1 << 17;

export const MARKER_EOS = 0;
export const MARKER_GT = 1;
export const MARKER_GD = 2;
export const MARKER_FOOTER = 3;

const MAX_GRAIN_SECTORS = 0x200000;
/** GD and GT entries are 32-bit sector numbers. */
export const MAX_SECTOR_ENTRY = 0xffffffff;

export interface SparseHeader {
  version: number;
  flags: number;
  /** Extent size in sectors. */
  capacity: number;
  /** Sectors per grain. */
  grainSectors: number;
  descriptorOffset: number;
  descriptorSize: number;
  gtesPerGt: number;
  rgdOffset: number;
  /** Sector of the grain directory, or GD_AT_END. */
  gdOffset: number;
  overHead: number;
  compressAlgorithm: number;
}

/** Reads a little-endian u64 as a number; values ≥ 2^53 become GD_AT_END (an "infinite" sector). */
function u64(v: DataView, off: number): number {
  const lo = v.getUint32(off, true), hi = v.getUint32(off + 4, true);
  if (hi >= 0x200000) return GD_AT_END;
  return hi * 0x100000000 + lo;
}

function setU64(v: DataView, off: number, value: number): void {
  const big = value === GD_AT_END ? 0xffffffffffffffffn : BigInt(value);
  v.setBigUint64(off, big, true);
}

export function magicOf(head: Uint8Array): number {
  if (head.length < 4) return 0;
  return new DataView(head.buffer, head.byteOffset, 4).getUint32(0, true);
}

/** Whether the bytes start a hosted sparse extent ("KDMV"). */
export function isSparseExtent(head: Uint8Array): boolean {
  return magicOf(head) === VMDK_MAGIC;
}

/** Whether the bytes start an extent format tapd recognises only to refuse it by name. */
export function refusedSubformat(head: Uint8Array): string | null {
  const m = magicOf(head);
  if (m === COWD_MAGIC) return "COWD (vmfsSparse) extents are not supported";
  if (m === SESPARSE_MAGIC) return "seSparse extents are not supported";
  return null;
}

/**
 * Parses and checks a sparse extent header (the first sector of `head`), against `fileSize`.
 * `where` names the extent file in messages.
 */
export function parseSparseHeader(head: Uint8Array, fileSize: number, where: string): SparseHeader {
  const bad = (why: string) => new ImageError(where, why);
  const refused = refusedSubformat(head);
  if (refused !== null) throw bad(refused);
  if (head.length < SECTOR) throw bad(`file too short for a VMDK sparse header (${head.length})`);
  const v = new DataView(head.buffer, head.byteOffset, SECTOR);
  if (v.getUint32(0, true) !== VMDK_MAGIC) throw bad("not a VMDK sparse extent (bad magic)");
  const h: SparseHeader = {
    version: v.getUint32(4, true),
    flags: v.getUint32(8, true),
    capacity: u64(v, 12),
    grainSectors: u64(v, 20),
    descriptorOffset: u64(v, 28),
    descriptorSize: u64(v, 36),
    gtesPerGt: v.getUint32(44, true),
    rgdOffset: u64(v, 48),
    gdOffset: u64(v, 56),
    overHead: u64(v, 64),
    compressAlgorithm: v.getUint16(77, true),
  };
  if (h.version < 1 || h.version > 3) throw bad(`unsupported VMDK version ${h.version}`);
  if (h.gtesPerGt < 1 || h.gtesPerGt > 512) {
    throw bad(`numGTEsPerGT ${h.gtesPerGt} out of range 1..512`);
  }
  if (
    h.grainSectors < 1 || h.grainSectors > MAX_GRAIN_SECTORS ||
    (h.grainSectors & (h.grainSectors - 1)) !== 0
  ) {
    throw bad(
      `grain size ${h.grainSectors} sectors is not a power of two up to ${MAX_GRAIN_SECTORS}`,
    );
  }
  if (h.capacity < 1 || h.capacity >= GD_AT_END / SECTOR) {
    throw bad(`invalid capacity ${v.getBigUint64(12, true)}`);
  }
  if (h.capacity > 2 ** 32 * h.grainSectors) throw bad(`capacity ${h.capacity} too large`);
  const compressed = (h.flags & FLAG_COMPRESSED) !== 0;
  if (compressed && h.compressAlgorithm !== 1) {
    throw bad(`unknown compression algorithm ${h.compressAlgorithm}`);
  }
  if (h.gdOffset !== GD_AT_END || !compressed) {
    if (h.gdOffset === 0 || h.gdOffset === GD_AT_END) {
      throw bad(`grain directory offset ${v.getBigUint64(56, true)} is invalid`);
    }
    const gdBytes = gdSectors(h) * SECTOR;
    if (h.gdOffset * SECTOR + gdBytes > fileSize) {
      throw bad("grain directory beyond the end of the file");
    }
    if ((h.flags & FLAG_RGD) !== 0 && h.rgdOffset !== 0) {
      if (h.rgdOffset === GD_AT_END || h.rgdOffset * SECTOR + gdBytes > fileSize) {
        throw bad("redundant grain directory beyond the end of the file");
      }
    }
  }
  if (h.overHead !== GD_AT_END && h.overHead * SECTOR > fileSize && !compressed) {
    throw bad(`metadata (overHead ${h.overHead} sectors) longer than the file`);
  }
  if (h.descriptorOffset !== 0 && h.descriptorSize > 2048) {
    throw bad(`embedded descriptor of ${h.descriptorSize} sectors is too large`);
  }
  return h;
}

/** Grain tables in the extent (= GD entries). */
export function gtCount(h: SparseHeader): number {
  return Math.ceil(h.capacity / (h.gtesPerGt * h.grainSectors));
}

export function gdSectors(h: SparseHeader): number {
  return Math.ceil((gtCount(h) * 4) / SECTOR);
}

/** Bytes of one grain table (whole sectors). */
export function gtBytes(h: SparseHeader): number {
  return Math.ceil((h.gtesPerGt * 4) / SECTOR) * SECTOR;
}

/** The header sector for `h`. */
export function headerBytes(h: SparseHeader): Uint8Array<ArrayBuffer> {
  const b = new Uint8Array(SECTOR);
  const v = new DataView(b.buffer);
  v.setUint32(0, VMDK_MAGIC, true);
  v.setUint32(4, h.version, true);
  v.setUint32(8, h.flags, true);
  setU64(v, 12, h.capacity);
  setU64(v, 20, h.grainSectors);
  setU64(v, 28, h.descriptorOffset);
  setU64(v, 36, h.descriptorSize);
  v.setUint32(44, h.gtesPerGt, true);
  setU64(v, 48, h.rgdOffset);
  setU64(v, 56, h.gdOffset);
  setU64(v, 64, h.overHead);
  b.set([0x0a, 0x20, 0x0d, 0x0a], 73);
  v.setUint16(77, h.compressAlgorithm, true);
  return b;
}

/** A metadata marker sector (GT, GD, footer, EOS). */
export function markerBytes(type: number, sectors: number): Uint8Array<ArrayBuffer> {
  const b = new Uint8Array(SECTOR);
  const v = new DataView(b.buffer);
  setU64(v, 0, sectors);
  v.setUint32(12, type, true);
  return b;
}

export interface Marker {
  /** Grain marker: guest sector; metadata marker: sectors that follow. */
  value: number;
  /** Grain marker: compressed bytes (> 0); metadata marker: 0. */
  size: number;
  type: number;
}

export function parseMarker(b: Uint8Array): Marker {
  const v = new DataView(b.buffer, b.byteOffset, 16);
  return { value: u64(v, 0), size: v.getUint32(8, true), type: v.getUint32(12, true) };
}
