/** The command lines of `tapd ctl`, `tapd daemon` and `tapd tapdisk`: usage errors and help. */
import assert from "node:assert/strict";
import { assertOneLineError, inTempDir, tapd } from "./helpers.ts";

Deno.test("tapd ctl: bad command lines exit 2 with one line, before contacting a daemon", async () => {
  const cases: Array<[string[], RegExp]> = [
    [[], /^tapd: ctl: expected a command: see tapd help ctl$/],
    [["bogus"], /^tapd: ctl: unknown command "bogus": expected one of attach, list, detach/],
    [["pause"], /^tapd: ctl: pause: expected one disk ID$/],
    [["pause", "x"], /^tapd: ctl: pause: expected a disk ID \(a number, see tapd ctl list\)$/],
    [["list", "3"], /^tapd: ctl: list: expected no arguments$/],
    [["attach"], /^tapd: ctl: attach: expected one disk spec$/],
    [["pause", "1", "--reopen", "x"], /^tapd: ctl: pause takes no --reopen$/],
    [["list", "--nbd", "unix:/x"], /^tapd: ctl: list takes no --nbd$/],
    [["detach", "1", "--xen", "3"], /^tapd: ctl: detach takes no --xen$/],
    [["list", "--bogus"], /^tapd: ctl: Unknown option '--bogus'/],
  ];
  for (const [args, pattern] of cases) {
    assertOneLineError(
      await tapd("ctl", "--control", "/nonexistent/ctl.sock", ...args),
      2,
      pattern,
    );
  }
});

Deno.test("tapd ctl: no daemon at the socket is one line, exit 1", async () => {
  await inTempDir(async (dir) => {
    const r = await tapd("ctl", "--control", `${dir}/ctl.sock`, "list");
    assertOneLineError(
      r,
      1,
      /^tapd: ctl: cannot reach the daemon at .*\/ctl\.sock: No such file or directory \(is `tapd daemon` running\?/,
    );
  });
});

Deno.test("tapd daemon and tapdisk: usage errors exit 2", async () => {
  assertOneLineError(
    await tapd("daemon", "extra"),
    2,
    /^tapd: daemon: unexpected argument "extra"$/,
  );
  assertOneLineError(
    await tapd("daemon", "--nbd-port", "70000"),
    2,
    /^tapd: Invalid --nbd-port "70000": expected a whole number from 0 to 65535$/,
  );
  assertOneLineError(
    await tapd("tapdisk", "tap:aio:/x.img"),
    2,
    /^tapd: tapdisk: give an export: --ring unix:PATH, --nbd ADDR, --fuse PATH and\/or --xen DOMID$/,
  );
  assertOneLineError(
    await tapd("tapdisk", "tap:aio:/x.img", "--xen", "0:xvda"),
    2,
    /^tapd: tapdisk: --xen: invalid Xen target "0:xvda": expected DOMID\[:VDEV\] with a guest domain id 1\.\.32751$/,
  );
  assertOneLineError(
    await tapd("tapdisk", "tap:aio:/x.img", "--nbd", "unix:/x", "--control", "tcp"),
    2,
    /^tapd: tapdisk: invalid --control "tcp": expected stdio$/,
  );
  const help = await tapd("help", "ctl");
  assert.equal(help.code, 0);
  assert.match(help.stdout, /^Usage: tapd ctl \[--control SOCK\] COMMAND/);
  assert.match(help.stdout, /resume ID \[--reopen SPEC\]/);
  const daemon = await tapd("help", "daemon");
  assert.match(daemon.stdout, /nbdinfo nbd:\/\/127\.0\.0\.1:10809/);
  const overview = await tapd("--help");
  assert.match(overview.stdout, /\n {2}daemon\s+the control daemon/);
  assert.match(overview.stdout, /\n {2}ctl\s+control a running tapd daemon/);
});
