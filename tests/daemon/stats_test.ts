/** `tapd ctl stats`: per-operation requests, bytes, errors and latency percentiles. */
import assert from "node:assert/strict";
import { qemuIo, rawImage, unixUri, withDaemon } from "./helpers.ts";

Deno.test("daemon: stats counts requests and bytes per op, with p50/p99 latencies", async () => {
  await withDaemon(async (d) => {
    const disk = await d.attach(rawImage(d, "a.img"));
    const empty = await d.stats(disk.id);
    assert.equal(empty.id, 0);
    assert.equal(empty.ops.read.requests, 0);
    assert.equal(empty.ops.write.p50Micros, 0);

    await qemuIo(
      unixUri(disk),
      ...Array.from({ length: 8 }, (_, i) => `write -P ${i + 1} ${i * 65536} 64k`),
      ...Array.from({ length: 4 }, (_, i) => `read -P ${i + 1} ${i * 65536} 64k`),
      "flush",
    );
    const s = await d.stats(disk.id);
    assert.equal(s.paused, false);
    assert.equal(s.inFlight, 0);
    assert.equal(s.ops.write.requests, 8);
    assert.equal(s.ops.write.bytes, 8 * 65536);
    assert.equal(s.ops.write.errors, 0);
    assert.ok(s.ops.read.requests >= 4, JSON.stringify(s.ops.read)); // and any probe reads
    assert.ok(s.ops.read.bytes >= 4 * 65536);
    assert.ok(s.ops.flush.requests >= 1);
    for (const op of [s.ops.read, s.ops.write]) {
      assert.ok(op.p50Micros > 0, JSON.stringify(op));
      assert.ok(op.p99Micros >= op.p50Micros, JSON.stringify(op));
    }

    const text = (await d.ctlOk("stats", "0")).stdout;
    assert.match(text, /^disk 0: running, 0 in flight\n/);
    assert.match(text, /\nOP\s+REQUESTS\s+BYTES\s+ERRORS\s+P50\s+P99\n/);
    assert.match(text, /\nwrite\s+8\s+512 KiB\s+0\s+\d+ µs\s+\d+ µs\n/);
    assert.match(text, /\nread-ahead: 0 reads answered from 0 B read ahead\n$/);
  });
});

Deno.test("daemon: stats counts reads answered from read-ahead; --no-read-ahead turns it off", async () => {
  await withDaemon(async (d) => {
    const disk = await d.attach(rawImage(d, "a.img"));
    const off = await d.attach(rawImage(d, "b.img"), "--no-read-ahead");
    // A sequential reader of 256 KiB requests, one at a time.
    const reads = Array.from({ length: 16 }, (_, i) => `read -P 0 ${i * 262144} 256k`);
    await qemuIo(unixUri(disk), ...reads);
    await qemuIo(unixUri(off), ...reads);
    const s = await d.stats(disk.id);
    assert.ok(s.readAhead !== null && s.readAhead.hits >= 12, JSON.stringify(s.readAhead));
    assert.ok(s.readAhead.fetchedBytes >= 12 * 262144);
    assert.equal((await d.stats(off.id)).readAhead, null);
    assert.match((await d.ctlOk("stats", String(off.id))).stdout, /\nread-ahead off\n$/);
    const usage = await d.ctl("attach", rawImage(d, "c.img"), "--no-read-ahead=x");
    assert.notEqual(usage.code, 0);
  });
});
