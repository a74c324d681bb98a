/**
 * `tapd tapdisk`: one disk's server, as blktap's tapdisk was: opens the disk and serves it on a
 * blkif ring until SIGTERM/SIGINT, then finishes the requests in flight, flushes and exits 0.
 */
import { openDisk } from "../drivers/mod.ts";
import { ENGINE_KINDS } from "../io/engine.ts";
import { parseChoice, parseCommandLine } from "../cli/args.ts";
import { type Command, UsageError } from "../cli/command.ts";
import { LocalRingListener } from "../ring/local.ts";

export const tapdiskCommand: Command = {
  name: "tapdisk",
  summary: "serve one disk on a blkif shared ring until SIGTERM",
  usage: `Usage: tapd tapdisk SPEC --ring unix:PATH [--read-only] [--engine aio|uring|sync]

Opens the disk SPEC (tap:TYPE:PATH) and serves it on Xen's blkif shared ring. With
--ring unix:PATH, any process attaches by connecting to the Unix socket PATH and receives the
ring memory and its event file descriptors (the protocol is in docs/ring.md); each connection
is one ring, and several frontends may attach at once.

SIGTERM or SIGINT: stop accepting, finish the requests in flight, flush, close, exit 0.`,

  async run(args: string[]): Promise<number> {
    const { values, positionals } = parseCommandLine("tapdisk", args, {
      ring: { type: "string" },
      "read-only": { type: "boolean", default: false },
      engine: { type: "string" },
    });
    if (positionals.length !== 1) throw new UsageError("tapdisk: expected one disk spec");
    if (values.ring === undefined) throw new UsageError("tapdisk: --ring unix:PATH is required");
    if (!values.ring.startsWith("unix:") || values.ring.length === 5) {
      throw new UsageError(`tapdisk: invalid --ring "${values.ring}": expected unix:PATH`);
    }
    const engine = values.engine === undefined
      ? undefined
      : parseChoice(values.engine, "--engine", ENGINE_KINDS);
    const log = (line: string) => console.error(`tapdisk[${Deno.pid}]: ${line}`);
    const disk = await openDisk(positionals[0], { readOnly: values["read-only"], engine });
    try {
      const listener = new LocalRingListener(disk, values.ring.slice(5), log);
      const stop = () => listener.stop();
      Deno.addSignalListener("SIGTERM", stop);
      Deno.addSignalListener("SIGINT", stop);
      log(`serving ${positionals[0]} (${disk.size} bytes) on ${values.ring}`);
      try {
        await listener.serve();
      } finally {
        Deno.removeSignalListener("SIGTERM", stop);
        Deno.removeSignalListener("SIGINT", stop);
      }
      if (!disk.info.readOnly) await disk.flush();
      log("stopped");
    } finally {
      await disk.close();
    }
    return 0;
  },
};
