/**
 * The image files a disk holds: its own image (writable unless read-only) and the qcow backing
 * files below it (read). Two disks of one daemon must not share a file that either of them
 * writes: two tapdisks writing one image (or one writing a parent another reads through) corrupt
 * it. ram disks are left out: their shared memory is meant to be opened by many.
 */
import { parseDiskSpec } from "../drivers/mod.ts";
import { backingChain, probeImage } from "../tools/image_probe.ts";

export interface ImageClaim {
  /** The file's identity: device and inode (a block device: its device number). */
  key: string;
  path: string;
  writable: boolean;
}

function identity(path: string): string | null {
  try {
    const st = Deno.statSync(path);
    return st.isBlockDevice ? `b${st.rdev}` : `${st.dev}:${st.ino}`;
  } catch {
    return null; // the tapdisk will name what is wrong with it
  }
}

/** What the disk of `spec` will hold open. A header that cannot be read claims the image alone. */
export async function imageClaims(spec: string, readOnly: boolean): Promise<ImageClaim[]> {
  const parsed = parseDiskSpec(spec);
  if (parsed.type === "ram") return [];
  const claims: ImageClaim[] = [];
  const add = (path: string, writable: boolean) => {
    const key = identity(path);
    if (key !== null) claims.push({ key, path, writable });
  };
  add(parsed.path, !readOnly && !parsed.readOnly);
  if (parsed.type === "qcow") {
    try {
      for (const layer of await backingChain(await probeImage(parsed.path))) {
        add(layer.filename, false);
      }
    } catch { /* not a readable qcow: the tapdisk reports it */ }
  }
  return claims;
}

/** The first of `theirs` that `mine` cannot share (the same file, written by either), or null. */
export function conflict(mine: ImageClaim[], theirs: ImageClaim[]): ImageClaim | null {
  for (const their of theirs) {
    for (const my of mine) {
      if (my.key === their.key && (my.writable || their.writable)) return their;
    }
  }
  return null;
}
