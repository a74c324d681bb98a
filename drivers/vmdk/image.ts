/**
 * Reading what a VMDK file is, before opening it as a disk: a text descriptor file, or a sparse
 * extent with its embedded descriptor (and, for a stream, the footer's header). Synchronous and
 * small: used by open, check, create (a parent's CID) and the format probe.
 */
import { dirname, isAbsolute, resolve } from "node:path";
import { O_RDONLY } from "../../ffi/constants.ts";
import { FileHandle } from "../../ffi/file.ts";
import { ImageError } from "../errors.ts";
import {
  type Descriptor,
  isDescriptorText,
  MAX_DESCRIPTOR,
  NO_PARENT,
  parseDescriptor,
} from "./descriptor.ts";
import {
  FLAG_COMPRESSED,
  GD_AT_END,
  isSparseExtent,
  MARKER_EOS,
  MARKER_FOOTER,
  parseMarker,
  parseSparseHeader,
  refusedSubformat,
  SECTOR,
  type SparseHeader,
} from "./header.ts";

export interface EmbeddedInfo {
  /** The header to use (a stream's footer copy when the leading one says GD_AT_END). */
  header: SparseHeader;
  /** Byte range of the embedded descriptor area, and the bytes it held. */
  areaOffset: number;
  area: Uint8Array;
}

export interface VmdkMeta {
  path: string;
  descriptor: Descriptor;
  /** Set for a sparse file with its descriptor inside (monolithicSparse, streamOptimized). */
  embedded: EmbeddedInfo | null;
}

/** Whether a file's first bytes are a VMDK (sparse extent, COWD/seSparse, or text descriptor). */
export function isVmdk(head: Uint8Array): boolean {
  return isSparseExtent(head) || refusedSubformat(head) !== null || isDescriptorText(head);
}

function readAt(file: FileHandle, offset: number, length: number): Uint8Array {
  const buf = new Uint8Array(length);
  let done = 0;
  while (done < length) {
    const n = file.readAt(buf.subarray(done), offset + done);
    if (n <= 0) break;
    done += n;
  }
  return buf.subarray(0, done);
}

/** Reads a sparse header, following a stream's GD_AT_END to the footer. */
export function readSparseHeader(file: FileHandle, size: number, path: string): SparseHeader {
  const h = parseSparseHeader(readAt(file, 0, SECTOR), size, path);
  if (h.gdOffset !== GD_AT_END) return h;
  if ((h.flags & FLAG_COMPRESSED) === 0) {
    throw new ImageError(path, "grain directory at the end of an uncompressed extent");
  }
  if (size < 4 * SECTOR) throw new ImageError(path, "stream too short for its footer");
  const tail = readAt(file, size - 3 * SECTOR, 3 * SECTOR);
  const m = parseMarker(tail.subarray(0, SECTOR)), eos = parseMarker(tail.subarray(2 * SECTOR));
  if (
    tail.length < 3 * SECTOR || m.type !== MARKER_FOOTER || m.size !== 0 || m.value !== 1 ||
    eos.type !== MARKER_EOS || eos.value !== 0 || eos.size !== 0
  ) {
    throw new ImageError(path, "invalid streamOptimized footer");
  }
  const footer = parseSparseHeader(tail.subarray(SECTOR, 2 * SECTOR), size, path);
  if (footer.gdOffset === GD_AT_END) {
    throw new ImageError(path, "stream footer has no grain directory");
  }
  return footer;
}

/** The header of the sparse extent file at `path` (opened on its own, without O_DIRECT). */
export function readSparseHeaderOf(path: string): SparseHeader {
  using file = FileHandle.open(path, O_RDONLY);
  return readSparseHeader(file, file.stat().size, path);
}

/** Reads a VMDK's descriptor (embedded or a text file). Throws ImageError. */
export function readVmdkMeta(path: string): VmdkMeta {
  using file = FileHandle.open(path, O_RDONLY);
  const size = file.stat().size;
  const head = readAt(file, 0, Math.min(size, 1024));
  const refused = refusedSubformat(head);
  if (refused !== null) throw new ImageError(path, refused);
  if (isSparseExtent(head)) {
    const header = readSparseHeader(file, size, path);
    const lead = parseSparseHeader(head, size, path);
    let text = "";
    let areaOffset = 0, area: Uint8Array = new Uint8Array(0);
    if (lead.descriptorOffset !== 0 && lead.descriptorSize !== 0) {
      areaOffset = lead.descriptorOffset * SECTOR;
      area = readAt(file, areaOffset, lead.descriptorSize * SECTOR);
      const nul = area.indexOf(0);
      text = new TextDecoder().decode(area.subarray(0, nul < 0 ? area.length : nul));
    }
    // A sparse extent without a descriptor (one piece of a split disk) stands alone.
    const descriptor = text.trim() === ""
      ? parseDescriptor(
        `CID=fffffffe\nparentCID=ffffffff\ncreateType="monolithicSparse"\nRW ${header.capacity} SPARSE "${path}"\n`,
        path,
      )
      : parseDescriptor(text, path);
    return { path, descriptor, embedded: { header, areaOffset, area } };
  }
  if (!isDescriptorText(head)) throw new ImageError(path, "not a VMDK image");
  if (size > MAX_DESCRIPTOR) {
    throw new ImageError(path, `descriptor file of ${size} bytes is too large`);
  }
  const text = new TextDecoder().decode(readAt(file, 0, size));
  const descriptor = parseDescriptor(text, path);
  return { path, descriptor, embedded: null };
}

/** The virtual size in bytes: the header's capacity (embedded), else the extents' sum. */
export function virtualSize(meta: VmdkMeta): number {
  if (meta.embedded !== null) return meta.embedded.header.capacity * SECTOR;
  return meta.descriptor.extents.reduce((n, e) => n + e.sectors * SECTOR, 0);
}

/** Where an extent or parent file named in `meta`'s descriptor lives. */
export function relativeTo(meta: VmdkMeta, name: string): string {
  return isAbsolute(name) ? name : resolve(dirname(meta.path), name);
}

/** The parent's path and the CID it must have, or null. */
export function parentOf(meta: VmdkMeta): { path: string; cid: number } | null {
  const hint = meta.descriptor.parentFileNameHint;
  if (hint === null || hint === "") return null;
  return { path: relativeTo(meta, hint), cid: meta.descriptor.parentCid };
}

/** Checks that the parent exists, is a VMDK and has the CID the child recorded. */
export function checkParent(meta: VmdkMeta): { path: string; meta: VmdkMeta } | null {
  const p = parentOf(meta);
  if (p === null) return null;
  const hint = meta.descriptor.parentFileNameHint!;
  let parent: VmdkMeta;
  try {
    parent = readVmdkMeta(p.path);
  } catch (e) {
    const why = e instanceof ImageError ? e.message : (e as Error).message;
    throw new ImageError(meta.path, `cannot open its parent ${JSON.stringify(hint)}: ${why}`);
  }
  if (p.cid !== NO_PARENT && parent.descriptor.cid !== p.cid) {
    throw new ImageError(
      meta.path,
      `parent ${JSON.stringify(hint)} has CID ${parent.descriptor.cid.toString(16)} but this ` +
        `image expects parentCID ${
          p.cid.toString(16)
        } (the parent changed after the child was made)`,
    );
  }
  return { path: p.path, meta: parent };
}
