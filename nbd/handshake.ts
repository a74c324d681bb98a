/**
 * The fixed-newstyle handshake (protocols.md §2–§5): greeting, client flags, then options until
 * the client picks the export with GO or EXPORT_NAME. Malformed options get the error reply the
 * protocol prescribes; only what cannot be answered (bad magic, bad client flags, absurd
 * lengths, an unknown EXPORT_NAME) ends the connection.
 */
import {
  BASE_ALLOCATION,
  BASE_ALLOCATION_ID,
  FLAG_FIXED_NEWSTYLE,
  FLAG_NO_ZEROES,
  IHAVEOPT,
  INFO,
  MAX_PAYLOAD,
  MAX_STRING,
  NBDMAGIC,
  OPT,
  PREFERRED_BLOCK,
  REP,
  REP_MAGIC,
  TX,
} from "./protocol.ts";
import type { SocketReader } from "./reader.ts";
import type { WritableConn } from "./reply_writer.ts";

/** What the handshake needs to know about the export. */
export interface ExportDescription {
  name: string;
  description: string;
  size: number;
  minimumBlock: number;
  readOnly: boolean;
}

/** What was negotiated, once the client is in transmission. */
export interface Negotiated {
  structuredReplies: boolean;
  /** base:allocation was selected for the chosen export. */
  blockStatus: boolean;
  flags: number;
}

/** Options without choosing an export before we hang up. */
const MAX_OPTIONS = 64;
/** Option data we read and reject; more than this ends the connection. */
const MAX_OPTION_DATA = 1024 * 1024;
/** Option data we parse. */
const MAX_PARSED_DATA = 64 * 1024;

const decoder = new TextDecoder("utf-8", { fatal: true });
const encoder = new TextEncoder();

class Refused extends Error {}

export function transmissionFlags(exp: ExportDescription, structured: boolean): number {
  let flags = TX.HAS_FLAGS | TX.SEND_FLUSH | TX.SEND_FUA | TX.SEND_CACHE | TX.CAN_MULTI_CONN;
  if (exp.readOnly) flags |= TX.READ_ONLY;
  else flags |= TX.SEND_TRIM | TX.SEND_WRITE_ZEROES | TX.SEND_FAST_ZERO;
  if (structured) flags |= TX.SEND_DF;
  return flags;
}

export async function handshake(
  reader: SocketReader,
  conn: WritableConn,
  exp: ExportDescription,
  isShuttingDown: () => boolean,
): Promise<Negotiated | null> {
  const send = async (bytes: Uint8Array): Promise<void> => {
    for (let done = 0; done < bytes.length;) done += await conn.write(bytes.subarray(done));
  };
  const greeting = new Uint8Array(18);
  const gv = new DataView(greeting.buffer);
  gv.setBigUint64(0, NBDMAGIC);
  gv.setBigUint64(8, IHAVEOPT);
  gv.setUint16(16, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
  await send(greeting);

  if (!await reader.fill(4)) return null;
  const clientFlags = reader.view.getUint32(reader.position);
  reader.take(4);
  if ((clientFlags & ~(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)) !== 0) return null;
  const fixed = (clientFlags & FLAG_FIXED_NEWSTYLE) !== 0;
  const noZeroes = (clientFlags & FLAG_NO_ZEROES) !== 0;

  let structured = false;
  /** The export name base:allocation was selected for, or null. */
  let contextFor: string | null = null;

  const reply = (option: number, type: number, data?: Uint8Array): Promise<void> => {
    const msg = new Uint8Array(20 + (data?.length ?? 0));
    const v = new DataView(msg.buffer);
    v.setBigUint64(0, REP_MAGIC);
    v.setUint32(8, option);
    v.setUint32(12, type);
    v.setUint32(16, data?.length ?? 0);
    if (data !== undefined) msg.set(data, 20);
    return send(msg);
  };
  const fail = (option: number, type: number, message: string): Promise<void> =>
    reply(option, type, encoder.encode(message));
  const info = (option: number, type: number, body: (v: DataView) => void, size: number) => {
    const data = new Uint8Array(2 + size);
    const v = new DataView(data.buffer);
    v.setUint16(0, type);
    body(v);
    return reply(option, REP.INFO, data);
  };
  const known = (name: string): boolean => name === "" || name === exp.name;

  for (let count = 0; count < MAX_OPTIONS; count++) {
    if (!await reader.fill(16)) return null;
    const hv = reader.view, at = reader.position;
    if (hv.getBigUint64(at) !== IHAVEOPT) return null;
    const option = hv.getUint32(at + 8);
    const length = hv.getUint32(at + 12);
    reader.take(16);
    if (length > MAX_OPTION_DATA) return null;
    if (length > MAX_PARSED_DATA) {
      if (!await reader.skip(length)) return null;
      if (option === OPT.EXPORT_NAME) return null;
      await fail(option, REP.ERR_TOO_BIG, "option data too large");
      continue;
    }
    if (!await reader.fill(length)) return null;
    const data = reader.take(length).slice();
    const dv = new DataView(data.buffer);

    if (isShuttingDown()) {
      if (option === OPT.EXPORT_NAME) return null;
      await fail(option, REP.ERR_SHUTDOWN, "server is shutting down");
      continue;
    }
    if (!fixed && option !== OPT.EXPORT_NAME) {
      await fail(option, REP.ERR_INVALID, "fixed newstyle required for this option");
      continue;
    }
    try {
      switch (option) {
        case OPT.EXPORT_NAME: {
          const name = parseString(data, 0, data.length);
          if (name === null || !known(name)) return null;
          const flags = transmissionFlags(exp, structured);
          const msg = new Uint8Array(noZeroes ? 10 : 134);
          const v = new DataView(msg.buffer);
          v.setBigUint64(0, BigInt(exp.size));
          v.setUint16(8, flags);
          await send(msg);
          return { structuredReplies: structured, blockStatus: contextFor !== null, flags };
        }
        case OPT.ABORT:
          try {
            await reply(option, REP.ACK);
          } catch { /* the client may close first */ }
          return null;
        case OPT.LIST: {
          if (length !== 0) throw new Refused("LIST takes no data");
          const name = encoder.encode(exp.name);
          const desc = encoder.encode(exp.description);
          const body = new Uint8Array(4 + name.length + desc.length);
          new DataView(body.buffer).setUint32(0, name.length);
          body.set(name, 4);
          body.set(desc, 4 + name.length);
          await reply(option, REP.SERVER, body);
          await reply(option, REP.ACK);
          break;
        }
        case OPT.STRUCTURED_REPLY:
          if (length !== 0) throw new Refused("STRUCTURED_REPLY takes no data");
          structured = true;
          await reply(option, REP.ACK);
          break;
        case OPT.INFO:
        case OPT.GO: {
          if (length < 6) throw new Refused("INFO/GO data too short");
          const nameLength = dv.getUint32(0);
          if (nameLength > length - 6) throw new Refused("export name overruns the option");
          const name = parseString(data, 4, nameLength);
          if (name === null) throw new Refused("invalid export name");
          const requests = dv.getUint16(4 + nameLength);
          if (length !== 6 + nameLength + 2 * requests) {
            throw new Refused("INFO/GO length does not match its info requests");
          }
          if (!known(name)) {
            await fail(option, REP.ERR_UNKNOWN, `no export named "${name}"`);
            break;
          }
          const wanted = new Set<number>();
          for (let i = 0; i < requests; i++) wanted.add(dv.getUint16(6 + nameLength + 2 * i));
          const flags = transmissionFlags(exp, structured);
          await info(option, INFO.EXPORT, (v) => {
            v.setBigUint64(2, BigInt(exp.size));
            v.setUint16(10, flags);
          }, 10);
          if (wanted.has(INFO.BLOCK_SIZE)) {
            await info(option, INFO.BLOCK_SIZE, (v) => {
              v.setUint32(2, exp.minimumBlock);
              v.setUint32(6, Math.max(PREFERRED_BLOCK, exp.minimumBlock));
              v.setUint32(10, MAX_PAYLOAD);
            }, 12);
          }
          if (wanted.has(INFO.NAME)) {
            const n = encoder.encode(exp.name);
            await info(option, INFO.NAME, (v) => new Uint8Array(v.buffer).set(n, 2), n.length);
          }
          if (wanted.has(INFO.DESCRIPTION)) {
            const d = encoder.encode(exp.description);
            await info(
              option,
              INFO.DESCRIPTION,
              (v) => new Uint8Array(v.buffer).set(d, 2),
              d.length,
            );
          }
          await reply(option, REP.ACK);
          if (option === OPT.GO) {
            return {
              structuredReplies: structured,
              blockStatus: contextFor !== null && known(contextFor),
              flags,
            };
          }
          break;
        }
        case OPT.LIST_META_CONTEXT:
        case OPT.SET_META_CONTEXT: {
          const query = parseContextQuery(data);
          if (query === null) throw new Refused("malformed meta context request");
          const set = option === OPT.SET_META_CONTEXT;
          if (set && !structured) throw new Refused("structured replies must be negotiated first");
          if (!known(query.name)) {
            await fail(option, REP.ERR_UNKNOWN, `no export named "${query.name}"`);
            break;
          }
          if (set) contextFor = null;
          const matches = set
            ? query.queries.some((q) => q === BASE_ALLOCATION)
            : query.queries.length === 0 ||
              query.queries.some((q) => q === BASE_ALLOCATION || q === "base:");
          if (matches) {
            const ctx = encoder.encode(BASE_ALLOCATION);
            const body = new Uint8Array(4 + ctx.length);
            new DataView(body.buffer).setUint32(0, set ? BASE_ALLOCATION_ID : 0);
            body.set(ctx, 4);
            await reply(option, REP.META_CONTEXT, body);
            if (set) contextFor = query.name;
          }
          await reply(option, REP.ACK);
          break;
        }
        case OPT.STARTTLS:
          if (length !== 0) throw new Refused("STARTTLS takes no data");
          await fail(option, REP.ERR_POLICY, "TLS is not enabled on this server");
          break;
        default:
          await fail(option, REP.ERR_UNSUP, `option ${option} is not supported`);
      }
    } catch (e) {
      if (!(e instanceof Refused)) throw e;
      if (option === OPT.EXPORT_NAME) return null;
      await fail(option, REP.ERR_INVALID, e.message);
    }
  }
  return null; // too many options without choosing an export
}

/** A UTF-8 string without NUL, at most MAX_STRING bytes; null if it is not one. */
function parseString(data: Uint8Array, at: number, length: number): string | null {
  if (length > MAX_STRING || at + length > data.length) return null;
  const bytes = data.subarray(at, at + length);
  if (bytes.includes(0)) return null;
  try {
    return decoder.decode(bytes);
  } catch {
    return null;
  }
}

function parseContextQuery(data: Uint8Array): { name: string; queries: string[] } | null {
  if (data.length < 8) return null;
  const v = new DataView(data.buffer, data.byteOffset, data.length);
  const nameLength = v.getUint32(0);
  if (nameLength > data.length - 8) return null;
  const name = parseString(data, 4, nameLength);
  if (name === null) return null;
  const count = v.getUint32(4 + nameLength);
  let at = 8 + nameLength;
  const queries: string[] = [];
  for (let i = 0; i < count; i++) {
    if (at + 4 > data.length) return null;
    const length = v.getUint32(at);
    if (length > data.length - at - 4) return null;
    const q = parseString(data, at + 4, length);
    if (q === null) return null;
    queries.push(q);
    at += 4 + length;
  }
  return at === data.length ? { name, queries } : null;
}
