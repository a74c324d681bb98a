/** `tapd create`: a new, empty image of any supported format, like `qemu-img create`. */
import { parseCommandLine, parseSize } from "../cli/args.ts";
import { type Command, UsageError } from "../cli/command.ts";
import { openDisk } from "../drivers/mod.ts";
import {
  driverType,
  formatNamed,
  IMAGE_FORMATS,
  imageFormat,
  parseCreateOptions,
} from "./formats.ts";
import { resolveBacking } from "./image_probe.ts";
import { checkDestination } from "./output.ts";

export const createCommand: Command = {
  name: "create",
  summary: "create an empty image: raw, qcow, vmdk or vhd (like qemu-img create)",
  usage: `Usage: tapd create -f FMT [-o OPTIONS] [-b BACKING [-F BACKING_FMT]] [-u] [--force]
                   FILE [SIZE]

Creates FILE, an empty image of format FMT (${[...IMAGE_FORMATS.keys()].join(", ")}; vpc is vhd).
SIZE is in bytes or takes a unit (512k, 100M, 10G); with -b it may be left out to take the
backing image's size. OPTIONS are comma-separated key=value pairs, as qemu-img's -o:
  subformat=…      vmdk: monolithicSparse (default), monolithicFlat, twoGbMaxExtentSparse,
                   twoGbMaxExtentFlat, streamOptimized; vhd: dynamic (default), fixed
  cluster_size=…   qcow cluster, vmdk grain or vhd block size
  other keys (adapter_type, compat6, hwversion, …) go to the format.
-b BACKING makes a copy-on-write overlay (qcow, vmdk, vhd): unwritten data reads from it. The
backing image must exist (its format is probed, or given with -F) unless -u is given, in which
case SIZE is required. An existing FILE is refused unless --force.`,

  async run(args: string[]): Promise<number> {
    const { values, positionals } = parseCommandLine("create", args, {
      f: { type: "string", short: "f" },
      o: { type: "string", short: "o", multiple: true },
      b: { type: "string", short: "b" },
      F: { type: "string", short: "F" },
      u: { type: "boolean", short: "u", default: false },
      force: { type: "boolean", default: false },
      q: { type: "boolean", short: "q", default: false },
    });
    if (values.f === undefined) throw new UsageError("create: -f FMT is required");
    const format = formatNamed(values.f, "-f");
    if (positionals.length < 1 || positionals.length > 2) {
      throw new UsageError("create: expected FILE and SIZE");
    }
    const [path, sizeText] = positionals;
    const options = parseCreateOptions(values.o ?? [], parseSize);
    let size = sizeText === undefined ? null : parseSize(sizeText, "size");
    let backingFormat: string | undefined;
    if (values.b !== undefined) {
      if (values.b === "") throw new UsageError("create: empty backing file name");
      const resolved = resolveBacking(path, values.b);
      if (!values.u) {
        backingFormat = await imageFormat(resolved, values.F, "-F");
        // Its size only (an overlay of a running VM's image is the usual snapshot): no lock.
        const parent = await openDisk(`${driverType(backingFormat)}:${resolved}`, {
          readOnly: true,
          forceShare: true,
          direct: "auto",
        });
        size ??= parent.size;
        await parent.close();
      } else if (values.F !== undefined) backingFormat = formatNamed(values.F, "-F").type;
    } else if (values.F !== undefined) throw new UsageError("create: -F needs -b");
    if (size === null) throw new UsageError("create: SIZE is required");
    const existing = checkDestination(path, {
      force: values.force,
      flag: "--force",
      allowDevice: false,
    });
    if (existing !== "none") Deno.removeSync(path);
    try {
      await format.create(path, { size, backing: values.b, backingFormat, ...options });
    } catch (e) {
      try {
        Deno.removeSync(path);
      } catch { /* never created */ }
      throw e;
    }
    if (!values.q) {
      const backing = values.b === undefined ? "" : ` backing_file=${values.b}`;
      console.log(`Formatting '${path}', fmt=${format.type} size=${size}${backing}`);
    }
    return 0;
  },
};
