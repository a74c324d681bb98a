/**
 * Raw NBD against `tapd serve`, byte by byte (shared/specs/protocols.md Part 1): hand-written
 * checks of the replies that matter (greeting, option errors, INFO/GO, EXPORT_NAME, structured and
 * simple errors, read-only, block status, multi-conn), then seeded fuzzing of the handshake and of
 * transmission (malformed options and requests of every kind; every connection must end with a
 * proper error reply or a clean close in time, the data read back must match a shadow of the
 * disk), a client that pipelines 32 MiB reads without reading the replies, and finally: the
 * server is alive, serves a well-behaved client, and its RSS stayed bounded.
 *
 * A failing fuzz case names its seed: TAPD_NBD_FUZZ_SEED=N reruns from it.
 */
import assert from "node:assert/strict";
import { assertBytes, type Rng, rng, withTempDir } from "../util.ts";
import {
  be,
  CHUNK,
  CMD,
  CMD_FLAG,
  Eof,
  ERR,
  FLAG,
  goData,
  GREETING,
  hex,
  IHAVEOPT,
  INFO,
  KiB,
  metaData,
  MiB,
  OPT,
  option,
  type OptionReply,
  type Outcome,
  OutcomeBuilder,
  RawConn,
  REFERENCE_SERVER,
  REP,
  REPLY_FLAG_DONE,
  type Request,
  request,
  run,
  Serve,
  type Session,
  sparseImage,
} from "./helpers.ts";

const dec = new TextDecoder();
const enc = new TextEncoder();
const NAME = "disk";
const SIZE = 40 * MiB; // above the 32 MiB maximum payload, so maximal reads fit
const DATA_END = 1 * MiB; // [0, 1 MiB) random data, then sparse (a piece at 24 MiB)
const RSS_LIMIT_KIB = 600 * 1024;
const SEED = Number(Deno.env.get("TAPD_NBD_FUZZ_SEED") ?? 20261126);
const HANDSHAKE_CONNECTIONS = Number(Deno.env.get("TAPD_NBD_FUZZ_HANDSHAKES") ?? 2500);
const TRANSMISSION_CONNECTIONS = Number(Deno.env.get("TAPD_NBD_FUZZ_SESSIONS") ?? 250);

/** The test image: data at the start and at 24 MiB, holes elsewhere; returns its contents. */
function makeImage(path: string, seed: number): Uint8Array {
  const r = rng(seed);
  const contents = new Uint8Array(SIZE);
  r.fill(contents.subarray(0, DATA_END));
  r.fill(contents.subarray(24 * MiB, 24 * MiB + 64 * KiB));
  sparseImage(path, SIZE, [
    [0, contents.subarray(0, DATA_END)],
    [24 * MiB, contents.subarray(24 * MiB, 24 * MiB + 64 * KiB)],
  ]);
  return contents;
}

async function withServer(
  readOnly: boolean,
  fn: (s: Serve, contents: Uint8Array) => Promise<void>,
): Promise<void> {
  await withTempDir(async (dir) => {
    const img = `${dir}/d.img`;
    const contents = makeImage(img, 7);
    const s = await Serve.start(`tap:aio:${img}`, {
      unix: `${dir}/s.sock`,
      exportName: NAME,
      readOnly,
    });
    try {
      await fn(s, contents);
      assert.ok(s.alive, `tapd serve died:\n${s.stderr}`);
    } catch (e) {
      await s.kill();
      throw new Error(
        `${e instanceof Error ? e.stack : e}\n--- tapd serve stderr ---\n${s.stderr}`,
      );
    }
    const r = await s.stop();
    assert.equal(r.code, 0, `exit ${r.code} after SIGTERM:\n${r.stderr}`);
  });
}

/** A connection that has done the handshake (GO on NAME). */
async function session(
  s: Serve,
  options: Parameters<RawConn["negotiate"]>[0] = {},
): Promise<{ c: RawConn; info: Session }> {
  const c = await RawConn.unix(s.socket);
  try {
    return { c, info: await c.negotiate({ name: NAME, ...options }) };
  } catch (e) {
    c.close();
    throw e;
  }
}

/** Runs `fn` with a deadline (the connection is closed after it, or at the deadline). */
function within<T>(c: RawConn, ms: number, fn: (c: RawConn) => Promise<T>): Promise<T> {
  return c.within(ms, "connection", fn);
}

/** Reads until EOF and fails if anything came (the server must just close). */
async function expectSilentClose(c: RawConn, what: string): Promise<void> {
  const rest = await c.readToEof();
  assert.equal(rest.length, 0, `${what}: expected a close, got ${hex(rest.subarray(0, 64))}`);
}

let cookies = 1n;
function req(type: number, offset: number | bigint, length: number, flags = 0): Request {
  return { type, offset, length, flags, cookie: cookies++ };
}

function isError(r: OptionReply): boolean {
  return r.type >= 0x80000000;
}

function u32at(b: Uint8Array, at: number): number {
  return new DataView(b.buffer, b.byteOffset).getUint32(at);
}

// =============================================================================================
// Byte-exact checks

Deno.test("NBD byte-exact: handshake replies", () =>
  withServer(false, async (s) => {
    const sock = s.socket;

    // The greeting, then nothing until the client speaks.
    {
      const c = await RawConn.unix(sock, true);
      await within(c, 5000, async () => {
        assert.equal(hex(await c.read(18)), hex(GREETING));
        // Client flags with a bit the server did not advertise → close, no reply.
        await c.write(be().u32(0x7).build());
        await expectSilentClose(c, "client flags 0x7");
      });
    }

    // Unknown option → ERR_UNSUP (data skipped), and the next option is still parsed.
    {
      const c = await RawConn.unix(sock);
      await within(c, 5000, async () => {
        await c.greeting();
        await c.write(be().u32(3).build());
        await c.write(option(0x1234, enc.encode("hello")));
        const [r] = await c.optionReplies(0x1234);
        assert.equal(r.option, 0x1234);
        assert.equal(r.type, REP.ERR_UNSUP, `unknown option → ${r.type.toString(16)}`);
        for (const code of [OPT.PEEK_EXPORT, OPT.EXTENDED_HEADERS, 0, 0x7fffffff]) {
          await c.write(option(code, new Uint8Array(3)));
          const [u] = await c.optionReplies(code);
          assert.equal(u.type, REP.ERR_UNSUP, `option ${code} → ${u.type.toString(16)}`);
        }
        // STARTTLS on a server without TLS: ERR_POLICY or ERR_UNSUP, never TLS_REQD.
        await c.write(option(OPT.STARTTLS));
        const [t] = await c.optionReplies(OPT.STARTTLS);
        assert.ok(
          ([REP.ERR_UNSUP, REP.ERR_POLICY] as number[]).includes(t.type),
          `STARTTLS → ${t.type}`,
        );
        // LIST: one REP_SERVER naming the export, then ACK.
        await c.write(option(OPT.LIST));
        const list = await c.optionReplies(OPT.LIST);
        assert.deepEqual(list.map((x) => x.type), [REP.SERVER, REP.ACK]);
        const len = u32at(list[0].data, 0);
        // (nbdkit's file plugin lists "" whatever -e says)
        if (!REFERENCE_SERVER) assert.equal(dec.decode(list[0].data.subarray(4, 4 + len)), NAME);
        // LIST with data → ERR_INVALID.
        await c.write(option(OPT.LIST, new Uint8Array(4)));
        const [li] = await c.optionReplies(OPT.LIST);
        assert.equal(li.type, REP.ERR_INVALID, `LIST with data → ${li.type.toString(16)}`);
        // SET_META_CONTEXT before STRUCTURED_REPLY → ERR_INVALID.
        await c.write(option(OPT.SET_META_CONTEXT, metaData(NAME, ["base:allocation"])));
        const [early] = await c.optionReplies(OPT.SET_META_CONTEXT);
        assert.equal(early.type, REP.ERR_INVALID, `SET before SR → ${early.type.toString(16)}`);
        // STRUCTURED_REPLY with data → ERR_INVALID; without → ACK.
        await c.write(option(OPT.STRUCTURED_REPLY, new Uint8Array(1)));
        const [sri] = await c.optionReplies(OPT.STRUCTURED_REPLY);
        assert.equal(sri.type, REP.ERR_INVALID);
        await c.write(option(OPT.STRUCTURED_REPLY));
        assert.deepEqual((await c.optionReplies(OPT.STRUCTURED_REPLY)).map((x) => x.type), [
          REP.ACK,
        ]);
        // An option header with a bad magic → close without a reply.
        await c.write(be().u64(IHAVEOPT + 1n).u32(OPT.LIST).u32(0).build());
        await expectSilentClose(c, "bad option magic");
      });
    }

    // INFO and GO: errors first, then the export's information.
    {
      const c = await RawConn.unix(sock);
      await within(c, 5000, async () => {
        await c.greeting();
        await c.write(be().u32(3).build());
        if (REFERENCE_SERVER) return; // nbdkit's file plugin serves any export name
        await c.write(option(OPT.GO, goData("nope", [INFO.BLOCK_SIZE])));
        const unknown = await c.optionReplies(OPT.GO);
        assert.deepEqual(unknown.map((x) => x.type), [REP.ERR_UNKNOWN], "GO unknown export");
        await c.write(option(OPT.INFO, goData("nope")));
        assert.deepEqual((await c.optionReplies(OPT.INFO)).map((x) => x.type), [
          REP.ERR_UNKNOWN,
        ]);
        // Malformed INFO/GO data → ERR_INVALID, and the handshake goes on.
        const malformed: [string, Uint8Array][] = [
          ["5 bytes", new Uint8Array(5)],
          ["name length past the data", be().u32(100).str("disk").u16(0).build()],
          ["one byte too many", be().lstr(NAME).u16(0).u8(0).build()],
          ["info count past the data", be().lstr(NAME).u16(3).u16(3).build()],
          ["NUL in the name", be().lstr("di\0sk").u16(0).build()],
          ["4097-byte name", be().lstr("x".repeat(4097)).u16(0).build()],
        ];
        for (const [what, data] of malformed) {
          for (const code of [OPT.INFO, OPT.GO]) {
            await c.write(option(code, data));
            const replies = await c.optionReplies(code);
            assert.equal(replies.length, 1, `${what}: ${replies.length} replies`);
            assert.equal(
              replies[0].type,
              REP.ERR_INVALID,
              `${code === OPT.GO ? "GO" : "INFO"} with ${what} → ${replies[0].type.toString(16)}`,
            );
          }
        }
        // INFO asking for everything (and an unknown info code): EXPORT, BLOCK_SIZE, NAME, ACK.
        await c.write(option(OPT.INFO, goData(NAME, [INFO.NAME, INFO.BLOCK_SIZE, 0x7777])));
        const info = await c.optionReplies(OPT.INFO);
        assert.equal(info.at(-1)!.type, REP.ACK);
        const items = new Map(
          info.slice(0, -1).map((r) => {
            assert.equal(r.type, REP.INFO);
            return [new DataView(r.data.buffer).getUint16(0), r.data] as const;
          }),
        );
        const exp = items.get(INFO.EXPORT);
        assert.ok(exp, "INFO without NBD_INFO_EXPORT");
        assert.equal(exp.length, 12);
        const v = new DataView(exp.buffer);
        assert.equal(Number(v.getBigUint64(2)), SIZE);
        const flags = v.getUint16(10);
        const want = FLAG.HAS_FLAGS | FLAG.SEND_FLUSH | FLAG.SEND_FUA | FLAG.SEND_TRIM |
          FLAG.SEND_WRITE_ZEROES | FLAG.CAN_MULTI_CONN | FLAG.SEND_CACHE;
        assert.equal(
          flags & want,
          want,
          `flags 0x${flags.toString(16)} lack some of 0x${want.toString(16)}`,
        );
        assert.equal(flags & FLAG.READ_ONLY, 0);
        assert.equal(flags & FLAG.SEND_DF, 0, "SEND_DF without structured replies");
        assert.equal(flags & FLAG.SEND_RESIZE, 0);
        if (!REFERENCE_SERVER) {
          assert.equal(
            hex(items.get(INFO.BLOCK_SIZE) ?? new Uint8Array()),
            "0003" + "00000200" + "00001000" + "02000000",
          );
        }
        const name = items.get(INFO.NAME);
        if (name) assert.equal(dec.decode(name.subarray(2)), NAME);
        // GO with no info requests: NBD_INFO_EXPORT anyway, then ACK, then transmission.
        await c.write(option(OPT.GO, goData("")));
        const go = await c.optionReplies(OPT.GO);
        assert.equal(go.at(-1)!.type, REP.ACK);
        const e = go.find((r) => r.type === REP.INFO && r.data[0] === 0 && r.data[1] === 0);
        assert.ok(e, "GO without NBD_INFO_EXPORT");
        assert.equal(
          hex(e.data),
          "0000" + SIZE.toString(16).padStart(16, "0") + flags.toString(16).padStart(4, "0"),
        );
        // In transmission: a simple reply to FLUSH (no structured replies negotiated).
        const r = req(CMD.FLUSH, 0, 0);
        await c.send(r);
        assert.equal(
          hex(await c.read(16)),
          "67446698" + "00000000" + r.cookie.toString(16).padStart(16, "0"),
        );
      });
    }

    // Metadata contexts.
    {
      const c = await RawConn.unix(sock);
      await within(c, 5000, async () => {
        await c.greeting();
        await c.write(be().u32(3).build());
        await c.sendOption(OPT.STRUCTURED_REPLY);
        await c.optionReplies(OPT.STRUCTURED_REPLY);
        for (
          const [queries, expected] of [
            [[], ["base:allocation"]],
            [["base:"], ["base:allocation"]],
            [["base:allocation"], ["base:allocation"]],
            [["qemu:"], []],
            [["qemu:dirty-bitmap:x", "nope:x"], []],
          ] as [string[], string[]][]
        ) {
          await c.sendOption(OPT.LIST_META_CONTEXT, metaData(NAME, queries));
          const replies = await c.optionReplies(OPT.LIST_META_CONTEXT);
          assert.equal(replies.at(-1)!.type, REP.ACK, `LIST_META_CONTEXT ${queries}`);
          assert.deepEqual(
            replies.slice(0, -1).map((r) => dec.decode(r.data.subarray(4))),
            expected,
            `LIST_META_CONTEXT ${JSON.stringify(queries)}`,
          );
        }
        // SET: only base:allocation comes back, once, with a non-zero id (QEMU's rule).
        await c.sendOption(
          OPT.SET_META_CONTEXT,
          metaData(NAME, ["qemu:dirty-bitmap:x", "base:allocation"]),
        );
        const set = await c.optionReplies(OPT.SET_META_CONTEXT);
        assert.deepEqual(set.map((r) => r.type), [REP.META_CONTEXT, REP.ACK]);
        assert.equal(dec.decode(set[0].data.subarray(4)), "base:allocation");
        assert.notEqual(u32at(set[0].data, 0), 0);
        // Query length running past the data → ERR_INVALID.
        const bad = be().lstr(NAME).u32(1).u32(200).str("base:allocation").build();
        await c.sendOption(OPT.SET_META_CONTEXT, bad);
        const [inv] = await c.optionReplies(OPT.SET_META_CONTEXT);
        assert.equal(inv.type, REP.ERR_INVALID, `query overrun → ${inv.type.toString(16)}`);
        // ABORT → ACK, then close.
        await c.sendOption(OPT.ABORT);
        const [ack] = await c.optionReplies(OPT.ABORT);
        assert.equal(ack.type, REP.ACK);
        await expectSilentClose(c, "after ABORT");
      });
    }

    // EXPORT_NAME: unknown → close; known → size and flags, then 124 zeros unless NO_ZEROES.
    if (!REFERENCE_SERVER) {
      const c = await RawConn.unix(sock);
      await within(c, 5000, async () => {
        await c.greeting();
        await c.write(be().u32(3).build());
        await c.sendOption(OPT.EXPORT_NAME, enc.encode("nope"));
        await expectSilentClose(c, "EXPORT_NAME of an unknown export");
      });
    }
    for (const clientFlags of [1, 3]) {
      const c = await RawConn.unix(sock);
      await within(c, 5000, async () => {
        await c.greeting();
        await c.write(be().u32(clientFlags).build());
        await c.sendOption(OPT.EXPORT_NAME, enc.encode(NAME));
        const reply = await c.read(10);
        assert.equal(hex(reply.subarray(0, 8)), SIZE.toString(16).padStart(16, "0"));
        const flags = new DataView(reply.buffer).getUint16(8);
        assert.ok(flags & FLAG.HAS_FLAGS && flags & FLAG.CAN_MULTI_CONN, `flags ${flags}`);
        if (clientFlags === 1) assert.equal(hex(await c.read(124)), "00".repeat(124));
        // The next bytes are the reply to a READ: nothing else was sent.
        const r = req(CMD.READ, 0, 512);
        await c.send(r);
        const head = await c.read(16);
        assert.equal(hex(head), "67446698" + "00000000" + r.cookie.toString(16).padStart(16, "0"));
        await c.skip(512);
        await c.send(req(CMD.DISC, 0, 0));
        await expectSilentClose(c, "after DISC");
      });
    }
  }));

Deno.test("NBD byte-exact: transmission replies and errors", () =>
  withServer(false, async (s, contents) => {
    // Structured replies with base:allocation.
    const { c, info } = await session(s);
    await within(c, 20_000, async () => {
      assert.equal(info.size, SIZE);
      if (!REFERENCE_SERVER) {
        assert.deepEqual(info.blockSize, { min: 512, pref: 4096, max: 32 * MiB });
      }
      assert.ok(info.contextId);

      // A 4 KiB READ of data, byte by byte (§15): one OFFSET_DATA chunk with DONE.
      if (!REFERENCE_SERVER) {
        const r4 = req(CMD.READ, 0, 4096);
        await c.send(r4);
        const ck = r4.cookie.toString(16).padStart(16, "0");
        assert.equal(
          hex(await c.read(28)),
          "668e33ef" + "0001" + "0001" + ck + "00001008" + "0".repeat(16),
        );
        assertBytes(await c.read(4096), contents.subarray(0, 4096), "READ 0+4096");
      }
      // READ of data: chunks covering the range, the bytes of the image.
      const rd = await c.command(req(CMD.READ, 4096, 64 * KiB));
      assert.equal(rd.error, 0);
      assert.ok(!rd.shape.includes("simple"), "simple reply to a READ with structured replies");
      assertBytes(rd.data!, contents.subarray(4096, 4096 + 64 * KiB), "READ 4096+64K");
      // READ of a hole: zeros, sent as OFFSET_HOLE.
      const hole = await c.command(req(CMD.READ, 8 * MiB, 1 * MiB));
      assert.equal(hole.error, 0);
      assertBytes(hole.data!, new Uint8Array(1 * MiB), "READ of a hole");
      if (!REFERENCE_SERVER) assert.ok(hole.shape.includes("hole"), `hole read as ${hole.shape}`);
      // Across data and hole.
      const mixed = await c.command(req(CMD.READ, DATA_END - 64 * KiB, 128 * KiB));
      assertBytes(
        mixed.data!,
        contents.subarray(DATA_END - 64 * KiB, DATA_END + 64 * KiB),
        "mixed",
      );
      // A maximal READ (32 MiB).
      const big = await c.command(req(CMD.READ, 0, 32 * MiB));
      assert.equal(big.error, 0, "32 MiB READ");
      assertBytes(big.data!, contents.subarray(0, 32 * MiB), "32 MiB READ");
      // Zero-length READ: success (or EINVAL, as nbdkit does), not a disconnect.
      const zero = await c.command(req(CMD.READ, 0, 0));
      assert.ok(zero.error === 0 || zero.error === ERR.EINVAL, `zero-length READ → ${zero.error}`);

      // READ past the end → one error chunk, EINVAL, DONE.
      const past = req(CMD.READ, SIZE - 512, 1024);
      const pe = await c.command(past);
      assert.equal(pe.error, ERR.EINVAL, `READ past the end → ${pe.error}`);
      assert.deepEqual(pe.shape, ["error"]);
      const chunk = pe.replies[0];
      assert.ok(chunk.kind === "chunk" && chunk.flags === REPLY_FLAG_DONE);
      assert.ok(chunk.type === CHUNK.ERROR || chunk.type === CHUNK.ERROR_OFFSET);
      // Misaligned READ → EINVAL (nbdkit advertises no minimum block: no such thing there).
      const misaligned = REFERENCE_SERVER ? 0 : ERR.EINVAL;
      assert.equal((await c.command(req(CMD.READ, 1, 512))).error, misaligned, "offset 1");
      assert.equal((await c.command(req(CMD.READ, 0, 100))).error, misaligned, "length 100");
      // READ longer than 32 MiB → an error (not a crash, not a huge allocation).
      const huge = await c.command(req(CMD.READ, 0, 0xffffffff));
      assert.ok(
        ([ERR.EINVAL, ERR.ENOMEM, ERR.EOVERFLOW] as number[]).includes(huge.error),
        `4 GiB READ → ${huge.error}`,
      );

      // WRITE past the end → ENOSPC, payload consumed (the next request is parsed).
      const w = await c.command(req(CMD.WRITE, SIZE - 512, 4096), new Uint8Array(4096).fill(9));
      assert.equal(w.error, ERR.ENOSPC, `WRITE past the end → ${w.error}`);
      const w2 = await c.command(req(CMD.WRITE, SIZE, 512), new Uint8Array(512).fill(9));
      assert.equal(w2.error, ERR.ENOSPC, `WRITE at the end → ${w2.error}`);
      // Misaligned WRITE → EINVAL, payload consumed.
      if (!REFERENCE_SERVER) {
        const w3 = await c.command(req(CMD.WRITE, 0, 100), new Uint8Array(100).fill(9));
        assert.equal(w3.error, ERR.EINVAL, `WRITE of 100 bytes → ${w3.error}`);
        const w4 = await c.command(req(CMD.WRITE, 256, 512), new Uint8Array(512).fill(9));
        assert.equal(w4.error, ERR.EINVAL, `WRITE at 256 → ${w4.error}`);
      }
      // Nothing of those reached the disk.
      const tail = await c.command(req(CMD.READ, SIZE - 512, 512));
      assertBytes(tail.data!, new Uint8Array(512), "last sector after refused writes");
      const head = await c.command(req(CMD.READ, 0, 1024));
      assertBytes(head.data!, contents.subarray(0, 1024), "first sectors after refused writes");
      // WRITE_ZEROES past the end → ENOSPC; TRIM/CACHE past the end → EINVAL.
      assert.equal(
        (await c.command(req(CMD.WRITE_ZEROES, SIZE, 512))).error,
        ERR.ENOSPC,
        "WZ past end",
      );
      assert.equal(
        (await c.command(req(CMD.TRIM, SIZE - 512, 1024))).error,
        ERR.EINVAL,
        "TRIM past end",
      );
      assert.equal(
        (await c.command(req(CMD.CACHE, SIZE, 512))).error,
        ERR.EINVAL,
        "CACHE past end",
      );
      if (!REFERENCE_SERVER) {
        const t = await c.command(req(CMD.TRIM, 100, 512));
        assert.equal(t.error, ERR.EINVAL, "TRIM misaligned");
      }
      // Offset + length overflowing 64 bits.
      const ov = await c.command(req(CMD.READ, 0xfffffffffffffe00n, 1024));
      assert.equal(ov.error, ERR.EINVAL, `READ at 2^64-512 → ${ov.error}`);

      // FLUSH with a length → EINVAL; plain FLUSH → success.
      assert.equal((await c.command(req(CMD.FLUSH, 0, 512))).error, ERR.EINVAL, "FLUSH length 512");
      assert.equal((await c.command(req(CMD.FLUSH, 0, 0))).error, 0, "FLUSH");
      // Unknown command and unknown flag → EINVAL, and the connection goes on.
      assert.equal((await c.command(req(9, 0, 512))).error, ERR.EINVAL, "command 9");
      assert.equal((await c.command(req(0xffff, 0, 0))).error, ERR.EINVAL, "command 0xffff");
      assert.equal(
        (await c.command(req(CMD.READ, 0, 512, 0x80))).error,
        ERR.EINVAL,
        "READ flag 0x80",
      );
      assert.equal(
        (await c.command(req(CMD.FLUSH, 0, 0, 0x8000))).error,
        ERR.EINVAL,
        "flag 0x8000",
      );

      // WRITE with FUA, WRITE_ZEROES (NO_HOLE, FAST_ZERO), TRIM, CACHE.
      const data = rng(3).fill(new Uint8Array(128 * KiB));
      assert.equal(
        (await c.command(req(CMD.WRITE, 4 * MiB, data.length, CMD_FLAG.FUA), data)).error,
        0,
      );
      assertBytes((await c.command(req(CMD.READ, 4 * MiB, data.length))).data!, data, "FUA write");
      assert.equal(
        (await c.command(req(CMD.WRITE_ZEROES, 4 * MiB, 8192, CMD_FLAG.NO_HOLE))).error,
        0,
      );
      const fz = await c.command(req(CMD.WRITE_ZEROES, 4 * MiB + 8192, 8192, fastZero(info)));
      assert.ok(fz.error === 0 || fz.error === ERR.ENOTSUP, `FAST_ZERO → ${fz.error}`);
      const zeroed = (await c.command(req(CMD.READ, 4 * MiB, 16 * KiB))).data!;
      assertBytes(zeroed.subarray(0, 8192), new Uint8Array(8192), "WRITE_ZEROES NO_HOLE");
      if (fz.error === 0) assertBytes(zeroed.subarray(8192), new Uint8Array(8192), "FAST_ZERO");
      else {assertBytes(
          zeroed.subarray(8192),
          data.subarray(8192, 16384),
          "failed FAST_ZERO changed data",
        );}
      // WRITE_ZEROES of 4 GiB − 512 in range? No: past the end → ENOSPC without allocating.
      assert.equal((await c.command(req(CMD.WRITE_ZEROES, 0, 0xfffffe00))).error, ERR.ENOSPC);
      assert.equal((await c.command(req(CMD.TRIM, 4 * MiB + 64 * KiB, 64 * KiB))).error, 0, "TRIM");
      assert.equal((await c.command(req(CMD.CACHE, 0, 1 * MiB))).error, 0, "CACHE");

      // BLOCK_STATUS with REQ_ONE: one extent ≤ length, the SET context id.
      const one = await c.command(req(CMD.BLOCK_STATUS, 0, SIZE, CMD_FLAG.REQ_ONE));
      assert.equal(one.error, 0);
      assert.deepEqual(one.shape, ["status"], "REQ_ONE: one BLOCK_STATUS chunk with DONE");
      const st = one.replies[0];
      assert.ok(st.kind === "chunk" && st.flags === REPLY_FLAG_DONE && st.payload.length === 12);
      assert.deepEqual([...one.extents!.keys()], [info.contextId]);
      const [ext] = [one.extents!.get(info.contextId!)!];
      assert.equal(ext.length, 1, `REQ_ONE: ${ext.length} extents`);
      assert.ok(ext[0][0] <= SIZE && ext[0][0] > 0);
      assert.equal(ext[0][1] & 2, 0, "data reported as zero");
      if (!REFERENCE_SERVER) {
        assert.ok(ext[0][0] <= DATA_END, `first extent ${ext[0][0]} runs into the hole`);
      }
      const h = await c.command(req(CMD.BLOCK_STATUS, 8 * MiB, 4096, CMD_FLAG.REQ_ONE));
      const [[hl, hf]] = h.extents!.get(info.contextId!)!;
      assert.ok(hl <= 4096);
      if (!REFERENCE_SERVER) assert.equal(hf, 3, `hole reported as ${hf}`);
      // Without REQ_ONE: extents from the offset, the first N−1 inside the range.
      const all = await c.command(req(CMD.BLOCK_STATUS, 0, SIZE));
      const list = all.extents!.get(info.contextId!)!;
      const sum = list.slice(0, -1).reduce((a, [l]) => a + l, 0);
      assert.ok(sum < SIZE, "extents past the range");
      if (!REFERENCE_SERVER) {
        // Data at 0 and at 24 MiB, a hole at 20 MiB (where the reply got that far).
        const zeroAt = (off: number) => {
          let a = 0;
          for (const [l, f] of list) {
            if (off < a + l) return (f & 2) !== 0;
            a += l;
          }
          return undefined;
        };
        assert.equal(zeroAt(0), false);
        for (const [off, zero] of [[20 * MiB, true], [24 * MiB, false]] as const) {
          const z = zeroAt(off);
          if (z !== undefined) assert.equal(z, zero, `extent at ${off}`);
        }
      }
      // BLOCK_STATUS past the end → EINVAL (§10), also when only the length runs past it.
      assert.equal((await c.command(req(CMD.BLOCK_STATUS, SIZE, 512))).error, ERR.EINVAL);
      const runs = await c.command(req(CMD.BLOCK_STATUS, SIZE - 4096, 8192));
      assert.equal(runs.error, ERR.EINVAL, `BLOCK_STATUS ${SIZE - 4096}+8192 → ${runs.error}`);

      // Pipelining: 64 requests at once, each answered once.
      const pending = new Map<bigint, OutcomeBuilder>();
      const batch: Uint8Array[] = [];
      for (let i = 0; i < 64; i++) {
        const r = req(i % 3 === 0 ? CMD.BLOCK_STATUS : CMD.READ, (i * 64 * KiB) % SIZE, 64 * KiB);
        pending.set(r.cookie, new OutcomeBuilder(r));
        batch.push(request(r));
      }
      await c.write(
        be().bytes(batch.reduce((a, b) => {
          const x = new Uint8Array(a.length + b.length);
          x.set(a);
          x.set(b, a.length);
          return x;
        })).build(),
      );
      let left = pending.size;
      while (left > 0) {
        const rep = await c.reply(() => 64 * KiB);
        const o = pending.get(rep.cookie);
        assert.ok(o, `reply for unknown cookie ${rep.cookie}`);
        o.add(rep);
        if (o.done) {
          assert.equal(o.finish().error, 0);
          left--;
        }
      }

      // DISC: the server finishes what is in flight, then closes.
      const last = req(CMD.WRITE, 6 * MiB, 4096);
      await c.send(last, new Uint8Array(4096).fill(0x66));
      await c.send(req(CMD.DISC, 0, 0));
      const rest = await c.readToEof();
      assert.ok(
        rest.length === 0 || rest.length === 16 || rest.length === 20,
        `${rest.length} bytes after DISC`,
      );
    });

    // BLOCK_STATUS without a context: EINVAL (an error chunk or a simple error).
    {
      const { c } = await session(s, { structured: true, meta: false });
      await within(c, 5000, async () => {
        const o = await c.command(req(CMD.BLOCK_STATUS, 0, 4096));
        assert.equal(o.error, ERR.EINVAL, `BLOCK_STATUS without a context → ${o.error}`);
        // The DISC'd write of the previous connection was done.
        const d = await c.command(req(CMD.READ, 6 * MiB, 4096));
        assertBytes(d.data!, new Uint8Array(4096).fill(0x66), "write before DISC");
      });
    }

    // Without structured replies: simple replies, errors without data.
    {
      const { c, info } = await session(s, { structured: false });
      await within(c, 5000, async () => {
        assert.equal(info.flags & FLAG.SEND_DF, 0, "SEND_DF without structured replies");
        const r = req(CMD.READ, SIZE, 512);
        await c.send(r);
        assert.equal(
          hex(await c.read(16)),
          "67446698" + "00000016" + r.cookie.toString(16).padStart(16, "0"),
        );
        const bs = req(CMD.BLOCK_STATUS, 0, 4096);
        await c.send(bs);
        assert.equal(
          hex(await c.read(16)),
          "67446698" + "00000016" + bs.cookie.toString(16).padStart(16, "0"),
        );
        const ok = await c.command(req(CMD.READ, 0, 8192));
        assert.deepEqual(ok.shape, ["simple"]);
        assertBytes(ok.data!, contents.subarray(0, 8192), "simple READ");
      });
    }

    // Multi-conn: a write acknowledged on one connection is read by another (and after FLUSH).
    {
      const a = await session(s), b = await session(s);
      try {
        const data = rng(5).fill(new Uint8Array(64 * KiB));
        assert.equal((await a.c.command(req(CMD.WRITE, 2 * MiB, data.length), data)).error, 0);
        assertBytes(
          (await b.c.command(req(CMD.READ, 2 * MiB, data.length))).data!,
          data,
          "B reads A's write",
        );
        const data2 = rng(6).fill(new Uint8Array(4096));
        assert.equal(
          (await b.c.command(req(CMD.WRITE, 2 * MiB, 4096, CMD_FLAG.FUA), data2)).error,
          0,
        );
        assert.equal((await a.c.command(req(CMD.FLUSH, 0, 0))).error, 0);
        assertBytes(
          (await a.c.command(req(CMD.READ, 2 * MiB, 4096))).data!,
          data2,
          "A reads B's write",
        );
      } finally {
        a.c.close();
        b.c.close();
      }
    }
  }));

Deno.test("NBD byte-exact: a read-only export refuses writes after consuming them", () =>
  withServer(true, async (s, contents) => {
    const { c, info } = await session(s);
    await within(c, 20_000, async () => {
      assert.ok(
        info.flags & FLAG.READ_ONLY,
        `flags 0x${info.flags.toString(16)} without READ_ONLY`,
      );
      const w = await c.command(req(CMD.WRITE, 0, 4096), new Uint8Array(4096).fill(1));
      assert.equal(w.error, ERR.EPERM, `WRITE → ${w.error}`);
      // A maximal WRITE: 32 MiB consumed, then EPERM.
      const big = await c.command(req(CMD.WRITE, 0, 32 * MiB), new Uint8Array(32 * MiB).fill(2));
      assert.equal(big.error, ERR.EPERM, `32 MiB WRITE → ${big.error}`);
      for (const type of [CMD.WRITE_ZEROES, CMD.TRIM]) {
        const o = await c.command(req(type, 0, 4096));
        assert.ok(o.error === ERR.EPERM || o.error === ERR.EINVAL, `type ${type} → ${o.error}`);
      }
      assert.equal((await c.command(req(CMD.FLUSH, 0, 0))).error, 0, "FLUSH on read-only");
      const rd = await c.command(req(CMD.READ, 0, 8192));
      assertBytes(rd.data!, contents.subarray(0, 8192), "read-only export after refused writes");
    });
  }));

// =============================================================================================
// Handshake fuzzing

type HsExpect =
  | "unsup" // ERR_UNSUP exactly
  | "error" // one error reply (any error type)
  | "unknown" // ERR_UNKNOWN
  | "list" // REP_SERVER…, ACK
  | "info" // REP_INFO… (with EXPORT), ACK
  | "sr" // ACK or an error
  | "meta" // REP_META_CONTEXT…, ACK, or an error
  | "metaError" // (REP_META_CONTEXT…) then an error
  | "any" // any well-formed final reply
  | "go" // INFO…, ACK, then transmission
  | "exportName" // 10 (+124) bytes, then transmission
  | "abort" // ACK (or nothing), then close
  | "close" // close without a reply
  | "eofAfter" // (after we stop sending) well-formed error replies, then close
  | "truncated"; // we stop mid-message: the server closes without a reply

interface HsOp {
  what: string;
  code: number;
  bytes: Uint8Array;
  expect: HsExpect;
}

function randomBytes(r: Rng, n: number): Uint8Array {
  return r.fill(new Uint8Array(n));
}

function randomName(r: Rng, n: number, allowNul = false): string {
  let s = "";
  for (let i = 0; i < n; i++) {
    const c = 1 + r.below(126);
    s += String.fromCharCode(allowNul && r.below(8) === 0 ? 0 : c);
  }
  return s;
}

function pick<T>(r: Rng, xs: readonly T[]): T {
  return xs[r.below(xs.length)];
}

/** One option message (or a broken one) and what the server must do with it. */
function handshakeOp(r: Rng, sr: boolean): HsOp {
  const kind = r.below(100);
  const name = pick(r, [NAME, ""]);
  if (kind < 10) {
    const code = pick(r, [
      0,
      4,
      11,
      12,
      13,
      100,
      0xffff,
      0x10000 + r.below(1e6),
      0x80000000 + r.below(1e6),
    ]);
    const n = r.below(5) === 0 ? r.below(64 * KiB) : r.below(300);
    return {
      what: `unknown option ${code} (${n} bytes)`,
      code,
      bytes: option(code, randomBytes(r, n)),
      expect: "unsup",
    };
  }
  if (kind < 14) {
    const n = 1 + r.below(200);
    return {
      what: `LIST with ${n} bytes`,
      code: OPT.LIST,
      bytes: option(OPT.LIST, randomBytes(r, n)),
      expect: "error",
    };
  }
  if (kind < 18) return { what: "LIST", code: OPT.LIST, bytes: option(OPT.LIST), expect: "list" };
  if (kind < 22) {
    const n = r.below(3) === 0 ? 1 + r.below(100) : 0;
    return {
      what: `STRUCTURED_REPLY (${n} bytes)`,
      code: OPT.STRUCTURED_REPLY,
      bytes: option(OPT.STRUCTURED_REPLY, randomBytes(r, n)),
      expect: n === 0 ? "sr" : "error",
    };
  }
  if (kind < 24) {
    return { what: "STARTTLS", code: OPT.STARTTLS, bytes: option(OPT.STARTTLS), expect: "error" };
  }
  if (kind < 44) {
    // Malformed INFO/GO.
    const code = pick(r, [OPT.INFO, OPT.GO]);
    const variant = r.below(7);
    let data: Uint8Array, what: string;
    switch (variant) {
      case 0:
        data = randomBytes(r, r.below(6));
        what = `${data.length}-byte data`;
        break;
      case 1: {
        const l = 5 + r.below(5000);
        data = be().u32(l).str(name).u16(0).build();
        what = `name length ${l} past the data`;
        break;
      }
      case 2:
        data = be().lstr(name).u16(0).bytes(randomBytes(r, 1 + r.below(9))).build();
        what = "trailing bytes";
        break;
      case 3: {
        const n = 2 + r.below(100);
        data = be().lstr(name).u16(n).u16(3).build();
        what = `${n} info codes announced, 1 sent`;
        break;
      }
      case 4: {
        const nm = randomName(r, 1 + r.below(20)) + "\0" + randomName(r, r.below(5));
        data = be().lstr(nm).u16(0).build();
        what = "NUL in the name";
        break;
      }
      case 5: {
        const nm = randomName(r, 4097 + r.below(2000));
        data = be().lstr(nm).u16(0).build();
        what = `${nm.length}-byte name`;
        break;
      }
      default: {
        const l = r.u32();
        data = be().u32(l).bytes(randomBytes(r, r.below(50))).build();
        what = `name length ${l}`;
        if (l <= data.length - 6) return handshakeOp(r, sr);
      }
    }
    return {
      what: `${code === OPT.GO ? "GO" : "INFO"}: ${what}`,
      code,
      bytes: option(code, data),
      expect: "error",
    };
  }
  // (nbdkit's file plugin serves any export name: no unknown exports there)
  if (kind < 50 && !REFERENCE_SERVER) {
    const code = pick(r, [OPT.INFO, OPT.GO]);
    const nm = "x" + randomName(r, r.below(30));
    return {
      what: `${code} unknown export`,
      code,
      bytes: option(code, goData(nm, [3])),
      expect: "unknown",
    };
  }
  if (kind < 58) {
    const infos = Array.from(
      { length: r.below(6) },
      () => (r.below(3) ? r.below(4) : r.below(0x10000)),
    );
    return {
      what: `INFO ${infos}`,
      code: OPT.INFO,
      bytes: option(OPT.INFO, goData(name, infos)),
      expect: "info",
    };
  }
  if (kind < 68) {
    // LIST/SET_META_CONTEXT, well-formed or not.
    const code = pick(r, [OPT.LIST_META_CONTEXT, OPT.SET_META_CONTEXT]);
    const malformed = r.below(2) === 0;
    let data: Uint8Array;
    if (!malformed) {
      const qs = Array.from(
        { length: r.below(4) },
        () =>
          pick(r, [
            "base:allocation",
            "base:",
            "qemu:dirty-bitmap:a",
            "qemu:",
            "x:y",
            randomName(r, r.below(40)),
          ]),
      );
      data = metaData(pick(r, [name, name, "nope"]), qs);
    } else {
      switch (r.below(4)) {
        case 0:
          data = randomBytes(r, r.below(8));
          break;
        case 1:
          data = be().u32(1000 + r.below(1000)).str(name).u32(0).build();
          break;
        case 2:
          data = be().lstr(name).u32(2 + r.below(1000)).lstr("base:allocation").build();
          break;
        default:
          data = be().lstr(name).u32(1).u32(16 + r.below(100000)).str("base:allocation").build();
      }
    }
    const expect: HsExpect = malformed
      ? "metaError"
      : code === OPT.SET_META_CONTEXT && !sr
      ? "error"
      : "meta";
    return {
      what: `${code === 9 ? "LIST" : "SET"}_META_CONTEXT${malformed ? " malformed" : ""}`,
      code,
      bytes: option(code, data),
      expect,
    };
  }
  if (kind < 72 && !REFERENCE_SERVER) {
    const nm = r.below(3) === 0
      ? randomName(r, 4097 + r.below(100))
      : "y" + randomName(r, r.below(20), true);
    return {
      what: "EXPORT_NAME unknown",
      code: OPT.EXPORT_NAME,
      bytes: option(OPT.EXPORT_NAME, enc.encode(nm)),
      expect: "close",
    };
  }
  if (kind < 75) {
    return {
      what: "EXPORT_NAME",
      code: OPT.EXPORT_NAME,
      bytes: option(OPT.EXPORT_NAME, enc.encode(name)),
      expect: "exportName",
    };
  }
  if (kind < 79) {
    const infos = Array.from({ length: r.below(4) }, () => r.below(5));
    return {
      what: `GO ${infos}`,
      code: OPT.GO,
      bytes: option(OPT.GO, goData(name, infos)),
      expect: "go",
    };
  }
  if (kind < 82) {
    return {
      what: "ABORT",
      code: OPT.ABORT,
      bytes: option(OPT.ABORT, randomBytes(r, r.below(2) ? 0 : r.below(20))),
      expect: "abort",
    };
  }
  if (kind < 87) {
    let magic = randomBytes(r, 8);
    if (r.below(2)) {
      magic = be().u64(IHAVEOPT).build();
      magic[r.below(8)] ^= 1 << r.below(8);
    }
    return {
      what: `bad magic ${hex(magic)}`,
      code: 0,
      bytes: be().bytes(magic).u32(OPT.LIST).u32(0).bytes(randomBytes(r, r.below(40))).build(),
      expect: "close",
    };
  }
  if (kind < 92) {
    // A huge length (DoS): we send some of it and stop.
    const length = 64 * MiB + 1 + r.below(0xffffffff - 64 * MiB);
    const code = pick(r, [
      OPT.GO,
      OPT.INFO,
      OPT.LIST,
      OPT.EXPORT_NAME,
      OPT.SET_META_CONTEXT,
      0x4444,
      OPT.STRUCTURED_REPLY,
    ]);
    const sent = randomBytes(r, r.below(8192));
    return {
      what: `option ${code} claiming ${length} bytes`,
      code,
      bytes: option(code, sent, length),
      expect: "eofAfter",
    };
  }
  if (kind < 94) {
    // A large but not absurd length, all sent: error reply or close.
    const n = 64 * KiB + r.below(1 * MiB);
    const code = pick(r, [OPT.GO, OPT.INFO, 0x5555, OPT.SET_META_CONTEXT]);
    return {
      what: `option ${code} with ${n} bytes`,
      code,
      bytes: option(code, randomBytes(r, n)),
      expect: "eofAfter",
    };
  }
  // Truncated: a prefix of a valid message, then we stop.
  const [code, full] = pick(
    r,
    [
      [OPT.GO, option(OPT.GO, goData(name, [3]))],
      [OPT.LIST, option(OPT.LIST)],
      [0x99, option(0x99, randomBytes(r, 40))],
    ] as const,
  );
  const bytes = full.subarray(0, r.below(full.length));
  return {
    what: `truncated option ${code} (${bytes.length} bytes)`,
    code,
    bytes,
    expect: "truncated",
  };
}

/** Checks one option's replies against what was expected. */
async function checkOptionReplies(c: RawConn, op: HsOp, repeated: boolean): Promise<void> {
  const replies = await c.optionReplies(op.code);
  const last = replies.at(-1)!;
  const types = replies.map((r) => r.type.toString(16)).join(",");
  const msg = `${op.what} → ${types}`;
  switch (op.expect) {
    case "unsup":
      assert.deepEqual(replies.map((r) => r.type), [REP.ERR_UNSUP], msg);
      break;
    case "unknown":
      assert.deepEqual(replies.map((r) => r.type), [REP.ERR_UNKNOWN], msg);
      break;
    case "error":
      assert.equal(replies.length, 1, msg);
      assert.ok(isError(last), msg);
      break;
    case "list":
      // A repeated LIST may be refused (nbdkit answers ERR_INVALID).
      if (repeated && replies.length === 1 && isError(last)) break;
      assert.equal(last.type, REP.ACK, msg);
      for (const r of replies.slice(0, -1)) assert.equal(r.type, REP.SERVER, msg);
      break;
    case "info": {
      assert.equal(last.type, REP.ACK, msg);
      const exp = replies.find((r) => r.type === REP.INFO && r.data[0] === 0 && r.data[1] === 0);
      assert.ok(exp && exp.data.length === 12, `${msg}: no NBD_INFO_EXPORT`);
      for (const r of replies.slice(0, -1)) {
        assert.equal(r.type, REP.INFO, msg);
        const t = (r.data[0] << 8) | r.data[1];
        assert.ok(t <= 3, `${msg}: info type ${t} not asked for`);
      }
      break;
    }
    case "sr":
      assert.equal(replies.length, 1, msg);
      break;
    case "metaError":
      assert.ok(isError(last), msg);
      for (const r of replies.slice(0, -1)) assert.equal(r.type, REP.META_CONTEXT, msg);
      break;
    case "meta":
      if (isError(last)) assert.equal(replies.length, 1, msg);
      for (const r of replies.slice(0, -1)) {
        assert.equal(r.type, REP.META_CONTEXT, msg);
        assert.ok(r.data.length > 4, msg);
      }
      for (const r of replies.slice(0, -1)) {
        const name = dec.decode(r.data.subarray(4));
        assert.ok(name.startsWith("base:"), `${msg}: context ${name}`);
      }
      break;
    default:
      break;
  }
}

/** The seed of connection `i` of a run seeded `base` (a murmur3 finalizer over both). */
function mixSeed(base: number, i: number): number {
  let h = Math.imul(base ^ Math.imul(i + 1, 0x9e3779b9), 0x85ebca6b);
  h ^= h >>> 13;
  h = Math.imul(h, 0xc2b2ae35);
  return (h ^ (h >>> 16)) >>> 0;
}

/** How many options of each kind the handshake fuzzer sent (printed at the end). */
const handshakeStats = new Map<string, number>();

/** One fuzzed handshake connection. */
async function fuzzHandshake(sock: string, seed: number, log: string[]): Promise<void> {
  const r = rng(seed);
  const c = await RawConn.unix(sock);
  await c.within(8000, `handshake seed ${seed}`, async () => {
    assert.equal(hex(await c.greeting()), hex(GREETING), "greeting");
    const how = r.below(25);
    if (how === 0) {
      const flags = (r.u32() | (4 << r.below(30))) >>> 0;
      log.push(`client flags 0x${flags.toString(16)}`);
      await c.write(be().u32(flags).build());
      return await expectSilentClose(c, "bad client flags");
    }
    if (how === 1) {
      const n = r.below(4);
      log.push(`${n} bytes of client flags, then EOF`);
      await c.write(new Uint8Array(n).fill(3));
      await c.closeWrite();
      return await expectSilentClose(c, "truncated client flags");
    }
    if (how === 2) {
      // Without FIXED_NEWSTYLE: anything well-formed, or a close.
      const flags = pick(r, [0, 2]);
      log.push(`client flags ${flags}, LIST`);
      await c.write(be().u32(flags).build());
      await c.write(option(OPT.LIST));
      await c.closeWrite();
      try {
        for (;;) {
          const rep = await c.optionReply(OPT.LIST);
          assert.ok(([REP.SERVER, REP.ACK] as number[]).includes(rep.type) || isError(rep));
        }
      } catch (e) {
        if (!(e instanceof Eof) || e.got !== 0) throw e;
      }
      return;
    }
    const flags = pick(r, [1, 3]);
    await c.write(be().u32(flags).build());
    let sr = false;
    const done = new Set<HsExpect>();
    const n = 1 + r.below(8);
    for (let i = 0; i < n; i++) {
      const op = handshakeOp(r, sr);
      log.push(op.what);
      handshakeStats.set(op.expect, (handshakeStats.get(op.expect) ?? 0) + 1);
      if (!(await c.write(op.bytes))) {
        // The server closed first: only fine if the op was fatal anyway.
        assert.ok(
          ["close", "eofAfter", "truncated"].includes(op.expect),
          `${op.what}: server closed`,
        );
        return;
      }
      switch (op.expect) {
        case "close":
          return await expectSilentClose(c, op.what);
        case "truncated": // (a server may answer an unknown option's header before its data)
        case "eofAfter":
          await c.closeWrite();
          try {
            for (;;) {
              const rep = await c.optionReply(op.code);
              assert.ok(isError(rep), `${op.what}: reply type ${rep.type.toString(16)}`);
            }
          } catch (e) {
            if (!(e instanceof Eof) || e.got !== 0) throw e;
          }
          return;
        case "abort": {
          try {
            const rep = await c.optionReply(OPT.ABORT);
            assert.equal(rep.type, REP.ACK, "ABORT reply");
          } catch (e) {
            if (!(e instanceof Eof) || e.got !== 0) throw e;
          }
          return await expectSilentClose(c, "after ABORT");
        }
        case "go": {
          const replies = await c.optionReplies(OPT.GO);
          assert.equal(replies.at(-1)!.type, REP.ACK, `GO → ${replies.map((x) => x.type)}`);
          await c.send(req(CMD.DISC, 0, 0));
          return await expectSilentClose(c, "DISC after GO");
        }
        case "exportName": {
          await c.read(10 + (flags & 2 ? 0 : 124));
          await c.send(req(CMD.DISC, 0, 0));
          return await expectSilentClose(c, "DISC after EXPORT_NAME");
        }
        default:
          await checkOptionReplies(c, op, done.has(op.expect));
          done.add(op.expect);
          if (op.expect === "sr") sr = true;
      }
    }
    if (r.below(2)) {
      log.push("EOF");
      await c.closeWrite();
      await expectSilentClose(c, "EOF in the handshake");
    } else {
      log.push("ABORT");
      await c.write(option(OPT.ABORT));
      const rep = await c.optionReply(OPT.ABORT);
      assert.equal(rep.type, REP.ACK);
      await expectSilentClose(c, "after ABORT");
    }
  });
}

/** Runs `n` jobs, `parallel` at a time; the first failure stops everything. */
async function pool(n: number, parallel: number, job: (i: number) => Promise<void>): Promise<void> {
  let next = 0;
  const worker = async () => {
    while (next < n) await job(next++);
  };
  await Promise.all(Array.from({ length: parallel }, worker));
}

/** The server still serves a well-behaved client, and nbdinfo. */
async function assertServing(s: Serve, shadow: Shadow): Promise<void> {
  const { c } = await session(s);
  await within(c, 10_000, async () => {
    // The whole disk, as the shadow knows it.
    for (let at = 0; at < SIZE; at += 8 * MiB) {
      const o = await c.command(req(CMD.READ, at, 8 * MiB));
      assert.equal(o.error, 0);
      shadow.check(at, o.data!, "READ after fuzzing");
    }
  });
  const r = await run("nbdinfo", ["--size", s.unixUri], { timeoutMs: 20_000 });
  assert.equal(r.code, 0, `nbdinfo after fuzzing: ${r.stderr}`);
  assert.equal(r.stdout.trim(), String(SIZE));
}

function checkRss(s: Serve, max: { kib: number }): void {
  const kib = s.rssKiB();
  max.kib = Math.max(max.kib, kib);
  assert.ok(
    kib < RSS_LIMIT_KIB,
    `server RSS ${Math.round(kib / 1024)} MiB ≥ ${RSS_LIMIT_KIB / 1024} MiB`,
  );
}

Deno.test(`NBD fuzz: ${HANDSHAKE_CONNECTIONS} malformed handshakes (seed ${SEED})`, () =>
  withServer(false, async (s, contents) => {
    const rss = { kib: 0 };
    const t0 = Date.now();
    await pool(HANDSHAKE_CONNECTIONS, 8, async (i) => {
      const seed = mixSeed(SEED, i);
      const log: string[] = [];
      try {
        await fuzzHandshake(s.socket, seed, log);
      } catch (e) {
        throw new Error(
          `handshake connection ${i} (seed ${seed}): ` +
            `${log.join(" → ")}\n${e instanceof Error ? e.stack : e}`,
        );
      }
      if (i % 100 === 0) checkRss(s, rss);
    });
    checkRss(s, rss);
    // A burst of 200 connections at once (more than the server takes at a time): each one gets
    // the greeting, or is closed, in time.
    const burst = await Promise.all(Array.from({ length: 200 }, () => RawConn.unix(s.socket)));
    let greeted = 0;
    await Promise.all(burst.map((c) =>
      c.within(20_000, "burst connection", async () => {
        try {
          assert.equal(hex(await c.read(18)), hex(GREETING));
          greeted++;
        } catch (e) {
          if (!(e instanceof Eof) || e.got !== 0) throw e;
        }
      })
    ));
    assert.ok(greeted >= 100, `only ${greeted} of 200 simultaneous connections were greeted`);
    checkRss(s, rss);
    await assertServing(s, new Shadow(contents));
    console.log(
      `${HANDSHAKE_CONNECTIONS} handshakes in ${Date.now() - t0} ms (options: ${
        [...handshakeStats].map(([k, n]) => `${k} ${n}`).join(", ")
      }); ${greeted}/200 of a burst greeted; max RSS ${Math.round(rss.kib / 1024)} MiB`,
    );
  }));

// =============================================================================================
// Transmission fuzzing

/** What the server may answer to a request: success, these errors, or a close. */
interface Expectation {
  /** Errors that must come (one of them) if non-empty. */
  must: Set<number>;
  /** Errors that are also acceptable (with success when `must` is empty). */
  may: Set<number>;
  /** The server may also close the connection. */
  mayClose: boolean;
}

const MAX_PAYLOAD = 32 * MiB;
const KNOWN_FLAGS = 0x1f;

function expectation(r: Request, ses: Session, size: number): Expectation {
  const must = new Set<number>(), may = new Set<number>();
  let mayClose = false;
  const off = BigInt.asUintN(64, BigInt(r.offset)), len = BigInt(r.length);
  const end = off + len, flags = r.flags ?? 0, t = r.type;
  if (t > CMD.BLOCK_STATUS) return { must: new Set([ERR.EINVAL]), may, mayClose };
  if (flags & ~KNOWN_FLAGS) must.add(ERR.EINVAL);
  // Known flags on the wrong command: EINVAL allowed (SHOULD), ignoring them too.
  if (flags & (CMD_FLAG.NO_HOLE | CMD_FLAG.FAST_ZERO) && t !== CMD.WRITE_ZEROES) {
    may.add(ERR.EINVAL);
  }
  if (flags & CMD_FLAG.REQ_ONE && t !== CMD.BLOCK_STATUS) may.add(ERR.EINVAL);
  if (flags & CMD_FLAG.DF && (t !== CMD.READ || !(ses.flags & FLAG.SEND_DF))) may.add(ERR.EINVAL);
  if (flags & CMD_FLAG.FAST_ZERO && !(ses.flags & FLAG.SEND_FAST_ZERO)) may.add(ERR.EINVAL);
  if (flags & CMD_FLAG.DF && t === CMD.READ) may.add(ERR.EOVERFLOW);
  // Misaligned to the advertised minimum block (none advertised: 1).
  const min = BigInt(ses.blockSize?.min ?? 1);
  const misaligned = off % min !== 0n || len % min !== 0n;
  const past = end > BigInt(size);
  const overflow = end >= 1n << 64n;
  switch (t) {
    case CMD.READ:
    case CMD.WRITE:
      if (len > BigInt(MAX_PAYLOAD)) {
        // Above the maximum payload: an error, a close, or (up to 64 MiB, as nbdkit does) success.
        const errors = [ERR.EINVAL, ERR.ENOMEM, ERR.EOVERFLOW, ERR.ENOSPC];
        for (const e of errors) (len > 64n * BigInt(MiB) ? must : may).add(e);
        mayClose = true;
      }
      if (misaligned) must.add(ERR.EINVAL);
      if (past) must.add(t === CMD.READ ? ERR.EINVAL : ERR.ENOSPC);
      if (past && overflow) must.add(ERR.EINVAL);
      break;
    case CMD.FLUSH:
      if (off !== 0n || len !== 0n) must.add(ERR.EINVAL);
      break;
    case CMD.TRIM:
    case CMD.WRITE_ZEROES:
    case CMD.CACHE:
      if (misaligned) must.add(ERR.EINVAL);
      if (past) {
        must.add(ERR.EINVAL);
        if (t !== CMD.CACHE) must.add(ERR.ENOSPC);
      }
      if (t === CMD.WRITE_ZEROES && flags & CMD_FLAG.FAST_ZERO) may.add(ERR.ENOTSUP);
      if (t === CMD.CACHE && len > BigInt(MAX_PAYLOAD)) may.add(ERR.EINVAL).add(ERR.EOVERFLOW);
      break;
    case CMD.BLOCK_STATUS:
      if (!ses.structured || ses.contextId === undefined) must.add(ERR.EINVAL);
      // Past the end → EINVAL; a length running past the end from an offset inside is also
      // answered (clamped) here: the byte-exact test holds the strict rule.
      if (past && off >= BigInt(size)) must.add(ERR.EINVAL);
      if (past) may.add(ERR.EINVAL);
      if (misaligned) may.add(ERR.EINVAL);
      break;
  }
  // A client that never got block sizes (EXPORT_NAME) should be served byte-granular requests
  // (the spec's default minimum is 1), but refusing ones that are not sector multiples is fair.
  if (!ses.blockSize && (off % 512n !== 0n || len % 512n !== 0n)) may.add(ERR.EINVAL);
  if (len === 0n && t !== CMD.FLUSH) may.add(ERR.EINVAL);
  if (len === 0n && (t === CMD.WRITE || t === CMD.WRITE_ZEROES)) may.add(ERR.ENOSPC);
  return { must, may, mayClose };
}

/** The disk as the fuzzer believes it is: bytes, and which 512-byte sectors are known. */
class Shadow {
  readonly bytes: Uint8Array;
  readonly known: Uint8Array;
  constructor(contents: Uint8Array) {
    this.bytes = contents.slice();
    this.known = new Uint8Array(contents.length / 512).fill(1);
  }
  write(off: number, data: Uint8Array): void {
    this.bytes.set(data, off);
    // Sectors written whole are known now; partly written ones stay as they were.
    this.known.fill(1, Math.ceil(off / 512), Math.floor((off + data.length) / 512));
  }
  zero(off: number, len: number): void {
    this.bytes.fill(0, off, off + len);
    this.known.fill(1, Math.ceil(off / 512), Math.floor((off + len) / 512));
  }
  forget(off: number, len: number): void {
    this.known.fill(0, Math.floor(off / 512), Math.ceil((off + len) / 512));
  }
  check(off: number, data: Uint8Array, what: string): void {
    for (let i = 0; i < data.length; i++) {
      const p = off + i;
      if (data[i] !== this.bytes[p] && this.known[Math.floor(p / 512)]) {
        throw new Error(`${what}: byte ${p} is ${data[i]}, expected ${this.bytes[p]}`);
      }
    }
  }
  /** Fails if a range reported as zero holds a known non-zero byte. */
  checkZero(off: number, len: number, what: string): void {
    const end = Math.min(off + len, this.bytes.length);
    for (let p = off; p < end; p++) {
      if (this.known[Math.floor(p / 512)] && this.bytes[p] !== 0) {
        throw new Error(`${what}: ${off}+${len} reported zero, byte ${p} is ${this.bytes[p]}`);
      }
    }
  }
}

interface TxOp {
  r: Request;
  payload?: Uint8Array;
  /** Bytes to send instead of header + payload (garbage), or a cut-off payload. */
  raw?: Uint8Array;
  what: string;
  fatal?: "close" | "disc" | "eof";
}

/**
 * FAST_ZERO if the export advertises it, else 0 (sending it anyway crashes nbdkit 1.32 on an
 * assertion, which would end a reference run early).
 */
function fastZero(ses: Session): number {
  return ses.flags & FLAG.SEND_FAST_ZERO ? CMD_FLAG.FAST_ZERO : 0;
}

function aligned(r: Rng, limit: number): number {
  return r.below(Math.floor(limit / 512) + 1) * 512;
}

/** A random request: mostly valid, many invalid in one way or another. */
function txOp(r: Rng, ses: Session): TxOp {
  const size = ses.size;
  const k = r.below(1000);
  const smallLen = () => (r.below(4) === 0 ? aligned(r, 1 * MiB) : aligned(r, 64 * KiB));
  const inRange = (len: number) => aligned(r, Math.max(0, size - len));
  if (k < 180) {
    const len = r.below(100) === 0 ? aligned(r, MAX_PAYLOAD) : smallLen();
    const off = inRange(len);
    return {
      r: req(CMD.READ, off, len, r.below(5) === 0 ? CMD_FLAG.FUA : 0),
      what: `READ ${off}+${len}`,
    };
  }
  if (k < 330) {
    const len = r.below(150) === 0 ? aligned(r, 8 * MiB) : smallLen();
    const off = inRange(len);
    return {
      r: req(CMD.WRITE, off, len, r.below(4) === 0 ? CMD_FLAG.FUA : 0),
      payload: r.fill(new Uint8Array(len)),
      what: `WRITE ${off}+${len}`,
    };
  }
  if (k < 370) {
    const len = smallLen(), off = inRange(len);
    const flags = pick(r, [0, CMD_FLAG.NO_HOLE, fastZero(ses), CMD_FLAG.FUA | CMD_FLAG.NO_HOLE]);
    return {
      r: req(CMD.WRITE_ZEROES, off, len, flags),
      what: `WRITE_ZEROES ${off}+${len} f${flags}`,
    };
  }
  if (k < 390) {
    const len = smallLen(), off = inRange(len);
    return { r: req(CMD.TRIM, off, len), what: `TRIM ${off}+${len}` };
  }
  if (k < 405) return { r: req(CMD.FLUSH, 0, 0, r.below(2) ? CMD_FLAG.FUA : 0), what: "FLUSH" };
  if (k < 420) {
    const len = smallLen(), off = inRange(len);
    return { r: req(CMD.CACHE, off, len), what: `CACHE ${off}+${len}` };
  }
  if (k < 470) {
    const len = r.below(3) === 0 ? r.u32() : smallLen();
    const off = inRange(Math.min(len, size));
    const flags = r.below(2) ? CMD_FLAG.REQ_ONE : 0;
    return {
      r: req(CMD.BLOCK_STATUS, off, len, flags),
      what: `BLOCK_STATUS ${off}+${len} f${flags}`,
    };
  }
  // Invalid requests.
  if (k < 520) {
    const type = pick(r, [8, 9, 10, 100, 0x7fff, 0xffff, 9 + r.below(0xfff0)]);
    return { r: req(type, r.u32(), r.below(3) ? 0 : r.u32()), what: `command ${type}` };
  }
  if (k < 590) {
    const type = pick(r, [
      CMD.READ,
      CMD.FLUSH,
      CMD.TRIM,
      CMD.CACHE,
      CMD.WRITE_ZEROES,
      CMD.BLOCK_STATUS,
      CMD.WRITE,
    ]);
    let flags = r.below(2) ? (1 << (5 + r.below(11))) | r.below(32) : r.below(32);
    if (!fastZero(ses)) flags &= ~CMD_FLAG.FAST_ZERO;
    const len = type === CMD.FLUSH ? 0 : 4096;
    const op: TxOp = {
      r: req(type, 0, len, flags),
      what: `type ${type} flags 0x${flags.toString(16)}`,
    };
    if (type === CMD.WRITE) op.payload = new Uint8Array(len).fill(0x33);
    return op;
  }
  if (k < 670) {
    // Misaligned.
    const type = pick(r, [CMD.READ, CMD.WRITE, CMD.TRIM, CMD.WRITE_ZEROES, CMD.CACHE]);
    const off = r.below(4 * MiB), len = 1 + r.below(8192);
    const op: TxOp = { r: req(type, off, len), what: `misaligned type ${type} ${off}+${len}` };
    if (type === CMD.WRITE) op.payload = r.fill(new Uint8Array(len));
    return op;
  }
  if (k < 770) {
    // Out of range, including offsets near 2^64 and lengths up to 4 GiB − 1.
    const type = pick(r, [
      CMD.READ,
      CMD.WRITE,
      CMD.TRIM,
      CMD.WRITE_ZEROES,
      CMD.CACHE,
      CMD.BLOCK_STATUS,
    ]);
    const off = pick(r, [
      BigInt(size),
      BigInt(size - 512),
      BigInt(size) + BigInt(aligned(r, 1 << 30)),
      (1n << 64n) - 512n,
      1n << 63n,
      BigInt(r.u32()) << 20n,
    ]);
    let len = type === CMD.WRITE
      ? 512 * (1 + r.below(16))
      : pick(r, [512, 1024, 0xfffffe00, (r.u32() & ~511) >>> 0]);
    if (type === CMD.READ && len > MAX_PAYLOAD) len = 1024;
    const op: TxOp = { r: req(type, off, len), what: `out of range type ${type} ${off}+${len}` };
    if (type === CMD.WRITE) op.payload = r.fill(new Uint8Array(len));
    return op;
  }
  if (k < 810) {
    // Oversized READ / WRITE (above 32 MiB).
    const type = pick(r, [CMD.READ, CMD.WRITE]);
    const len = MAX_PAYLOAD + 512 * (1 + r.below(r.below(2) ? 100 : 8_000_000));
    const op: TxOp = { r: req(type, 0, len), what: `oversized type ${type} length ${len}` };
    if (type === CMD.WRITE) {
      if (len <= MAX_PAYLOAD + 1 * MiB) op.payload = new Uint8Array(len).fill(0x44);
      else {
        // Absurd: we send part of it and stop; the server may wait for the rest or close.
        op.raw = be().bytes(request(op.r)).bytes(new Uint8Array(r.below(1 * MiB))).build();
        op.fatal = "eof";
      }
    }
    return op;
  }
  if (k < 840) {
    return {
      r: req(CMD.FLUSH, r.below(2) ? 512 : 0, r.below(2) ? 1 + r.below(1 << 20) : 512),
      what: "FLUSH with offset/length",
    };
  }
  if (k < 850) return { r: req(CMD.READ, 0, 0), what: "zero-length READ" };
  if (k < 855) {
    return { r: req(CMD.WRITE, 4096, 0), payload: new Uint8Array(0), what: "zero-length WRITE" };
  }
  if (k < 885) {
    // Bad magic or garbage: fatal.
    // (at least a header's worth: the server checks the magic once it has 28 bytes)
    const garbage = r.fill(new Uint8Array(28 + r.below(200)));
    if (garbage.length >= 4 && garbage[0] === 0x25) garbage[0] = 0x26;
    if (r.below(2)) {
      const h = request(req(CMD.READ, 0, 512));
      h[r.below(4)] ^= 1 << r.below(8);
      return {
        r: req(CMD.READ, 0, 0),
        raw: h,
        what: `bad magic ${hex(h.subarray(0, 4))}`,
        fatal: "close",
      };
    }
    return {
      r: req(CMD.READ, 0, 0),
      raw: garbage,
      what: `${garbage.length} garbage bytes`,
      fatal: "close",
    };
  }
  if (k < 900) {
    // A request cut short, then EOF.
    const h = request(req(CMD.WRITE, 0, 4096));
    const cut = r.below(2)
      ? h.subarray(0, r.below(28))
      : be().bytes(h).bytes(new Uint8Array(r.below(4096))).build();
    return {
      r: req(CMD.READ, 0, 0),
      raw: cut,
      what: `truncated request (${cut.length} bytes)`,
      fatal: "eof",
    };
  }
  // A known command with unknown flag bits and a random range.
  const type = pick(r, [
    CMD.READ,
    CMD.FLUSH,
    CMD.TRIM,
    CMD.CACHE,
    CMD.WRITE_ZEROES,
    CMD.BLOCK_STATUS,
  ]);
  const flags = (1 << (5 + r.below(11))) | (r.below(32) & ~CMD_FLAG.FAST_ZERO);
  return {
    r: req(type, BigInt(r.u32()) * BigInt(r.below(3) ? 1 : 512), r.u32()),
    what: `type ${type} flags 0x${flags.toString(16)} random range`,
  };
}

/** Validates one finished reply against the expectation and the shadow. */
function judge(op: TxOp, o: Outcome, ses: Session, shadow: Shadow, exp: Expectation): void {
  const r = op.r;
  const what = `${op.what} (cookie ${r.cookie})`;
  if (ses.structured && r.type === CMD.READ) {
    assert.ok(
      !o.shape.includes("simple"),
      `${what}: simple reply to a READ with structured replies`,
    );
  }
  if (!ses.structured) {
    assert.deepEqual(o.shape, ["simple"], `${what}: chunks without structured replies`);
  }
  if (exp.must.size > 0) {
    assert.ok(
      exp.must.has(o.error) || exp.may.has(o.error),
      `${what}: error ${o.error}, expected one of ${[...exp.must]}`,
    );
    return;
  }
  if (o.error !== 0) {
    assert.ok(exp.may.has(o.error), `${what}: error ${o.error}, expected success`);
    return;
  }
  const off = Number(r.offset);
  switch (r.type) {
    case CMD.READ:
      shadow.check(off, o.data!, what);
      break;
    case CMD.WRITE:
      shadow.write(off, op.payload!);
      break;
    case CMD.WRITE_ZEROES:
      shadow.zero(off, r.length);
      break;
    case CMD.TRIM:
      shadow.forget(off, r.length);
      break;
    case CMD.BLOCK_STATUS: {
      if (r.length === 0) break;
      const list = o.extents!.get(ses.contextId!);
      assert.ok(list && o.extents!.size === 1, `${what}: extents for ${[...o.extents!.keys()]}`);
      if ((r.flags ?? 0) & CMD_FLAG.REQ_ONE) {
        assert.equal(list.length, 1, `${what}: REQ_ONE gave ${list.length} extents`);
        assert.ok(list[0][0] <= r.length, `${what}: REQ_ONE extent ${list[0][0]} > ${r.length}`);
      } else {
        const sum = list.slice(0, -1).reduce((a, [l]) => a + l, 0);
        assert.ok(sum < r.length, `${what}: extents run past the range`);
      }
      let at = off;
      for (const [l, f] of list) {
        assert.equal(f & ~3, 0, `${what}: extent flags ${f}`);
        if (f & 2) shadow.checkZero(at, Math.min(l, off + r.length - at), what);
        at += l;
      }
      break;
    }
  }
}

/** Requests the fuzzer sent that must fail (or end the connection). */
let malformed = 0;

/** One fuzzed transmission session; returns how many requests it made. */
async function fuzzSession(s: Serve, seed: number, shadow: Shadow, log: string[]): Promise<number> {
  const r = rng(seed);
  const c = await RawConn.unix(s.socket);
  let count = 0;
  await c.within(30_000, `session seed ${seed}`, async () => {
    const structured = r.below(4) !== 0;
    const ses = await c.negotiate({
      name: pick(r, [NAME, ""]),
      structured,
      meta: structured && r.below(4) !== 0,
      exportName: r.below(8) === 0,
    });
    log.push(`sr=${ses.structured} ctx=${ses.contextId} flags=0x${ses.flags.toString(16)}`);
    assert.equal(ses.size, SIZE);
    const n = 5 + r.below(60);
    for (let i = 0; i < n; i++) {
      // Sometimes a pipelined batch of side-effect-free requests.
      if (r.below(10) === 0) {
        count += await pipelined(c, r, ses, shadow, log);
        continue;
      }
      const op = txOp(r, ses);
      log.push(op.what);
      count++;
      const sent = op.raw !== undefined ? await c.write(op.raw) : await c.send(op.r, op.payload);
      if (op.fatal) malformed++;
      if (op.fatal === "close") {
        const rest = await c.readToEof();
        assert.equal(rest.length, 0, `${op.what}: got ${rest.length} bytes instead of a close`);
        return;
      }
      if (op.fatal === "eof") {
        await c.closeWrite();
        // Possibly an error reply (the server gave up on the payload), then the close.
        const rest = await c.readToEof();
        assert.ok(
          rest.length === 0 || rest.length === 16 || rest.length >= 20,
          `${op.what}: ${rest.length} bytes`,
        );
        return;
      }
      const exp = expectation(op.r, ses, SIZE);
      if (exp.must.size > 0) malformed++;
      if (!sent) {
        assert.ok(exp.mayClose, `${op.what}: the server closed the connection`);
        return;
      }
      let o: Outcome;
      try {
        o = await c.outcome(op.r);
      } catch (e) {
        if (e instanceof Eof && e.got === 0 && exp.mayClose) return;
        throw e;
      }
      judge(op, o, ses, shadow, exp);
    }
    // End: DISC, DISC with a length, EOF, or just close.
    switch (r.below(4)) {
      case 0:
        log.push("DISC");
        await c.send(req(CMD.DISC, 0, 0));
        await expectSilentClose(c, "DISC");
        break;
      case 1:
        log.push("DISC with length");
        await c.send(req(CMD.DISC, 512, 512));
        await expectSilentClose(c, "DISC with a length");
        break;
      case 2:
        log.push("EOF");
        await c.closeWrite();
        await expectSilentClose(c, "EOF in transmission");
        break;
      default:
        log.push("close");
    }
  });
  return count;
}

/** Sends up to 16 side-effect-free requests at once and matches the replies by cookie. */
async function pipelined(
  c: RawConn,
  r: Rng,
  ses: Session,
  shadow: Shadow,
  log: string[],
): Promise<number> {
  const ops: TxOp[] = [];
  const k = 2 + r.below(15);
  while (ops.length < k) {
    const op = txOp(r, ses);
    if (
      op.fatal || op.payload || op.raw ||
      ([CMD.TRIM, CMD.WRITE_ZEROES] as number[]).includes(op.r.type)
    ) {
      continue;
    }
    if (expectation(op.r, ses, SIZE).mayClose) continue;
    ops.push(op);
  }
  log.push(`pipelined [${ops.map((o) => o.what).join("; ")}]`);
  await c.write(be().bytes(concat(ops.map((o) => request(o.r)))).build());
  const pending = new Map(ops.map((o) => [o.r.cookie, { op: o, b: new OutcomeBuilder(o.r) }]));
  let left = ops.length;
  while (left > 0) {
    const rep = await c.reply((cookie) => {
      const p = pending.get(cookie);
      return p && p.op.r.type === CMD.READ ? p.op.r.length : 0;
    });
    const p = pending.get(rep.cookie);
    assert.ok(p, `reply for cookie ${rep.cookie}, not in flight`);
    p.b.add(rep);
    if (p.b.done) {
      const exp = expectation(p.op.r, ses, SIZE);
      if (exp.must.size > 0) malformed++;
      judge(p.op, p.b.finish(), ses, shadow, exp);
      pending.delete(rep.cookie);
      left--;
    }
  }
  return ops.length;
}

function concat(parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((a, p) => a + p.length, 0));
  let at = 0;
  for (const p of parts) out.set(p, at), at += p.length;
  return out;
}

Deno.test(`NBD fuzz: ${TRANSMISSION_CONNECTIONS} sessions of malformed requests, then a greedy client (seed ${SEED})`, () =>
  withServer(false, async (s, contents) => {
    const shadow = new Shadow(contents);
    const rss = { kib: 0 };
    const t0 = Date.now();
    let requests = 0;
    for (let i = 0; i < TRANSMISSION_CONNECTIONS; i++) {
      const seed = mixSeed(SEED ^ 0x5eed, i);
      const log: string[] = [];
      try {
        requests += await fuzzSession(s, seed, shadow, log);
      } catch (e) {
        throw new Error(
          `session ${i} (seed ${seed}; the shadow depends on earlier sessions): ` +
            `${log.slice(-12).join(" → ")}\n${e instanceof Error ? e.stack : e}`,
        );
      }
      if (i % 10 === 0) checkRss(s, rss);
    }
    checkRss(s, rss);
    const fuzzMs = Date.now() - t0;

    // A client that pipelines 48 reads of 32 MiB and never reads the replies: the server must
    // stop reading its requests (bounded in-flight bytes), not buffer 1.5 GiB.
    const greedy = await session(s);
    try {
      const reqs = Array.from(
        { length: 48 },
        (_, i) => request(req(CMD.READ, (i % 2) * 8 * MiB, MAX_PAYLOAD)),
      );
      // The writes themselves may block once the server stops reading: don't await them.
      const writing = greedy.c.write(concat(reqs)).catch(() => false);
      for (let i = 0; i < 15; i++) {
        await new Promise((resolve) => setTimeout(resolve, 200));
        checkRss(s, rss);
      }
      // The first reply is still well-formed.
      const first = await greedy.c.within(20_000, "greedy client's first reply", async (c) => {
        return await c.reply(() => MAX_PAYLOAD);
      });
      assert.equal(first.kind, "chunk");
      assert.ok(first.cookie > 0n);
      greedy.c.close();
      await writing;
    } finally {
      greedy.c.close();
    }
    await new Promise((resolve) => setTimeout(resolve, 500));
    checkRss(s, rss);
    await assertServing(s, shadow);
    console.log(
      `${TRANSMISSION_CONNECTIONS} sessions, ${requests} requests (${malformed} malformed) ` +
        `in ${fuzzMs} ms; ` +
        `max RSS ${Math.round(rss.kib / 1024)} MiB`,
    );
  }));

Deno.test("NBD: pipelined sparse structured reads each get their own bytes", () =>
  withTempDir(async (dir) => {
    // Every 256 KiB block: 32 KiB of data, a 32 KiB hole, 192 KiB of data — a small data chunk
    // (copied into the reply buffer), a hole, and a large one (sent from the read buffer).
    const size = 32 * MiB, block = 256 * KiB;
    const contents = new Uint8Array(size);
    const pieces: [number, Uint8Array][] = [];
    const r = rng(99);
    for (let off = 0; off < size; off += block) {
      for (const [a, b] of [[0, 32 * KiB], [64 * KiB, block]]) {
        const piece = r.fill(contents.subarray(off + a, off + b));
        pieces.push([off + a, piece]);
      }
    }
    const img = `${dir}/sparse.img`;
    sparseImage(img, size, pieces);
    const s = await Serve.start(`tap:aio:${img}`, { unix: `${dir}/s.sock`, exportName: NAME });
    try {
      for (let round = 0; round < 5; round++) {
        const { c } = await session(s);
        await within(c, 30_000, async () => {
          // Two batches of 64 reads, the replies left unread for a while: the socket fills up,
          // the first batch's replies wait in the server, and the second batch's reads run in
          // buffers the first batch let go of (they must not be the ones still being sent).
          const reqs = Array.from(
            { length: 128 },
            (_, i) => req(CMD.READ, ((i * 37 + round) % (size / block)) * block, block),
          );
          for (const batch of [reqs.slice(0, 64), reqs.slice(64)]) {
            await c.write(concat(batch.map(request)));
            await new Promise((resolve) => setTimeout(resolve, 300));
          }
          const pending = new Map(reqs.map((q) => [q.cookie, new OutcomeBuilder(q)]));
          for (let left = reqs.length; left > 0;) {
            const rep = await c.reply();
            const o = pending.get(rep.cookie);
            assert.ok(o, `reply for cookie ${rep.cookie}`);
            o.add(rep);
            if (!o.done) continue;
            left--;
            const q = reqs.find((x) => x.cookie === rep.cookie)!;
            const out = o.finish();
            assert.equal(out.error, 0);
            const off = Number(q.offset);
            assertBytes(
              out.data!,
              contents.subarray(off, off + block),
              `READ ${off}+${block} (${out.shape})`,
            );
          }
        });
      }
    } catch (e) {
      await s.kill();
      throw new Error(
        `${e instanceof Error ? e.stack : e}\n--- tapd serve stderr ---\n${s.stderr}`,
      );
    }
    assert.equal((await s.stop()).code, 0);
  }));
