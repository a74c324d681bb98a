/** The disk types tapd knows, and `openDisk`, the one way to open a disk from a spec. */
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
export async function probeFormat(path: string): Promise<"qcow" | "raw"> {
  using file = await Deno.open(path, { read: true });
  const head = new Uint8Array(8);
  const n = await file.read(head);
  return n === 8 && isQcow(head) ? "qcow" : "raw";
}

/** Backing images are opened read-only, with the engine settings of the image above them. */
function contextFor(options: DiskOptions, depth: number): OpenContext {
  return {
    async openBacking(path: string): Promise<Disk> {
      if (depth >= 64) {
        throw new Error(`backing chain deeper than 64 images at "${path}" (a loop?)`);
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
        contextFor(options, depth + 1),
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
  }, contextFor(options, 0));
  return new Disk(impl, `${s.type}:${s.path}`);
}
