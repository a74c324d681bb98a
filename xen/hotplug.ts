/**
 * The toolstack's half of a vbd (xen-backend.md §1.2, §3.6): creating both xenstore directories
 * with the nodes and permissions a guest's blkfront needs to find its backend, and removing
 * them. One transaction each, so the guest never sees a half-made device.
 */
import type { XenStore } from "./xenstore/client.ts";
import { backendPath, frontendPath, type VbdLocation, vdevName } from "./vbd_paths.ts";

export interface PlugOptions {
  readOnly: boolean;
  /** What the disk is (the `params` node; for people reading xenstore). */
  params: string;
}

/** Creates the backend and frontend directories of a vbd (replacing stale ones). */
export async function plugVbd(xs: XenStore, v: VbdLocation, options: PlugOptions): Promise<void> {
  const be = backendPath(v), fe = frontendPath(v);
  await xs.transaction(async (tx) => {
    await xs.rm(be, tx);
    await xs.rm(fe, tx);
    // Nodes copy their parent's permissions when dom0 creates them: set the directory first.
    await xs.mkdir(be, tx);
    await xs.setPerms(be, [`n${v.backendDomid}`, `r${v.frontendDomid}`], tx);
    const backendNodes: [string, string][] = [
      ["frontend", fe],
      ["frontend-id", String(v.frontendDomid)],
      ["online", "1"],
      ["removable", "0"],
      ["bootable", "1"],
      ["dev", vdevName(v.devid)],
      ["type", "tapd"],
      ["mode", options.readOnly ? "r" : "w"],
      ["device-type", "disk"],
      ["params", options.params],
      ["state", "1"],
    ];
    for (const [k, value] of backendNodes) await xs.write(`${be}/${k}`, value, tx);
    // The guest owns its directory (it writes ring-ref, event-channel and state there).
    await xs.mkdir(fe, tx);
    await xs.setPerms(fe, [`n${v.frontendDomid}`, `r${v.backendDomid}`], tx);
    const frontendNodes: [string, string][] = [
      ["backend", be],
      ["backend-id", String(v.backendDomid)],
      ["virtual-device", String(v.devid)],
      ["device-type", "disk"],
      ["state", "1"],
    ];
    for (const [k, value] of frontendNodes) await xs.write(`${fe}/${k}`, value, tx);
  });
}

/** Removes both directories of a vbd (and the backend's per-guest directory once empty). */
export async function unplugVbd(xs: XenStore, v: VbdLocation): Promise<void> {
  await xs.transaction(async (tx) => {
    await xs.rm(backendPath(v), tx);
    await xs.rm(frontendPath(v), tx);
  });
  await removeIfEmpty(xs, backendPath(v).replace(/\/[^/]+$/, ""));
}

/** Removes `path` if it has no children left (the guest's directory under our backend kind). */
export async function removeIfEmpty(xs: XenStore, path: string): Promise<void> {
  await xs.transaction(async (tx) => {
    if ((await xs.directory(path, tx)).length === 0) await xs.rm(path, tx);
  });
}

/** True if the domain exists (xenstore still has its directory). */
export async function domainExists(xs: XenStore, domid: number): Promise<boolean> {
  return (await xs.read(`/local/domain/${domid}/domid`)) !== null ||
    (await xs.directory(`/local/domain/${domid}`)).length > 0;
}
