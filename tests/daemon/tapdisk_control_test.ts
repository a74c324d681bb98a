/**
 * `tapd tapdisk … --control stdio`, the daemon's side channel, driven directly: the ready event,
 * stats, pause/resume (a failed reopen leaves it paused), stop, and end of stdin.
 */
import assert from "node:assert/strict";
import { encodeLine, readLines } from "../../daemon/lines.ts";
import type { ReadyEvent, TapdiskMessage } from "../../daemon/tapdisk_protocol.ts";
import { qemuIo } from "./helpers.ts";
import { withTempDir } from "../util.ts";

const root = new URL("../../", import.meta.url).pathname;

class Child {
  readonly process: Deno.ChildProcess;
  readonly #lines: AsyncGenerator<string>;
  readonly #stdin: WritableStreamDefaultWriter<Uint8Array>;

  constructor(args: string[]) {
    this.process = new Deno.Command(`${root}tapd`, {
      args: ["tapdisk", ...args, "--control", "stdio"],
      stdin: "piped",
      stdout: "piped",
      stderr: "null",
    }).spawn();
    this.#lines = readLines(this.process.stdout);
    this.#stdin = this.process.stdin.getWriter();
  }

  async next(): Promise<TapdiskMessage> {
    const r = await this.#lines.next();
    assert.ok(!r.done, "tapdisk closed its stdout");
    return JSON.parse(r.value);
  }

  async send(cmd: Record<string, unknown>): Promise<TapdiskMessage> {
    await this.#stdin.write(encodeLine(cmd));
    return await this.next();
  }

  async closeInput(): Promise<void> {
    await this.#stdin.close();
  }

  async drain(): Promise<void> {
    for await (const _ of this.#lines) { /* until EOF */ }
  }
}

Deno.test("tapdisk --control stdio: ready, stats, pause/resume, stop", async () => {
  await withTempDir(async (dir) => {
    const img = `${dir}/a.img`, sock = `${dir}/a.sock`;
    Deno.writeFileSync(img, new Uint8Array(4 * 1024 * 1024));
    const c = new Child([`tap:aio:${img}`, "--nbd", `unix:${sock}`, "--export-name", "3"]);
    const ready = await c.next() as ReadyEvent;
    assert.deepEqual(ready, {
      event: "ready",
      size: 4 * 1024 * 1024,
      exports: [`unix:${sock}`],
      uris: [`nbd+unix:///?socket=${sock}`],
    });
    await qemuIo(ready.uris[0], "write -P 7 0 64k");
    await qemuIo(`nbd+unix:///3?socket=${sock}`, "read -P 7 0 64k");
    const stats = await c.send({ seq: 1, cmd: "stats" });
    assert.ok("ok" in stats && stats.ok && stats.stats!.ops.write.requests === 1);
    assert.deepEqual(await c.send({ seq: 2, cmd: "pause" }), { seq: 2, ok: true });
    const bad = await c.send({ seq: 3, cmd: "resume", reopen: `tap:aio:${dir}/none.img` });
    assert.ok("ok" in bad && !bad.ok && /ENOENT/.test(bad.error), JSON.stringify(bad));
    const still = await c.send({ seq: 4, cmd: "stats" });
    assert.ok("ok" in still && still.ok && still.stats!.paused === true);
    assert.deepEqual(await c.send({ seq: 5, cmd: "resume" }), { seq: 5, ok: true });
    assert.deepEqual(await c.send({ seq: 6, cmd: "stop" }), { seq: 6, ok: true });
    await c.drain();
    await c.closeInput().catch(() => {});
    assert.equal((await c.process.status).code, 0);
    assert.throws(() => Deno.lstatSync(sock), Deno.errors.NotFound);
  });
});

Deno.test("tapdisk --control stdio: end of stdin stops it; a bad spec is an error event", async () => {
  await withTempDir(async (dir) => {
    const img = `${dir}/a.img`;
    Deno.writeFileSync(img, new Uint8Array(1024 * 1024));
    const c = new Child([`tap:aio:${img}`, "--nbd", `unix:${dir}/a.sock`]);
    assert.equal((await c.next() as ReadyEvent).event, "ready");
    await c.closeInput();
    await c.drain();
    assert.equal((await c.process.status).code, 0);

    const bad = new Child([`tap:qcow:${img}`, "--nbd", `unix:${dir}/b.sock`]);
    const event = await bad.next();
    assert.ok("event" in event && event.event === "error", JSON.stringify(event));
    await bad.drain();
    await bad.closeInput().catch(() => {});
    assert.equal((await bad.process.status).code, 1);
  });
});
