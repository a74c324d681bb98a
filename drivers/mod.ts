/** The disk types tapd knows, and `openDisk`, the one way to open a disk from a spec. */
import { Disk } from "./disk.ts";
import type { DiskOptions, Driver } from "./driver.ts";
import { ramDriver } from "./ram.ts";
import { aioDriver, syncDriver } from "./raw.ts";
import { type DiskSpec, parseSpec } from "./spec.ts";

export const DRIVERS: ReadonlyMap<string, Driver> = new Map(
  [aioDriver, syncDriver, ramDriver].map((d) => [d.type, d]),
);

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
  });
  return new Disk(impl, `${s.type}:${s.path}`);
}
