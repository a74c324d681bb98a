/**
 * The progress bar of the long conversions: drawn on a terminal (a pseudo-terminal made by
 * script(1)), never when stderr is a pipe or with --quiet.
 */
import assert from "node:assert/strict";
import { rng } from "../util.ts";
import { inTempDir, makeRaw, MiB, tapdOk } from "./helpers.ts";

const root = new URL("../../", import.meta.url).pathname;

function scriptAvailable(): boolean {
  try {
    return new Deno.Command("script", { args: ["--version"], stdout: "null", stderr: "null" })
      .outputSync().success;
  } catch {
    return false;
  }
}

/** Runs tapd on a pseudo-terminal; returns what it wrote there (stdout and stderr). */
async function onTerminal(args: string[]): Promise<string> {
  const r = await new Deno.Command("script", {
    args: ["-qec", [`${root}tapd`, ...args].join(" "), "/dev/null"],
    stdout: "piped",
    stderr: "piped",
  }).output();
  const text = new TextDecoder().decode(r.stdout);
  assert.ok(r.success, `tapd ${args.join(" ")} on a terminal: ${text}`);
  return text;
}

const noScript = scriptAvailable() ? "" : " (skipped: no script(1))";

Deno.test({
  name: `img2qcow and qcow2raw draw a progress bar on a terminal only${noScript}`,
  ignore: noScript !== "",
  fn: async () => {
    await inTempDir(async (dir) => {
      const src = `${dir}/src.raw`;
      makeRaw(src, 12 * MiB, rng(1));
      const shown = await onTerminal(["img2qcow", `${dir}/a.qcow`, src]);
      assert.ok(shown.includes("\r\x1b[Kimg2qcow ["), "redraws the line in place");
      assert.match(shown, /img2qcow \[#{30}\] 100% {2}12 MiB of 12 MiB/);
      assert.ok(shown.endsWith("\n"));
      const quiet = await onTerminal(["img2qcow", "-q", `${dir}/b.qcow`, src]);
      assert.equal(quiet, "");
      const back = await onTerminal(["qcow2raw", `${dir}/a.raw`, `${dir}/a.qcow`]);
      assert.match(back, /qcow2raw \[#{30}\] 100%/);
      assert.equal(await onTerminal(["qcow2raw", "--quiet", `${dir}/b.raw`, `${dir}/a.qcow`]), "");
      // Not a terminal: nothing at all on stderr (or stdout).
      const piped = await tapdOk("img2qcow", `${dir}/c.qcow`, src);
      assert.equal(piped.stderr + piped.stdout, "");
      const piped2 = await tapdOk("qcow2raw", `${dir}/c.raw`, `${dir}/c.qcow`);
      assert.equal(piped2.stderr + piped2.stdout, "");
    });
  },
});
