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

export const DRIVERS: ReadonlyMap<string, Driver> = new Map(
  [aioDriver, syncDriver, ramDriver, qcowDriver].map((d) => [d.type, d]),
);

/** The format of an image file from its first bytes: "qcow", or "raw" for anything else. */
export function probeFormat(path: string): Promise<"qcow" | "raw"> {
  try {
    using file = FileHandle.open(path, O_RDONLY);
    const head = new Uint8Array(8);
    return Promise.resolve(file.readAt(head, 0) === 8 && isQcow(head) ? "qcow" : "raw");
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
      const type = await probeFormat(path) === "qcow" ? "qcow" : "aio";
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
