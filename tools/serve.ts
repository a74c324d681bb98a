/**
 * `tapd serve`: one disk as an NBD export and/or a FUSE file in the foreground, like qemu-nbd and
 * qemu-storage-daemon. SIGTERM/SIGINT stop it: no new clients, the FUSE file is unmounted,
 * requests in flight finish, the disk is flushed and closed, exit 0.
 */
import {
  checkPassthroughAlone,
  parseChoice,
  parseCommandLine,
  parseIoThreads,
  parsePollMicros,
} from "../cli/args.ts";
import { type Command, UsageError } from "../cli/command.ts";
import { createLogger } from "../cli/log.ts";
import { SignalQueue } from "../cli/signals.ts";
import { openDisk, parseDiskSpec, rawOverImage } from "../drivers/mod.ts";
import { ENGINE_KINDS, SERVER_ENGINE } from "../io/engine.ts";
import { formatNbdAddress, nbdUri, parseNbdAddress } from "../nbd/address.ts";
import { NbdServer } from "../nbd/server.ts";
import { FuseExport, MountError } from "../fuse/export.ts";
import { DiskGate } from "../serve/gate.ts";
import type { Logger } from "../cli/log.ts";

export const serveCommand: Command = {
  name: "serve",
  summary: "export one disk over NBD and/or as a FUSE file in the foreground (like qemu-nbd)",
  usage: `Usage: tapd serve SPEC [--nbd ADDR …]
                  [--fuse PATH [--passthrough] [--io-threads N] [--fuse-uring]]
                  [--read-only [--force-share]]
                  [--export-name NAME] [--engine aio|uring|sync] [--poll-us N]
                  [--no-read-ahead]

Serves the disk SPEC (tap:TYPE:PATH) until SIGTERM or SIGINT; give at least one export:
  --nbd ADDR    an NBD listener, unix:PATH or tcp:HOST[:PORT] (port 10809 by default);
                repeatable. Clients open nbd://HOST:PORT/NAME or nbd+unix:///NAME?socket=PATH;
                the default export "" is this disk too. Every connection shares one open
                disk, so multi-conn is advertised. Each URI is printed on stdout.
  --fuse PATH   mount the disk over the existing regular file PATH (FUSE, no helper): the
                file then is the disk, sized to it, writable unless read-only. Use it with
                \`losetup --direct-io=on\`. The path is printed on stdout once mounted.
                With --nbd too, the file bypasses the page cache (NBD writes stay visible).
  --passthrough with --fuse, for a raw disk (tap:aio, tap:sync): the kernel reads and
                writes the image itself for opens of the file (FUSE passthrough, Linux
                6.9+), as fast as a loop device on the image; tapd still serves size,
                fsync, discard and seeks. Those reads and writes bypass tapd's engine.
                Where the kernel lacks it, tapd says so and serves them itself.
  --io-threads N with --fuse, for a raw disk: N threads take requests off the FUSE
                queue and do the image's reads and writes themselves, with their own aio
                contexts; the event loop serves the rest. Default 0: the event loop serves
                everything (as always for a qcow or other mapped disk). 2 threads: lower
                latency and more random writes, fewer random reads (docs/performance.md).
  --fuse-uring  with --fuse, for a raw disk: FUSE over io_uring (Linux 6.14+; tapd turns on
                the fuse module's enable_uring): the kernel hands requests to ring entries,
                a thread per CPU serves the reads and writes with io_uring I/O on the image,
                with no system call per request; the event loop serves the rest. Where the
                kernel lacks it, tapd says so and uses /dev/fuse.
  --poll-us N   look for FUSE requests and for completions instead of sleeping until woken,
                until N µs pass without a request arriving or completing (default 0): a CPU
                for more IOPS on a busy disk.
  --no-read-ahead  read only what is asked for. By default, once large reads (128 KiB
                or more) follow one another, the next 4 MiB are read ahead into memory
                (16 MiB a disk at most), so a sequential reader that waits for its
                requests is answered from there; writes drop what they overlap.
  --read-only   refuse writes (NBD read-only, the FUSE file read-only).
  --force-share, -U  with --read-only: serve the image even while another process writes it.

The image is locked as QEMU locks images: while it is served, a VM, qemu-nbd or qemu-img
cannot write it (nor read it without their -U, unless tapd serves it read-only), and tapd
refuses an image one of them writes (docs/architecture.md "Image locks").

SIGTERM unmounts the FUSE file; while something still uses it (a loop device, an open file)
tapd says so and goes on serving: detach it, or send SIGTERM again to abort the mount (its
users then get I/O errors). Unmounting the file from outside also ends a FUSE-only serve.

Examples:
  tapd serve tap:qcow:vm.qcow --nbd unix:/run/vm.sock --nbd tcp:127.0.0.1:10809
  qemu-img info nbd+unix:///?socket=/run/vm.sock
  touch /run/vm.img && tapd serve tap:qcow:vm.qcow --fuse /run/vm.img &
  losetup --direct-io=on --find --show /run/vm.img`,

  async run(args: string[]): Promise<number> {
    const { values, positionals } = parseCommandLine("serve", args, {
      nbd: { type: "string", multiple: true },
      fuse: { type: "string" },
      "read-only": { type: "boolean", default: false },
      "force-share": { type: "boolean", short: "U", default: false },
      "export-name": { type: "string", default: "" },
      engine: { type: "string" },
      "poll-us": { type: "string" },
      passthrough: { type: "boolean", default: false },
      "io-threads": { type: "string" },
      "fuse-uring": { type: "boolean", default: false },
      "no-read-ahead": { type: "boolean", default: false },
    });
    if (positionals.length !== 1) throw new UsageError("serve: expected one disk spec");
    if (values["force-share"] && !values["read-only"] && !specReadOnly(positionals[0])) {
      throw new UsageError("serve: --force-share is only for a --read-only export");
    }
    const addresses = (values.nbd ?? []).map((a) => parseNbdAddress(a));
    const fusePath = values.fuse;
    if (fusePath === "") throw new UsageError("serve: --fuse needs a path");
    if (addresses.length === 0 && fusePath === undefined) {
      throw new UsageError("serve: give an export: --nbd ADDR and/or --fuse PATH");
    }
    if (values.passthrough && fusePath === undefined) {
      throw new UsageError("serve: --passthrough is an option of --fuse PATH");
    }
    const ioThreads = parseIoThreads(values["io-threads"], fusePath, "serve");
    if (values["fuse-uring"] && fusePath === undefined) {
      throw new UsageError("serve: --fuse-uring is an option of --fuse PATH");
    }
    checkPassthroughAlone(values.passthrough, ioThreads, values["fuse-uring"], "serve");
    const exportName = values["export-name"];
    if (new TextEncoder().encode(exportName).length > 4096 || exportName.includes("\0")) {
      throw new UsageError("serve: --export-name must be at most 4096 bytes, without NUL");
    }
    const engine = values.engine === undefined
      ? undefined
      : parseChoice(values.engine, "--engine", ENGINE_KINDS);
    const pollMicros = parsePollMicros(values["poll-us"]);
    const log = createLogger("serve", { pid: Deno.pid });
    const mismatch = await rawOverImage(positionals[0], { readOnly: values["read-only"] });
    if (mismatch !== null) log.warn(mismatch);
    const disk = await openDisk(positionals[0], {
      readOnly: values["read-only"],
      forceShare: values["force-share"],
      engine,
      ...SERVER_ENGINE,
      pollMicros,
    });
    // The exports' front (read-ahead; pause and stats are the daemon's, over the same gate).
    const gate = new DiskGate(disk, { readAhead: !values["no-read-ahead"] });
    try {
      const server = new NbdServer(gate, {
        exportName,
        readOnly: values["read-only"],
        log: log.with({ component: "nbd" }),
      });
      const signals = new SignalQueue();
      let fuse: FuseExport | null = null;
      try {
        for (const address of addresses) {
          const bound = await server.listen(address);
          log.info("listening", {
            address: formatNbdAddress(bound),
            uri: nbdUri(bound, exportName),
          });
          console.log(nbdUri(bound, exportName));
        }
        if (fusePath !== undefined) {
          fuse = new FuseExport(gate, fusePath, {
            readOnly: values["read-only"],
            // NBD clients write behind the page cache's back: the file must not cache.
            directIo: addresses.length > 0,
            log: log.with({ component: "fuse" }),
            pollMicros,
            passthrough: values.passthrough,
            ioThreads,
            uring: values["fuse-uring"],
          });
          await fuse.mount();
          console.log(fusePath);
        }
        // A FUSE-only serve also ends when its file is unmounted from outside.
        const stop = signals.next();
        await (addresses.length === 0 ? Promise.race([stop, fuse!.ended]) : stop);
        log.info("stopping");
      } finally {
        await server.close();
        if (fuse !== null) await closeFuse(fuse, signals, log);
        signals[Symbol.dispose]();
      }
      if (!disk.info.readOnly) await gate.flush();
      if (fuse?.failure) {
        console.error(`tapd serve: the FUSE export failed: ${fuse.failure}`);
        return 1;
      }
    } finally {
      await gate.close();
    }
    log.info("stopped");
    return 0;
  },
};

/**
 * Unmounts the FUSE file. While it is in use, says so and goes on serving until it is free,
 * or a further signal forces it (the connection is aborted).
 */
async function closeFuse(fuse: FuseExport, signals: SignalQueue, log: Logger): Promise<void> {
  try {
    await fuse.close();
    return;
  } catch (e) {
    if (!(e instanceof MountError)) throw e;
    log.error(`${e.message}; still serving: SIGTERM again aborts the mount`);
  }
  const closing = fuse.close({ graceMs: Infinity });
  const forced = await Promise.race([closing.then(() => false), signals.next().then(() => true)]);
  if (forced) await fuse.close({ force: true });
}

/** Whether a spec says `,ro` (a spec that does not parse is reported by openDisk). */
function specReadOnly(spec: string): boolean {
  try {
    return parseDiskSpec(spec).readOnly;
  } catch {
    return false;
  }
}
