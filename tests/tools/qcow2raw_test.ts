/**
 * `tapd qcow2raw` on images QEMU made (empty, converted, compressed, over a backing file), and
 * the copy loop on a raw disk. Needs the qcow driver; reported as ignored, with the reason, in a
 * build without it.
 */
import assert from "node:assert/strict";
import { DRIVERS, openDisk } from "../../drivers/mod.ts";
import { O_CREAT, O_EXCL, O_RDWR } from "../../ffi/constants.ts";
import { FileHandle } from "../../ffi/file.ts";
import { createEngine } from "../../io/mod.ts";
import { copyDisk } from "../../tools/qcow2raw.ts";
import { assertBytes, rng } from "../util.ts";
import {
  allocated,
  assertOneLineError,
  dataBytes,
  inTempDir,
  KiB,
  listDir,
  loopUnavailable,
  makeCompressedQcow,
  makeRaw,
  MiB,
  qemuImgOk,
  qemuIoOk,
  tapd,
  tapdOk,
  withLoopDevice,
} from "./helpers.ts";

const noDriver = DRIVERS.has("qcow") ? "" : " (skipped: no qcow driver registered)";
const SLACK = 64 * KiB; // file-system metadata and rounding

/** Checks that `out` holds `expected` (zero-padded to a whole sector) and is no less sparse. */
function assertRawCopy(out: string, expected: Uint8Array, what: string): void {
  const size = Math.ceil(expected.length / 512) * 512;
  const data = Deno.readFileSync(out);
  assert.equal(data.length, size, `${what}: size`);
  assertBytes(data.subarray(0, expected.length), expected, what);
  assert.ok(data.subarray(expected.length).every((b) => b === 0), `${what}: padding`);
  const used = allocated(out), want = dataBytes(expected);
  assert.ok(used <= want + SLACK, `${what}: ${used} bytes allocated for ${want} bytes of data`);
}

Deno.test({
  name: `qcow2raw of qemu-img convert -O qcow images: same bytes, holes kept${noDriver}`,
  ignore: noDriver !== "",
  fn: async () => {
    await inTempDir(async (dir) => {
      for (const size of [MiB, 1000001, 13 * MiB + 4096 + 512]) {
        const src = `${dir}/src-${size}.raw`;
        const contents = makeRaw(src, size, rng(size));
        const img = `${dir}/img-${size}.qcow`, out = `${dir}/out-${size}.raw`;
        await qemuImgOk("convert", "-f", "raw", "-O", "qcow", src, img);
        await tapdOk("qcow2raw", out, img);
        assertRawCopy(out, contents, `size ${size}`);
        assert.ok(allocated(out) <= allocated(src) + SLACK);
      }
    });
  },
});

Deno.test({
  name: `qcow2raw of images with compressed clusters (written by QEMU)${noDriver}`,
  ignore: noDriver !== "",
  fn: async () => {
    await inTempDir(async (dir) => {
      for (const size of [MiB, 1000448, 2 * MiB + 3 * 512]) {
        const img = await makeCompressedQcow(dir, `c-${size}.qcow`, size, rng(size));
        const out = `${dir}/out-${size}.raw`;
        await tapdOk("qcow2raw", out, img.path);
        assertRawCopy(out, img.contents, `compressed, size ${size}`);
        await qemuImgOk("convert", "-f", "qcow", "-O", "raw", img.path, `${dir}/qemu-${size}.raw`);
        assertBytes(Deno.readFileSync(out), Deno.readFileSync(`${dir}/qemu-${size}.raw`));
      }
    });
  },
});

Deno.test({
  name: `qcow2raw of an empty qemu-img create -f qcow image is one hole${noDriver}`,
  ignore: noDriver !== "",
  fn: async () => {
    await inTempDir(async (dir) => {
      await qemuImgOk("create", "-q", "-f", "qcow", `${dir}/e.qcow`, "100M");
      await tapdOk("qcow2raw", `${dir}/e.raw`, `${dir}/e.qcow`);
      assert.equal(Deno.statSync(`${dir}/e.raw`).size, 100 * MiB);
      assert.equal(allocated(`${dir}/e.raw`), 0);
      const data = Deno.readFileSync(`${dir}/e.raw`);
      assert.ok(data.every((b) => b === 0));
    });
  },
});

Deno.test({
  name: `qcow2raw reads through the backing chain (qemu-img create -b, qemu-io writes)${noDriver}`,
  ignore: noDriver !== "",
  fn: async () => {
    await inTempDir(async (dir) => {
      const size = 6 * MiB + 1024;
      const base = makeRaw(`${dir}/base.raw`, size, rng(4));
      await qemuImgOk(
        "create",
        "-q",
        "-f",
        "qcow",
        "-b",
        "base.raw",
        "-F",
        "raw",
        `${dir}/mid.qcow`,
      );
      await qemuIoOk("-f", "qcow", "-c", "write -P 0xab 1m 300k", `${dir}/mid.qcow`);
      await qemuImgOk(
        "create",
        "-q",
        "-f",
        "qcow",
        "-b",
        "mid.qcow",
        "-F",
        "qcow",
        `${dir}/top.qcow`,
      );
      await qemuIoOk(
        "-f",
        "qcow",
        "-c",
        "write -z 4m 64k",
        "-c",
        "write -P 0 5m 4k",
        `${dir}/top.qcow`,
      );
      const expected = base.slice();
      expected.fill(0xab, MiB, MiB + 300 * KiB);
      expected.fill(0, 4 * MiB, 4 * MiB + 64 * KiB);
      expected.fill(0, 5 * MiB, 5 * MiB + 4 * KiB);
      await tapdOk("qcow2raw", `${dir}/out.raw`, `${dir}/top.qcow`);
      assertRawCopy(`${dir}/out.raw`, expected, "top of the chain");
      // The same as QEMU's own conversion.
      await qemuImgOk("convert", "-f", "qcow", "-O", "raw", `${dir}/top.qcow`, `${dir}/qemu.raw`);
      assertBytes(Deno.readFileSync(`${dir}/out.raw`), Deno.readFileSync(`${dir}/qemu.raw`));
    });
  },
});

Deno.test({
  name: `img2qcow then qcow2raw gives back the source${noDriver}`,
  ignore: noDriver !== "",
  fn: async () => {
    await inTempDir(async (dir) => {
      const size = 11 * MiB + 3 * 512;
      const contents = makeRaw(`${dir}/src.raw`, size, rng(8), ["random", "hole", "zeros"], 70000);
      for (const cluster of ["512", "4k", "64k"]) {
        await tapdOk(
          "img2qcow",
          "--cluster-size",
          cluster,
          `${dir}/${cluster}.qcow`,
          `${dir}/src.raw`,
        );
        await tapdOk("qcow2raw", `${dir}/${cluster}.raw`, `${dir}/${cluster}.qcow`);
        assertRawCopy(`${dir}/${cluster}.raw`, contents, `cluster ${cluster}`);
      }
    });
  },
});

const noLoop = loopUnavailable();

Deno.test({
  name: `qcow2raw onto a block device writes every byte${
    noLoop !== null ? ` (skipped: ${noLoop})` : noDriver
  }`,
  ignore: noLoop !== null || noDriver !== "",
  fn: async () => {
    await inTempDir(async (dir) => {
      const size = 5 * MiB + 512;
      const contents = makeRaw(`${dir}/src.raw`, size, rng(12));
      await qemuImgOk("convert", "-f", "raw", "-O", "qcow", `${dir}/src.raw`, `${dir}/a.qcow`);
      const target = `${dir}/device.raw`; // behind the loop device; full of garbage first
      Deno.writeFileSync(target, rng(13).fill(new Uint8Array(8 * MiB)));
      await withLoopDevice(target, async (dev) => {
        assertOneLineError(await tapd("qcow2raw", dev, `${dir}/a.qcow`), 1, /already exists/);
        await tapdOk("qcow2raw", "--force", "-q", dev, `${dir}/a.qcow`);
      });
      const data = Deno.readFileSync(target);
      assertBytes(data.subarray(0, size), contents, "device contents");
      assert.equal(data.length, 8 * MiB); // the rest of the device is left alone
      // Too small a device is refused.
      const small = `${dir}/small.raw`;
      Deno.writeFileSync(small, new Uint8Array(MiB));
      await withLoopDevice(small, async (dev) => {
        assertOneLineError(
          await tapd("qcow2raw", "-f", dev, `${dir}/a.qcow`),
          1,
          /is smaller than the image/,
        );
      });
    });
  },
});

Deno.test("copyDisk on a raw disk: holes stay holes, zeros written only when asked", async () => {
  await inTempDir(async (dir) => {
    const size = 9 * MiB + 512;
    const contents = makeRaw(`${dir}/src.raw`, size, rng(14));
    await using disk = await openDisk(`aio:${dir}/src.raw`, { readOnly: true });
    for (const sparse of [true, false]) {
      const out = `${dir}/out-${sparse}.raw`;
      using file = FileHandle.open(out, O_RDWR | O_CREAT | O_EXCL);
      file.truncate(size);
      const engine = createEngine("sync");
      let last = 0;
      await copyDisk(disk, file, engine, sparse, (d) => last = d);
      await engine.close();
      assert.equal(last, size);
      assertBytes(Deno.readFileSync(out), contents);
      if (sparse) assert.ok(allocated(out) <= dataBytes(contents) + SLACK);
      else assert.ok(allocated(out) >= size - 4096);
    }
  });
});

Deno.test({
  name: `qcow2raw refuses to overwrite without --force${noDriver}`,
  ignore: noDriver !== "",
  fn: async () => {
    await inTempDir(async (dir) => {
      await qemuImgOk("create", "-q", "-f", "qcow", `${dir}/a.qcow`, "1M");
      Deno.writeTextFileSync(`${dir}/out.raw`, "precious");
      assertOneLineError(
        await tapd("qcow2raw", `${dir}/out.raw`, `${dir}/a.qcow`),
        1,
        /already exists: use --force/,
      );
      assert.equal(Deno.readTextFileSync(`${dir}/out.raw`), "precious");
      await tapdOk("qcow2raw", "-f", `${dir}/out.raw`, `${dir}/a.qcow`);
      assert.equal(Deno.statSync(`${dir}/out.raw`).size, MiB);
      assertOneLineError(
        await tapd("qcow2raw", "-f", `${dir}/a.qcow`, `${dir}/a.qcow`),
        1,
        /is the source image itself/,
      );
      assert.deepEqual(listDir(dir), ["a.qcow", "out.raw"]);
    });
  },
});

Deno.test("qcow2raw: missing, non-qcow and broken sources exit 1 with one line, no output", async () => {
  await inTempDir(async (dir) => {
    const out = `${dir}/out.raw`;
    assertOneLineError(
      await tapd("qcow2raw", out, `${dir}/missing.qcow`),
      1,
      /^tapd: ENOENT open .*missing\.qcow: No such file or directory$/,
    );
    Deno.writeFileSync(`${dir}/plain.raw`, new Uint8Array(4096));
    assertOneLineError(await tapd("qcow2raw", out, `${dir}/plain.raw`), 1, /not a qcow image/);
    await qemuImgOk("create", "-q", "-f", "qcow2", `${dir}/v2.qcow2`, "1M");
    assertOneLineError(await tapd("qcow2raw", out, `${dir}/v2.qcow2`), 1, /qcow2/);
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
      `${dir}/orphan.qcow`,
      "1M",
    );
    assertOneLineError(await tapd("qcow2raw", out, `${dir}/orphan.qcow`), 1, /gone\.raw/);
    assert.deepEqual(listDir(dir), ["orphan.qcow", "plain.raw", "v2.qcow2"]);
  });
});

Deno.test("qcow2raw: bad command lines exit 2 with one line", async () => {
  assertOneLineError(await tapd("qcow2raw"), 2, /expected <DEST_FILENAME> <QCOW_FILENAME>, got 0/);
  assertOneLineError(await tapd("qcow2raw", "a"), 2, /got 1 argument$/);
  assertOneLineError(await tapd("qcow2raw", "a", "b", "c"), 2, /got 3 arguments/);
  assertOneLineError(await tapd("qcow2raw", "--size", "1", "a", "b"), 2, /Unknown option '--size'/);
  assert.match((await tapdOk("help", "qcow2raw")).stdout, /Usage: tapd qcow2raw/);
});
