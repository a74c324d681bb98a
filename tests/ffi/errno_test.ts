import assert from "node:assert/strict";
import {
  check,
  checkNeg,
  errnoMessage,
  errnoName,
  lastErrno,
  pooled,
  SysError,
} from "../../ffi/errno.ts";
import { cString, libc } from "../../ffi/libc.ts";
import { O_RDONLY } from "../../ffi/constants.ts";
import { EventFd } from "../../ffi/file.ts";

// A descriptor number no test process has open.
const BAD_FD = 987_654;

Deno.test("SysError formats code, call, path and the C library's message", () => {
  const e = new SysError(2, "open", "/nonexistent/x");
  assert.ok(e instanceof Error);
  assert.ok(e instanceof SysError);
  assert.equal(e.name, "SysError");
  assert.equal(e.message, "ENOENT open /nonexistent/x: No such file or directory");
  assert.equal(e.errno, 2);
  assert.equal(e.code, "ENOENT");
  assert.equal(e.call, "open");
  assert.equal(e.path, "/nonexistent/x");
  assert.match(String(e), /^SysError: ENOENT open \/nonexistent\/x: /);
});

Deno.test("SysError without a path leaves it out of the message", () => {
  const e = new SysError(22, "io_submit");
  assert.equal(e.message, "EINVAL io_submit: Invalid argument");
  assert.equal(e.path, undefined);
});

Deno.test("errnoName names low and high errno values and falls back to E<n>", () => {
  const cases: Array<[number, string]> = [
    [0, "OK"],
    [1, "EPERM"],
    [2, "ENOENT"],
    [5, "EIO"],
    [9, "EBADF"],
    [11, "EAGAIN"],
    [22, "EINVAL"],
    [25, "ENOTTY"],
    [28, "ENOSPC"],
    [30, "EROFS"],
    [40, "ELOOP"],
    [61, "ENODATA"],
    [95, "EOPNOTSUPP"],
    [122, "EDQUOT"],
    [125, "ECANCELED"],
    [41, "E41"],
    [999, "E999"],
  ];
  for (const [errno, name] of cases) assert.equal(errnoName(errno), name, `errno ${errno}`);
});

Deno.test("errnoMessage uses strerror", () => {
  assert.equal(errnoMessage(2), "No such file or directory");
  assert.equal(errnoMessage(22), "Invalid argument");
  assert.equal(errnoMessage(9), "Bad file descriptor");
});

Deno.test("check returns non-negative results unchanged", () => {
  assert.equal(check(0, "x"), 0);
  assert.equal(check(7, "x"), 7);
  assert.equal(check(0n, "x"), 0n);
  assert.equal(check(1n << 40n, "x"), 1n << 40n);
});

Deno.test("check throws the errno of the failed synchronous call", () => {
  const path = "/nonexistent/x";
  assert.throws(
    () => check(libc.open(cString(path), O_RDONLY, 0), "open", path),
    (e: unknown) => {
      assert.ok(e instanceof SysError);
      assert.equal(e.code, "ENOENT");
      assert.equal(e.errno, 2);
      assert.equal(e.message, "ENOENT open /nonexistent/x: No such file or directory");
      return true;
    },
  );
  assert.throws(
    () => check(libc.close(BAD_FD), "close"),
    (e: unknown) => e instanceof SysError && e.code === "EBADF" && e.call === "close",
  );
  // bigint results (lseek returns i64).
  assert.throws(
    () => check(libc.lseek(BAD_FD, 0n, 0), "lseek"),
    (e: unknown) => e instanceof SysError && e.code === "EBADF",
  );
});

Deno.test("lastErrno reads the JS thread's errno right after a failed call", () => {
  assert.equal(libc.close(BAD_FD), -1);
  assert.equal(lastErrno(), 9);
  assert.equal(libc.open(cString("/nonexistent/y"), O_RDONLY, 0), -1);
  assert.equal(lastErrno(), 2);
});

Deno.test("checkNeg turns -errno into a SysError and passes other values", () => {
  assert.equal(checkNeg(0, "x"), 0);
  assert.equal(checkNeg(12, "x"), 12);
  assert.equal(checkNeg(3n, "x"), 3n);
  assert.throws(
    () => checkNeg(-22, "io_setup"),
    (e: unknown) =>
      e instanceof SysError && e.code === "EINVAL" && e.errno === 22 &&
      e.message === "EINVAL io_setup: Invalid argument",
  );
  assert.throws(
    () => checkNeg(-9n, "io_uring_enter", "ring"),
    (e: unknown) =>
      e instanceof SysError && e.code === "EBADF" && e.path === "ring" &&
      e.message.startsWith("EBADF io_uring_enter ring: "),
  );
});

Deno.test("pooled resolves with the pool result and does not repeat a successful call", async () => {
  let repeats = 0;
  const rc = await pooled("fake", undefined, () => Promise.resolve(42), () => {
    repeats++;
    return -1;
  });
  assert.equal(rc, 42);
  assert.equal(repeats, 0);
});

Deno.test("pooled returns the synchronous retry's result when it succeeds", async () => {
  const rc = await pooled("fake", undefined, () => Promise.resolve(-1n), () => 5n);
  assert.equal(rc, 5n);
});

Deno.test("pooled reports the errno learnt from the synchronous retry (fsync on a bad fd)", async () => {
  let repeats = 0;
  await assert.rejects(
    pooled("fsync", "/some/file", () => libc.fsync_nb(BAD_FD), () => {
      repeats++;
      return libc.fsync(BAD_FD);
    }),
    (e: unknown) => {
      assert.ok(e instanceof SysError);
      assert.equal(e.code, "EBADF");
      assert.equal(e.call, "fsync");
      assert.equal(e.path, "/some/file");
      assert.equal(e.message, "EBADF fsync /some/file: Bad file descriptor");
      return true;
    },
  );
  assert.equal(repeats, 1);
});

Deno.test("pooled reports EBADF for fsync on a descriptor that was just closed", async () => {
  const fd = libc.open(cString("/dev/null"), O_RDONLY, 0);
  assert.ok(fd >= 0);
  assert.equal(libc.close(fd), 0);
  // Tests run one at a time and nothing opens a descriptor in between, so the number stays free.
  await assert.rejects(
    pooled("fsync", undefined, () => libc.fsync_nb(fd), () => libc.fsync(fd)),
    (e: unknown) => e instanceof SysError && e.code === "EBADF",
  );
});

Deno.test("pooled reports EINVAL for fsync on an eventfd", async () => {
  using efd = new EventFd();
  const fd = efd.fd;
  await assert.rejects(
    pooled("fsync", "eventfd", () => libc.fsync_nb(fd), () => libc.fsync(fd)),
    (e: unknown) => e instanceof SysError && e.code === "EINVAL" && e.call === "fsync",
  );
});
