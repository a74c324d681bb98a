/**
 * The qcow (version 1) header: parsing with every check QEMU makes (and a few it does not), the
 * Xen blktap extended header, and the layout of a new image as `qemu-img create -f qcow` writes
 * it. Format reference: shared/specs/formats.md §1.
 */
import { ImageError } from "../errors.ts";

export const QCOW_MAGIC = 0x514649fb;
export const XEN_MAGIC = 0x58454efb;
export const HEADER_SIZE = 48;
const XEN_FLAG_L1_BIG_ENDIAN = 2;
const MAX_BACKING_NAME = 1023;
const MAX_L1_ENTRIES = 2 ** 28;

export interface XenHeader {
  checksum: number;
  minClusterAlloc: number;
  flags: number;
}

export interface QcowHeader {
  /** Virtual size in bytes, as stored. */
  size: number;
  clusterBits: number;
  l2Bits: number;
  cryptMethod: number;
  l1Offset: number;
  /** Entries in the L1 table (derived from size; never stored). */
  l1Size: number;
  backingOffset: number;
  backingLength: number;
  mtime: number;
  xen: XenHeader | null;
}

function u64(v: DataView, off: number): number {
  const hi = v.getUint32(off), lo = v.getUint32(off + 4);
  if (hi >= 0x200000) return Infinity; // ≥ 2^53: no real file or disk is this large
  return hi * 0x100000000 + lo;
}

/** Whether the first bytes of a file are a qcow v1 header. */
export function isQcow(head: Uint8Array): boolean {
  if (head.length < 8) return false;
  const v = new DataView(head.buffer, head.byteOffset, 8);
  return v.getUint32(0) === QCOW_MAGIC && v.getUint32(4) === 1;
}

/**
 * Parses and checks the header in `head` (the file's first bytes, at least 64 of them when the
 * file is that long). `fileSize` bounds every offset. Throws ImageError saying what is wrong.
 */
export function parseHeader(head: Uint8Array, fileSize: number, path: string): QcowHeader {
  const bad = (why: string) => new ImageError(path, why);
  if (head.length < HEADER_SIZE) {
    throw bad(`file too short for a qcow header (${head.length} bytes)`);
  }
  const v = new DataView(head.buffer, head.byteOffset, head.length);
  if (v.getUint32(0) !== QCOW_MAGIC) throw bad("not a qcow image (bad magic)");
  const version = v.getUint32(4);
  if (version === 2 || version === 3) {
    throw bad(`qcow2 image (version ${version}), not qcow version 1`);
  }
  if (version !== 1) throw bad(`unsupported qcow version ${version}`);
  const backingOffset = u64(v, 8), backingLength = v.getUint32(16), mtime = v.getUint32(20);
  const size = u64(v, 24), clusterBits = v.getUint8(32), l2Bits = v.getUint8(33);
  const cryptMethod = v.getUint32(36), l1Offset = u64(v, 40);
  if (!Number.isFinite(size) || size < 512) throw bad(`invalid virtual size ${v.getBigUint64(24)}`);
  if (clusterBits < 9 || clusterBits > 16) {
    throw bad(`cluster_bits ${clusterBits} out of range 9..16`);
  }
  if (l2Bits < 6 || l2Bits > 13) throw bad(`l2_bits ${l2Bits} out of range 6..13`);
  if (cryptMethod === 1) throw bad("encrypted qcow images (AES, crypt_method 1) are not supported");
  if (cryptMethod !== 0) throw bad(`unknown crypt_method ${cryptMethod}`);
  const l1Size = Math.ceil(size / 2 ** (clusterBits + l2Bits));
  if (l1Size > MAX_L1_ENTRIES) throw bad(`virtual size ${size} needs too large an L1 table`);
  if (l1Offset < HEADER_SIZE) throw bad(`L1 table offset ${l1Offset} overlaps the header`);
  if (!Number.isFinite(l1Offset) || l1Offset + l1Size * 8 > fileSize) {
    throw bad(
      `L1 table (${l1Size} entries at offset ${
        v.getBigUint64(40)
      }) lies beyond the end of the file`,
    );
  }
  if (backingOffset !== 0) {
    if (backingLength === 0 || backingLength > MAX_BACKING_NAME) {
      throw bad(`backing file name length ${backingLength} out of range 1..${MAX_BACKING_NAME}`);
    }
    if (backingOffset < HEADER_SIZE) {
      throw bad(`backing file name offset ${backingOffset} overlaps the header`);
    }
    if (!Number.isFinite(backingOffset) || backingOffset + backingLength > fileSize) {
      throw bad("backing file name lies beyond the end of the file");
    }
  }
  let xen: XenHeader | null = null;
  if (head.length >= 64 && backingOffset !== HEADER_SIZE && v.getUint32(48) === XEN_MAGIC) {
    xen = { checksum: v.getUint32(52), minClusterAlloc: v.getUint32(56), flags: v.getUint32(60) };
    if (
      backingOffset === 0 && (xen.flags & XEN_FLAG_L1_BIG_ENDIAN) === 0 && l1Offset % 4096 === 0
    ) {
      throw bad(
        "Xen blktap image with a little-endian L1 table (written by tapdisk before 2008); " +
          "open it once with an old blktap to convert it",
      );
    }
  }
  return {
    size,
    clusterBits,
    l2Bits,
    cryptMethod,
    l1Offset,
    l1Size,
    backingOffset,
    backingLength,
    mtime,
    xen,
  };
}

export interface NewImage {
  size: number;
  clusterBits?: number;
  l2Bits?: number;
  backingFile?: string;
}

/** QEMU's defaults: 4 KiB clusters and 4 KiB L2 tables, or 512-byte clusters over a backing file. */
export function defaultGeometry(hasBacking: boolean): { clusterBits: number; l2Bits: number } {
  return hasBacking ? { clusterBits: 9, l2Bits: 12 } : { clusterBits: 12, l2Bits: 9 };
}

/**
 * The bytes of a new, empty image, laid out as `qemu-img create -f qcow`: header, backing name
 * at 48, zeroed L1 table at the next 8-byte boundary, padded to a whole sector.
 */
export function newImageBytes(image: NewImage): Uint8Array {
  const geometry = defaultGeometry(image.backingFile !== undefined);
  const clusterBits = image.clusterBits ?? geometry.clusterBits;
  // With a chosen cluster size: one cluster of L2 entries, but at least 2 MiB per L1 entry (as
  // in QEMU's two geometries), so that small clusters do not make a huge L1 table.
  const l2Bits = image.l2Bits ??
    (image.clusterBits === undefined
      ? geometry.l2Bits
      : Math.min(13, Math.max(6, clusterBits - 3, 21 - clusterBits)));
  const size = Math.ceil(image.size / 512) * 512;
  const name = new TextEncoder().encode(image.backingFile ?? "");
  if (name.length > MAX_BACKING_NAME) {
    throw new RangeError("Backing file name longer than 1023 bytes");
  }
  const headerSize = Math.ceil((HEADER_SIZE + name.length) / 8) * 8;
  const l1Size = Math.ceil(size / 2 ** (clusterBits + l2Bits));
  const bytes = new Uint8Array(headerSize + Math.ceil((8 * l1Size) / 512) * 512);
  const v = new DataView(bytes.buffer);
  v.setUint32(0, QCOW_MAGIC);
  v.setUint32(4, 1);
  if (name.length > 0) {
    v.setBigUint64(8, BigInt(HEADER_SIZE));
    v.setUint32(16, name.length);
    bytes.set(name, HEADER_SIZE);
  }
  v.setBigUint64(24, BigInt(size));
  v.setUint8(32, clusterBits);
  v.setUint8(33, l2Bits);
  v.setBigUint64(40, BigInt(headerSize));
  return bytes;
}
