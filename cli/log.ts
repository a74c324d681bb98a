/**
 * Structured logs on stderr, one logfmt line each:
 *   time=2026-11-26T04:30:00.123Z level=info component=nbd msg="client connected" peer=…
 * The level threshold comes from TAPD_LOG_LEVEL (debug, info, warn, error; default info).
 */

export const LEVELS = ["debug", "info", "warn", "error"] as const;
export type Level = typeof LEVELS[number];
export type Fields = Record<string, string | number | boolean | null | undefined>;

export interface Logger {
  debug(msg: string, fields?: Fields): void;
  info(msg: string, fields?: Fields): void;
  warn(msg: string, fields?: Fields): void;
  error(msg: string, fields?: Fields): void;
  /** A logger whose lines also carry `fields`. */
  with(fields: Fields): Logger;
}

function threshold(): number {
  const wanted = Deno.env.get("TAPD_LOG_LEVEL") ?? "info";
  const index = LEVELS.indexOf(wanted as Level);
  return index < 0 ? 1 : index;
}

function quote(value: string): string {
  return /^[\w.:/@+,-]+$/.test(value) ? value : JSON.stringify(value);
}

export function formatLine(level: Level, msg: string, fields: Fields): string {
  let line = `time=${new Date().toISOString()} level=${level}`;
  for (const [key, value] of Object.entries(fields)) {
    if (key !== "msg" && value !== undefined) line += ` ${key}=${quote(String(value))}`;
  }
  return `${line} msg=${quote(msg)}`;
}

const encoder = new TextEncoder();

class StderrLogger implements Logger {
  readonly #fields: Fields;
  readonly #min: number;

  constructor(fields: Fields, min: number) {
    this.#fields = fields;
    this.#min = min;
  }

  #emit(level: Level, msg: string, fields?: Fields): void {
    if (LEVELS.indexOf(level) < this.#min) return;
    const line = formatLine(level, msg, { ...this.#fields, ...fields });
    try {
      Deno.stderr.writeSync(encoder.encode(line + "\n"));
    } catch { /* stderr gone: nothing to tell */ }
  }

  debug(msg: string, fields?: Fields): void {
    this.#emit("debug", msg, fields);
  }
  info(msg: string, fields?: Fields): void {
    this.#emit("info", msg, fields);
  }
  warn(msg: string, fields?: Fields): void {
    this.#emit("warn", msg, fields);
  }
  error(msg: string, fields?: Fields): void {
    this.#emit("error", msg, fields);
  }
  with(fields: Fields): Logger {
    return new StderrLogger({ ...this.#fields, ...fields }, this.#min);
  }
}

/** A logger for one component, e.g. createLogger("nbd"). */
export function createLogger(component: string, fields: Fields = {}): Logger {
  return new StderrLogger({ component, ...fields }, threshold());
}

/** A logger that drops everything (tests, library use). */
export const silentLogger: Logger = {
  debug() {},
  info() {},
  warn() {},
  error() {},
  with() {
    return silentLogger;
  },
};
