/** Stop signals as a queue, for commands that stop on the first and force on the next. */

/** `next()` resolves at the next of `signals` (or one received and not yet taken). */
export class SignalQueue implements Disposable {
  readonly #signals: readonly Deno.Signal[];
  #pending = 0;
  #waiters: (() => void)[] = [];
  readonly #on = () => {
    const wake = this.#waiters.shift();
    if (wake !== undefined) wake();
    else this.#pending++;
  };

  constructor(signals: readonly Deno.Signal[] = ["SIGTERM", "SIGINT"]) {
    this.#signals = signals;
    for (const signal of signals) Deno.addSignalListener(signal, this.#on);
  }

  next(): Promise<void> {
    if (this.#pending > 0) {
      this.#pending--;
      return Promise.resolve();
    }
    return new Promise((resolve) => this.#waiters.push(resolve));
  }

  [Symbol.dispose](): void {
    for (const signal of this.#signals) Deno.removeSignalListener(signal, this.#on);
  }
}
