/** The client side of the control socket (for `tapd ctl` and tests): one request, one reply. */
import type { ControlReply } from "./control_protocol.ts";
import { encodeLine, readLines } from "./lines.ts";

/** Could not reach the daemon at all. */
export class ConnectError extends Error {
  override name = "ConnectError";
}

/** Sends one request (any JSON value) and returns the daemon's reply. */
export async function controlRequest(path: string, request: unknown): Promise<ControlReply> {
  let conn: Deno.UnixConn;
  try {
    conn = await Deno.connect({ transport: "unix", path });
  } catch (e) {
    const why = (e as Error).message.replace(/ \(os error \d+\)$/, "");
    throw new ConnectError(
      `ctl: cannot reach the daemon at ${path}: ${why}` +
        (e instanceof Deno.errors.NotFound || e instanceof Deno.errors.ConnectionRefused
          ? " (is `tapd daemon` running? --control SOCK names another socket)"
          : ""),
    );
  }
  try {
    let writeError: Error | null = null;
    try {
      await conn.write(encodeLine(request));
    } catch (e) {
      // The daemon may have answered and closed before reading (a refused peer): read that.
      writeError = e as Error;
    }
    for await (const line of readLines(conn.readable)) {
      if (line.trim() !== "") return JSON.parse(line) as ControlReply;
    }
    throw new Error(
      `ctl: the daemon at ${path} closed the connection without replying` +
        (writeError === null ? "" : ` (${writeError.message})`),
    );
  } finally {
    try {
      conn.close();
    } catch { /* closed by the readable's end */ }
  }
}
