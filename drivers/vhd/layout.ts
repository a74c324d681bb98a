/**
 * Reading a VHD's metadata at open (and for `tapd check`): the footer (the copy at offset 0 or
 * the one at the end), the dynamic header, the BAT, with every check that keeps later I/O
 * inside the file. Anything that would make the image unsafe to serve throws an ImageError
 * saying what is wrong. Reference: shared/specs/formats.md §4.
 */
import { ImageError } from "../errors.ts";
import {
  COOKIE,
  DISK_DIFFERENCING,
  DISK_DYNAMIC,
  DISK_FIXED,
  type Footer,
  FOOTER_SIZE,
  footerChecksumOk,
  hasCookie,
  MAX_SECTORS,
  parseFooter,
  virtualSize,
} from "./footer.ts";
import {
  bitmapBytes,
  type DynamicHeader,
  HEADER_SIZE,
  parseHeader,
  SECTOR,
  UNALLOCATED,
} from "./header.ts";

/** Largest block size accepted (Hyper-V's limit; QEMU has none but 2^31 overflows it). */
export const MAX_BLOCK_SIZE = 256 * 1024 * 1024;

/** Reads `length` bytes at `offset` (zeros past the end of the file). */
export type ReadAt = (offset: number, length: number) => Uint8Array;

export interface Region {
  start: number;
  end: number;
  what: string;
}

export interface VhdLayout {
  fileSize: number;
  footer: Footer;
  /** The footer's 512 bytes as read (a 511-byte footer padded). */
  footerBytes: Uint8Array;
  /** Which footer was used: the copy at offset 0 (dynamic disks) or the one at the end. */
  footerFrom: "copy" | "end";
  /** Whether the end of the file holds a valid footer, and whether it is 511 bytes long. */
  endFooterOk: boolean;
  shortFooter: boolean;
  /** Virtual size in bytes (§4.4). */
  size: number;
  fixed: boolean;
  differencing: boolean;
  header: DynamicHeader | null;
  headerOffset: number;
  /** BAT entries (sector numbers, UNALLOCATED for none). */
  bat: Uint32Array;
  /** The BAT's sectors as on disk (entries big-endian), from tableOffset. */
  batBytes: Uint8Array;
  bitmapBytes: number;
  /** Metadata the blocks must not overlap: footer copy, header, BAT, locator data. */
  metadata: Region[];
  /** Where the next block may start: past all metadata, all blocks and the end footer. */
  freeStart: number;
}

const alignUp = (x: number, a: number) => Math.ceil(x / a) * a;

function footerAt(read: ReadAt, offset: number, length: number): Uint8Array {
  const b = new Uint8Array(FOOTER_SIZE);
  b.set(read(offset, length));
  return b;
}

/** Whether the bytes are a valid footer (cookie and checksum). */
function validFooter(b: Uint8Array): boolean {
  return hasCookie(b, 0, COOKIE) && footerChecksumOk(b);
}

/** The footer at the end of the file: 512 bytes, or 511 in images older than Virtual PC 2004. */
function endFooter(read: ReadAt, fileSize: number): { bytes: Uint8Array; short: boolean } | null {
  if (fileSize >= FOOTER_SIZE) {
    const b = footerAt(read, fileSize - FOOTER_SIZE, FOOTER_SIZE);
    if (hasCookie(b, 0, COOKIE)) return { bytes: b, short: false };
  }
  if (fileSize >= FOOTER_SIZE - 1) {
    const raw = read(fileSize - (FOOTER_SIZE - 1), FOOTER_SIZE - 1);
    if (hasCookie(raw, 0, COOKIE)) {
      // Its checksum covers its 511 bytes; the padding byte is zero, so the sum is the same.
      return { bytes: footerAt(() => raw, 0, raw.length), short: true };
    }
  }
  return null;
}

/**
 * Parses and checks the metadata of the VHD `path` of `fileSize` bytes. With `problems`, bad
 * BAT entries are listed there (and ignored) instead of refusing the image (for `tapd check`).
 */
export function readLayout(
  path: string,
  read: ReadAt,
  fileSize: number,
  problems?: string[],
): VhdLayout {
  const bad = (why: string) => new ImageError(path, why);
  if (fileSize < FOOTER_SIZE - 1) throw bad(`file too short for a VHD (${fileSize} bytes)`);
  const head = footerAt(read, 0, FOOTER_SIZE);
  const end = endFooter(read, fileSize);
  const endOk = end !== null && validFooter(end.bytes);
  const dynamicType = (b: Uint8Array) => {
    const t = parseFooter(b).diskType;
    return t === DISK_DYNAMIC || t === DISK_DIFFERENCING;
  };
  let footerBytes: Uint8Array, from: "copy" | "end";
  if (hasCookie(head, 0, COOKIE) && validFooter(head) && dynamicType(head)) {
    footerBytes = head;
    from = "copy";
  } else if (endOk) {
    footerBytes = end!.bytes;
    from = "end";
  } else if (hasCookie(head, 0, COOKIE) || end !== null) {
    throw bad("bad VHD footer checksum (in the copy at offset 0 and in the footer at the end)");
  } else throw bad("not a VHD image (no conectix cookie at the start or the end)");

  const footer = parseFooter(footerBytes);
  const type = footer.diskType;
  if (type !== DISK_FIXED && type !== DISK_DYNAMIC && type !== DISK_DIFFERENCING) {
    throw bad(`unsupported VHD disk type ${type}`);
  }
  if (type === DISK_FIXED && from === "copy") throw bad("fixed VHD footer at offset 0");
  const size = virtualSize(footer);
  if (size < SECTOR) throw bad(`invalid virtual size ${size}`);
  if (size > MAX_SECTORS * SECTOR) {
    throw bad(`virtual size ${size} is larger than the 2040 GiB VHD limit`);
  }
  const shortFooter = end?.short ?? false;
  const endFooterStart = endOk ? fileSize - (shortFooter ? FOOTER_SIZE - 1 : FOOTER_SIZE) : -1;
  const base = {
    fileSize,
    footer,
    footerBytes,
    footerFrom: from,
    endFooterOk: endOk,
    shortFooter,
    size,
    differencing: type === DISK_DIFFERENCING,
    bitmapBytes: 0,
    headerOffset: 0,
  };
  if (type === DISK_FIXED) {
    if (size > endFooterStart) {
      throw bad(`fixed VHD truncated: ${endFooterStart} bytes of data for a ${size}-byte disk`);
    }
    return {
      ...base,
      fixed: true,
      header: null,
      bat: new Uint32Array(0),
      batBytes: new Uint8Array(0),
      metadata: [],
      freeStart: endFooterStart,
    };
  }
  return readDynamic(path, read, { ...base, fixed: false }, endFooterStart, problems);
}

type Base = Omit<VhdLayout, "header" | "bat" | "batBytes" | "metadata" | "freeStart">;

function readDynamic(
  path: string,
  read: ReadAt,
  base: Base,
  endFooterStart: number,
  problems: string[] | undefined,
): VhdLayout {
  const bad = (why: string) => new ImageError(path, why);
  const { fileSize, footer, size } = base;
  const hOff = footer.dataOffset;
  if (!Number.isFinite(hOff) || hOff < FOOTER_SIZE || hOff + HEADER_SIZE > fileSize) {
    throw bad(`dynamic header offset ${footer.dataOffset} lies outside the file`);
  }
  const header = parseHeader(read(hOff, HEADER_SIZE));
  if (!header.cookieOk) throw bad("bad dynamic header cookie (not cxsparse)");
  if (!header.checksumOk) throw bad("bad dynamic header checksum");
  const bs = header.blockSize;
  if (bs < SECTOR || bs > MAX_BLOCK_SIZE || (bs & (bs - 1)) !== 0) {
    throw bad(`block size ${bs} is not a power of two from 512 to ${MAX_BLOCK_SIZE}`);
  }
  const entries = header.maxTableEntries;
  if (entries * bs < size) {
    throw bad(`BAT of ${entries} entries is too small for a ${size}-byte disk`);
  }
  const tOff = header.tableOffset, batLen = alignUp(entries * 4, SECTOR);
  if (!Number.isFinite(tOff) || tOff < FOOTER_SIZE || tOff + entries * 4 > fileSize) {
    throw bad(`BAT (${entries} entries at offset ${tOff}) lies beyond the end of the file`);
  }
  const batBytes = read(tOff, batLen);
  const v = new DataView(batBytes.buffer, batBytes.byteOffset, batBytes.length);
  const bat = new Uint32Array(entries);
  const metadata: Region[] = [
    { start: 0, end: FOOTER_SIZE, what: "the footer copy" },
    { start: hOff, end: hOff + HEADER_SIZE, what: "the dynamic header" },
    { start: tOff, end: tOff + entries * 4, what: "the BAT" },
  ];
  for (const l of header.locators) {
    if (Number.isFinite(l.offset) && l.offset + l.space <= fileSize && l.space > 0) {
      metadata.push({ start: l.offset, end: l.offset + l.space, what: "parent locator data" });
    }
  }
  const bitmap = bitmapBytes(bs), total = bitmap + bs;
  const limit = endFooterStart >= 0 ? endFooterStart : fileSize;
  let freeStart = Math.max(...metadata.map((m) => m.end));
  for (let i = 0; i < entries; i++) {
    const e = v.getUint32(4 * i);
    bat[i] = e;
    if (e === UNALLOCATED) continue;
    const start = e * SECTOR, stop = start + total;
    const hit = metadata.find((m) => start < m.end && m.start < stop);
    const why = stop > limit
      ? `BAT entry ${i} points past the end of the file (sector ${e})`
      : hit !== undefined
      ? `block ${i} (sector ${e}) overlaps ${hit.what}`
      : null;
    if (why !== null) {
      if (problems === undefined) throw bad(why);
      problems.push(why);
      bat[i] = UNALLOCATED;
      continue;
    }
    freeStart = Math.max(freeStart, stop);
  }
  // With a valid end footer, new blocks go where it is; without, after whatever ends the file.
  freeStart = Math.max(freeStart, limit);
  return {
    ...base,
    header,
    headerOffset: hOff,
    bat,
    batBytes,
    bitmapBytes: bitmap,
    metadata,
    freeStart: alignUp(freeStart, SECTOR),
  };
}
