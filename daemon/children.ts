/**
 * tapdisk children, as blktapctrl ran them: each disk in its own `tapd tapdisk … --control
 * stdio` process, talked to over its stdin/stdout (daemon/tapdisk_protocol.ts). Its stderr is
 * the daemon's: its log lines carry component=tapdisk and the disk id.
 */
import type { Logger } from "../cli/log.ts";
import { encodeLine, readLines } from "./lines.ts";
import {
  type EndedEvent,
  parseTapdiskMessage,
  type ReadyEvent,
  type TapdiskCommand,
  type TapdiskReply,
} from "./tapdisk_protocol.ts";

/** How to run another tapd: the same Deno and main.ts, or the compiled binary itself. */
export function tapdLauncher(): { command: string; args: string[] } {
  if (Deno.build.standalone) return { command: Deno.execPath(), args: [] };
  const main = new URL("../main.ts", import.meta.url).pathname;
  return { command: Deno.execPath(), args: ["run", "--quiet", "--no-prompt", "--allow-all", main] };
}

export interface ExitInfo {
  code: number;
  signal: Deno.Signal | null;
  /** "exited with code 1", "killed by SIGKILL", "exited normally". */
  reason: string;
}

export function exitReason(status: Deno.CommandStatus): string {
  if (status.signal !== null) return `killed by ${status.signal}`;
  return status.code === 0 ? "exited normally" : `exited with code ${status.code}`;
}

type Pending = { resolve: (r: TapdiskReply) => void; reject: (e: Error) => void };

export class TapdiskChild {
  readonly pid: number;
  /** Resolves when the child serves; rejects with its error (or its exit) if it never does. */
  readonly ready: Promise<ReadyEvent>;
  /** Resolves when the child has exited. */
  readonly exited: Promise<ExitInfo>;
  readonly #process: Deno.ChildProcess;
  readonly #stdin: WritableStreamDefaultWriter<Uint8Array>;
  readonly #pending = new Map<number, Pending>();
  readonly #log: Logger;
  #seq = 0;
  #gone: ExitInfo | null = null;
  #startError: string | null = null;

  /** `onEnded`: an export ended on its own while the disk serves on (its Xen guest is gone). */
  constructor(tapdiskArgs: string[], log: Logger, onEnded: (e: EndedEvent) => void = () => {}) {
    const launcher = tapdLauncher();
    this.#log = log;
    const process = this.#process = new Deno.Command(launcher.command, {
      args: [...launcher.args, "tapdisk", ...tapdiskArgs, "--control", "stdio"],
      stdin: "piped",
      stdout: "piped",
      stderr: "inherit",
    }).spawn();
    this.pid = this.#process.pid;
    this.#stdin = this.#process.stdin.getWriter();
    this.#stdin.closed.catch(() => {}); // a dead child's stdin: reported through `exited`

    let readyResolve!: (e: ReadyEvent) => void, readyReject!: (e: Error) => void;
    this.ready = new Promise((resolve, reject) => {
      readyResolve = resolve;
      readyReject = reject;
    });
    this.ready.catch(() => {}); // observed by whoever awaits it
    const reading = (async () => {
      for await (const line of readLines(process.stdout)) {
        let message;
        try {
          message = parseTapdiskMessage(line);
        } catch (e) {
          log.warn("bad line from tapdisk", { error: (e as Error).message });
          continue;
        }
        if ("event" in message) {
          if (message.event === "ready") readyResolve(message);
          else if (message.event === "ended") onEnded(message);
          else this.#startError = message.error;
        } else {
          const pending = this.#pending.get(message.seq);
          this.#pending.delete(message.seq);
          pending?.resolve(message);
        }
      }
    })().catch((e) => log.warn("reading tapdisk failed", { error: (e as Error).message }));

    this.exited = Promise.all([process.status, reading]).then(([status]) => {
      const info = { code: status.code, signal: status.signal, reason: exitReason(status) };
      this.#gone = info;
      const error = new Error(this.#startError ?? `tapdisk ${info.reason}`);
      readyReject(error);
      for (const p of this.#pending.values()) p.reject(error);
      this.#pending.clear();
      return info;
    });
  }

  get running(): boolean {
    return this.#gone === null;
  }

  /** The child's "error" event: it could not start (and undid what it had started). */
  get startError(): string | null {
    return this.#startError;
  }

  /** Sends a command and waits for its reply (rejects if the child dies first). */
  async request(cmd: Omit<TapdiskCommand, "seq">): Promise<TapdiskReply> {
    if (this.#gone !== null) throw new Error(`tapdisk ${this.#gone.reason}`);
    const seq = ++this.#seq;
    const reply = new Promise<TapdiskReply>((resolve, reject) => {
      this.#pending.set(seq, { resolve, reject });
    });
    try {
      await this.#stdin.write(encodeLine({ ...cmd, seq }));
    } catch {
      /* the child is gone: `exited` rejects the reply */
    }
    return await reply;
  }

  kill(signal: Deno.Signal): void {
    if (this.#gone !== null) return;
    try {
      this.#process.kill(signal);
    } catch { /* already exited */ }
  }

  /** Closes the child's stdin (it stops as if the daemon were gone). */
  async closeInput(): Promise<void> {
    try {
      await this.#stdin.close();
    } catch { /* already closed */ }
  }
}
