/**
 * Damaged qcow images: a corpus of mutated images (header fields, byte flips in the header and
 * the tables, table entries pointing anywhere, broken compressed clusters, truncated files),
 * generated from valid images with a fixed seed. tapd must refuse each with a one-line message
 * naming the file, or open it and then read, map and write it without crashing, hanging, or
 * writing far past the end of the file; a file it refuses is left untouched.
 */
import assert from "node:assert/strict";
import { openDisk } from "../../../drivers/mod.ts";
import type { Disk } from "../../../drivers/disk.ts";
import { DiskError, ImageError } from "../../../drivers/errors.ts";
import { newImageBytes, parseHeader, QCOW_MAGIC, XEN_MAGIC } from "../../../drivers/qcow/header.ts";
import { SysError } from "../../../ffi/errno.ts";
import { sharedPool } from "../../../io/buffer_pool.ts";
import type { EngineKind } from "../../../io/engine.ts";
import { type Rng, rng, withNoUnhandledRejections, withTempDir } from "../../util.ts";
import {
  assertSame,
  KiB,
  MiB,
  qemuImg,
  qemuIo,
  randomContent,
  readAll,
  run,
  SECTOR,
  withTimeout,
  writeFile,
} from "./helpers.ts";

const CASE_TIMEOUT = 5000;
const READ_LIMIT = 8 * MiB;
const GROWTH_LIMIT = 16 * MiB;

// ---- the valid images the corpus starts from ----

interface Base {
  name: string;
  bytes: Uint8Array;
  /** What the disk reads as. */
  content: Uint8Array;
  clusterBits: number;
  l2Bits: number;
  l1Offset: number;
  l1Size: number;
  /** Host offsets of the L2 tables. */
  l2Tables: number[];
  /** Byte offsets (in the file) of the non-zero L2 entries, normal and compressed. */
  normalEntries: number[];
  compressedEntries: number[];
}

function describe(name: string, bytes: Uint8Array, content: Uint8Array): Base {
  const h = parseHeader(bytes.subarray(0, 4096), bytes.length, name);
  const v = new DataView(bytes.buffer, bytes.byteOffset, bytes.length);
  const base: Base = {
    name,
    bytes,
    content,
    clusterBits: h.clusterBits,
    l2Bits: h.l2Bits,
    l1Offset: h.l1Offset,
    l1Size: h.l1Size,
    l2Tables: [],
    normalEntries: [],
    compressedEntries: [],
  };
  for (let i = 0; i < h.l1Size; i++) {
    const l2 = Number(v.getBigUint64(h.l1Offset + 8 * i));
    if (l2 === 0) continue;
    base.l2Tables.push(l2);
    for (let j = 0; j < 2 ** h.l2Bits; j++) {
      const e = v.getBigUint64(l2 + 8 * j);
      if (e === 0n) continue;
      (e >> 63n ? base.compressedEntries : base.normalEntries).push(l2 + 8 * j);
    }
  }
  return base;
}

/**
 * A Xen blktap image: the 16-byte extended header at 48, the L1 table at 4096, an L2 table and
 * a few clusters; `bigEndian` sets the flag of images written after 2008.
 */
function xenImage(bigEndian: boolean, content: Uint8Array): Uint8Array {
  const size = content.length, cs = 4096;
  const bytes = new Uint8Array(3 * cs + 4 * cs);
  const v = new DataView(bytes.buffer);
  v.setUint32(0, QCOW_MAGIC);
  v.setUint32(4, 1);
  v.setBigUint64(24, BigInt(size));
  v.setUint8(32, 12);
  v.setUint8(33, 9);
  v.setBigUint64(40, 4096n);
  v.setUint32(48, XEN_MAGIC);
  v.setUint32(52, 0x12345678);
  v.setUint32(56, 512);
  v.setUint32(60, bigEndian ? 3 : 1);
  v.setBigUint64(4096, 8192n, !bigEndian);
  [1, 2, 5, 100].forEach((cluster, k) => {
    const host = 3 * cs + k * cs;
    v.setBigUint64(8192 + 8 * cluster, BigInt(host));
    bytes.set(content.subarray(cluster * cs, (cluster + 1) * cs), host);
  });
  return bytes;
}

/** Makes the base images in `dir` (base.raw is the backing file of the backed one). */
async function makeBases(dir: string): Promise<Base[]> {
  const bases: Base[] = [];
  const r = rng(0xf022);
  const raw = writeFile(`${dir}/base.raw`, r.fill(new Uint8Array(MiB)));

  // 4 KiB clusters, three L2 tables, written by QEMU.
  await qemuImg(["create", "-q", "-f", "qcow", "plain.qcow", String(5 * MiB)], dir);
  const writes = [
    "write -P 0x11 0 4k",
    "write -P 0x22 12k 20k",
    "write -P 0x33 2044k 8k",
    "write -P 0x44 4608k 3k",
  ];
  await qemuIo(`${dir}/plain.qcow`, writes);
  bases.push(await fromFile(dir, "plain.qcow"));

  // 512-byte clusters over base.raw.
  await qemuImg(["create", "-q", "-f", "qcow", "-b", "base.raw", "-F", "raw", "backed.qcow"], dir);
  await qemuIo(`${dir}/backed.qcow`, ["write -P 0x55 0 1k", "write -P 0x66 300k 5k"]);
  bases.push(await fromFile(dir, "backed.qcow"));

  // Compressed clusters, odd size.
  writeFile(`${dir}/src.raw`, randomContent(r, MiB + 4608, 2 * KiB));
  const c = await run("qemu-img", ["convert", "-c", "-O", "qcow", "src.raw", "comp.qcow"], dir);
  assert.ok(c.code <= 1 && c.stderr === "", c.stderr); // 7.2 exits 1 after a complete image
  bases.push(await fromFile(dir, "comp.qcow"));

  // Geometries only tapd makes: 512-byte clusters with tiny L2 tables, 64 KiB clusters.
  for (const [name, clusterBits, l2Bits] of [["tiny.qcow", 9, 6], ["big.qcow", 16, 13]] as const) {
    writeFile(`${dir}/${name}`, newImageBytes({ size: 3 * MiB, clusterBits, l2Bits }));
    const disk = await openDisk(`qcow:${dir}/${name}`);
    try {
      for (const [off, len] of [[0, 4096], [40 * KiB, 70 * KiB], [3 * MiB - 8 * KiB, 8 * KiB]]) {
        await disk.write(off, r.fill(new Uint8Array(len)));
      }
    } finally {
      await disk.close();
    }
    bases.push(await fromFile(dir, name));
  }

  // A Xen blktap image (big-endian L1 flag set).
  const xenContent = new Uint8Array(4 * MiB);
  r.fill(xenContent.subarray(4096, 3 * 4096));
  r.fill(xenContent.subarray(5 * 4096, 6 * 4096));
  r.fill(xenContent.subarray(100 * 4096, 101 * 4096));
  writeFile(`${dir}/xen.qcow`, xenImage(true, xenContent));
  bases.push(await fromFile(dir, "xen.qcow"));
  assert.ok(raw.length === MiB);
  return bases;
}

/** Describes an image file; its content is what qemu-img converts it to. */
async function fromFile(dir: string, name: string): Promise<Base> {
  await qemuImg(["convert", "-f", "qcow", "-O", "raw", name, `${name}.raw`], dir);
  const content = Deno.readFileSync(`${dir}/${name}.raw`);
  Deno.removeSync(`${dir}/${name}.raw`);
  return describe(name, Deno.readFileSync(`${dir}/${name}`), content);
}

// ---- the corpus ----

interface Case {
  name: string;
  bytes: Uint8Array;
  /** The open must fail with a message matching this. */
  refuse?: RegExp;
}

function mutate(base: Base, name: string, fn: (b: Uint8Array, v: DataView) => void): Case {
  const bytes = base.bytes.slice();
  fn(bytes, new DataView(bytes.buffer));
  return { name: `${base.name}: ${name}`, bytes };
}

function refuse(c: Case, message: RegExp): Case {
  return { ...c, refuse: message };
}

const u64 = (v: DataView, off: number, x: bigint) => v.setBigUint64(off, BigInt.asUintN(64, x));

/** Header-field mutations, each applied to every base. */
function headerCases(b: Base): Case[] {
  const cases: Case[] = [];
  const len = b.bytes.length;
  const add = (name: string, fn: (bytes: Uint8Array, v: DataView) => void, why?: RegExp) => {
    const c = mutate(b, name, fn);
    cases.push(why ? refuse(c, why) : c);
  };
  add("bad magic", (_, v) => v.setUint32(0, 0x514649fa), /bad magic/);
  add("magic zero", (_, v) => v.setUint32(0, 0), /bad magic/);
  for (const version of [0, 2, 3, 99, 0xffffffff]) {
    add(`version ${version}`, (_, v) => v.setUint32(4, version), /version/);
  }
  add("size 0", (_, v) => u64(v, 24, 0n), /virtual size/);
  add("size 1", (_, v) => u64(v, 24, 1n), /virtual size/);
  add("size 511", (_, v) => u64(v, 24, 511n), /virtual size/);
  add("size 512", (_, v) => u64(v, 24, 512n));
  add("size 513", (_, v) => u64(v, 24, 513n));
  add("size one sector less", (_, v) => u64(v, 24, v.getBigUint64(24) - 512n));
  add("size 2^40", (_, v) => u64(v, 24, 1n << 40n)); // the L1 table may fit (64 KiB clusters)
  add("size 2^62", (_, v) => u64(v, 24, 1n << 62n), /virtual size/);
  add("size 2^64-1", (_, v) => u64(v, 24, -1n), /virtual size/);
  add("size 2^53-512", (_, v) => u64(v, 24, (1n << 53n) - 512n), /virtual size|L1 table/);
  for (const bits of [0, 8, 17, 63, 255]) {
    add(`cluster_bits ${bits}`, (_, v) => v.setUint8(32, bits), /cluster_bits/);
  }
  for (const bits of [9, 10, 16]) add(`cluster_bits ${bits}`, (_, v) => v.setUint8(32, bits));
  for (const bits of [0, 5, 14, 255]) {
    add(`l2_bits ${bits}`, (_, v) => v.setUint8(33, bits), /l2_bits/);
  }
  for (const bits of [6, 13]) add(`l2_bits ${bits}`, (_, v) => v.setUint8(33, bits));
  add("crypt_method 1 (AES)", (_, v) => v.setUint32(36, 1), /encrypted/);
  for (const m of [2, 0xffffffff]) {
    add(`crypt_method ${m}`, (_, v) => v.setUint32(36, m), /crypt_method/);
  }
  add("l1_table_offset 0", (_, v) => u64(v, 40, 0n), /L1 table/);
  add("l1_table_offset 47", (_, v) => u64(v, 40, 47n), /L1 table/);
  add("l1_table_offset at EOF", (_, v) => u64(v, 40, BigInt(len)), /L1 table/);
  add("l1_table_offset past EOF", (_, v) => u64(v, 40, BigInt(len + 4096)), /L1 table/);
  add("l1_table_offset 2^62", (_, v) => u64(v, 40, 1n << 62n), /L1 table/);
  add("l1_table_offset 2^64-8", (_, v) => u64(v, 40, -8n), /L1 table/);
  add("l1_table_offset +1 (unaligned)", (_, v) => u64(v, 40, BigInt(b.l1Offset + 1)));
  add("l1_table_offset +4 (unaligned)", (_, v) => u64(v, 40, BigInt(b.l1Offset + 4)));
  add("l1_table_offset 48", (_, v) => u64(v, 40, 48n));
  add("l1_table_offset last byte", (_, v) => u64(v, 40, BigInt(len - 1)), /L1 table/);
  add("mtime set", (_, v) => v.setUint32(20, 0xdeadbeef));
  add("padding set", (_, v) => v.setUint16(34, 0xffff));
  add("backing offset past EOF", (_, v) => {
    u64(v, 8, BigInt(len + 100));
    v.setUint32(16, 8);
  }, /backing file name/);
  add("backing offset 2^62", (_, v) => {
    u64(v, 8, 1n << 62n);
    v.setUint32(16, 8);
  }, /backing file name/);
  add("backing name ends past EOF", (_, v) => {
    u64(v, 8, BigInt(len - 4));
    v.setUint32(16, 8);
  }, /backing file name/);
  add("backing size 0", (_, v) => {
    u64(v, 8, 48n);
    v.setUint32(16, 0);
  }, /backing file name/);
  add("backing size 1024", (_, v) => {
    u64(v, 8, 48n);
    v.setUint32(16, 1024);
  }, /backing file name/);
  add("backing size 2^32-1", (_, v) => {
    u64(v, 8, 48n);
    v.setUint32(16, 0xffffffff);
  }, /backing file name/);
  add("backing name in the header (offset 8)", (_, v) => {
    u64(v, 8, 8n);
    v.setUint32(16, 16);
  }, /backing file/);
  add("backing file missing", (bytes, v) => {
    // "nosuch.raw" at the end of the file
    const name = new TextEncoder().encode("nosuch.raw");
    const at = bytes.length - name.length;
    bytes.set(name, at);
    u64(v, 8, BigInt(at));
    v.setUint32(16, name.length);
  }, /backing file.*nosuch/);
  add("backing file is a directory", (bytes, v) => {
    bytes[bytes.length - 1] = ".".charCodeAt(0);
    u64(v, 8, BigInt(bytes.length - 1));
    v.setUint32(16, 1);
  }, /backing file/);
  add("backing offset cleared", (_, v) => u64(v, 8, 0n));
  // Xen extended header (only where nothing else lives at 48).
  if (!b.name.startsWith("backed") && !b.name.startsWith("xen")) {
    for (const flags of [0, 1, 2, 3]) {
      add(`Xen header, flags ${flags}, L1 in place`, (bytes, v) => {
        const l1 = bytes.slice(b.l1Offset, b.l1Offset + 8 * b.l1Size);
        v.setUint32(48, XEN_MAGIC);
        v.setUint32(52, 0);
        v.setUint32(56, 512);
        v.setUint32(60, flags);
        // The Xen header overlays the start of the L1 table when L1 is at 48: keep the
        // L1 table valid by moving it after the Xen header.
        if (b.l1Offset < 64) {
          bytes.set(l1, 64);
          u64(v, 40, 64n);
        }
      });
    }
  }
  if (b.name.startsWith("xen")) {
    add("Xen, big-endian flag cleared (pre-2008 little-endian L1)", (_, v) => {
      v.setUint32(60, 1);
    }, /little-endian/);
    add("Xen, flag cleared, L1 moved off the 4 KiB boundary", (bytes, v) => {
      v.setUint32(60, 1);
      bytes.copyWithin(4096 + 512, 4096, 4096 + 512);
      u64(v, 40, 4096n + 512n);
    });
    add("Xen, bad xmagic", (_, v) => v.setUint32(48, 0x58454efa));
  }
  return cases;
}

/** Random mutations of one base. */
function randomCases(b: Base, r: Rng, count: number): Case[] {
  const cases: Case[] = [];
  const cs = 2 ** b.clusterBits, l2Bytes = 8 * 2 ** b.l2Bits, len = b.bytes.length;
  const pick = <T>(xs: T[]): T => xs[r.below(xs.length)];
  const flips = (bytes: Uint8Array, from: number, to: number, n: number) => {
    for (let i = 0; i < n; i++) bytes[from + r.below(Math.max(1, to - from))] ^= 1 + r.below(255);
  };
  const badOffsets = () => [
    BigInt(len),
    BigInt(len + cs),
    BigInt(len - 8),
    BigInt(1 + r.below(len)),
    BigInt(r.below(len / SECTOR) * SECTOR),
    1n << 40n,
    (1n << 62n) + 512n,
    BigInt(r.u32()) * 0x100000000n + BigInt(r.u32()),
    512n,
  ];
  for (let i = 0; i < count; i++) {
    const kind = r.below(11);
    let c: Case;
    switch (kind) {
      case 0:
        c = mutate(b, `header byte flips #${i}`, (bytes) => flips(bytes, 0, 64, 1 + r.below(4)));
        break;
      case 1:
        c = mutate(b, `L1 byte flips #${i}`, (bytes) => {
          flips(bytes, b.l1Offset, b.l1Offset + 8 * b.l1Size, 1 + r.below(4));
        });
        break;
      case 2:
        if (b.l2Tables.length === 0) continue;
        c = mutate(b, `L2 byte flips #${i}`, (bytes) => {
          const t = pick(b.l2Tables);
          flips(bytes, t, t + l2Bytes, 1 + r.below(8));
        });
        break;
      case 3: {
        const x = pick(badOffsets());
        c = mutate(b, `L1 entry -> ${x} #${i}`, (_, v) => {
          u64(v, b.l1Offset + 8 * r.below(b.l1Size), x);
        });
        break;
      }
      case 4: {
        if (b.normalEntries.length === 0) continue;
        const x = pick(badOffsets());
        c = mutate(b, `L2 entry -> ${x} #${i}`, (_, v) => u64(v, pick(b.normalEntries), x));
        break;
      }
      case 5: {
        // A compressed entry: (bad) data at a random place, a random or zero length.
        const entries = [...b.normalEntries, ...b.compressedEntries];
        if (entries.length === 0) continue;
        const shift = BigInt(63 - b.clusterBits);
        const lenField = BigInt(r.below(3) === 0 ? 0 : r.below(cs));
        const off = BigInt(r.below(2) === 0 ? r.below(len) : len + r.below(cs));
        c = mutate(b, `compressed entry ${off}+${lenField} #${i}`, (_, v) => {
          u64(v, pick(entries), (1n << 63n) | (lenField << shift) | off);
        });
        break;
      }
      case 6: {
        if (b.compressedEntries.length === 0) continue;
        c = mutate(b, `compressed data flips #${i}`, (bytes, v) => {
          const e = v.getBigUint64(pick(b.compressedEntries));
          const shift = BigInt(63 - b.clusterBits);
          const off = Number(e & ((1n << shift) - 1n));
          const n = Number((e >> shift) & BigInt(cs - 1));
          flips(bytes, off, off + n, 1 + r.below(6));
        });
        break;
      }
      case 7: {
        if (b.compressedEntries.length === 0) continue;
        c = mutate(b, `compressed length changed #${i}`, (_, v) => {
          const at = pick(b.compressedEntries);
          const e = v.getBigUint64(at);
          const shift = BigInt(63 - b.clusterBits);
          const mask = BigInt(cs - 1) << shift;
          const n = BigInt(r.below(2) === 0 ? r.below(8) : r.below(cs));
          u64(v, at, (e & ~mask) | (n << shift));
        });
        break;
      }
      case 8: {
        // Truncated: in the header, the L1 table, an L2 table, the data.
        const points = [
          r.below(48),
          48 + r.below(16),
          b.l1Offset + r.below(8 * b.l1Size + 1),
          ...b.l2Tables.map((t) => t + r.below(l2Bytes)),
          r.below(len),
          len - 1,
          len - SECTOR,
        ];
        const at = pick(points);
        c = { name: `${b.name}: truncated to ${at} #${i}`, bytes: b.bytes.slice(0, at) };
        break;
      }
      case 9:
        c = mutate(b, `random byte flips anywhere #${i}`, (bytes) => {
          flips(bytes, 0, len, 1 + r.below(32));
        });
        break;
      default: {
        // Two entries of one table pointing at the same cluster, or at a table.
        if (b.normalEntries.length < 1 || b.l2Tables.length === 0) continue;
        c = mutate(b, `L2 entry aliases metadata #${i}`, (_, v) => {
          const target = pick([b.l2Tables[0], b.l1Offset - (b.l1Offset % SECTOR), 0]);
          u64(v, pick(b.normalEntries), BigInt(target));
        });
      }
    }
    cases.push(c);
  }
  return cases;
}

// ---- running one case ----

interface Tally {
  refused: number;
  opened: number;
  ioErrors: number;
  messages: Set<string>;
}

/** A refused open or a failed request: an Error of ours, one line, naming the file. */
function checkError(e: unknown, path: string, what: string): string {
  assert.ok(e instanceof Error, `${what}: threw a non-Error: ${String(e)}`);
  assert.ok(
    e instanceof ImageError || e instanceof DiskError || e instanceof SysError,
    `${what}: unexpected ${e.name}: ${e.message}`,
  );
  assert.ok(!e.message.includes("\n"), `${what}: message of several lines: ${e.message}`);
  assert.ok(e.message.includes(path), `${what}: message does not name the file: ${e.message}`);
  assert.ok(e.message.length < 2000, `${what}: message of ${e.message.length} characters`);
  if (e instanceof ImageError) {
    assert.ok(e.message.startsWith(`Cannot open "${path}": `), `${what}: ${e.message}`);
  }
  return e.message;
}

/** Runs `fn`; a failure must be a one-line error naming the file. */
async function attempt(
  tally: Tally,
  path: string,
  what: string,
  fn: () => Promise<unknown>,
): Promise<boolean> {
  try {
    await fn();
    return true;
  } catch (e) {
    tally.messages.add(checkError(e, path, what).replace(path, "PATH"));
    tally.ioErrors++;
    return false;
  }
}

/** Reads (a bounded amount of) the disk and maps it. */
async function exerciseReads(disk: Disk, tally: Tally, path: string, r: Rng): Promise<void> {
  const size = disk.size, buf = sharedPool.take(MiB);
  try {
    for (let off = 0; off < Math.min(size, READ_LIMIT); off += MiB) {
      const n = Math.min(MiB, size - off);
      await attempt(tally, path, `read ${n} at ${off}`, () => disk.read(off, buf.subarray(0, n)));
    }
    for (let i = 0; i < 12; i++) {
      const n = Math.min(size, (1 + r.below(128)) * SECTOR);
      const off = r.below((size - n) / SECTOR + 1) * SECTOR;
      await attempt(tally, path, `read ${n} at ${off}`, () => disk.read(off, buf.subarray(0, n)));
    }
  } finally {
    sharedPool.give(buf);
  }
  let pos = 0;
  for (let calls = 0; pos < size && calls < 64; calls++) {
    let next = size;
    const ok = await attempt(tally, path, `block status at ${pos}`, async () => {
      const extents = await disk.blockStatus(pos, size - pos);
      assert.ok(extents.length > 0 && extents[0].offset === pos, "blockStatus contract");
      const last = extents.at(-1)!;
      assert.ok(last.offset + last.length <= size, "blockStatus past the end");
      next = last.offset + last.length;
    });
    if (!ok) break;
    pos = next;
  }
}

/** A few writes, zero writes and discards; the file must not grow past the limit. */
async function exerciseWrites(
  disk: Disk,
  tally: Tally,
  path: string,
  r: Rng,
  fileSize: number,
): Promise<void> {
  const size = disk.size;
  const offsets = [0, size - SECTOR, r.below(size / SECTOR) * SECTOR];
  for (let i = 0; i < 3; i++) offsets.push(r.below(Math.min(size, READ_LIMIT) / SECTOR) * SECTOR);
  for (const off of offsets) {
    const n = Math.min(size - off, (1 + r.below(160)) * SECTOR);
    const data = r.fill(new Uint8Array(n));
    const ok = await attempt(tally, path, `write ${n} at ${off}`, () => disk.write(off, data));
    if (ok) {
      await attempt(
        tally,
        path,
        `read back ${n} at ${off}`,
        () => disk.read(off, new Uint8Array(n)),
      );
    }
  }
  const zOff = r.below(size / SECTOR) * SECTOR, zLen = Math.min(size - zOff, 8 * KiB);
  await attempt(tally, path, "write zeroes", () => disk.writeZeroes(zOff, zLen));
  await attempt(tally, path, "discard", () => disk.discard(zOff, zLen));
  await attempt(tally, path, "flush", () => disk.flush());
  const now = Deno.statSync(path).size;
  assert.ok(now <= fileSize + GROWTH_LIMIT, `file grew from ${fileSize} to ${now}`);
}

async function runCase(
  dir: string,
  c: Case,
  tally: Tally,
  seed: number,
  engine: EngineKind,
): Promise<void> {
  const path = `${dir}/case.qcow`;
  writeFile(path, c.bytes);
  const r = rng(seed);
  let disk: Disk;
  try {
    disk = await openDisk(`qcow:${path}`, { readOnly: true, engine });
  } catch (e) {
    const message = checkError(e, path, `${c.name}: open`);
    if (c.refuse) assert.match(message, c.refuse, `${c.name}: refused, but why?`);
    assertSame(Deno.readFileSync(path), c.bytes, `${c.name}: a refused file was written`);
    tally.refused++;
    tally.messages.add(message.replace(path, "PATH"));
    return;
  }
  tally.opened++;
  try {
    assert.equal(c.refuse, undefined, `${c.name}: opened, but must be refused (${c.refuse})`);
    assert.ok(disk.size > 0 && disk.size % SECTOR === 0);
    await exerciseReads(disk, tally, path, r);
  } finally {
    await disk.close();
  }
  assertSame(Deno.readFileSync(path), c.bytes, `${c.name}: written while open read-only`);

  disk = await openDisk(`qcow:${path}`, { engine });
  try {
    await exerciseWrites(disk, tally, path, r, c.bytes.length);
    await exerciseReads(disk, tally, path, r);
  } finally {
    await disk.close();
  }
  const after = Deno.statSync(path).size;
  assert.ok(after <= c.bytes.length + GROWTH_LIMIT, `${c.name}: file grew to ${after}`);
}

Deno.test("qcow fuzz: hundreds of damaged images are refused cleanly or survive use", async () => {
  await withNoUnhandledRejections(() =>
    withTempDir(async (dir) => {
      const bases = await makeBases(dir);
      // The valid images read right.
      for (const b of bases) {
        const disk = await openDisk(`qcow:${dir}/${b.name}`, { readOnly: true });
        try {
          assertSame(await readAll(disk), b.content, b.name);
        } finally {
          await disk.close();
        }
      }
      const r = rng(0xf0f0);
      const cases: Case[] = [];
      for (const b of bases) cases.push(...headerCases(b), ...randomCases(b, r, 60));
      assert.ok(cases.length >= 400, `only ${cases.length} cases`);
      const tally: Tally = { refused: 0, opened: 0, ioErrors: 0, messages: new Set() };
      const failures: string[] = [];
      for (const [i, c] of cases.entries()) {
        try {
          // Mostly the engines that close fast (libaio's io_destroy takes ~30 ms).
          const engine: EngineKind = i % 8 === 0 ? "aio" : i % 2 === 0 ? "uring" : "sync";
          await withTimeout(runCase(dir, c, tally, 0x1000 + i, engine), CASE_TIMEOUT, c.name);
        } catch (e) {
          failures.push(`${c.name}: ${(e as Error).message}`);
        }
      }
      // Let rejections of requests still running at the end of a case surface.
      await new Promise((resolve) => setTimeout(resolve, 50));
      assert.deepEqual(failures, [], `${failures.length} of ${cases.length} cases failed`);
      assert.ok(tally.refused > 100 && tally.opened > 100, JSON.stringify(tally));
      assert.ok(tally.ioErrors > 20, `only ${tally.ioErrors} requests failed`);
    })
  );
});

Deno.test("qcow fuzz: a pre-2008 Xen image (little-endian L1) is refused, saying so", async () => {
  await withTempDir(async (dir) => {
    const content = new Uint8Array(4 * MiB);
    rng(5).fill(content.subarray(4096, 3 * 4096));
    const bytes = writeFile(`${dir}/old.qcow`, xenImage(false, content));
    await assert.rejects(
      openDisk(`qcow:${dir}/old.qcow`, { readOnly: true }),
      (e: Error) => {
        assert.ok(e instanceof ImageError);
        assert.match(e.message, /little-endian/);
        assert.ok(e.message.includes(`${dir}/old.qcow`) && !e.message.includes("\n"));
        return true;
      },
    );
    await assert.rejects(openDisk(`qcow:${dir}/old.qcow`), /little-endian/);
    assertSame(Deno.readFileSync(`${dir}/old.qcow`), bytes, "the refused file");
    // The same image with the big-endian flag reads right (and QEMU agrees).
    writeFile(`${dir}/new.qcow`, xenImage(true, content));
    const disk = await openDisk(`qcow:${dir}/new.qcow`, { readOnly: true });
    try {
      assertSame(await readAll(disk), content, "Xen image");
    } finally {
      await disk.close();
    }
    writeFile(`${dir}/new.raw`, content);
    const cmp = await run(
      "qemu-img",
      ["compare", "-f", "qcow", "-F", "raw", "new.qcow", "new.raw"],
      dir,
    );
    assert.equal(cmp.code, 0, cmp.stdout + cmp.stderr);
  });
});

Deno.test("qcow fuzz: an encrypted image (crypt_method 1) is refused, saying so", async () => {
  await withTempDir(async (dir) => {
    const path = `${dir}/enc.qcow`;
    const bytes = newImageBytes({ size: MiB });
    new DataView(bytes.buffer).setUint32(36, 1);
    writeFile(path, bytes);
    for (const readOnly of [true, false]) {
      await assert.rejects(openDisk(`qcow:${path}`, { readOnly }), (e: Error) => {
        assert.ok(e instanceof ImageError);
        assert.match(e.message, /encrypted/);
        assert.ok(e.message.startsWith(`Cannot open "${path}"`) && !e.message.includes("\n"));
        return true;
      });
    }
    assertSame(Deno.readFileSync(path), bytes, "the refused file");
  });
});

/**
 * A 20 KiB image by hand, to be filled in: a 4 MiB disk of 4 KiB clusters, its L1 table (2
 * entries) at 48, L1[0] pointing at an L2 table at 4096.
 */
function handMade(dir: string): { path: string; bytes: Uint8Array; v: DataView } {
  const bytes = new Uint8Array(20 * KiB);
  bytes.set(newImageBytes({ size: 4 * MiB }));
  const v = new DataView(bytes.buffer);
  v.setBigUint64(48, 4096n);
  return { path: `${dir}/bad.qcow`, bytes, v };
}

Deno.test({
  name: "qcow fuzz: a failed read leaves no unhandled promise rejection (a bad compressed " +
    "cluster failing while the read still walks its clusters)",
  fn: () =>
    withNoUnhandledRejections(() =>
      withTempDir(async (dir) => {
        const { path, bytes, v } = handMade(dir);
        v.setBigUint64(56, 12288n); // L1[1] -> L2 table at 12288 (empty)
        // 1. cluster 0 compressed but not deflate data, cluster 1 far past the end of the file
        v.setBigUint64(4096, (1n << 63n) | (100n << 51n) | 8192n);
        bytes.fill(0xff, 8192, 8192 + 100);
        v.setBigUint64(4096 + 8, 1n << 30n);
        // 2. the last cluster of L2 table 0 compressed with length 0; the read goes on into
        //    table 1, which has to be loaded
        v.setBigUint64(4096 + 8 * 511, (1n << 63n) | 8192n);
        writeFile(path, bytes);
        const disk = await openDisk(`qcow:${path}`, { readOnly: true });
        try {
          await assert.rejects(disk.read(0, new Uint8Array(8192)), /points outside the file/);
          await assert.rejects(
            disk.read(2 * MiB - 4096, new Uint8Array(8192)),
            /corrupt compressed cluster entry/,
          );
          await new Promise((resolve) => setTimeout(resolve, 100));
        } finally {
          await disk.close();
        }
      })
    ),
});

Deno.test({
  name: "qcow fuzz: a failed allocating write (its copy-on-write read fails) leaves no " +
    "unhandled rejection and no claim behind: the cluster can be written again",
  fn: () =>
    withNoUnhandledRejections(() =>
      withTempDir(async (dir) => {
        const { path, bytes, v } = handMade(dir); // L1[1] empty
        // Cluster 0 and 3 compressed but not deflate data; cluster 2 a normal one at 12288.
        v.setBigUint64(4096, (1n << 63n) | (100n << 51n) | 8192n);
        v.setBigUint64(4096 + 3 * 8, (1n << 63n) | (100n << 51n) | 8192n);
        bytes.fill(0xff, 8192, 8192 + 100);
        v.setBigUint64(4096 + 2 * 8, 12288n);
        writeFile(path, bytes);
        const disk = await openDisk(`qcow:${path}`);
        try {
          const data = (n: number, fill: number) => new Uint8Array(n).fill(fill);
          // A partial write of cluster 0 needs its old contents: it fails, twice (no claim left).
          await assert.rejects(disk.write(512, data(1024, 1)), /does not inflate/);
          await assert.rejects(disk.write(512, data(1024, 2)), /does not inflate/);
          // A write over cluster 2 (in place) and into cluster 3 (copy on write) fails whole.
          await assert.rejects(disk.write(2 * 4096 + 512, data(4096, 3)), /does not inflate/);
          // Whole clusters need nothing old: they are written, and read back.
          await disk.write(0, data(4096, 4));
          await disk.write(3 * 4096, data(4096, 5));
          await disk.write(2 * MiB + 4096, data(4096, 6)); // a new L2 table
          await disk.write(512, data(1024, 7)); // now a plain overwrite
          const got = new Uint8Array(4096);
          await disk.read(0, got);
          assertSame(got, new Uint8Array(4096).fill(4).fill(7, 512, 1536), "cluster 0");
          await disk.read(3 * 4096, got);
          assertSame(got, data(4096, 5), "cluster 3");
          await disk.read(2 * MiB + 4096, got);
          assertSame(got, data(4096, 6), "the cluster in the new table");
          await disk.flush();
          await new Promise((resolve) => setTimeout(resolve, 100));
        } finally {
          await disk.close();
        }
      })
    ),
});

Deno.test({
  name: "qcow fuzz: an image that is its own backing file is refused with a short message",
  fn: async () => {
    await withTempDir(async (dir) => {
      const path = `${dir}/loop.qcow`;
      const bytes = writeFile(path, newImageBytes({ size: MiB, backingFile: "loop.qcow" }));
      await assert.rejects(openDisk(`qcow:${path}`, { readOnly: true }), (e: Error) => {
        assert.ok(e.message.startsWith(`Cannot open "${path}"`) && !e.message.includes("\n"));
        assert.match(e.message, /loop|deeper/);
        assert.ok(e.message.length < 1000, `a message of ${e.message.length} characters`);
        return true;
      });
      assertSame(Deno.readFileSync(path), bytes, "the refused file");
    });
  },
});

Deno.test({
  name: "qcow fuzz: a backing file name with a newline is refused with a one-line message",
  fn: async () => {
    await withTempDir(async (dir) => {
      const path = `${dir}/nl.qcow`;
      writeFile(path, newImageBytes({ size: MiB, backingFile: "a\nb.raw" }));
      await assert.rejects(openDisk(`qcow:${path}`, { readOnly: true }), (e: Error) => {
        assert.ok(e instanceof ImageError);
        assert.ok(!e.message.includes("\n"), `a message of several lines: ${e.message}`);
        return true;
      });
    });
  },
});
