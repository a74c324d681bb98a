/**
 * `tapd serve` driven by the real NBD clients, each checked on real outcomes: qemu-img (convert
 * both ways, compare over TCP and Unix, raw and qcow targets), qemu-io (patterns, zeroes, FUA,
 * discard, flush; data kept across a restart), nbdinfo (flags, block sizes, --map of a sparse
 * qcow, --list), nbdcopy (both ways, multi-conn), fio's nbd engine (verified random writes on
 * one and two connections), a read-only export, two clients on two listeners at once, and
 * SIGTERM (exit 0, socket removed, connected clients let go).
 */
import assert from "node:assert/strict";
import { assertBytes, rng, withTempDir } from "../util.ts";
import {
  describe,
  KiB,
  MiB,
  qemuIoOk,
  RawConn,
  REFERENCE_SERVER,
  run,
  runOk,
  Serve,
  sparseImage,
  tapdOk,
} from "./helpers.ts";

const SIZE = 16 * MiB;

/** A source image: random data pieces, written zeros and holes (what convert/nbdcopy must keep). */
function makeSource(path: string, seed: number, size = SIZE): Uint8Array {
  const r = rng(seed);
  const contents = new Uint8Array(size);
  const pieces: [number, Uint8Array][] = [];
  for (let off = 0, i = 0; off < size; i++) {
    const n = Math.min(size - off, (1 + r.below(24)) * 32 * KiB + (i % 3 === 0 ? 512 : 0));
    switch (i % 4) {
      case 0:
      case 2:
        r.fill(contents.subarray(off, off + n));
        pieces.push([off, contents.subarray(off, off + n)]);
        break;
      case 1: // written zeros
        pieces.push([off, new Uint8Array(n)]);
        break;
      default: // hole
    }
    off += n;
  }
  sparseImage(path, size, pieces);
  return contents;
}

function emptyRaw(path: string, size = SIZE): void {
  sparseImage(path, size, []);
}

function readFile(path: string): Uint8Array {
  return Deno.readFileSync(path);
}

async function socketGone(path: string): Promise<boolean> {
  try {
    await Deno.lstat(path);
    return false;
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) return true;
    throw e;
  }
}

/** Stops the server with SIGTERM and checks the exit status and the socket file. */
async function stopCleanly(s: Serve): Promise<void> {
  const r = await s.stop();
  assert.equal(r.code, 0, `tapd serve exit ${r.code} (${r.signal}) after SIGTERM:\n${r.stderr}`);
  if (s.options.unix !== undefined && !REFERENCE_SERVER) {
    assert.ok(await socketGone(s.options.unix), `socket ${s.options.unix} left behind`);
  }
}

/** Starts a server for the duration of `fn`; killed if `fn` throws, stopped cleanly otherwise. */
async function serving(
  spec: string,
  options: Parameters<typeof Serve.start>[1],
  fn: (s: Serve) => Promise<void>,
): Promise<void> {
  const s = await Serve.start(spec, options);
  try {
    await fn(s);
  } catch (e) {
    await s.kill();
    throw new Error(`${e instanceof Error ? e.stack : e}\n--- tapd serve stderr ---\n${s.stderr}`);
  }
  await stopCleanly(s);
}

async function qemuCompare(a: string, aFmt: string, b: string, bFmt: string): Promise<void> {
  const args = ["compare", "-f", aFmt, "-F", bFmt, a, b];
  const r = await run("qemu-img", args);
  assert.equal(r.code, 0, describe("qemu-img", args, r));
  assert.match(r.stdout, /Images are identical/, describe("qemu-img", args, r));
}

// ---------------------------------------------------------------------------------------------

for (const kind of ["raw", "qcow"] as const) {
  Deno.test(`qemu-img convert into and out of a ${kind} export, compared over unix and tcp`, () =>
    withTempDir(async (dir) => {
      const src = `${dir}/src.img`;
      const contents = makeSource(src, kind === "raw" ? 11 : 12);
      const target = `${dir}/target.${kind}`;
      if (kind === "raw") emptyRaw(target);
      else await tapdOk("qcow-create", "16", target);
      const spec = `tap:${kind === "raw" ? "aio" : "qcow"}:${target}`;
      await serving(spec, { unix: `${dir}/s.sock`, tcp: true }, async (s) => {
        await runOk("qemu-img", ["convert", "-n", "-f", "raw", "-O", "raw", src, s.unixUri]);
        await qemuCompare(src, "raw", `nbd://127.0.0.1:${s.tcpPort}/`, "raw");
        await qemuCompare(src, "raw", s.unixUri, "raw");
        const out = `${dir}/out.img`;
        await runOk("qemu-img", ["convert", "-f", "raw", "-O", "raw", s.tcpUri, out]);
        assertBytes(readFile(out), contents, "qemu-img convert from the export");
        const info = await runOk("qemu-img", ["info", "--output=json", "-f", "raw", s.unixUri]);
        assert.equal(JSON.parse(info.stdout)["virtual-size"], SIZE);
      });
      // What the clients wrote is in the image once the server has stopped.
      if (kind === "raw") assertBytes(readFile(target), contents, "target image");
      else await qemuCompare(src, "raw", target, "qcow");
    }));
}

/** qemu-io commands and the contents they leave (patterns, zeroes; discard left out). */
function qemuIoScript(): {
  commands: string[];
  expect: (buf: Uint8Array) => void;
  reads: string[];
} {
  const writes: [number, number, number, string][] = [
    // [pattern, offset, length, extra flags]
    [0xa1, 0, 64 * KiB, ""],
    [0xa2, 1 * MiB, 1 * MiB, ""],
    [0xa3, 3 * MiB + 512, 5 * 512, ""],
    [0xa4, 5 * MiB + 7000, 3000, ""], // unaligned: qemu reads, modifies, writes 512-byte blocks
    [0xa5, 6 * MiB, 4 * KiB, "-f "], // FUA
    [0xa6, 7 * MiB - 4 * KiB, 2 * MiB + 8 * KiB, ""], // across a MiB boundary, 2 MiB+
    [0xa7, SIZE - 64 * KiB, 64 * KiB, "-f "], // the last block
    [0, 1 * MiB + 256 * KiB, 128 * KiB, "-z "], // WRITE_ZEROES (NO_HOLE) over written data
    [0, 10 * MiB, 64 * KiB, "-z -u "], // WRITE_ZEROES, may punch
    [0xa8, 11 * MiB, 32 * KiB, ""],
  ];
  const commands: string[] = [], reads: string[] = [];
  for (const [p, off, len, extra] of writes) {
    commands.push(
      "-c",
      extra.includes("-z") ? `write ${extra}${off} ${len}` : `write ${extra}-P ${p} ${off} ${len}`,
    );
  }
  commands.push("-c", `discard ${12 * MiB} ${256 * KiB}`, "-c", "flush");
  const expect = (buf: Uint8Array) => {
    for (const [p, off, len] of writes) buf.fill(p, off, off + len);
  };
  // Reads: every written range with what it must hold now, and untouched ranges as zeros.
  const final = new Uint8Array(SIZE);
  expect(final);
  const ranges: [number, number][] = [
    [0, 64 * KiB],
    [64 * KiB, 1 * MiB - 64 * KiB],
    [1 * MiB, 256 * KiB],
    [1 * MiB + 256 * KiB, 128 * KiB],
    [1 * MiB + 384 * KiB, 640 * KiB],
    [3 * MiB, 4 * KiB],
    [5 * MiB + 7000, 3000],
    [5 * MiB + 6144, 856],
    [5 * MiB + 10000, 240],
    [6 * MiB, 4 * KiB],
    [7 * MiB - 4 * KiB, 2 * MiB + 8 * KiB],
    [10 * MiB, 64 * KiB],
    [11 * MiB, 32 * KiB],
    [SIZE - 64 * KiB, 64 * KiB],
  ];
  for (const [off, len] of ranges) {
    const slice = final.subarray(off, off + len);
    // Split a range into runs of one byte value (read -P checks a single pattern).
    for (let i = 0; i < len;) {
      let j = i;
      while (j < len && slice[j] === slice[i]) j++;
      reads.push("-c", `read -P ${slice[i]} ${off + i} ${j - i}`);
      i = j;
    }
  }
  return { commands, expect, reads };
}

for (const kind of ["raw", "qcow"] as const) {
  Deno.test(`qemu-io patterns, zeroes, FUA, discard, flush on a ${kind} export survive a restart`, () =>
    withTempDir(async (dir) => {
      const target = `${dir}/t.${kind}`;
      if (kind === "raw") emptyRaw(target);
      else await tapdOk("qcow-create", "16", target);
      const spec = `tap:${kind === "raw" ? "aio" : "qcow"}:${target}`;
      const sock = `${dir}/s.sock`;
      const { commands, expect, reads } = qemuIoScript();
      await serving(spec, { unix: sock }, async (s) => {
        const r = await qemuIoOk(["-f", "raw", ...commands, ...reads, s.unixUri]);
        assert.ok(!/Pattern verification failed/.test(r.stdout), r.stdout);
      });
      // A new server on the same image: everything is still there.
      await serving(spec, { unix: sock, tcp: true }, async (s) => {
        const r = await qemuIoOk(["-f", "raw", ...reads, s.tcpUri]);
        assert.ok(!/Pattern verification failed/.test(r.stdout), r.stdout);
      });
      const expected = new Uint8Array(SIZE);
      expect(expected);
      const actual = kind === "raw" ? readFile(target) : await qcowContents(dir, target);
      // The discarded range is undefined; compare everything else.
      actual.fill(0, 12 * MiB, 12 * MiB + 256 * KiB);
      assertBytes(actual, expected, "image after qemu-io");
    }));
}

async function qcowContents(dir: string, qcow: string): Promise<Uint8Array> {
  const out = `${dir}/qcow-contents.raw`;
  await runOk("qemu-img", ["convert", "-f", "qcow", "-O", "raw", qcow, out]);
  const bytes = readFile(out);
  Deno.removeSync(out);
  return bytes;
}

Deno.test("nbdinfo: flags, block sizes, the export name, --list", () =>
  withTempDir(async (dir) => {
    const img = `${dir}/d.img`;
    emptyRaw(img);
    await serving(
      `tap:aio:${img}`,
      { unix: `${dir}/s.sock`, tcp: true, exportName: "disk" },
      async (s) => {
        assert.match(s.unixUri, /^nbd\+unix:\/\/\/disk\?socket=/);
        assert.match(s.tcpUri, /^nbd:\/\/127\.0\.0\.1:\d+\/disk$/);
        for (const uri of [s.unixUri, s.tcpUri]) {
          const j = JSON.parse((await runOk("nbdinfo", ["--json", uri])).stdout);
          assert.equal(j.protocol, "newstyle-fixed");
          assert.equal(j.structured, true);
          const e = j.exports[0];
          assert.equal(e["export-name"], "disk");
          assert.equal(e["export-size"], SIZE);
          assert.equal(e.is_read_only, false);
          assert.equal(e.can_flush, true);
          assert.equal(e.can_fua, true);
          assert.equal(e.can_multi_conn, true);
          assert.equal(e.can_trim, true);
          assert.equal(e.can_zero, true);
          if (!REFERENCE_SERVER) assert.equal(e.can_fast_zero, true);
          assert.equal(e.can_cache, true);
          assert.deepEqual(e.contexts, ["base:allocation"]);
          if (!REFERENCE_SERVER) {
            assert.equal(e.block_size_minimum, 512);
            assert.equal(e.block_size_preferred, 4096);
            assert.equal(e.block_size_maximum, 32 * MiB);
          }
        }
        const size = await runOk("nbdinfo", ["--size", s.unixUri]);
        assert.equal(size.stdout.trim(), String(SIZE));
        // The default export "" is this disk too.
        const base = s.unixUri.replace("/disk?", "/?");
        assert.equal((await runOk("nbdinfo", ["--size", base])).stdout.trim(), String(SIZE));
        // --list: one export, named.
        const list = JSON.parse((await runOk("nbdinfo", ["--list", "--json", s.unixUri])).stdout);
        assert.deepEqual(list.exports.map((e: { "export-name": string }) => e["export-name"]), [
          "disk",
        ]);
        const text = await runOk("nbdinfo", ["--list", s.tcpUri]);
        assert.match(text.stdout, /export="disk":/);
        // An unknown export name is refused (GO → ERR_UNKNOWN), not served.
        const bad = await run("nbdinfo", ["--size", s.unixUri.replace("/disk?", "/nope?")]);
        assert.notEqual(bad.code, 0, describe("nbdinfo", ["--size", "…/nope"], bad));
      },
    );
  }));

/** nbdinfo --map --json extents, adjacent extents of one type merged. */
async function map(uri: string): Promise<[number, number, number][]> {
  const out = JSON.parse((await runOk("nbdinfo", ["--map", "--json", uri])).stdout) as {
    offset: number;
    length: number;
    type: number;
  }[];
  const merged: [number, number, number][] = [];
  let expectOffset = 0;
  for (const e of out) {
    assert.equal(e.offset, expectOffset, `extents not contiguous: ${JSON.stringify(out)}`);
    expectOffset += e.length;
    const last = merged.at(-1);
    if (last && last[2] === e.type) last[1] += e.length;
    else merged.push([e.offset, e.length, e.type]);
  }
  return merged;
}

Deno.test("nbdinfo --map shows a sparse qcow's data and holes at the right offsets", () =>
  withTempDir(async (dir) => {
    const img = `${dir}/sparse.qcow`;
    await tapdOk("qcow-create", "16", img);
    const data: [number, number][] = [
      [0, 64 * KiB],
      [1 * MiB, 4 * KiB],
      [5 * MiB + 8 * KiB, 128 * KiB],
      [SIZE - 4 * KiB, 4 * KiB],
    ];
    await qemuIoOk([
      "-f",
      "qcow",
      ...data.flatMap(([o, l]) => ["-c", `write -P 7 ${o} ${l}`]),
      img,
    ]);
    const expected: [number, number, number][] = [];
    let at = 0;
    for (const [o, l] of data) {
      if (o > at) expected.push([at, o - at, 3]);
      expected.push([o, l, 0]);
      at = o + l;
    }
    if (at < SIZE) expected.push([at, SIZE - at, 3]);
    await serving(`tap:qcow:${img}`, { unix: `${dir}/s.sock`, readOnly: true }, async (s) => {
      assert.deepEqual(await map(s.unixUri), expected);
      const text = await runOk("nbdinfo", ["--map", s.unixUri]);
      assert.match(text.stdout, /hole,zero/);
      assert.match(text.stdout, /\bdata\b/);
    });
    // The same through a raw sparse file (SEEK_DATA/SEEK_HOLE; ext4 blocks are 4 KiB).
    const raw = `${dir}/sparse.img`;
    sparseImage(raw, SIZE, data.map(([o, l]) => [o, new Uint8Array(l).fill(7)]));
    await serving(`tap:aio:${raw}`, { unix: `${dir}/r.sock` }, async (s) => {
      assert.deepEqual(await map(s.unixUri), expected);
    });
  }));

Deno.test("nbdcopy into and out of an export (multi-conn), with --flush", () =>
  withTempDir(async (dir) => {
    const src = `${dir}/src.img`;
    const contents = makeSource(src, 21);
    const target = `${dir}/t.img`;
    emptyRaw(target);
    await serving(`tap:aio:${target}`, { unix: `${dir}/s.sock`, tcp: true }, async (s) => {
      // Four connections only if the export advertises CAN_MULTI_CONN (files count as yes).
      const w = await runOk("nbdcopy", ["-v", "-C", "4", "-T", "4", "--flush", src, s.unixUri]);
      const conns = /connections=(\d+)/.exec(w.stderr);
      assert.ok(conns, `nbdcopy -v printed no connections= line`);
      assert.equal(
        conns[1],
        "4",
        `nbdcopy used ${conns[1]} connections (multi-conn not advertised?)`,
      );
      const out = `${dir}/out.img`;
      await runOk("nbdcopy", ["--flush", s.tcpUri, out]);
      assertBytes(readFile(out), contents, "nbdcopy export → file");
      const out2 = `${dir}/out2.img`;
      await runOk("nbdcopy", [s.unixUri, out2]); // default connections and threads
      assertBytes(readFile(out2), contents, "nbdcopy export → file (defaults)");
      await runOk("cmp", [src, out2]);
      // Export → export (a second server): both sides advertise multi-conn.
      const copy = `${dir}/copy.img`;
      emptyRaw(copy);
      await serving(`tap:aio:${copy}`, { unix: `${dir}/c.sock` }, async (c) => {
        const x = await runOk("nbdcopy", [
          "-v",
          "-C",
          "2",
          "-T",
          "2",
          "--flush",
          s.tcpUri,
          c.unixUri,
        ]);
        assert.match(x.stderr, /connections=2/);
      });
      assertBytes(readFile(copy), contents, "nbdcopy export → export");
    });
    assertBytes(readFile(target), contents, "target after nbdcopy --flush and SIGTERM");
  }));

/** fio's JSON: every job finished without error; returns the jobs. */
function fioJobs(
  r: { stdout: string },
): { error: number; read: { io_bytes: number }; write: { io_bytes: number } }[] {
  const json = JSON.parse(r.stdout.slice(r.stdout.indexOf("{")));
  for (const j of json.jobs) assert.equal(j.error, 0, `fio job ${j.jobname} error ${j.error}`);
  return json.jobs;
}

Deno.test("fio's nbd engine: verified random writes on one and on two connections", () =>
  withTempDir(async (dir) => {
    const target = `${dir}/t.img`;
    emptyRaw(target);
    // fio keeps its verify state files in its working directory: run it in the temp dir.
    const fio = (args: string[]) => runOk("fio", args, { cwd: dir });
    await serving(`tap:aio:${target}`, { unix: `${dir}/s.sock`, tcp: true }, async (s) => {
      // --uri is an option of the nbd engine: it must come after --ioengine.
      const common = [
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=32",
        "--verify=crc32c",
        "--verify_fatal=1",
        "--output-format=json",
      ];
      // Write then verify in one job (one connection).
      const one = await fio([
        "--name=one",
        "--ioengine=nbd",
        `--uri=${s.unixUri}`,
        "--size=8M",
        ...common,
      ]);
      const [j] = fioJobs(one);
      assert.equal(j.write.io_bytes, 8 * MiB);
      assert.equal(j.read.io_bytes, 8 * MiB, "the verify pass read everything back");
      // Two jobs = two connections, on disjoint halves, over TCP.
      const two = await fio([
        "--name=two",
        "--ioengine=nbd",
        `--uri=${s.tcpUri}`,
        "--numjobs=2",
        "--size=4M",
        "--offset=8M",
        "--offset_increment=4M",
        ...common,
      ]);
      const jobs = fioJobs(two);
      assert.equal(jobs.length, 2);
      for (const job of jobs) assert.equal(job.read.io_bytes, 4 * MiB);
      // Written by one fio process, verified by another (verify_only re-derives the same data).
      const wargs = [
        "--name=split",
        "--ioengine=nbd",
        `--uri=${s.unixUri}`,
        "--size=4M",
        "--offset=12M",
        ...common,
      ];
      await fio([...wargs, "--do_verify=0"]);
      const v = await fio([...wargs, "--verify_only"]);
      assert.equal(fioJobs(v)[0].read.io_bytes, 4 * MiB);
    });
  }));

Deno.test("a read-only export: reads work, writes are refused, nbdinfo says so", () =>
  withTempDir(async (dir) => {
    const img = `${dir}/ro.img`;
    const contents = makeSource(img, 31);
    await serving(
      `tap:aio:${img}`,
      { unix: `${dir}/s.sock`, tcp: true, readOnly: true },
      async (s) => {
        const e = JSON.parse((await runOk("nbdinfo", ["--json", s.unixUri])).stdout).exports[0];
        assert.equal(e.is_read_only, true);
        assert.equal(e.can_trim, false);
        assert.equal(e.can_zero, false);
        const out = `${dir}/out.img`;
        await runOk("qemu-img", ["convert", "-f", "raw", "-O", "raw", s.tcpUri, out]);
        assertBytes(readFile(out), contents, "read-only export read back");
        await qemuIoOk(["-r", "-f", "raw", "-c", `read -P ${contents[0]} 0 1`, s.unixUri]);
        // qemu refuses to open a read-only export for writing (it never sends the WRITE).
        const args = ["-f", "raw", "-c", "write -P 1 0 4k", s.unixUri];
        const w = await run("qemu-io", args);
        assert.notEqual(w.code, 0, describe("qemu-io", args, w));
        assert.match(w.stdout + w.stderr, /Permission denied|read-only|not permitted/i);
        // nbdcopy into it fails too.
        const c = await run("nbdcopy", [img, s.unixUri]);
        assert.notEqual(c.code, 0, describe("nbdcopy", [img, s.unixUri], c));
      },
    );
    assertBytes(readFile(img), contents, "read-only image unchanged");
  }));

Deno.test("a unix and a tcp listener at once, two clients at the same time", () =>
  withTempDir(async (dir) => {
    const img = `${dir}/t.img`;
    emptyRaw(img);
    await serving(`tap:aio:${img}`, { unix: `${dir}/s.sock`, tcp: true }, async (s) => {
      const half = SIZE / 2;
      const writer = (uri: string, base: number, p: number) => {
        const cmds: string[] = [];
        for (let off = base; off < base + half; off += 512 * KiB) {
          cmds.push(
            "-c",
            `write -P ${p} ${off} ${256 * KiB}`,
            "-c",
            `read -P ${p} ${off} ${256 * KiB}`,
          );
        }
        return qemuIoOk(["-f", "raw", ...cmds, uri]);
      };
      await Promise.all([writer(s.unixUri, 0, 0x5a), writer(s.tcpUri, half, 0xa5)]);
      // Each client sees what the other wrote (one open disk behind both listeners).
      await qemuIoOk(["-f", "raw", "-c", `read -P ${0xa5} ${half} ${256 * KiB}`, s.unixUri]);
      await qemuIoOk(["-f", "raw", "-c", `read -P ${0x5a} 0 ${256 * KiB}`, s.tcpUri]);
    });
    const bytes = readFile(img);
    assert.equal(bytes[0], 0x5a);
    assert.equal(bytes[SIZE / 2], 0xa5);
    assert.equal(bytes[256 * KiB], 0);
  }));

Deno.test("SIGTERM: exit 0, socket removed, a connected client is let go", () =>
  withTempDir(async (dir) => {
    const img = `${dir}/t.img`;
    emptyRaw(img);
    const sock = `${dir}/s.sock`;
    const s = await Serve.start(`tap:aio:${img}`, { unix: sock, tcp: true });
    let conn: RawConn | undefined, early: RawConn | undefined;
    try {
      assert.ok((await Deno.lstat(sock)).isSocket, "no socket file while serving");
      // A client in transmission, idle, and one still in the handshake.
      conn = await RawConn.unix(sock);
      await conn.negotiate();
      early = await RawConn.unix(sock);
      await early.greeting();
      const t0 = Date.now();
      const r = await s.stop(10_000);
      assert.equal(r.code, 0, `exit ${r.code} (${r.signal}):\n${r.stderr}`);
      assert.ok(Date.now() - t0 < 10_000);
      if (!REFERENCE_SERVER) assert.ok(await socketGone(sock), `socket ${sock} left behind`);
      // Both connections were closed (the transmission one may first get ESHUTDOWN-free EOF).
      for (const c of [conn, early]) {
        const rest = await c.within(5_000, "connection after SIGTERM", (x) => x.readToEof());
        assert.equal(rest.length, 0, `an idle client got ${rest.length} bytes at shutdown`);
      }
      const refused = await run("nbdinfo", ["--size", s.uris[0]], { timeoutMs: 10_000 });
      assert.notEqual(refused.code, 0, "still serving after SIGTERM");
    } finally {
      conn?.close();
      early?.close();
      await s.kill();
    }
  }));
