/** `tapd img2qcow`, checked with the real qemu-img; plus the streaming writer driven directly. */
import assert from "node:assert/strict";
import { O_CREAT, O_EXCL, O_RDWR } from "../../ffi/constants.ts";
import { FileHandle } from "../../ffi/file.ts";
import { createEngine } from "../../io/mod.ts";
import { geometryFor } from "../../tools/qcow_layout.ts";
import { openRawSource, writeQcow } from "../../tools/qcow_writer.ts";
import { rng } from "../util.ts";
import {
  assertOneLineError,
  assertSameContents,
  type Fill,
  inTempDir,
  KiB,
  listDir,
  loopUnavailable,
  makeRaw,
  MiB,
  qemuImgOk,
  qemuInfo,
  tapd,
  tapdOk,
  withLoopDevice,
} from "./helpers.ts";

/** Converts `src` with tapd and checks the result with qemu-img; returns the image's size. */
async function convertAndCheck(src: string, img: string, size: number, extra: string[] = []) {
  await tapdOk("img2qcow", ...extra, img, src);
  const info = await qemuInfo(img, "qcow");
  assert.equal(info["format"], "qcow");
  assert.equal(info["virtual-size"], Math.ceil(size / 512) * 512);
  await assertSameContents(img, "qcow", src, "raw");
  return Deno.statSync(img).size;
}

Deno.test("img2qcow: random data with zero holes, sizes that are not whole clusters", async () => {
  await inTempDir(async (dir) => {
    const sizes = [4 * KiB, 1000001, 3 * MiB + 512, 20 * MiB + 7, 17 * MiB + 3 * 4096];
    for (const size of sizes) {
      const src = `${dir}/src-${size}.raw`;
      makeRaw(src, size, rng(size));
      const imgSize = await convertAndCheck(src, `${dir}/img-${size}.qcow`, size);
      if (size >= MiB) assert.ok(imgSize < size, `image ${imgSize} ≥ source ${size}`);
    }
  });
});

Deno.test("img2qcow: all-random data, all-zero data and a file that is one hole", async () => {
  await inTempDir(async (dir) => {
    const cases: [string, Fill[]][] = [["random", ["random"]], ["zeros", ["zeros"]], [
      "hole",
      ["hole"],
    ]];
    for (const [name, pattern] of cases) {
      const size = 9 * MiB + 100;
      const src = `${dir}/${name}.raw`;
      makeRaw(src, size, rng(1), pattern);
      const imgSize = await convertAndCheck(src, `${dir}/${name}.qcow`, size);
      if (name !== "random") {
        // Nothing stored: the image is what qemu-img create makes for that size.
        await qemuImgOk("create", "-q", "-f", "qcow", `${dir}/empty.qcow`, String(size + 412));
        assert.equal(imgSize, Deno.statSync(`${dir}/empty.qcow`).size);
      } else {
        assert.ok(imgSize > size);
      }
    }
  });
});

Deno.test("img2qcow --cluster-size 512 and 64k, zero runs shorter than a cluster", async () => {
  await inTempDir(async (dir) => {
    const size = 6 * MiB + 1536;
    const src = `${dir}/src.raw`;
    // 1.5 KiB pieces: zero runs that cover some 512-byte clusters but no 64 KiB one.
    makeRaw(src, size, rng(5), ["random", "zeros", "zeros", "random", "hole", "hole"], 1536);
    for (const cluster of ["512", "64k"]) {
      const img = `${dir}/c${cluster}.qcow`;
      await convertAndCheck(src, img, size, ["--cluster-size", cluster]);
      assert.equal((await qemuInfo(img, "qcow"))["cluster-size"], cluster === "512" ? 512 : 65536);
    }
    assert.ok(Deno.statSync(`${dir}/c512.qcow`).size < size * 0.8);
  });
});

Deno.test("img2qcow output is laid out as QEMU's: qemu-io can write more into it", async () => {
  await inTempDir(async (dir) => {
    const size = 5 * MiB;
    const src = `${dir}/src.raw`;
    makeRaw(src, size, rng(9));
    await tapdOk("img2qcow", `${dir}/a.qcow`, src);
    const r = await new Deno.Command("qemu-io", {
      args: ["-f", "qcow", "-c", "write -P 0xcd 4m 512k", `${dir}/a.qcow`],
      stdout: "piped",
      stderr: "piped",
    }).output();
    assert.ok(r.success);
    const expected = Deno.readFileSync(src);
    expected.fill(0xcd, 4 * MiB, 4 * MiB + 512 * KiB);
    Deno.writeFileSync(`${dir}/expected.raw`, expected);
    await assertSameContents(`${dir}/a.qcow`, "qcow", `${dir}/expected.raw`, "raw");
  });
});

Deno.test("the streaming writer with tiny chunks and depths (many chunks in flight)", async () => {
  await inTempDir(async (dir) => {
    const size = 3 * MiB + 4096 + 700;
    const src = `${dir}/src.raw`;
    makeRaw(src, size, rng(21), ["random", "zeros", "hole", "random", "random", "zeros"], 5000);
    for (const [chunk, readDepth, writeDepth] of [[4096, 1, 1], [12288, 3, 2], [65536, 8, 1]]) {
      const img = `${dir}/w${chunk}.qcow`;
      const source = openRawSource(src, 8);
      const out = FileHandle.open(img, O_RDWR | O_CREAT | O_EXCL);
      const engine = createEngine("sync");
      try {
        const seen: number[] = [];
        const result = await writeQcow(source, out, engine, {
          geometry: geometryFor(undefined, false),
          chunkSize: chunk,
          readDepth,
          writeDepth,
          onProgress: (d) => seen.push(d),
        });
        assert.equal(result.virtualSize, Math.ceil(size / 512) * 512);
        assert.equal(result.fileSize, out.stat().size);
        assert.deepEqual(seen, [...seen].sort((a, b) => a - b), "progress is monotonic");
        assert.equal(seen[seen.length - 1], size);
      } finally {
        await engine.close();
        out.close();
        await source.close();
      }
      await assertSameContents(img, "qcow", src, "raw");
    }
  });
});

const noLoop = loopUnavailable();

Deno.test({
  name: `img2qcow reads a loop device${noLoop === null ? "" : ` (skipped: ${noLoop})`}`,
  ignore: noLoop !== null,
  fn: async () => {
    await inTempDir(async (dir) => {
      const size = 24 * MiB;
      const backing = `${dir}/disk.raw`;
      makeRaw(backing, size, rng(33));
      await withLoopDevice(backing, async (dev) => {
        await tapdOk("img2qcow", `${dir}/dev.qcow`, dev);
      });
      assert.equal((await qemuInfo(`${dir}/dev.qcow`, "qcow"))["virtual-size"], size);
      await assertSameContents(`${dir}/dev.qcow`, "qcow", backing, "raw");
      assert.ok(Deno.statSync(`${dir}/dev.qcow`).size < size);
    });
  },
});

Deno.test("img2qcow refuses to overwrite without -f/--force, and the source itself", async () => {
  await inTempDir(async (dir) => {
    const src = `${dir}/src.raw`, img = `${dir}/a.qcow`;
    makeRaw(src, MiB, rng(2));
    Deno.writeTextFileSync(img, "precious");
    assertOneLineError(
      await tapd("img2qcow", img, src),
      1,
      /"[^"]*a\.qcow" already exists: use --force/,
    );
    assert.equal(Deno.readTextFileSync(img), "precious");
    await tapdOk("img2qcow", "-f", img, src);
    await assertSameContents(img, "qcow", src, "raw");
    Deno.removeSync(img);
    await tapdOk("img2qcow", "--force", "-q", img, src); // --force on a new file is fine too
    assertOneLineError(
      await tapd("img2qcow", "--force", src, src),
      1,
      /is the source image itself/,
    );
    assert.deepEqual(listDir(dir), ["a.qcow", "src.raw"]);
  });
});

Deno.test("img2qcow: a missing or empty source exits 1 with one line and leaves no output", async () => {
  await inTempDir(async (dir) => {
    const img = `${dir}/a.qcow`;
    assertOneLineError(
      await tapd("img2qcow", img, `${dir}/missing.raw`),
      1,
      /^tapd: ENOENT open .*missing\.raw: No such file or directory$/,
    );
    Deno.writeFileSync(`${dir}/empty.raw`, new Uint8Array(0));
    assertOneLineError(await tapd("img2qcow", img, `${dir}/empty.raw`), 1, /is empty/);
    assertOneLineError(await tapd("img2qcow", img, dir), 1, /neither a regular file nor a block/);
    assert.deepEqual(listDir(dir), ["empty.raw"]);
  });
});

Deno.test("img2qcow: bad command lines exit 2 with one line", async () => {
  assertOneLineError(await tapd("img2qcow"), 2, /expected <QCOW_FILENAME> <SRC_IMAGE>, got 0/);
  assertOneLineError(await tapd("img2qcow", "a.qcow"), 2, /got 1 argument$/);
  assertOneLineError(await tapd("img2qcow", "a", "b", "c"), 2, /got 3 arguments/);
  assertOneLineError(await tapd("img2qcow", "--nope", "a", "b"), 2, /Unknown option '--nope'/);
  assertOneLineError(
    await tapd("img2qcow", "--cluster-size", "1000", "a", "b"),
    2,
    /Invalid --cluster-size/,
  );
  assert.match((await tapdOk("help", "img2qcow")).stdout, /Usage: tapd img2qcow/);
});
