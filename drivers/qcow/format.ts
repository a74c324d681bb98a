/**
 * qcow as an ImageFormat: `tapd create -f qcow` and `tapd check` on qcow images.
 *
 * check walks the L1 table and every L2 table and marks each host cluster they use: a table or
 * a data cluster outside the file, misaligned, or used twice is corruption; compressed clusters
 * must lie inside the file. qcow v1 has no free-space accounting, so clusters past the tables
 * that nothing references are reported as leaks (QEMU itself abandons space when it rewrites a
 * compressed cluster).
 */
import { O_CREAT, O_EXCL, O_RDONLY, O_WRONLY } from "../../ffi/constants.ts";
import { FileHandle } from "../../ffi/file.ts";
import type { CheckReport, CreateOptions, ImageFormat } from "../image_format.ts";
import { newImageBytes, parseHeader } from "./header.ts";
import { compressedExtent, getEntry, Kind, kindOf } from "./tables.ts";

/** Errors listed one by one at most; the rest are counted. */
const MAX_LISTED = 50;

function createQcowFile(path: string, options: CreateOptions): Promise<void> {
  try {
    const clusterBits = options.clusterSize === undefined
      ? undefined
      : Math.log2(options.clusterSize);
    if (
      clusterBits !== undefined && (!Number.isInteger(clusterBits) || clusterBits < 9 ||
        clusterBits > 16)
    ) {
      throw new RangeError("qcow cluster_size must be a power of two from 512 to 65536");
    }
    const bytes = newImageBytes({ size: options.size, clusterBits, backingFile: options.backing });
    using file = FileHandle.open(path, O_WRONLY | O_CREAT | O_EXCL, 0o644);
    let done = 0;
    while (done < bytes.length) done += file.writeAt(bytes.subarray(done), done);
    file.syncNow();
    return Promise.resolve();
  } catch (e) {
    return Promise.reject(e);
  }
}

function checkQcowFile(path: string): Promise<CheckReport> {
  try {
    using file = FileHandle.open(path, O_RDONLY);
    const fileSize = file.stat().size;
    const head = new Uint8Array(Math.min(4096, fileSize));
    file.readAt(head, 0);
    const h = parseHeader(head, fileSize, path);
    const report: CheckReport = { format: "qcow", errors: [], leaks: [] };
    let hidden = 0;
    const error = (why: string) => {
      if (report.errors.length < MAX_LISTED) report.errors.push(why);
      else hidden++;
    };
    const cs = 2 ** h.clusterBits;
    const fileClusters = Math.ceil(fileSize / cs);
    const used = new Uint8Array(fileClusters);
    /** Marks [offset, offset+length) as used; false if any cluster was already. */
    const mark = (offset: number, length: number): boolean => {
      let fresh = true;
      for (let c = Math.floor(offset / cs); c * cs < offset + length; c++) {
        if (used[c]) fresh = false;
        used[c] = 1;
      }
      return fresh;
    };
    const l1Bytes = h.l1Size * 8;
    if (h.l1Offset + l1Bytes > fileSize) {
      error(`L1 table (${l1Bytes} bytes at ${h.l1Offset}) goes past the end of the file`);
      return Promise.resolve(report);
    }
    // header, backing name, L1 (written in whole sectors, as qemu-img and tapd create it)
    mark(0, Math.min(fileSize, h.l1Offset + Math.ceil(l1Bytes / 512) * 512));
    const l1 = new Uint8Array(l1Bytes);
    file.readAt(l1, h.l1Offset);
    const l1v = new DataView(l1.buffer);
    const l2Bytes = 8 * 2 ** h.l2Bits;
    const l2 = new Uint8Array(l2Bytes);
    const l2v = new DataView(l2.buffer);
    let allocated = 0;
    for (let i = 0; i < h.l1Size; i++) {
      const l2Offset = getEntry(l1v, i * 8);
      if (l2Offset === 0) continue;
      if (l2Offset % 512 !== 0 || l2Offset + l2Bytes > fileSize) {
        error(`L1 entry ${i}: L2 table offset ${l2Offset} is misaligned or outside the file`);
        continue;
      }
      if (!mark(l2Offset, l2Bytes)) {
        error(`L1 entry ${i}: L2 table at ${l2Offset} overlaps other metadata or data`);
      }
      file.readAt(l2, l2Offset);
      for (let j = 0; j < 2 ** h.l2Bits; j++) {
        const entry = getEntry(l2v, j * 8);
        const kind = kindOf(entry);
        if (kind === Kind.Unallocated) continue;
        allocated++;
        const where = `L2 table ${i} entry ${j}`;
        if (kind === Kind.Normal) {
          if (entry % cs !== 0 || entry + cs > Math.ceil(fileSize / 512) * 512 + cs) {
            error(`${where}: cluster offset ${entry} is misaligned or outside the file`);
          } else if (!mark(entry, cs)) {
            error(`${where}: cluster at ${entry} is used twice`);
          }
        } else {
          const c = compressedExtent(l2v, j * 8, h.clusterBits);
          if (c.length === 0 || c.offset + c.length > fileSize) {
            error(
              `${where}: compressed cluster (${c.length} bytes at ${c.offset}) is outside the file`,
            );
          } else mark(c.offset, c.length);
        }
      }
    }
    let leaked = 0;
    for (let c = 0; c < fileClusters; c++) if (!used[c]) leaked++;
    if (leaked > 0) {
      report.leaks.push(`${leaked} clusters of ${cs} bytes are referenced by nothing`);
    }
    if (hidden > 0) report.errors.push(`… and ${hidden} more errors`);
    report.allocated = allocated;
    report.total = Math.ceil(h.size / cs);
    return Promise.resolve(report);
  } catch (e) {
    return Promise.reject(e);
  }
}

export const qcowFormat: ImageFormat = {
  type: "qcow",
  create: createQcowFile,
  check: checkQcowFile,
};
