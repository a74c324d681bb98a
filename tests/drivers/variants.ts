/** The driver configurations every driver test runs against. */
import type { DiskOptions } from "../../drivers/driver.ts";

export interface Variant {
  name: string;
  type: "aio" | "sync" | "ram";
  options: DiskOptions;
}

export const VARIANTS: Variant[] = [
  { name: "aio (libaio)", type: "aio", options: { engine: "aio" } },
  { name: "aio (io_uring)", type: "aio", options: { engine: "uring" } },
  { name: "sync", type: "sync", options: {} },
  { name: "ram", type: "ram", options: {} },
];
