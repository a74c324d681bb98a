/**
 * `vhd`: Microsoft's Virtual Hard Disk (QEMU's `vpc`) — fixed, dynamic and differencing disks.
 * The metadata is read and checked at open (drivers/vhd/layout.ts); a differencing disk's parent
 * is found from its locators, checked against the parent unique id, and opened through the
 * registry (any depth). Format: shared/specs/formats.md §4.
 */
import { FileHandle } from "../../ffi/file.ts";
import { O_RDONLY } from "../../ffi/constants.ts";
import type { IoEngine } from "../../io/engine.ts";
import { createEngine } from "../../io/mod.ts";
import type { Disk } from "../disk.ts";
import type { DiskImpl, DiskOptions, Driver, OpenContext } from "../driver.ts";
import { backingError, ImageError } from "../errors.ts";
import { openImageFile } from "../raw.ts";
import { DynamicVhdDisk } from "./dynamic.ts";
import { FixedVhdDisk } from "./fixed.ts";
import { readLayout, type VhdLayout } from "./layout.ts";
import { fileReader, findParent, parentMismatch, parentNames } from "./parent.ts";

/** The metadata, read with buffered I/O; and the names the image gives its parent. */
function readMetadata(path: string): { layout: VhdLayout; names: string[] } {
  using meta = FileHandle.open(path, O_RDONLY);
  const st = meta.stat();
  const size = st.isBlockDevice ? meta.blockDeviceSize() : st.size;
  const read = fileReader(meta);
  const layout = readLayout(path, read, size);
  return { layout, names: layout.differencing ? parentNames(layout, read) : [] };
}

/** Finds, checks and opens a differencing disk's parent. */
async function openParent(
  path: string,
  layout: VhdLayout,
  names: string[],
  ctx: OpenContext,
): Promise<{ parent: Disk; name: string }> {
  if (names.length === 0) {
    throw new ImageError(path, "differencing VHD names no parent (no locator, no parent name)");
  }
  const found = findParent(path, names);
  if (found === null) {
    const tried = names.map((n) => JSON.stringify(n)).join(", ");
    throw new ImageError(path, `parent VHD not found (tried ${tried})`.slice(0, 800));
  }
  const why = parentMismatch(layout, found.path);
  if (why !== null) throw new ImageError(path, why.replace(/\n/g, " ").slice(0, 800));
  try {
    return { parent: await ctx.openBacking(found.path), name: found.name };
  } catch (e) {
    throw backingError(path, `its parent ${JSON.stringify(found.name)}`, e);
  }
}

async function openVhd(path: string, options: DiskOptions, ctx: OpenContext): Promise<DiskImpl> {
  const readOnly = options.readOnly ?? false;
  // Locked first: metadata another process is writing is not read (its lock's line instead).
  const file = openImageFile(path, options, options.direct !== "off", "grows");
  let engine: IoEngine | undefined;
  let parent: Disk | null = null;
  try {
    const { layout, names } = readMetadata(path);
    engine = createEngine(options.engine ?? "aio", {
      depth: options.depth,
      batch: options.batch,
      coalesceAbove: options.coalesceAbove,
      pollMicros: options.pollMicros,
    });
    if (layout.fixed) return new FixedVhdDisk(file, engine, layout.size, readOnly);
    let parentName: string | null = null;
    if (layout.differencing) {
      const p = await openParent(path, layout, names, ctx);
      parent = p.parent;
      parentName = p.name;
    }
    return new DynamicVhdDisk(path, file, engine, layout, parent, parentName, readOnly);
  } catch (e) {
    await engine?.close();
    await parent?.close();
    file.close();
    throw e;
  }
}

export const vhdDriver: Driver = {
  type: "vhd",
  summary: "Microsoft VHD (QEMU vpc): fixed, dynamic, differencing over a VHD parent chain",
  open: openVhd,
};
