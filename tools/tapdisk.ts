/**
 * `tapd tapdisk`: one disk's server, as blktap's tapdisk was: opens the disk and serves it on a
 * blkif ring, NBD, a FUSE file and/or to a Xen guest until SIGTERM, then unmounts the file,
 * unplugs the guest's device, finishes the requests in flight, flushes and exits 0. Under the daemon (`--control stdio`) it also takes commands on
 * stdin (daemon/tapdisk_control.ts).
 */
import {
  checkPassthroughAlone,
  parseChoice,
  parseCommandLine,
  parseFuseUring,
  parseIoThreads,
  parsePollMicros,
} from "../cli/args.ts";
import { type Command, UsageError } from "../cli/command.ts";
import { createLogger, type Logger } from "../cli/log.ts";
import { SignalQueue } from "../cli/signals.ts";
import { runStdioControl, sendToDaemon } from "../daemon/tapdisk_control.ts";
import { TapdiskServer } from "../daemon/tapdisk_server.ts";
import { MountError } from "../fuse/export.ts";
import { ENGINE_KINDS } from "../io/engine.ts";
import { parseNbdAddress } from "../nbd/address.ts";
import { parseXenTarget, type XenTarget } from "../daemon/xen_target.ts";

export const tapdiskCommand: Command = {
  name: "tapdisk",
  summary: "serve one disk on a blkif shared ring, NBD, a FUSE file and/or to a Xen guest",
  usage: `Usage: tapd tapdisk SPEC [--ring unix:PATH] [--nbd ADDR …] [--fuse PATH [--passthrough]
                    [--io-threads N] [--fuse-uring]] [--xen DOMID[:VDEV]] [--xenstore PATH]
                    [--read-only] [--export-name NAME] [--engine aio|uring|sync]
                    [--poll-us N] [--no-read-ahead] [--control stdio]

Opens the disk SPEC (tap:TYPE:PATH) and serves it until SIGTERM or SIGINT; give at least one
export:
  --ring unix:PATH   Xen's blkif shared ring: any process attaches by connecting to the Unix
                     socket PATH and receives the ring memory and its event file descriptors
                     (docs/ring.md); each connection is one ring.
  --nbd ADDR         an NBD listener, unix:PATH or tcp:HOST[:PORT] (repeatable); the export is
                     NAME (--export-name, default "") and the default export "".
  --fuse PATH        mount the disk over the existing regular file PATH (docs/fuse.md); with
                     --ring or --nbd too, the file bypasses the page cache. --passthrough:
                     for a raw disk, the kernel reads and writes the image itself (see tapd
                     help serve); pause is refused then (those writes cannot be held).
                     --io-threads N: threads serving a raw disk's reads and writes
                     (default 0: the event loop serves them; see tapd help serve).
                     --fuse-uring: FUSE over io_uring for a raw disk (Linux 6.14+): requests
                     come through io_uring, no system call each (see tapd help serve).
  --xen DOMID[:VDEV] serve the disk to Xen domain DOMID as its device VDEV (default xvda), as
                     \`tapd xen-backend\` does (docs/xen.md); dom0 only. --xenstore PATH (or
                     $TAPD_XENSTORE): xenstored's socket, or the xenbus device if under /dev/.
                     $TAPD_XEN_UNPLUG_TIMEOUT_MS: how long a stop waits for the guest to
                     release the device before disconnecting it (default 10000).
  --poll-us N        look for new requests (ring, FUSE) and for completions instead of
                     sleeping until woken, until N µs pass without a request arriving or
                     completing (default 0: sleep): a CPU for more IOPS and lower latency on a
                     busy disk (docs/performance.md).
  --no-read-ahead    read only what is asked for (by default sequential readers are read
                     ahead of, 4 MiB, from memory; see tapd help serve).
  --control stdio    run under \`tapd daemon\`: JSON-line commands on stdin (pause, resume,
                     stats, stop), replies and a "ready" event on stdout (docs/daemon.md); end
                     of stdin stops the disk, SIGINT is left to the daemon.

SIGTERM: unmount the FUSE file, unplug the Xen device, stop accepting, finish the requests in flight (and any held
by a pause), flush, close, exit 0. While the FUSE file is in use (a loop device, an open
descriptor) it says so and goes on serving until the file is free; SIGTERM again aborts the
mount (its users get I/O errors). A \`stop\` command is refused instead, and the disk serves on.`,

  async run(args: string[]): Promise<number> {
    const { values, positionals } = parseCommandLine("tapdisk", args, {
      ring: { type: "string" },
      nbd: { type: "string", multiple: true },
      fuse: { type: "string" },
      xen: { type: "string" },
      xenstore: { type: "string" },
      "read-only": { type: "boolean", default: false },
      "export-name": { type: "string", default: "" },
      engine: { type: "string" },
      "poll-us": { type: "string" },
      passthrough: { type: "boolean", default: false },
      "io-threads": { type: "string" },
      "fuse-uring": { type: "boolean", default: false },
      "no-read-ahead": { type: "boolean", default: false },
      control: { type: "string" },
    });
    if (positionals.length !== 1) throw new UsageError("tapdisk: expected one disk spec");
    if (
      values.ring !== undefined && (!values.ring.startsWith("unix:") || values.ring.length === 5)
    ) {
      throw new UsageError(`tapdisk: invalid --ring "${values.ring}": expected unix:PATH`);
    }
    const nbd = (values.nbd ?? []).map((a) => parseNbdAddress(a));
    if (values.fuse === "") throw new UsageError("tapdisk: --fuse needs a path");
    if (values.passthrough && values.fuse === undefined) {
      throw new UsageError("tapdisk: --passthrough is an option of --fuse PATH");
    }
    const ioThreads = parseIoThreads(values["io-threads"], values.fuse, "tapdisk");
    const uring = parseFuseUring(values["fuse-uring"], values.fuse, "tapdisk");
    checkPassthroughAlone(values.passthrough, ioThreads, uring, "tapdisk");
    let xen: XenTarget | null = null;
    if (values.xen !== undefined) {
      try {
        xen = parseXenTarget(values.xen);
      } catch (e) {
        throw new UsageError(`tapdisk: --xen: ${(e as Error).message}`);
      }
    }
    if (
      values.ring === undefined && nbd.length === 0 && values.fuse === undefined && xen === null
    ) {
      throw new UsageError(
        "tapdisk: give an export: --ring unix:PATH, --nbd ADDR, --fuse PATH and/or --xen DOMID",
      );
    }
    const xenstore = values.xenstore ?? (Deno.env.get("TAPD_XENSTORE") || undefined);
    const unplugTimeout = Deno.env.get("TAPD_XEN_UNPLUG_TIMEOUT_MS");
    if (unplugTimeout !== undefined && !/^[0-9]{1,7}$/.test(unplugTimeout)) {
      throw new UsageError(
        `tapdisk: TAPD_XEN_UNPLUG_TIMEOUT_MS must be milliseconds, not "${unplugTimeout}"`,
      );
    }
    if (values.control !== undefined && values.control !== "stdio") {
      throw new UsageError(`tapdisk: invalid --control "${values.control}": expected stdio`);
    }
    const controlled = values.control === "stdio";
    const engine = values.engine === undefined
      ? undefined
      : parseChoice(values.engine, "--engine", ENGINE_KINDS);
    const pollMicros = parsePollMicros(values["poll-us"]);
    const exportName = values["export-name"];
    const log = createLogger("tapdisk", {
      pid: Deno.pid,
      disk: exportName === "" ? undefined : exportName,
    });
    const server = new TapdiskServer({
      spec: positionals[0],
      readOnly: values["read-only"],
      engine,
      pollMicros,
      ring: values.ring?.slice(5) ?? null,
      nbd,
      fuse: values.fuse ?? null,
      passthrough: values.passthrough,
      ioThreads,
      uring,
      readAhead: !values["no-read-ahead"],
      xen,
      xenstore,
      xenUnplugTimeoutMs: unplugTimeout === undefined ? undefined : Number(unplugTimeout),
      onExportEnded: controlled
        ? (name, reason) => sendToDaemon({ event: "ended", export: name, reason })
        : undefined,
      exportName,
      log,
    });

    // Under the daemon, SIGINT (a Ctrl-C in its terminal) is left to the daemon.
    const signals = new SignalQueue(controlled ? ["SIGTERM"] : ["SIGTERM", "SIGINT"]);
    const ignore = () => log.info("SIGINT ignored: the daemon stops this disk");
    if (controlled) Deno.addSignalListener("SIGINT", ignore);
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
        await Promise.race([signals.next(), runStdioControl(server, log)]);
      } else {
        for (const uri of serving.uris) console.log(uri);
        for (const e of serving.exports) {
          if (e.startsWith("fuse:")) console.log(e.slice(5));
          if (e.startsWith("xen:")) console.log(e);
        }
        await signals.next();
      }
      log.info("stopping");
      await stop(server, signals, log);
    } finally {
      signals[Symbol.dispose]();
      if (controlled) Deno.removeSignalListener("SIGINT", ignore);
    }
    return 0;
  },
};

/**
 * Stops the server. While its FUSE file is in use, says so and goes on serving until the file
 * is free, or a further signal forces it (the FUSE connection is aborted).
 */
async function stop(server: TapdiskServer, signals: SignalQueue, log: Logger): Promise<void> {
  try {
    await server.stop();
    return;
  } catch (e) {
    if (!(e instanceof MountError)) throw e;
    log.error(`${e.message}; still serving: SIGTERM again aborts the mount`);
  }
  const stopping = server.stop({ graceMs: Infinity });
  const forced = await Promise.race([stopping.then(() => false), signals.next().then(() => true)]);
  if (forced) await server.stop({ force: true });
}
