/**
 * The gntdev and evtchn ABI tapd encodes by hand (ffi/gntdev.ts, ffi/evtchn.ts) against the
 * numbers and layouts a C program built against Xen's and Linux's headers (libxen-dev) prints.
 */
import assert from "node:assert/strict";
import { EVTCHN } from "../../ffi/evtchn.ts";
import { GNTDEV, GrantCopyBatch, grantStatusName } from "../../ffi/gntdev.ts";
import { exists } from "../util.ts";

const source = new URL("./c/xen_devices.c", import.meta.url).pathname;

async function headerValues(): Promise<Record<string, number> | string> {
  if (!(await exists("/usr/include/xen/sys/gntdev.h"))) return "libxen-dev is not installed";
  const dir = await Deno.makeTempDir();
  try {
    const bin = `${dir}/xen_devices`;
    const cc = await new Deno.Command("gcc", { args: ["-Wall", "-o", bin, source] }).output();
    if (!cc.success) throw new Error(new TextDecoder().decode(cc.stderr));
    const out = await new Deno.Command(bin).output();
    return JSON.parse(new TextDecoder().decode(out.stdout));
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

const c = await headerValues();
const skip = typeof c === "string";
if (skip) console.log(`skipping the Xen header checks: ${c}`);
const header = skip ? {} : c;

Deno.test({
  name: "gntdev ioctl numbers and flags match xen/sys/gntdev.h",
  ignore: skip,
  fn() {
    for (
      const key of [
        "IOCTL_MAP_GRANT_REF",
        "IOCTL_UNMAP_GRANT_REF",
        "IOCTL_SET_UNMAP_NOTIFY",
        "IOCTL_GRANT_COPY",
      ] as const
    ) assert.equal(Number(GNTDEV[key]), header[key], key);
    for (
      const key of [
        "UNMAP_NOTIFY_CLEAR_BYTE",
        "UNMAP_NOTIFY_SEND_EVENT",
        "COPY_SEGMENT_SIZE",
        "GNTCOPY_SOURCE_GREF",
        "GNTCOPY_DEST_GREF",
      ] as const
    ) assert.equal(GNTDEV[key], header[key], key);
    // the offsets ffi/gntdev.ts writes by hand
    assert.deepEqual(
      [header.MAP_OFF_COUNT, header.MAP_OFF_INDEX, header.MAP_OFF_REFS, header.MAP_GRANT_REF_SIZE],
      [0, 8, 16, 24],
    );
    assert.deepEqual([header.GRANT_REF_OFF_DOMID, header.GRANT_REF_OFF_REF], [0, 4]);
    assert.deepEqual([header.UNMAP_OFF_INDEX, header.UNMAP_OFF_COUNT, header.UNMAP_SIZE], [
      0,
      8,
      16,
    ]);
    assert.deepEqual([header.NOTIFY_OFF_ACTION, header.NOTIFY_OFF_PORT, header.NOTIFY_SIZE], [
      8,
      12,
      16,
    ]);
    assert.deepEqual([header.COPY_OFF_COUNT, header.COPY_OFF_SEGMENTS, header.COPY_SIZE], [
      0,
      8,
      16,
    ]);
    assert.equal(grantStatusName(-header.GNTST_bad_gntref), "bad_gntref");
    assert.equal(grantStatusName(-header.GNTST_permission_denied), "permission_denied");
    assert.equal(grantStatusName(-header.GNTST_no_space), "no_space");
  },
});

Deno.test({
  name: "a grant-copy segment is laid out as struct ioctl_gntdev_grant_copy_segment",
  ignore: skip,
  fn() {
    using batch = new GrantCopyBatch(4);
    // foreign → local (a write's data): source is the grant, dest our address
    batch.set(1, 0x7f1122334400, 7, 0xabcdef, 512, 3584, false);
    const seg = new DataView(batch.segmentBytes(1).buffer);
    const src = header.SEG_OFF_SOURCE, dst = header.SEG_OFF_DEST;
    assert.equal(seg.getUint32(src + header.FOREIGN_OFF_REF, true), 0xabcdef);
    assert.equal(seg.getUint16(src + header.FOREIGN_OFF_OFFSET, true), 512);
    assert.equal(seg.getUint16(src + header.FOREIGN_OFF_DOMID, true), 7);
    assert.equal(seg.getBigUint64(dst, true), 0x7f1122334400n);
    assert.equal(seg.getUint16(header.SEG_OFF_LEN, true), 3584);
    assert.equal(seg.getUint16(header.SEG_OFF_FLAGS, true), header.GNTCOPY_SOURCE_GREF);
    assert.equal(seg.getInt16(header.SEG_OFF_STATUS, true), 0);
    // local → foreign (a read's data)
    batch.set(2, 0x1000, 9, 42, 0, 4096, true);
    const out = new DataView(batch.segmentBytes(2).buffer);
    assert.equal(out.getBigUint64(src, true), 0x1000n);
    assert.equal(out.getUint32(dst + header.FOREIGN_OFF_REF, true), 42);
    assert.equal(out.getUint16(dst + header.FOREIGN_OFF_DOMID, true), 9);
    assert.equal(out.getUint16(header.SEG_OFF_FLAGS, true), header.GNTCOPY_DEST_GREF);
    assert.throws(() => batch.setCount(5), /5 grant copies > 4/);
  },
});

Deno.test({
  name: "evtchn ioctl numbers and the bind struct match xen/sys/evtchn.h",
  ignore: skip,
  fn() {
    for (const key of Object.keys(EVTCHN) as (keyof typeof EVTCHN)[]) {
      assert.equal(Number(EVTCHN[key]), header[key], key);
    }
    assert.deepEqual(
      [header.BIND_OFF_REMOTE_DOMAIN, header.BIND_OFF_REMOTE_PORT, header.BIND_INTERDOMAIN_SIZE],
      [0, 4, 8],
    );
  },
});
