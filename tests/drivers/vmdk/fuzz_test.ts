/**
 * Damaged VMDK images: a corpus of mutated sparse headers, grain directories and tables,
 * stream markers and footers, and text descriptors, generated from valid images with a fixed
 * seed. tapd must refuse each with a one-line ImageError naming the file, or open it and then
 * read, map and write it failing only with one-line errors — never a crash or a hang; and
 * `check` must return a report for every one.
 */
import assert from "node:assert/strict";
import type { Disk } from "../../../drivers/disk.ts";
import { DiskError, ImageError } from "../../../drivers/errors.ts";
import { openDisk } from "../../../drivers/mod.ts";
import { vmdkFormat } from "../../../drivers/vmdk/format.ts";
import { SysError } from "../../../ffi/errno.ts";
import { sharedPool } from "../../../io/buffer_pool.ts";
import { type Rng, rng, withTempDir } from "../../util.ts";
import { KiB, MiB, qemuImg, randomContent, SECTOR, withTimeout, writeFile } from "./helpers.ts";

const CASE_TIMEOUT = 5000;

interface Base {
  name: string;
  /** The file that gets mutated, and the descriptor to open (the same for monolithic ones). */
  file: string;
  open: string;
  bytes: Uint8Array;
  sparse: boolean;
  /** Byte offsets of GD entries and non-zero GT entries. */
  gdEntries: number[];
  gtEntries: number[];
  gts: number[];
}

interface Case {
  name: string;
  base: Base;
  bytes: Uint8Array;
  refuse?: RegExp;
}

function describe(name: string, file: string, open: string, bytes: Uint8Array): Base {
  const v = new DataView(bytes.buffer, bytes.byteOffset, bytes.length);
  const b: Base = { name, file, open, bytes, sparse: false, gdEntries: [], gtEntries: [], gts: [] };
  if (bytes.length < 512 || v.getUint32(0, true) !== 0x564d444b) return b;
  b.sparse = true;
  let gd = Number(v.getBigUint64(56, true));
  if (gd === 0 || gd * 512 >= bytes.length) {
    // A stream: the footer holds the GD.
    gd = Number(v.getBigUint64(bytes.length - 1024 + 56, true));
  }
  const capacity = Number(v.getBigUint64(12, true)), grain = Number(v.getBigUint64(20, true));
  const gtes = v.getUint32(44, true), n = Math.ceil(capacity / (grain * gtes));
  for (let i = 0; i < n; i++) {
    const at = gd * 512 + 4 * i;
    b.gdEntries.push(at);
    const gt = v.getUint32(at, true);
    if (gt === 0) continue;
    b.gts.push(gt * 512);
    for (let j = 0; j < gtes; j++) {
      if (v.getUint32(gt * 512 + 4 * j, true) !== 0) b.gtEntries.push(gt * 512 + 4 * j);
    }
  }
  return b;
}

async function makeBases(dir: string): Promise<Base[]> {
  const r = rng(0xf0);
  const bases: Base[] = [];
  // tapd-made monolithicSparse, 4 KiB grains, data across two grain tables.
  await vmdkFormat.create(`${dir}/mono.vmdk`, { size: 3 * MiB, clusterSize: 4096 });
  const d = await openDisk(`vmdk:${dir}/mono.vmdk`);
  try {
    for (const [off, len] of [[0, 8 * KiB], [100 * KiB, 20 * KiB], [2 * MiB - 4 * KiB, 12 * KiB]]) {
      await d.write(off, r.fill(new Uint8Array(len)));
    }
  } finally {
    await d.close();
  }
  const read = (n: string) => Deno.readFileSync(`${dir}/${n}`);
  bases.push(describe("mono", "mono.vmdk", "mono.vmdk", read("mono.vmdk")));
  // qemu-img's streamOptimized, and tapd's stream layout (GD at the end).
  writeFile(`${dir}/src.raw`, randomContent(r, MiB + 4096, 8 * KiB));
  await qemuImg(
    ["convert", "-O", "vmdk", "-o", "subformat=streamOptimized", "src.raw", "qs.vmdk"],
    dir,
  );
  bases.push(describe("qemu stream", "qs.vmdk", "qs.vmdk", read("qs.vmdk")));
  const { writeStreamOptimized } = await import("../../../drivers/vmdk/stream.ts");
  const src = await openDisk(`aio:${dir}/src.raw`, { readOnly: true });
  try {
    await writeStreamOptimized(`${dir}/ts.vmdk`, src);
  } finally {
    await src.close();
  }
  bases.push(describe("tapd stream", "ts.vmdk", "ts.vmdk", read("ts.vmdk")));
  // Descriptor files: split sparse (the descriptor and an extent are mutated), flat.
  await qemuImg([
    "create",
    "-q",
    "-f",
    "vmdk",
    "-o",
    "subformat=twoGbMaxExtentSparse",
    "sp.vmdk",
    "2M",
  ], dir);
  await qemuImg([
    "convert",
    "-O",
    "vmdk",
    "-o",
    "subformat=twoGbMaxExtentSparse",
    "src.raw",
    "sq.vmdk",
  ], dir);
  bases.push(describe("split descriptor", "sq.vmdk", "sq.vmdk", read("sq.vmdk")));
  bases.push(describe("split extent", "sq-s001.vmdk", "sq.vmdk", read("sq-s001.vmdk")));
  await qemuImg(
    ["create", "-q", "-f", "vmdk", "-o", "subformat=monolithicFlat", "fl.vmdk", "1M"],
    dir,
  );
  bases.push(describe("flat descriptor", "fl.vmdk", "fl.vmdk", read("fl.vmdk")));
  // A delta child (descriptor embedded, parent link).
  await qemuImg(["create", "-q", "-f", "vmdk", "-b", "mono.vmdk", "-F", "vmdk", "child.vmdk"], dir);
  bases.push(describe("child", "child.vmdk", "child.vmdk", read("child.vmdk")));
  return bases;
}

const u64 = (v: DataView, off: number, x: bigint) =>
  v.setBigUint64(off, BigInt.asUintN(64, x), true);

function mutate(
  b: Base,
  name: string,
  fn: (bytes: Uint8Array, v: DataView) => void,
  refuse?: RegExp,
): Case {
  const bytes = b.bytes.slice();
  fn(bytes, new DataView(bytes.buffer));
  return { name: `${b.name}: ${name}`, base: b, bytes, refuse };
}

/** Edits the descriptor text (a descriptor file, or the embedded one at sector 1). */
function editText(b: Base, name: string, fn: (t: string) => string, refuse?: RegExp): Case {
  if (!b.sparse) {
    const text = fn(new TextDecoder().decode(b.bytes));
    return { name: `${b.name}: ${name}`, base: b, bytes: new TextEncoder().encode(text), refuse };
  }
  return mutate(b, name, (bytes) => {
    const area = bytes.subarray(512, 512 * 21);
    const end = area.indexOf(0);
    const text = fn(new TextDecoder().decode(area.subarray(0, end < 0 ? area.length : end)));
    const enc = new TextEncoder().encode(text).subarray(0, area.length);
    area.fill(0);
    area.set(enc);
  }, refuse);
}

function headerCases(b: Base): Case[] {
  if (!b.sparse) return [];
  const len = b.bytes.length, out: Case[] = [];
  const add = (name: string, fn: (bytes: Uint8Array, v: DataView) => void, refuse?: RegExp) =>
    out.push(mutate(b, name, fn, refuse));
  add("magic COWD", (_, v) => v.setUint32(0, 0x44574f43, true), /COWD/);
  add("magic seSparse", (_, v) => v.setUint32(0, 0xcafebabe, true), /seSparse/);
  add("magic zero", (_, v) => v.setUint32(0, 0, true), /not a VMDK/);
  for (const version of [0, 4, 99, 0xffffffff]) {
    add(`version ${version}`, (_, v) => v.setUint32(4, version, true), /version/);
  }
  for (const cap of [0n, 1n, 1n << 62n, -1n]) add(`capacity ${cap}`, (_, v) => u64(v, 12, cap));
  for (const g of [0n, 3n, 100n, 1n << 22n, -1n]) {
    add(`grain ${g}`, (_, v) => u64(v, 20, g), /grain/);
  }
  add("grain 1", (_, v) => u64(v, 20, 1n));
  for (const n of [0, 513, 0xffffffff]) {
    add(`gtes ${n}`, (_, v) => v.setUint32(44, n, true), /numGTEsPerGT/);
  }
  add("gtes 1", (_, v) => v.setUint32(44, 1, true));
  for (const off of [0n, BigInt(len / 512), 1n << 40n, -2n, 1n]) {
    add(`gdOffset ${off}`, (_, v) => u64(v, 56, off));
    add(`rgdOffset ${off}`, (_, v) => u64(v, 48, off));
  }
  add("overHead huge", (_, v) => u64(v, 64, 1n << 50n));
  add("descriptor offset past EOF", (_, v) => u64(v, 28, BigInt(len)));
  add("descriptor size huge", (_, v) => u64(v, 36, 1n << 40n));
  add("flags: all", (_, v) => v.setUint32(8, 0xffffffff, true));
  add("flags: compressed, algorithm 2", (_, v) => {
    v.setUint32(8, v.getUint32(8, true) | 0x10000, true);
    v.setUint16(77, 2, true);
  }, /compression/);
  add("flags: zeroed grain", (_, v) => v.setUint32(8, v.getUint32(8, true) | 4, true));
  add("flags: no redundant GD", (_, v) => v.setUint32(8, v.getUint32(8, true) & ~2, true));
  if (b.name.includes("stream")) {
    add("footer marker type", (bytes, v) => v.setUint32(bytes.length - 1536 + 12, 7, true));
    add("footer header magic", (bytes, v) => v.setUint32(bytes.length - 1024, 0, true));
    add("footer gdOffset past EOF", (bytes, v) => u64(v, bytes.length - 1024 + 56, 1n << 40n));
    add("EOS marker not zero", (bytes) => bytes[bytes.length - 500] = 1);
  }
  return out;
}

function descriptorCases(b: Base): Case[] {
  if (b.name === "split extent" || b.name.includes("stream")) return [];
  const out: Case[] = [];
  const add = (name: string, fn: (t: string) => string, refuse?: RegExp) =>
    out.push(editText(b, name, fn, refuse));
  add("no CID", (t) => t.replace(/^CID=.*$/m, ""), /no CID/);
  add("CID not hex", (t) => t.replace(/^CID=.*$/m, "CID=zzzz"), /CID/);
  add("parentCID not hex", (t) => t.replace(/^parentCID=.*$/m, "parentCID=-1"), /parentCID/);
  add(
    "encrypted",
    (t) => t + '\nencryption.keySafe = "vmware:key/list/(pair/(phrase/x))"\n',
    /encrypted/,
  );
  add(
    "createType seSparse",
    (t) => t.replace(/createType="[^"]*"/, 'createType="seSparse"'),
    /seSparse/,
  );
  add(
    "createType vmfsSparse",
    (t) => t.replace(/createType="[^"]*"/, 'createType="vmfsSparse"'),
    /COWD/,
  );
  add("no extent lines", (t) => t.replace(/^RW .*$/gm, ""), /no extents/);
  add("extent SESPARSE", (t) => t.replace(/ (SPARSE|FLAT) /, " SESPARSE "), /seSparse/);
  add("extent VMFSSPARSE", (t) => t.replace(/ (SPARSE|FLAT) /, " VMFSSPARSE "), /COWD/);
  add("extent type bogus", (t) => t.replace(/ (SPARSE|FLAT) /, " BOGUS "), /extent type/);
  add("extent sectors 0", (t) => t.replace(/^RW \d+/m, "RW 0"), /sectors/);
  add("extent sectors huge", (t) => t.replace(/^RW \d+/m, "RW 99999999999999999999"), /sectors/);
  add("extent file missing", (t) => t.replace(/"([^"]+\.vmdk)"/, '"nosuch.vmdk"'));
  add("extent RDONLY", (t) => t.replace(/^RW /m, "RDONLY "));
  add("extent NOACCESS", (t) => t.replace(/^RW /m, "NOACCESS "));
  add("extent sectors doubled", (t) => t.replace(/^RW (\d+)/m, (_, n) => `RW ${Number(n) * 2}`));
  add("extent line garbage", (t) => t.replace(/^RW .*$/m, "RW 12 SPARSE"), /file name|extent/);
  add(
    "parent missing",
    (t) => t.replace(/createType/, 'parentFileNameHint="gone.vmdk"\ncreateType'),
    /gone/,
  );
  add(
    "parent is itself",
    (t) => t.replace(/createType/, `parentFileNameHint="${b.open}"\ncreateType`),
  );
  add("parent CID mismatch", (t) => t.replace(/^parentCID=.*$/m, "parentCID=1234"));
  add("version 9", (t) => t.replace(/^version=1/m, "version=9"), /version/);
  add("CRLF line ends", (t) => t.replaceAll("\n", "\r\n"));
  add("NUL in the middle", (t) => t.slice(0, 40) + "\0" + t.slice(40));
  return out;
}

function randomCases(b: Base, r: Rng, count: number): Case[] {
  const out: Case[] = [];
  const len = b.bytes.length;
  const pick = <T>(xs: T[]): T => xs[r.below(xs.length)];
  const flips = (bytes: Uint8Array, from: number, to: number, n: number) => {
    for (let i = 0; i < n; i++) bytes[from + r.below(Math.max(1, to - from))] ^= 1 + r.below(255);
  };
  const badSector = () =>
    pick([
      0,
      1,
      2,
      Math.floor(len / 512),
      Math.floor(len / 512) + 8,
      r.u32(),
      0xffffffff,
      r.below(len / 512),
    ]);
  for (let i = 0; i < count; i++) {
    const kind = r.below(b.sparse ? 7 : 2);
    let c: Case;
    if (!b.sparse) {
      c = kind === 0
        ? mutate(b, `descriptor byte flips #${i}`, (bytes) => flips(bytes, 0, len, 1 + r.below(6)))
        : { name: `${b.name}: truncated #${i}`, base: b, bytes: b.bytes.slice(0, r.below(len)) };
      out.push(c);
      continue;
    }
    switch (kind) {
      case 0:
        c = mutate(b, `header flips #${i}`, (bytes) => flips(bytes, 0, 80, 1 + r.below(3)));
        break;
      case 1:
        c = mutate(
          b,
          `GD entry -> bad #${i}`,
          (_, v) => v.setUint32(pick(b.gdEntries), badSector(), true),
        );
        break;
      case 2:
        if (b.gtEntries.length === 0) continue;
        c = mutate(
          b,
          `GT entry -> bad #${i}`,
          (_, v) => v.setUint32(pick(b.gtEntries), badSector(), true),
        );
        break;
      case 3:
        if (b.gts.length === 0) continue;
        c = mutate(b, `GT flips #${i}`, (bytes) => {
          const t = pick(b.gts);
          flips(bytes, t, t + 2048, 1 + r.below(8));
        });
        break;
      case 4:
        c = { name: `${b.name}: truncated #${i}`, base: b, bytes: b.bytes.slice(0, r.below(len)) };
        break;
      case 5:
        c = mutate(
          b,
          `flips in the data area #${i}`,
          (bytes) => flips(bytes, len / 2, len, 1 + r.below(32)),
        );
        break;
      default:
        c = mutate(b, `flips anywhere #${i}`, (bytes) => flips(bytes, 0, len, 1 + r.below(32)));
    }
    out.push(c);
  }
  return out;
}

// ---- running one case ----

function checkError(e: unknown, names: string[], what: string): string {
  assert.ok(e instanceof Error, `${what}: threw a non-Error: ${String(e)}`);
  assert.ok(
    e instanceof ImageError || e instanceof DiskError || e instanceof SysError,
    `${what}: unexpected ${e.name}: ${e.message}`,
  );
  assert.ok(!e.message.includes("\n"), `${what}: message of several lines: ${e.message}`);
  assert.ok(e.message.length < 2000, `${what}: message of ${e.message.length} characters`);
  if (e instanceof ImageError) {
    assert.ok(names.some((n) => e.message.includes(n)), `${what}: no file named: ${e.message}`);
  }
  return e.message;
}

async function exercise(disk: Disk, names: string[], what: string, r: Rng): Promise<void> {
  const tryIt = async (label: string, fn: () => Promise<unknown>) => {
    try {
      await fn();
    } catch (e) {
      checkError(e, names, `${what}: ${label}`);
    }
  };
  const buf = sharedPool.take(MiB);
  try {
    const size = disk.size;
    for (let off = 0; off < Math.min(size, 4 * MiB); off += MiB) {
      const n = Math.min(MiB, size - off);
      await tryIt(`read at ${off}`, () => disk.read(off, buf.subarray(0, n)));
    }
    for (let k = 0; k < 4 && size > 0; k++) {
      const off = r.below(size / SECTOR) * SECTOR, n = Math.min(8 * KiB, size - off);
      await tryIt(`read at ${off}`, () => disk.read(off, buf.subarray(0, n)));
    }
    await tryIt("block status", () => disk.blockStatus(0, size));
    if (!disk.info.readOnly) {
      for (let k = 0; k < 3; k++) {
        const off = r.below(Math.min(size, 4 * MiB) / SECTOR) * SECTOR;
        const n = Math.min(6 * KiB, size - off);
        await tryIt(`write at ${off}`, () => disk.write(off, r.fill(buf.subarray(0, n))));
      }
    }
  } finally {
    sharedPool.give(buf);
  }
}

Deno.test("vmdk fuzz: mutated headers, tables, streams and descriptors", async () => {
  await withTempDir(async (dir) => {
    const bases = await makeBases(dir);
    const originals = new Map<string, Uint8Array>();
    for (const b of bases) originals.set(b.file, b.bytes);
    const r = rng(0xf1);
    const cases: Case[] = [];
    for (const b of bases) {
      cases.push(...headerCases(b), ...descriptorCases(b), ...randomCases(b, r, 20));
    }
    let refused = 0, opened = 0;
    for (const [ci, c] of cases.entries()) {
      // Restore every file, then put the mutated one in place.
      for (const [f, bytes] of originals) Deno.writeFileSync(`${dir}/${f}`, bytes);
      Deno.writeFileSync(`${dir}/${c.base.file}`, c.bytes);
      const path = `${dir}/${c.base.open}`;
      const names = [dir]; // the image or one of its extent files
      // Every case read-only (on the sync engine: an aio context costs ~30 ms to set up and
      // tear down), every third also read-write.
      for (const readOnly of ci % 3 === 0 ? [true, false] : [true]) {
        let disk: Disk | null = null;
        try {
          disk = await withTimeout(
            openDisk(`vmdk:${path}`, { readOnly, engine: readOnly ? "sync" : "aio" }),
            CASE_TIMEOUT,
            `open ${c.name}`,
          );
        } catch (e) {
          if (e instanceof Error && e.message.startsWith("timeout")) throw e;
          const msg = checkError(e, names, c.name);
          if (c.refuse !== undefined) assert.match(msg, c.refuse, c.name);
          refused++;
          continue;
        }
        if (c.refuse !== undefined && readOnly) {
          await disk.close();
          assert.fail(`${c.name}: opened, but should be refused with ${c.refuse}`);
        }
        opened++;
        try {
          await withTimeout(exercise(disk, names, c.name, rng(opened)), CASE_TIMEOUT, c.name);
        } finally {
          await disk.close();
        }
      }
      const report = await withTimeout(vmdkFormat.check(path), CASE_TIMEOUT, `check ${c.name}`);
      assert.equal(report.format, "vmdk");
      for (const m of [...report.errors, ...report.leaks]) {
        assert.ok(!m.includes("\n"), `${c.name}: check message of several lines: ${m}`);
      }
    }
    assert.ok(cases.length > 300, `${cases.length} cases`);
    assert.ok(refused > 50 && opened > 50, `refused ${refused}, opened ${opened}`);
  });
});
