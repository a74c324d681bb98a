/** Where the daemon keeps its control socket and the embedded default disk. */
import { stateDir } from "../tools/state_dir.ts";
import { createQcow } from "../tools/qcow_create.ts";

/** /run/tapd/control.sock for root, else $XDG_RUNTIME_DIR/tapd/control.sock, else the state dir. */
export function defaultControlSocket(): string {
  if (Deno.uid() === 0) return "/run/tapd/control.sock";
  const runtime = Deno.env.get("XDG_RUNTIME_DIR");
  return runtime ? `${runtime}/tapd/control.sock` : `${stateDir()}/control.sock`;
}

/** Virtual size of the default disk. */
export const DEFAULT_DISK_SIZE = 10 * 1024 ** 3;

/** The default disk, a sparse qcow image in the state dir, created the first time. */
export async function ensureDefaultQcow(dir: string): Promise<string> {
  const path = `${dir}/default.qcow`;
  try {
    Deno.statSync(path);
    return path;
  } catch (e) {
    if (!(e instanceof Deno.errors.NotFound)) throw e;
  }
  Deno.mkdirSync(dir, { recursive: true });
  await createQcow({ path, size: DEFAULT_DISK_SIZE, backing: null, reserve: false, force: false });
  return path;
}

/** Creates a socket's directory if it is missing (mode 0700: nobody else needs to look in). */
export function ensureSocketDir(path: string): void {
  const dir = path.slice(0, path.lastIndexOf("/")) || "/";
  try {
    Deno.statSync(dir);
  } catch (e) {
    if (!(e instanceof Deno.errors.NotFound)) throw e;
    Deno.mkdirSync(dir, { recursive: true, mode: 0o700 });
  }
}
