/**
 * A Xen export's target, `DOMID[:VDEV]` (`tapd ctl attach --xen`, `tapd tapdisk --xen`): the
 * guest domain and its virtual device (default xvda). Its export is named `xen:DOMID:VDEV`.
 */
import { parseVdev, vdevName } from "../xen/vbd_paths.ts";

export interface XenTarget {
  domid: number;
  devid: number;
}

export const DEFAULT_VDEV = "xvda";
/** The last guest domain id; above are Xen's reserved ids (DOMID_FIRST_RESERVED = 0x7ff0). */
export const MAX_DOMID = 0x7fef;

/** Parses `DOMID[:VDEV]`; throws a one-line RangeError naming what is wrong. */
export function parseXenTarget(text: string): XenTarget {
  const colon = text.indexOf(":");
  const domidText = colon < 0 ? text : text.slice(0, colon);
  const vdev = colon < 0 ? DEFAULT_VDEV : text.slice(colon + 1);
  const domid = Number(domidText);
  if (!/^[0-9]{1,5}$/.test(domidText) || domid < 1 || domid > MAX_DOMID) {
    throw new RangeError(
      `invalid Xen target "${text}": expected DOMID[:VDEV] with a guest domain id 1..${MAX_DOMID}`,
    );
  }
  try {
    return { domid, devid: parseVdev(vdev) };
  } catch (e) {
    throw new RangeError(`invalid Xen target "${text}": ${(e as Error).message}`);
  }
}

/** `DOMID:VDEV`, with the device's usual name (parseXenTarget reads it back). */
export function formatXenTarget(t: XenTarget): string {
  return `${t.domid}:${vdevName(t.devid)}`;
}

/** The export as `list` shows it: `xen:DOMID:VDEV`. */
export function xenExport(t: XenTarget): string {
  return `xen:${formatXenTarget(t)}`;
}
