/**
 * The VHD dynamic disk header (1024 bytes at the footer's data offset) and its parent locators:
 * parsing, building, and the derived block geometry. Reference: shared/specs/formats.md §4.5,
 * §4.6, §4.9.
 */
import { checksum, getU64, hasCookie, setU64 } from "./footer.ts";

export const HEADER_SIZE = 1024;
export const HEADER_COOKIE = "cxsparse";
export const SECTOR = 512;
/** A BAT entry of an unallocated block. */
export const UNALLOCATED = 0xffffffff;

export const PLATFORM_W2RU = 0x57327275; // relative Windows path, UTF-16LE
export const PLATFORM_W2KU = 0x57326b75; // absolute Windows path, UTF-16LE
export const PLATFORM_MACX = 0x4d616358; // file:// URL, UTF-8

export interface Locator {
  code: number;
  /** Bytes reserved for the data (values below 512 in the file are sectors, §4.5). */
  space: number;
  length: number;
  offset: number;
}

export interface DynamicHeader {
  tableOffset: number;
  version: number;
  maxTableEntries: number;
  blockSize: number;
  checksum: number;
  checksumOk: boolean;
  cookieOk: boolean;
  parentUuid: Uint8Array;
  parentTimestamp: number;
  /** The parent's file name from the header (UTF-16BE), "" when none. */
  parentName: string;
  locators: Locator[];
}

/** Bytes of a block's sector bitmap, padded to whole sectors. */
export function bitmapBytes(blockSize: number): number {
  return Math.ceil(blockSize / SECTOR / 8 / SECTOR) * SECTOR;
}

function utf16(bytes: Uint8Array, littleEndian: boolean): string {
  const v = new DataView(bytes.buffer, bytes.byteOffset, bytes.length);
  let s = "";
  for (let i = 0; i + 1 < bytes.length; i += 2) {
    const c = v.getUint16(i, littleEndian);
    if (c === 0) break;
    s += String.fromCharCode(c);
  }
  return s;
}

export function encodeUtf16(s: string, littleEndian: boolean): Uint8Array {
  const out = new Uint8Array(s.length * 2);
  const v = new DataView(out.buffer);
  for (let i = 0; i < s.length; i++) v.setUint16(2 * i, s.charCodeAt(i), littleEndian);
  return out;
}

export function parseHeader(bytes: Uint8Array): DynamicHeader {
  const v = new DataView(bytes.buffer, bytes.byteOffset, HEADER_SIZE);
  const locators: Locator[] = [];
  for (let i = 0; i < 8; i++) {
    const at = 576 + 24 * i;
    const code = v.getUint32(at);
    if (code === 0) continue;
    const rawSpace = v.getUint32(at + 4);
    locators.push({
      code,
      space: rawSpace < SECTOR ? rawSpace * SECTOR : rawSpace,
      length: v.getUint32(at + 8),
      offset: getU64(v, at + 16),
    });
  }
  const sum = v.getUint32(36);
  return {
    tableOffset: getU64(v, 16),
    version: v.getUint32(24),
    maxTableEntries: v.getUint32(28),
    blockSize: v.getUint32(32),
    checksum: sum,
    checksumOk: sum === checksum(bytes.subarray(0, HEADER_SIZE), 36),
    cookieOk: hasCookie(bytes, 0, HEADER_COOKIE),
    parentUuid: bytes.slice(40, 56),
    parentTimestamp: v.getUint32(56),
    parentName: utf16(bytes.subarray(64, 576), false),
    locators,
  };
}

export interface NewHeader {
  tableOffset: number;
  maxTableEntries: number;
  blockSize: number;
  parentUuid?: Uint8Array;
  parentTimestamp?: number;
  parentName?: string;
  locators?: Locator[];
}

/** The 1024 bytes of a dynamic header, checksum included. */
export function buildHeader(h: NewHeader): Uint8Array<ArrayBuffer> {
  const b = new Uint8Array(HEADER_SIZE);
  const v = new DataView(b.buffer);
  for (let i = 0; i < 8; i++) b[i] = HEADER_COOKIE.charCodeAt(i);
  setU64(v, 8, Infinity);
  setU64(v, 16, h.tableOffset);
  v.setUint32(24, 0x00010000);
  v.setUint32(28, h.maxTableEntries);
  v.setUint32(32, h.blockSize);
  if (h.parentUuid) b.set(h.parentUuid.subarray(0, 16), 40);
  v.setUint32(56, h.parentTimestamp ?? 0);
  if (h.parentName) b.set(encodeUtf16(h.parentName, false).subarray(0, 512), 64);
  (h.locators ?? []).slice(0, 8).forEach((l, i) => {
    const at = 576 + 24 * i;
    v.setUint32(at, l.code);
    v.setUint32(at + 4, l.space);
    v.setUint32(at + 8, l.length);
    setU64(v, at + 16, l.offset);
  });
  v.setUint32(36, checksum(b, 36));
  return b;
}

/**
 * The path a locator's data names (§4.9): UTF-8 after `file://` for MacX, UTF-16LE with `\`
 * turned into `/` for W2ku/W2ru; null for other platforms.
 */
export function decodeLocator(code: number, data: Uint8Array): string | null {
  let s: string;
  if (code === PLATFORM_MACX) {
    s = new TextDecoder().decode(data).replace(/\0.*$/s, "");
    if (s.startsWith("file://")) s = s.slice(7);
    try {
      s = decodeURI(s);
    } catch {
      // not percent-encoded
    }
  } else if (code === PLATFORM_W2KU || code === PLATFORM_W2RU) {
    s = utf16(data, true).replaceAll("\\", "/");
  } else return null;
  return s === "" ? null : s;
}
