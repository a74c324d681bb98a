/**
 * Disk specs, as blktap wrote them: `tap:TYPE:PATH` or `TYPE:PATH`, with optional suffixes
 * `,ro` (read-only) and, for ram, `,persist`. A bare path (no colon) means `aio:PATH`.
 */

export interface DiskSpec {
  type: string;
  path: string;
  readOnly: boolean;
  persist: boolean;
}

export class SpecError extends Error {
  override name = "SpecError";
}

const SUFFIXES = new Set(["ro", "rw", "persist"]);

/** Parses a disk spec; `known` lists the accepted types for the error message. */
export function parseSpec(text: string, known: readonly string[]): DiskSpec {
  let rest = text;
  let readOnly = false, persist = false;
  for (;;) {
    const comma = rest.lastIndexOf(",");
    if (comma < 0 || !SUFFIXES.has(rest.slice(comma + 1))) break;
    const suffix = rest.slice(comma + 1);
    if (suffix === "ro") readOnly = true;
    if (suffix === "persist") persist = true;
    rest = rest.slice(0, comma);
  }
  if (rest.startsWith("tap:")) rest = rest.slice(4);
  const colon = rest.indexOf(":");
  if (colon < 0) {
    if (rest === "") {
      throw new SpecError(`Empty disk spec: expected TYPE:PATH, e.g. "tap:aio:/var/lib/disk.img"`);
    }
    if (known.includes(rest)) {
      throw new SpecError(`Missing path in disk spec "${text}": expected ${rest}:PATH`);
    }
    return { type: "aio", path: rest, readOnly, persist };
  }
  const type = rest.slice(0, colon), path = rest.slice(colon + 1);
  if (!known.includes(type)) {
    throw new SpecError(
      `Unknown disk type "${type}" in "${text}": known types are ${known.join(", ")}`,
    );
  }
  if (path === "") {
    throw new SpecError(`Missing path in disk spec "${text}": expected ${type}:PATH`);
  }
  return { type, path, readOnly, persist };
}
