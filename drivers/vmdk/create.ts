/**
 * `tapd create -f vmdk`: new images laid out as `qemu-img create -f vmdk` makes them, for every
 * subformat QEMU writes (formats.md §3.10), with options `adapter_type`, `hwversion`, `compat6`,
 * `toolsversion`, `zeroed_grain`, a grain size, and a VMDK parent (delta link).
 */
import { basename, dirname, extname, isAbsolute, join, resolve } from "node:path";
import type { CreateOptions } from "../image_format.ts";
import { descriptorText, NO_PARENT, randomCid } from "./descriptor.ts";
import { readVmdkMeta, virtualSize } from "./image.ts";
import { DEFAULT_GRAIN_SECTORS, sparseLayout } from "./layout.ts";
import { SECTOR } from "./header.ts";

export const SUBFORMATS = [
  "monolithicSparse",
  "monolithicFlat",
  "twoGbMaxExtentSparse",
  "twoGbMaxExtentFlat",
  "streamOptimized",
] as const;
export type Subformat = typeof SUBFORMATS[number];

const ADAPTERS = ["ide", "buslogic", "lsilogic", "legacyESX"];
const OPTIONS = ["adapter_type", "hwversion", "compat6", "toolsversion", "zeroed_grain"];
/** QEMU's split size: 2 GiB per extent. */
const SPLIT_BYTES = 0x80000000;

const isOn = (v: string | undefined) => v !== undefined && /^(on|true|yes|1)$/i.test(v);

interface Plan {
  subformat: Subformat;
  grainSectors: number;
  adapterType: string;
  hwVersion: string;
  toolsVersion: string;
  zeroedGrain: boolean;
}

function plan(o: CreateOptions): Plan {
  const extra = o.extra ?? {};
  for (const k of Object.keys(extra)) {
    if (!OPTIONS.includes(k)) throw new RangeError(`vmdk: unknown option '${k}'`);
  }
  const subformat = (o.subformat ?? "monolithicSparse") as Subformat;
  if (!SUBFORMATS.includes(subformat)) {
    throw new RangeError(`vmdk: unknown subformat '${o.subformat}' (${SUBFORMATS.join(", ")})`);
  }
  const adapterType = extra.adapter_type ?? "ide";
  if (!ADAPTERS.includes(adapterType)) {
    throw new RangeError(`vmdk: unknown adapter_type '${adapterType}' (${ADAPTERS.join(", ")})`);
  }
  let hwVersion = extra.hwversion ?? "4";
  if (isOn(extra.compat6)) {
    if (extra.hwversion !== undefined && extra.hwversion !== "6") {
      throw new RangeError("vmdk: compat6 cannot be combined with another hwversion");
    }
    hwVersion = "6";
  }
  if (!/^\d{1,5}$/.test(hwVersion)) throw new RangeError(`vmdk: bad hwversion '${hwVersion}'`);
  const toolsVersion = extra.toolsversion ?? "2147483647";
  if (!/^\d{1,10}$/.test(toolsVersion)) {
    throw new RangeError(`vmdk: bad toolsversion '${toolsVersion}'`);
  }
  let grainSectors = DEFAULT_GRAIN_SECTORS;
  if (o.clusterSize !== undefined) {
    const cs = o.clusterSize;
    if (!Number.isSafeInteger(cs) || cs < 4096 || cs > 16 * 1024 * 1024 || (cs & (cs - 1)) !== 0) {
      throw new RangeError(`vmdk: grain size ${cs} is not a power of two from 4 KiB to 16 MiB`);
    }
    grainSectors = cs / SECTOR;
  }
  const zeroedGrain = isOn(extra.zeroed_grain);
  if (o.backing !== undefined && !subformat.endsWith("Sparse")) {
    throw new RangeError(`vmdk: a ${subformat} image cannot have a parent (backing file)`);
  }
  if (o.backingFormat !== undefined && o.backingFormat !== "vmdk") {
    throw new RangeError(`vmdk: the parent must be a VMDK image, not ${o.backingFormat}`);
  }
  return { subformat, grainSectors, adapterType, hwVersion, toolsVersion, zeroedGrain };
}

/** Creates `path`, failing if it exists; writes `chunks` and sets the length. */
async function writeNew(
  path: string,
  size: number,
  chunks: { offset: number; bytes: Uint8Array }[],
): Promise<void> {
  using f = await Deno.open(path, { write: true, createNew: true });
  await f.truncate(size);
  for (const c of chunks) {
    await f.seek(c.offset, Deno.SeekMode.Start);
    let done = 0;
    while (done < c.bytes.length) done += await f.write(c.bytes.subarray(done));
  }
  await f.syncData();
}

function exists(path: string): boolean {
  try {
    Deno.lstatSync(path);
    return true;
  } catch {
    return false;
  }
}

/** Creates a VMDK image (and its extent files), like `qemu-img create -f vmdk`. */
export async function createVmdk(path: string, o: CreateOptions): Promise<void> {
  const p = plan(o);
  let parentCid = NO_PARENT, requested = o.size;
  if (o.backing !== undefined) {
    const parentPath = isAbsolute(o.backing) ? o.backing : resolve(dirname(path), o.backing);
    const parent = readVmdkMeta(parentPath);
    parentCid = parent.descriptor.cid;
    if (!(requested > 0)) requested = virtualSize(parent); // like qemu-img: the parent's size
  }
  if (!Number.isSafeInteger(requested) || requested <= 0) {
    throw new RangeError(`vmdk: bad size ${o.size}`);
  }
  const size = Math.ceil(requested / SECTOR) * SECTOR, sectors = size / SECTOR;
  const ext = extname(path), prefix = basename(path, ext), dir = dirname(path);
  const extents: { sectors: number; type: "SPARSE" | "FLAT"; file: string }[] = [];
  const sparse = p.subformat.endsWith("Sparse") || p.subformat === "streamOptimized";
  const type = sparse ? "SPARSE" : "FLAT";
  if (p.subformat.startsWith("monolithic") || p.subformat === "streamOptimized") {
    const file = p.subformat === "monolithicFlat" ? `${prefix}-flat${ext}` : basename(path);
    extents.push({ sectors, type, file });
  } else {
    const letter = sparse ? "s" : "f";
    for (let i = 0, left = size; left > 0; i++, left -= SPLIT_BYTES) {
      const n = String(i + 1).padStart(3, "0");
      extents.push({
        sectors: Math.min(left, SPLIT_BYTES) / SECTOR,
        type,
        file: `${prefix}-${letter}${n}${ext}`,
      });
    }
  }
  const text = descriptorText({
    cid: randomCid(8),
    parentCid,
    createType: p.subformat,
    parentFileNameHint: o.backing,
    extents,
    hwVersion: p.hwVersion,
    adapterType: p.adapterType,
    toolsVersion: p.toolsVersion,
    size,
  });
  const embedded = extents.length === 1 && extents[0].file === basename(path);
  const files = [path, ...(embedded ? [] : extents.map((e) => join(dir, e.file)))];
  for (const f of files) {
    if (exists(f)) throw new Deno.errors.AlreadyExists(`vmdk: ${f} already exists`);
  }
  const made: string[] = [];
  try {
    for (const e of extents) {
      const file = join(dir, e.file);
      made.push(file);
      if (e.type === "FLAT") await writeNew(file, e.sectors * SECTOR, []);
      else {
        const layout = sparseLayout({
          capacity: e.sectors,
          grainSectors: p.grainSectors,
          zeroedGrain: p.zeroedGrain,
          compressed: p.subformat === "streamOptimized",
        }, embedded ? text : null);
        await writeNew(file, layout.fileSize, layout.chunks);
      }
    }
    if (!embedded) {
      made.push(path);
      const bytes = new TextEncoder().encode(text);
      await writeNew(path, bytes.length, [{ offset: 0, bytes }]);
    }
  } catch (e) {
    for (const f of made) await Deno.remove(f).catch(() => {});
    throw e;
  }
}
