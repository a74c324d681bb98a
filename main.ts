/** tapd: one program, many subcommands. Errors end in one line on stderr and a non-zero exit. */
import { type Command, UsageError } from "./cli/command.ts";
import { DRIVERS } from "./drivers/mod.ts";
import { benchCommand } from "./tools/bench.ts";
import { checkCommand } from "./tools/check.ts";
import { convertCommand } from "./tools/convert.ts";
import { createCommand } from "./tools/create.ts";
import { ctlCommand } from "./tools/ctl.ts";
import { daemonCommand } from "./tools/daemon.ts";
import { serveCommand } from "./tools/serve.ts";
import { tapdiskCommand } from "./tools/tapdisk.ts";
import { img2qcowCommand } from "./tools/img2qcow.ts";
import { infoCommand } from "./tools/info.ts";
import { qcow2rawCommand } from "./tools/qcow2raw.ts";
import { qcowCreateCommand } from "./tools/qcow_create.ts";
import { xenBackendCommand } from "./tools/xen_backend.ts";

export const VERSION = "0.1.0";

const COMMANDS: readonly Command[] = [
  benchCommand,
  qcowCreateCommand,
  img2qcowCommand,
  qcow2rawCommand,
  infoCommand,
  createCommand,
  convertCommand,
  checkCommand,
  serveCommand,
  daemonCommand,
  ctlCommand,
  tapdiskCommand,
  xenBackendCommand,
];

function overview(): string {
  const width = Math.max(...COMMANDS.map((c) => c.name.length), 7);
  const lines = COMMANDS.map((c) => `  ${c.name.padEnd(width)}  ${c.summary}`);
  return `tapd ${VERSION} — userspace virtual disks: drivers, I/O engines and image tools

Usage: tapd <command> [arguments]

Commands:
${lines.join("\n")}
  ${"help".padEnd(width)}  show a command's usage (tapd help <command>)
  ${"version".padEnd(width)}  print the version

Disk specs: tap:TYPE:PATH or TYPE:PATH, optional ,ro (read-only). Types:
${[...DRIVERS.values()].map((d) => `  ${d.type.padEnd(width)}  ${d.summary}`).join("\n")}`;
}

function find(name: string): Command {
  const c = COMMANDS.find((c) => c.name === name);
  if (c === undefined) throw new UsageError(`Unknown command "${name}": see tapd --help`);
  return c;
}

async function main(args: string[]): Promise<number> {
  const [name, ...rest] = args;
  if (name === undefined || name === "--help" || name === "-h") {
    console.log(overview());
    return 0;
  }
  if (name === "version" || name === "--version") {
    console.log(`tapd ${VERSION} (deno ${Deno.version.deno})`);
    return 0;
  }
  if (name === "help") {
    if (rest.length > 1) throw new UsageError("help: expected at most one command name");
    console.log(rest.length === 0 ? overview() : find(rest[0]).usage);
    return 0;
  }
  const command = find(name);
  if (rest.includes("--help") || rest.includes("-h")) {
    console.log(command.usage);
    return 0;
  }
  return await command.run(rest);
}

if (import.meta.main) {
  let code: number;
  try {
    code = await main(Deno.args);
  } catch (e) {
    const err = e as Error;
    console.error(`tapd: ${err.message}`);
    if (Deno.env.get("TAPD_DEBUG")) console.error(err.stack);
    code = e instanceof UsageError ? 2 : 1;
  }
  Deno.exit(code);
}
