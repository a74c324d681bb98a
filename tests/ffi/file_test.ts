import assert from "node:assert/strict";
import { EventFd, FileHandle, memfd, shmOpen, shmUnlink } from "../../ffi/file.ts";
import { SysError } from "../../ffi/errno.ts";
import { libc } from "../../ffi/libc.ts";
import { Mapping } from "../../ffi/memory.ts";
import {
  FALLOC_FL_KEEP_SIZE,
  FALLOC_FL_PUNCH_HOLE,
  O_CREAT,
  O_EXCL,
  O_RDONLY,
  O_RDWR,
  SEEK_DATA,
  SEEK_HOLE,
  SEEK_SET,
} from "../../ffi/constants.ts";
import { withTempDir } from "../util.ts";

const KiB = 1024, MiB = 1024 * KiB;

/** pwrite on the JS thread; asserts every byte went. */
function pwriteAll(file: FileHandle, offset: number, data: Uint8Array): void {
  const n = libc.pwrite(file.fd, data, BigInt(data.length), BigInt(offset));
  assert.equal(n, BigInt(data.length));
}

/** pread on the JS thread. */
function preadAll(file: FileHandle, offset: number, length: number): Uint8Array {
  const out = new Uint8Array(length);
  const n = libc.pread(file.fd, out, BigInt(length), BigInt(offset));
  assert.equal(n, BigInt(length));
  return out;
}

Deno.test("FileHandle open, stat, truncate and close", async () => {
  await withTempDir(async (dir) => {
    const path = `${dir}/f`;
    const file = FileHandle.open(path, O_RDWR | O_CREAT);
    try {
      assert.equal(file.path, path);
      assert.ok(file.fd >= 0);
      assert.equal(file.closed, false);
      let st = file.stat();
      assert.ok(st.isRegular);
      assert.ok(!st.isBlockDevice);
      assert.equal(st.size, 0);
      assert.equal(st.mode & 0o777, 0o644 & ~Deno.umask());
      assert.ok(st.blockSize > 0);

      file.truncate(3 * MiB + 5);
      st = file.stat();
      assert.equal(st.size, 3 * MiB + 5);
      assert.equal(st.allocated, 0, "a truncated-up file is all hole");
      assert.equal(Deno.statSync(path).size, 3 * MiB + 5);

      pwriteAll(file, 0, new Uint8Array(8192).fill(1));
      assert.ok(file.stat().allocated >= 8192);

      file.truncate(100);
      assert.equal(file.stat().size, 100);
    } finally {
      file.close();
    }
    assert.equal(file.closed, true);
    file.close();
    file[Symbol.dispose]();
    assert.throws(() => file.fd, /closed/);
    assert.throws(() => file.stat(), /closed/);
    assert.throws(() => file.truncate(0), /closed/);
    // (seek throws synchronously and fallocate rejects; the async wrapper accepts both.)
    await assert.rejects(async () => await file.seek(0, SEEK_SET), /closed/);
    await assert.rejects(async () => await file.fallocate(0, 0, 4096), /closed/);
  });
});

Deno.test("FileHandle open of a missing file throws ENOENT naming the path", () => {
  const path = "/nonexistent/tapd/x";
  assert.throws(
    () => FileHandle.open(path, O_RDONLY),
    (e: unknown) => {
      assert.ok(e instanceof SysError);
      assert.equal(e.code, "ENOENT");
      assert.equal(e.errno, 2);
      assert.equal(e.call, "open");
      assert.equal(e.path, path);
      assert.equal(e.message, `ENOENT open ${path}: No such file or directory`);
      return true;
    },
  );
});

Deno.test("FileHandle open with O_EXCL on an existing file throws EEXIST", async () => {
  await withTempDir((dir) => {
    const path = `${dir}/f`;
    FileHandle.open(path, O_RDWR | O_CREAT, 0o600).close();
    assert.equal(Deno.statSync(path).mode! & 0o777, 0o600);
    assert.throws(
      () => FileHandle.open(path, O_RDWR | O_CREAT | O_EXCL),
      (e: unknown) => e instanceof SysError && e.code === "EEXIST" && e.message.includes(path),
    );
  });
});

Deno.test("block-device calls on a regular file fail with ENOTTY", async () => {
  await withTempDir(async (dir) => {
    using file = FileHandle.open(`${dir}/f`, O_RDWR | O_CREAT);
    assert.throws(
      () => file.blockDeviceSize(),
      (e: unknown) =>
        e instanceof SysError && e.code === "ENOTTY" && e.call === "ioctl(BLKGETSIZE64)",
    );
    assert.throws(
      () => file.blockDeviceSectors(),
      (e: unknown) => e instanceof SysError && e.code === "ENOTTY",
    );
    await assert.rejects(
      file.blockDiscard(0, 4096),
      (e: unknown) => e instanceof SysError && e.code === "ENOTTY" && e.path === file.path,
    );
  });
});

Deno.test("FileHandle fallocate punches holes and reports errors", async () => {
  await withTempDir(async (dir) => {
    using file = FileHandle.open(`${dir}/f`, O_RDWR | O_CREAT);
    pwriteAll(file, 0, new Uint8Array(64 * KiB).fill(0x5a));
    await file.fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 16 * KiB, 16 * KiB);
    assert.equal(file.stat().size, 64 * KiB);
    const back = preadAll(file, 0, 64 * KiB);
    assert.ok(back.subarray(0, 16 * KiB).every((b) => b === 0x5a));
    assert.ok(back.subarray(16 * KiB, 32 * KiB).every((b) => b === 0));
    assert.ok(back.subarray(32 * KiB).every((b) => b === 0x5a));

    // Preallocation grows the file.
    await file.fallocate(0, 0, 128 * KiB);
    assert.equal(file.stat().size, 128 * KiB);

    // The kernel insists on KEEP_SIZE with PUNCH_HOLE; the errno comes back through pooled().
    await assert.rejects(
      file.fallocate(FALLOC_FL_PUNCH_HOLE, 0, 4096),
      (e: unknown) => e instanceof SysError && e.code === "EOPNOTSUPP" && e.call === "fallocate",
    );
  });
});

Deno.test("EventFd counts signals and wakes a parked wait", async () => {
  const efd = new EventFd();
  try {
    assert.ok(efd.fd >= 0);
    efd.signal();
    efd.signal();
    efd.signal();
    assert.equal(await efd.wait(), 3n);

    // A wait parked on the pool before the signal arrives.
    let woke = false;
    const waiting = efd.wait().then((n) => {
      woke = true;
      return n;
    });
    await new Promise((r) => setTimeout(r, 20));
    assert.equal(woke, false);
    efd.signal();
    assert.equal(await waiting, 1n);
  } finally {
    efd[Symbol.dispose]();
  }
  assert.equal(efd.handle.closed, true);
  efd[Symbol.dispose]();
});

Deno.test("memfd has the requested size and is shared through its descriptor", () => {
  using file = memfd("tapd-file-test", 12_345);
  assert.equal(file.path, "memfd:tapd-file-test");
  assert.equal(file.stat().size, 12_345);
  pwriteAll(file, 100, new Uint8Array([1, 2, 3]));
  assert.deepEqual(preadAll(file, 99, 5), new Uint8Array([0, 1, 2, 3, 0]));
});

Deno.test("shmOpen and shmUnlink round trip", () => {
  const name = `/tapd-test-${Deno.pid}-${Date.now()}`;
  const shmPath = `/dev/shm${name}`;
  const a = shmOpen(name, O_RDWR | O_CREAT | O_EXCL);
  try {
    assert.equal(a.path, `shm:${name}`);
    a.truncate(8192);
    assert.equal(Deno.statSync(shmPath).size, 8192);
    assert.equal(Deno.statSync(shmPath).mode! & 0o777, 0o600);
    assert.throws(
      () => shmOpen(name, O_RDWR | O_CREAT | O_EXCL),
      (e: unknown) => e instanceof SysError && e.code === "EEXIST" && e.call === "shm_open",
    );

    // A second opener sees the first one's writes.
    using m = new Mapping(a.fd, 8192);
    m.bytes.set([10, 20, 30], 4000);
    using b = shmOpen(name, O_RDWR);
    assert.equal(b.stat().size, 8192);
    assert.deepEqual(preadAll(b, 4000, 3), new Uint8Array([10, 20, 30]));
  } finally {
    a.close();
    shmUnlink(name);
  }
  assert.throws(() => Deno.statSync(shmPath), Deno.errors.NotFound);
  assert.throws(
    () => shmOpen(name, O_RDWR),
    (e: unknown) => e instanceof SysError && e.code === "ENOENT" && e.path === name,
  );
  assert.throws(
    () => shmUnlink(name),
    (e: unknown) => e instanceof SysError && e.code === "ENOENT" && e.call === "shm_unlink",
  );
});

Deno.test("seek finds data and holes in a sparse file", async () => {
  await withTempDir(async (dir) => {
    using file = FileHandle.open(`${dir}/sparse`, O_RDWR | O_CREAT);
    file.truncate(4 * MiB);
    pwriteAll(file, 1 * MiB, new Uint8Array(64 * KiB).fill(0xee));
    assert.equal(libc.fsync(file.fd), 0);

    assert.equal(await file.seek(0, SEEK_DATA), 1 * MiB);
    assert.equal(await file.seek(1 * MiB + 4096, SEEK_DATA), 1 * MiB + 4096);
    assert.equal(await file.seek(0, SEEK_HOLE), 0);
    assert.equal(await file.seek(1 * MiB, SEEK_HOLE), 1 * MiB + 64 * KiB);
    assert.equal(await file.seek(3 * MiB, SEEK_HOLE), 3 * MiB);
    assert.equal(await file.seek(12345, SEEK_SET), 12345);

    const st = file.stat();
    assert.ok(st.allocated >= 64 * KiB && st.allocated < 1 * MiB, `allocated ${st.allocated}`);

    // No data after 2 MiB: the kernel says ENXIO.
    await assert.rejects(
      file.seek(2 * MiB, SEEK_DATA),
      (e: unknown) =>
        e instanceof SysError && e.code === "ENXIO" && e.call === "lseek" &&
        e.path === file.path,
    );
    // Past the end of the file, SEEK_HOLE is ENXIO too.
    await assert.rejects(
      file.seek(5 * MiB, SEEK_HOLE),
      (e: unknown) => e instanceof SysError && e.code === "ENXIO",
    );
  });
});
