/**
 * `tapd tapdisk`: one disk's server, as blktap's tapdisk was: opens the disk and serves it on a
 * blkif ring and/or NBD until SIGTERM, then finishes the requests in flight, flushes and exits 0.
 * Under the daemon (`--control stdio`) it also takes commands on stdin (daemon/tapdisk_control.ts).
 */
import { parseChoice, parseCommandLine } from "../cli/args.ts";
import { type Command, UsageError } from "../cli/command.ts";
import { createLogger } from "../cli/log.ts";
import { runStdioControl, sendToDaemon } from "../daemon/tapdisk_control.ts";
import { TapdiskServer } from "../daemon/tapdisk_server.ts";
import { ENGINE_KINDS } from "../io/engine.ts";
import { parseNbdAddress } from "../nbd/address.ts";

export const tapdiskCommand: Command = {
  name: "tapdisk",
  summary: "serve one disk on a blkif shared ring and/or NBD until SIGTERM",
  usage: `Usage: tapd tapdisk SPEC [--ring unix:PATH] [--nbd ADDR …] [--read-only]
                    [--export-name NAME] [--engine aio|uring|sync] [--control stdio]

Opens the disk SPEC (tap:TYPE:PATH) and serves it until SIGTERM or SIGINT; give at least one
export:
  --ring unix:PATH   Xen's blkif shared ring: any process attaches by connecting to the Unix
                     socket PATH and receives the ring memory and its event file descriptors
                     (docs/ring.md); each connection is one ring.
  --nbd ADDR         an NBD listener, unix:PATH or tcp:HOST[:PORT] (repeatable); the export is
                     NAME (--export-name, default "") and the default export "".
  --control stdio    run under \`tapd daemon\`: JSON-line commands on stdin (pause, resume,
                     stats, stop), replies and a "ready" event on stdout (docs/daemon.md); end
                     of stdin stops the disk, SIGINT is left to the daemon.

SIGTERM: stop accepting, finish the requests in flight (and any held by a pause), flush,
close, exit 0.`,

  async run(args: string[]): Promise<number> {
    const { values, positionals } = parseCommandLine("tapdisk", args, {
      ring: { type: "string" },
      nbd: { type: "string", multiple: true },
      "read-only": { type: "boolean", default: false },
      "export-name": { type: "string", default: "" },
      engine: { type: "string" },
      control: { type: "string" },
    });
    if (positionals.length !== 1) throw new UsageError("tapdisk: expected one disk spec");
    if (
      values.ring !== undefined && (!values.ring.startsWith("unix:") || values.ring.length === 5)
    ) {
      throw new UsageError(`tapdisk: invalid --ring "${values.ring}": expected unix:PATH`);
    }
    const nbd = (values.nbd ?? []).map((a) => parseNbdAddress(a));
    if (values.ring === undefined && nbd.length === 0) {
      throw new UsageError("tapdisk: give an export: --ring unix:PATH and/or --nbd ADDR");
    }
    if (values.control !== undefined && values.control !== "stdio") {
      throw new UsageError(`tapdisk: invalid --control "${values.control}": expected stdio`);
    }
    const controlled = values.control === "stdio";
    const engine = values.engine === undefined
      ? undefined
      : parseChoice(values.engine, "--engine", ENGINE_KINDS);
    const exportName = values["export-name"];
    const log = createLogger("tapdisk", {
      pid: Deno.pid,
      disk: exportName === "" ? undefined : exportName,
    });
    const server = new TapdiskServer({
      spec: positionals[0],
      readOnly: values["read-only"],
      engine,
      ring: values.ring?.slice(5) ?? null,
      nbd,
      exportName,
      log,
    });

    let stopSignal!: () => void;
    const signalled = new Promise<void>((resolve) => stopSignal = resolve);
    const ignore = () => log.info("SIGINT ignored: the daemon stops this disk");
    const onInt = controlled ? ignore : stopSignal;
    Deno.addSignalListener("SIGTERM", stopSignal);
    Deno.addSignalListener("SIGINT", onInt);
    try {
      let serving;
      try {
        serving = await server.start();
      } catch (e) {
        if (!controlled) throw e;
        sendToDaemon({ event: "error", error: (e as Error).message.split("\n")[0] });
        log.error("could not start", { error: (e as Error).message });
        return 1;
      }
      if (controlled) {
        sendToDaemon({ event: "ready", ...serving });
        await Promise.race([signalled, runStdioControl(server, log)]);
      } else {
        for (const uri of serving.uris) console.log(uri);
        await signalled;
      }
      log.info("stopping");
      await server.stop();
    } finally {
      Deno.removeSignalListener("SIGTERM", stopSignal);
      Deno.removeSignalListener("SIGINT", onInt);
    }
    return 0;
  },
};
