/**
 * Failures part-way: the partial output is removed, the error comes out in one line, nothing
 * hangs. Driven in-process with engines that fail on purpose, and (as root) for real on a full
 * file system.
 */
import assert from "node:assert/strict";
import { createEngine } from "../../io/mod.ts";
import type { Buffers, IoEngine } from "../../io/engine.ts";
import type { FileHandle } from "../../ffi/file.ts";
import { writeAtomically } from "../../tools/output.ts";
import { geometryFor } from "../../tools/qcow_layout.ts";
import { openRawSource, type RawSource, writeQcow } from "../../tools/qcow_writer.ts";
import { rng } from "../util.ts";
import {
  assertOneLineError,
  inTempDir,
  listDir,
  makeRaw,
  MiB,
  qemuImgOk,
  tapd,
  tapdIn,
} from "./helpers.ts";

/** An engine that passes everything to `inner` except the chosen reads or writes, which fail. */
function failing(inner: IoEngine, fail: { read?: number; write?: number }): IoEngine {
  let reads = 0, writes = 0;
  return {
    kind: inner.kind,
    read(file: FileHandle, offset: number, bufs: Buffers): Promise<number> {
      if (++reads === fail.read) return Promise.reject(new Error("EIO read: injected"));
      return inner.read(file, offset, bufs);
    },
    write(file: FileHandle, offset: number, bufs: Buffers): Promise<number> {
      if (++writes === fail.write) return Promise.reject(new Error("ENOSPC write: injected"));
      return inner.write(file, offset, bufs);
    },
    submit(write, file, offset, bufs, done): void {
      (write ? this.write(file, offset, bufs) : this.read(file, offset, bufs)).then(done, done);
    },
    fsync: (file, dataOnly) => inner.fsync(file, dataOnly),
    fallocate: (file, mode, offset, length) => inner.fallocate(file, mode, offset, length),
    close: () => inner.close(),
  };
}

Deno.test("a read or write failing part-way through img2qcow removes the partial file", async () => {
  await inTempDir(async (dir) => {
    const src = `${dir}/src.raw`;
    makeRaw(src, 6 * MiB, rng(1), ["random"]);
    const cases: { read?: number; write?: number }[] = [
      { read: 1 },
      { read: 5 },
      { write: 1 },
      { write: 7 },
    ];
    for (const fail of cases) {
      const real = openRawSource(src, 4);
      const source: RawSource = {
        ...real,
        engine: fail.read === undefined ? real.engine : failing(real.engine, fail),
        close: () => real.close(),
      };
      const out = createEngine("sync");
      const engine = fail.write === undefined ? out : failing(out, fail);
      try {
        await assert.rejects(
          writeAtomically(`${dir}/out.qcow`, false, "--force", async (p) => {
            await writeQcow(source, p.file, engine, {
              geometry: geometryFor(undefined, false),
              chunkSize: 256 * 1024,
              readDepth: 3,
              writeDepth: 2,
            });
          }),
          /injected/,
          JSON.stringify(fail),
        );
      } finally {
        await out.close();
        await source.close();
      }
      assert.deepEqual(listDir(dir), ["src.raw"], JSON.stringify(fail));
    }
  });
});

/** Why a small tmpfs cannot be mounted here, or null. */
function tmpfsUnavailable(): string | null {
  if (Deno.uid() !== 0) return "needs root";
  try {
    const r = new Deno.Command("mount", { args: ["--version"], stdout: "null", stderr: "null" })
      .outputSync();
    return r.success ? null : "no mount command";
  } catch {
    return "no mount command";
  }
}

const noTmpfs = tmpfsUnavailable();

Deno.test({
  name: `running out of space: one line, exit 1, no partial output${
    noTmpfs === null ? "" : ` (skipped: ${noTmpfs})`
  }`,
  ignore: noTmpfs !== null,
  fn: async () => {
    await inTempDir(async (dir) => {
      const src = `${dir}/src.raw`;
      makeRaw(src, 8 * MiB, rng(2), ["random"]);
      await qemuImgOk("convert", "-f", "raw", "-O", "qcow", src, `${dir}/src.qcow`);
      const small = `${dir}/small`;
      Deno.mkdirSync(small);
      const mount = new Deno.Command("mount", {
        args: ["-t", "tmpfs", "-o", "size=2m", "tmpfs", small],
        stderr: "piped",
      }).outputSync();
      assert.ok(mount.success, new TextDecoder().decode(mount.stderr));
      try {
        assertOneLineError(await tapd("img2qcow", `${small}/a.qcow`, src), 1, /ENOSPC/);
        assertOneLineError(
          await tapd("qcow2raw", `${small}/a.raw`, `${dir}/src.qcow`),
          1,
          /ENOSPC/,
        );
        assertOneLineError(await tapdIn(small, "qcow-create", "-r", "64", "a.qcow"), 1, /ENOSPC/);
        assert.deepEqual(listDir(small), []);
      } finally {
        new Deno.Command("umount", { args: [small] }).outputSync();
      }
    });
  },
});
