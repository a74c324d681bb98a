/**
 * The image files a disk holds: its own image (writable unless read-only) and the backing files
 * below it (read). Two disks of one daemon must not share a file that either of them writes: two
 * tapdisks writing one image (or one writing a parent another reads through) corrupt it. ram
 * disks of one file share one memory object, so they may share with each other; a ram disk reads
 * its file when it loads and, with `persist`, writes it back.
 */
import { parseDiskSpec } from "../drivers/mod.ts";
import { backingChain, probeImage } from "../tools/image_probe.ts";

export interface ImageClaim {
  /** The file's identity: device and inode (a block device: its device number). */
  key: string;
  path: string;
  writable: boolean;
  /** A ram disk's: other ram disks of the file share its memory, so they may share it. */
  ram: boolean;
}

function identity(path: string): string | null {
  try {
    const st = Deno.statSync(path);
    return st.isBlockDevice ? `b${st.rdev}` : `${st.dev}:${st.ino}`;
  } catch {
    return null; // the tapdisk will name what is wrong with it
  }
}

/** Types whose image is the disk itself, with no backing file to follow. */
const FLAT = new Set(["aio", "sync", "ram"]);

/** What the disk of `spec` will hold open. A header that cannot be read claims the image alone. */
export async function imageClaims(spec: string, readOnly: boolean): Promise<ImageClaim[]> {
  const parsed = parseDiskSpec(spec);
  const ram = parsed.type === "ram";
  const claims: ImageClaim[] = [];
  const add = (path: string, writable: boolean) => {
    const key = identity(path);
    if (key !== null) claims.push({ key, path, writable, ram });
  };
  const ro = readOnly || parsed.readOnly;
  add(parsed.path, ram ? parsed.persist && !ro : !ro);
  if (!FLAT.has(parsed.type)) {
    try {
      for (const layer of await backingChain(await probeImage(parsed.path))) {
        add(layer.filename, false);
      }
    } catch { /* an image that cannot be read: the tapdisk reports it */ }
  }
  return claims;
}

/** A file that two disks' claims cannot share: theirs, and the same file as `mine` names it. */
export interface Conflict {
  mine: ImageClaim;
  theirs: ImageClaim;
}

/** The first file of `theirs` that `mine` cannot share (written by either), or null. */
export function conflict(mine: ImageClaim[], theirs: ImageClaim[]): Conflict | null {
  for (const t of theirs) {
    for (const m of mine) {
      if (m.key !== t.key || (m.ram && t.ram)) continue;
      if (m.writable || t.writable) return { mine: m, theirs: t };
    }
  }
  return null;
}
