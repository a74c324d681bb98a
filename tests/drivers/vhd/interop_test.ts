/**
 * VHD interoperability with the real QEMU (`vpc`): images made by `qemu-img create` / `convert`
 * and written by `qemu-io` read back byte-identical through tapd; images tapd creates and
 * writes are described right by `qemu-img info`, identical to a raw reference for
 * `qemu-img compare`, and mapped alike by `qemu-img map` and blockStatus. Differencing disks,
 * which QEMU cannot make or follow, are made by tapd over QEMU-made parents.
 */
import assert from "node:assert/strict";
import { openDisk } from "../../../drivers/mod.ts";
import { vhdFormat } from "../../../drivers/vhd/format.ts";
import { rng, withTempDir } from "../../util.ts";
import {
  assertCheckClean,
  assertMapsAgree,
  assertQemuSame,
  assertSame,
  MiB,
  qemuImg,
  qemuInfo,
  qemuIo,
  randomContent,
  readAll,
  run,
  SECTOR,
  tapdWrites,
  verifyDisk,
  verifyRandomReads,
  writeFile,
} from "./helpers.ts";

const SIZE = 24 * MiB;
const BLOCK = 2 * MiB;

/** A qemu-io `write -P` and what it does to the reference. */
function qemuWrite(ref: Uint8Array, pattern: number, offset: number, length: number): string {
  ref.fill(pattern, offset, offset + length);
  return `write -P ${pattern} ${offset} ${length}`;
}

function qemuWrites(ref: Uint8Array, seed: number): string[] {
  const r = rng(seed);
  const cmds = [
    qemuWrite(ref, 0xab, 0, 512),
    qemuWrite(ref, 0xac, BLOCK - 1024, 3072), // across a block boundary
    qemuWrite(ref, 0xad, ref.length - 4096, 4096),
  ];
  for (let i = 0; i < 12; i++) {
    const length = (1 + r.below(256)) * SECTOR;
    const offset = r.below((ref.length - length) / SECTOR) * SECTOR;
    cmds.push(qemuWrite(ref, 1 + r.below(255), offset, length));
  }
  return cmds;
}

/** Reads `img` through tapd (whole, random reads) against `ref`; checks the map if asked. */
async function checkImage(img: string, ref: Uint8Array, seed: number, map: boolean) {
  const disk = await openDisk(`vhd:${img}`, { readOnly: true });
  try {
    assert.equal(disk.size, ref.length, `${img}: size`);
    await verifyDisk(disk, ref, img);
    await verifyRandomReads(disk, ref, rng(seed), 100, BLOCK, img);
    if (map) await assertMapsAgree(disk, img);
  } finally {
    await disk.close();
  }
}

async function virtualSize(img: string): Promise<number> {
  const info = await qemuInfo(img, undefined, "vpc");
  assert.equal(info["format"], "vpc");
  return info["virtual-size"] as number;
}

for (const subformat of ["dynamic", "fixed"]) {
  Deno.test(`vhd interop: qemu-img create -o subformat=${subformat}, qemu-io and tapd write`, async () => {
    await withTempDir(async (dir) => {
      const img = `${dir}/a.vhd`;
      await qemuImg(["create", "-q", "-f", "vpc", "-o", `subformat=${subformat}`, img, "20M"]);
      const size = await virtualSize(img); // rounded up to a CHS geometry by QEMU
      assert.ok(size >= 20 * MiB && size % SECTOR === 0);
      const ref = new Uint8Array(size);
      await checkImage(img, ref, 1, subformat === "dynamic");
      await qemuIo(img, qemuWrites(ref, 2), undefined, "vpc");
      await checkImage(img, ref, 3, subformat === "dynamic");
      const disk = await openDisk(`vhd:${img}`);
      try {
        await tapdWrites(disk, ref, rng(4), BLOCK, 120);
        await disk.flush();
      } finally {
        await disk.close();
      }
      writeFile(`${dir}/ref.raw`, ref);
      await assertQemuSame(img, `${dir}/ref.raw`);
      assert.equal(await virtualSize(img), size);
      await assertCheckClean(img);
      // QEMU writes again, after tapd's blocks.
      await qemuIo(img, qemuWrites(ref, 5), undefined, "vpc");
      await checkImage(img, ref, 6, subformat === "dynamic");
      await assertCheckClean(img);
    });
  });
}

const CONVERTS: [string, string[]][] = [
  ["dynamic", ["-o", "subformat=dynamic"]],
  ["fixed", ["-o", "subformat=fixed"]],
  ["dynamic, force_size=on", ["-o", "subformat=dynamic,force_size=on"]],
  ["fixed, force_size=on", ["-o", "subformat=fixed,force_size=on"]],
];

for (const [i, [name, opts]] of CONVERTS.entries()) {
  Deno.test(`vhd interop: qemu-img convert -O vpc (${name}) of a raw file with holes`, async () => {
    await withTempDir(async (dir) => {
      const content = writeFile(`${dir}/in.raw`, randomContent(rng(10 + i), 12 * MiB + 3 * SECTOR));
      const img = `${dir}/out.vhd`;
      await qemuImg(["convert", "-f", "raw", "-O", "vpc", ...opts, `${dir}/in.raw`, img]);
      const size = await virtualSize(img);
      if (name.includes("force_size")) assert.equal(size, content.length);
      else assert.ok(size >= content.length);
      const ref = new Uint8Array(size);
      ref.set(content);
      await checkImage(img, ref, 20 + i, !name.startsWith("fixed"));
      await run("qemu-img", ["convert", "-f", "vpc", "-O", "raw", img, `${dir}/back.raw`]);
      assertSame(Deno.readFileSync(`${dir}/back.raw`), ref, "qemu-img convert -O raw");
      await assertCheckClean(img);
    });
  });
}

for (const blockSize of [BLOCK, 64 * 1024]) {
  for (const subformat of ["dynamic", "fixed"]) {
    if (subformat === "fixed" && blockSize !== BLOCK) continue;
    const name = `tapd create ${subformat}` +
      (subformat === "dynamic" ? `, ${blockSize / 1024} KiB blocks` : "");
    Deno.test(`vhd interop: ${name}, odd size, tapd writes; info/compare/map agree (qemu-img check cannot check vpc: skipped)`, async () => {
      await withTempDir(async (dir) => {
        const img = `${dir}/t.vhd`, size = SIZE + 5 * SECTOR;
        await vhdFormat.create(img, { size, subformat, clusterSize: blockSize });
        await assert.rejects(vhdFormat.create(img, { size }), /EEXIST/);
        assert.equal(await virtualSize(img), size);
        const info = await qemuInfo(img, undefined, "vpc");
        if (subformat === "dynamic") assert.equal(info["cluster-size"], blockSize);
        const check = await run("qemu-img", ["check", "-f", "vpc", img]);
        assert.equal(check.code, 63, "qemu-img check does not support vpc");
        const ref = new Uint8Array(size);
        const disk = await openDisk(`vhd:${img}`);
        try {
          assert.equal(disk.size, size);
          await tapdWrites(disk, ref, rng(30), blockSize, 200);
          await disk.writeZeroes(3 * blockSize + 4096, 2 * blockSize);
          ref.fill(0, 3 * blockSize + 4096, 5 * blockSize + 4096);
          await disk.discard(SECTOR, 8 * SECTOR);
          ref.fill(0, SECTOR, 9 * SECTOR);
          await disk.flush();
        } finally {
          await disk.close();
        }
        writeFile(`${dir}/ref.raw`, ref);
        await assertQemuSame(img, `${dir}/ref.raw`);
        assert.equal(await virtualSize(img), size);
        await checkImage(img, ref, 31, subformat === "dynamic");
        await assertCheckClean(img);
        // QEMU writes into tapd's image; tapd reads them.
        await qemuIo(img, qemuWrites(ref, 32), undefined, "vpc");
        await checkImage(img, ref, 33, subformat === "dynamic");
        await assertCheckClean(img);
        const report = await vhdFormat.check(img);
        if (subformat === "dynamic") assert.equal(report.total, Math.ceil(size / blockSize));
      });
    });
  }
}

Deno.test("vhd interop: qemu-img cannot make a differencing vpc; tapd makes a chain over QEMU's parent", async () => {
  await withTempDir(async (dir) => {
    Deno.mkdirSync(`${dir}/sub`);
    const refused = await run("qemu-img", [
      "create",
      "-f",
      "vpc",
      "-b",
      `${dir}/base.vhd`,
      "-F",
      "vpc",
      `${dir}/x.vhd`,
    ]);
    assert.notEqual(refused.code, 0);
    // base.vhd (QEMU, with data) <- mid.vhd (tapd, relative name) <- sub/top.vhd (../mid.vhd)
    const content = writeFile(`${dir}/in.raw`, randomContent(rng(40), 16 * MiB));
    await qemuImg([
      "convert",
      "-O",
      "vpc",
      "-o",
      "force_size=on",
      `${dir}/in.raw`,
      `${dir}/base.vhd`,
    ]);
    const baseBytes = Deno.readFileSync(`${dir}/base.vhd`);
    await vhdFormat.create(`${dir}/mid.vhd`, { size: 0, backing: "base.vhd" });
    await vhdFormat.create(`${dir}/sub/top.vhd`, { size: 0, backing: "../mid.vhd" });
    const mid = content.slice();
    let disk = await openDisk(`vhd:${dir}/mid.vhd`);
    try {
      assert.equal(disk.size, content.length);
      assert.equal(disk.info.backing, "base.vhd");
      await verifyRandomReads(disk, mid, rng(41), 50, BLOCK, "fresh child");
      await tapdWrites(disk, mid, rng(42), BLOCK, 150);
      await disk.writeZeroes(5 * MiB, 3 * MiB);
      mid.fill(0, 5 * MiB, 8 * MiB);
    } finally {
      await disk.close();
    }
    const midBytes = Deno.readFileSync(`${dir}/mid.vhd`);
    const top = mid.slice();
    disk = await openDisk(`vhd:${dir}/sub/top.vhd`);
    try {
      assert.equal(disk.info.backing, "../mid.vhd");
      const extents = await disk.blockStatus(0, disk.size);
      assert.deepEqual(extents, [{ offset: 0, length: disk.size, allocated: false, zero: false }]);
      await tapdWrites(disk, top, rng(43), BLOCK, 150);
      await verifyDisk(disk, top, "top after writes");
    } finally {
      await disk.close();
    }
    for (const [img, ref] of [[`${dir}/mid.vhd`, mid], [`${dir}/sub/top.vhd`, top]] as const) {
      disk = await openDisk(`vhd:${img}`, { readOnly: true });
      try {
        assertSame(await readAll(disk), ref, img);
      } finally {
        await disk.close();
      }
      await assertCheckClean(img);
    }
    assertSame(Deno.readFileSync(`${dir}/base.vhd`), baseBytes, "base.vhd");
    assertSame(Deno.readFileSync(`${dir}/mid.vhd`), midBytes, "mid.vhd");
    // qemu-img info reads the child as a standalone disk of the same size.
    assert.equal(await virtualSize(`${dir}/sub/top.vhd`), content.length);

    // The child moved where its relative locator leads nowhere opens through the absolute one;
    // with a parent of another unique id, the open is refused.
    Deno.mkdirSync(`${dir}/far/away`, { recursive: true });
    Deno.renameSync(`${dir}/sub/top.vhd`, `${dir}/far/away/top.vhd`);
    disk = await openDisk(`vhd:${dir}/far/away/top.vhd`, { readOnly: true });
    try {
      assert.equal(disk.info.backing, `${dir}/mid.vhd`);
      assertSame(await readAll(disk), top, "top.vhd, moved");
    } finally {
      await disk.close();
    }
    Deno.renameSync(`${dir}/far/away/top.vhd`, `${dir}/sub/top.vhd`);
    await qemuImg(["create", "-q", "-f", "vpc", "-o", "force_size=on", `${dir}/other.vhd`, "16M"]);
    Deno.renameSync(`${dir}/mid.vhd`, `${dir}/mid.keep`);
    Deno.copyFileSync(`${dir}/other.vhd`, `${dir}/mid.vhd`);
    await assert.rejects(openDisk(`vhd:${dir}/sub/top.vhd`), /unique id/);
    const report = await vhdFormat.check(`${dir}/sub/top.vhd`);
    assert.match(report.errors.join(";"), /unique id/);
    Deno.removeSync(`${dir}/mid.vhd`);
    await assert.rejects(openDisk(`vhd:${dir}/sub/top.vhd`), /parent VHD not found/);
    assert.match((await vhdFormat.check(`${dir}/sub/top.vhd`)).errors.join(";"), /dangling/);
    Deno.renameSync(`${dir}/mid.keep`, `${dir}/mid.vhd`);
    await assertCheckClean(`${dir}/sub/top.vhd`);
  });
});

Deno.test("vhd interop: format probing finds dynamic, differencing and fixed VHDs", async () => {
  await withTempDir(async (dir) => {
    await qemuImg(["create", "-q", "-f", "vpc", `${dir}/d.vhd`, "4M"]);
    await qemuImg(["create", "-q", "-f", "vpc", "-o", "subformat=fixed", `${dir}/f.vhd`, "4M"]);
    await vhdFormat.create(`${dir}/c.vhd`, { size: 0, backing: "d.vhd" });
    const { probeFormat } = await import("../../../drivers/mod.ts");
    for (const name of ["d.vhd", "f.vhd", "c.vhd"]) {
      assert.equal(await probeFormat(`${dir}/${name}`), "vhd", name);
    }
    // A raw file that merely ends with the cookie (no valid footer) stays raw.
    const raw = new Uint8Array(8192);
    raw.set(new TextEncoder().encode("conectix"), 8192 - 512);
    writeFile(`${dir}/r.raw`, raw);
    assert.equal(await probeFormat(`${dir}/r.raw`), "raw");
    // A 511-byte footer (images older than Virtual PC 2004) is found and served.
    const fixed = Deno.readFileSync(`${dir}/f.vhd`);
    const old = fixed.slice(0, fixed.length - 1);
    writeFile(`${dir}/old.vhd`, old);
    assert.equal(await probeFormat(`${dir}/old.vhd`), "vhd");
    const disk = await openDisk(`${dir}/old.vhd`.replace(/^/, "vhd:"), { readOnly: true });
    try {
      assert.equal(disk.size, fixed.length - 512);
    } finally {
      await disk.close();
    }
  });
});

Deno.test("vhd interop: parent locators W2ru, W2ku, MacX and the parent name each suffice", async () => {
  await withTempDir(async (dir) => {
    const { checksum } = await import("../../../drivers/vhd/footer.ts");
    await vhdFormat.create(`${dir}/p.vhd`, { size: MiB });
    const parent = await openDisk(`vhd:${dir}/p.vhd`);
    const data = rng(50).fill(new Uint8Array(MiB));
    await parent.write(0, data);
    await parent.close();
    await vhdFormat.create(`${dir}/c.vhd`, { size: 0, backing: "p.vhd" });
    const bytes = Deno.readFileSync(`${dir}/c.vhd`);
    const codes = { W2ru: 0x57327275, W2ku: 0x57326b75, MacX: 0x4d616358, name: 0 };
    Deno.mkdirSync(`${dir}/x`);
    for (const [keep, code] of Object.entries(codes)) {
      const b = bytes.slice(), v = new DataView(b.buffer);
      for (let k = 0; k < 8; k++) {
        const at = 512 + 576 + 24 * k;
        if (v.getUint32(at) !== code) v.setUint32(at, 0);
      }
      if (keep !== "name") b.fill(0, 512 + 64, 512 + 576); // no parent name to fall back on
      v.setUint32(512 + 36, checksum(b.subarray(512, 1536), 36));
      // W2ru and the name are relative: the child stays beside its parent; the others move.
      const where = keep === "W2ru" || keep === "name" ? `${dir}/c-${keep}.vhd` : `${dir}/x/c.vhd`;
      writeFile(where, b);
      const disk = await openDisk(`vhd:${where}`, { readOnly: true });
      try {
        assertSame(await readAll(disk), data, `child with ${keep} only`);
      } finally {
        await disk.close();
      }
    }
  });
});
