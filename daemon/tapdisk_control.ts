/**
 * The child's end of the daemon ↔ tapdisk channel (daemon/tapdisk_protocol.ts): reads commands
 * from stdin, runs them on the TapdiskServer, writes replies to stdout. pause, resume and stop
 * run one at a time in arrival order; stats answers at once (also while a pause drains).
 */
import type { Logger } from "../cli/log.ts";
import { encodeLine, readLines } from "./lines.ts";
import type { TapdiskServer } from "./tapdisk_server.ts";
import {
  parseTapdiskCommand,
  type TapdiskCommand,
  type TapdiskMessage,
  type TapdiskReply,
} from "./tapdisk_protocol.ts";

/** Writes one message on stdout; a daemon that is gone is not an error here (stdin ends too). */
export function sendToDaemon(message: TapdiskMessage): void {
  const bytes = encodeLine(message);
  try {
    for (let done = 0; done < bytes.length;) done += Deno.stdout.writeSync(bytes.subarray(done));
  } catch { /* the daemon closed our stdout */ }
}

async function run(server: TapdiskServer, c: TapdiskCommand): Promise<TapdiskReply> {
  try {
    switch (c.cmd) {
      case "pause":
        await server.pause();
        return { seq: c.seq, ok: true };
      case "resume": {
        const warning = await server.resume(c.reopen);
        return warning === null ? { seq: c.seq, ok: true } : { seq: c.seq, ok: true, warning };
      }
      case "stats":
        return { seq: c.seq, ok: true, stats: server.stats() };
      case "stop":
        await server.stop();
        return { seq: c.seq, ok: true };
    }
  } catch (e) {
    const error = (e as Error).message.split("\n")[0];
    // A stop refused because the FUSE file is in use: the disk serves on.
    if (c.cmd === "stop" && server.serving) return { seq: c.seq, ok: false, error, serving: true };
    return { seq: c.seq, ok: false, error };
  }
}

/**
 * Serves commands until a stop command has been carried out or stdin ends (the daemon is gone);
 * resolves with which. A stop refused because the FUSE file is in use is answered with
 * `serving: true`, and commands go on being served.
 */
export async function runStdioControl(
  server: TapdiskServer,
  log: Logger,
  input: ReadableStream<Uint8Array> = Deno.stdin.readable,
): Promise<"stop" | "eof"> {
  let queue: Promise<unknown> = Promise.resolve();
  for await (const line of readLines(input)) {
    if (line.trim() === "") continue;
    let command: TapdiskCommand;
    try {
      command = parseTapdiskCommand(line);
    } catch (e) {
      log.warn("ignoring a bad control line", { error: (e as Error).message });
      continue;
    }
    if (command.cmd === "stats") {
      sendToDaemon(await run(server, command));
      continue;
    }
    const done = queue.then(() => run(server, command)).then((reply) => {
      sendToDaemon(reply);
      return reply;
    });
    queue = done;
    if (command.cmd === "stop") {
      const reply = await done;
      if (!reply.ok && reply.serving) continue;
      return "stop";
    }
  }
  log.info("control channel closed: stopping");
  return "eof";
}
