/**
 * `vmdkFormat.check` on images damaged in known ways (each problem reported, the clean image
 * clean), the format probe, and descriptor features QEMU lacks (ZERO and RDONLY extents).
 */
import assert from "node:assert/strict";
import { checkExitCode } from "../../../drivers/image_format.ts";
import { openDisk, probeFormat } from "../../../drivers/mod.ts";
import { vmdkFormat } from "../../../drivers/vmdk/format.ts";
import { rng, withTempDir } from "../../util.ts";
import { KiB, MiB, readAll } from "./helpers.ts";

/** A 4 MiB monolithicSparse image (4 KiB grains) with grains 0, 1 and 600 written. */
async function makeImage(path: string): Promise<void> {
  await vmdkFormat.create(path, { size: 4 * MiB, clusterSize: 4096 });
  const d = await openDisk(`vmdk:${path}`);
  try {
    await d.write(0, rng(1).fill(new Uint8Array(8 * KiB)));
    await d.write(600 * 4096, rng(2).fill(new Uint8Array(4096)));
  } finally {
    await d.close();
  }
}

/** Header fields of the image at `path`, and a view of its bytes. */
function layout(bytes: Uint8Array) {
  const v = new DataView(bytes.buffer);
  const rgd = Number(v.getBigUint64(48, true)), gd = Number(v.getBigUint64(56, true));
  const gt0 = v.getUint32(gd * 512, true), rgt0 = v.getUint32(rgd * 512, true);
  const gt1 = v.getUint32(gd * 512 + 4, true);
  return { v, rgd, gd, gt0, rgt0, gt1 };
}

function damaged(dir: string, name: string, fn: (b: Uint8Array) => Uint8Array | void): string {
  const bytes = Deno.readFileSync(`${dir}/a.vmdk`);
  const out = fn(bytes) ?? bytes;
  Deno.writeFileSync(`${dir}/${name}`, out);
  return `${dir}/${name}`;
}

Deno.test("vmdk check: a clean image, then each kind of damage", async () => {
  await withTempDir(async (dir) => {
    await makeImage(`${dir}/a.vmdk`);
    const clean = await vmdkFormat.check(`${dir}/a.vmdk`);
    assert.deepEqual(clean, { format: "vmdk", errors: [], leaks: [], allocated: 3, total: 1024 });
    assert.equal(checkExitCode(clean), 0);
    const expect = async (path: string, re: RegExp, leaks = false) => {
      const r = await vmdkFormat.check(path);
      const list = leaks ? r.leaks : r.errors;
      assert.ok(list.some((m) => re.test(m)), `${path}: ${JSON.stringify(r)}`);
      assert.equal(checkExitCode(r), leaks && r.errors.length === 0 ? 3 : 2);
    };
    await expect(
      damaged(dir, "outside.vmdk", (b) => {
        const { v, gt0 } = layout(b);
        v.setUint32(gt0 * 512, b.length / 512 + 100, true);
      }),
      /points outside the file/,
    );
    await expect(
      damaged(dir, "twice.vmdk", (b) => {
        const { v, gt0, rgt0 } = layout(b);
        const e = v.getUint32(gt0 * 512, true);
        v.setUint32(gt0 * 512 + 4, e, true);
        v.setUint32(rgt0 * 512 + 4, e, true);
      }),
      /point at the same grain/,
    );
    await expect(
      damaged(dir, "redundant.vmdk", (b) => {
        const { v, rgt0 } = layout(b);
        v.setUint32(rgt0 * 512, 12345, true);
      }),
      /redundant grain table says/,
    );
    await expect(
      damaged(dir, "gd.vmdk", (b) => {
        const { v, gd } = layout(b);
        v.setUint32(gd * 512 + 4, b.length / 512 + 5, true);
      }),
      /lies outside the file/,
    );
    await expect(
      damaged(dir, "meta.vmdk", (b) => {
        const { v, gt0, rgt0 } = layout(b);
        v.setUint32(gt0 * 512 + 8, 3, true);
        v.setUint32(rgt0 * 512 + 8, 3, true);
      }),
      /points into the metadata/,
    );
    await expect(
      damaged(dir, "descriptor.vmdk", (b) => {
        b[512 + 32] = "X".charCodeAt(0); // "CID=" becomes "XID="
      }),
      /CID/,
    );
    await expect(
      damaged(dir, "parent.vmdk", (b) => {
        const text = new TextEncoder().encode('parentFileNameHint="gone.vmdk"\n');
        const area = b.subarray(512, 512 * 21), end = area.indexOf(0);
        area.set(text, end);
      }),
      /gone\.vmdk/,
    );
    // An allocation cut between the primary and the redundant table: harmless, a leak.
    await expect(
      damaged(dir, "lagging.vmdk", (b) => {
        const { v, rgt0 } = layout(b);
        v.setUint32(rgt0 * 512 + 4, 0, true);
      }),
      /not yet updated/,
      true,
    );
    // Grains referenced by nothing (appended space, a cleared entry) are leaks.
    await expect(
      damaged(dir, "leak.vmdk", (b) => {
        const { v, gt0, rgt0 } = layout(b);
        v.setUint32(gt0 * 512 + 4, 0, true);
        v.setUint32(rgt0 * 512 + 4, 0, true);
      }),
      /referenced by nothing/,
      true,
    );
    const missing = await vmdkFormat.check(`${dir}/nosuch.vmdk`);
    assert.equal(missing.errors.length, 1);
  });
});

Deno.test("vmdk check: missing extent files; probe; ZERO and RDONLY extents", async () => {
  await withTempDir(async (dir) => {
    await vmdkFormat.create(`${dir}/s.vmdk`, { size: 3 * MiB, subformat: "twoGbMaxExtentSparse" });
    await vmdkFormat.create(`${dir}/f.vmdk`, { size: MiB, subformat: "monolithicFlat" });
    assert.equal(await probeFormat(`${dir}/s.vmdk`), "vmdk");
    assert.equal(await probeFormat(`${dir}/s-s001.vmdk`), "vmdk");
    assert.equal(await probeFormat(`${dir}/f.vmdk`), "vmdk");
    assert.equal(await probeFormat(`${dir}/f-flat.vmdk`), "raw");
    assert.deepEqual((await vmdkFormat.check(`${dir}/s.vmdk`)).errors, []);
    Deno.removeSync(`${dir}/s-s001.vmdk`);
    Deno.removeSync(`${dir}/f-flat.vmdk`);
    for (const name of ["s.vmdk", "f.vmdk"]) {
      const r = await vmdkFormat.check(`${dir}/${name}`);
      assert.match(r.errors.join("\n"), /extent file ".*" is missing/);
      await assert.rejects(openDisk(`vmdk:${dir}/${name}`), /cannot open extent/);
    }
    // A raw file as a read-only extent between two zero extents.
    const data = rng(3).fill(new Uint8Array(64 * KiB));
    Deno.writeFileSync(`${dir}/data.bin`, data);
    Deno.writeTextFileSync(
      `${dir}/z.vmdk`,
      '# Disk DescriptorFile\nversion=1\nCID=abcdef12\nparentCID=ffffffff\ncreateType="custom"\n' +
        'RW 16 ZERO\nRDONLY 128 FLAT "data.bin" 0\nRW 32 ZERO\n',
    );
    const d = await openDisk(`vmdk:${dir}/z.vmdk`);
    try {
      assert.equal(d.size, (16 + 128 + 32) * 512);
      const all = await readAll(d, 4096);
      assert.ok(all.subarray(0, 8192).every((b) => b === 0));
      assert.deepEqual(all.subarray(8192, 8192 + 64 * KiB), data);
      await assert.rejects(d.write(8192, new Uint8Array(512)), /read-only extent/);
      const map = await d.blockStatus(0, d.size);
      assert.deepEqual(map.map((e) => [e.length, e.allocated, e.zero]), [
        [8192, false, true],
        [64 * KiB, true, false],
        [16384, false, true],
      ]);
    } finally {
      await d.close();
    }
  });
});
