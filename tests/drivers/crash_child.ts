/**
 * The crash tests' child (see crash_harness.ts): opens the disk SPEC, writes the plan of the
 * round with SEED (8 writes in flight) and flushes every FLUSH_EVERY writes, saying "flushed I"
 * on stdout once writes 0..I are flushed. The parent kills it with SIGKILL at some moment.
 *
 * Usage: deno run -A crash_child.ts SPEC SEED ENGINE PLAN FLUSH_EVERY
 */
import type { EngineKind } from "../../io/engine.ts";
import { openDisk } from "../../drivers/mod.ts";
import { crashData, crashPlan } from "./qcow/helpers.ts";

const [spec, seedText, engine, planText, flushText] = Deno.args;
const seed = Number(seedText), count = Number(planText), flushEvery = Number(flushText);
const disk = await openDisk(spec, { engine: engine as EngineKind });
console.log("open");
const plan = crashPlan(seed, disk.size, count);
const inflight = new Set<Promise<void>>();
for (let i = 0; i < plan.length; i++) {
  const p: Promise<void> = disk.write(plan[i].offset, crashData(seed, i, plan[i].length)).then(
    () => {
      inflight.delete(p);
    },
  );
  inflight.add(p);
  if (inflight.size >= 8) await Promise.race(inflight);
  if ((i + 1) % flushEvery === 0 || i === plan.length - 1) {
    await Promise.all(inflight);
    await disk.flush();
    console.log("flushed " + i);
  }
}
await disk.close();
console.log("closed");
