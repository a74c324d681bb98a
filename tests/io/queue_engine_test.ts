import assert from "node:assert/strict";
import { OP_READ, type Prepared, QueueEngine, SUBMIT_AT_ONCE } from "../../io/queue_engine.ts";
import { FileHandle } from "../../ffi/file.ts";
import { O_RDONLY } from "../../ffi/constants.ts";

const EIO = 5;

/**
 * A kernel queue in memory: it records each submission (its size, and whether the caller's
 * synchronous code had finished by then), then completes what it took, or refuses a batch.
 */
class RecordingEngine extends QueueEngine {
  readonly kind = "aio";
  protected readonly queuesFallocate = false;
  /** Sizes of the calls to submitPrepared, with the caller's `phase` at the time. */
  readonly calls: Array<{ count: number; phase: string }> = [];
  phase = "";
  refuse = false;
  #prepared: Array<{ slot: number; len: number }> = [];
  #done: Array<{ slot: number; res: number }> = [];

  protected prepare(slot: number, p: Prepared): void {
    assert.equal(p.op, OP_READ);
    this.#prepared.push({ slot, len: p.len });
  }

  protected submitPrepared(count: number): number {
    this.calls.push({ count, phase: this.phase });
    const batch = this.#prepared.splice(0, count);
    for (const { slot, len } of batch) {
      if (this.refuse) this.complete(slot, -EIO); // as libaio reports a refused iocb
      else this.#done.push({ slot, res: len });
    }
    if (this.#done.length > 0) this.eventfd.signal();
    return count;
  }

  protected reapOne(): boolean {
    const c = this.#done.shift();
    if (c === undefined) return false;
    this.complete(c.slot, c.res);
    return true;
  }

  protected takeUnsubmitted(): number[] {
    const slots = this.#prepared.map((p) => p.slot);
    this.#prepared = [];
    return slots;
  }

  protected destroy(): void {}
}

async function withEngine(
  batch: number,
  fn: (engine: RecordingEngine, file: FileHandle) => Promise<void>,
): Promise<void> {
  using file = FileHandle.open("/dev/null", O_RDONLY);
  const engine = new RecordingEngine({ batch });
  try {
    await fn(engine, file);
  } finally {
    await engine.close();
  }
}

Deno.test("queue engine: a full batch goes to the kernel within submit(), the rest at the end of the turn", async () => {
  await withEngine(4, async (engine, file) => {
    const results: Array<number | Error> = [];
    const all = new Promise<void>((resolve) => {
      engine.phase = "dispatching";
      for (let i = 0; i < 7; i++) {
        engine.submit(false, file, i * 4096, new Uint8Array(4096), (r) => {
          results.push(r);
          if (results.length === 7) resolve();
        });
        if (i === 3) assert.deepEqual(engine.calls, [{ count: 4, phase: "dispatching" }]);
      }
      engine.phase = "turn over";
    });
    await all;
    assert.deepEqual(engine.calls, [
      { count: 4, phase: "dispatching" },
      { count: 3, phase: "turn over" },
    ]);
    assert.deepEqual(results, Array(7).fill(4096));
  });
});

Deno.test("queue engine: a large request goes to the kernel at once, with those prepared before it", async () => {
  await withEngine(16, async (engine, file) => {
    const results: Array<number | Error> = [];
    const all = new Promise<void>((resolve) => {
      engine.phase = "dispatching";
      const sizes = [4096, 4096, SUBMIT_AT_ONCE, 4096, SUBMIT_AT_ONCE - 4096, SUBMIT_AT_ONCE * 8];
      for (const size of sizes) {
        engine.submit(false, file, 0, new Uint8Array(size), (r) => {
          results.push(r);
          if (results.length === sizes.length) resolve();
        });
      }
      engine.phase = "turn over";
    });
    await all;
    // The small ones wait for their batch; each large one takes them along.
    assert.deepEqual(engine.calls, [
      { count: 3, phase: "dispatching" },
      { count: 3, phase: "dispatching" },
    ]);
    assert.equal(results.length, 6);
  });
});

Deno.test("queue engine: a batch refused while submit() flushes it fails after submit() returns", async () => {
  await withEngine(2, async (engine, file) => {
    engine.refuse = true;
    const results: Array<number | Error> = [];
    let returned = false;
    const both = new Promise<void>((resolve) => {
      for (let i = 0; i < 2; i++) {
        engine.submit(false, file, i * 4096, new Uint8Array(4096), (r) => {
          assert.ok(returned, "a callback ran inside submit()");
          results.push(r);
          if (results.length === 2) resolve();
        });
      }
      returned = true;
    });
    await both;
    assert.equal(engine.calls.length, 1);
    for (const r of results) {
      assert.ok(r instanceof Error && /EIO/.test(r.message), String(r));
    }
    // The engine goes on: the next requests succeed.
    engine.refuse = false;
    const n = await engine.read(file, 0, new Uint8Array(4096));
    assert.equal(n, 4096);
  });
});
