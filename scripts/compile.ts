/**
 * `deno task compile`: builds the single binary `./tapd-bin` with `deno compile`, permissions baked
 * in. deno compile needs the `denort` runtime of exactly this Deno version; it is downloaded from
 * Deno's servers, which this environment cannot reach, so set DENORT_BIN=/path/to/denort (or place
 * the release zip in $DENO_DIR/dl/release/v<version>/). Without one this script says so and exits 3.
 */
import { denortAvailable, PERMISSIONS } from "./denort.ts";

const out = Deno.args[0] ?? new URL("../tapd-bin", import.meta.url).pathname;
const why = denortAvailable();
if (why !== null) {
  console.error(`compile: skipped: ${why}`);
  Deno.exit(3);
}
const main = new URL("../main.ts", import.meta.url).pathname;
// Worker modules are loaded by URL at run time: the binary must carry them.
const workers = ["../fuse/io_thread.ts", "../fuse/uring_thread.ts"].map((w) =>
  new URL(w, import.meta.url).pathname
);
const { code } = await new Deno.Command(Deno.execPath(), {
  args: [
    "compile",
    "--quiet",
    "--no-prompt",
    ...PERMISSIONS,
    ...workers.flatMap((w) => ["--include", w]),
    "--output",
    out,
    main,
  ],
  stdout: "inherit",
  stderr: "inherit",
}).output();
if (code === 0) console.log(`compile: wrote ${out}`);
Deno.exit(code);
