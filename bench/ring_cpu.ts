/**
 * The CPU one request costs on tapdisk's ring path, without I/O: an in-process frontend keeps
 * QD 4 KiB reads on a ring served by the real RingServer → DiskGate → Disk → RawDisk →
 * QueueEngine stack, whose kernel queue is replaced by one that completes every request at once.
 * What it measures is the JavaScript (and V8) work per request, free of the disk's and this VM's
 * noise: the figure to watch when changing the request path.
 *
 *   deno task bench:ring-cpu [--requests N] [--qd N] [--rounds N] [--base DIR]
 *
 * `--base DIR` runs another checkout's stack (from this commit on) in the same rounds. Each run is
 * a fresh Deno process.
 */
import { parseArgs } from "node:util";
import { median, ROOT, run } from "./common.ts";

const PAGE = 4096;

if (Deno.args[0] === "--child") {
  const [root, n, qd] = [Deno.args[1], Number(Deno.args[2]), Number(Deno.args[3])];
  console.log(await measure(root, n, qd));
  Deno.exit(0);
}

const { values } = parseArgs({
  options: {
    requests: { type: "string", default: "400000" },
    qd: { type: "string", default: "64" },
    rounds: { type: "string", default: "5" },
    base: { type: "string" },
  },
});
const roots: Array<[string, string]> = [["this checkout", ROOT]];
if (values.base !== undefined) {
  roots.push(["base", new URL(`${values.base}/`, `file://${Deno.cwd()}/`).pathname]);
}
const ns = new Map<string, number[]>(roots.map(([name]) => [name, []]));
for (let r = 0; r < Number(values.rounds); r++) {
  for (const [name, root] of r % 2 ? [...roots].reverse() : roots) {
    const out = await run(Deno.execPath(), [
      "run",
      "-A",
      new URL(import.meta.url).pathname,
      "--child",
      root,
      values.requests,
      values.qd,
    ]);
    ns.get(name)!.push(Number(out.trim()));
  }
}
console.log(
  `ring path CPU per request, no I/O (QD ${values.qd}, ${values.requests} requests a run)`,
);
for (const [name] of roots) {
  const xs = ns.get(name)!;
  console.log(
    `  ${name}: ${median(xs).toFixed(0)} ns (runs: ${xs.map((x) => x.toFixed(0)).join(", ")})`,
  );
}

/** Serves `n` requests at depth `qd` with the stack of checkout `root`; returns ns per request. */
async function measure(root: string, n: number, qd: number): Promise<number> {
  const { QueueEngine } = await import(
    `${root}io/queue_engine.ts`
  ) as typeof import("../io/queue_engine.ts");
  const { RawDisk } = await import(`${root}drivers/raw.ts`) as typeof import("../drivers/raw.ts");
  const { Disk } = await import(`${root}drivers/disk.ts`) as typeof import("../drivers/disk.ts");
  const { DiskGate } = await import(`${root}serve/gate.ts`) as typeof import("../serve/gate.ts");
  const { RingServer } = await import(
    `${root}ring/server.ts`
  ) as typeof import("../ring/server.ts");
  const { PageSegments } = await import(
    `${root}ring/segments.ts`
  ) as typeof import("../ring/segments.ts");
  const { BLKIF_LAYOUT: L, ringEntries } = await import(
    `${root}ring/blkif.ts`
  ) as typeof import("../ring/blkif.ts");
  const { AlignedMemory } = await import(
    `${root}ffi/memory.ts`
  ) as typeof import("../ffi/memory.ts");
  const { FileHandle } = await import(`${root}ffi/file.ts`) as typeof import("../ffi/file.ts");
  const { O_RDONLY } = await import(
    `${root}ffi/constants.ts`
  ) as typeof import("../ffi/constants.ts");
  const { RING_ENGINE } = await import(`${root}io/engine.ts`) as typeof import("../io/engine.ts");
  if (RawDisk === undefined) throw new Error(`${root}: drivers/raw.ts does not export RawDisk`);

  /** A kernel queue that completes each request as soon as it is submitted. */
  class InstantEngine extends QueueEngine {
    readonly kind = "aio";
    protected readonly queuesFallocate = false;
    #prepared: number[] = [];
    readonly #len = new Int32Array(1024);
    readonly #done = new Int32Array(1024);
    #head = 0;
    #tail = 0;
    protected prepare(slot: number, p: { len: number }): void {
      this.#len[slot] = p.len;
      this.#prepared.push(slot);
    }
    protected submitPrepared(count: number): number {
      for (let i = 0; i < count; i++) this.#done[this.#tail++ & 1023] = this.#prepared[i];
      this.#prepared.splice(0, count);
      return count;
    }
    protected reapOne(): boolean {
      if (this.#head === this.#tail) return false;
      const slot = this.#done[this.#head++ & 1023];
      this.complete(slot, this.#len[slot]);
      return true;
    }
    protected takeUnsubmitted(): number[] {
      const slots = this.#prepared;
      this.#prepared = [];
      return slots;
    }
    protected destroy(): void {}
  }

  const dir = Deno.makeTempDirSync({ dir: "/var/tmp", prefix: "tapd-ring-cpu-" });
  const path = `${dir}/disk.img`;
  Deno.writeFileSync(path, new Uint8Array(0));
  Deno.truncateSync(path, 1 << 30);
  const file = FileHandle.open(path, O_RDONLY);
  Deno.removeSync(dir, { recursive: true });
  const gate = new DiskGate(
    new Disk(new RawDisk(file, new InstantEngine(RING_ENGINE), false), "cpu"),
  );

  const ringBytes = 4 * PAGE;
  const ringMem = new AlignedMemory(ringBytes), dataMem = new AlignedMemory(qd * PAGE);
  const view = new DataView(ringMem.bytes.buffer, ringMem.bytes.byteOffset, ringBytes);
  const words = new Uint32Array(ringMem.bytes.buffer, ringMem.bytes.byteOffset, 4);
  const entries = ringEntries(ringBytes);
  if (qd > entries) throw new Error(`--qd ${qd}: the ring holds ${entries}`);
  const units = gate.size / PAGE;

  // The frontend: request i reads into data page i; each response is answered with a new read.
  let reqProd = 0, rspCons = 0, done = 0, seed = 1;
  let kicked: ((more: boolean) => void) | null = null, kickPending = false, stopping = false;
  const place = (id: number): void => {
    const base = L.RING_OFFSET + (reqProd++ & (entries - 1)) * L.ENTRY_SIZE;
    seed = (seed * 1103515245 + 12345) >>> 0;
    view.setUint8(base + L.OFF_OPERATION, 0);
    view.setUint8(base + L.OFF_NR_SEGMENTS, 1);
    view.setUint32(base + L.OFF_ID, id, true);
    view.setUint32(base + L.OFF_ID + 4, 0, true);
    view.setUint32(base + L.OFF_SECTOR_NUMBER, (seed % units) * 8, true);
    view.setUint32(base + L.OFF_SECTOR_NUMBER + 4, 0, true);
    view.setUint32(base + L.OFF_SEG + L.OFF_SEG_GREF, id, true);
    view.setUint8(base + L.OFF_SEG + L.OFF_SEG_FIRST_SECT, 0);
    view.setUint8(base + L.OFF_SEG + L.OFF_SEG_LAST_SECT, 7);
  };
  const wake = (more: boolean): void => {
    if (kicked === null) kickPending = more;
    else {
      const k = kicked;
      kicked = null;
      k(more);
    }
  };
  const push = (): void => {
    const old = words[0];
    words[0] = reqProd;
    if (((reqProd - words[1]) >>> 0) < ((reqProd - old) >>> 0)) wake(true);
  };
  let finished!: () => void;
  const allDone = new Promise<void>((resolve) => finished = resolve);
  const consume = (): void => {
    while (rspCons !== words[2]) {
      const base = L.RING_OFFSET + (rspCons++ & (entries - 1)) * L.ENTRY_SIZE;
      if (++done === n) {
        stopping = true;
        server.stop();
        wake(false);
        return finished();
      }
      place(view.getUint32(base + L.OFF_RSP_ID, true));
    }
    push();
    words[3] = rspCons + 1; // rsp_event: notify on the next response
  };
  const server = new RingServer(gate, {
    ring: ringMem.bytes.subarray(0, ringBytes),
    data: new PageSegments(dataMem.bytes, 0),
    waitKick(): Promise<boolean> {
      if (stopping) return Promise.resolve(false);
      if (kickPending) {
        kickPending = false;
        return Promise.resolve(true);
      }
      return new Promise<boolean>((resolve) => kicked = resolve);
    },
    notify(): void {
      queueMicrotask(consume);
    },
  }, true);
  for (let i = 0; i < qd; i++) place(i);
  const start = performance.now();
  push();
  const running = server.run();
  await allDone;
  const ms = performance.now() - start;
  await running;
  await gate.close();
  return ms * 1e6 / n;
}
