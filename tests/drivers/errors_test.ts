/** Requests every driver must refuse, and how: the Disk wrapper's checks and open failures. */
import assert from "node:assert/strict";
import { openDisk } from "../../drivers/mod.ts";
import { DiskError, type DiskErrorCode } from "../../drivers/errors.ts";
import { SysError } from "../../ffi/errno.ts";
import { sharedPool } from "../../io/buffer_pool.ts";
import { VARIANTS } from "./variants.ts";
import { assertBytes, rng, withTempDir } from "../util.ts";

const MiB = 1024 * 1024;
const SIZE = 4 * MiB;

async function assertDiskError(p: Promise<unknown>, code: DiskErrorCode, what: string) {
  await assert.rejects(p, (e: unknown) => {
    assert.ok(e instanceof DiskError, `${what}: expected DiskError ${code}, got ${e}`);
    assert.equal(e.code, code, `${what}: ${e.message}`);
    assert.ok(e.message.startsWith(code), e.message);
    return true;
  });
}

/** Runs `fn` with a 4 MiB random image (or `bytes`) in a fresh directory. */
function withImage(
  fn: (path: string, data: Uint8Array) => Promise<void>,
  bytes?: Uint8Array,
): Promise<void> {
  return withTempDir(async (dir) => {
    const path = `${dir}/disk.img`;
    const data = bytes ?? rng(0xe7707).fill(new Uint8Array(SIZE));
    Deno.writeFileSync(path, data);
    await fn(path, data);
  });
}

for (const v of VARIANTS) {
  const spec = (path: string, suffix = "") => `${v.type}:${path}${suffix}`;

  Deno.test(`errors: ${v.name}: unaligned offsets and lengths are EINVAL`, async () => {
    await withImage(async (path) => {
      const disk = await openDisk(spec(path), v.options);
      try {
        const buf = sharedPool.take(4096);
        try {
          for (const offset of [513, 1, 511, -512, 0.5, NaN]) {
            await assertDiskError(disk.read(offset, buf), "EINVAL", `read at ${offset}`);
            await assertDiskError(disk.write(offset, buf), "EINVAL", `write at ${offset}`);
            await assertDiskError(disk.discard(offset, 4096), "EINVAL", `discard at ${offset}`);
            await assertDiskError(disk.writeZeroes(offset, 4096), "EINVAL", `zeroes at ${offset}`);
            await assertDiskError(disk.blockStatus(offset, 4096), "EINVAL", `status at ${offset}`);
          }
          for (const length of [1000, 1, 513, 4095]) {
            const b = buf.subarray(0, length);
            await assertDiskError(disk.read(0, b), "EINVAL", `read of ${length}`);
            await assertDiskError(disk.write(0, b), "EINVAL", `write of ${length}`);
            await assertDiskError(disk.discard(0, length), "EINVAL", `discard of ${length}`);
            await assertDiskError(disk.writeZeroes(0, length), "EINVAL", `zeroes of ${length}`);
            await assertDiskError(disk.blockStatus(0, length), "EINVAL", `status of ${length}`);
          }
          // Scatter-gather lists whose total is not a multiple of 512.
          const sg = [buf.subarray(0, 512), buf.subarray(512, 512 + 100)];
          await assertDiskError(disk.read(0, sg), "EINVAL", "read of 612 (sg)");
          await assertDiskError(disk.write(0, sg), "EINVAL", "write of 612 (sg)");
          // Empty requests.
          await assertDiskError(disk.read(0, buf.subarray(0, 0)), "EINVAL", "read of 0");
          await assertDiskError(disk.write(0, []), "EINVAL", "write of []");
          await assertDiskError(disk.discard(0, 0), "EINVAL", "discard of 0");
          await assertDiskError(disk.writeZeroes(0, -512), "EINVAL", "zeroes of -512");
        } finally {
          sharedPool.give(buf);
        }
      } finally {
        await disk.close();
      }
    });
  });

  Deno.test(`errors: ${v.name}: reads past the end are EINVAL, writes ENOSPC`, async () => {
    await withImage(async (path, data) => {
      const disk = await openDisk(spec(path), v.options);
      try {
        assert.equal(disk.size, SIZE);
        const buf = sharedPool.take(1024);
        try {
          for (const [offset, b] of [[SIZE - 512, buf], [SIZE, buf.subarray(0, 512)]] as const) {
            await assertDiskError(disk.read(offset, b), "EINVAL", `read at ${offset}`);
            await assertDiskError(disk.blockStatus(offset, b.length), "EINVAL", `status ${offset}`);
            await assertDiskError(disk.write(offset, b), "ENOSPC", `write at ${offset}`);
            await assertDiskError(disk.discard(offset, b.length), "ENOSPC", `discard ${offset}`);
            await assertDiskError(disk.writeZeroes(offset, b.length), "ENOSPC", `zeroes ${offset}`);
          }
          await assertDiskError(disk.read(SIZE * 1024, buf), "EINVAL", "read far past the end");
          await assertDiskError(disk.write(2 ** 60, buf), "EINVAL", "write at 2^60 (unsafe)");
          // The last sector itself is fine, and nothing was written by the refused requests.
          const last = buf.subarray(0, 512);
          await disk.read(SIZE - 512, last);
          assertBytes(last, data.subarray(SIZE - 512), "last sector");
        } finally {
          sharedPool.give(buf);
        }
      } finally {
        await disk.close();
      }
      assertBytes(await Deno.readFile(path), data, "image after refused requests");
    });
  });

  for (const how of ["spec ,ro", "options.readOnly"] as const) {
    Deno.test(`errors: ${v.name}: read-only (${how}) refuses changes with EROFS`, async () => {
      await withImage(async (path, data) => {
        const disk = how === "spec ,ro"
          ? await openDisk(spec(path, ",ro"), v.options)
          : await openDisk(spec(path), { ...v.options, readOnly: true });
        try {
          assert.equal(disk.info.readOnly, true);
          const buf = new Uint8Array(4096).fill(0x55);
          await assertDiskError(disk.write(0, buf), "EROFS", "write");
          await assertDiskError(disk.write(8192, [buf, buf]), "EROFS", "write (sg)");
          await assertDiskError(disk.discard(0, 4096), "EROFS", "discard");
          await assertDiskError(disk.writeZeroes(0, 4096), "EROFS", "writeZeroes");
          await assertDiskError(
            disk.writeZeroes(0, 4096, { mayUnmap: true }),
            "EROFS",
            "writeZeroes (unmap)",
          );
          // Reads, block status and flush still work.
          await disk.read(4096, buf);
          assertBytes(buf, data.subarray(4096, 8192), "read on a read-only disk");
          const extents = await disk.blockStatus(0, SIZE);
          assert.ok(extents.length >= 1);
          await disk.flush();
        } finally {
          await disk.close();
        }
        assertBytes(await Deno.readFile(path), data, "image after refused writes");
      });
    });
  }

  Deno.test(`errors: ${v.name}: opening a missing file is SysError ENOENT naming the path`, async () => {
    await withTempDir(async (dir) => {
      const path = `${dir}/no-such-disk.img`;
      for (const suffix of ["", ",ro"]) {
        await assert.rejects(openDisk(spec(path, suffix), v.options), (e: unknown) => {
          assert.ok(e instanceof SysError, `expected SysError, got ${e}`);
          assert.equal(e.code, "ENOENT");
          assert.equal(e.errno, 2);
          assert.ok(e.message.includes(path), `message does not name the path: ${e.message}`);
          return true;
        });
      }
    });
  });

  Deno.test(`errors: ${v.name}: requests after close reject`, async () => {
    await withImage(async (path) => {
      const disk = await openDisk(spec(path), v.options);
      await disk.close();
      await disk.close(); // idempotent
      const buf = sharedPool.take(4096);
      try {
        await assertDiskError(disk.read(0, buf), "EIO", "read after close");
        await assertDiskError(disk.write(0, buf), "EIO", "write after close");
        await assertDiskError(disk.flush(), "EIO", "flush after close");
        await assertDiskError(disk.discard(0, 4096), "EIO", "discard after close");
        await assertDiskError(disk.writeZeroes(0, 4096), "EIO", "writeZeroes after close");
        await assertDiskError(disk.blockStatus(0, 4096), "EIO", "blockStatus after close");
      } finally {
        sharedPool.give(buf);
      }
    });
  });

  Deno.test(`errors: ${v.name}: close waits for requests in flight`, async () => {
    await withImage(async (path, data) => {
      const disk = await openDisk(spec(path), v.options);
      const bufs = Array.from({ length: 16 }, () => new Uint8Array(64 * 1024));
      const reads = bufs.map((b, i) => disk.read(i * b.length, b));
      await disk.close();
      await Promise.all(reads);
      bufs.forEach((b, i) => assertBytes(b, data.subarray(i * b.length, (i + 1) * b.length)));
    });
  });

  // 1000 bytes: less than a page; 5000 bytes: more than a page, and not a sector multiple.
  for (const fileSize of [1000, 5000]) {
    const size = Math.ceil(fileSize / 512) * 512;
    Deno.test(
      `errors: ${v.name}: a ${fileSize}-byte file is a ${size}-byte disk, its tail reads as zeros`,
      async () => {
        const bytes = rng(fileSize).fill(new Uint8Array(fileSize));
        await withImage(async (path) => {
          const expected = new Uint8Array(size);
          expected.set(bytes);
          const disk = await openDisk(spec(path), v.options);
          try {
            assert.equal(disk.size, size);
            assert.equal(disk.info.logicalSectorSize, 512);
            const whole = sharedPool.take(size).fill(0xff);
            try {
              await disk.read(0, whole);
              assertBytes(whole, expected, "whole disk");
              whole.fill(0xff);
              await disk.read(size - 512, whole.subarray(0, 512));
              assertBytes(whole.subarray(0, 512), expected.subarray(size - 512), "last sector");
            } finally {
              sharedPool.give(whole);
            }
            // Plain memory and a scatter-gather list across the end of the file.
            const a = new Uint8Array(512).fill(0xff), b = new Uint8Array(512).fill(0xff);
            await disk.read(size - 1024, [a, b]);
            assertBytes(a, expected.subarray(size - 1024, size - 512), "first segment");
            assertBytes(b, expected.subarray(size - 512), "second segment");
            await assertDiskError(disk.read(size, a), "EINVAL", `read at ${size}`);

            // The last sector is writable as a whole.
            const tail = rng(fileSize + 1).fill(new Uint8Array(512));
            await disk.write(size - 512, tail);
            b.fill(0xff);
            await disk.read(size - 512, b);
            assertBytes(b, tail, "last sector after writing it");
          } finally {
            await disk.close();
          }
        }, bytes);
      },
    );
  }
}

Deno.test("errors: aio on tmpfs: no O_DIRECT fails with a hint, direct=auto falls back", async () => {
  const dir = Deno.makeTempDirSync({ dir: "/dev/shm", prefix: "tapd-test-" });
  try {
    const path = `${dir}/disk.img`;
    const data = rng(77).fill(new Uint8Array(64 * 1024));
    Deno.writeFileSync(path, data);
    // tmpfs has O_DIRECT since Linux 6.6: then the open simply works.
    try {
      await (await openDisk(`aio:${path}`)).close();
    } catch (e) {
      assert.ok(e instanceof DiskError, `expected DiskError, got ${e}`);
      assert.equal(e.code, "EINVAL");
      assert.ok(e.message.includes(path), e.message);
      assert.ok(e.message.includes(`tap:sync:${path}`), e.message);
    }
    for (const engine of ["aio", "uring"] as const) {
      const disk = await openDisk(`aio:${path}`, { engine, direct: "auto" });
      try {
        const buf = new Uint8Array(8192);
        await disk.read(4096, buf);
        assertBytes(buf, data.subarray(4096, 4096 + 8192), `${engine}: read`);
        buf.fill(engine === "aio" ? 1 : 2);
        await disk.write(32768, buf);
        data.set(buf, 32768);
        await disk.flush();
      } finally {
        await disk.close();
      }
    }
    assertBytes(Deno.readFileSync(path), data, "tmpfs image");
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
});

for (const type of ["aio", "sync", "ram"]) {
  Deno.test(`errors: ${type}: a directory is not a disk`, async () => {
    await withTempDir(async (dir) => {
      for (const suffix of ["", ",ro"]) {
        await assert.rejects(openDisk(`${type}:${dir}${suffix}`), (e: unknown) => {
          // Opening a directory for writing fails in open(2) (EISDIR); read-only, the driver
          // itself refuses it.
          assert.ok(e instanceof DiskError || e instanceof SysError, `${suffix}: got ${e}`);
          if (e instanceof SysError) assert.equal(e.code, "EISDIR");
          else assert.equal(e.code, "EINVAL");
          assert.ok(e.message.includes(dir), e.message);
          return true;
        });
      }
    });
  });
}
