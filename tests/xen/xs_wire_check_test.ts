/**
 * The xenstore wire constants in xen/xenstore/wire.ts against what a C program built with gcc
 * against Xen's `/usr/include/xen/io/xs_wire.h` (libxen-dev) prints (tests/xen/c/xs_wire_check.c).
 * Skipped, with a note, when gcc or the header is missing.
 */
import assert from "node:assert/strict";
import {
  ABS_PATH_MAX,
  HEADER_SIZE,
  PAYLOAD_MAX,
  REL_PATH_MAX,
  XS_ERRORS,
  XsType,
} from "../../xen/xenstore/wire.ts";

const SOURCE = new URL("./c/xs_wire_check.c", import.meta.url).pathname;
const HEADER = "/usr/include/xen/io/xs_wire.h";

interface HeaderValues {
  types: Record<string, number>;
  debug: number;
  type_count: number;
  sockmsg_size: number;
  sockmsg_offsets: number[];
  payload_max: number;
  abs_path_max: number;
  rel_path_max: number;
  errors: string[];
}

/** The values the C program prints, or why they cannot be had here. */
async function headerValues(): Promise<HeaderValues | string> {
  try {
    Deno.statSync(HEADER);
  } catch {
    return `${HEADER} is missing (install libxen-dev)`;
  }
  const dir = Deno.makeTempDirSync({ prefix: "xs-wire-check-" });
  try {
    const bin = `${dir}/xs_wire_check`;
    let cc: Deno.CommandOutput;
    try {
      cc = await new Deno.Command("gcc", {
        args: ["-Wall", "-Wextra", "-Werror", "-o", bin, SOURCE],
      }).output();
    } catch (e) {
      if (e instanceof Deno.errors.NotFound) return "gcc is not installed";
      throw e;
    }
    if (!cc.success) throw new Error(`gcc failed:\n${new TextDecoder().decode(cc.stderr)}`);
    const out = await new Deno.Command(bin).output();
    assert.ok(out.success, "xs_wire_check ran");
    return JSON.parse(new TextDecoder().decode(out.stdout));
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
}

const values = await headerValues();
const skip = typeof values === "string";
if (typeof values === "string") console.log(`SKIPPING the xs_wire.h checks: ${values}`);

Deno.test({
  name: "xenstore wire constants match xen/io/xs_wire.h",
  ignore: skip,
  fn() {
    const c = values as HeaderValues;
    assert.deepEqual({ ...XsType }, c.types);
    assert.equal(c.debug, XsType.CONTROL);
    // every number below XS_TYPE_COUNT is in XsType, except the removed XS_RESTRICT (20)
    const known = new Set<number>(Object.values(XsType));
    for (let t = 0; t < c.type_count; t++) assert.equal(known.has(t), t !== 20, `type ${t}`);
    assert.equal(HEADER_SIZE, c.sockmsg_size);
    assert.deepEqual(c.sockmsg_offsets, [0, 4, 8, 12]);
    assert.equal(PAYLOAD_MAX, c.payload_max);
    assert.equal(ABS_PATH_MAX, c.abs_path_max);
    assert.equal(REL_PATH_MAX, c.rel_path_max);
    assert.deepEqual([...XS_ERRORS], c.errors);
  },
});
