/**
 * A differencing disk's parent (shared/specs/formats.md §4.9): the candidate paths its locators
 * (W2ru, MacX, W2ku, in that order: relative ones first, so that a chain moved as a whole still
 * opens) and its header's parent name give, the first that exists, and the parent's footer for
 * the unique-id check.
 */
import { dirname, isAbsolute, resolve } from "node:path";
import { FileHandle } from "../../ffi/file.ts";
import { O_RDONLY } from "../../ffi/constants.ts";
import { sameUuid, uuidText } from "./footer.ts";
import { decodeLocator, PLATFORM_MACX, PLATFORM_W2KU, PLATFORM_W2RU } from "./header.ts";
import { type ReadAt, readLayout, type VhdLayout } from "./layout.ts";

const ORDER = [PLATFORM_W2RU, PLATFORM_MACX, PLATFORM_W2KU];
const MAX_LOCATOR = 64 * 1024;

/** The names the image gives its parent, most trusted first (deduplicated, as written). */
export function parentNames(layout: VhdLayout, read: ReadAt): string[] {
  const h = layout.header;
  if (h === null) return [];
  const names: string[] = [];
  const locators = h.locators.filter((l) => ORDER.includes(l.code))
    .sort((a, b) => ORDER.indexOf(a.code) - ORDER.indexOf(b.code));
  for (const l of locators) {
    const length = Math.min(l.length, l.space, MAX_LOCATOR);
    if (!Number.isFinite(l.offset) || l.offset + length > layout.fileSize || length === 0) continue;
    let name = decodeLocator(l.code, read(l.offset, length));
    if (name !== null && l.code === PLATFORM_W2RU) name = name.replace(/^(\.\/)+(?=.)/, "");
    if (name !== null && !names.includes(name)) names.push(name);
  }
  if (h.parentName !== "" && !names.includes(h.parentName)) names.push(h.parentName);
  return names;
}

/** A name as a path: absolute as is, relative to the child's directory (a `./` prefix dropped). */
export function parentPath(childPath: string, name: string): string {
  return isAbsolute(name) ? name : resolve(dirname(childPath), name.replace(/^(\.\/)+/, ""));
}

function exists(path: string): boolean {
  try {
    const st = Deno.statSync(path);
    return st.isFile || st.isBlockDevice === true;
  } catch {
    return false;
  }
}

/** The first candidate that exists, with the name it came from; null when none does. */
export function findParent(
  childPath: string,
  names: string[],
): { name: string; path: string } | null {
  for (const name of names) {
    const path = parentPath(childPath, name);
    if (exists(path)) return { name, path };
  }
  return null;
}

/** A synchronous reader over a file opened without O_DIRECT. */
export function fileReader(file: FileHandle): ReadAt {
  return (offset, length) => {
    const b = new Uint8Array(length);
    if (length > 0) file.readAt(b, offset);
    return b;
  };
}

/** Reads the layout of a VHD file (its metadata only). */
export function layoutOf(path: string): VhdLayout {
  using file = FileHandle.open(path, O_RDONLY);
  return readLayout(path, fileReader(file), file.stat().size);
}

/**
 * Why `parent` is not the parent of `child` (a different unique id, not a VHD), or null.
 * The timestamp is informational (§4.9) and not compared.
 */
export function parentMismatch(child: VhdLayout, parentPath: string): string | null {
  let parent: VhdLayout;
  try {
    parent = layoutOf(parentPath);
  } catch (e) {
    return `its parent ${JSON.stringify(parentPath)} is not a usable VHD: ${(e as Error).message}`;
  }
  const want = child.header!.parentUuid;
  if (!sameUuid(parent.footer.uuid, want)) {
    return `parent ${JSON.stringify(parentPath)} has unique id ${
      uuidText(parent.footer.uuid)
    }, the image expects ${uuidText(want)}`;
  }
  return null;
}
