/** Checks what a control request names — disk specs, paths, export addresses — before acting. */
import { parseDiskSpec } from "../drivers/mod.ts";
import { checkMountPoint, resolveMountPoint } from "../fuse/mount.ts";
import { formatNbdAddress, type NbdAddress, parseNbdAddress } from "../nbd/address.ts";
import { RequestError } from "./control_protocol.ts";
import { parseXenTarget, type XenTarget } from "./xen_target.ts";

function message(e: unknown): string {
  return (e instanceof Error ? e.message : String(e)).split("\n")[0];
}

/** A disk spec whose image exists, given by absolute path. Returns the spec unchanged. */
export function checkSpec(text: string): string {
  let path: string;
  try {
    path = parseDiskSpec(text).path;
  } catch (e) {
    throw new RequestError(message(e));
  }
  if (!path.startsWith("/")) {
    throw new RequestError(
      `disk path "${path}" is not absolute (the daemon has no working directory to resolve it in)`,
    );
  }
  try {
    Deno.statSync(path);
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) throw new RequestError(`no such file: ${path}`);
    throw new RequestError(`cannot use ${path}: ${message(e)}`);
  }
  return text;
}

/** NBD listen addresses; Unix socket paths must be absolute. Returns them normalized. */
export function checkNbd(addresses: readonly string[]): string[] {
  return addresses.map((text) => {
    let address: NbdAddress;
    try {
      address = parseNbdAddress(text, "nbd address");
    } catch (e) {
      throw new RequestError(message(e));
    }
    if (address.transport === "unix") checkSocketPath(address.path);
    return formatNbdAddress(address);
  });
}

/** A ring address, unix:PATH with an absolute PATH. Returns PATH. */
export function checkRing(text: string): string {
  if (!text.startsWith("unix:") || text.length === 5) {
    throw new RequestError(`invalid ring address "${text}": expected unix:PATH`);
  }
  const path = text.slice(5);
  checkSocketPath(path);
  return path;
}

/**
 * A FUSE mount point: an absolute path (returned with its directories resolved, so that two
 * spellings of one file compare equal). Whether it can be mounted on: checkFuseMountPoint.
 */
export function checkFusePath(path: string): string {
  if (!path.startsWith("/")) {
    throw new RequestError(
      `FUSE path "${path}" is not absolute (the daemon has no working directory to resolve it in)`,
    );
  }
  try {
    return resolveMountPoint(path);
  } catch (e) {
    throw new RequestError(message(e));
  }
}

/** An existing regular file with nothing mounted on it (fuse/mount.ts's one-line errors). */
export function checkFuseMountPoint(path: string): void {
  try {
    checkMountPoint(path);
  } catch (e) {
    throw new RequestError(message(e));
  }
}

/** A Xen target, DOMID[:VDEV]: a guest domain id and a virtual device name. */
export function checkXen(text: string): XenTarget {
  try {
    return parseXenTarget(text);
  } catch (e) {
    throw new RequestError(message(e));
  }
}

function checkSocketPath(path: string): void {
  if (!path.startsWith("/")) throw new RequestError(`socket path "${path}" is not absolute`);
  const dir = path.slice(0, path.lastIndexOf("/")) || "/";
  try {
    if (!Deno.statSync(dir).isDirectory) throw new RequestError(`not a directory: ${dir}`);
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) throw new RequestError(`no such directory: ${dir}`);
    throw e;
  }
  if (new TextEncoder().encode(path).length > 107) {
    throw new RequestError(`socket path too long (at most 107 bytes): ${path}`);
  }
}
