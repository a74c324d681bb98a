/** RAM disks share one memory image between every opener, in this process and in others. */
import assert from "node:assert/strict";
import { openDisk } from "../../drivers/mod.ts";
import type { Disk } from "../../drivers/disk.ts";
import { ramObjectName } from "../../drivers/ram.ts";
import { DiskError } from "../../drivers/errors.ts";
import { assertBytes, rng, withTempDir } from "../util.ts";

const KiB = 1024, MiB = 1024 * KiB;
const SIZE = 8 * MiB;
const MOD_URL = new URL("../../drivers/mod.ts", import.meta.url).href;

function shmPath(image: string): string {
  return `/dev/shm${ramObjectName(Deno.realPathSync(image))}`;
}

function exists(path: string): boolean {
  try {
    Deno.statSync(path);
    return true;
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) return false;
    throw e;
  }
}

/** `length` bytes of a pattern that depends on `seed` (recomputed the same way in the child). */
function pattern(seed: number, length: number): Uint8Array {
  const b = new Uint8Array(length);
  for (let i = 0; i < length; i++) b[i] = (i * 131 + seed * 7 + (i >> 9)) & 0xff;
  return b;
}

/**
 * The child: opens `ram:IMAGE[SUFFIX]`, checks that READ_OFF holds pattern(READ_SEED), writes
 * pattern(WRITE_SEED) at WRITE_OFF, then closes the disk, or with CLOSE=0 exits without closing
 * (as if it crashed). Exits 0 when everything matched.
 */
const CHILD = `
import { openDisk } from ${JSON.stringify(MOD_URL)};
const [image, suffix, readOff, readSeed, writeOff, writeSeed, length, close] = Deno.args;
${pattern.toString()}
const disk = await openDisk("ram:" + image + suffix);
const n = Number(length);
if (Number(readSeed) >= 0) {
  const got = new Uint8Array(n);
  await disk.read(Number(readOff), got);
  const want = pattern(Number(readSeed), n);
  const at = got.findIndex((b, i) => b !== want[i]);
  if (at >= 0) {
    console.error("child: byte " + at + " at offset " + readOff + " is " + got[at] + ", expected " + want[at]);
    Deno.exit(3);
  }
}
if (Number(writeSeed) >= 0) await disk.write(Number(writeOff), pattern(Number(writeSeed), n));
if (suffix.includes("persist")) await disk.flush();
if (close === "1") await disk.close();
console.log("child ok");
Deno.exit(0);
`;

interface ChildArgs {
  suffix?: string;
  readOff?: number;
  readSeed?: number;
  writeOff?: number;
  writeSeed?: number;
  length?: number;
  close?: boolean;
}

async function runChild(dir: string, image: string, a: ChildArgs): Promise<void> {
  const script = `${dir}/child.ts`;
  Deno.writeTextFileSync(script, CHILD);
  const out = await new Deno.Command(Deno.execPath(), {
    args: [
      "run",
      "-A",
      "--no-check",
      script,
      image,
      a.suffix ?? "",
      String(a.readOff ?? 0),
      String(a.readSeed ?? -1),
      String(a.writeOff ?? 0),
      String(a.writeSeed ?? -1),
      String(a.length ?? 64 * KiB),
      a.close === false ? "0" : "1",
    ],
    stdout: "piped",
    stderr: "piped",
    env: { NO_COLOR: "1" },
  }).output();
  const text = new TextDecoder().decode(out.stdout) + new TextDecoder().decode(out.stderr);
  assert.equal(out.code, 0, `child failed (exit ${out.code}):\n${text}`);
  assert.match(text, /child ok/);
}

async function readAt(disk: Disk, offset: number, length: number): Promise<Uint8Array> {
  const b = new Uint8Array(length);
  await disk.read(offset, b);
  return b;
}

/** Runs `fn` with a random 8 MiB image; checks no shared-memory object outlives the test. */
function withImage(fn: (dir: string, image: string, initial: Uint8Array) => Promise<void>) {
  return withTempDir(async (dir) => {
    const image = `${dir}/ram.img`;
    const initial = rng(0x5ead).fill(new Uint8Array(SIZE));
    Deno.writeFileSync(image, initial);
    const shm = shmPath(image);
    try {
      await fn(dir, image, initial);
      assert.equal(exists(shm), false, `${shm} left behind after every user closed`);
    } finally {
      try {
        Deno.removeSync(shm); // only if a failed test left it
      } catch { /* gone, as it should be */ }
    }
  });
}

Deno.test("ram shared: two disks on one image in one process see each other's writes", async () => {
  await withImage(async (dir, image, initial) => {
    Deno.symlinkSync(image, `${dir}/link.img`);
    const disks: Disk[] = [];
    try {
      const a = await openDisk(`ram:${image}`);
      disks.push(a);
      assert.equal(exists(shmPath(image)), true, "no shared memory object while open");
      // Through a symlink: the object is keyed by the real path, so it is the same memory.
      const b = await openDisk(`ram:${dir}/link.img`);
      disks.push(b);
      assert.equal(b.size, SIZE);
      assertBytes(await readAt(b, 0, SIZE), initial, "second opener's view of the image");

      const pa = pattern(1, 64 * KiB), pb = pattern(2, 512);
      await a.write(1 * MiB, pa);
      assertBytes(await readAt(b, 1 * MiB, pa.length), pa, "b reads a's write");
      await b.write(SIZE - 512, pb);
      assertBytes(await readAt(a, SIZE - 512, 512), pb, "a reads b's write");
      await b.writeZeroes(2 * MiB, 4 * KiB);
      assertBytes(await readAt(a, 2 * MiB, 4 * KiB), new Uint8Array(4 * KiB), "a reads b's zeroes");
      await a.discard(3 * MiB, 8 * KiB);
      assertBytes(
        await readAt(b, 3 * MiB, 8 * KiB),
        new Uint8Array(8 * KiB),
        "b reads a's discard",
      );

      // A read-only opener sees the same memory too.
      const c = await openDisk(`ram:${image},ro`);
      disks.push(c);
      assertBytes(await readAt(c, 1 * MiB, pa.length), pa, "read-only opener reads a's write");

      // The first opener leaves; the others keep the memory.
      await a.close();
      await c.close();
      assert.equal(exists(shmPath(image)), true, "object removed while b still uses it");
      assertBytes(await readAt(b, 1 * MiB, pa.length), pa, "b after a closed");
      await b.close();
      assert.equal(exists(shmPath(image)), false, "object left after the last close");
    } finally {
      for (const d of disks) await d.close();
    }
    // Volatile: the image file never changed.
    assertBytes(await Deno.readFile(image), initial, "image file");

    // A new opener loads the file afresh.
    const d = await openDisk(`ram:${image}`);
    try {
      assertBytes(
        await readAt(d, 1 * MiB, 64 * KiB),
        initial.subarray(1 * MiB, 1 * MiB + 64 * KiB),
      );
    } finally {
      await d.close();
    }
  });
});

Deno.test("ram shared: a child process sees the parent's writes and the parent the child's", async () => {
  await withImage(async (dir, image, initial) => {
    const disk = await openDisk(`ram:${image}`);
    try {
      const mine = pattern(11, 64 * KiB);
      await disk.write(1 * MiB, mine);
      await runChild(dir, image, {
        readOff: 1 * MiB,
        readSeed: 11,
        writeOff: 5 * MiB,
        writeSeed: 22,
      });
      assertBytes(await readAt(disk, 5 * MiB, 64 * KiB), pattern(22, 64 * KiB), "child's write");
      assertBytes(await readAt(disk, 1 * MiB, 64 * KiB), mine, "parent's own write");
      // The child closed; the parent still uses the object.
      assert.equal(exists(shmPath(image)), true, "object removed while the parent uses it");

      // A second child, which exits without closing (as if killed), still shares the memory.
      await runChild(dir, image, {
        readOff: 5 * MiB,
        readSeed: 22,
        writeOff: 0,
        writeSeed: 33,
        close: false,
      });
      assertBytes(await readAt(disk, 0, 64 * KiB), pattern(33, 64 * KiB), "second child's write");
      assert.equal(exists(shmPath(image)), true);
    } finally {
      await disk.close();
    }
    assert.equal(exists(shmPath(image)), false, "object left after the parent closed");
    assertBytes(await Deno.readFile(image), initial, "image file of a volatile RAM disk");
  });
});

Deno.test("ram shared: a persistent opener writes back what any process changed", async () => {
  await withImage(async (dir, image, initial) => {
    const ref = initial.slice();
    const disk = await openDisk(`ram:${image}`); // volatile here
    try {
      const mine = pattern(44, 128 * KiB);
      await disk.write(3 * MiB - 64 * KiB, mine); // across a 64 KiB chunk boundary
      ref.set(mine, 3 * MiB - 64 * KiB);
      // The child opens with ,persist, writes, flushes: the parent's writes reach the file too.
      await runChild(dir, image, { suffix: ",persist", writeOff: 7 * MiB, writeSeed: 55 });
      ref.set(pattern(55, 64 * KiB), 7 * MiB);
      assertBytes(await Deno.readFile(image), ref, "image file after the child's flush");
      assertBytes(await readAt(disk, 7 * MiB, 64 * KiB), pattern(55, 64 * KiB), "child's write");
    } finally {
      await disk.close();
    }
  });
});

Deno.test("ram shared: an object left by a process that died is cleaned up by the next user", async () => {
  await withImage(async (dir, image) => {
    // The child creates the object, writes and dies without closing: nobody holds it now.
    await runChild(dir, image, { writeOff: 0, writeSeed: 66, close: false });
    const shm = shmPath(image);
    assert.equal(exists(shm), true, "the dead child's object should still be there");
    const disk = await openDisk(`ram:${image}`);
    try {
      assert.equal(disk.size, SIZE);
      const b = await readAt(disk, 0, 4096);
      b.fill(9);
      await disk.write(0, b);
      assertBytes(await readAt(disk, 0, 4096), b, "write after taking over a stale object");
    } finally {
      await disk.close();
    }
    assert.equal(exists(shm), false, "stale object left after the last close");
  });
});

Deno.test("ram shared: a new opener refuses an image whose size changed while loaded", async () => {
  await withImage(async (_dir, image) => {
    const a = await openDisk(`ram:${image}`);
    try {
      Deno.truncateSync(image, SIZE + 1 * MiB);
      await assert.rejects(openDisk(`ram:${image}`), (e: unknown) => {
        assert.ok(e instanceof DiskError, `expected DiskError, got ${e}`);
        assert.equal(e.code, "EIO");
        assert.match(e.message, /changed size/);
        return true;
      });
      // The first user is not disturbed.
      await a.write(0, pattern(1, 4096));
      assertBytes(await readAt(a, 0, 4096), pattern(1, 4096));
    } finally {
      await a.close();
    }
    // Once everybody closed, the new size is loaded.
    const b = await openDisk(`ram:${image}`);
    try {
      assert.equal(b.size, SIZE + 1 * MiB);
      assertBytes(await readAt(b, SIZE, 1 * MiB), new Uint8Array(1 * MiB), "the grown tail");
    } finally {
      await b.close();
    }
  });
});

Deno.test("ram shared: concurrent opens in one process share one object", async () => {
  await withImage(async (_dir, image, initial) => {
    const disks = await Promise.all(Array.from({ length: 6 }, () => openDisk(`ram:${image}`)));
    try {
      assertBytes(await readAt(disks[5], 0, SIZE), initial, "loaded image");
      await disks[0].write(4096, pattern(3, 512));
      for (const d of disks) assertBytes(await readAt(d, 4096, 512), pattern(3, 512));
    } finally {
      await Promise.all(disks.map((d) => d.close()));
    }
  });
});
