/**
 * vhd as an ImageFormat (`tapd create -f vhd|vpc`, `tapd check`), its driver, and how a VHD is
 * recognised from its bytes.
 */
import type { ImageFormat } from "../image_format.ts";
import { checkVhd } from "./check.ts";
import { createVhd } from "./create.ts";
import {
  COOKIE,
  DISK_DIFFERENCING,
  DISK_FIXED,
  FOOTER_SIZE,
  footerChecksumOk,
  hasCookie,
  parseFooter,
} from "./footer.ts";

export { vhdDriver } from "./vhd.ts";

export const vhdFormat: ImageFormat = {
  type: "vhd",
  create: createVhd,
  check: checkVhd,
};

/**
 * A dynamic or differencing VHD has the footer copy (`conectix`) at offset 0 (QEMU's test);
 * a fixed one only its footer at the end: the last 512 bytes, or 511 in pre-2004 images. The
 * footer at the end must also have a right checksum and a known disk type (a dynamic disk whose
 * copy is damaged is found by it too), so that a raw disk that merely ends with the cookie is not
 * taken for a VHD.
 */
export function isVhd(head: Uint8Array, tail: Uint8Array): boolean {
  if (hasCookie(head, 0, COOKIE)) return true;
  for (const at of [tail.length - FOOTER_SIZE, tail.length - (FOOTER_SIZE - 1)]) {
    if (at < 0 || !hasCookie(tail, at, COOKIE)) continue;
    const footer = tail.subarray(at);
    const type = parseFooter(footer).diskType;
    if (footerChecksumOk(footer) && type >= DISK_FIXED && type <= DISK_DIFFERENCING) return true;
  }
  return false;
}
