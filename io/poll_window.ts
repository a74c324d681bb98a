/**
 * Pacing for a poller that looks for work instead of sleeping (`--poll-us`): it keeps looking
 * until `micros` µs have passed without activity. The looks are microtask hops, so a look costs
 * well under a microsecond (an event-loop turn, with its timers and reactor poll, costs several);
 * one look in 64 is an event-loop turn instead, so timers, signals and I/O are still served.
 * The clock (an op in Deno) is read once every 64 looks, not on every event: at 16, clock reads were
 * 3% of a polling tapdisk's time, and 64 looks take a few µs, well inside any window.
 */
import { setImmediate } from "node:timers";

const TURN_EVERY = 64;
const CLOCK_EVERY = 64;

export class PollWindow {
  readonly #ms: number;
  #since = 0;
  #touched = false;
  #looks = 0;
  #hops = 0;

  constructor(micros: number) {
    this.#ms = micros / 1000;
  }

  /** Something happened: the window starts again (no clock read). */
  touch(): void {
    this.#touched = true;
  }

  /** Whether to look again, or let the caller sleep. */
  keepLooking(): boolean {
    if (++this.#looks % CLOCK_EVERY !== 0) return true;
    const now = performance.now();
    if (this.#touched) {
      this.#touched = false;
      this.#since = now;
      return true;
    }
    return now - this.#since < this.#ms;
  }

  /** Runs `look` as the next look. */
  schedule(look: () => void): void {
    if (++this.#hops % TURN_EVERY !== 0) queueMicrotask(look);
    else setImmediate(look);
  }

  /** The next look, for an async loop. */
  next(): Promise<void> {
    return new Promise((resolve) => this.schedule(resolve));
  }
}
