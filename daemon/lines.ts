/**
 * JSON lines: the framing of the control socket and of the daemon ↔ tapdisk channel. One JSON
 * value per line, UTF-8, "\n"-terminated; a line longer than MAX_LINE is refused.
 */

export const MAX_LINE = 1 << 20;

export class LineTooLong extends Error {
  override name = "LineTooLong";
}

/** Splits a byte stream into lines; push() returns the lines completed so far. */
export class LineSplitter {
  readonly #decoder = new TextDecoder();
  #partial = "";

  push(bytes: Uint8Array): string[] {
    const text = this.#partial + this.#decoder.decode(bytes, { stream: true });
    const lines = text.split("\n");
    this.#partial = lines.pop()!;
    if (this.#partial.length > MAX_LINE) {
      throw new LineTooLong(`line longer than ${MAX_LINE} bytes`);
    }
    return lines;
  }

  /** What is left after end of stream (an unterminated last line), or null. */
  end(): string | null {
    const rest = this.#partial + this.#decoder.decode();
    this.#partial = "";
    return rest === "" ? null : rest;
  }
}

/** Every line of a byte stream, the unterminated last one included. */
export async function* readLines(stream: ReadableStream<Uint8Array>): AsyncGenerator<string> {
  const splitter = new LineSplitter();
  for await (const chunk of stream) yield* splitter.push(chunk);
  const rest = splitter.end();
  if (rest !== null) yield rest;
}

const encoder = new TextEncoder();

/** One value as a JSON line. */
export function encodeLine(value: unknown): Uint8Array<ArrayBuffer> {
  return encoder.encode(JSON.stringify(value) + "\n");
}
