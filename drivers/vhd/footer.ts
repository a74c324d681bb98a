/**
 * The VHD hard disk footer (512 bytes, big-endian): parsing, building, its checksum, the CHS
 * geometry algorithm and the virtual size QEMU derives from them. Format reference:
 * shared/specs/formats.md §4.1–§4.4.
 *
 * Virtual size (§4.4, as QEMU's `vpc` driver computes it, so both see the same disk): the
 * geometry's cylinders × heads × sectors-per-track sectors when the creator application is
 * `vpc ` or `qemu` and the geometry is not the 65535/16/255 maximum; `current_size` otherwise.
 * Images tapd creates say creator `qem2` (as `qemu-img create -o force_size=on` does), so every
 * QEMU version and tapd use `current_size`, the exact size asked for.
 */
export const FOOTER_SIZE = 512;
export const COOKIE = "conectix";
export const DISK_FIXED = 2;
export const DISK_DYNAMIC = 3;
export const DISK_DIFFERENCING = 4;
/** Seconds from the Unix epoch to the VHD epoch (2000-01-01 00:00:00 UTC). */
export const VHD_EPOCH = 946684800;
/** QEMU's limit (and the format's): 2040 GiB. */
export const MAX_SECTORS = 0xff000000;
const MAX_CHS = 65535 * 16 * 255;

export interface Geometry {
  cylinders: number;
  heads: number;
  sectorsPerTrack: number;
}

export interface Footer {
  features: number;
  version: number;
  /** Offset of the dynamic header; all ones (as a number: Infinity) for fixed disks. */
  dataOffset: number;
  timestamp: number;
  creatorApp: string;
  creatorVersion: number;
  creatorOs: number;
  originalSize: number;
  currentSize: number;
  geometry: Geometry;
  diskType: number;
  checksum: number;
  uuid: Uint8Array;
  savedState: number;
}

const TWO32 = 0x100000000;

/** A big-endian u64 as a number; Infinity at or above 2^53 (all ones, absurd sizes). */
export function getU64(v: DataView, off: number): number {
  const hi = v.getUint32(off), lo = v.getUint32(off + 4);
  return hi >= 0x200000 ? Infinity : hi * TWO32 + lo;
}

export function setU64(v: DataView, off: number, x: number): void {
  if (x === Infinity) {
    v.setUint32(off, 0xffffffff);
    v.setUint32(off + 4, 0xffffffff);
    return;
  }
  v.setUint32(off, Math.floor(x / TWO32));
  v.setUint32(off + 4, x % TWO32);
}

/** §4.2: one's complement of the byte sum, the checksum field (at `at`) counted as zero. */
export function checksum(bytes: Uint8Array, at: number): number {
  let sum = 0;
  for (let i = 0; i < bytes.length; i++) {
    if (i < at || i >= at + 4) sum += bytes[i];
  }
  return (~sum) >>> 0;
}

export function hasCookie(bytes: Uint8Array, at: number, cookie: string): boolean {
  if (bytes.length < at + cookie.length) return false;
  for (let i = 0; i < cookie.length; i++) {
    if (bytes[at + i] !== cookie.charCodeAt(i)) return false;
  }
  return true;
}

const ascii = (b: Uint8Array) => String.fromCharCode(...b);

/** Decodes a footer (512 bytes; 511 for pre-2004 images, the last reserved byte missing). */
export function parseFooter(bytes: Uint8Array): Footer {
  const b = new Uint8Array(FOOTER_SIZE);
  b.set(bytes.subarray(0, FOOTER_SIZE));
  const v = new DataView(b.buffer);
  return {
    features: v.getUint32(8),
    version: v.getUint32(12),
    dataOffset: getU64(v, 16),
    timestamp: v.getUint32(24),
    creatorApp: ascii(b.subarray(28, 32)),
    creatorVersion: v.getUint32(32),
    creatorOs: v.getUint32(36),
    originalSize: getU64(v, 40),
    currentSize: getU64(v, 48),
    geometry: {
      cylinders: v.getUint16(56),
      heads: v.getUint8(58),
      sectorsPerTrack: v.getUint8(59),
    },
    diskType: v.getUint32(60),
    checksum: v.getUint32(64),
    uuid: b.slice(68, 84),
    savedState: v.getUint8(84),
  };
}

/** Whether `bytes` (a footer) carries the cookie and a right checksum. */
export function footerChecksumOk(bytes: Uint8Array): boolean {
  return new DataView(bytes.buffer, bytes.byteOffset, bytes.length).getUint32(64) ===
    checksum(bytes, 64);
}

/** The 512 bytes of a footer, checksum included. */
export function buildFooter(f: Footer): Uint8Array<ArrayBuffer> {
  const b = new Uint8Array(FOOTER_SIZE);
  const v = new DataView(b.buffer);
  for (let i = 0; i < 8; i++) b[i] = COOKIE.charCodeAt(i);
  v.setUint32(8, f.features);
  v.setUint32(12, f.version);
  setU64(v, 16, f.dataOffset);
  v.setUint32(24, f.timestamp);
  for (let i = 0; i < 4; i++) b[28 + i] = f.creatorApp.charCodeAt(i) & 0xff;
  v.setUint32(32, f.creatorVersion);
  v.setUint32(36, f.creatorOs);
  setU64(v, 40, f.originalSize);
  setU64(v, 48, f.currentSize);
  v.setUint16(56, f.geometry.cylinders);
  v.setUint8(58, f.geometry.heads);
  v.setUint8(59, f.geometry.sectorsPerTrack);
  v.setUint32(60, f.diskType);
  b.set(f.uuid.subarray(0, 16), 68);
  v.setUint8(84, f.savedState);
  v.setUint32(64, checksum(b, 64));
  return b;
}

/** §4.3: the CHS geometry the spec's algorithm gives a size in bytes. */
export function chsGeometry(size: number): Geometry {
  let total = Math.floor(size / 512);
  if (total > MAX_CHS) total = MAX_CHS;
  let spt: number, heads: number, cth: number;
  if (total >= 65535 * 16 * 63) {
    spt = 255;
    heads = 16;
    cth = Math.floor(total / spt);
  } else {
    spt = 17;
    cth = Math.floor(total / spt);
    heads = Math.max(4, Math.ceil(cth / 1024));
    if (cth >= heads * 1024 || heads > 16) {
      spt = 31;
      heads = 16;
      cth = Math.floor(total / spt);
    }
    if (cth >= heads * 1024) {
      spt = 63;
      heads = 16;
      cth = Math.floor(total / spt);
    }
  }
  return { cylinders: Math.floor(cth / heads), heads, sectorsPerTrack: spt };
}

/**
 * §4.4: the virtual size in bytes QEMU gives this footer (a multiple of 512). QEMU before 10.0
 * also used the geometry for creators it did not know (anything but `win `, `qem2`, `d2v `,
 * `CTXS`, `tap\0`); tapd follows the current rule, and writes `qem2`, which both read alike.
 */
export function virtualSize(f: Footer): number {
  const g = f.geometry;
  const chs = g.cylinders * g.heads * g.sectorsPerTrack;
  const byChs = (f.creatorApp === "vpc " || f.creatorApp === "qemu") && chs !== MAX_CHS;
  return byChs ? chs * 512 : Math.floor(f.currentSize / 512) * 512;
}

/** A random (version 4) UUID. */
export function newUuid(): Uint8Array {
  const u = crypto.getRandomValues(new Uint8Array(16));
  u[6] = (u[6] & 0x0f) | 0x40;
  u[8] = (u[8] & 0x3f) | 0x80;
  return u;
}

/** Now, in the VHD epoch. */
export function vhdNow(): number {
  return Math.max(0, Math.floor(Date.now() / 1000) - VHD_EPOCH) >>> 0;
}

export function uuidText(u: Uint8Array): string {
  const h = [...u].map((x) => x.toString(16).padStart(2, "0")).join("");
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

export function sameUuid(a: Uint8Array, b: Uint8Array): boolean {
  return a.length === b.length && a.every((x, i) => x === b[i]);
}
