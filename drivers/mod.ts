/** The disk types tapd knows, and `openDisk`, the one way to open a disk from a spec. */
import { FileHandle } from "../ffi/file.ts";
import { O_RDONLY } from "../ffi/constants.ts";
import { Disk } from "./disk.ts";
import type { DiskOptions, Driver, OpenContext } from "./driver.ts";
import { isQcow } from "./qcow/header.ts";
import { qcowDriver } from "./qcow/qcow.ts";
import { ramDriver } from "./ram.ts";
import { aioDriver, syncDriver } from "./raw.ts";
import { type DiskSpec, parseSpec } from "./spec.ts";
import { isVhd, vhdDriver } from "./vhd/format.ts";
import { isVmdk } from "./vmdk/image.ts";
import { vmdkDriver } from "./vmdk/vmdk.ts";

export const DRIVERS: ReadonlyMap<string, Driver> = new Map(
  [aioDriver, syncDriver, ramDriver, qcowDriver, vmdkDriver, vhdDriver].map((d) => [d.type, d]),
);

/**
 * How an image format is recognised: from the file's first PROBE_HEAD bytes (fewer if the file
 * is shorter) and its last 512 (a fixed VHD has its footer only at the end).
 */
export interface FormatProbe {
  /** The driver type that opens it. */
  type: string;
  matches(head: Uint8Array, tail: Uint8Array): boolean;
}

export const PROBE_HEAD = 1024;

/** Image formats recognised from their bytes, in order; anything else is raw. */
export const FORMAT_PROBES: readonly FormatProbe[] = [
  { type: "qcow", matches: (head) => isQcow(head) },
  { type: "vmdk", matches: (head) => isVmdk(head) },
  { type: "vhd", matches: (head, tail) => isVhd(head, tail) },
];

/** The driver type for an image file, from its bytes: a format's type, or "raw". */
export function probeFormat(path: string): Promise<string> {
  try {
    using file = FileHandle.open(path, O_RDONLY);
    const st = file.stat();
    const size = st.isBlockDevice ? file.blockDeviceSize() : st.size;
    const head = new Uint8Array(Math.min(PROBE_HEAD, size));
    const got = file.readAt(head, 0);
    const tail = new Uint8Array(Math.min(512, size));
    file.readAt(tail, size - tail.length);
    const probe = FORMAT_PROBES.find((p) => p.matches(head.subarray(0, got), tail));
    return Promise.resolve(probe?.type ?? "raw");
  } catch (e) {
    return Promise.reject(e);
  }
}

function realPath(path: string): string {
  try {
    return Deno.realPathSync(path);
  } catch {
    return path;
  }
}

/**
 * Backing images are opened read-only, with the engine settings of the image above them.
 * `chain` holds the real paths of the images above, to refuse loops and absurd depths.
 */
function contextFor(options: DiskOptions, chain: readonly string[]): OpenContext {
  return {
    async openBacking(path: string): Promise<Disk> {
      const real = realPath(path);
      if (chain.includes(real)) {
        throw new Error(`backing file loop: ${JSON.stringify(path)} is its own ancestor`);
      }
      if (chain.length >= 64) {
        throw new Error(`backing chain deeper than 64 images at ${JSON.stringify(path)}`);
      }
      const format = await probeFormat(path);
      const type = format === "raw" ? "aio" : format;
      const backingOptions: DiskOptions = {
        ...options,
        readOnly: true,
        persist: false,
        direct: options.direct ?? "auto",
      };
      const impl = await DRIVERS.get(type)!.open(
        path,
        backingOptions,
        contextFor(options, [...chain, real]),
      );
      return new Disk(impl, `${type}:${path}`);
    },
  };
}

/** Parses `tap:TYPE:PATH[,ro]` against the known types. */
export function parseDiskSpec(text: string): DiskSpec {
  return parseSpec(text, [...DRIVERS.keys()]);
}

/**
 * A warning for a raw spec (`tap:aio:`, `tap:sync:`) opened writable over a file that holds an
 * image format's header: the guest's first write there destroys the image's metadata, which is
 * almost never what was meant (`tap:qcow:` was). Null when the spec is not raw, is read-only, or
 * the file reads as raw. The open goes ahead either way: the spec says raw, as QEMU's
 * `format=raw` does.
 */
export async function rawOverImage(
  spec: string | DiskSpec,
  options: DiskOptions = {},
): Promise<string | null> {
  const s = typeof spec === "string" ? parseDiskSpec(spec) : spec;
  if ((s.type !== "aio" && s.type !== "sync") || s.readOnly || options.readOnly) return null;
  let format: string;
  try {
    format = await probeFormat(s.path);
  } catch {
    return null; // the open itself reports what is wrong with the file
  }
  if (format === "raw") return null;
  return `"${s.path}" holds a ${format} image, served as raw by tap:${s.type}: writes will ` +
    `overwrite its metadata (tap:${format}:${s.path} serves the image; add ,ro to only look)`;
}

/** Opens a disk from a spec; options override nothing the spec says except to add read-only. */
export async function openDisk(spec: string | DiskSpec, options: DiskOptions = {}): Promise<Disk> {
  const s = typeof spec === "string" ? parseDiskSpec(spec) : spec;
  const driver = DRIVERS.get(s.type)!;
  const impl = await driver.open(s.path, {
    ...options,
    readOnly: s.readOnly || (options.readOnly ?? false),
    persist: s.persist || (options.persist ?? false),
  }, contextFor(options, [realPath(s.path)]));
  return new Disk(impl, `${s.type}:${s.path}`);
}
