/** Where tapd keeps its own files: $TAPD_STATE_DIR, else /var/lib/tapd for root, else ~/.local/state/tapd. */
import { FileHandle } from "../ffi/file.ts";
import { O_CREAT, O_EXCL, O_RDWR } from "../ffi/constants.ts";
import { openDisk } from "../drivers/mod.ts";
import { sharedPool } from "../io/buffer_pool.ts";

export function stateDir(): string {
  const env = Deno.env.get("TAPD_STATE_DIR");
  if (env) return env;
  if (Deno.uid() === 0) return "/var/lib/tapd";
  return `${Deno.env.get("XDG_STATE_HOME") ?? `${Deno.env.get("HOME") ?? "."}/.local/state`}/tapd`;
}

/** Size of the embedded default image. */
export const DEFAULT_IMAGE_SIZE = 1024 ** 3;

/**
 * The default raw image (created once, fully written so that reads reach the device rather than
 * file-system holes). Returns its path.
 */
export async function ensureDefaultImage(): Promise<string> {
  const dir = stateDir();
  const path = `${dir}/default.img`;
  try {
    if (Deno.statSync(path).size === DEFAULT_IMAGE_SIZE) return path;
  } catch (e) {
    if (!(e instanceof Deno.errors.NotFound)) throw e;
  }
  Deno.mkdirSync(dir, { recursive: true });
  const partial = `${path}.partial`;
  try {
    Deno.removeSync(partial);
  } catch { /* not there */ }
  using file = FileHandle.open(partial, O_RDWR | O_CREAT | O_EXCL, 0o600);
  file.truncate(DEFAULT_IMAGE_SIZE);
  const disk = await openDisk({ type: "aio", path: partial, readOnly: false, persist: false }, {
    direct: "auto",
  });
  try {
    const chunk = 4 * 1024 * 1024;
    const buf = sharedPool.take(chunk);
    for (let i = 0; i < buf.length; i += 4) {
      new DataView(buf.buffer, buf.byteOffset).setUint32(i, i * 2654435761, true);
    }
    const writes: Promise<void>[] = [];
    for (let off = 0; off < DEFAULT_IMAGE_SIZE; off += chunk) {
      writes.push(disk.write(off, buf));
      if (writes.length === 16) await writes.shift();
    }
    await Promise.all(writes);
    await disk.flush();
    sharedPool.give(buf);
  } finally {
    await disk.close();
  }
  Deno.renameSync(partial, path);
  return path;
}
