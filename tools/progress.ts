/** A one-line progress bar on stderr, drawn only when stderr is a terminal. */
import { formatSize } from "../cli/args.ts";

const WIDTH = 30;
const INTERVAL_MS = 100;

export class Progress {
  readonly #label: string;
  readonly #total: number;
  readonly #enabled: boolean;
  readonly #start = performance.now();
  #last = -Infinity;
  #drawn = false;

  /** Draws nothing when `quiet` or when stderr is not a terminal. */
  constructor(label: string, total: number, quiet: boolean) {
    this.#label = label;
    this.#total = total;
    this.#enabled = !quiet && Deno.stderr.isTerminal();
  }

  /** Reports `done` bytes of the total; redraws at most ten times a second. */
  update(done: number): void {
    if (!this.#enabled) return;
    const now = performance.now();
    if (now - this.#last < INTERVAL_MS && done < this.#total) return;
    this.#last = now;
    this.#draw(done, now);
  }

  /** Ends the line: the final state on success, erased on failure. */
  finish(ok: boolean): void {
    if (!this.#enabled) return;
    if (ok) {
      this.#draw(this.#total, performance.now());
      write("\n");
    } else if (this.#drawn) {
      write("\r\x1b[K");
    }
  }

  #draw(done: number, now: number): void {
    const fraction = this.#total > 0 ? Math.min(1, done / this.#total) : 1;
    const filled = Math.round(fraction * WIDTH);
    const seconds = (now - this.#start) / 1000;
    const rate = seconds > 0 ? `${formatSize(Math.round(done / seconds))}/s` : "";
    write(
      `\r\x1b[K${this.#label} [${"#".repeat(filled)}${".".repeat(WIDTH - filled)}] ` +
        `${(fraction * 100).toFixed(0).padStart(3)}%  ${formatSize(done)} of ` +
        `${formatSize(this.#total)}  ${rate}`,
    );
    this.#drawn = true;
  }
}

const encoder = new TextEncoder();

function write(text: string): void {
  const bytes = encoder.encode(text);
  for (let off = 0; off < bytes.length;) off += Deno.stderr.writeSync(bytes.subarray(off));
}
