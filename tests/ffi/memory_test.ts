import assert from "node:assert/strict";
import { addressOf, AlignedMemory, Mapping } from "../../ffi/memory.ts";
import { memfd } from "../../ffi/file.ts";
import { SysError } from "../../ffi/errno.ts";
import { libc } from "../../ffi/libc.ts";
import { PROT_READ } from "../../ffi/constants.ts";

/** Whether /proc/self/maps lists a mapping that starts at `address`. */
function isMapped(address: number): boolean {
  const start = address.toString(16);
  return Deno.readTextFileSync("/proc/self/maps").split("\n").some((line) =>
    line.startsWith(start + "-")
  );
}

Deno.test("AlignedMemory is page-aligned, sized as asked and addressable", () => {
  using mem = new AlignedMemory(10_000);
  assert.equal(mem.bytes.length, 10_000);
  assert.equal(mem.address % 4096, 0);
  assert.equal(addressOf(mem.bytes), mem.address);
  // The view is over the foreign block itself: Deno sees the same address.
  assert.equal(Number(Deno.UnsafePointer.value(Deno.UnsafePointer.of(mem.bytes))), mem.address);
  mem.bytes[0] = 0xab;
  mem.bytes[9_999] = 0xcd;
  assert.equal(mem.bytes[0], 0xab);
  assert.equal(mem.bytes[9_999], 0xcd);
});

Deno.test("AlignedMemory honours a larger alignment", () => {
  using mem = new AlignedMemory(4096, 65536);
  assert.equal(mem.address % 65536, 0);
});

Deno.test("AlignedMemory rejects sizes that are not positive", () => {
  assert.throws(() => new AlignedMemory(0), RangeError);
  assert.throws(() => new AlignedMemory(-1), RangeError);
  assert.throws(() => new AlignedMemory(NaN), RangeError);
});

Deno.test("addressOf a subarray or another view type is address + byteOffset", () => {
  using mem = new AlignedMemory(8192);
  assert.equal(addressOf(mem.bytes.subarray(100, 200)), mem.address + 100);
  assert.equal(addressOf(mem.bytes.subarray(4096)), mem.address + 4096);
  assert.equal(addressOf(mem.bytes.subarray(10).subarray(5)), mem.address + 15);
  assert.equal(addressOf(new Uint32Array(mem.bytes.buffer, 64, 4)), mem.address + 64);
  assert.equal(addressOf(new DataView(mem.bytes.buffer, 12)), mem.address + 12);
  assert.equal(
    Number(Deno.UnsafePointer.value(Deno.UnsafePointer.of(mem.bytes.subarray(300)))),
    mem.address + 300,
  );
});

Deno.test("addressOf plain JS memory is null", () => {
  assert.equal(addressOf(new Uint8Array(16)), null);
  assert.equal(addressOf(new Uint8Array(new ArrayBuffer(4096), 8)), null);
  assert.equal(addressOf(new Uint8Array(new SharedArrayBuffer(64))), null);
  assert.equal(addressOf(new Float64Array(2)), null);
});

Deno.test("AlignedMemory dispose is idempotent", () => {
  const mem = new AlignedMemory(4096);
  mem[Symbol.dispose]();
  mem[Symbol.dispose]();
});

Deno.test("Mappings of the same memfd share their bytes", () => {
  const size = 64 * 1024;
  using file = memfd("tapd-memory-test", size);
  using a = new Mapping(file.fd, size);
  using b = new Mapping(file.fd, size);
  assert.notEqual(a.address, b.address);
  assert.equal(a.size, size);
  assert.equal(a.bytes.length, size);
  assert.equal(a.address % 4096, 0);
  assert.equal(addressOf(a.bytes), a.address);
  assert.equal(addressOf(b.bytes.subarray(4096)), b.address + 4096);

  a.bytes[0] = 1;
  a.bytes[size - 1] = 2;
  assert.equal(b.bytes[0], 1);
  assert.equal(b.bytes[size - 1], 2);
  b.bytes.fill(7, 100, 200);
  assert.deepEqual(a.bytes.subarray(100, 200), new Uint8Array(100).fill(7));

  // A mapping at an offset sees the same file pages.
  using c = new Mapping(file.fd, 4096, { offset: 8192 });
  a.bytes[8192 + 5] = 99;
  assert.equal(c.bytes[5], 99);
  c.bytes[6] = 98;
  assert.equal(b.bytes[8192 + 6], 98);

  // And the file itself holds what the mappings wrote.
  const out = new Uint8Array(3);
  assert.equal(libc.pread(file.fd, out, 3n, 8192n + 4n), 3n);
  assert.deepEqual(out, new Uint8Array([0, 99, 98]));
});

Deno.test("Mapping dispose unmaps, once", () => {
  using file = memfd("tapd-unmap-test", 8192);
  const m = new Mapping(file.fd, 8192);
  assert.ok(isMapped(m.address), "mapping not listed in /proc/self/maps");
  m[Symbol.dispose]();
  assert.ok(!isMapped(m.address), "mapping still listed after dispose");
  m[Symbol.dispose]();
});

Deno.test("Mapping honours prot", () => {
  using file = memfd("tapd-prot-test", 4096);
  using m = new Mapping(file.fd, 4096, { prot: PROT_READ });
  const line = Deno.readTextFileSync("/proc/self/maps").split("\n")
    .find((l) => l.startsWith(m.address.toString(16) + "-"));
  assert.ok(line !== undefined);
  assert.match(line, /^\S+ r--s /);
});

Deno.test("Mapping of a bad descriptor throws a SysError naming mmap", () => {
  assert.throws(
    () => new Mapping(987_654, 4096, { what: "nothing" }),
    (e: unknown) =>
      e instanceof SysError && e.code === "EBADF" && e.call === "mmap" && e.path === "nothing",
  );
});
