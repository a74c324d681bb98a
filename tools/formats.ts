/**
 * The image formats `tapd create`, `convert` and `check` know, by the names users type
 * (qemu-img's `vpc` is accepted for vhd), and the driver type that opens each.
 */
import { UsageError } from "../cli/command.ts";
import { O_CREAT, O_EXCL, O_WRONLY } from "../ffi/constants.ts";
import { FileHandle } from "../ffi/file.ts";
import type { CheckReport, CreateOptions, ImageFormat } from "../drivers/image_format.ts";
import { probeFormat } from "../drivers/mod.ts";
import { qcowFormat } from "../drivers/qcow/format.ts";
import { vhdFormat } from "../drivers/vhd/format.ts";
import { vmdkFormat } from "../drivers/vmdk/format.ts";

/** A raw image: a sparse file of the virtual size; nothing to check. */
export const rawFormat: ImageFormat = {
  type: "raw",
  create(path: string, options: CreateOptions): Promise<void> {
    try {
      if (options.backing !== undefined) {
        throw new UsageError("create: a raw image cannot have a backing file");
      }
      using file = FileHandle.open(path, O_WRONLY | O_CREAT | O_EXCL, 0o644);
      file.truncate(Math.ceil(options.size / 512) * 512);
      return Promise.resolve();
    } catch (e) {
      return Promise.reject(e);
    }
  },
  check(): Promise<CheckReport> {
    return Promise.resolve({ format: "raw", errors: [], leaks: [] });
  },
};

export const IMAGE_FORMATS: ReadonlyMap<string, ImageFormat> = new Map(
  [rawFormat, qcowFormat, vmdkFormat, vhdFormat].map((f) => [f.type, f]),
);

const ALIASES: Readonly<Record<string, string>> = { vpc: "vhd" };

/** The format named on a command line. */
export function formatNamed(name: string, flag: string): ImageFormat {
  const format = IMAGE_FORMATS.get(ALIASES[name] ?? name);
  if (format === undefined) {
    throw new UsageError(
      `Unknown format "${name}" for ${flag}: expected one of ${
        [...IMAGE_FORMATS.keys()].join(", ")
      }`,
    );
  }
  return format;
}

/** The driver type that opens an image of this format ("aio" for raw). */
export function driverType(format: string): string {
  return format === "raw" ? "aio" : format;
}

/** The format of an existing image: as given (-f), or probed from its bytes. */
export async function imageFormat(
  path: string,
  given: string | undefined,
  flag = "-f",
): Promise<string> {
  if (given !== undefined) return formatNamed(given, flag).type;
  return await probeFormat(path);
}

/** `-o key=value,key=value` into CreateOptions fields (subformat, cluster_size) and the rest. */
export function parseCreateOptions(
  texts: readonly string[],
  parseSize: (text: string, what: string) => number,
): Pick<CreateOptions, "subformat" | "clusterSize" | "extra"> {
  const extra: Record<string, string> = {};
  const out: Pick<CreateOptions, "subformat" | "clusterSize" | "extra"> = { extra };
  for (const text of texts) {
    for (const item of text.split(",")) {
      if (item === "") continue;
      const eq = item.indexOf("=");
      const key = eq < 0 ? item : item.slice(0, eq);
      const value = eq < 0 ? "on" : item.slice(eq + 1);
      if (key === "subformat") out.subformat = value;
      else if (key === "cluster_size" || key === "block_size" || key === "grain_size") {
        out.clusterSize = parseSize(value, `-o ${key}`);
      } else extra[key] = value;
    }
  }
  return out;
}
