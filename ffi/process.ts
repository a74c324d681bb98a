/** Process-wide settings made through libc. */
import { check } from "./errno.ts";
import { libc } from "./libc.ts";

/**
 * Restricts every thread of this process (and the threads they create later) to `cpus`, like
 * `taskset -a -p`. Deno runs helper threads (its thread pool, V8's), so the calling thread alone
 * is not enough.
 */
export function pinProcess(cpus: readonly number[]): void {
  const mask = new BigUint64Array(16); // cpu_set_t: 1024 bits
  for (const cpu of cpus) {
    if (!Number.isInteger(cpu) || cpu < 0 || cpu >= 1024) throw new RangeError(`No CPU ${cpu}`);
    mask[cpu >> 6] |= 1n << BigInt(cpu & 63);
  }
  for (const entry of Deno.readDirSync("/proc/self/task")) {
    check(
      libc.sched_setaffinity(Number(entry.name), 128n, mask),
      "sched_setaffinity",
      `task ${entry.name}`,
    );
  }
}
