/** What a subcommand is, and the errors the CLI reports as usage errors (exit 2). */

export interface Command {
  readonly name: string;
  /** One line for `tapd --help`. */
  readonly summary: string;
  /** The full text of `tapd help NAME`. */
  readonly usage: string;
  /** Runs with the arguments after the subcommand name; resolves with the exit code. */
  run(args: string[]): Promise<number>;
}

/** A bad command line: reported in one line, exit code 2. */
export class UsageError extends Error {
  override name = "UsageError";
}
