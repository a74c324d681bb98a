/**
 * New VHD images (`tapd create -f vhd`): fixed, dynamic, and differencing over a VHD parent.
 *
 * Laid out as `qemu-img create -f vpc` does (shared/specs/formats.md §4.8) — footer copy at 0,
 * dynamic header at 512, BAT at 1536, footer at the end — with two differences: the size is
 * kept exactly as asked (rounded up to 512; QEMU rounds it up to a CHS-representable size
 * unless `force_size=on`), and the creator application is `qem2` as with `force_size=on`, so
 * that every QEMU version (and tapd) takes the virtual size from `current_size` (§4.4; QEMU
 * before 10.0 used the geometry for unknown creators, so a creator of our own would not do). A differencing child (§4.9) records its parent's
 * unique id, modification time and file name, and three locators (W2ru relative, W2ku
 * absolute, MacX file URL) in sectors after the BAT.
 */
import { basename, dirname, relative, resolve } from "node:path";
import { O_CREAT, O_EXCL, O_WRONLY } from "../../ffi/constants.ts";
import { FileHandle } from "../../ffi/file.ts";
import type { CreateOptions } from "../image_format.ts";
import {
  buildFooter,
  chsGeometry,
  DISK_DIFFERENCING,
  DISK_DYNAMIC,
  DISK_FIXED,
  type Footer,
  FOOTER_SIZE,
  MAX_SECTORS,
  newUuid,
  VHD_EPOCH,
  vhdNow,
} from "./footer.ts";
import {
  buildHeader,
  encodeUtf16,
  HEADER_SIZE,
  type Locator,
  PLATFORM_MACX,
  PLATFORM_W2KU,
  PLATFORM_W2RU,
  SECTOR,
} from "./header.ts";
import { MAX_BLOCK_SIZE } from "./layout.ts";
import { layoutOf } from "./parent.ts";

export const DEFAULT_BLOCK_SIZE = 2 * 1024 * 1024;
const TABLE_OFFSET = FOOTER_SIZE + HEADER_SIZE;

const alignUp = (x: number, a: number) => Math.ceil(x / a) * a;

function newFooter(size: number, type: number): Footer {
  return {
    features: 2,
    version: 0x00010000,
    dataOffset: type === DISK_FIXED ? Infinity : FOOTER_SIZE,
    timestamp: vhdNow(),
    creatorApp: "qem2",
    creatorVersion: 0x00050003,
    creatorOs: 0x5769326b, // "Wi2k"
    originalSize: size,
    currentSize: size,
    geometry: chsGeometry(size),
    diskType: type,
    checksum: 0,
    uuid: newUuid(),
    savedState: 0,
  };
}

interface Parent {
  uuid: Uint8Array;
  timestamp: number;
  name: string;
  /** Locator strings: relative (W2ru), absolute (W2ku), file URL (MacX). */
  relative: string;
  absolute: string;
  size: number;
}

/** What a child records about its parent `backing` (as given, relative to the child's dir). */
function describeParent(path: string, backing: string): Parent {
  const absolute = resolve(dirname(resolve(path)), backing);
  const layout = layoutOf(absolute);
  const mtime = Deno.statSync(absolute).mtime?.getTime() ?? Date.now();
  return {
    uuid: layout.footer.uuid,
    timestamp: Math.max(0, Math.floor(mtime / 1000) - VHD_EPOCH) >>> 0,
    name: basename(backing),
    relative: relative(dirname(resolve(path)), absolute),
    absolute,
    size: layout.size,
  };
}

/** Locator data blocks (whole sectors each) and their table entries, from `at`. */
function locators(p: Parent, at: number): { entries: Locator[]; data: Uint8Array[] } {
  const texts: [number, Uint8Array][] = [
    [PLATFORM_W2RU, encodeUtf16(".\\" + p.relative.replaceAll("/", "\\"), true)],
    [PLATFORM_W2KU, encodeUtf16(p.absolute, true)],
    [PLATFORM_MACX, new TextEncoder().encode("file://" + encodeURI(p.absolute))],
  ];
  const entries: Locator[] = [], data: Uint8Array[] = [];
  for (const [code, bytes] of texts) {
    const space = alignUp(Math.max(bytes.length, 1), SECTOR);
    const padded = new Uint8Array(space);
    padded.set(bytes);
    entries.push({ code, space, length: bytes.length, offset: at });
    data.push(padded);
    at += space;
  }
  return { entries, data };
}

/** The bytes of a new dynamic or differencing image. */
export function sparseImageBytes(
  size: number,
  blockSize: number,
  parent: Parent | null,
): Uint8Array {
  const entries = Math.ceil(size / blockSize);
  const batBytes = alignUp(entries * 4, SECTOR);
  const locatorsAt = TABLE_OFFSET + batBytes;
  const locs = parent === null ? { entries: [], data: [] } : locators(parent, locatorsAt);
  const locatorBytes = locs.data.reduce((n, d) => n + d.length, 0);
  const footerAt = locatorsAt + locatorBytes;
  const footer = buildFooter(newFooter(size, parent === null ? DISK_DYNAMIC : DISK_DIFFERENCING));
  const header = buildHeader({
    tableOffset: TABLE_OFFSET,
    maxTableEntries: entries,
    blockSize,
    parentUuid: parent?.uuid,
    parentTimestamp: parent?.timestamp,
    parentName: parent?.name,
    locators: locs.entries,
  });
  const bytes = new Uint8Array(footerAt + FOOTER_SIZE);
  bytes.set(footer, 0);
  bytes.set(header, FOOTER_SIZE);
  bytes.fill(0xff, TABLE_OFFSET, TABLE_OFFSET + entries * 4);
  let at = locatorsAt;
  for (const d of locs.data) {
    bytes.set(d, at);
    at += d.length;
  }
  bytes.set(footer, footerAt);
  return bytes;
}

function checkedSize(size: number): number {
  const rounded = alignUp(size, SECTOR);
  if (!Number.isSafeInteger(rounded) || rounded <= 0) {
    throw new RangeError(`vhd: invalid size ${size}`);
  }
  if (rounded > MAX_SECTORS * SECTOR) {
    throw new RangeError(`vhd: size ${size} is larger than the 2040 GiB VHD limit`);
  }
  return rounded;
}

function checkedBlockSize(blockSize: number | undefined): number {
  const bs = blockSize ?? DEFAULT_BLOCK_SIZE;
  if (!Number.isInteger(bs) || bs < SECTOR || bs > MAX_BLOCK_SIZE || (bs & (bs - 1)) !== 0) {
    throw new RangeError(
      `vhd: block size ${bs} is not a power of two from 512 to ${MAX_BLOCK_SIZE}`,
    );
  }
  return bs;
}

function writeAll(file: FileHandle, bytes: Uint8Array, at: number): void {
  let done = 0;
  while (done < bytes.length) done += file.writeAt(bytes.subarray(done), at + done);
}

/** Creates a VHD at `path` (which must not exist). */
export function createVhd(path: string, options: CreateOptions): Promise<void> {
  try {
    const subformat = options.subformat ?? "dynamic";
    if (subformat !== "dynamic" && subformat !== "fixed") {
      throw new RangeError(`vhd: unknown subformat "${subformat}" (dynamic or fixed)`);
    }
    let parent: Parent | null = null;
    if (options.backing !== undefined) {
      if (subformat === "fixed") throw new RangeError("vhd: a fixed image cannot have a parent");
      if (options.backingFormat !== undefined && options.backingFormat !== "vhd") {
        throw new RangeError(
          `vhd: a differencing image's parent must be a VHD, not ${options.backingFormat}`,
        );
      }
      parent = describeParent(path, options.backing);
    }
    const size = checkedSize(options.size > 0 ? options.size : parent?.size ?? 0);
    const blockSize = checkedBlockSize(options.clusterSize);
    using file = FileHandle.open(path, O_WRONLY | O_CREAT | O_EXCL, 0o644);
    if (subformat === "fixed") {
      file.truncate(size);
      writeAll(file, buildFooter(newFooter(size, DISK_FIXED)), size);
    } else writeAll(file, sparseImageBytes(size, blockSize, parent), 0);
    file.syncNow();
    return Promise.resolve();
  } catch (e) {
    return Promise.reject(e);
  }
}
