/**
 * Helpers for the FUSE tests: `tapd serve SPEC --fuse PATH` as a child process (the mount is
 * served by another process, so the test may use the file with blocking calls), loop devices,
 * ext4 trees with checksums, and the checks for stuck mounts and D-state processes.
 */
import assert from "node:assert/strict";
import { describe, ROOT, run, runOk, sleep } from "../nbd/helpers.ts";
import { assertBytes, loopUnavailable, rng } from "../util.ts";
import { findMount, resolveMountPoint } from "../../fuse/mount.ts";
import { openDisk } from "../../drivers/mod.ts";
import { FuseExport, type FuseExportOptions } from "../../fuse/export.ts";
import { DiskGate } from "../../serve/gate.ts";

export { describe, ROOT, run, runOk, sleep };
export const KiB = 1024, MiB = 1024 * KiB;

/** Why FUSE mounts cannot be tested here, or null. */
export function fuseUnavailable(): string | null {
  if (Deno.uid() !== 0) return "needs root";
  try {
    Deno.statSync("/dev/fuse");
  } catch {
    return "no /dev/fuse";
  }
  return null;
}

let loopReason: string | null | undefined;
/** Why FUSE + loop devices cannot be tested here, or null. */
export function fuseLoopUnavailable(): string | null {
  const fuse = fuseUnavailable();
  if (fuse !== null) return fuse;
  loopReason ??= loopUnavailable();
  return loopReason;
}

/** A running `tapd serve SPEC --fuse PATH`. */
export class FuseServe {
  readonly #child: Deno.ChildProcess;
  readonly path: string;
  #stderr = "";
  readonly #status: Promise<Deno.CommandStatus>;
  readonly #drained: Promise<void>;

  private constructor(child: Deno.ChildProcess, path: string, onLine: (line: string) => void) {
    this.#child = child;
    this.path = path;
    this.#status = child.status;
    const dec = new TextDecoder();
    const out = (async () => {
      let buf = "";
      try {
        for await (const chunk of child.stdout) {
          buf += dec.decode(chunk, { stream: true });
          let nl;
          while ((nl = buf.indexOf("\n")) >= 0) {
            onLine(buf.slice(0, nl));
            buf = buf.slice(nl + 1);
          }
        }
      } catch { /* gone */ }
    })();
    const err = (async () => {
      try {
        for await (const chunk of child.stderr) {
          this.#stderr = (this.#stderr + dec.decode(chunk, { stream: true })).slice(-64 * KiB);
        }
      } catch { /* gone */ }
    })();
    this.#drained = Promise.all([out, err]).then(() => {});
  }

  /** Starts it and waits (up to 20 s) until it prints the mount path. */
  static async start(
    spec: string,
    path: string,
    { readOnly = false, extra = [] as string[] } = {},
  ): Promise<FuseServe> {
    const args = ["serve", spec, "--fuse", path, ...(readOnly ? ["--read-only"] : []), ...extra];
    const child = new Deno.Command(`${ROOT}tapd`, {
      args,
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
      env: { TAPD_LOG_LEVEL: "info" },
    }).spawn();
    let ready!: () => void;
    const printed = new Promise<void>((resolve) => ready = resolve);
    const serve = new FuseServe(child, path, (line) => {
      if (line === path) ready();
    });
    const timeout = sleep(20_000).then(() => "timeout" as const);
    const exited = serve.#status.then(() => "exited" as const);
    const outcome = await Promise.race([printed.then(() => "ready" as const), exited, timeout]);
    if (outcome !== "ready") {
      if (outcome === "timeout") serve.kill();
      const status = await serve.#status;
      await serve.#drained;
      throw new Error(
        `tapd ${args.join(" ")} did not mount (${outcome}, exit ${status.code}):\n${serve.stderr}`,
      );
    }
    return serve;
  }

  get pid(): number {
    return this.#child.pid;
  }

  get stderr(): string {
    return this.#stderr;
  }

  signal(sig: Deno.Signal): void {
    try {
      this.#child.kill(sig);
    } catch { /* already gone */ }
  }

  kill(): void {
    this.signal("SIGKILL");
  }

  /** Waits for the exit (killing it after `timeoutMs`). */
  async wait(timeoutMs = 30_000): Promise<Deno.CommandStatus> {
    const timer = setTimeout(() => this.kill(), timeoutMs);
    try {
      const status = await this.#status;
      await this.#drained;
      return status;
    } finally {
      clearTimeout(timer);
    }
  }

  /** SIGTERM, then the exit status; fails the test unless it exits 0. */
  async stop(): Promise<void> {
    this.signal("SIGTERM");
    const status = await this.wait();
    assert.equal(status.code, 0, `tapd serve exited ${status.code}:\n${this.#stderr}`);
  }
}

/** Serves `spec` at `path` for `fn`; stopped cleanly afterwards (killed if `fn` throws). */
export async function withFuse<T>(
  spec: string,
  path: string,
  fn: (serve: FuseServe) => Promise<T>,
  options: { readOnly?: boolean; extra?: string[] } = {},
): Promise<T> {
  const serve = await FuseServe.start(spec, path, options);
  let ok = false;
  try {
    const result = await fn(serve);
    ok = true;
    return result;
  } finally {
    if (ok) await serve.stop();
    else {
      serve.kill();
      await serve.wait();
      await cleanupMount(path);
    }
  }
}

/** After a failure: lazily unmount whatever is left at `path`. */
export async function cleanupMount(path: string): Promise<void> {
  for (let i = 0; i < 3 && findMount(resolveMountPoint(path)) !== null; i++) {
    await run("umount", ["-l", path]);
  }
}

/**
 * Serves `spec` as a FUSE file, attaches a direct-I/O loop device to it, runs `fn`, and undoes it
 * all (`extra`: more `tapd serve` options).
 */
export async function onLoop(
  spec: string,
  mp: string,
  fn: (loop: string) => Promise<void>,
  extra: string[] = [],
): Promise<void> {
  await withFuse(spec, mp, async () => {
    const loop = await loopAttach(mp);
    try {
      await fn(loop);
    } finally {
      await loopDetach(loop);
    }
  }, { extra });
}

/** Mounts `loop` at `mnt` (made if missing) for `fn`. */
export async function mounted(loop: string, mnt: string, fn: () => Promise<void>): Promise<void> {
  Deno.mkdirSync(mnt, { recursive: true });
  await runOk("mount", [loop, mnt]);
  try {
    await fn();
  } finally {
    await runOk("umount", [mnt]);
  }
}

/** Attaches a loop device in direct-I/O mode; returns its path. */
export async function loopAttach(file: string): Promise<string> {
  const r = await runOk("losetup", ["--direct-io=on", "--find", "--show", file]);
  const dev = r.stdout.trim();
  const dio = (await runOk("losetup", ["--list", "--noheadings", "--output", "DIO", dev])).stdout;
  assert.equal(dio.trim(), "1", `${dev} is not in direct-I/O mode`);
  return dev;
}

export async function loopDetach(dev: string): Promise<void> {
  await runOk("losetup", ["-d", dev]);
}

/** Files of the test tree: relative path → contents (seeded, varied sizes). */
export function makeTree(seed: number, files = 40): Map<string, Uint8Array> {
  const tree = new Map<string, Uint8Array>();
  let x = seed >>> 0 || 1;
  const next = () => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return (x >>> 0) / 0x100000000;
  };
  for (let i = 0; i < files; i++) {
    const size = i % 7 === 0 ? Math.floor(next() * 3 * MiB) : Math.floor(next() * 64 * KiB);
    const data = new Uint8Array(size);
    for (let j = 0; j < size; j += 4) {
      const w = Math.floor(next() * 0x100000000);
      data[j] = w & 0xff;
      if (j + 1 < size) data[j + 1] = (w >>> 8) & 0xff;
      if (j + 2 < size) data[j + 2] = (w >>> 16) & 0xff;
      if (j + 3 < size) data[j + 3] = w >>> 24;
    }
    tree.set(`d${i % 5}/sub${i % 3}/f${i}.bin`, data);
  }
  return tree;
}

async function sha256(data: Uint8Array<ArrayBuffer>): Promise<string> {
  const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", data));
  return Array.from(digest, (b) => b.toString(16).padStart(2, "0")).join("");
}

/** Writes the tree under `dir` and returns each file's checksum. */
export async function writeTree(
  dir: string,
  tree: Map<string, Uint8Array>,
): Promise<Map<string, string>> {
  const sums = new Map<string, string>();
  for (const [name, data] of tree) {
    const path = `${dir}/${name}`;
    await Deno.mkdir(path.slice(0, path.lastIndexOf("/")), { recursive: true });
    await Deno.writeFile(path, data);
    sums.set(name, await sha256(new Uint8Array(data)));
  }
  return sums;
}

/** Checks every file under `dir` against the checksums. */
export async function verifyTree(dir: string, sums: Map<string, string>): Promise<void> {
  for (const [name, sum] of sums) {
    const data = await Deno.readFile(`${dir}/${name}`);
    assert.equal(await sha256(data), sum, `checksum of ${name}`);
  }
}

/** Processes in uninterruptible sleep (D state) right now: "pid comm" each. */
export function dStateProcesses(): string[] {
  const found: string[] = [];
  for (const entry of Deno.readDirSync("/proc")) {
    if (!/^\d+$/.test(entry.name)) continue;
    try {
      const stat = Deno.readTextFileSync(`/proc/${entry.name}/stat`);
      const close = stat.lastIndexOf(")");
      if (stat[close + 2] === "D") found.push(`${entry.name} ${stat.slice(0, close + 1)}`);
    } catch { /* exited */ }
  }
  return found;
}

/** A sparse raw image of `size` bytes. */
export function rawImage(path: string, size: number): void {
  const f = Deno.openSync(path, { create: true, write: true, truncate: true });
  f.truncateSync(size);
  f.close();
}

/** An empty regular file to mount on. */
export function mountPointFile(path: string): string {
  Deno.writeFileSync(path, new Uint8Array(0));
  return path;
}

/** Bytes allocated to a file (st_blocks × 512). */
export function allocated(path: string): number {
  return (Deno.statSync(path).blocks ?? 0) * 512;
}

/** Whether anything is mounted at `path`. */
export function isMounted(path: string): boolean {
  return findMount(resolveMountPoint(path)) !== null;
}

/** Processes in D state waiting on FUSE (by their wait channel). */
export function stuckOnFuse(): string[] {
  const stuck: string[] = [];
  for (const entry of Deno.readDirSync("/proc")) {
    if (!/^\d+$/.test(entry.name)) continue;
    try {
      const stat = Deno.readTextFileSync(`/proc/${entry.name}/stat`);
      if (stat[stat.lastIndexOf(")") + 2] !== "D") continue;
      const wchan = Deno.readTextFileSync(`/proc/${entry.name}/wchan`);
      const stack = (() => {
        try {
          return Deno.readTextFileSync(`/proc/${entry.name}/stack`);
        } catch {
          return "";
        }
      })();
      if (/fuse|request_wait_answer/.test(wchan + stack)) stuck.push(`${entry.name} ${wchan}`);
    } catch { /* exited */ }
  }
  return stuck;
}

/** Polls `cond` every 100 ms for up to `ms`. */
export async function eventually(cond: () => boolean, ms: number): Promise<boolean> {
  for (const end = Date.now() + ms; Date.now() < end; await sleep(100)) if (cond()) return true;
  return cond();
}

/** Reads up to `length` bytes of `path` at `offset` (short at its end). */
export function pread(path: string, offset: number, length: number): Uint8Array {
  using f = Deno.openSync(path, { read: true });
  f.seekSync(offset, Deno.SeekMode.Start);
  const buf = new Uint8Array(length);
  let got = 0;
  while (got < length) {
    const n = f.readSync(buf.subarray(got));
    if (n === null) break;
    got += n;
  }
  return buf.subarray(0, got);
}

/** Writes all of `data` to `path` at `offset`. */
export function pwrite(path: string, offset: number, data: Uint8Array): void {
  using f = Deno.openSync(path, { write: true });
  f.seekSync(offset, Deno.SeekMode.Start);
  let done = 0;
  while (done < data.length) done += f.writeSync(data.subarray(done));
}

/** Re-attaches and checks every tree, then `e2fsck -fn`. */
export async function verifyAll(
  spec: string,
  mp: string,
  mnt: string,
  trees: Map<string, string>[],
): Promise<void> {
  await onLoop(spec, mp, async (loop) => {
    await mounted(loop, mnt, async () => {
      for (const sums of trees) await verifyTree(mnt, sums);
    });
    await runOk("e2fsck", ["-fn", loop]);
  });
}

/** mkfs.ext4 + a tree on a fresh disk; returns the tree's checksums. */
export async function makeFileSystem(
  spec: string,
  mp: string,
  mnt: string,
  seed: number,
  extra: string[] = [],
) {
  let sums = new Map<string, string>();
  await onLoop(spec, mp, async (loop) => {
    await runOk("mkfs.ext4", ["-q", "-F", loop]);
    await mounted(loop, mnt, async () => {
      sums = await writeTree(`${mnt}`, makeTree(seed));
    });
  }, extra);
  return sums;
}

/**
 * For an export served in this process by a data path off the event loop (I/O threads, the
 * io_uring ring): `ctl pause` holds its direct writes until resume, and after a resume on another
 * raw image every write goes there. `serve(img, fn)` mounts `tap:aio:img` at `mp` and runs `fn`
 * with the disk's gate.
 */
export async function checkPauseAndReopen(
  dir: string,
  mp: string,
  seed: number,
  serve: (img: string, fn: (gate: DiskGate) => Promise<void>) => Promise<void>,
): Promise<void> {
  const img = `${dir}/disk.img`, next = `${dir}/next.img`;
  rawImage(img, 8 * MiB);
  rawImage(next, 8 * MiB);
  const one = rng(seed).fill(new Uint8Array(256 * KiB)),
    two = rng(seed + 1).fill(new Uint8Array(256 * KiB));
  Deno.writeFileSync(`${dir}/one`, one);
  Deno.writeFileSync(`${dir}/two`, two);
  const zeros = new Uint8Array(one.length);
  const slice = (path: string, at: number) => pread(path, at, one.length);
  const write = (from: string, at: number) =>
    run("dd", [
      `if=${from}`,
      `of=${mp}`,
      "bs=64k",
      `seek=${at / (64 * KiB)}`,
      "conv=notrunc",
      "oflag=direct",
      "status=none",
    ]);
  await serve(img, async (gate) => {
    await gate.pause();
    let finished = false;
    const pending = write(`${dir}/one`, MiB).finally(() => finished = true);
    await sleep(500);
    assert.equal(finished, false, "a write completed while the disk was paused");
    assertBytes(slice(img, MiB), zeros, "the image while paused");
    await gate.resume();
    const w = await pending;
    assert.equal(w.code, 0, w.stderr);
    assertBytes(slice(img, MiB), one, "the image after resume");

    await gate.pause();
    await gate.resume(await openDisk(`tap:aio:${next}`, {}));
    const w2 = await write(`${dir}/two`, 2 * MiB);
    assert.equal(w2.code, 0, w2.stderr);
    assertBytes(slice(next, 2 * MiB), two, "the new image");
    assertBytes(slice(img, 2 * MiB), zeros, "the old image");
  });
}

/** `p`, or a rejection naming `what` after `ms`. */
async function within<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const late = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: still waiting after ${ms} ms`)), ms);
  });
  try {
    return await Promise.race([p, late]);
  } finally {
    clearTimeout(timer);
  }
}

/**
 * A thread of the export (an I/O thread or a ring thread) fails with a write of the disk in
 * flight (TAPD_FAILPOINT=fuse-thread): the export ends its connection, so the writer gets an
 * error instead of waiting for ever; the gate closes (the fence holds nothing of the thread's);
 * and the same path mounts and serves again.
 */
export async function checkLostRequests(
  dir: string,
  mp: string,
  options: FuseExportOptions,
  failure: RegExp,
): Promise<void> {
  const img = `${dir}/lost.img`;
  rawImage(img, 8 * MiB);
  const data = rng(41).fill(new Uint8Array(256 * KiB));
  Deno.writeFileSync(`${dir}/lost.data`, data);
  const write = () =>
    run("timeout", [
      "20",
      "dd",
      `if=${dir}/lost.data`,
      `of=${mp}`,
      "bs=64k",
      "conv=notrunc",
      "oflag=direct",
      "status=none",
    ]);
  const gate = new DiskGate(await openDisk(`tap:aio:${img}`, {}));
  try {
    const fuse = new FuseExport(gate, mp, options);
    Deno.env.set("TAPD_FAILPOINT", "fuse-thread");
    try {
      await fuse.mount();
      const w = await write();
      assert.notEqual(w.code, 124, "the write waited for a reply that never came");
      assert.notEqual(w.code, 0, "the write succeeded although its thread failed");
    } finally {
      Deno.env.delete("TAPD_FAILPOINT");
    }
    await within(fuse.ended, 10_000, "the export's end");
    assert.match(fuse.failure ?? "", failure);
    await fuse.close();
    assert.equal(isMounted(mp), false, "the path is still mounted");
  } finally {
    await cleanupMount(mp);
    await within(gate.close(), 10_000, "closing the disk");
  }
  const again = new DiskGate(await openDisk(`tap:aio:${img}`, {}));
  try {
    const fuse = new FuseExport(again, mp, options);
    await fuse.mount();
    const w = await write();
    assert.equal(w.code, 0, w.stderr);
    await fuse.close();
    assert.equal(fuse.failure, null);
  } finally {
    await cleanupMount(mp);
    await again.close();
  }
  assertBytes(pread(img, 0, data.length), data, "the image after mounting again");
}
