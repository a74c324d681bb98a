/** `tapd info`, against what `qemu-img info --output=json` says about the same images. */
import assert from "node:assert/strict";
import { rng } from "../util.ts";
import {
  assertOneLineError,
  inTempDir,
  KiB,
  makeCompressedQcow,
  makeRaw,
  MiB,
  qemuImgOk,
  qemuInfo,
  qemuIoOk,
  tapd,
  tapdIn,
  tapdOk,
} from "./helpers.ts";

type Info = Record<string, unknown>;

async function tapdInfo(path: string): Promise<Info> {
  return JSON.parse((await tapdOk("info", "--output=json", path)).stdout);
}

const SHARED_KEYS = [
  "filename",
  "format",
  "virtual-size",
  "actual-size",
  "cluster-size",
  "backing-filename",
  "full-backing-filename",
];

/** Our info agrees with qemu-img's on every key both know. */
async function assertLikeQemu(path: string, format: string): Promise<Info> {
  const ours = await tapdInfo(path), theirs = await qemuInfo(path, format);
  for (const key of SHARED_KEYS) assert.deepEqual(ours[key], theirs[key], `${path}: ${key}`);
  return ours;
}

Deno.test("info matches qemu-img info on qcow images QEMU made, and on raw files", async () => {
  await inTempDir(async (dir) => {
    const src = `${dir}/src.raw`;
    makeRaw(src, 5 * MiB + 1000, rng(1));
    await qemuImgOk("create", "-q", "-f", "qcow", `${dir}/empty.qcow`, "1G");
    await qemuImgOk("convert", "-f", "raw", "-O", "qcow", src, `${dir}/conv.qcow`);
    await makeCompressedQcow(dir, "comp.qcow", 3 * MiB + 512, rng(2));
    await qemuImgOk("create", "-q", "-f", "qcow", "-b", "src.raw", "-F", "raw", `${dir}/over.qcow`);
    await qemuIoOk("-f", "qcow", "-c", "write -P 1 0 64k", `${dir}/over.qcow`);
    for (const name of ["empty.qcow", "conv.qcow", "comp.qcow", "over.qcow"]) {
      const info = await assertLikeQemu(`${dir}/${name}`, "qcow");
      assert.equal(info["format"], "qcow");
    }
    const raw = await assertLikeQemu(src, "raw");
    assert.equal(raw["virtual-size"], 5 * MiB + 1024); // rounded up to a sector, as QEMU does
    assert.equal(raw["cluster-size"], undefined);
    assert.equal(raw["format-specific"], undefined);
    // Relative image paths give relative full backing names, as in QEMU.
    const rel = JSON.parse((await tapdIn(dir, "info", "--output=json", "over.qcow")).stdout);
    assert.equal(rel["full-backing-filename"], "src.raw");
  });
});

Deno.test("info of images tapd made: header fields and the backing chain", async () => {
  await inTempDir(async (dir) => {
    makeRaw(`${dir}/base.raw`, 3 * MiB, rng(2));
    await tapdOk("qcow-create", "0", `${dir}/mid.qcow`, "base.raw");
    await tapdOk("qcow-create", "--cluster-size", "64k", "0", `${dir}/top.qcow`, `${dir}/mid.qcow`);
    const top = await assertLikeQemu(`${dir}/top.qcow`, "qcow");
    assert.equal(top["cluster-size"], 64 * KiB);
    assert.equal(top["backing-filename"], `${dir}/mid.qcow`);
    assert.equal(top["backing-filename-format"], "qcow");
    assert.deepEqual(top["backing-chain"], [
      { "filename": `${dir}/mid.qcow`, "format": "qcow", "virtual-size": 3 * MiB },
      { "filename": `${dir}/base.raw`, "format": "raw", "virtual-size": 3 * MiB },
    ]);
    const specific = top["format-specific"] as { type: string; data: Record<string, number> };
    assert.equal(specific.type, "qcow");
    assert.equal(specific.data["cluster-bits"], 16);
    assert.equal(specific.data["l2-bits"], 13);
    assert.equal(
      specific.data["l1-table-offset"],
      Math.ceil((48 + `${dir}/mid.qcow`.length) / 8) * 8,
    );
    assert.equal(specific.data["backing-file-offset"], 48);
    const mid = await tapdInfo(`${dir}/mid.qcow`);
    assert.equal(mid["backing-filename-format"], "raw");
    assert.equal((mid["format-specific"] as { data: Record<string, number> }).data["l2-bits"], 12);

    const text = (await tapdOk("info", `${dir}/top.qcow`)).stdout;
    assert.match(text, /^image: .*top\.qcow$/m);
    assert.match(text, /^file format: qcow$/m);
    assert.match(text, /^virtual size: 3 MiB \(3145728 bytes\)$/m);
    assert.match(text, /^cluster_size: 65536$/m);
    assert.match(text, /^backing file: .*mid\.qcow$/m);
    assert.match(text, /^backing file format: qcow$/m);
    assert.match(text, /^ {4}.*base\.raw: raw, 3 MiB \(3145728 bytes\)$/m);
  });
});

Deno.test("info reports a missing backing file in the chain and still describes the image", async () => {
  await inTempDir(async (dir) => {
    await qemuImgOk(
      "create",
      "-q",
      "-f",
      "qcow",
      "-u",
      "-b",
      "gone.raw",
      "-F",
      "raw",
      `${dir}/o.qcow`,
      "1M",
    );
    const info = await tapdInfo(`${dir}/o.qcow`);
    assert.equal(info["virtual-size"], MiB);
    assert.equal(info["backing-filename"], "gone.raw");
    assert.equal(info["backing-filename-format"], undefined);
    const chain = info["backing-chain"] as { filename: string; error: string }[];
    assert.equal(chain.length, 1);
    assert.match(chain[0].error, /ENOENT/);
  });
});

Deno.test("info: missing and unsupported images exit 1 with one line; bad usage exits 2", async () => {
  await inTempDir(async (dir) => {
    assertOneLineError(
      await tapd("info", `${dir}/missing.img`),
      1,
      /^tapd: ENOENT open .*missing\.img: No such file or directory$/,
    );
    await qemuImgOk("create", "-q", "-f", "qcow2", `${dir}/v2.qcow2`, "1M");
    assertOneLineError(await tapd("info", `${dir}/v2.qcow2`), 1, /qcow2 image \(version 3\)/);
    assertOneLineError(await tapd("info"), 2, /expected one IMAGE, got 0/);
    assertOneLineError(await tapd("info", "a", "b"), 2, /expected one IMAGE, got 2/);
    assertOneLineError(await tapd("info", "--output=xml", "a"), 2, /Invalid --output "xml"/);
  });
});
