/**
 * Naming a vbd: the guest device name ↔ its devid (Xen's docs/misc/vbd-interface;
 * xen-backend.md §1.3), and the xenstore directories of both ends (§1.1).
 */

/** Our backend kind: dom0's kernel blkback binds `vbd`, so it can never take our devices. */
export const BACKEND_KIND = "vbd3";

export interface VbdLocation {
  /** The backend's domain (0: dom0). */
  backendDomid: number;
  /** The guest's domain. */
  frontendDomid: number;
  devid: number;
  kind: string;
}

export function backendPath(v: VbdLocation): string {
  return `/local/domain/${v.backendDomid}/backend/${v.kind}/${v.frontendDomid}/${v.devid}`;
}

export function frontendPath(v: VbdLocation): string {
  return `/local/domain/${v.frontendDomid}/device/vbd/${v.devid}`;
}

/**
 * The devid of a guest device name: `xvdX[N]`, `xvdXX[N]` (extended), `hdX[N]`, `sdX[N]`, or a
 * plain decimal devid. Throws a one-line error for anything else.
 */
export function parseVdev(name: string): number {
  if (/^[0-9]{1,10}$/.test(name)) {
    const n = Number(name);
    if (n > 0 && n < 2 ** 31) return n;
  }
  const m = /^(xvd|hd|sd)([a-z]{1,3})([0-9]{0,3})$/.exec(name);
  if (m === null) throw new RangeError(`"${name}" is not a virtual device name (e.g. xvda, xvdb1)`);
  const [, prefix, letters, partText] = m;
  let disk = 0;
  for (const ch of letters) disk = disk * 26 + (ch.charCodeAt(0) - 96);
  disk -= 1;
  const part = partText === "" ? 0 : Number(partText);
  if (prefix === "xvd") {
    if (disk < 16 && part < 16) return (202 << 8) | (disk << 4) | part;
    if (disk < 1 << 20 && part < 256) return (1 << 28) | (disk << 8) | part;
  } else if (prefix === "hd" && disk < 4 && part < 64) {
    return ((disk < 2 ? 3 : 22) << 8) | ((disk % 2) * 64) | part;
  } else if (prefix === "sd" && disk < 16 && part < 16) {
    return (8 << 8) | (disk << 4) | part;
  }
  throw new RangeError(`"${name}" is out of range for a virtual device`);
}

/** The usual name of a devid (xvdX for the xvd encodings), for messages and the `dev` node. */
export function vdevName(devid: number): string {
  const letters = (disk: number): string => {
    let s = "";
    for (let d = disk + 1; d > 0; d = Math.floor((d - 1) / 26)) {
      s = String.fromCharCode(97 + ((d - 1) % 26)) + s;
    }
    return s;
  };
  if (devid >= 1 << 28) {
    const disk = (devid >> 8) & 0xfffff, part = devid & 0xff;
    return `xvd${letters(disk)}${part === 0 ? "" : part}`;
  }
  if (devid >> 8 === 202) {
    const disk = (devid >> 4) & 0xf, part = devid & 0xf;
    return `xvd${letters(disk)}${part === 0 ? "" : part}`;
  }
  return String(devid);
}
