/** tapd create / convert / check on raw and qcow, against qemu-img. */
import assert from "node:assert/strict";
import { assertBytes, rng, withTempDir } from "../util.ts";
import { MiB, qemuImg, qemuImgOk, qemuIoOk, tapd, tapdOk } from "./helpers.ts";

/** A raw image with random data at a few places and holes elsewhere. */
function sparseRaw(path: string, size: number, seed: number): Uint8Array {
  const r = rng(seed);
  const data = new Uint8Array(size);
  for (const [off, len] of [[0, 3 * MiB], [size / 2 + 4096, 65536], [size - MiB, MiB]]) {
    data.set(r.fill(new Uint8Array(len)), off);
  }
  // An allocated stretch of zeros in the middle of data must not be stored either.
  data.fill(0, MiB, MiB + 256 * 1024);
  Deno.writeFileSync(path, data);
  return data;
}

function allocatedBytes(path: string): number {
  return (Deno.statSync(path).blocks ?? 0) * 512;
}

Deno.test("convert: raw → qcow → raw keeps every byte, and holes and zeros stay unallocated", async () => {
  await withTempDir(async (dir) => {
    const data = sparseRaw(`${dir}/a.raw`, 16 * MiB, 1);
    await tapdOk("convert", "-O", "qcow", `${dir}/a.raw`, `${dir}/a.qcow`);
    await qemuImgOk("compare", "-f", "raw", "-F", "qcow", `${dir}/a.raw`, `${dir}/a.qcow`);
    const info = JSON.parse((await qemuImgOk("info", "--output=json", `${dir}/a.qcow`)).stdout);
    assert.equal(info.format, "qcow");
    assert.equal(info["virtual-size"], 16 * MiB);
    // 3 MiB + 64 KiB + 1 MiB of data, less the 256 KiB of zeros: the qcow holds about that.
    assert.ok(allocatedBytes(`${dir}/a.qcow`) < 4.5 * MiB, `qcow too big`);
    const map = JSON.parse(
      (await qemuImgOk("map", "--output=json", "-f", "qcow", `${dir}/a.qcow`)).stdout,
    );
    const zeroAt = map.find((e: { start: number; length: number; data: boolean }) =>
      e.start <= MiB + 65536 && e.start + e.length > MiB + 65536
    );
    assert.equal(zeroAt.data, false, "the zero stretch inside the data was stored");
    await tapdOk("convert", "-O", "raw", `${dir}/a.qcow`, `${dir}/b.raw`);
    assertBytes(Deno.readFileSync(`${dir}/b.raw`), data, "raw after the round trip");
    assert.ok(allocatedBytes(`${dir}/b.raw`) < 5 * MiB, "holes were filled in the raw output");
    assert.equal((await tapdOk("check", `${dir}/a.qcow`)).code, 0);
  });
});

Deno.test("convert: an image qemu-img made reads back exactly, through a backing chain", async () => {
  await withTempDir(async (dir) => {
    const data = sparseRaw(`${dir}/base.raw`, 8 * MiB, 2);
    await qemuImgOk("convert", "-f", "raw", "-O", "qcow", `${dir}/base.raw`, `${dir}/base.qcow`);
    await qemuImgOk("create", "-f", "qcow", "-b", "base.qcow", "-F", "qcow", `${dir}/top.qcow`);
    await qemuIoOk("-f", "qcow", "-c", "write -P 0x77 1M 64k", `${dir}/top.qcow`);
    data.fill(0x77, MiB, MiB + 65536);
    await tapdOk("convert", "-O", "raw", `${dir}/top.qcow`, `${dir}/out.raw`);
    assertBytes(Deno.readFileSync(`${dir}/out.raw`), data, "converted overlay");
  });
});

Deno.test("convert: refuses to overwrite without --force, and SRC = DEST always", async () => {
  await withTempDir(async (dir) => {
    sparseRaw(`${dir}/a.raw`, 4 * MiB, 3);
    Deno.writeFileSync(`${dir}/exists.qcow`, new Uint8Array([1, 2, 3]));
    const r = await tapd("convert", "-O", "qcow", `${dir}/a.raw`, `${dir}/exists.qcow`);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /already exists: use --force/);
    assertBytes(Deno.readFileSync(`${dir}/exists.qcow`), new Uint8Array([1, 2, 3]));
    await tapdOk("convert", "--force", "-O", "qcow", `${dir}/a.raw`, `${dir}/exists.qcow`);
    await qemuImgOk("compare", "-f", "raw", "-F", "qcow", `${dir}/a.raw`, `${dir}/exists.qcow`);
    const same = await tapd("convert", "--force", "-O", "raw", `${dir}/a.raw`, `${dir}/a.raw`);
    assert.equal(same.code, 2);
    assert.match(same.stderr, /same file/);
    const bad = await tapd("convert", "-O", "nope", `${dir}/a.raw`, `${dir}/x`);
    assert.equal(bad.code, 2);
    assert.match(bad.stderr, /Unknown format "nope"/);
    assert.deepEqual([...Deno.readDirSync(dir)].map((e) => e.name).sort(), [
      "a.raw",
      "exists.qcow",
    ]);
  });
});

Deno.test("create: raw and qcow images qemu-img reads as made; -b takes the parent's size", async () => {
  await withTempDir(async (dir) => {
    await tapdOk("create", "-f", "raw", `${dir}/a.raw`, "10M");
    assert.equal(Deno.statSync(`${dir}/a.raw`).size, 10 * MiB);
    await tapdOk("create", "-f", "qcow", "-o", "cluster_size=64k", `${dir}/a.qcow`, "1G");
    const info = JSON.parse((await qemuImgOk("info", "--output=json", `${dir}/a.qcow`)).stdout);
    assert.equal(info["virtual-size"], 1024 * MiB);
    assert.equal(info["cluster-size"], 65536);
    await tapdOk("create", "-f", "qcow", "-b", "a.qcow", `${dir}/b.qcow`);
    const child = JSON.parse((await qemuImgOk("info", "--output=json", `${dir}/b.qcow`)).stdout);
    assert.equal(child["virtual-size"], 1024 * MiB);
    assert.equal(child["backing-filename"], "a.qcow");
    const missing = await tapd("create", "-f", "qcow", "-b", "nope.qcow", `${dir}/c.qcow`);
    assert.equal(missing.code, 1);
    assert.match(missing.stderr, /nope\.qcow/);
    await tapdOk("create", "-f", "qcow", "-u", "-b", "nope.qcow", `${dir}/c.qcow`, "1M");
    const noSize = await tapd("create", "-f", "qcow", `${dir}/d.qcow`);
    assert.equal(noSize.code, 2);
  });
});

Deno.test("check: clean 0, a cluster used twice 2, leaked clusters 3, raw 63", async () => {
  await withTempDir(async (dir) => {
    sparseRaw(`${dir}/a.raw`, 4 * MiB, 4);
    await qemuImgOk("convert", "-f", "raw", "-O", "qcow", `${dir}/a.raw`, `${dir}/a.qcow`);
    assert.equal((await tapd("check", `${dir}/a.qcow`)).code, 0);
    assert.equal((await tapd("check", `${dir}/a.raw`)).code, 63);

    const leaky = Deno.readFileSync(`${dir}/a.qcow`);
    const grown = new Uint8Array(leaky.length + 3 * 4096);
    grown.set(leaky);
    Deno.writeFileSync(`${dir}/leak.qcow`, grown);
    const leak = await tapd("check", `${dir}/leak.qcow`);
    assert.equal(leak.code, 3, leak.stdout);
    assert.match(leak.stdout, /Leaked: 3 clusters/);

    // Point the second L2 entry of the first table at the first entry's cluster.
    const bytes = Deno.readFileSync(`${dir}/a.qcow`);
    const v = new DataView(bytes.buffer);
    const l1 = Number(v.getBigUint64(40));
    const l2 = Number(v.getBigUint64(l1));
    v.setBigUint64(l2 + 8, v.getBigUint64(l2));
    Deno.writeFileSync(`${dir}/dup.qcow`, bytes);
    const dup = await tapd("check", "--output=json", `${dir}/dup.qcow`);
    assert.equal(dup.code, 2, dup.stdout);
    const report = JSON.parse(dup.stdout);
    assert.ok(report["check-errors"] >= 1);
    assert.match(report.errors[0], /used twice/);
    const qemu = await qemuImg("info", `${dir}/dup.qcow`);
    assert.equal(qemu.code, 0, "the corrupted test image should still open in qemu-img");
  });
});

Deno.test("convert: raw → every vmdk subformat and vhd kind, and back through qcow; all check clean", async () => {
  await withTempDir(async (dir) => {
    const data = sparseRaw(`${dir}/a.raw`, 8 * MiB, 5);
    const cases: [string, string, string][] = [
      ["vmdk", "monolithicSparse", "vmdk"],
      ["vmdk", "streamOptimized", "vmdk"],
      ["vmdk", "twoGbMaxExtentSparse", "vmdk"],
      ["vmdk", "monolithicFlat", "vmdk"],
      ["vhd", "dynamic", "vpc"],
      ["vhd", "fixed", "vpc"],
    ];
    for (const [format, subformat, qemuName] of cases) {
      const out = `${dir}/${subformat}.${format}`;
      await tapdOk("convert", "-O", format, "-o", `subformat=${subformat}`, `${dir}/a.raw`, out);
      await qemuImgOk("compare", "-f", "raw", "-F", qemuName, `${dir}/a.raw`, out);
      assert.equal((await tapd("check", out)).code, 0, `check ${out}`);
      await tapdOk("convert", "-O", "qcow", out, `${dir}/${subformat}.qcow`);
      await tapdOk("convert", "-O", "raw", `${dir}/${subformat}.qcow`, `${dir}/${subformat}.raw`);
      assertBytes(Deno.readFileSync(`${dir}/${subformat}.raw`), data, `${subformat} round trip`);
    }
    // No temporary files are left behind.
    assert.ok([...Deno.readDirSync(dir)].every((e) => !e.name.includes(".partial-")));
  });
});
