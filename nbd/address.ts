/**
 * Where an NBD export listens — `unix:/path.sock`, `tcp:HOST:PORT` or `tcp:[v6]:PORT` — and the
 * URIs clients (qemu-img, nbdinfo, nbdcopy, fio) open it with.
 */
import { UsageError } from "../cli/command.ts";

export type NbdAddress =
  | { transport: "unix"; path: string }
  | { transport: "tcp"; hostname: string; port: number };

export const NBD_PORT = 10809;

export function parseNbdAddress(text: string, what = "--nbd"): NbdAddress {
  if (text.startsWith("unix:") && text.length > 5) {
    return { transport: "unix", path: text.slice(5) };
  }
  const tcp = /^tcp:(?:\[([0-9a-fA-F:.]+)\]|([^:\[\]]+))(?::(\d{1,5}))?$/.exec(text);
  if (tcp !== null) {
    const port = tcp[3] === undefined ? NBD_PORT : Number(tcp[3]);
    if (port <= 65535) return { transport: "tcp", hostname: tcp[1] ?? tcp[2], port };
  }
  throw new UsageError(
    `invalid ${what} "${text}": expected unix:PATH or tcp:HOST[:PORT] (e.g. tcp:127.0.0.1:10809)`,
  );
}

export function formatNbdAddress(address: NbdAddress): string {
  if (address.transport === "unix") return `unix:${address.path}`;
  const host = address.hostname.includes(":") ? `[${address.hostname}]` : address.hostname;
  return `tcp:${host}:${address.port}`;
}

/** The URI every listed client accepts for `exportName` at `address`. */
export function nbdUri(address: NbdAddress, exportName = ""): string {
  const name = encodeURIComponent(exportName).replaceAll("%2F", "/");
  if (address.transport === "unix") {
    return `nbd+unix:///${name}?socket=${encodeURI(address.path)}`;
  }
  const host = address.hostname.includes(":") ? `[${address.hostname}]` : address.hostname;
  return `nbd://${host}:${address.port}/${name}`;
}
