/**
 * The C test frontend (tests/ring/c/frontend.c): built once per test module with gcc against
 * Xen's public headers (libxen-dev), then run against `tapd tapdisk --ring unix:PATH`.
 */
import assert from "node:assert/strict";

const SOURCE = new URL("./c/frontend.c", import.meta.url).pathname;
const XEN_HEADER = "/usr/include/xen/io/blkif.h";

let built: Promise<string> | undefined;

/** Compiles the frontend into a temporary directory (once) and returns the binary's path. */
export function buildFrontend(): Promise<string> {
  built ??= compile();
  return built;
}

async function compile(): Promise<string> {
  try {
    Deno.statSync(XEN_HEADER);
  } catch {
    throw new Error(`${XEN_HEADER} is missing: install libxen-dev (Xen's public headers)`);
  }
  const dir = Deno.makeTempDirSync({ dir: "/var/tmp", prefix: "tapd-ring-frontend-" });
  globalThis.addEventListener("unload", () => {
    try {
      Deno.removeSync(dir, { recursive: true });
    } catch { /* already gone */ }
  });
  const bin = `${dir}/frontend`;
  let out: Deno.CommandOutput;
  try {
    out = await new Deno.Command("gcc", {
      args: ["-O2", "-Wall", "-Werror", "-o", bin, SOURCE],
      stdout: "piped",
      stderr: "piped",
    }).output();
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) throw new Error("gcc not found: install gcc");
    throw e;
  }
  if (out.code !== 0) {
    const dec = new TextDecoder();
    throw new Error(
      `gcc failed to build ${SOURCE}:\n${dec.decode(out.stderr)}${dec.decode(out.stdout)}`,
    );
  }
  return bin;
}

export interface FrontendRun {
  code: number;
  stdout: string;
  stderr: string;
}

/**
 * Runs the frontend with `args` (e.g. [socket, "verify", ...] or ["layout"]); kills it after
 * `timeoutMs` (its own waits give up after 15 s without a notification).
 */
export async function runFrontend(
  bin: string,
  args: string[],
  timeoutMs = 60_000,
): Promise<FrontendRun> {
  const out = await new Deno.Command(bin, {
    args,
    stdout: "piped",
    stderr: "piped",
    signal: AbortSignal.timeout(timeoutMs),
  }).output();
  const dec = new TextDecoder();
  return {
    code: out.signal ? 128 : out.code,
    stdout: dec.decode(out.stdout),
    stderr: dec.decode(out.stderr) + (out.signal ? `(killed by ${out.signal})` : ""),
  };
}

/** Fails unless the run exited 0 and printed `ok N`; returns N. */
export function assertFrontendOk(run: FrontendRun, what: string): number {
  const m = /^ok (\d+)$/m.exec(run.stdout);
  assert.ok(
    run.code === 0 && m,
    `${what}: frontend exited ${run.code}: ${run.stdout.trim()} ${run.stderr.trim()}`,
  );
  return Number(m[1]);
}
