/** The TypeScript frontend (ring/frontend.ts) against `tapd tapdisk`, as the C one is. */
import assert from "node:assert/strict";
import { RingFrontend } from "../../ring/frontend.ts";
import { rng, withTempDir } from "../util.ts";

const root = new URL("../../", import.meta.url).pathname;
const MiB = 1024 * 1024;

async function withTapdisk(spec: string, sock: string, fn: () => Promise<void>): Promise<void> {
  const child = new Deno.Command(`${root}tapd`, {
    args: ["tapdisk", spec, "--ring", `unix:${sock}`],
    stdout: "null",
    stderr: "piped",
  }).spawn();
  try {
    for (let i = 0; i < 200; i++) {
      try {
        if (Deno.statSync(sock).isSocket) break;
      } catch { /* not yet */ }
      await new Promise((r) => setTimeout(r, 50));
    }
    await fn();
  } finally {
    child.kill("SIGTERM");
    const { code, stderr } = await child.output();
    assert.equal(code, 0, new TextDecoder().decode(stderr));
  }
}

Deno.test("ring: the TypeScript frontend reads and writes many requests at once (direct, INDIRECT, split), verified", async () => {
  await withTempDir(async (dir) => {
    const img = `${dir}/disk.img`, sock = `${dir}/ring.sock`;
    const ref = new Uint8Array(16 * MiB);
    crypto.getRandomValues(ref.subarray(0, 65536));
    for (let o = 65536; o < ref.length; o += 65536) ref.copyWithin(o, 0, 65536);
    Deno.writeFileSync(img, ref);
    await withTapdisk(`tap:aio:${img}`, sock, async () => {
      const fe = new RingFrontend(sock);
      try {
        assert.equal(fe.size, ref.length);
        const r = rng(7);
        for (let batch = 0; batch < 100; batch++) {
          const ops: Promise<void>[] = [];
          const used: Array<[number, number]> = [];
          for (let k = 0; k < 40; k++) {
            // Up to 44 KiB goes direct, up to 256 KiB INDIRECT, larger is split over slots.
            const sectors = 1 + r.below(r.below(4) === 0 ? 1200 : 128);
            const len = sectors * 512, off = r.below((ref.length - len) / 512) * 512;
            if (used.some(([a, b]) => off < b && a < off + len)) continue;
            used.push([off, off + len]);
            if (r.below(2) === 0) {
              const data = new Uint8Array(len);
              crypto.getRandomValues(data.subarray(0, Math.min(len, 65536)));
              ref.set(data, off);
              ops.push(fe.write(off, data));
            } else {
              const expect = ref.slice(off, off + len), got = new Uint8Array(len);
              ops.push(fe.read(off, got).then(() => assert.deepEqual(got, expect)));
            }
          }
          await Promise.all(ops);
        }
        await fe.flush();
        await fe.read(512, new Uint8Array(0)); // nothing to do, no request
        await assert.rejects(fe.read(ref.length, new Uint8Array(512)), /status -1/);
      } finally {
        fe.close();
      }
    });
    assert.deepEqual(Deno.readFileSync(img), ref);
  });
});

Deno.test("ring: tapd bench --ring drives a tapdisk and reports JSON", async () => {
  await withTempDir(async (dir) => {
    const img = `${dir}/disk.img`, sock = `${dir}/ring.sock`;
    Deno.writeFileSync(img, new Uint8Array(8 * MiB).fill(1));
    await withTapdisk(`tap:aio:${img}`, sock, async () => {
      const r = await new Deno.Command(`${root}tapd`, {
        args: ["bench", "--ring", `unix:${sock}`, "--seconds", "1", "--qd", "16", "--json"],
        stdout: "piped",
        stderr: "piped",
      }).output();
      assert.equal(r.code, 0, new TextDecoder().decode(r.stderr));
      const j = JSON.parse(new TextDecoder().decode(r.stdout));
      assert.ok(j.iops > 0 && j.ops > 0);
    });
  });
});
