/**
 * `tapd ctl`: talks to `tapd daemon` over its control socket (tap-ctl's heir): attach, list,
 * detach, pause, resume (optionally on a new image), stats.
 */
import {
  checkPassthroughAlone,
  formatSize,
  parseCommandLine,
  parseFuseUring,
  parseIoThreads,
  parsePollMicros,
} from "../cli/args.ts";
import { type Command, UsageError } from "../cli/command.ts";
import { controlRequest } from "../daemon/client.ts";
import type { ControlReply, DiskRecord } from "../daemon/control_protocol.ts";
import { diskTable, statsTable } from "../daemon/format.ts";
import { defaultControlSocket } from "../daemon/paths.ts";
import { parseDiskSpec } from "../drivers/mod.ts";

/** The options each command takes (--control goes with any). */
const OPTIONS_OF: Readonly<Record<string, readonly string[]>> = {
  attach: [
    "nbd",
    "ring",
    "fuse",
    "passthrough",
    "io-threads",
    "fuse-uring",
    "xen",
    "read-only",
    "poll-us",
    "no-read-ahead",
    "json",
  ],
  list: ["json"],
  detach: [],
  pause: ["json"],
  resume: ["reopen", "json"],
  stats: ["json"],
};

function absolute(path: string): string {
  return path.startsWith("/") ? path : `${Deno.cwd()}/${path}`;
}

/** A spec with a relative path made absolute (the daemon has no working directory of ours). */
function absoluteSpec(text: string): string {
  try {
    const s = parseDiskSpec(text);
    if (s.path.startsWith("/")) return text;
    return `tap:${s.type}:${absolute(s.path)}${s.readOnly ? ",ro" : ""}${
      s.persist ? ",persist" : ""
    }`;
  } catch {
    return text; // the daemon says what is wrong with it
  }
}

function absoluteAddress(text: string): string {
  return text.startsWith("unix:") && text.length > 5 ? `unix:${absolute(text.slice(5))}` : text;
}

function diskId(text: string | undefined, verb: string): number {
  if (text === undefined || !/^\d+$/.test(text)) {
    throw new UsageError(`ctl: ${verb}: expected a disk ID (a number, see tapd ctl list)`);
  }
  return Number(text);
}

function describe(d: DiskRecord): string {
  const size = d.size === null ? "" : `, ${formatSize(d.size)}`;
  const other = d.exports.filter((e) => /^(ring|fuse|xen):/.test(e))
    .map((e) => `  ${e}`);
  return [`disk ${d.id}: ${d.state} (${d.spec}${size})`, ...d.uris.map((u) => `  ${u}`), ...other]
    .join("\n");
}

export const ctlCommand: Command = {
  name: "ctl",
  summary: "control a running tapd daemon: attach, list, detach, pause, resume, stats",
  usage: `Usage: tapd ctl [--control SOCK] COMMAND [ARGUMENTS]

  attach SPEC [--nbd ADDR …] [--ring unix:PATH]
              [--fuse PATH [--passthrough] [--io-threads N] [--fuse-uring]]
              [--xen DOMID[:VDEV]] [--read-only] [--poll-us N] [--no-read-ahead]
                      serve the disk SPEC (tap:TYPE:PATH) in a new tapdisk process; prints its
                      ID. ADDR: unix:PATH or tcp:HOST[:PORT]. --fuse PATH mounts the disk over
                      the existing regular file PATH (use it with losetup --direct-io=on);
                      --passthrough: for a raw disk, the kernel reads and writes the image
                      itself (see tapd help serve); such a disk cannot be paused.
                      --io-threads N: threads serving a raw disk's FUSE reads and writes
                      (default 0: the event loop serves them; see tapd help serve).
                      --fuse-uring: FUSE over io_uring for a raw disk (Linux 6.14+):
                      requests come through io_uring, no system call each.
                      --xen 3:xvdb serves it to Xen domain 3 as its device xvdb (VDEV default
                      xvda; the daemon must run in dom0, see docs/xen.md). With no export
                      given it is served over NBD on STATE_DIR/nbd/ID.sock. --poll-us N: the
                      tapdisk polls instead of sleeping while busy (see tapd help tapdisk).
                      --no-read-ahead: no reading ahead of sequential readers (see tapd
                      help serve).
  list [--json]       the disks: ID, state (starting, running, paused, stopping, failed), the
                      tapdisk's PID, size, spec, exports, and why a failed disk failed
  detach ID           stop serving (requests in flight finish, the disk is flushed and closed);
                      refused while its FUSE file is in use (detach the loop device first)
  pause ID            finish the requests in flight, flush, and hold new ones
  resume ID [--reopen SPEC]
                      serve held and new requests again; with --reopen, on the image SPEC
                      (same size). The snapshot flow:
                        tapd ctl pause 1
                        tapd qcow-create 0 /v/overlay.qcow /v/base.qcow
                        tapd ctl resume 1 --reopen tap:qcow:/v/overlay.qcow
  stats ID [--json]   per operation: requests, bytes, errors, latency p50/p99

--control SOCK: the daemon's control socket (default ${defaultControlSocket()}).
--json prints the daemon's reply. Errors: one line on stderr, exit 1.`,

  async run(args: string[]): Promise<number> {
    const { values, positionals } = parseCommandLine("ctl", args, {
      control: { type: "string" },
      nbd: { type: "string", multiple: true },
      ring: { type: "string" },
      fuse: { type: "string" },
      xen: { type: "string" },
      "read-only": { type: "boolean" },
      "poll-us": { type: "string" },
      passthrough: { type: "boolean" },
      "io-threads": { type: "string" },
      "fuse-uring": { type: "boolean" },
      "no-read-ahead": { type: "boolean" },
      reopen: { type: "string" },
      json: { type: "boolean", default: false },
    });
    const [verb, ...rest] = positionals;
    if (verb === undefined) throw new UsageError("ctl: expected a command: see tapd help ctl");
    const allowed = OPTIONS_OF[verb];
    if (allowed === undefined) {
      throw new UsageError(
        `ctl: unknown command "${verb}": expected one of ${Object.keys(OPTIONS_OF).join(", ")}`,
      );
    }
    for (const [name, value] of Object.entries(values)) {
      // --control goes with any command; --json (default false) is ignored where meaningless.
      if (name === "control" || name === "json") continue;
      if (value !== undefined && !allowed.includes(name)) {
        throw new UsageError(`ctl: ${verb} takes no --${name}`);
      }
    }
    const wanted = verb === "attach" || verb === "resume" ? 1 : verb === "list" ? 0 : 1;
    if (rest.length !== wanted) {
      throw new UsageError(
        `ctl: ${verb}: expected ${
          wanted === 0 ? "no arguments" : verb === "attach" ? "one disk spec" : "one disk ID"
        }`,
      );
    }
    let request: Record<string, unknown>;
    switch (verb) {
      case "attach": {
        if (values.passthrough && values.fuse === undefined) {
          throw new UsageError("ctl: attach: --passthrough is an option of --fuse PATH");
        }
        const ioThreads = parseIoThreads(values["io-threads"], values.fuse, "ctl: attach") ?? null;
        const uring = parseFuseUring(values["fuse-uring"], values.fuse, "ctl: attach");
        checkPassthroughAlone(values.passthrough, ioThreads, uring, "ctl: attach");
        request = {
          verb,
          spec: absoluteSpec(rest[0]),
          nbd: (values.nbd ?? []).map(absoluteAddress),
          ring: values.ring === undefined ? null : absoluteAddress(values.ring),
          fuse: values.fuse === undefined ? null : absolute(values.fuse),
          xen: values.xen ?? null,
          readOnly: values["read-only"] ?? false,
          pollMicros: parsePollMicros(values["poll-us"]) ?? 0,
          passthrough: values.passthrough ?? false,
          ioThreads,
          uring,
          readAhead: !values["no-read-ahead"],
        };
        break;
      }
      case "list":
        request = { verb };
        break;
      case "resume":
        request = {
          verb,
          id: diskId(rest[0], verb),
          reopen: values.reopen === undefined ? null : absoluteSpec(values.reopen),
        };
        break;
      default:
        request = { verb, id: diskId(rest[0], verb) };
    }
    const control = values.control ?? defaultControlSocket();
    const reply = await controlRequest(control, request);
    if (!reply.ok) throw new Error(`ctl: ${reply.error}`);
    if (reply.warning !== undefined) console.error(`tapd ctl: warning: ${reply.warning}`);
    console.log(render(verb, reply, values.json, request));
    return 0;
  },
};

function render(
  verb: string,
  reply: ControlReply & { ok: true },
  json: boolean,
  request: Record<string, unknown>,
): string {
  if (json) {
    if (verb === "list") return JSON.stringify(reply.disks ?? [], null, 2);
    if (verb === "stats") return JSON.stringify(reply.stats, null, 2);
    return JSON.stringify(reply.disk ?? { id: request.id }, null, 2);
  }
  switch (verb) {
    case "list":
      return diskTable(reply.disks ?? []);
    case "stats":
      return statsTable(reply.stats!);
    case "detach":
      return `disk ${request.id}: detached`;
    default:
      return describe(reply.disk!);
  }
}
