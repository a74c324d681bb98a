/** Whether `deno compile` can run offline here, and the permissions the binary gets. */

/** Must match TAPD_PERMISSIONS in scripts/bootstrap.sh. */
export const PERMISSIONS: readonly string[] = ["--allow-all"];

/** null when a denort runtime is available, otherwise the reason it is not. */
export function denortAvailable(): string | null {
  const bin = Deno.env.get("DENORT_BIN");
  if (bin) {
    try {
      return Deno.statSync(bin).isFile ? null : `DENORT_BIN=${bin} is not a file`;
    } catch {
      return `DENORT_BIN=${bin} does not exist`;
    }
  }
  const version = Deno.version.deno;
  const home = Deno.env.get("HOME") ?? "";
  const denoDir = Deno.env.get("DENO_DIR") ?? `${home}/.cache/deno`;
  const zip = `${denoDir}/dl/release/v${version}/denort-x86_64-unknown-linux-gnu.zip`;
  try {
    Deno.statSync(zip);
    return null;
  } catch {
    return `no denort ${version} runtime: set DENORT_BIN=/path/to/denort-${version} ` +
      `(Deno's download server is unreachable here)`;
  }
}
