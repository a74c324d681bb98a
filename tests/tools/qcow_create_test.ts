/** `tapd qcow-create`, checked against the real qemu-img (and qemu-io for writes into the images). */
import assert from "node:assert/strict";
import { rng } from "../util.ts";
import {
  allocated,
  assertOneLineError,
  assertSameContents,
  inTempDir,
  KiB,
  listDir,
  makeRaw,
  MiB,
  qemuImgOk,
  qemuInfo,
  qemuIoOk,
  tapd,
  tapdOk,
} from "./helpers.ts";

/** A raw file of zeros (a hole) of `size` bytes. */
function zeroRaw(path: string, size: number): void {
  Deno.writeFileSync(path, new Uint8Array(0));
  Deno.truncateSync(path, size);
}

Deno.test("qcow-create writes the same bytes as qemu-img create -f qcow, at several sizes", async () => {
  await inTempDir(async (dir) => {
    // [our SIZE argument, the size in bytes]: plain numbers are MiB, as in blktap.
    const cases: [string, number][] = [
      ["1", MiB],
      ["100", 100 * MiB],
      ["977k", 977 * KiB], // not a multiple of the cluster size
      ["1000001", 1000001 * MiB],
      ["10G", 10 * 1024 * MiB],
      ["3.5k", 3584],
      ["1.25M", 1.25 * MiB],
    ];
    for (const [arg, bytes] of cases) {
      const ours = `${dir}/ours-${arg}.qcow`, theirs = `${dir}/qemu-${arg}.qcow`;
      await tapdOk("qcow-create", arg, ours);
      await qemuImgOk("create", "-q", "-f", "qcow", theirs, String(bytes));
      assert.deepEqual(Deno.readFileSync(ours), Deno.readFileSync(theirs), `size ${arg}`);
      const info = await qemuInfo(ours, "qcow");
      assert.equal(info["format"], "qcow");
      assert.equal(info["virtual-size"], Math.ceil(bytes / 512) * 512, `size ${arg}`);
      assert.equal(info["cluster-size"], 4096);
      assert.equal(info["backing-filename"], undefined);
      if (bytes <= 100 * MiB) {
        zeroRaw(`${dir}/zero.raw`, Math.ceil(bytes / 512) * 512);
        await assertSameContents(ours, "qcow", `${dir}/zero.raw`, "raw");
      }
    }
  });
});

Deno.test("qcow-create sizes sub-MiB images with a unit and rounds up to a whole sector", async () => {
  await inTempDir(async (dir) => {
    await tapdOk("qcow-create", "1000001", `${dir}/a.qcow`); // MiB
    await tapdOk("qcow-create", "1000001b", `${dir}/b.qcow`); // bytes
    assert.equal((await qemuInfo(`${dir}/a.qcow`, "qcow"))["virtual-size"], 1000001 * MiB);
    assert.equal((await qemuInfo(`${dir}/b.qcow`, "qcow"))["virtual-size"], 1000448);
  });
});

Deno.test("qcow-create over a raw backing file: same bytes as qemu-img, reads as the backing file", async () => {
  await inTempDir(async (dir) => {
    for (const size of [MiB, 1000001, 5 * MiB + 512]) {
      const base = `${dir}/base-${size}.raw`;
      makeRaw(base, size, rng(size));
      const name = `base-${size}.raw`; // relative: resolved against the image's directory
      const ours = `${dir}/ours-${size}.qcow`, theirs = `${dir}/qemu-${size}.qcow`;
      await tapdOk("qcow-create", "0", ours, name);
      await qemuImgOk("create", "-q", "-f", "qcow", "-b", name, "-F", "raw", theirs);
      assert.deepEqual(Deno.readFileSync(ours), Deno.readFileSync(theirs), `size ${size}`);
      const info = await qemuInfo(ours, "qcow");
      assert.equal(info["virtual-size"], Math.ceil(size / 512) * 512);
      assert.equal(info["cluster-size"], 512);
      assert.equal(info["backing-filename"], name);
      await assertSameContents(ours, "qcow", base, "raw");
      // Its L1 table ends mid-cluster and is padded to a sector: no leak for tapd check either
      const check = await tapdOk("check", ours);
      assert.match(check.stdout, /No errors were found/);
      assert.match((await tapdOk("check", theirs)).stdout, /No errors were found/);
    }
  });
});

Deno.test("qcow-create with a backing file and an explicit size uses the size", async () => {
  await inTempDir(async (dir) => {
    makeRaw(`${dir}/base.raw`, 2 * MiB, rng(7));
    await tapdOk("qcow-create", "4", `${dir}/big.qcow`, `${dir}/base.raw`);
    const info = await qemuInfo(`${dir}/big.qcow`, "qcow");
    assert.equal(info["virtual-size"], 4 * MiB);
    assert.equal(info["backing-filename"], `${dir}/base.raw`); // stored as given (absolute)
    // The first 2 MiB read as the backing file, the rest as zeros.
    await qemuImgOk("convert", "-f", "qcow", "-O", "raw", `${dir}/big.qcow`, `${dir}/big.raw`);
    const data = Deno.readFileSync(`${dir}/big.raw`), base = Deno.readFileSync(`${dir}/base.raw`);
    assert.deepEqual(data.subarray(0, 2 * MiB), base);
    assert.ok(data.subarray(2 * MiB).every((b) => b === 0));
  });
});

Deno.test("qcow-create over a qcow backing file takes the size from its header", async () => {
  await inTempDir(async (dir) => {
    makeRaw(`${dir}/base.raw`, 3 * MiB + 1024, rng(11));
    await tapdOk("qcow-create", "0", `${dir}/mid.qcow`, "base.raw");
    await qemuIoOk("-f", "qcow", "-c", "write -P 0x5a 64k 128k", `${dir}/mid.qcow`);
    await tapdOk("qcow-create", "0", `${dir}/top.qcow`, "mid.qcow");
    const info = await qemuInfo(`${dir}/top.qcow`, "qcow");
    assert.equal(info["virtual-size"], 3 * MiB + 1024);
    assert.equal(info["backing-filename"], "mid.qcow");
    await assertSameContents(`${dir}/top.qcow`, "qcow", `${dir}/mid.qcow`, "qcow");
  });
});

Deno.test("qcow-create --cluster-size 512..64k: QEMU reads, writes and reads back the images", async () => {
  await inTempDir(async (dir) => {
    const size = 5 * MiB + 3 * 512; // not a multiple of any of the cluster sizes above 512
    for (let cluster = 512; cluster <= 64 * KiB; cluster *= 2) {
      const img = `${dir}/c${cluster}.qcow`;
      await tapdOk("qcow-create", "--cluster-size", String(cluster), `${size}b`, img);
      const info = await qemuInfo(img, "qcow");
      assert.equal(info["cluster-size"], cluster);
      assert.equal(info["virtual-size"], size);
      zeroRaw(`${dir}/zero.raw`, size);
      await assertSameContents(img, "qcow", `${dir}/zero.raw`, "raw");
      // QEMU allocates into it (several L2 tables' worth apart) and reads back what it wrote.
      await qemuIoOk(
        "-f",
        "qcow",
        "-c",
        "write -P 0x11 0 4k",
        "-c",
        "write -P 0x22 3m 8k",
        "-c",
        `write -P 0x33 ${size - 1024} 1k`,
        "-c",
        "read -P 0x11 0 4k",
        "-c",
        "read -P 0x22 3m 8k",
        "-c",
        `read -P 0x33 ${size - 1024} 1k`,
        img,
      );
    }
  });
});

Deno.test("qcow-create --cluster-size over a backing file", async () => {
  await inTempDir(async (dir) => {
    makeRaw(`${dir}/base.raw`, 2 * MiB, rng(3));
    for (const cluster of ["512", "4k", "64k"]) {
      const img = `${dir}/c${cluster}.qcow`;
      await tapdOk("qcow-create", "--cluster-size", cluster, "0", img, "base.raw");
      const info = await qemuInfo(img, "qcow");
      assert.equal(info["cluster-size"], cluster === "512" ? 512 : cluster === "4k" ? 4096 : 65536);
      assert.equal(info["backing-filename"], "base.raw");
      await assertSameContents(img, "qcow", `${dir}/base.raw`, "raw");
    }
  });
});

Deno.test("qcow-create -r reserves the space of the whole image, contents still zero", async () => {
  await inTempDir(async (dir) => {
    await tapdOk("qcow-create", "-r", "64", `${dir}/r.qcow`);
    await tapdOk("qcow-create", "64", `${dir}/s.qcow`);
    assert.equal(Deno.statSync(`${dir}/r.qcow`).size, Deno.statSync(`${dir}/s.qcow`).size);
    assert.ok(allocated(`${dir}/r.qcow`) >= 64 * MiB, `allocated ${allocated(`${dir}/r.qcow`)}`);
    assert.ok(allocated(`${dir}/s.qcow`) < 64 * KiB);
    zeroRaw(`${dir}/zero.raw`, 64 * MiB);
    await assertSameContents(`${dir}/r.qcow`, "qcow", `${dir}/zero.raw`, "raw");
    await qemuIoOk(
      "-f",
      "qcow",
      "-c",
      "write -P 0x77 1m 1m",
      "-c",
      "read -P 0x77 1m 1m",
      `${dir}/r.qcow`,
    );
    // Blktap's usage: -f qcow is accepted.
    await tapdOk("qcow-create", "-r", "-f", "qcow", "1", `${dir}/f.qcow`);
  });
});

Deno.test("qcow-create refuses to overwrite without --force and replaces with it", async () => {
  await inTempDir(async (dir) => {
    const img = `${dir}/a.qcow`;
    await tapdOk("qcow-create", "1", img);
    const before = Deno.readFileSync(img);
    assertOneLineError(await tapd("qcow-create", "2", img), 1, /already exists: use --force/);
    assert.deepEqual(Deno.readFileSync(img), before);
    // -f is blktap's format flag here, not "force".
    assertOneLineError(await tapd("qcow-create", "-f", "2", img), 2, /Invalid format "2"/);
    await tapdOk("qcow-create", "--force", "2", img);
    assert.equal((await qemuInfo(img, "qcow"))["virtual-size"], 2 * MiB);
    assert.deepEqual(listDir(dir), ["a.qcow"]);
  });
});

Deno.test("qcow-create: bad command lines exit 2 with one line", async () => {
  await inTempDir(async (dir) => {
    const img = `${dir}/x.qcow`;
    assertOneLineError(await tapd("qcow-create"), 2, /expected <SIZE> <FILENAME>/);
    assertOneLineError(await tapd("qcow-create", "10"), 2, /got 1 argument$/);
    assertOneLineError(await tapd("qcow-create", "1", img, "b", "c"), 2, /got 4 arguments/);
    assertOneLineError(await tapd("qcow-create", "12x", img), 2, /Invalid size "12x"/);
    assertOneLineError(await tapd("qcow-create", "0", img), 2, /must not be zero/);
    assertOneLineError(
      await tapd("qcow-create", "--bogus", "1", img),
      2,
      /Unknown option '--bogus'/,
    );
    assertOneLineError(
      await tapd("qcow-create", "--cluster-size", "3000", "1", img),
      2,
      /Invalid --cluster-size "3000"/,
    );
    assertOneLineError(
      await tapd("qcow-create", "--cluster-size", "128k", "1", img),
      2,
      /Invalid --cluster-size "128k"/,
    );
    assertOneLineError(await tapd("qcow-create", "-f", "vmdk", "1", img), 2, /only qcow/);
    assertOneLineError(
      await tapd("qcow-create", "--cluster-size", "512", "1P", img),
      2,
      /can hold at most/,
    );
    assert.deepEqual(listDir(dir), []);
  });
});

Deno.test("qcow-create: a missing backing file exits 1 with one line and writes nothing", async () => {
  await inTempDir(async (dir) => {
    const r = await tapd("qcow-create", "0", `${dir}/x.qcow`, "nonexistent.raw");
    assertOneLineError(r, 1, /backing file ".*nonexistent\.raw".*ENOENT/);
    assertOneLineError(
      await tapd("qcow-create", "1", `${dir}/nodir/x.qcow`),
      1,
      /^tapd: ENOENT open .*nodir\/x\.qcow: No such file or directory$/,
    );
    assert.deepEqual(listDir(dir), []);
  });
});

Deno.test("qcow-create --help prints the usage", async () => {
  const r = await tapdOk("help", "qcow-create");
  assert.match(r.stdout, /Usage: tapd qcow-create \[-h\] \[-r\] \[-f qcow\]/);
  assert.match((await tapdOk("qcow-create", "-h")).stdout, /BACKING_FILENAME/);
});
