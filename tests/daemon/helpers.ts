/** Running `tapd daemon` and `tapd ctl` for the daemon tests, as a user would (./tapd). */
import assert from "node:assert/strict";
import { controlRequest } from "../../daemon/client.ts";
import type { ControlReply, DiskRecord, DiskStats } from "../../daemon/control_protocol.ts";
import { readLines } from "../../daemon/lines.ts";
import type { Run } from "../tools/helpers.ts";
import { tempDir } from "../util.ts";

const root = new URL("../../", import.meta.url).pathname;
export const MiB = 1024 * 1024;

async function exec(cmd: string, args: string[], env?: Record<string, string>): Promise<Run> {
  const { code, stdout, stderr } = await new Deno.Command(cmd, {
    args,
    env,
    stdout: "piped",
    stderr: "piped",
  }).output();
  const dec = new TextDecoder();
  return { code, stdout: dec.decode(stdout), stderr: dec.decode(stderr) };
}

export function tapd(...args: string[]): Promise<Run> {
  return exec(`${root}tapd`, args);
}

/** Runs qemu-io on an NBD URI (raw format); fails the test unless every command succeeded. */
export async function qemuIo(uri: string, ...commands: string[]): Promise<Run> {
  const r = await exec("qemu-io", ["-f", "raw", ...commands.flatMap((c) => ["-c", c]), uri]);
  assert.equal(r.code, 0, `qemu-io ${commands.join("; ")} on ${uri}: ${r.stderr}${r.stdout}`);
  assert.doesNotMatch(r.stdout, /error|failed|Pattern verification/i, r.stdout);
  return r;
}

/** A `tapd daemon --no-default` in its own directory, stopped (or killed) by the test. */
export class TestDaemon {
  readonly dir: string;
  readonly control: string;
  readonly stateDir: string;
  readonly process: Deno.ChildProcess;
  stdout = "";
  stderr = "";
  readonly #drained: Promise<void>;

  private constructor(dir: string, args: string[], env: Record<string, string>) {
    this.dir = dir;
    this.control = `${dir}/control.sock`;
    this.stateDir = `${dir}/state`;
    const process = this.process = new Deno.Command(`${root}tapd`, {
      args: ["daemon", "--control", this.control, "--state-dir", this.stateDir, ...args],
      env,
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    const dec = new TextDecoder();
    const err = (async () => {
      for await (const chunk of process.stderr) this.stderr += dec.decode(chunk);
    })();
    this.#drained = err;
  }

  /** Starts a daemon (with no disk unless `args` says otherwise) and waits until it is ready. */
  static async start(
    dir = tempDir("tapd-daemon-"),
    args = ["--no-default"],
    env: Record<string, string> = {},
  ): Promise<TestDaemon> {
    const d = new TestDaemon(dir, args, env);
    const lines = readLines(d.process.stdout);
    for await (const line of lines) {
      d.stdout += line + "\n";
      if (line.startsWith("Stop with")) break;
    }
    if (!d.stdout.includes("Stop with")) {
      const status = await d.process.status;
      await d.#drained;
      throw new Error(`tapd daemon exited ${status.code} before it was ready: ${d.stderr}`);
    }
    (async () => {
      for await (const line of lines) d.stdout += line + "\n";
    })();
    return d;
  }

  ctl(...args: string[]): Promise<Run> {
    return tapd("ctl", "--control", this.control, ...args);
  }

  async ctlOk(...args: string[]): Promise<Run> {
    const r = await this.ctl(...args);
    assert.equal(r.code, 0, `tapd ctl ${args.join(" ")}: ${r.stderr}\ndaemon: ${this.stderr}`);
    return r;
  }

  request(req: unknown): Promise<ControlReply> {
    return controlRequest(this.control, req);
  }

  /** Attaches through `tapd ctl attach … --json`; returns the disk. */
  async attach(...args: string[]): Promise<DiskRecord> {
    return JSON.parse((await this.ctlOk("attach", ...args, "--json")).stdout) as DiskRecord;
  }

  async list(): Promise<DiskRecord[]> {
    return JSON.parse((await this.ctlOk("list", "--json")).stdout) as DiskRecord[];
  }

  async stats(id: number): Promise<DiskStats> {
    return JSON.parse((await this.ctlOk("stats", String(id), "--json")).stdout) as DiskStats;
  }

  /** Sends `signal` and waits for the exit; returns the exit status. */
  async stop(signal: Deno.Signal = "SIGTERM"): Promise<Deno.CommandStatus> {
    try {
      this.process.kill(signal);
    } catch { /* already gone */ }
    const status = await this.process.status;
    await this.#drained;
    return status;
  }

  /** Cleanup whatever happened: kills the daemon and its children, removes the directory. */
  async dispose(): Promise<void> {
    let pids: number[] = [];
    try {
      pids = (await this.list()).flatMap((d) => d.pid === null ? [] : [d.pid]);
    } catch { /* the daemon is gone */ }
    // The children too before waiting: they hold the daemon's stderr open.
    try {
      this.process.kill("SIGKILL");
    } catch { /* gone */ }
    for (const pid of pids) {
      try {
        Deno.kill(pid, "SIGKILL");
      } catch { /* gone */ }
    }
    await this.process.status;
    await this.#drained;
    Deno.removeSync(this.dir, { recursive: true });
  }
}

/** Runs `fn` with a fresh daemon; always cleans up. */
export async function withDaemon(
  fn: (d: TestDaemon) => Promise<void>,
  args?: string[],
): Promise<void> {
  const d = await TestDaemon.start(undefined, args);
  try {
    await fn(d);
  } finally {
    await d.dispose();
  }
}

/** A raw image of `size` bytes (sparse) in the daemon's directory. */
export function rawImage(d: TestDaemon, name: string, size = 64 * MiB): string {
  const path = `${d.dir}/${name}`;
  using f = Deno.openSync(path, { write: true, create: true });
  f.truncateSync(size);
  return path;
}

/** The NBD URI of a disk's first Unix export. */
export function unixUri(disk: DiskRecord): string {
  const uri = disk.uris.find((u) => u.startsWith("nbd+unix:"));
  assert.ok(uri, `disk ${disk.id} has no Unix NBD export: ${disk.uris.join(" ")}`);
  return uri;
}

/** Whether process `pid` still exists. */
export function alive(pid: number): boolean {
  try {
    Deno.kill(pid, "SIGCONT");
    return true;
  } catch {
    return false;
  }
}
