/**
 * `tapd check` for VMDK: the descriptor, every extent file, the parent link, and in each sparse
 * extent the GD, the GTs and the grains — entries outside the file or inside its metadata, a
 * grain referenced twice, the redundant GD/GTs disagreeing with the primary ones, and grains of
 * the file that nothing references (leaks). Reads only; changes nothing.
 */
import { O_RDONLY } from "../../ffi/constants.ts";
import { FileHandle } from "../../ffi/file.ts";
import type { CheckReport } from "../image_format.ts";
import {
  FLAG_COMPRESSED,
  FLAG_RGD,
  FLAG_ZEROED_GRAIN,
  gdSectors,
  gtBytes,
  gtCount,
  SECTOR,
  type SparseHeader,
} from "./header.ts";
import { checkParent, readSparseHeader, readVmdkMeta, relativeTo, type VmdkMeta } from "./image.ts";

const message = (e: unknown) => e instanceof Error ? e.message : String(e);

function readAt(file: FileHandle, offset: number, length: number): Uint8Array {
  const buf = new Uint8Array(length);
  let done = 0;
  while (done < length) {
    const n = file.readAt(buf.subarray(done), offset + done);
    if (n <= 0) break;
    done += n;
  }
  return buf;
}

function u32s(bytes: Uint8Array, n: number): Uint32Array {
  const v = new DataView(bytes.buffer, bytes.byteOffset, bytes.length);
  const out = new Uint32Array(n);
  for (let i = 0; i < n; i++) out[i] = v.getUint32(i * 4, true);
  return out;
}

interface Counts {
  allocated: number;
  total: number;
}

/** Checks one sparse extent file; adds to the report. */
function checkSparse(
  path: string,
  name: string,
  report: CheckReport,
  counts: Counts,
  known: SparseHeader | null,
): void {
  using file = FileHandle.open(path, O_RDONLY);
  const size = file.stat().size;
  let h: SparseHeader;
  try {
    h = known ?? readSparseHeader(file, size, path);
  } catch (e) {
    report.errors.push(message(e));
    return;
  }
  const n = gtCount(h), gdBytes = gdSectors(h) * SECTOR, gtb = gtBytes(h);
  const g = h.grainSectors, sectors = Math.ceil(size / SECTOR);
  const compressed = (h.flags & FLAG_COMPRESSED) !== 0;
  const zeroed = (h.flags & FLAG_ZEROED_GRAIN) !== 0;
  counts.total += Math.ceil(h.capacity / g);
  const gd = u32s(readAt(file, h.gdOffset * SECTOR, gdBytes), n);
  const redundant = (h.flags & FLAG_RGD) !== 0 && h.rgdOffset !== 0;
  const rgd = redundant ? u32s(readAt(file, h.rgdOffset * SECTOR, gdBytes), n) : null;
  /** Used sector ranges [start, end) for overlaps and leaks. */
  const used: [number, number, string][] = [[0, h.overHead, "metadata"]];
  used.push([h.gdOffset, h.gdOffset + gdBytes / SECTOR, "grain directory"]);
  if (rgd !== null) used.push([h.rgdOffset, h.rgdOffset + gdBytes / SECTOR, "redundant GD"]);
  const owner = new Map<number, string>();
  const lagging: string[] = [];
  const loadGt = (sector: number, what: string): Uint32Array | null => {
    if (sector === 0) return null;
    if (sector * SECTOR + gtb > size) {
      report.errors.push(
        `${name}: ${what} at sector ${sector} lies outside the file (${size} bytes)`,
      );
      return null;
    }
    used.push([sector, sector + gtb / SECTOR, what]);
    return u32s(readAt(file, sector * SECTOR, gtb), h.gtesPerGt);
  };
  for (let i = 0; i < n; i++) {
    const gt = loadGt(gd[i], `grain table ${i}`);
    const rgt = rgd === null ? null : loadGt(rgd[i], `redundant grain table ${i}`);
    if (rgd !== null && (gd[i] === 0) !== (rgd[i] === 0)) {
      if (gd[i] === 0) {
        report.errors.push(`${name}: GD entry ${i} is 0 but the redundant GD has one`);
      } else lagging.push(`GD entry ${i}`);
    }
    if (gt === null) continue;
    for (let j = 0; j < h.gtesPerGt; j++) {
      const e = gt[j], where = `GT ${i} entry ${j}`;
      if (rgt !== null && rgt[j] !== e) {
        if (rgt[j] === 0) lagging.push(where);
        else {
          report.errors.push(
            `${name}: ${where} is ${e} but the redundant grain table says ${rgt[j]}`,
          );
        }
      }
      if (e === 0 || (e === 1 && zeroed)) continue;
      if ((i * h.gtesPerGt + j) * g >= h.capacity) {
        report.errors.push(`${name}: ${where} maps a grain past the end of the extent`);
        continue;
      }
      counts.allocated++;
      if (e >= sectors) {
        report.errors.push(`${name}: ${where} points outside the file (sector ${e})`);
        continue;
      }
      if (e < h.overHead) {
        report.errors.push(`${name}: ${where} points into the metadata (sector ${e})`);
        continue;
      }
      const prev = owner.get(e);
      if (prev !== undefined) {
        report.errors.push(`${name}: ${where} and ${prev} point at the same grain (sector ${e})`);
        continue;
      }
      owner.set(e, where);
      if (!compressed) used.push([e, e + g, where]);
    }
  }
  if (lagging.length > 0) {
    report.leaks.push(
      `${name}: ${lagging.length} redundant table entries not yet updated (an interrupted ` +
        `allocation; the primary tables are used), first ${lagging[0]}`,
    );
  }
  if (compressed) return; // markers and compressed sizes: no overlap or leak accounting
  used.sort((a, b) => a[0] - b[0]);
  let end = 0, endWhat = "";
  const gaps: [number, number][] = [];
  for (const [s, e, what] of used) {
    if (s < end && what !== "metadata" && endWhat !== "metadata") {
      report.errors.push(`${name}: ${what} overlaps ${endWhat} (sector ${s})`);
    }
    if (s > end) gaps.push([end, s]);
    if (e > end) {
      end = e;
      endWhat = what;
    }
  }
  if (sectors > end) gaps.push([end, sectors]);
  let leaked = 0;
  for (const [s, e] of gaps) {
    const first = Math.ceil(s / g) * g;
    if (e >= first + g) leaked += Math.floor((e - first) / g);
  }
  if (leaked > 0) {
    report.leaks.push(`${name}: ${leaked} grain(s) of the file referenced by nothing`);
  }
}

/** Checks a VMDK image's metadata without changing it. */
export function checkVmdk(path: string): Promise<CheckReport> {
  const report: CheckReport = { format: "vmdk", errors: [], leaks: [] };
  const counts: Counts = { allocated: 0, total: 0 };
  let meta: VmdkMeta;
  try {
    meta = readVmdkMeta(path);
  } catch (e) {
    report.errors.push(message(e));
    return Promise.resolve(report);
  }
  try {
    checkParent(meta);
  } catch (e) {
    report.errors.push(message(e));
  }
  if (meta.embedded !== null) {
    checkSparse(path, path, report, counts, meta.embedded.header);
  } else {
    for (const line of meta.descriptor.extents) {
      if (line.type === "ZERO") continue;
      const file = relativeTo(meta, line.file);
      let st: Deno.FileInfo;
      try {
        st = Deno.statSync(file);
      } catch {
        report.errors.push(`extent file ${JSON.stringify(line.file)} is missing`);
        continue;
      }
      if (line.type === "SPARSE") {
        try {
          checkSparse(file, line.file, report, counts, null);
        } catch (e) {
          report.errors.push(`${line.file}: ${message(e)}`);
        }
      } else if (!st.isFile && !st.isBlockDevice) {
        report.errors.push(`extent ${JSON.stringify(line.file)} is not a file`);
      }
    }
  }
  if (counts.total > 0) {
    report.allocated = counts.allocated;
    report.total = counts.total;
  }
  return Promise.resolve(report);
}
