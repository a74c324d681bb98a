/** `tapd check`: consistency of an image's metadata, with qemu-img check's exit codes. */
import { parseChoice, parseCommandLine } from "../cli/args.ts";
import { type Command, UsageError } from "../cli/command.ts";
import { checkExitCode } from "../drivers/image_format.ts";
import { formatNamed, imageFormat } from "./formats.ts";
import { lockImagePath } from "../drivers/image_lock.ts";

export const checkCommand: Command = {
  name: "check",
  summary: "check an image's metadata for corruption and leaks (like qemu-img check)",
  usage: `Usage: tapd check [-f FMT] [--output=human|json] [-U] IMAGE

Reads every table of IMAGE (format probed, or given with -f) without changing it: entries
outside the file, two entries on one cluster, bad checksums, broken descriptors, missing
parents. Exit status as qemu-img check: 0 no errors, 2 corruption, 3 only leaked clusters
(allocated but unused: harmless), 1 the image could not be checked at all, 63 the format has
nothing to check (raw). An image another process writes (a VM, qemu-nbd, a tapd disk: QEMU's
image locks) is refused, since its tables change while they are read; -U (--force-share)
checks it anyway, like qemu-img check -U.`,

  async run(args: string[]): Promise<number> {
    const { values, positionals } = parseCommandLine("check", args, {
      f: { type: "string", short: "f" },
      output: { type: "string", default: "human" },
      "force-share": { type: "boolean", short: "U", default: false },
    });
    if (positionals.length !== 1) throw new UsageError("check: expected one IMAGE");
    const output = parseChoice(values.output, "--output", ["human", "json"] as const);
    const path = positionals[0];
    const type = await imageFormat(path, values.f);
    const format = formatNamed(type, "-f");
    if (type === "raw") {
      if (output === "json") {
        console.log(JSON.stringify({ filename: path, format: "raw", supported: false }));
      } else console.log(`tapd: check: "${path}" is a raw image: there is nothing to check`);
      return 63;
    }
    using _locks = lockImagePath(path, { readOnly: true, forceShare: values["force-share"] });
    const report = await format.check(path);
    const code = checkExitCode(report);
    if (output === "json") {
      console.log(JSON.stringify(
        {
          filename: path,
          format: report.format,
          "check-errors": report.errors.length,
          "leaks": report.leaks.length,
          errors: report.errors,
          leakDetails: report.leaks,
          "allocated-clusters": report.allocated,
          "total-clusters": report.total,
        },
        null,
        2,
      ));
      return code;
    }
    for (const e of report.errors) console.log(`ERROR ${e}`);
    for (const l of report.leaks) console.log(`Leaked: ${l}`);
    if (code === 0) console.log("No errors were found on the image.");
    else if (code === 3) console.log("Only leaks were found on the image; no corruption.");
    else console.log(`${report.errors.length} errors were found on the image.`);
    if (report.allocated !== undefined && report.total !== undefined && report.total > 0) {
      const pct = (100 * report.allocated / report.total).toFixed(2);
      console.log(`${report.allocated}/${report.total} = ${pct}% allocated`);
    }
    return code;
  },
};
