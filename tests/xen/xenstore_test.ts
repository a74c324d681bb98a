/**
 * The xenstore client (xen/xenstore/) against FakeXenStored: wire framing and path checks,
 * every operation and its errors, concurrency, watches, transactions, reconnecting, closing,
 * and the xenbus device transport through an emulated kernel and a FIFO.
 */
import assert from "node:assert/strict";
import type { Fields, Logger } from "../../cli/log.ts";
import { XenStore, XenStoreError, type XenStoreOptions } from "../../xen/xenstore/client.ts";
import {
  DeviceIo,
  DeviceTransport,
  openDeviceIo,
  openTransport,
  SocketTransport,
  type Transport,
} from "../../xen/xenstore/transport.ts";
import {
  encodeFrame,
  type Frame,
  frameLength,
  FrameParser,
  HEADER_SIZE,
  nulTerminated,
  pathProblem,
  PAYLOAD_MAX,
  payloadText,
  permProblem,
  XsType,
} from "../../xen/xenstore/wire.ts";
import { rng } from "../util.ts";
import { FakeXenStored, type FakeXenStoredOptions } from "./fake_xenstored.ts";

// ---------------------------------------------------------------------------------------------
// Helpers

/** Runs fn with a fresh fake and a client connected to it; closes both. */
async function withStore(
  fn: (xs: XenStore, fake: FakeXenStored) => Promise<void>,
  options: XenStoreOptions = {},
  fakeOptions: FakeXenStoredOptions = {},
): Promise<void> {
  const fake = await FakeXenStored.start(fakeOptions);
  const xs = await XenStore.connect({ socket: fake.socketPath, ...options });
  try {
    await fn(xs, fake);
  } finally {
    xs.close();
    await xs.closed;
    await fake.close();
  }
}

/** Waits until `cond` holds, polling; throws after `timeoutMs`. */
async function until(cond: () => boolean, what: string, timeoutMs = 5000): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`Timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 5));
  }
}

/** Rejects with a XenStoreError carrying `code` and a message matching `message`. */
async function rejectsWith(p: Promise<unknown>, code: string, message?: RegExp): Promise<void> {
  await assert.rejects(p, (e: unknown) => {
    assert.ok(e instanceof XenStoreError, `expected a XenStoreError, got ${e}`);
    assert.equal(e.code, code, e.message);
    if (message !== undefined) assert.match(e.message, message);
    return true;
  });
}

/** A Logger that keeps its lines. */
class MemoryLogger implements Logger {
  readonly lines: { level: string; msg: string; fields: Fields }[] = [];
  debug(msg: string, fields: Fields = {}): void {
    this.lines.push({ level: "debug", msg, fields });
  }
  info(msg: string, fields: Fields = {}): void {
    this.lines.push({ level: "info", msg, fields });
  }
  warn(msg: string, fields: Fields = {}): void {
    this.lines.push({ level: "warn", msg, fields });
  }
  error(msg: string, fields: Fields = {}): void {
    this.lines.push({ level: "error", msg, fields });
  }
  with(): Logger {
    return this;
  }
}

const FAST_RECONNECT = [10, 20, 40, 80, 160, 320];

// ---------------------------------------------------------------------------------------------
// Wire

Deno.test("wire: a frame encodes to a 16-byte little-endian header and its payload", () => {
  const bytes = encodeFrame({
    type: XsType.WRITE,
    reqId: 0x01020304,
    txId: 7,
    payload: nulTerminated("/a"),
  });
  assert.deepEqual([...bytes], [11, 0, 0, 0, 4, 3, 2, 1, 7, 0, 0, 0, 3, 0, 0, 0, 47, 97, 0]);
  assert.equal(frameLength(bytes), bytes.length);
  assert.throws(
    () => encodeFrame({ type: 2, reqId: 1, txId: 0, payload: new Uint8Array(PAYLOAD_MAX + 1) }),
    /4097 bytes is over the 4096-byte limit/,
  );
});

Deno.test("wire: FrameParser finds the same frames however the stream is split", () => {
  const frames: Frame[] = [
    { type: XsType.WATCH_EVENT, reqId: 0, txId: 0, payload: nulTerminated("/a", "tok") },
    { type: XsType.READ, reqId: 5, txId: 0, payload: new Uint8Array(0) },
    { type: XsType.READ, reqId: 6, txId: 3, payload: new Uint8Array(PAYLOAD_MAX).fill(7) },
    { type: XsType.ERROR, reqId: 0xffffffff, txId: 0, payload: nulTerminated("ENOENT") },
  ];
  const stream = new Uint8Array(frames.reduce((n, f) => n + HEADER_SIZE + f.payload.length, 0));
  let at = 0;
  for (const f of frames) {
    const bytes = encodeFrame(f);
    stream.set(bytes, at);
    at += bytes.length;
  }
  const check = (got: Frame[]) => {
    assert.equal(got.length, frames.length);
    got.forEach((f, i) => assert.deepEqual(f, frames[i]));
  };
  // every single split point, then random multi-way splits, then one byte at a time
  for (let cut = 0; cut <= stream.length; cut += 97) {
    const p = new FrameParser();
    check([...p.push(stream.subarray(0, cut)), ...p.push(stream.subarray(cut))]);
    assert.equal(p.buffered, 0);
  }
  const r = rng(1);
  for (let round = 0; round < 50; round++) {
    const p = new FrameParser();
    const got: Frame[] = [];
    for (let i = 0; i < stream.length;) {
      const n = 1 + r.below(40);
      got.push(...p.push(stream.subarray(i, i + n)));
      i += n;
    }
    check(got);
  }
  const p = new FrameParser();
  const got: Frame[] = [];
  for (let i = 0; i < stream.length; i++) got.push(...p.push(stream.subarray(i, i + 1)));
  check(got);
});

Deno.test("wire: FrameParser refuses a header announcing more than 4096 bytes", () => {
  const header = new Uint8Array(HEADER_SIZE);
  new DataView(header.buffer).setUint32(12, PAYLOAD_MAX + 1, true);
  assert.throws(() => new FrameParser().push(header), /4097 payload bytes/);
});

Deno.test("wire: path and permission checks", () => {
  for (const good of ["/", "/local/domain/0", "/a-b_c@d/E9", "/" + "a".repeat(3071)]) {
    assert.equal(pathProblem(good), null, good);
  }
  const bad: [string, RegExp][] = [
    ["", /absolute/],
    ["local/domain", /absolute/],
    ["/a//b", /"\/\/"/],
    ["/a/", /ends with/],
    ["/a b", /characters/],
    ["/a\0b", /characters/],
    ["/ä", /characters/],
    ["/a.b", /characters/],
    ["/" + "a".repeat(3072), /longer than 3072/],
    ["@releaseDomain", /absolute/],
  ];
  for (const [path, why] of bad) assert.match(pathProblem(path) ?? "", why, path);
  assert.equal(pathProblem("@releaseDomain", true), null);
  assert.equal(pathProblem("@introduceDomain", true), null);
  assert.notEqual(pathProblem("@other", true), null);
  for (const perm of ["n0", "r5", "w65535", "b1"]) assert.equal(permProblem(perm), null);
  for (const perm of ["", "x1", "r", "r-1", "r01", "r65536", "n0 "]) {
    assert.notEqual(permProblem(perm), null, perm);
  }
});

// ---------------------------------------------------------------------------------------------
// Operations

Deno.test("xenstore: read, write, mkdir, directory, rm", async () => {
  await withStore(async (xs, fake) => {
    await xs.write("/t/a/b", "hello");
    assert.equal(await xs.read("/t/a/b"), "hello");
    assert.equal(await xs.read("/t/a"), ""); // created implicitly
    assert.equal(fake.read("/t/a/b"), "hello");
    await xs.write("/t/a/b", "");
    assert.equal(await xs.read("/t/a/b"), "");
    await xs.write("/t/utf8", "ünï\u{1F600}");
    assert.equal(await xs.read("/t/utf8"), "ünï\u{1F600}");

    assert.equal(await xs.read("/t/missing"), null);
    assert.deepEqual(await xs.directory("/t/missing"), []);
    await xs.mkdir("/t/dir/sub");
    await xs.mkdir("/t/dir/sub"); // exists: fine
    assert.deepEqual(await xs.directory("/t"), ["a", "utf8", "dir"]);
    assert.deepEqual(await xs.directory("/t/dir/sub"), []);

    await xs.rm("/t/a");
    assert.equal(await xs.read("/t/a/b"), null);
    assert.deepEqual(await xs.directory("/t"), ["utf8", "dir"]);
    await xs.rm("/t/a"); // missing, parent exists
    await xs.rm("/no/such/parent"); // ENOENT from the server, tolerated
  });
});

Deno.test("xenstore: permissions round-trip and new nodes inherit the parent's", async () => {
  await withStore(async (xs) => {
    await xs.mkdir("/p/dir");
    assert.deepEqual(await xs.getPerms("/p/dir"), ["n0"]);
    await xs.setPerms("/p/dir", ["n0", "r5"]);
    assert.deepEqual(await xs.getPerms("/p/dir"), ["n0", "r5"]);
    await xs.write("/p/dir/child/leaf", "x");
    assert.deepEqual(await xs.getPerms("/p/dir/child"), ["n0", "r5"]);
    assert.deepEqual(await xs.getPerms("/p/dir/child/leaf"), ["n0", "r5"]);
    await rejectsWith(xs.getPerms("/p/none"), "ENOENT", /^xenstore getPerms \/p\/none: ENOENT$/);
    await rejectsWith(xs.setPerms("/p/none", ["n0"]), "ENOENT", /setPerms \/p\/none: ENOENT/);
    await rejectsWith(xs.setPerms("/p/dir", []), "EINVAL", /empty permission list/);
    await rejectsWith(xs.setPerms("/p/dir", ["n0", "q1"]), "EINVAL", /bad permission "q1"/);
  });
});

Deno.test("xenstore: getDomainPath, and server errors name the op and path", async () => {
  await withStore(async (xs) => {
    assert.equal(await xs.getDomainPath(0), "/local/domain/0");
    assert.equal(await xs.getDomainPath(17), "/local/domain/17");
    await rejectsWith(xs.getDomainPath(-1), "EINVAL", /not a domain id/);
    await rejectsWith(xs.getDomainPath(1.5), "EINVAL");
    await rejectsWith(xs.rm("/"), "EINVAL", /^xenstore rm \/: EINVAL$/);
  });
});

Deno.test("xenstore: bad paths and over-long payloads are refused before sending", async () => {
  await withStore(async (xs, fake) => {
    await xs.write("/ok", "1");
    const sent = fake.requests.length;
    const bad = ["relative", "/a//b", "/trailing/", "/sp ace", "/" + "x".repeat(3072)];
    for (const path of bad) {
      await rejectsWith(xs.read(path), "EINVAL", /^xenstore read .*: invalid path: /);
      await rejectsWith(xs.write(path, "v"), "EINVAL", /^xenstore write /);
      await rejectsWith(xs.rm(path), "EINVAL");
      await rejectsWith(xs.directory(path), "EINVAL");
    }
    await rejectsWith(xs.read("@releaseDomain"), "EINVAL");
    await rejectsWith(xs.watch("/w", "", () => {}), "EINVAL", /invalid token/);
    // header + "/big\0" + value: 4096 payload bytes pass, 4097 do not
    const fits = "v".repeat(PAYLOAD_MAX - "/big\0".length);
    await rejectsWith(
      xs.write("/big", fits + "v"),
      "E2BIG",
      /^xenstore write \/big: payload of 4097 bytes is over the 4096-byte limit$/,
    );
    const longPath = "/" + "p".repeat(3071);
    await rejectsWith(xs.write(longPath, "v".repeat(PAYLOAD_MAX)), "E2BIG", /…\(3072 bytes\)/);
    assert.equal(fake.requests.length, sent, "nothing was sent");
    await xs.write("/big", fits);
    assert.equal(await xs.read("/big"), fits);
    assert.equal(fake.connectionCount, 1);
  });
});

Deno.test("xenstore: many concurrent callers each get their own reply", async () => {
  for (const maxInFlight of [1, 8, 64]) {
    await withStore(async (xs, fake) => {
      const n = 300;
      await Promise.all(
        Array.from({ length: n }, (_, i) => xs.write(`/c/n${i}`, `value ${i}`)),
      );
      const results = await Promise.all(
        Array.from(
          { length: n },
          (_, i) =>
            i % 3 === 0
              ? xs.read(`/c/n${i}`)
              : i % 3 === 1
              ? xs.read(`/c/missing${i}`)
              : xs.getPerms(`/c/n${i}`).then((p) => p.join(",")),
        ),
      );
      results.forEach((r, i) =>
        assert.equal(r, i % 3 === 0 ? `value ${i}` : i % 3 === 1 ? null : "n0", `#${i}`)
      );
      assert.equal((await xs.directory("/c")).length, n);
      assert.equal(fake.directory("/c").length, n);
    }, { maxInFlight });
  }
});

// ---------------------------------------------------------------------------------------------
// Watches

Deno.test("xenstore: a watch fires at once, then for changes at and under its path", async () => {
  await withStore(async (xs, fake) => {
    await xs.mkdir("/w/dev");
    const events: string[] = [];
    await xs.watch("/w/dev", "tok", (p) => events.push(p));
    await until(() => events.length === 1, "the initial event");
    assert.deepEqual(events, ["/w/dev"]);

    await xs.write("/w/dev/state", "1"); // our own change: the event precedes the reply
    assert.deepEqual(events, ["/w/dev", "/w/dev/state"]);
    fake.write("/w/dev/x/y", "2"); // someone else's change
    await xs.write("/w/other", "3"); // not under the watch
    await xs.setPerms("/w/dev", ["n0", "r1"]);
    await until(() => events.length === 4, "four events");
    assert.deepEqual(events, ["/w/dev", "/w/dev/state", "/w/dev/x/y", "/w/dev"]);

    await xs.rm("/w"); // an ancestor: the event names the watched path
    assert.deepEqual(events.slice(4), ["/w/dev"]);

    await xs.unwatch("/w/dev", "tok");
    await xs.write("/w/dev/after", "4");
    await xs.read("/w/dev/after"); // a round trip after the write
    assert.equal(events.length, 5);
    assert.deepEqual(fake.watches(), []);
  });
});

Deno.test("xenstore: events that arrive before the watch's reply (as via xenbus) are kept", async () => {
  await withStore(
    async (xs) => {
      const events: string[] = [];
      const watching = xs.watch("/early", "tok", (p) => events.push(p));
      const write = xs.write("/early/x", "1");
      await watching;
      assert.deepEqual(events.slice(0, 1), ["/early"], "the initial event came before the OK");
      await write;
      assert.deepEqual(events, ["/early", "/early/x"]);
    },
    {},
    { eventBeforeWatchReply: true },
  );
});

Deno.test("xenstore: @releaseDomain watches fire when the fake releases a domain", async () => {
  await withStore(async (xs, fake) => {
    const events: string[] = [];
    await xs.watch("@releaseDomain", "rel", (p) => events.push(p));
    await xs.watch("/", "all", (p) => events.push("all:" + p));
    await until(() => events.length === 2, "initial events");
    fake.releaseDomain();
    fake.introduceDomain(); // nobody watches it
    await until(() => events.length === 3, "the release event");
    assert.deepEqual(events.sort(), ["@releaseDomain", "@releaseDomain", "all:/"]);
    await xs.unwatch("@releaseDomain", "rel");
  });
});

Deno.test("xenstore: a throwing watch callback is reported and the reader keeps going", async () => {
  const log = new MemoryLogger();
  await withStore(async (xs) => {
    let good = 0;
    await xs.watch("/boom", "sync", () => {
      throw new Error("sync failure");
    });
    await xs.watch("/boom", "async", () => {
      return Promise.reject(new Error("async failure"));
    });
    await xs.watch("/boom", "good", () => good++);
    await xs.write("/boom/x", "1");
    assert.equal(await xs.read("/boom/x"), "1");
    await until(() => good === 2, "the good callback twice");
    await until(() => log.lines.length >= 4, "four error lines");
    const errors = log.lines.filter((l) => l.level === "error").map((l) => String(l.fields.error));
    assert.equal(errors.filter((e) => e === "sync failure").length, 2);
    assert.equal(errors.filter((e) => e === "async failure").length, 2);
    assert.match(log.lines[0].msg, /^xenstore watch \/boom \(token "sync"\): callback failed$/);
  }, { log });
});

Deno.test("xenstore: watch tokens are unique; unwatch needs a registered watch", async () => {
  await withStore(async (xs, fake) => {
    await xs.watch("/u", "t", () => {});
    await rejectsWith(xs.watch("/u2", "t", () => {}), "EEXIST", /token "t" is already in use/);
    await rejectsWith(xs.unwatch("/u2", "t"), "ENOENT", /no watch with token "t"/);
    await rejectsWith(xs.unwatch("/u", "other"), "ENOENT");
    await xs.unwatch("/u", "t");
    await rejectsWith(xs.unwatch("/u", "t"), "ENOENT");
    await xs.watch("/u2", "t", () => {}); // free again
    assert.deepEqual(fake.watches(), [{ path: "/u2", token: "t" }]);
  });
});

// ---------------------------------------------------------------------------------------------
// Transactions

Deno.test("xenstore: a transaction commits at once, and reads inside see its own writes", async () => {
  await withStore(async (xs, fake) => {
    const events: string[] = [];
    await xs.watch("/tx", "tok", (p) => events.push(p));
    const result = await xs.transaction(async (tx) => {
      await Promise.all([xs.write("/tx/a", "1", tx), xs.write("/tx/b", "2", tx)]);
      assert.equal(await xs.read("/tx/a", tx), "1");
      assert.equal(await xs.read("/tx/a"), null, "not visible outside before commit");
      assert.equal(fake.read("/tx/a"), null);
      assert.deepEqual((await xs.directory("/tx", tx)).sort(), ["a", "b"]);
      return "done";
    });
    assert.equal(result, "done");
    assert.equal(fake.read("/tx/a"), "1");
    assert.equal(fake.read("/tx/b"), "2");
    await until(() => events.length === 3, "commit events");
    assert.deepEqual(events, ["/tx", "/tx/a", "/tx/b"]);
    const startEnd = fake.requests.filter((r) =>
      r.type === XsType.TRANSACTION_START || r.type === XsType.TRANSACTION_END
    );
    assert.equal(startEnd.length, 2);
  });
});

Deno.test("xenstore: a throw inside a transaction aborts it and is rethrown", async () => {
  await withStore(async (xs, fake) => {
    let txUsed = 0;
    await assert.rejects(
      xs.transaction(async (tx) => {
        txUsed = tx;
        await xs.write("/abort/a", "1", tx);
        throw new Error("changed my mind");
      }),
      /changed my mind/,
    );
    assert.equal(fake.read("/abort/a"), null);
    const ends = fake.requests.filter((r) => r.type === XsType.TRANSACTION_END);
    assert.equal(ends.length, 1);
    // the handle is dead afterwards
    await rejectsWith(xs.read("/abort/a", txUsed), "EINVAL", /no open transaction/);
  });
});

Deno.test("xenstore: EAGAIN from a conflicting client re-runs fn and then commits", async () => {
  await withStore(async (xs, fake) => {
    const other = await XenStore.connect({ socket: fake.socketPath });
    try {
      await xs.write("/cnt", "0");
      let runs = 0;
      const value = await xs.transaction(async (tx) => {
        runs++;
        const n = Number(await xs.read("/cnt", tx));
        if (runs === 1) await other.write("/cnt", "10"); // lands between our read and commit
        await xs.write("/cnt", String(n + 1), tx);
        return n + 1;
      });
      assert.equal(runs, 2);
      assert.equal(value, 11);
      assert.equal(fake.read("/cnt"), "11");
      assert.equal(await other.read("/cnt"), "11");
    } finally {
      other.close();
      await other.closed;
    }
  });
});

Deno.test("xenstore: a new sibling conflicts with a transaction that created a node (spec §2.6)", async () => {
  await withStore(async (xs, fake) => {
    let runs = 0;
    await xs.transaction(async (tx) => {
      runs++;
      await xs.write("/xbprobe/a", "1", tx);
      if (runs === 1) fake.write("/xbprobe/b", "2");
    });
    assert.equal(runs, 2);
    assert.deepEqual(fake.directory("/xbprobe"), ["b", "a"]);
  });
});

Deno.test("xenstore: endless EAGAIN gives up after maxTransactionAttempts", async () => {
  await withStore(async (xs, fake) => {
    let runs = 0;
    await rejectsWith(
      xs.transaction(async (tx) => {
        runs++;
        await xs.read("/hot", tx);
        fake.write("/hot", String(runs));
      }),
      "EAGAIN",
      /^xenstore transaction commit: EAGAIN 3 times in a row$/,
    );
    assert.equal(runs, 3);
  }, { maxTransactionAttempts: 3 });
});

// ---------------------------------------------------------------------------------------------
// Losing the connection

Deno.test("xenstore: after the server drops us, the client reconnects and re-registers watches", async () => {
  const log = new MemoryLogger();
  await withStore(async (xs, fake) => {
    const a: string[] = [];
    const b: string[] = [];
    await xs.watch("/r/a", "ta", (p) => a.push(p));
    await xs.watch("@releaseDomain", "tb", (p) => b.push(p));
    await until(() => a.length === 1 && b.length === 1, "initial events");

    fake.dropConnections();
    await until(() => a.length === 2 && b.length === 2, "events from re-registration");
    assert.deepEqual(a, ["/r/a", "/r/a"]);
    assert.equal(fake.connectionCount, 1);
    assert.deepEqual(
      fake.watches().sort((x, y) => x.token.localeCompare(y.token)),
      [{ path: "/r/a", token: "ta" }, { path: "@releaseDomain", token: "tb" }],
    );
    await xs.write("/r/a/x", "1");
    assert.deepEqual(a, ["/r/a", "/r/a", "/r/a/x"]);
    fake.releaseDomain();
    await until(() => b.length === 3, "a release event on the new connection");
    assert.ok(log.lines.some((l) => l.level === "warn" && /connection lost/.test(l.msg)));
    assert.ok(log.lines.some((l) => l.level === "info" && /reconnected/.test(l.msg)));

    // again, with a watch added and one removed while disconnected
    fake.dropConnections();
    const c: string[] = [];
    const watching = xs.watch("/r/c", "tc", (p) => c.push(p));
    const unwatching = xs.unwatch("/r/a", "ta");
    await Promise.all([watching, unwatching]);
    await until(() => c.length === 1 && b.length === 4, "events after the second reconnect");
    assert.deepEqual(
      fake.watches().map((w) => w.token).sort(),
      ["tb", "tc"],
    );
    let settled = false;
    xs.closed.then(() => settled = true);
    await new Promise((r) => setTimeout(r, 10));
    assert.equal(settled, false, "closed stays pending across reconnects");
  }, { reconnectDelaysMs: FAST_RECONNECT, log });
});

Deno.test("xenstore: unanswered requests on a lost connection: reads replayed, writes failed", async () => {
  await withStore(async (xs, fake) => {
    await xs.write("/lost/v", "kept");
    const before = fake.requests.length;
    fake.stall();
    const read = xs.read("/lost/v");
    const dir = xs.directory("/lost");
    const mkdir = xs.mkdir("/lost/m");
    // checked from the start: they fail as soon as the loss is noticed
    const failures = Promise.all([
      rejectsWith(
        xs.write("/lost/w", "maybe"),
        "ECONNRESET",
        /^xenstore write \/lost\/w: connection lost/,
      ),
      rejectsWith(xs.rm("/lost/v"), "ECONNRESET", /^xenstore rm \/lost\/v: connection lost/),
      rejectsWith(xs.setPerms("/lost/v", ["n0"]), "ECONNRESET"),
    ]);
    await until(() => fake.requests.length === before + 6, "six requests held");
    fake.dropConnections();
    fake.resume(); // the held requests belong to a dead connection: never answered
    assert.equal(await read, "kept");
    assert.deepEqual(await dir, ["v"]);
    await mkdir;
    assert.equal(fake.read("/lost/m"), "");
    await failures;
    assert.equal(fake.read("/lost/w"), null);
    assert.equal(fake.read("/lost/v"), "kept");
  }, { reconnectDelaysMs: FAST_RECONNECT });
});

Deno.test("xenstore: requests made while reconnecting wait for the new connection", async () => {
  const log = new MemoryLogger();
  await withStore(async (xs, fake) => {
    fake.dropConnections();
    // Once the client has seen the EOF; a write sent before that would fail with ECONNRESET.
    await until(() => log.lines.some((l) => /connection lost/.test(l.msg)), "the loss noticed");
    const results = await Promise.all([
      xs.write("/wait/a", "1").then(() => xs.read("/wait/a")),
      xs.read("/wait/b"),
      xs.getDomainPath(3),
    ]);
    assert.deepEqual(results, ["1", null, "/local/domain/3"]);
    assert.ok(log.lines.some((l) => /reconnected/.test(l.msg)));
  }, { reconnectDelaysMs: [100, 50, 50], log });
});

Deno.test("xenstore: a transaction whose connection is lost runs again on the new one", async () => {
  await withStore(async (xs, fake) => {
    let runs = 0;
    await xs.transaction(async (tx) => {
      runs++;
      if (runs === 1) {
        await xs.write("/txl/first", "1", tx);
        fake.dropConnections();
        await until(() => fake.connectionCount === 1, "a new connection");
      }
      await xs.write("/txl/a", String(runs), tx);
    });
    assert.equal(runs, 2);
    assert.equal(fake.read("/txl/a"), "2");
    assert.equal(fake.read("/txl/first"), null);
  }, { reconnectDelaysMs: FAST_RECONNECT });
});

Deno.test("xenstore: when reconnecting fails for good, everything fails and closed resolves", async () => {
  const log = new MemoryLogger();
  const fake = await FakeXenStored.start();
  const xs = await XenStore.connect({ socket: fake.socketPath, reconnectDelaysMs: [5, 5], log });
  await xs.write("/x", "1");
  await fake.close();
  const pending = xs.read("/x");
  await xs.closed;
  await rejectsWith(pending, "ECONNRESET", /2 reconnect attempts failed/);
  await rejectsWith(xs.read("/x"), "ESHUTDOWN", /^xenstore read \/x: the connection is closed$/);
  assert.ok(log.lines.some((l) => l.level === "error" && /reconnect attempts failed/.test(l.msg)));
  xs.close(); // still fine
});

// ---------------------------------------------------------------------------------------------
// Closing

Deno.test("xenstore: close() resolves closed and fails pending and later requests", async () => {
  const fake = await FakeXenStored.start();
  try {
    const xs = await XenStore.connect({ socket: fake.socketPath });
    await xs.write("/c", "1");
    fake.stall();
    const inflight = rejectsWith(
      xs.read("/c"),
      "ESHUTDOWN",
      /^xenstore read \/c: the connection is closed$/,
    );
    await until(() => fake.requests.length === 2, "the read to arrive");
    xs.close();
    xs.close();
    await xs.closed;
    await inflight;
    await rejectsWith(xs.write("/c", "2"), "ESHUTDOWN");
    await rejectsWith(xs.transaction(() => Promise.resolve(1)), "ESHUTDOWN");
    await rejectsWith(xs.watch("/c", "t", () => {}), "ESHUTDOWN");
    fake.resume();
    await until(() => fake.connectionCount === 0, "the server to see the close");
  } finally {
    await fake.close();
  }
});

Deno.test("xenstore: `using` closes the client", async () => {
  const fake = await FakeXenStored.start();
  let closed: Promise<void>;
  {
    using xs = await XenStore.connect({ socket: fake.socketPath });
    closed = xs.closed;
    await xs.write("/u", "1");
  }
  await closed;
  await fake.close();
});

// ---------------------------------------------------------------------------------------------
// The xenbus device transport

/**
 * Stands in for /dev/xen/xenbus: a DeviceIo that passes frames to the fake over its socket,
 * asserts every write is exactly one whole frame, and hands reads back split at random points.
 */
class EmulatedXenbus implements DeviceIo {
  readonly writes: Frame[] = [];
  closed = false;
  readonly #conn: Deno.UnixConn;
  readonly #rand = rng(42);
  #bytes = new Uint8Array(0);
  #eof = false;
  #waiting: (() => void) | null = null;
  readonly pumped: Promise<void>;

  constructor(conn: Deno.UnixConn) {
    this.#conn = conn;
    this.pumped = this.#pump();
  }

  static async open(socketPath: string): Promise<EmulatedXenbus> {
    return new EmulatedXenbus(await Deno.connect({ transport: "unix", path: socketPath }));
  }

  async #pump(): Promise<void> {
    const buf = new Uint8Array(8192);
    try {
      for (;;) {
        const n = await this.#conn.read(buf);
        if (n === null) break;
        const joined = new Uint8Array(this.#bytes.length + n);
        joined.set(this.#bytes);
        joined.set(buf.subarray(0, n), this.#bytes.length);
        this.#bytes = joined;
        this.#waiting?.();
      }
    } catch {
      // closed
    }
    this.#eof = true;
    this.#waiting?.();
  }

  async read(buf: Uint8Array): Promise<number> {
    while (this.#bytes.length === 0 && !this.#eof) {
      await new Promise<void>((resolve) => this.#waiting = resolve);
      this.#waiting = null;
    }
    if (this.#bytes.length === 0) return 0;
    const n = Math.min(buf.length, this.#bytes.length, 1 + this.#rand.below(23));
    buf.set(this.#bytes.subarray(0, n));
    this.#bytes = this.#bytes.slice(n);
    return n;
  }

  async write(bytes: Uint8Array): Promise<number> {
    assert.equal(frameLength(bytes), bytes.length, "a write must hold exactly one frame");
    this.writes.push(...new FrameParser().push(bytes));
    for (let done = 0; done < bytes.length;) {
      done += await this.#conn.write(bytes.subarray(done));
    }
    return bytes.length;
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.#conn.close();
  }
}

Deno.test("xenstore: the device transport, with split reads and events before replies", async () => {
  const fake = await FakeXenStored.start({ eventBeforeWatchReply: true });
  const devices: EmulatedXenbus[] = [];
  const xs = await XenStore.connect({
    openTransport: async () => {
      const io = await EmulatedXenbus.open(fake.socketPath);
      devices.push(io);
      return new DeviceTransport(io);
    },
    reconnectDelaysMs: FAST_RECONNECT,
  });
  try {
    const events: string[] = [];
    await xs.watch("/dev", "tok", (p) => events.push(p));
    assert.deepEqual(events, ["/dev"]);
    await Promise.all(Array.from({ length: 50 }, (_, i) => xs.write(`/dev/n${i}`, "v".repeat(i))));
    const values = await Promise.all(Array.from({ length: 50 }, (_, i) => xs.read(`/dev/n${i}`)));
    values.forEach((v, i) => assert.equal(v, "v".repeat(i)));
    assert.equal(events.length, 51);
    await xs.transaction(async (tx) => await xs.write("/dev/tx", "1", tx));
    assert.equal(fake.read("/dev/tx"), "1");

    fake.dropConnections();
    await until(() => events.length === 53, "re-registration event");
    assert.equal(devices.length, 2);
    assert.ok(devices[0].closed);
    await xs.write("/dev/after", "x");
    assert.equal(fake.read("/dev/after"), "x");
  } finally {
    xs.close();
    await xs.closed;
  }
  // close() with a read blocked in the "kernel": a wake-up request ends it, then the fd closes
  const last = devices[devices.length - 1];
  await until(() => last.closed, "the device to be closed");
  const wake = last.writes[last.writes.length - 1];
  assert.equal(wake.type, XsType.GET_DOMAIN_PATH);
  assert.equal(wake.reqId, 0xffffffff);
  await Promise.all(devices.map((d) => d.pumped));
  await fake.close();
});

Deno.test("xenstore: device I/O lets a write through while a read is blocked (FIFO)", async () => {
  // Deno.FsFile would queue the write behind the read; on /dev/xen/xenbus that is a deadlock.
  const dir = Deno.makeTempDirSync({ prefix: "xenbus-fifo-" });
  const fifo = `${dir}/xenbus`;
  try {
    const mk = await new Deno.Command("mkfifo", { args: [fifo] }).output();
    assert.equal(mk.code, 0, "mkfifo");
    const io = await openDeviceIo(fifo);
    const buf = new Uint8Array(64);
    const reading = io.read(buf);
    await new Promise((r) => setTimeout(r, 50));
    const frame = encodeFrame({
      type: XsType.READ,
      reqId: 9,
      txId: 0,
      payload: nulTerminated("/x"),
    });
    assert.equal(await io.write(frame), frame.length);
    assert.equal(await reading, frame.length);
    assert.deepEqual(buf.subarray(0, frame.length), frame);
    io.close();

    // close() with a pending read: the wake-up request loops back through the FIFO
    const transport = await openTransport({ device: fifo });
    assert.ok(transport instanceof DeviceTransport);
    const pending = transport.read(buf);
    await new Promise((r) => setTimeout(r, 50));
    transport.close();
    assert.equal(await pending, null);
  } finally {
    // the fd closes once the looped-back wake-up has been read
    await new Promise((r) => setTimeout(r, 50));
    Deno.removeSync(dir, { recursive: true });
  }
});

Deno.test("xenstore: openTransport picks the explicit socket, else falls back", async () => {
  const fake = await FakeXenStored.start();
  try {
    const t: Transport = await openTransport({ socket: fake.socketPath });
    assert.ok(t instanceof SocketTransport);
    await t.write(encodeFrame({
      type: XsType.GET_DOMAIN_PATH,
      reqId: 1,
      txId: 0,
      payload: nulTerminated("4"),
    }));
    const buf = new Uint8Array(256);
    const parser = new FrameParser();
    let frames: Frame[] = [];
    while (frames.length === 0) frames = parser.push(buf.subarray(0, (await t.read(buf))!));
    assert.equal(payloadText(frames[0].payload), "/local/domain/4");
    t.close();
    assert.equal(await t.read(buf), null);
  } finally {
    await fake.close();
  }
  const present = ["/var/run/xenstored/socket", "/dev/xen/xenbus"].filter((p) => {
    try {
      Deno.statSync(p);
      return true;
    } catch {
      return false;
    }
  });
  if (present.length === 0) {
    await assert.rejects(
      openTransport(),
      /Cannot reach xenstored: socket "\/var\/run\/xenstored\/socket": .*; device "\/dev\/xen\/xenbus": /,
    );
  }
});
