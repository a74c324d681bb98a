/**
 * `tapd check` on a VHD (qemu-img cannot check vpc images). Errors: a footer with a bad
 * checksum, a missing footer, the copy at offset 0 differing from the footer at the end, a bad
 * dynamic header, BAT entries outside the file, overlapping metadata or each other, a
 * differencing disk whose parent cannot be found or has another unique id. Leaks: space between
 * the metadata and the end footer that no block uses (a block allocated by a write that a crash
 * interrupted, or metadata tapd does not know such as blktap's batmap).
 */
import { O_RDONLY } from "../../ffi/constants.ts";
import { FileHandle } from "../../ffi/file.ts";
import type { CheckReport } from "../image_format.ts";
import { COOKIE, FOOTER_SIZE, footerChecksumOk, hasCookie } from "./footer.ts";
import { SECTOR, UNALLOCATED } from "./header.ts";
import { type ReadAt, readLayout, type Region, type VhdLayout } from "./layout.ts";
import { fileReader, findParent, parentMismatch, parentNames } from "./parent.ts";

const MAX_LISTED = 50;

/** Footer problems: both places, checksums, and whether they agree. */
function footerErrors(read: (o: number, n: number) => Uint8Array, fileSize: number): string[] {
  const errors: string[] = [];
  const head = read(0, FOOTER_SIZE);
  const tail = read(Math.max(0, fileSize - FOOTER_SIZE), FOOTER_SIZE);
  const headCookie = hasCookie(head, 0, COOKIE);
  const tailCookie = hasCookie(tail, 0, COOKIE) || hasCookie(tail, 1, COOKIE);
  if (headCookie && !footerChecksumOk(head)) errors.push("bad checksum in the footer copy at 0");
  if (!tailCookie) {
    if (headCookie) errors.push("no footer at the end of the file");
    return errors;
  }
  const end = hasCookie(tail, 0, COOKIE) ? tail : read(fileSize - (FOOTER_SIZE - 1), 511);
  if (!footerChecksumOk(end)) errors.push("bad checksum in the footer at the end of the file");
  if (headCookie && end.length === FOOTER_SIZE && !head.every((x, i) => x === end[i])) {
    errors.push("the footer copy at offset 0 differs from the footer at the end");
  }
  return errors;
}

/** Blocks overlapping each other, and space no block or metadata uses (leaks). */
function blockErrors(layout: VhdLayout, errors: string[], leaks: string[]): number {
  const total = layout.bitmapBytes + layout.header!.blockSize;
  const used: (Region & { block: number })[] = layout.metadata.map((m) => ({ ...m, block: -1 }));
  let allocated = 0;
  layout.bat.forEach((e, i) => {
    if (e === UNALLOCATED) return;
    const start = e * SECTOR, end = start + total;
    if (end > layout.fileSize) return; // reported by readLayout
    allocated++;
    used.push({ start, end, what: `block ${i}`, block: i });
  });
  used.sort((a, b) => a.start - b.start);
  const align = Math.min(4096, layout.header!.blockSize);
  let leaked = 0, reach = 0, prev: Region | null = null;
  for (const r of used) {
    if (prev !== null && r.start < reach) {
      if (r.what.startsWith("block") || prev.what.startsWith("block")) {
        errors.push(`${r.what} overlaps ${prev.what}`);
      }
    } else if (r.start - reach >= align) leaked += r.start - reach;
    if (r.end > reach) {
      reach = r.end;
      prev = r;
    }
  }
  const footerAt = layout.endFooterOk ? layout.fileSize - FOOTER_SIZE : layout.fileSize;
  if (footerAt - reach >= align) leaked += footerAt - reach;
  if (leaked > 0) leaks.push(`${leaked} bytes of the file are used by no block or metadata`);
  return allocated;
}

function realPath(path: string): string {
  try {
    return Deno.realPathSync(path);
  } catch {
    return path;
  }
}

/** The parent chain: each parent found, with the right unique id, and no loop. */
function chainErrors(path: string, layout: VhdLayout, read: ReadAt): string[] {
  const seen = [realPath(path)];
  let child = path, names = parentNames(layout, read), current = layout;
  for (let depth = 0; depth < 64; depth++) {
    const found = findParent(child, names);
    const which = depth === 0 ? "parent" : `ancestor ${JSON.stringify(child)}'s parent`;
    if (found === null) {
      return [`dangling ${which}: none of ${JSON.stringify(names)} exists`.slice(0, 800)];
    }
    const why = parentMismatch(current, found.path);
    if (why !== null) return [why];
    if (seen.includes(realPath(found.path))) {
      return [`parent chain loop: ${JSON.stringify(found.path)} is its own ancestor`];
    }
    seen.push(realPath(found.path));
    try {
      using file = FileHandle.open(found.path, O_RDONLY);
      const parentRead = fileReader(file);
      current = readLayout(found.path, parentRead, file.stat().size);
      if (!current.differencing) return [];
      names = parentNames(current, parentRead);
    } catch (e) {
      return [`${which}: ${(e as Error).message}`];
    }
    child = found.path;
  }
  return ["parent chain deeper than 64 images"];
}

export function checkVhd(path: string): Promise<CheckReport> {
  try {
    using file = FileHandle.open(path, O_RDONLY);
    const fileSize = file.stat().size;
    const read = fileReader(file);
    const report: CheckReport = { format: "vhd", errors: [], leaks: [] };
    report.errors.push(...footerErrors(read, fileSize));
    const problems: string[] = [];
    let layout: VhdLayout;
    try {
      layout = readLayout(path, read, fileSize, problems);
    } catch (e) {
      report.errors.push((e as Error).message.replace(`Cannot open ${JSON.stringify(path)}: `, ""));
      return Promise.resolve(report);
    }
    report.errors.push(...problems);
    if (layout.fixed) return Promise.resolve(report);
    report.allocated = blockErrors(layout, report.errors, report.leaks);
    report.total = layout.bat.length;
    if (layout.differencing) report.errors.push(...chainErrors(path, layout, read));
    if (report.errors.length > MAX_LISTED) {
      const more = report.errors.length - MAX_LISTED;
      report.errors.splice(MAX_LISTED, more, `… and ${more} more errors`);
    }
    return Promise.resolve(report);
  } catch (e) {
    return Promise.reject(e);
  }
}
