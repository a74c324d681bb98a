/**
 * `tapd daemon`: the control daemon (blktapctrl's heir). Runs every disk in its own tapdisk
 * child, takes `tapd ctl` requests on a 0600 Unix socket, and by default serves the embedded
 * default disk over NBD. SIGTERM/SIGINT: stop accepting, drain and close every disk, exit 0.
 */
import { formatSize, parseCommandLine, parseCount } from "../cli/args.ts";
import { type Command, UsageError } from "../cli/command.ts";
import { createLogger, type Logger } from "../cli/log.ts";
import type { DiskRecord } from "../daemon/control_protocol.ts";
import { ControlServer } from "../daemon/control_server.ts";
import { Daemon } from "../daemon/daemon.ts";
import { defaultControlSocket, ensureDefaultQcow, ensureSocketDir } from "../daemon/paths.ts";
import { NBD_PORT } from "../nbd/address.ts";
import { stateDir } from "./state_dir.ts";

/** How the user runs tapd, for the commands the daemon suggests. */
function tapdCommand(): string {
  if (Deno.build.standalone) return Deno.execPath();
  const launcher = new URL("../tapd", import.meta.url).pathname;
  return launcher === `${Deno.cwd()}/tapd` ? "./tapd" : launcher;
}

function greeting(disk: DiskRecord | null, control: string): string {
  const tapd = tapdCommand();
  const ctl = control === defaultControlSocket()
    ? `${tapd} ctl`
    : `${tapd} ctl --control ${control}`;
  const lines: string[] = [];
  if (disk !== null) {
    const path = disk.spec.replace(/^tap:qcow:/, "");
    const tcp = disk.uris.find((u) => u.startsWith("nbd://")) ?? disk.uris[0];
    const plain = tcp.endsWith("/") ? tcp.slice(0, -1) : tcp;
    lines.push(
      `tapd daemon: serving the default disk, a ${formatSize(disk.size ?? 0)} qcow image (${path})`,
      ...disk.uris.map((u) => `  ${u}`),
      "",
      "Connect to it:",
      `  nbdinfo ${plain}`,
      `  qemu-img info ${plain}`,
      `  qemu-io -f raw -c 'write -P 0xab 0 64k' -c 'read -P 0xab 0 64k' ${plain}`,
    );
  } else {
    lines.push("tapd daemon: no disks yet");
  }
  lines.push(
    "",
    `Manage disks (control socket ${control}):`,
    `  ${ctl} list`,
    `  ${ctl} attach tap:qcow:/path/to/disk.qcow`,
    `  ${ctl} --help`,
    "Stop with Ctrl-C or SIGTERM.",
  );
  return lines.join("\n");
}

/** Refuses to take over the socket of a daemon that is still answering. */
async function checkNotRunning(path: string): Promise<void> {
  let conn: Deno.UnixConn;
  try {
    conn = await Deno.connect({ transport: "unix", path });
  } catch {
    return; // nothing there, or a stale socket file
  }
  conn.close();
  throw new Error(`daemon: another daemon is already running on ${path}`);
}

async function attachDefault(daemon: Daemon, dir: string, port: number, log: Logger) {
  const image = await ensureDefaultQcow(dir);
  Deno.mkdirSync(`${dir}/nbd`, { recursive: true });
  try {
    return (await daemon.attach({
      spec: `tap:qcow:${image}`,
      nbd: [`tcp:127.0.0.1:${port}`, `unix:${dir}/nbd/default.sock`],
      ring: null,
      fuse: null,
      xen: null,
      readOnly: false,
    })).disk;
  } catch (e) {
    log.error("cannot serve the default disk", { error: (e as Error).message });
    throw new Error(
      `daemon: cannot serve the default disk: ${(e as Error).message} ` +
        `(port ${port} busy? use --nbd-port N, or --no-default)`,
    );
  }
}

export const daemonCommand: Command = {
  name: "daemon",
  summary: "the control daemon: serves disks in tapdisk children, managed by tapd ctl",
  usage: `Usage: tapd daemon [--control SOCK] [--state-dir DIR] [--no-default] [--nbd-port N]

Runs in the foreground until SIGTERM or SIGINT. Each disk runs in its own \`tapd tapdisk\`
process (as blktapctrl ran tapdisks); one that dies is reported failed by \`tapd ctl list\` and
the others keep serving. Logs (logfmt, TAPD_LOG_LEVEL=debug|info|warn|error) go to stderr.

With no arguments it serves the default disk, disk 0: a sparse 10 GiB qcow image created once
in the state directory (DIR/default.qcow), over NBD on unix:DIR/nbd/default.sock and
tcp:127.0.0.1:10809, and prints how to connect (nbdinfo nbd://127.0.0.1:10809).

Options:
  --control SOCK    the control socket (default: /run/tapd/control.sock as root, else
                    $XDG_RUNTIME_DIR/tapd/control.sock, else DIR/control.sock); created mode
                    0600, and only the daemon's user (or root) may use it
  --state-dir DIR   default: $TAPD_STATE_DIR, else /var/lib/tapd (root), else
                    ~/.local/state/tapd
  --no-default      start with no disk
  --nbd-port N      the default disk's TCP port (default 10809; 0: any free port)

SIGTERM/SIGINT: stop accepting requests, stop every tapdisk (each finishes its requests in
flight, flushes and closes), remove the sockets, exit 0.`,

  async run(args: string[]): Promise<number> {
    const { values, positionals } = parseCommandLine("daemon", args, {
      control: { type: "string" },
      "state-dir": { type: "string" },
      "no-default": { type: "boolean", default: false },
      "nbd-port": { type: "string" },
    });
    if (positionals.length > 0) {
      throw new UsageError(`daemon: unexpected argument "${positionals[0]}"`);
    }
    const port = values["nbd-port"] === undefined
      ? NBD_PORT
      : parseCount(values["nbd-port"], "--nbd-port", 65535, 0);
    const dir = values["state-dir"] ?? stateDir();
    const given = values.control ?? defaultControlSocket();
    const control = given.startsWith("/") ? given : `${Deno.cwd()}/${given}`;
    const log = createLogger("daemon", { pid: Deno.pid });
    Deno.mkdirSync(dir, { recursive: true });
    ensureSocketDir(control);
    await checkNotRunning(control);

    const daemon = new Daemon(Deno.realPathSync(dir), log);
    let stopRequested!: () => void, stopped = false;
    const stopping = new Promise<void>((resolve) => stopRequested = resolve);
    const onSignal = () => {
      log.info("signal: shutting down");
      stopped = true;
      stopRequested();
    };
    Deno.addSignalListener("SIGTERM", onSignal);
    Deno.addSignalListener("SIGINT", onSignal);
    try {
      const disk = values["no-default"]
        ? null
        : await attachDefault(daemon, daemon.stateDir, port, log);
      if (stopped) {
        await daemon.shutdown();
        return 0;
      }
      const server = new ControlServer(control, (req) => daemon.handle(req), log);
      const serving = server.serve();
      log.info("ready", { control, stateDir: daemon.stateDir });
      console.log(greeting(disk, control));
      await stopping;
      server.stop();
      await daemon.shutdown();
      await serving;
      log.info("stopped");
    } catch (e) {
      await daemon.shutdown();
      throw e;
    } finally {
      Deno.removeSignalListener("SIGTERM", onSignal);
      Deno.removeSignalListener("SIGINT", onSignal);
    }
    return 0;
  },
};
