/**
 * The blkif ABI as Xen's headers lay it out (printed by the C frontend's `layout` mode) against
 * shared/specs/blktap-ring.md §1–§2, and tapd's own constants (ring/blkif.ts, ring/blktap.ts)
 * against both, when those modules exist.
 */
import assert from "node:assert/strict";
import { buildFrontend, runFrontend } from "./frontend_c.ts";

/** §1–§2 of the spec: sizes, offsets and values on x86-64. */
const SPEC: Record<string, number> = {
  REQUEST_SIZE: 112,
  RESPONSE_SIZE: 16,
  SEGMENT_SIZE: 8,
  DISCARD_SIZE: 32,
  INDIRECT_SIZE: 64,
  ENTRY_SIZE: 112,
  RING_OFFSET: 64,
  RING_SIZE: 32,
  CONST_RING_SIZE: 32,
  PAGE_SIZE: 4096,
  OFF_SRING_REQ_PROD: 0,
  OFF_SRING_REQ_EVENT: 4,
  OFF_SRING_RSP_PROD: 8,
  OFF_SRING_RSP_EVENT: 12,
  OFF_REQ_OPERATION: 0,
  OFF_REQ_NR_SEGMENTS: 1,
  OFF_REQ_HANDLE: 2,
  OFF_REQ_ID: 8,
  OFF_REQ_SECTOR_NUMBER: 16,
  OFF_REQ_SEG: 24,
  // the same offsets under the shorter names ring/blkif.ts uses
  OFF_REQ_PROD: 0,
  OFF_REQ_EVENT: 4,
  OFF_RSP_PROD: 8,
  OFF_RSP_EVENT: 12,
  OFF_OPERATION: 0,
  OFF_NR_SEGMENTS: 1,
  OFF_HANDLE: 2,
  OFF_ID: 8,
  OFF_SECTOR_NUMBER: 16,
  OFF_SEG: 24,
  OFF_RSP_ID: 0,
  OFF_RSP_OPERATION: 8,
  OFF_RSP_STATUS: 10,
  OFF_SEG_GREF: 0,
  OFF_SEG_FIRST_SECT: 4,
  OFF_SEG_LAST_SECT: 5,
  OFF_DISCARD_OPERATION: 0,
  OFF_DISCARD_FLAG: 1,
  OFF_DISCARD_HANDLE: 2,
  OFF_DISCARD_ID: 8,
  OFF_DISCARD_SECTOR_NUMBER: 16,
  OFF_DISCARD_NR_SECTORS: 24,
  OFF_INDIRECT_OPERATION: 0,
  OFF_INDIRECT_INDIRECT_OP: 1,
  OFF_INDIRECT_NR_SEGMENTS: 2,
  OFF_INDIRECT_ID: 8,
  OFF_INDIRECT_SECTOR_NUMBER: 16,
  OFF_INDIRECT_HANDLE: 24,
  OFF_INDIRECT_GREFS: 28,
  OP_READ: 0,
  OP_WRITE: 1,
  OP_WRITE_BARRIER: 2,
  OP_FLUSH_DISKCACHE: 3,
  OP_RESERVED_1: 4,
  OP_DISCARD: 5,
  OP_INDIRECT: 6,
  RSP_OKAY: 0,
  RSP_ERROR: -1,
  RSP_EOPNOTSUPP: -2,
  MAX_SEGMENTS_PER_REQUEST: 11,
  MAX_SEGMENTS: 11,
  MAX_INDIRECT_PAGES_PER_REQUEST: 8,
  DISCARD_SECURE: 1,
};

/** §3 of the spec: the blktap device's ioctls, modes and mmap geometry. */
const BLKTAP_SPEC: Record<string, number> = {
  IOCTL_KICK_FE: 1,
  IOCTL_KICK_BE: 2,
  IOCTL_SETMODE: 3,
  IOCTL_SENDPID: 4,
  IOCTL_NEWINTF: 5,
  IOCTL_MINOR: 6,
  IOCTL_MAJOR: 7,
  IOCTL_QUERY_ALLOC_REQS: 8,
  IOCTL_FREEINTF: 9,
  IOCTL_NEWINTF_EXT: 50,
  IOCTL_PRINT_IDXS: 100,
  MODE_PASSTHROUGH: 0,
  MODE_INTERCEPT_FE: 1,
  MODE_INTERCEPT_BE: 2,
  MODE_INTERPOSE: 3,
  RING_PAGES: 1,
  MAX_PENDING_REQS: 32,
  MMAP_PAGES: 352,
};

/** Keys tapd's BLKIF_LAYOUT must have for the comparison to mean something. */
const REQUIRED_LAYOUT_KEYS = ["REQUEST_SIZE", "RESPONSE_SIZE", "RING_SIZE", "RING_OFFSET"];

/**
 * An export of one of tapd's modules, or a reason why there is none. A module that exists but
 * does not load is an error, not a skip. The specifier is computed so that type checking does not
 * need the module to exist.
 */
async function optionalExport(
  path: string,
  name: string,
): Promise<{ value: Record<string, unknown> } | { skip: string }> {
  const url = new URL(`../../${path}`, import.meta.url);
  try {
    Deno.statSync(url);
  } catch {
    return { skip: `${path} does not exist yet` };
  }
  const mod = await import(url.href) as Record<string, unknown>;
  const value = mod[name];
  if (value === undefined) return { skip: `${path} does not export ${name} yet` };
  assert.ok(typeof value === "object" && value !== null, `${path}: ${name} is not an object`);
  return { value: value as Record<string, unknown> };
}

async function cLayout(): Promise<Map<string, number>> {
  const bin = await buildFrontend();
  const run = await runFrontend(bin, ["layout"]);
  assert.equal(run.code, 0, `frontend layout failed: ${run.stdout}${run.stderr}`);
  const values = new Map<string, number>();
  for (const line of run.stdout.trim().split("\n")) {
    const m = /^([A-Z0-9_]+) (-?\d+)$/.exec(line);
    assert.ok(m, `odd layout line: ${line}`);
    values.set(m[1], Number(m[2]));
  }
  return values;
}

Deno.test("ring layout: Xen's headers agree with the spec (sizes, offsets, ops, statuses)", async () => {
  const c = await cLayout();
  for (const [key, want] of Object.entries(SPEC)) {
    assert.equal(c.get(key), want, `${key}: C says ${c.get(key)}, the spec ${want}`);
  }
  for (const key of c.keys()) assert.ok(key in SPEC, `the spec table lacks ${key}`);
});

const blkif = await optionalExport("ring/blkif.ts", "BLKIF_LAYOUT");
Deno.test({
  name: "skip" in blkif
    ? `ring layout: tapd's BLKIF_LAYOUT matches C (skipped: ${blkif.skip})`
    : "ring layout: tapd's BLKIF_LAYOUT matches C",
  ignore: "skip" in blkif,
  async fn() {
    if (!("value" in blkif)) return;
    const ours = blkif.value;
    const c = await cLayout();
    for (const key of REQUIRED_LAYOUT_KEYS) {
      assert.ok(key in ours, `BLKIF_LAYOUT has no ${key}`);
    }
    const unmatched: string[] = [];
    let compared = 0;
    for (const [key, value] of Object.entries(ours)) {
      if (typeof value !== "number") continue;
      const want = c.get(key);
      if (want === undefined) {
        unmatched.push(key);
        continue;
      }
      assert.equal(value, want, `BLKIF_LAYOUT.${key} = ${value}, Xen's headers say ${want}`);
      compared++;
    }
    // Names the C side does not print are listed, not failed: they may be tapd's own additions.
    if (unmatched.length) {
      console.log(`BLKIF_LAYOUT keys with no C counterpart: ${unmatched.join(", ")}`);
    }
    assert.ok(compared >= REQUIRED_LAYOUT_KEYS.length, "nothing compared");
  },
});

const blktap = await optionalExport("ring/blktap.ts", "BLKTAP");
Deno.test({
  name: "skip" in blktap
    ? `ring layout: tapd's BLKTAP constants match the spec (skipped: ${blktap.skip})`
    : "ring layout: tapd's BLKTAP constants match the spec",
  ignore: "skip" in blktap,
  fn() {
    if (!("value" in blktap)) return;
    for (const [key, want] of Object.entries(BLKTAP_SPEC)) {
      assert.equal(blktap.value[key], want, `BLKTAP.${key} = ${blktap.value[key]}, spec ${want}`);
    }
  },
});
