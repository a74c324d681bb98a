/**
 * The daemon's disk table, as blktapctrl kept one: disk ids (small integers from 0, the lowest
 * free one first), each disk served by its own tapdisk child. A child that dies leaves its disk
 * in the table as failed, with the reason, until it is detached; the other disks are not
 * touched. A dead child's FUSE mount is aborted by the daemon (nobody is left waiting on it).
 */
import type { Logger } from "../cli/log.ts";
import { abortFuseMount } from "../fuse/export.ts";
import { findMount, FUSE_TYPE } from "../fuse/mount.ts";
import { TapdiskChild } from "./children.ts";
import { conflict, type ImageClaim, imageClaims } from "./image_claims.ts";
import {
  type ControlReply,
  type ControlRequest,
  type DiskRecord,
  type DiskStats,
  errorReply,
  RequestError,
} from "./control_protocol.ts";
import {
  checkFuseMountPoint,
  checkFusePath,
  checkNbd,
  checkRing,
  checkSpec,
  checkXen,
} from "./validate.ts";
import { formatXenTarget, xenExport } from "./xen_target.ts";

/** How long a tapdisk may take to drain and close before it is killed. */
export const STOP_TIMEOUT_MS = 30_000;
/**
 * After STOP_TIMEOUT_MS, a tapdisk with a FUSE file (most likely waiting for the file to be free)
 * gets a second SIGTERM, which aborts the mount, and this long to flush and close the disk.
 */
const FORCE_TIMEOUT_MS = 5_000;

export interface AttachRequest {
  spec: string;
  nbd: string[];
  ring: string | null;
  /** A regular file to mount the disk over (FUSE), or null. */
  fuse: string | null;
  /** A Xen guest device, DOMID[:VDEV], or null. */
  xen: string | null;
  readOnly: boolean;
  /** tapdisk's --poll-us (0 or absent: sleep until woken). */
  pollMicros?: number;
  /** FUSE passthrough for the `fuse` export (absent: off). */
  passthrough?: boolean;
  /** The `fuse` export's I/O threads (absent or null: the default). */
  ioThreads?: number | null;
  /** FUSE over io_uring for the `fuse` export (absent: off). */
  uring?: boolean;
  /** False: the tapdisk does not read ahead (absent: it does). */
  readAhead?: boolean;
}

interface Entry {
  record: DiskRecord;
  child: TapdiskChild;
  /** Socket files the child creates (removed if it dies without removing them). */
  sockets: string[];
  /** The FUSE mount point (resolved), aborted if the child dies with it mounted. */
  fuse: string | null;
  /** The image files the child holds open, and whether it writes them. */
  claims: ImageClaim[];
}

/** Resolves true when `p` settles within `ms`, false otherwise. */
async function within(p: Promise<unknown>, ms: number): Promise<boolean> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<false>((resolve) => timer = setTimeout(() => resolve(false), ms));
  try {
    return await Promise.race([p.then(() => true, () => true), timeout]);
  } finally {
    clearTimeout(timer);
  }
}

/** The comparable identity of an export address (unix:PATH, tcp:HOST:PORT); null for port 0. */
function endpoint(address: string): string | null {
  const plain = address.startsWith("ring:") ? address.slice(5) : address;
  return /^tcp:.*:0$/.test(plain) ? null : plain;
}

export class Daemon {
  readonly stateDir: string;
  readonly #log: Logger;
  readonly #disks = new Map<number, Entry>();
  #stopping = false;

  constructor(stateDir: string, log: Logger) {
    this.stateDir = stateDir;
    this.#log = log;
  }

  /** Runs one control request; failures become error replies. */
  async handle(req: ControlRequest): Promise<ControlReply> {
    try {
      switch (req.verb) {
        case "list":
          return { ok: true, disks: this.list() };
        case "attach":
          return { ok: true, ...await this.attach(req) };
        case "detach":
          await this.detach(req.id);
          return { ok: true };
        case "pause":
          return { ok: true, disk: await this.pause(req.id) };
        case "resume":
          return { ok: true, ...await this.resume(req.id, req.reopen) };
        case "stats":
          return { ok: true, stats: await this.stats(req.id) };
      }
    } catch (e) {
      this.#log.warn("request failed", { verb: req.verb, error: (e as Error).message });
      return errorReply(e);
    }
  }

  list(): DiskRecord[] {
    return [...this.#disks.values()].map((e) => ({ ...e.record })).sort((a, b) => a.id - b.id);
  }

  async attach(req: AttachRequest): Promise<Changed> {
    if (this.#stopping) throw new RequestError("the daemon is shutting down");
    const spec = checkSpec(req.spec);
    let nbd = checkNbd(req.nbd);
    const ring = req.ring === null ? null : checkRing(req.ring);
    const fuse = req.fuse === null ? null : checkFusePath(req.fuse);
    const xen = req.xen === null ? null : checkXen(req.xen);
    const claims = await imageClaims(spec, req.readOnly);
    if (this.#stopping) throw new RequestError("the daemon is shutting down");
    let id = 0;
    while (this.#disks.has(id)) id++;
    if (nbd.length === 0 && ring === null && fuse === null && xen === null) {
      Deno.mkdirSync(`${this.stateDir}/nbd`, { recursive: true });
      nbd = [`unix:${this.stateDir}/nbd/${id}.sock`];
    }
    const wanted = [...nbd, ...(ring === null ? [] : [`unix:${ring}`])];
    const named = [
      ...(fuse === null ? [] : [`fuse:${fuse}`]),
      ...(xen === null ? [] : [xenExport(xen)]),
    ];
    this.#checkFree([...wanted, ...named]);
    if (fuse !== null) checkFuseMountPoint(fuse);
    this.#checkImagesFree(claims, null);
    const args = [spec, "--export-name", String(id)];
    for (const address of nbd) args.push("--nbd", address);
    if (ring !== null) args.push("--ring", `unix:${ring}`);
    if (fuse !== null) args.push("--fuse", fuse);
    if (req.passthrough) args.push("--passthrough"); // with a fuse export (parseRequest)
    if (req.ioThreads != null) args.push("--io-threads", String(req.ioThreads));
    if (req.uring) args.push("--fuse-uring"); // with a fuse export (parseRequest)
    if (xen !== null) args.push("--xen", formatXenTarget(xen));
    if (req.readOnly) args.push("--read-only");
    if (req.pollMicros) args.push("--poll-us", String(req.pollMicros));
    if (req.readAhead === false) args.push("--no-read-ahead");
    const log = this.#log.with({ disk: id });
    const child = new TapdiskChild(args, log, (e) => this.#exportEnded(entry, e.export, e.reason));
    const entry: Entry = {
      record: {
        id,
        state: "starting",
        pid: child.pid,
        spec,
        readOnly: req.readOnly,
        exports: [
          ...nbd,
          ...(ring === null ? [] : [`ring:unix:${ring}`]),
          ...named,
        ],
        uris: [],
        size: null,
        reason: null,
      },
      child,
      sockets: wanted.filter((a) => a.startsWith("unix:")).map((a) => a.slice(5)),
      fuse,
      claims,
    };
    this.#disks.set(id, entry);
    log.info("starting tapdisk", { tapdiskPid: child.pid, spec });
    child.exited.then((info) => this.#exited(entry, info.reason));
    let warning: string | undefined;
    try {
      const ready = await child.ready;
      warning = ready.warning;
      Object.assign(entry.record, {
        state: "running",
        exports: ready.exports,
        uris: ready.uris,
        size: ready.size,
      });
    } catch (e) {
      // Listed (and holding its image) until it is gone: it may have the image open still.
      if (!await within(child.exited, STOP_TIMEOUT_MS)) {
        child.kill("SIGKILL");
        await child.exited;
      }
      this.#disks.delete(id);
      throw new RequestError(`attach ${spec}: ${(e as Error).message}`);
    }
    log.info("attached", { exports: entry.record.exports.join(" ") });
    return withWarning({ disk: { ...entry.record } }, warning);
  }

  /** Refuses an address another live disk already serves on. */
  #checkFree(addresses: string[]): void {
    const seen = new Set<string>();
    for (const address of addresses) {
      const end = endpoint(address);
      if (end === null) continue;
      if (seen.has(end)) throw new RequestError(`${address} is given twice`);
      seen.add(end);
    }
    for (const { record } of this.#disks.values()) {
      if (record.state === "failed") continue;
      const used = record.exports.find((a) => seen.has(endpoint(a) ?? ""));
      if (used !== undefined) {
        throw new RequestError(`${endpoint(used)} is already used by disk ${record.id}`);
      }
    }
  }

  /**
   * Refuses image files that a live disk other than `self` writes, or reads while these claims
   * would write them: two tapdisks writing one image, or one writing the parent that another
   * reads through, corrupt what the guests see.
   */
  #checkImagesFree(claims: ImageClaim[], self: Entry | null): void {
    for (const entry of this.#disks.values()) {
      if (entry === self || entry.record.state === "failed") continue;
      const found = conflict(claims, entry.claims);
      if (found === null) continue;
      const { mine, theirs } = found;
      const { id, reason, exports, state } = entry.record;
      const name = mine.path === theirs.path
        ? theirs.path
        : `${mine.path} (the same file as ${theirs.path})`;
      const ended = exports.length === 0 && reason !== null ? `, ${reason}` : "";
      const what = `${name} is ${theirs.writable ? "written" : "read"} by disk ${id}`;
      const why = "a file that a disk writes cannot be shared";
      throw new RequestError(
        state === "stopping"
          ? `${what}, which is being detached: ${why} (try again once it is gone)`
          : self !== null
          ? `${what}${ended}: ${why} (detach disk ${id} first)`
          : `${what}${ended}: ${why} (detach disk ${id} first, or attach both read-only)`,
      );
    }
  }

  /** An export ended on its own (its Xen guest is gone): the disk serves on without it. */
  #exportEnded(entry: Entry, name: string, reason: string): void {
    const record = entry.record;
    record.exports = record.exports.filter((e) => e !== name);
    record.reason = `${name} ended: ${reason}`;
    this.#log.warn("an export ended", { disk: record.id, export: name, reason });
  }

  #exited(entry: Entry, reason: string): void {
    for (const path of entry.sockets) removeSocket(path);
    if (entry.fuse !== null) this.#abortFuse(entry);
    const record = entry.record;
    record.pid = null;
    if (this.#disks.get(record.id) !== entry) return; // detached, or never started
    if (record.state === "stopping" || record.state === "starting") return; // expected
    record.state = "failed";
    record.reason = `tapdisk ${reason}`;
    this.#log.error("tapdisk died: the disk has failed", { disk: record.id, reason });
  }

  /**
   * A child gone with its FUSE file still mounted (killed): the kernel has ended the connection,
   * but the dead mount stays on the path and a loop device on it may wait forever. Abort it
   * (every waiting request fails) and unmount it lazily, so that the path can be mounted again.
   */
  #abortFuse(entry: Entry): void {
    const path = entry.fuse!;
    // A child that could not start has undone its own mount; whatever is there is not ours.
    if (entry.child.startError !== null) return;
    try {
      if (findMount(path)?.fsType !== FUSE_TYPE) return;
      if (abortFuseMount(path)) {
        this.#log.warn("aborted the FUSE mount of a dead tapdisk", { disk: entry.record.id, path });
      }
    } catch (e) {
      this.#log.error("cannot abort the FUSE mount of a dead tapdisk", {
        disk: entry.record.id,
        path,
        error: (e as Error).message,
      });
    }
  }

  #entry(id: number): Entry {
    const entry = this.#disks.get(id);
    if (entry === undefined) throw new RequestError(`no disk ${id} (see tapd ctl list)`);
    return entry;
  }

  /** A disk whose tapdisk is serving. */
  #live(id: number): Entry {
    const entry = this.#entry(id);
    const { state, reason } = entry.record;
    if (state === "failed") throw new RequestError(`disk ${id} has failed (${reason}): detach it`);
    if (state === "starting") throw new RequestError(`disk ${id} is still starting`);
    if (state === "stopping") throw new RequestError(`disk ${id} is being detached`);
    return entry;
  }

  async #command(entry: Entry, cmd: "pause" | "resume" | "stats", reopen?: string) {
    const reply = await entry.child.request(reopen === undefined ? { cmd } : { cmd, reopen });
    if (!reply.ok) throw new RequestError(`${cmd} disk ${entry.record.id}: ${reply.error}`);
    return reply;
  }

  async pause(id: number): Promise<DiskRecord> {
    const entry = this.#live(id);
    await this.#command(entry, "pause");
    entry.record.state = "paused";
    this.#log.info("paused", { disk: id });
    return { ...entry.record };
  }

  async resume(id: number, reopen: string | null): Promise<Changed> {
    const entry = this.#live(id);
    if (reopen !== null) {
      if (entry.record.state !== "paused") {
        throw new RequestError(`resume --reopen: disk ${id} is not paused (pause it first)`);
      }
      checkSpec(reopen);
    }
    const old = entry.claims;
    let claims: ImageClaim[] | null = null;
    if (reopen !== null) {
      claims = await imageClaims(reopen, entry.record.readOnly);
      // Checked again after the wait: another request may have detached or resumed it.
      if (this.#live(id) !== entry || entry.record.state !== "paused") {
        throw new RequestError(`resume --reopen: disk ${id} is not paused any more`);
      }
      this.#checkImagesFree(claims, entry);
      entry.claims = [...old, ...claims]; // both may be open while the tapdisk switches
    }
    const reply = await this.#command(entry, "resume", reopen ?? undefined).catch((e) => {
      entry.claims = old;
      throw e;
    });
    if (entry.record.state !== "stopping") entry.record.state = "running";
    if (reopen !== null) entry.record.spec = reopen;
    if (claims !== null) entry.claims = claims;
    this.#log.info("resumed", { disk: id, spec: reopen ?? undefined });
    return withWarning({ disk: { ...entry.record } }, reply.ok ? reply.warning : undefined);
  }

  async stats(id: number): Promise<DiskStats> {
    const reply = await this.#command(this.#live(id), "stats");
    if (!reply.ok || reply.stats === undefined) throw new RequestError("tapdisk sent no stats");
    return { id, ...reply.stats };
  }

  /**
   * Stops the disk's tapdisk. A stop it refuses because its FUSE file is in use (a loop device,
   * an open descriptor) is an error reply, and the disk goes on serving in the state it was in.
   */
  async detach(id: number): Promise<void> {
    const entry = this.#entry(id);
    const state = entry.record.state;
    if (state === "stopping") throw new RequestError(`disk ${id} is being detached`);
    if (state !== "failed") {
      entry.record.state = "stopping";
      const deadline = Date.now() + STOP_TIMEOUT_MS;
      const reply = entry.child.request({ cmd: "stop" }).catch(() => null);
      if (await within(reply, STOP_TIMEOUT_MS)) {
        const r = await reply;
        if (r !== null && !r.ok && r.serving === true && entry.child.running) {
          if (entry.record.state === "stopping") entry.record.state = state;
          throw new RequestError(`detach disk ${id}: ${r.error} (the disk is still served)`);
        }
      }
      await this.#stop(entry, () => {}, Math.max(0, deadline - Date.now()));
    }
    this.#disks.delete(id);
    this.#log.info("detached", { disk: id });
  }

  /**
   * Asks a child to stop and waits for it: after `timeoutMs`, a second SIGTERM if it has a FUSE
   * file (it aborts the mount, then flushes and closes), then SIGKILL.
   */
  async #stop(entry: Entry, ask: () => unknown, timeoutMs = STOP_TIMEOUT_MS): Promise<void> {
    ask();
    if (await within(entry.child.exited, timeoutMs)) return;
    const disk = entry.record.id;
    if (entry.fuse !== null) {
      this.#log.warn("tapdisk did not stop in time: aborting its FUSE mount", { disk });
      entry.child.kill("SIGTERM");
      if (await within(entry.child.exited, FORCE_TIMEOUT_MS)) return;
    }
    this.#log.warn("tapdisk did not stop in time: killing it", { disk });
    entry.child.kill("SIGKILL");
    await entry.child.exited;
  }

  /** SIGTERM to every tapdisk (each drains, flushes, closes), waits for them all. */
  async shutdown(): Promise<void> {
    this.#stopping = true;
    await Promise.all([...this.#disks.values()].map(async (entry) => {
      if (entry.record.state === "failed") return;
      entry.record.state = "stopping";
      await this.#stop(entry, () => entry.child.kill("SIGTERM"));
    }));
    this.#disks.clear();
  }
}

function removeSocket(path: string): void {
  try {
    if (Deno.lstatSync(path).isSocket) Deno.removeSync(path);
  } catch { /* gone already */ }
}

/**
 * A disk just attached or resumed, with its tapdisk's warning about the spec (a writable raw
 * spec over an image file), which `ctl` shows.
 */
export interface Changed {
  disk: DiskRecord;
  warning?: string;
}

function withWarning(changed: Changed, warning: string | undefined): Changed {
  return warning === undefined ? changed : { ...changed, warning };
}
