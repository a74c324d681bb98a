/**
 * The channel between the daemon and one `tapd tapdisk --control stdio` child: JSON lines,
 * commands on the child's stdin, replies and events on its stdout.
 *
 *   daemon → tapdisk   {"seq":3,"cmd":"pause"}  {"seq":4,"cmd":"resume","reopen":"tap:qcow:/o"}
 *                      {"seq":5,"cmd":"stats"}  {"seq":6,"cmd":"stop"}
 *   tapdisk → daemon   {"event":"ready","size":…,"exports":[…],"uris":[…]}   once serving
 *                      (ready, and a resume's reply, may carry "warning": see rawOverImage)
 *                      {"event":"error","error":"…"}                          could not start
 *                      {"event":"ended","export":"xen:3:xvdb","reason":"…"}   one export ended
 *                                                    on its own (the Xen guest is gone)
 *                      {"seq":3,"ok":true}  {"seq":5,"ok":true,"stats":{…}}  {"seq":4,"ok":false,"error":"…"}
 *                      {"seq":6,"ok":false,"error":"…","serving":true}   a stop that did not happen
 *                                                    (the FUSE file is in use): the disk serves on
 *
 * End of stdin means the daemon is gone: the child stops as on SIGTERM.
 */
import type { GateStats } from "../serve/gate.ts";

export const TAPDISK_COMMANDS = ["pause", "resume", "stats", "stop"] as const;
export type TapdiskCommandName = typeof TAPDISK_COMMANDS[number];

export interface TapdiskCommand {
  seq: number;
  cmd: TapdiskCommandName;
  /** resume only: the spec to continue on. */
  reopen?: string;
}

export interface ReadyEvent {
  event: "ready";
  size: number;
  /** ring:unix:PATH, unix:PATH, tcp:HOST:PORT (the bound port), fuse:PATH, xen:DOMID:VDEV. */
  exports: string[];
  uris: string[];
  /** Something the user should know about the spec (a raw spec over an image file). */
  warning?: string;
}

/** An export that ended while the disk goes on serving (its Xen guest was destroyed). */
export interface EndedEvent {
  event: "ended";
  export: string;
  reason: string;
}

export type TapdiskReply =
  | { seq: number; ok: true; stats?: GateStats; warning?: string }
  | {
    seq: number;
    ok: false;
    error: string;
    /** stop only: nothing was stopped, the disk is still served (its FUSE file is in use). */
    serving?: boolean;
  };

export type TapdiskMessage =
  | ReadyEvent
  | { event: "error"; error: string }
  | EndedEvent
  | TapdiskReply;

/** Parses a command line from the daemon; throws on anything else. */
export function parseTapdiskCommand(line: string): TapdiskCommand {
  const value = JSON.parse(line) as Partial<TapdiskCommand> | null;
  if (
    typeof value !== "object" || value === null || typeof value.seq !== "number" ||
    !(TAPDISK_COMMANDS as readonly unknown[]).includes(value.cmd) ||
    (value.reopen !== undefined && typeof value.reopen !== "string")
  ) {
    throw new Error(`bad command ${line.slice(0, 80)}`);
  }
  return value as TapdiskCommand;
}

/** Parses a line from a tapdisk child; throws on anything else. */
export function parseTapdiskMessage(line: string): TapdiskMessage {
  const value = JSON.parse(line) as Record<string, unknown> | null;
  if (typeof value !== "object" || value === null) throw new Error("not a JSON object");
  if (value.event === "ready" || value.event === "error") return value as TapdiskMessage;
  if (
    value.event === "ended" && typeof value.export === "string" && typeof value.reason === "string"
  ) {
    return value as unknown as EndedEvent;
  }
  if (typeof value.seq === "number" && typeof value.ok === "boolean") {
    return value as TapdiskMessage;
  }
  throw new Error(`unexpected message ${line.slice(0, 80)}`);
}
