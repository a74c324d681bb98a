/**
 * `tapd serve`: one disk as an NBD export in the foreground, like qemu-nbd. SIGTERM/SIGINT stop
 * it: no new clients, requests in flight finish, the disk is flushed and closed, exit 0.
 */
import { parseChoice, parseCommandLine } from "../cli/args.ts";
import { type Command, UsageError } from "../cli/command.ts";
import { createLogger } from "../cli/log.ts";
import { openDisk } from "../drivers/mod.ts";
import { ENGINE_KINDS } from "../io/engine.ts";
import { formatNbdAddress, nbdUri, parseNbdAddress } from "../nbd/address.ts";
import { NbdServer } from "../nbd/server.ts";

export const serveCommand: Command = {
  name: "serve",
  summary: "export one disk over NBD in the foreground (like qemu-nbd)",
  usage: `Usage: tapd serve SPEC --nbd ADDR [--nbd ADDR …] [--read-only] [--export-name NAME]
                  [--engine aio|uring|sync]

Serves the disk SPEC (tap:TYPE:PATH) over NBD until SIGTERM or SIGINT. ADDR is unix:PATH or
tcp:HOST[:PORT] (port 10809 by default); give --nbd several times to listen on several.
Clients open nbd://HOST:PORT/NAME or nbd+unix:///NAME?socket=PATH; the default export ""
is this disk too. Every connection shares one open disk, so multi-conn is advertised.

Examples:
  tapd serve tap:qcow:vm.qcow --nbd unix:/run/vm.sock --nbd tcp:127.0.0.1:10809
  qemu-img info nbd+unix:///?socket=/run/vm.sock`,

  async run(args: string[]): Promise<number> {
    const { values, positionals } = parseCommandLine("serve", args, {
      nbd: { type: "string", multiple: true },
      "read-only": { type: "boolean", default: false },
      "export-name": { type: "string", default: "" },
      engine: { type: "string" },
    });
    if (positionals.length !== 1) throw new UsageError("serve: expected one disk spec");
    const addresses = (values.nbd ?? []).map((a) => parseNbdAddress(a));
    if (addresses.length === 0) throw new UsageError("serve: --nbd ADDR is required");
    const exportName = values["export-name"];
    if (new TextEncoder().encode(exportName).length > 4096 || exportName.includes("\0")) {
      throw new UsageError("serve: --export-name must be at most 4096 bytes, without NUL");
    }
    const engine = values.engine === undefined
      ? undefined
      : parseChoice(values.engine, "--engine", ENGINE_KINDS);
    const log = createLogger("serve", { pid: Deno.pid });
    const disk = await openDisk(positionals[0], { readOnly: values["read-only"], engine });
    try {
      const server = new NbdServer(disk, {
        exportName,
        readOnly: values["read-only"],
        log: log.with({ component: "nbd" }),
      });
      let stopped!: () => void;
      const stop = new Promise<void>((resolve) => stopped = resolve);
      Deno.addSignalListener("SIGTERM", stopped);
      Deno.addSignalListener("SIGINT", stopped);
      try {
        for (const address of addresses) {
          const bound = await server.listen(address);
          log.info("listening", {
            address: formatNbdAddress(bound),
            uri: nbdUri(bound, exportName),
          });
          console.log(nbdUri(bound, exportName));
        }
        await stop;
        log.info("stopping");
      } finally {
        Deno.removeSignalListener("SIGTERM", stopped);
        Deno.removeSignalListener("SIGINT", stopped);
        await server.close();
      }
      if (!disk.info.readOnly) await disk.flush();
    } finally {
      await disk.close();
    }
    log.info("stopped");
    return 0;
  },
};
