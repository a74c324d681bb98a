/**
 * One disk served to one Xen guest device for as long as it lives: plug the vbd into xenstore,
 * run its backend, and on a stop request unplug it politely (the guest lets go), force it after
 * a timeout, and clean xenstore up. Used by `tapd xen-backend` and by the daemon's children.
 */
import type { Logger } from "../cli/log.ts";
import type { BlockTarget } from "../drivers/target.ts";
import { domainExists, plugVbd, unplugVbd } from "./hotplug.ts";
import { type DataPath, Dom0Kernel, type XenKernel } from "./kernel.ts";
import { VbdBackend, type VbdLimits } from "./vbd_backend.ts";
import { BACKEND_KIND, backendPath, type VbdLocation } from "./vbd_paths.ts";
import { XenStore } from "./xenstore/client.ts";

export interface XenServeOptions {
  frontendDomid: number;
  devid: number;
  /** Serve nodes a toolstack made, instead of creating (and finally removing) them. */
  adopt?: boolean;
  /** xenstored's socket or the xenbus device (default: whichever exists). */
  xenstore?: string;
  unplugTimeoutMs?: number;
  /** Resolves when the device should be unplugged. */
  stop: Promise<unknown>;
  log: Logger;
  /** Called with the backend's xenstore path once the device waits for the guest. */
  ready?: (backendPath: string) => void;
  kernel?: XenKernel;
  /** With the real kernel: grant copy (default) or grant mapping for the data. */
  dataPath?: DataPath;
  limits?: Partial<VbdLimits>;
  /** The rings' polling window (RingServerOptions.pollMicros). */
  pollMicros?: number;
}

/** Serves until the guest is gone or `stop` resolves; returns why it ended. */
export async function serveXenVbd(disk: BlockTarget, o: XenServeOptions): Promise<string> {
  const xenstore = o.xenstore;
  let xs: XenStore;
  try {
    xs = await XenStore.connect(
      xenstore === undefined
        ? {}
        : xenstore.startsWith("/dev/")
        ? { device: xenstore }
        : { socket: xenstore },
    );
  } catch (e) {
    const why = (e as Error).message.replace(/^Cannot reach xenstored: /, "");
    const at = xenstore ? ` at ${xenstore}` : "";
    throw new Error(`Cannot reach xenstored${at} (is this Xen's dom0?): ${why}`);
  }
  using ownKernel = o.kernel === undefined ? new Dom0Kernel(o.dataPath) : null;
  const kernel = o.kernel ?? ownKernel!;
  try {
    const v: VbdLocation = {
      backendDomid: 0, // dom0: driver domains are not supported
      frontendDomid: o.frontendDomid,
      devid: o.devid,
      kind: BACKEND_KIND,
    };
    if (!(await domainExists(xs, v.frontendDomid))) {
      throw new Error(`Xen domain ${v.frontendDomid} does not exist`);
    }
    if (!o.adopt) {
      await plugVbd(xs, v, { readOnly: disk.info.readOnly, params: disk.name });
    } else if ((await xs.read(`${backendPath(v)}/frontend`)) === null) {
      throw new Error(`no vbd to adopt at ${backendPath(v)}`);
    }
    const log = o.log;
    const backend = new VbdBackend(xs, v, disk, kernel, {
      limits: o.limits,
      log: (line) => log.info(line),
      pollMicros: o.pollMicros,
    });
    try {
      await backend.start();
    } catch (e) {
      if (!o.adopt) await unplugVbd(xs, v).catch(() => {});
      throw e;
    }
    o.ready?.(backend.be);
    const stopped = o.stop.then(() => "stop");
    let reason = await Promise.race([backend.done, stopped]);
    if (reason === "stop") {
      log.info("unplugging", { backend: backend.be });
      await backend.unplug();
      const timeout = o.unplugTimeoutMs ?? 10_000;
      let timer: ReturnType<typeof setTimeout> | undefined;
      const late = new Promise<string>((resolve) => {
        timer = setTimeout(() => resolve("timeout"), timeout);
      });
      reason = await Promise.race([backend.done, late]);
      clearTimeout(timer);
      if (reason === "timeout") {
        log.warn(`the guest did not release the device in ${timeout / 1000} s: disconnecting`);
        await backend.forceClose("unplug timed out");
        reason = "unplug timed out";
      }
    }
    if (!o.adopt) await unplugVbd(xs, v).catch(() => {});
    return reason;
  } finally {
    xs.close();
  }
}
