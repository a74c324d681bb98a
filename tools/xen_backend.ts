/**
 * `tapd xen-backend`: serves one disk to a Xen guest as its block device, from dom0, with no
 * kernel blkback: xenstore directly, gntdev for the ring, evtchn for kicks, grant copy for data
 * (docs/xen.md). SIGTERM/SIGINT unplug the device (the guest is asked to let go) and exit.
 */
import { parseChoice, parseCommandLine, parsePollMicros } from "../cli/args.ts";
import { type Command, UsageError } from "../cli/command.ts";
import { createLogger } from "../cli/log.ts";
import { SignalQueue } from "../cli/signals.ts";
import { openDisk, rawOverImage } from "../drivers/mod.ts";
import { ENGINE_KINDS, RING_ENGINE } from "../io/engine.ts";
import { DATA_PATHS } from "../xen/kernel.ts";
import { serveXenVbd } from "../xen/serve.ts";
import { parseVdev } from "../xen/vbd_paths.ts";

export const xenBackendCommand: Command = {
  name: "xen-backend",
  summary: "serve one disk to a Xen guest as /dev/xvdX from dom0 (userspace blkback)",
  usage: `Usage: tapd xen-backend SPEC --domid D [--vdev NAME] [--read-only] [--adopt]
                        [--engine aio|uring|sync] [--xenstore PATH] [--unplug-timeout S]
                        [--data copy|map] [--poll-us N]

Serves the disk SPEC (tap:TYPE:PATH) to Xen domain D as its block device NAME (default
xvda; also xvdb…, hdX, sdX or a numeric devid). Run it in dom0 as root, with the xen-evtchn and
xen-gntdev modules loaded and xenstored running. tapd creates the device's xenstore nodes
(backend kind vbd3, so dom0's kernel blkback never takes it), and the guest's blkfront
hot-plugs the disk. --adopt serves nodes a toolstack already made instead.

The guest may close and reopen the device (module reload, kexec): tapd stays. It exits when the
guest's domain is destroyed, or on SIGTERM/SIGINT: then the device is unplugged (online=0;
the guest releases it), requests in flight finish, and the disk is flushed and closed. If the
guest keeps the disk busy past --unplug-timeout seconds (10), tapd disconnects anyway.

--data: how data moves between the guest's pages and the disk: \`copy\` (default; grant copy
into pooled buffers, nothing of the guest stays mapped) or \`map\` (each request's pages are
mapped for its duration and the disk reads or writes them directly); see docs/xen.md.

--poll-us N: look at the rings and for completions instead of sleeping until woken, until N µs
pass without a request arriving or completing (default 0), as \`tapd tapdisk --poll-us\`.

Examples:
  tapd xen-backend tap:qcow:/var/lib/vm/guest.qcow --domid 3 --vdev xvdb
  tapd xen-backend aio:/dev/vg0/guest,ro --domid 3 --read-only`,

  async run(args: string[]): Promise<number> {
    const { values, positionals } = parseCommandLine("xen-backend", args, {
      domid: { type: "string" },
      vdev: { type: "string", default: "xvda" },
      "read-only": { type: "boolean", default: false },
      adopt: { type: "boolean", default: false },
      engine: { type: "string" },
      xenstore: { type: "string" },
      "unplug-timeout": { type: "string", default: "10" },
      data: { type: "string", default: "copy" },
      "poll-us": { type: "string" },
    });
    if (positionals.length !== 1) throw new UsageError("xen-backend: expected one disk spec");
    const domidText = values.domid;
    if (domidText === undefined) throw new UsageError("xen-backend: --domid is required");
    if (!/^[0-9]{1,5}$/.test(domidText) || Number(domidText) < 1 || Number(domidText) > 32751) {
      throw new UsageError(
        `xen-backend: --domid must be a guest domain id (1..32751), not "${domidText}"`,
      );
    }
    let devid: number;
    try {
      devid = parseVdev(values.vdev);
    } catch (e) {
      throw new UsageError(`xen-backend: --vdev: ${(e as Error).message}`);
    }
    const unplugTimeout = Number(values["unplug-timeout"]);
    if (!(unplugTimeout >= 0 && unplugTimeout <= 3600)) {
      throw new UsageError("xen-backend: --unplug-timeout must be 0..3600 seconds");
    }
    const engine = values.engine === undefined
      ? undefined
      : parseChoice(values.engine, "--engine", ENGINE_KINDS);
    const dataPath = parseChoice(values.data, "--data", DATA_PATHS);
    const pollMicros = parsePollMicros(values["poll-us"]);
    const log = createLogger("xen-backend", { pid: Deno.pid });
    const mismatch = await rawOverImage(positionals[0], { readOnly: values["read-only"] });
    if (mismatch !== null) log.warn(mismatch);
    const disk = await openDisk(positionals[0], {
      readOnly: values["read-only"],
      engine,
      ...RING_ENGINE,
      pollMicros,
    });
    const signals = new SignalQueue();
    try {
      const reason = await serveXenVbd(disk, {
        frontendDomid: Number(domidText),
        devid,
        adopt: values.adopt,
        xenstore: values.xenstore,
        unplugTimeoutMs: unplugTimeout * 1000,
        dataPath,
        pollMicros,
        stop: signals.next(),
        log,
        ready: (backend) => console.log(backend),
      });
      log.info("stopped", { reason });
      if (!disk.info.readOnly) await disk.flush();
    } finally {
      signals[Symbol.dispose]();
      await disk.close();
    }
    return 0;
  },
};
