/**
 * vmdk interoperability with the real QEMU: images qemu-img makes (convert and create, every
 * subformat, adapter types, compat6, a delta child written by qemu-io) read back byte-identical
 * through tapd; images tapd makes and writes (create, random writes, writeStreamOptimized) are
 * described right by `qemu-img info`, pass `qemu-img check` and compare identical to a raw
 * reference with the same writes.
 */
import assert from "node:assert/strict";
import { openDisk } from "../../../drivers/mod.ts";
import { vmdkFormat } from "../../../drivers/vmdk/format.ts";
import { readVmdkMeta } from "../../../drivers/vmdk/image.ts";
import { writeStreamOptimized } from "../../../drivers/vmdk/stream.ts";
import { rng, withTempDir } from "../../util.ts";
import {
  assertQemuCheck,
  assertQemuSameVmdk,
  assertSame,
  KiB,
  MiB,
  qemuImg,
  qemuIoVmdk,
  qemuMapVmdk,
  qemuRaw,
  randomContent,
  randomWrites,
  SECTOR,
  tapdMap,
  verifyDisk,
  verifyRandomReads,
  vmdkInfo,
  writeFile,
} from "./helpers.ts";

/** Not a multiple of the grain: the last grain is partial. */
const SIZE = 24 * MiB + 4608;
const GRAIN = 64 * KiB, GT_SPAN = 32 * MiB;

const SUBFORMATS = [
  "monolithicSparse",
  "monolithicFlat",
  "twoGbMaxExtentSparse",
  "twoGbMaxExtentFlat",
  "streamOptimized",
];

/** Opens read-only, reads the whole disk and random pieces; tapd check finds nothing wrong. */
async function assertReads(img: string, ref: Uint8Array, seed: number, what: string) {
  const disk = await openDisk(`vmdk:${img}`, { readOnly: true });
  try {
    await verifyDisk(disk, ref, what);
    await verifyRandomReads(disk, ref, rng(seed), 48, GRAIN, what);
    // Block status: what qemu-img map says (standalone images), and zeros where it says zero.
    if (disk.info.backing === null) assert.deepEqual(await tapdMap(disk), await qemuMapVmdk(img));
    for (const e of await disk.blockStatus(0, disk.size)) {
      if (e.zero) {
        assert.ok(
          ref.subarray(e.offset, e.offset + e.length).every((b) => b === 0),
          `${what}: ${JSON.stringify(e)} reported zero`,
        );
      }
    }
  } finally {
    await disk.close();
  }
  const report = await vmdkFormat.check(img);
  assert.deepEqual(report.errors, [], `${what}: tapd check`);
}

/** tapd writes into `img`; then qemu-img check and compare agree with `ref`. */
async function writeAndCompare(dir: string, img: string, ref: Uint8Array, seed: number) {
  const disk = await openDisk(`vmdk:${img}`);
  try {
    await randomWrites(disk, ref, rng(seed), 96, GRAIN, GT_SPAN);
    await verifyRandomReads(disk, ref, rng(seed + 1), 32, GRAIN, `${img} (written)`);
    await disk.flush();
  } finally {
    await disk.close();
  }
  writeFile(`${dir}/ref.raw`, ref);
  await assertQemuCheck(img);
  await assertQemuSameVmdk(img, `${dir}/ref.raw`);
  const report = await vmdkFormat.check(img);
  assert.deepEqual(report.errors, [], `${img}: tapd check after writes`);
}

Deno.test("vmdk interop: qemu-img convert, every subformat, read and written by tapd", async () => {
  await withTempDir(async (dir) => {
    const content = writeFile(`${dir}/in.raw`, randomContent(rng(1), SIZE, 16 * KiB));
    for (const [k, sub] of SUBFORMATS.entries()) {
      const img = `${dir}/${sub}.vmdk`;
      await qemuImg([
        "convert",
        "-f",
        "raw",
        "-O",
        "vmdk",
        "-o",
        `subformat=${sub}`,
        `${dir}/in.raw`,
        img,
      ]);
      await assertReads(img, content, 10 + k, `qemu-img convert ${sub}`);
      if (sub === "streamOptimized") {
        await assert.rejects(openDisk(`vmdk:${img}`), /read-only in tapd/);
        continue;
      }
      await writeAndCompare(dir, img, content.slice(), 20 + k);
    }
  });
});

Deno.test("vmdk interop: adapter types and compat6 (qemu-img convert and create)", async () => {
  await withTempDir(async (dir) => {
    const content = writeFile(`${dir}/in.raw`, randomContent(rng(2), 4 * MiB, 8 * KiB));
    const variants = [
      "adapter_type=ide",
      "adapter_type=buslogic",
      "adapter_type=lsilogic",
      "adapter_type=legacyESX",
      "compat6",
      "compat6,adapter_type=lsilogic,subformat=monolithicFlat",
    ];
    for (const [k, o] of variants.entries()) {
      const img = `${dir}/v${k}.vmdk`;
      await qemuImg(["convert", "-f", "raw", "-O", "vmdk", "-o", o, `${dir}/in.raw`, img]);
      await assertReads(img, content, 30 + k, `convert -o ${o}`);
      // tapd's create with the same options makes the same descriptor (but for the CID).
      const ours = `${dir}/t${k}.vmdk`, theirs = `${dir}/q${k}.vmdk`;
      const extra: Record<string, string> = {};
      let subformat: string | undefined;
      for (const kv of o.split(",")) {
        const [key, value] = kv.split("=");
        if (key === "subformat") subformat = value;
        else extra[key] = value ?? "on";
      }
      await vmdkFormat.create(ours, { size: 4 * MiB, subformat, extra });
      await qemuImg(["create", "-q", "-f", "vmdk", "-o", o, theirs, String(4 * MiB)]);
      const norm = (p: string) =>
        readVmdkMeta(p).descriptor.text.replace(/CID=[0-9a-f]+/, "CID=x").replaceAll(
          /[tq]\d/g,
          "N",
        );
      assert.equal(norm(ours), norm(theirs), `descriptor for -o ${o}`);
    }
  });
});

Deno.test("vmdk interop: tapd create matches qemu-img create byte for byte (but the CID)", async () => {
  await withTempDir(async (dir) => {
    for (const sub of SUBFORMATS) {
      for (const size of [MiB, (sub.endsWith("Flat") ? 64 : 1024) * MiB + 512]) {
        const ours = `${dir}/t.vmdk`, theirs = `${dir}/q.vmdk`;
        await vmdkFormat.create(ours, { size, subformat: sub });
        await qemuImg([
          "create",
          "-q",
          "-f",
          "vmdk",
          "-o",
          `subformat=${sub}`,
          theirs,
          String(size),
        ]);
        const files = (p: string) =>
          [...Deno.readDirSync(dir)].map((e) => e.name).filter((n) => n.startsWith(p)).sort();
        const t = files("t"), q = files("q");
        assert.deepEqual(t.map((n) => n.slice(1)), q.map((n) => n.slice(1)), `${sub}: files`);
        for (let i = 0; i < t.length; i++) {
          if (Deno.statSync(`${dir}/${t[i]}`).size > 8 * MiB) {
            assert.equal(
              Deno.statSync(`${dir}/${t[i]}`).size,
              Deno.statSync(`${dir}/${q[i]}`).size,
            );
            continue;
          }
          const a = Deno.readFileSync(`${dir}/${t[i]}`), b = Deno.readFileSync(`${dir}/${q[i]}`);
          // The descriptor text (in its 20-sector area when embedded) equal but for the CID
          // (QEMU's is random and unpadded) and the names; every other byte equal.
          const split = (x: Uint8Array) => {
            const embedded = x[0] === 0x4b; // "KDMV"
            const from = embedded ? 512 : 0, to = embedded ? 21 * 512 : x.length;
            const text = new TextDecoder("latin1").decode(x.subarray(from, to))
              .replace(/\0+$/, "")
              .replace(/CID=[0-9a-f]+/, "CID=x")
              .replaceAll(/"[tq](-[sf]\d+|-flat)?\.vmdk"/g, '"N$1.vmdk"');
            return [text, x.subarray(0, from), x.subarray(to)];
          };
          const [ta, ...ra] = split(a), [tb, ...rb] = split(b);
          assert.equal(ta, tb, `${sub} ${size}: ${t[i]}: descriptor`);
          assertSame(ra[0] as Uint8Array, rb[0] as Uint8Array, `${sub} ${size}: ${t[i]} header`);
          assertSame(ra[1] as Uint8Array, rb[1] as Uint8Array, `${sub} ${size}: ${t[i]} tables`);
        }
        const info = await vmdkInfo(ours);
        assert.equal(info["virtual-size"], size);
        const data = (info["format-specific"] as { data: Record<string, unknown> }).data;
        assert.equal(data["create-type"], sub);
        for (const n of [...t, ...q]) Deno.removeSync(`${dir}/${n}`);
      }
    }
  });
});

Deno.test("vmdk interop: images tapd creates and writes pass qemu-img check and compare", async () => {
  await withTempDir(async (dir) => {
    const cases: { sub: string; clusterSize?: number; extra?: Record<string, string> }[] = [
      { sub: "monolithicSparse" },
      { sub: "monolithicSparse", clusterSize: 4096 }, // GT span 2 MiB: writes cross tables
      { sub: "monolithicSparse", extra: { zeroed_grain: "on" } },
      { sub: "monolithicFlat" },
      { sub: "twoGbMaxExtentSparse" },
      { sub: "twoGbMaxExtentFlat", extra: { adapter_type: "lsilogic" } },
    ];
    for (const [k, c] of cases.entries()) {
      const img = `${dir}/c${k}.vmdk`;
      await vmdkFormat.create(img, {
        size: SIZE,
        subformat: c.sub,
        clusterSize: c.clusterSize,
        extra: c.extra,
      });
      const ref = new Uint8Array(SIZE);
      const grain = c.clusterSize ?? GRAIN;
      const disk = await openDisk(`vmdk:${img}`);
      try {
        assert.equal(disk.size, SIZE);
        await randomWrites(disk, ref, rng(40 + k), 96, grain, grain * 512);
        await disk.flush();
      } finally {
        await disk.close();
      }
      writeFile(`${dir}/ref.raw`, ref);
      await assertQemuCheck(img);
      await assertQemuSameVmdk(img, `${dir}/ref.raw`);
      const info = await vmdkInfo(img);
      assert.equal(info["virtual-size"], SIZE);
      assert.equal(info["format"], "vmdk");
      const data = (info["format-specific"] as { data: Record<string, unknown> }).data;
      assert.equal(data["create-type"], c.sub);
      const report = await vmdkFormat.check(img);
      assert.deepEqual([report.errors, report.leaks], [[], []], `tapd check of case ${k}`);
      // QEMU writes on top of tapd's grains; tapd reads QEMU's.
      ref.fill(0x5a, 3 * grain + 512, 3 * grain + 4096);
      ref.fill(0x5b, SIZE - 8192, SIZE);
      await qemuIoVmdk(img, [
        `write -P 0x5a ${3 * grain + 512} 3584`,
        `write -P 0x5b ${SIZE - 8192} 8192`,
      ]);
      await assertReads(img, ref, 50 + k, `case ${k} after qemu-io`);
    }
  });
});

Deno.test("vmdk interop: delta child made by qemu-img, written by qemu-io and tapd", async () => {
  await withTempDir(async (dir) => {
    const base = writeFile(`${dir}/in.raw`, randomContent(rng(3), SIZE, 16 * KiB));
    await qemuImg(["convert", "-f", "raw", "-O", "vmdk", "in.raw", "parent.vmdk"], dir);
    await qemuImg(
      ["create", "-q", "-f", "vmdk", "-b", "parent.vmdk", "-F", "vmdk", "child.vmdk"],
      dir,
    );
    const parentBytes = Deno.readFileSync(`${dir}/parent.vmdk`);
    const ref = base.slice();
    const cmds: string[] = [];
    const r = rng(4);
    for (let i = 0; i < 24; i++) {
      const length = (1 + r.below(256)) * SECTOR;
      const offset = r.below((SIZE - length) / SECTOR) * SECTOR, p = 1 + r.below(255);
      ref.fill(p, offset, offset + length);
      cmds.push(`write -P ${p} ${offset} ${length}`);
    }
    await qemuIoVmdk(`${dir}/child.vmdk`, cmds);
    const img = `${dir}/child.vmdk`;
    assertSame(await qemuRaw(img, dir), ref, "qemu-img's view of the child");
    await assertReads(img, ref, 60, "qemu-io written child");
    const disk = await openDisk(`vmdk:${img}`, { readOnly: true });
    try {
      assert.equal(disk.info.backing, "parent.vmdk");
      assert.equal(disk.info.discardFreesSpace, false);
    } finally {
      await disk.close();
    }
    const before = readVmdkMeta(img).descriptor;
    await writeAndCompare(dir, img, ref, 61);
    const after = readVmdkMeta(img).descriptor;
    assert.notEqual(after.cid, before.cid, "the first write gives the child a new CID");
    assert.equal(after.parentCid, readVmdkMeta(`${dir}/parent.vmdk`).descriptor.cid);
    assertSame(Deno.readFileSync(`${dir}/parent.vmdk`), parentBytes, "parent after tapd's writes");
    const info = await vmdkInfo(img);
    assert.equal(info["backing-filename"], "parent.vmdk");
  });
});

Deno.test("vmdk interop: tapd-created delta child over a tapd parent; CID links", async () => {
  await withTempDir(async (dir) => {
    await vmdkFormat.create(`${dir}/p.vmdk`, { size: SIZE });
    const ref = new Uint8Array(SIZE);
    let disk = await openDisk(`vmdk:${dir}/p.vmdk`);
    try {
      await randomWrites(disk, ref, rng(70), 48, GRAIN, GT_SPAN);
    } finally {
      await disk.close();
    }
    // No size given: the parent's.
    await vmdkFormat.create(`${dir}/c.vmdk`, {
      size: 0,
      backing: "p.vmdk",
      backingFormat: "vmdk",
    });
    assert.equal(
      readVmdkMeta(`${dir}/c.vmdk`).descriptor.parentCid,
      readVmdkMeta(`${dir}/p.vmdk`).descriptor.cid,
    );
    disk = await openDisk(`vmdk:${dir}/c.vmdk`);
    try {
      await randomWrites(disk, ref, rng(71), 64, GRAIN, GT_SPAN);
    } finally {
      await disk.close();
    }
    writeFile(`${dir}/ref.raw`, ref);
    await assertQemuCheck(`${dir}/c.vmdk`);
    await assertQemuSameVmdk(`${dir}/c.vmdk`, `${dir}/ref.raw`);
    assert.equal((await vmdkInfo(`${dir}/c.vmdk`))["backing-filename"], "p.vmdk");
    // Writing the parent changes its CID: the child no longer opens (QEMU fails its reads).
    disk = await openDisk(`vmdk:${dir}/p.vmdk`);
    try {
      await disk.write(0, new Uint8Array(512));
    } finally {
      await disk.close();
    }
    await assert.rejects(openDisk(`vmdk:${dir}/c.vmdk`), /parentCID/);
    const report = await vmdkFormat.check(`${dir}/c.vmdk`);
    assert.match(report.errors.join("\n"), /parentCID/);
    // Flat images cannot have a parent; the parent must be a VMDK.
    await assert.rejects(
      vmdkFormat.create(`${dir}/f.vmdk`, {
        size: MiB,
        backing: "p.vmdk",
        subformat: "monolithicFlat",
      }),
      /cannot have a parent/,
    );
  });
});

Deno.test("vmdk interop: writeStreamOptimized output passes qemu-img check and compare", async () => {
  await withTempDir(async (dir) => {
    for (const [k, size] of [SIZE, 33 * MiB].entries()) {
      const content = writeFile(`${dir}/in.raw`, randomContent(rng(80 + k), size, 32 * KiB));
      const src = await openDisk(`aio:${dir}/in.raw`, { readOnly: true });
      let calls = 0, last = 0;
      try {
        await writeStreamOptimized(`${dir}/s.vmdk`, src, {
          onProgress: (done, total) => {
            calls++;
            assert.equal(total, size);
            assert.ok(done >= last);
            last = done;
          },
        });
      } finally {
        await src.close();
      }
      assert.ok(calls > 0 && last === size);
      await assertQemuCheck(`${dir}/s.vmdk`);
      await assertQemuSameVmdk(`${dir}/s.vmdk`, `${dir}/in.raw`);
      const info = await vmdkInfo(`${dir}/s.vmdk`);
      assert.equal(info["virtual-size"], size);
      const data = (info["format-specific"] as { data: Record<string, unknown> }).data;
      assert.equal(data["create-type"], "streamOptimized");
      await assertReads(`${dir}/s.vmdk`, content, 90 + k, "writeStreamOptimized output");
      // Stream layout: the file ends with the footer marker, the footer and end-of-stream.
      const bytes = Deno.readFileSync(`${dir}/s.vmdk`);
      const tail = new DataView(bytes.buffer, bytes.length - 1536);
      assert.equal(tail.getUint32(12, true), 3, "footer marker");
      assert.equal(tail.getUint32(512, true), 0x564d444b, "footer header");
      assert.ok(bytes.subarray(bytes.length - 512).every((b) => b === 0), "EOS marker");
      // A stream of the same source converted by qemu-img is not smaller by much.
      if (k > 0) continue;
      await qemuImg([
        "convert",
        "-O",
        "vmdk",
        "-o",
        "subformat=streamOptimized",
        `${dir}/in.raw`,
        `${dir}/q.vmdk`,
      ]);
      assert.ok(bytes.length < Deno.statSync(`${dir}/q.vmdk`).size * 1.2 + 256 * KiB);
    }
  });
});

Deno.test("vmdk interop: zeroed-grain entries written by qemu-io hide the parent", async () => {
  await withTempDir(async (dir) => {
    const base = writeFile(`${dir}/in.raw`, randomContent(rng(5), 4 * MiB, 64 * KiB));
    base.fill(7, 0, 256 * KiB); // the parent has data under the grains zeroed below
    writeFile(`${dir}/in.raw`, base);
    await qemuImg(["convert", "-f", "raw", "-O", "vmdk", "in.raw", "parent.vmdk"], dir);
    await qemuImg([
      "create",
      "-q",
      "-f",
      "vmdk",
      "-o",
      "zeroed_grain=on",
      "-b",
      "parent.vmdk",
      "-F",
      "vmdk",
      "child.vmdk",
    ], dir);
    const img = `${dir}/child.vmdk`, ref = base.slice();
    ref.fill(0, 0, 128 * KiB);
    await qemuIoVmdk(img, ["write -z 0 128k"]);
    assertSame(await qemuRaw(img, dir), ref, "qemu-img's view");
    await assertReads(img, ref, 100, "child with zeroed grains");
    // A partial write into a zeroed grain keeps the rest of it zero (not the parent's data).
    const disk = await openDisk(`vmdk:${img}`);
    try {
      const [first] = await disk.blockStatus(0, 128 * KiB);
      assert.deepEqual([first.length, first.allocated, first.zero], [128 * KiB, false, true]);
      const data = rng(6).fill(new Uint8Array(4096));
      await disk.write(8192, data);
      ref.set(data, 8192);
    } finally {
      await disk.close();
    }
    writeFile(`${dir}/ref.raw`, ref);
    await assertQemuCheck(img);
    await assertQemuSameVmdk(img, `${dir}/ref.raw`);
  });
});
