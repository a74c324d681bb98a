/** The VMDK ImageFormat: `tapd create -f vmdk` and `tapd check` on VMDK images. */
import type { ImageFormat } from "../image_format.ts";
import { checkVmdk } from "./check.ts";
import { createVmdk } from "./create.ts";

export const vmdkFormat: ImageFormat = {
  type: "vmdk",
  create: createVmdk,
  check: checkVmdk,
};
