/**
 * Damaged VHDs: a corpus of mutated footers, dynamic headers, BATs, bitmaps and parent links
 * (bit flips, absurd sizes, offsets past the end, bad checksums, parent loops, truncations),
 * generated from valid images with a fixed seed. tapd must refuse each with a one-line message
 * naming the file, or open it and then read, map and write it without crashing, hanging or
 * growing the file absurdly; a refused file is left untouched; `tapd check` always answers.
 */
import assert from "node:assert/strict";
import type { Disk } from "../../../drivers/disk.ts";
import { DiskError, ImageError } from "../../../drivers/errors.ts";
import { openDisk } from "../../../drivers/mod.ts";
import { checksum, FOOTER_SIZE } from "../../../drivers/vhd/footer.ts";
import { vhdFormat } from "../../../drivers/vhd/format.ts";
import { SysError } from "../../../ffi/errno.ts";
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
  SECTOR,
  withTimeout,
  writeFile,
} from "./helpers.ts";

const CASE_TIMEOUT = 5000;
const GROWTH_LIMIT = 16 * MiB;

interface Base {
  name: string;
  bytes: Uint8Array;
  content: Uint8Array;
  dynamic: boolean;
  headerAt: number;
  batAt: number;
  entries: number;
  /** Byte offsets (in the file) of allocated BAT entries, and of the blocks' bitmaps. */
  allocated: number[];
  bitmaps: number[];
}

function describe(name: string, bytes: Uint8Array, content: Uint8Array): Base {
  const v = new DataView(bytes.buffer, bytes.byteOffset, bytes.length);
  const dynamic = new TextDecoder().decode(bytes.subarray(0, 8)) === "conectix";
  const base: Base = {
    name,
    bytes,
    content,
    dynamic,
    headerAt: 0,
    batAt: 0,
    entries: 0,
    allocated: [],
    bitmaps: [],
  };
  if (dynamic) {
    base.headerAt = Number(v.getBigUint64(16));
    base.batAt = Number(v.getBigUint64(base.headerAt + 16));
    base.entries = v.getUint32(base.headerAt + 28);
    for (let i = 0; i < base.entries; i++) {
      const e = v.getUint32(base.batAt + 4 * i);
      if (e === 0xffffffff) continue;
      base.allocated.push(base.batAt + 4 * i);
      base.bitmaps.push(e * SECTOR);
    }
  }
  return base;
}

/** Makes the base images in `dir`; p.vhd is the parent of the differencing one. */
async function makeBases(dir: string): Promise<Base[]> {
  const bases: Base[] = [];
  const r = rng(0xf0a);
  // QEMU, dynamic, with data in a few blocks.
  await qemuImg(["create", "-q", "-f", "vpc", "-o", "force_size=on", `${dir}/q.vhd`, "6M"]);
  await qemuIo(
    `${dir}/q.vhd`,
    ["write -P 0x11 0 4k", "write -P 0x22 2044k 8k", "write -P 0x33 5m 3k"],
    undefined,
    "vpc",
  );
  bases.push(await fromFile(dir, "q.vhd"));
  // QEMU, fixed.
  writeFile(`${dir}/src.raw`, randomContent(r, 2 * MiB));
  await qemuImg([
    "convert",
    "-O",
    "vpc",
    "-o",
    "subformat=fixed,force_size=on",
    `${dir}/src.raw`,
    `${dir}/f.vhd`,
  ]);
  bases.push(await fromFile(dir, "f.vhd"));
  // tapd, 4 KiB blocks, and a differencing child of p.vhd with partial bitmaps.
  await vhdFormat.create(`${dir}/t.vhd`, { size: 3 * MiB, clusterSize: 4096 });
  await vhdFormat.create(`${dir}/p.vhd`, { size: 3 * MiB });
  await vhdFormat.create(`${dir}/c.vhd`, { size: 0, backing: "p.vhd", clusterSize: 64 * KiB });
  for (const name of ["t.vhd", "p.vhd", "c.vhd"]) {
    const disk = await openDisk(`vhd:${dir}/${name}`);
    try {
      for (const [off, len] of [[0, 4096], [40 * KiB, 70 * KiB], [3 * MiB - 8 * KiB, 1024]]) {
        await disk.write(off + (name === "c.vhd" ? 512 : 0), r.fill(new Uint8Array(len)));
      }
    } finally {
      await disk.close();
    }
  }
  for (const name of ["t.vhd", "c.vhd"]) bases.push(await fromFile(dir, name));
  return bases;
}

async function fromFile(dir: string, name: string): Promise<Base> {
  const disk = await openDisk(`vhd:${dir}/${name}`, { readOnly: true });
  try {
    return describe(name, Deno.readFileSync(`${dir}/${name}`), await readAll(disk));
  } finally {
    await disk.close();
  }
}

// ---- the corpus ----

interface Case {
  name: string;
  bytes: Uint8Array;
  refuse?: RegExp;
}

const u64 = (v: DataView, off: number, x: bigint) => v.setBigUint64(off, BigInt.asUintN(64, x));

/** Recomputes the checksum of the footer at `at` (in place). */
function fixFooter(bytes: Uint8Array, at: number): void {
  const f = bytes.subarray(at, at + FOOTER_SIZE);
  new DataView(f.buffer, f.byteOffset, FOOTER_SIZE).setUint32(64, checksum(f, 64));
}

function fixHeader(bytes: Uint8Array, at: number): void {
  const h = bytes.subarray(at, at + 1024);
  new DataView(h.buffer, h.byteOffset, 1024).setUint32(36, checksum(h, 36));
}

function footerCases(b: Base): Case[] {
  const cases: Case[] = [];
  const len = b.bytes.length;
  const places = b.dynamic ? [0, len - FOOTER_SIZE] : [len - FOOTER_SIZE];
  /** Applies `fn` to every footer (fixing checksums unless `broken`). */
  const add = (
    name: string,
    fn: (v: DataView, at: number) => void,
    why?: RegExp,
    broken = false,
  ) => {
    const bytes = b.bytes.slice();
    const v = new DataView(bytes.buffer);
    for (const at of places) {
      fn(v, at);
      if (!broken) fixFooter(bytes, at);
    }
    cases.push({ name: `${b.name}: footer ${name}`, bytes, refuse: why });
  };
  add(
    "checksum wrong",
    (v, at) => v.setUint32(at + 64, v.getUint32(at + 64) ^ 1),
    /checksum/,
    true,
  );
  add("cookie broken", (v, at) => v.setUint8(at + 3, 0x21), /not a VHD|checksum/);
  for (const type of [0, 1, 5, 6, 0xffffffff]) {
    add(`disk type ${type}`, (v, at) => v.setUint32(at + 60, type), /disk type|checksum/);
  }
  add("current size 0", (v, at) => u64(v, at + 48, 0n), /virtual size/);
  add("current size 1", (v, at) => u64(v, at + 48, 1n), /virtual size/);
  add("current size 2^62", (v, at) => u64(v, at + 48, 1n << 62n), /virtual size/);
  add("current size all ones", (v, at) => u64(v, at + 48, -1n), /virtual size/);
  add("current size 2040 GiB + 512", (v, at) => u64(v, at + 48, (2040n << 30n) + 512n));
  add("current size +1 sector", (v, at) => u64(v, at + 48, v.getBigUint64(at + 48) + 512n));
  add("current size -1 sector", (v, at) => u64(v, at + 48, v.getBigUint64(at + 48) - 512n));
  add("creator vpc (size from CHS)", (v, at) => v.setUint32(at + 28, 0x76706320));
  add("geometry maximum, creator vpc", (v, at) => {
    v.setUint32(at + 28, 0x76706320);
    v.setUint32(at + 56, 0xffff10ff);
  });
  add("geometry 0, creator qemu", (v, at) => {
    v.setUint32(at + 28, 0x71656d75);
    v.setUint32(at + 56, 0);
  }, /virtual size/);
  if (b.dynamic) {
    for (const off of [0n, 511n, 513n, BigInt(len), BigInt(len - 100), 1n << 62n, -1n]) {
      add(`data offset ${off}`, (v, at) => u64(v, at + 16, off), /header|checksum|cookie/);
    }
    add("data offset to the BAT", (v, at) => u64(v, at + 16, BigInt(b.batAt)), /header/);
    add("type fixed (dynamic layout)", (v, at) => v.setUint32(at + 60, 2));
    // Only one copy damaged: the other is used.
    for (const [i, which] of ["copy at 0", "end"].entries()) {
      const bytes = b.bytes.slice();
      bytes[places[i] + 70] ^= 0x40;
      cases.push({ name: `${b.name}: ${which} footer checksum wrong`, bytes });
    }
    const bytes = b.bytes.slice();
    bytes[0] ^= 1;
    bytes[len - FOOTER_SIZE] ^= 1;
    cases.push({ name: `${b.name}: both cookies broken`, bytes, refuse: /not a VHD/ });
  } else {
    add("type dynamic (fixed layout)", (v, at) => v.setUint32(at + 60, 3), /header/);
  }
  return cases;
}

function headerCases(b: Base): Case[] {
  if (!b.dynamic) return [];
  const cases: Case[] = [];
  const h = b.headerAt, len = b.bytes.length;
  const add = (name: string, fn: (v: DataView, bytes: Uint8Array) => void, why?: RegExp) => {
    const bytes = b.bytes.slice();
    fn(new DataView(bytes.buffer), bytes);
    fixHeader(bytes, h);
    cases.push({ name: `${b.name}: header ${name}`, bytes, refuse: why });
  };
  cases.push({
    name: `${b.name}: header checksum wrong`,
    bytes: (() => {
      const x = b.bytes.slice();
      x[h + 36] ^= 0x10;
      return x;
    })(),
    refuse: /checksum/,
  });
  add("cookie broken", (_, bytes) => bytes[h + 2] ^= 1, /cookie/);
  for (const off of [0n, 100n, BigInt(len), BigInt(len - 4), 1n << 62n, -1n]) {
    add(`table offset ${off}`, (v) => u64(v, h + 16, off), /BAT|overlaps/);
  }
  add("table offset +4 (unaligned)", (v) => u64(v, h + 16, BigInt(b.batAt + 4)));
  add("table offset onto the header", (v) => u64(v, h + 16, BigInt(h)));
  for (const n of [0, 1, 0xffffffff, b.entries + 1, b.entries - 1]) {
    add(`max table entries ${n}`, (v) => v.setUint32(h + 28, n));
  }
  for (const bs of [0, 1, 511, 3000, 1 << 29, 0x80000000, 0xffffffff]) {
    add(`block size ${bs}`, (v) => v.setUint32(h + 32, bs), /block size/);
  }
  add("block size 512", (v) => v.setUint32(h + 32, 512));
  add("block size x2", (v) => v.setUint32(h + 32, v.getUint32(h + 32) * 2));
  add("block size /2", (v) => v.setUint32(h + 32, v.getUint32(h + 32) / 2));
  add("parent uuid changed", (_, bytes) => bytes[h + 40] ^= 0xff);
  add("parent name garbage", (_, bytes) => bytes.fill(0x41, h + 64, h + 576));
  for (const [i, off] of [BigInt(len), 1n << 62n, 0n, -1n].entries()) {
    add(`locators point at ${off}`, (v) => {
      for (let k = 0; k < 8; k++) u64(v, h + 576 + 24 * k + 16, off);
      v.setUint32(h + 576 + 8, i === 0 ? 0xffffffff : 16);
    });
  }
  add("locator data space and length huge", (v) => {
    for (let k = 0; k < 8; k++) {
      v.setUint32(h + 576 + 24 * k + 4, 0xffffffff);
      v.setUint32(h + 576 + 24 * k + 8, 0xffffffff);
    }
  });
  add("locator codes all W2ru", (v) => {
    for (let k = 0; k < 8; k++) v.setUint32(h + 576 + 24 * k, 0x57327275);
  });
  return cases;
}

/** A differencing disk that is its own parent (uuid matching), and a two-image loop. */
async function loopCases(dir: string): Promise<Case[]> {
  await vhdFormat.create(`${dir}/l1.vhd`, { size: MiB });
  await vhdFormat.create(`${dir}/l2.vhd`, { size: 0, backing: "l1.vhd" });
  const l2 = Deno.readFileSync(`${dir}/l2.vhd`);
  const v = new DataView(l2.buffer);
  const self = l2.slice();
  // parent uuid := own uuid; the locators name l2.vhd's own file (renamed to case.vhd later).
  self.set(l2.subarray(68, 84), 512 + 40);
  const name = (s: string) => {
    const u = new Uint8Array(s.length * 2);
    for (let i = 0; i < s.length; i++) u[2 * i] = s.charCodeAt(i);
    return u;
  };
  for (let k = 0; k < 3; k++) {
    const at = 512 + 576 + 24 * k;
    const code = v.getUint32(at), off = Number(v.getBigUint64(at + 16));
    self.fill(0, off, off + v.getUint32(at + 4));
    if (code === 0x4d616358) self.set(new TextEncoder().encode("case.vhd"), off);
    else self.set(name("case.vhd"), off);
    new DataView(self.buffer).setUint32(at + 8, code === 0x4d616358 ? 8 : 16);
  }
  fixHeader(self, 512);
  return [{ name: "differencing disk that is its own parent", bytes: self, refuse: /loop/ }];
}

function randomCases(b: Base, r: Rng, count: number): Case[] {
  const cases: Case[] = [];
  const len = b.bytes.length;
  const pick = <T>(xs: T[]): T => xs[r.below(xs.length)];
  const flips = (bytes: Uint8Array, from: number, to: number, n: number) => {
    for (let i = 0; i < n; i++) bytes[from + r.below(Math.max(1, to - from))] ^= 1 + r.below(255);
  };
  const mutate = (name: string, fn: (bytes: Uint8Array, v: DataView) => void): Case => {
    const bytes = b.bytes.slice();
    fn(bytes, new DataView(bytes.buffer));
    return { name: `${b.name}: ${name}`, bytes };
  };
  for (let i = 0; i < count; i++) {
    const kind = b.dynamic ? r.below(8) : pick([0, 1, 6]);
    let c: Case;
    switch (kind) {
      case 0: // footer flips, checksums fixed
        c = mutate(`footer flips #${i}`, (bytes) => {
          const at = b.dynamic ? 0 : len - FOOTER_SIZE;
          flips(bytes, at, at + 90, 1 + r.below(3));
          fixFooter(bytes, at);
          if (b.dynamic) {
            bytes.copyWithin(len - FOOTER_SIZE, 0, FOOTER_SIZE);
          }
        });
        break;
      case 1: // truncation
        c = {
          name: `${b.name}: truncated #${i}`,
          bytes: b.bytes.slice(0, pick([r.below(len), len - 1, len - FOOTER_SIZE, 511, 100])),
        };
        break;
      case 2: // header flips, checksum fixed
        c = mutate(`header flips #${i}`, (bytes) => {
          flips(bytes, b.headerAt, b.headerAt + 1024, 1 + r.below(4));
          fixHeader(bytes, b.headerAt);
        });
        break;
      case 3: { // a BAT entry anywhere
        const x = pick([
          0,
          1,
          2,
          (len / SECTOR) >>> 0,
          ((len - FOOTER_SIZE) / SECTOR) >>> 0,
          r.u32(),
          0xfffffffe,
          (b.batAt / SECTOR) >>> 0,
          r.below(len / SECTOR),
        ]);
        c = mutate(`BAT entry -> ${x} #${i}`, (_, v) => {
          v.setUint32(b.batAt + 4 * r.below(b.entries), x);
        });
        break;
      }
      case 4: // two entries on one block
        if (b.allocated.length === 0) continue;
        c = mutate(`BAT entries alias #${i}`, (_, v) => {
          const e = v.getUint32(pick(b.allocated));
          v.setUint32(b.batAt + 4 * r.below(b.entries), e);
        });
        break;
      case 5: // bitmap flips
        if (b.bitmaps.length === 0) continue;
        c = mutate(`bitmap flips #${i}`, (bytes) => {
          const at = pick(b.bitmaps);
          flips(bytes, at, at + SECTOR, 1 + r.below(8));
        });
        break;
      case 6: // anywhere
        c = mutate(`random flips #${i}`, (bytes) => flips(bytes, 0, len, 1 + r.below(16)));
        break;
      default: // BAT flips
        c = mutate(`BAT flips #${i}`, (bytes) => {
          flips(bytes, b.batAt, b.batAt + 4 * b.entries, 1 + r.below(6));
        });
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
}

function checkError(e: unknown, path: string, what: string): string {
  assert.ok(e instanceof Error, `${what}: threw a non-Error: ${String(e)}`);
  assert.ok(
    e instanceof ImageError || e instanceof DiskError || e instanceof SysError,
    `${what}: unexpected ${e.name}: ${e.message}`,
  );
  assert.ok(!e.message.includes("\n"), `${what}: message of several lines: ${e.message}`);
  assert.ok(e.message.includes(path), `${what}: message does not name the file: ${e.message}`);
  assert.ok(e.message.length < 2000, `${what}: message of ${e.message.length} characters`);
  return e.message;
}

async function attempt(tally: Tally, path: string, what: string, fn: () => Promise<unknown>) {
  try {
    await fn();
    return true;
  } catch (e) {
    checkError(e, path, what);
    tally.ioErrors++;
    return false;
  }
}

async function exercise(disk: Disk, tally: Tally, path: string, r: Rng, writes: boolean) {
  const size = disk.size;
  for (let i = 0; i < 10; i++) {
    const n = Math.min(size, (1 + r.below(256)) * SECTOR);
    const off = i === 0 ? 0 : r.below((size - n) / SECTOR + 1) * SECTOR;
    await attempt(tally, path, `read ${n} at ${off}`, () => disk.read(off, new Uint8Array(n)));
    if (writes && i % 2 === 0) {
      const data = r.fill(new Uint8Array(n));
      await attempt(tally, path, `write ${n} at ${off}`, () => disk.write(off, data));
    }
  }
  let pos = 0;
  for (let calls = 0; pos < size && calls < 32; calls++) {
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
  if (writes) {
    const zOff = r.below(size / SECTOR) * SECTOR, zLen = Math.min(size - zOff, 8 * KiB);
    await attempt(tally, path, "write zeroes", () => disk.writeZeroes(zOff, zLen));
    await attempt(tally, path, "discard", () => disk.discard(zOff, zLen));
    await attempt(tally, path, "flush", () => disk.flush());
  }
}

async function runCase(dir: string, c: Case, tally: Tally, seed: number, engine: EngineKind) {
  const path = `${dir}/case.vhd`;
  writeFile(path, c.bytes);
  const r = rng(seed);
  const report = await vhdFormat.check(path).catch((e) => {
    checkError(e, path, `${c.name}: check`);
    return null;
  });
  if (report !== null) assert.ok(Array.isArray(report.errors));
  let disk: Disk;
  try {
    disk = await openDisk(`vhd:${path}`, { readOnly: true, engine });
  } catch (e) {
    const message = checkError(e, path, `${c.name}: open`);
    if (c.refuse) assert.match(message, c.refuse, `${c.name}: refused, but why?`);
    assertSame(Deno.readFileSync(path), c.bytes, `${c.name}: a refused file was written`);
    assert.ok(report === null || report.errors.length > 0, `${c.name}: check found nothing`);
    tally.refused++;
    return;
  }
  tally.opened++;
  try {
    assert.equal(c.refuse, undefined, `${c.name}: opened, but must be refused (${c.refuse})`);
    assert.ok(disk.size > 0 && disk.size % SECTOR === 0);
    await exercise(disk, tally, path, r, false);
  } finally {
    await disk.close();
  }
  assertSame(Deno.readFileSync(path), c.bytes, `${c.name}: written while open read-only`);
  disk = await openDisk(`vhd:${path}`, { engine });
  try {
    await exercise(disk, tally, path, r, true);
  } finally {
    await disk.close();
  }
  const after = Deno.statSync(path).size;
  assert.ok(after <= c.bytes.length + GROWTH_LIMIT, `${c.name}: file grew to ${after}`);
  // Whatever tapd wrote, the image still opens.
  const again = await openDisk(`vhd:${path}`, { readOnly: true, engine }).catch((e) => {
    checkError(e, path, `${c.name}: reopen`);
    return null;
  });
  await again?.close();
}

Deno.test("vhd fuzz: hundreds of damaged images are refused cleanly or survive use", async () => {
  await withNoUnhandledRejections(() =>
    withTempDir(async (dir) => {
      const bases = await makeBases(dir);
      for (const b of bases) {
        const disk = await openDisk(`vhd:${dir}/${b.name}`, { readOnly: true });
        try {
          assertSame(await readAll(disk), b.content, b.name);
        } finally {
          await disk.close();
        }
      }
      const r = rng(0xf0f0);
      const cases: Case[] = [];
      for (const b of bases) {
        cases.push(...footerCases(b), ...headerCases(b), ...randomCases(b, r, 50));
      }
      cases.push(...await loopCases(dir));
      assert.ok(cases.length >= 300, `only ${cases.length} cases`);
      const tally: Tally = { refused: 0, opened: 0, ioErrors: 0 };
      const failures: string[] = [];
      for (const [i, c] of cases.entries()) {
        try {
          const engine: EngineKind = i % 8 === 0 ? "aio" : i % 2 === 0 ? "uring" : "sync";
          await withTimeout(runCase(dir, c, tally, 0x1000 + i, engine), CASE_TIMEOUT, c.name);
        } catch (e) {
          failures.push(`${c.name}: ${(e as Error).message}`);
        }
      }
      await new Promise((resolve) => setTimeout(resolve, 50));
      assert.deepEqual(failures, [], `${failures.length} of ${cases.length} cases failed`);
      assert.ok(tally.refused > 80 && tally.opened > 80, JSON.stringify(tally));
    })
  );
});
