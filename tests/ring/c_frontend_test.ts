/**
 * `tapd tapdisk SPEC --ring unix:PATH` driven end to end by an independent frontend written in C
 * against Xen's own ring macros (tests/ring/c/frontend.c): random I/O, direct and INDIRECT, with
 * the ring kept full and every read checked against a shadow of the disk, malformed requests,
 * frontends that vanish mid-flight, two frontends at once, and a read-only disk. The image left
 * behind is compared with the frontend's shadow after tapdisk has stopped (SIGTERM, exit 0).
 *
 * TAPD_RING_TEST_TAPD may name another program to run as `tapd` (e.g. a reference backend).
 */
import assert from "node:assert/strict";
import { assertBytes, cpuTicks, rng, withTempDir } from "../util.ts";
import { assertFrontendOk, buildFrontend, type FrontendRun, runFrontend } from "./frontend_c.ts";

const ROOT = new URL("../../", import.meta.url).pathname;
const TAPD = Deno.env.get("TAPD_RING_TEST_TAPD") ?? `${ROOT}tapd`;
const MiB = 1024 * 1024;
const dec = new TextDecoder();

/** Whether this tapd has the tapdisk command at all (the tests skip visibly if not). */
async function tapdiskMissing(): Promise<string | undefined> {
  const out = await new Deno.Command(TAPD, {
    args: ["help", "tapdisk"],
    stdout: "piped",
    stderr: "piped",
  }).output();
  const err = dec.decode(out.stderr);
  return out.code !== 0 && err.includes('Unknown command "tapdisk"')
    ? "tapd has no tapdisk command yet"
    : undefined;
}
const missing = await tapdiskMissing();

function ringTest(name: string, fn: (dir: string) => Promise<void>) {
  Deno.test({
    name: missing ? `${name} (skipped: ${missing})` : name,
    ignore: missing !== undefined,
    fn: () => withTempDir(fn),
  });
}

/** A running `tapd tapdisk`; stop() sends SIGTERM and expects exit 0. */
class Tapdisk {
  #child: Deno.ChildProcess;
  #output: Promise<Deno.CommandOutput>;
  #exited: Deno.CommandOutput | undefined;
  readonly sock: string;

  private constructor(child: Deno.ChildProcess, sock: string) {
    this.#child = child;
    this.sock = sock;
    this.#output = child.output();
    this.#output.then((o) => this.#exited = o, () => {});
  }

  static async start(spec: string, sock: string, extra: string[] = []): Promise<Tapdisk> {
    const child = new Deno.Command(TAPD, {
      args: ["tapdisk", spec, "--ring", `unix:${sock}`, ...extra],
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    const t = new Tapdisk(child, sock);
    const deadline = Date.now() + 10_000;
    for (;;) {
      if (t.#exited) {
        throw new Error(
          `tapdisk ${spec} exited ${t.#exited.code} before listening: ${t.stderr()}`,
        );
      }
      try {
        if (Deno.statSync(sock).isSocket) return t;
      } catch { /* not yet */ }
      if (Date.now() > deadline) {
        await t.kill();
        throw new Error(`tapdisk ${spec}: no socket at ${sock} after 10 s: ${t.stderr()}`);
      }
      await new Promise((r) => setTimeout(r, 20));
    }
  }

  stderr(): string {
    return this.#exited ? dec.decode(this.#exited.stderr).trim() : "(still running)";
  }

  get running(): boolean {
    return this.#exited === undefined;
  }

  get pid(): number {
    return this.#child.pid;
  }

  /** SIGTERM; waits (up to 20 s) and fails unless tapdisk exits 0. */
  async stop(): Promise<void> {
    assert.ok(this.running, `tapdisk died before it was stopped: ${this.stderr()}`);
    this.#child.kill("SIGTERM");
    const timer = setTimeout(() => this.#child.kill("SIGKILL"), 20_000);
    try {
      const out = await this.#output;
      assert.equal(
        out.code,
        0,
        `tapdisk exited ${out.code}${out.signal ? ` (${out.signal})` : ""} on SIGTERM: ` +
          dec.decode(out.stderr).trim(),
      );
    } finally {
      clearTimeout(timer);
    }
  }

  /** For finally blocks: SIGKILL if still running, and reap. */
  async kill(): Promise<void> {
    if (this.running) {
      try {
        this.#child.kill("SIGKILL");
      } catch { /* exited meanwhile */ }
    }
    await this.#output.catch(() => {});
  }
}

/** Runs `fn` with a tapdisk serving `spec`; kills it whatever happens. */
async function withTapdisk(
  dir: string,
  spec: string,
  fn: (t: Tapdisk) => Promise<void>,
  extra: string[] = [],
): Promise<void> {
  const t = await Tapdisk.start(spec, `${dir}/ring.sock`, extra);
  try {
    await fn(t);
  } finally {
    await t.kill();
  }
}

/**
 * Fails unless a verify run that tapdisk offered INDIRECT requests to (max_indirect > 11 in its
 * stderr summary) issued some.
 */
function assertIndirectUsed(run: FrontendRun, what: string): void {
  const m = / (\d+) indirect \(\d+ segments, max_indirect (\d+)\)/.exec(run.stderr);
  assert.ok(m, `${what}: no verify summary on stderr: ${run.stderr.trim()}`);
  if (Number(m[2]) > 11) assert.ok(Number(m[1]) > 0, `${what}: no INDIRECT request: ${m[0]}`);
}

/** Runs the frontend against t and fails (with tapdisk's stderr if it died) unless `ok N`. */
async function frontend(t: Tapdisk, what: string, ...args: string[]): Promise<FrontendRun> {
  const bin = await buildFrontend();
  const run = await runFrontend(bin, [t.sock, ...args]);
  if (run.code !== 0 && !t.running) {
    run.stdout += ` [tapdisk is gone: ${t.stderr()}]`;
  }
  if (args[0] !== "vanish") assertFrontendOk(run, what);
  return run;
}

function randomImage(path: string, bytes: number, seed: number): void {
  const r = rng(seed);
  const f = Deno.openSync(path, { write: true, create: true, truncate: true });
  try {
    const chunk = new Uint8Array(MiB);
    for (let off = 0; off < bytes; off += MiB) {
      r.fill(chunk);
      f.writeSync(chunk.subarray(0, Math.min(MiB, bytes - off)));
    }
  } finally {
    f.close();
  }
}

/** Compares image and expected, naming the first differing sector. */
function assertSameDisk(image: Uint8Array, expected: Uint8Array, what: string): void {
  assert.equal(image.length, expected.length, `${what}: sizes differ`);
  try {
    assertBytes(image, expected, what);
  } catch (e) {
    const m = /at byte (\d+)/.exec((e as Error).message);
    throw new Error(`${(e as Error).message}${m ? ` (sector ${Math.floor(+m[1] / 512)})` : ""}`);
  }
}

const DISK = 64 * MiB;

ringTest(
  "ring: C frontend, raw disk: 20000 random ops, the ring kept full, image = shadow",
  async (dir) => {
    const img = `${dir}/disk.img`, ref = `${dir}/ref.img`, shadow = `${dir}/shadow.img`;
    randomImage(img, DISK, 1);
    Deno.copyFileSync(img, ref);
    await withTapdisk(dir, `tap:aio:${img}`, async (t) => {
      const run = await frontend(t, "verify", "verify", ref, "20000", "101", shadow);
      assertIndirectUsed(run, "verify");
      await t.stop();
    });
    assertSameDisk(Deno.readFileSync(img), Deno.readFileSync(shadow), "image vs shadow");
  },
);

ringTest(
  "ring: tapdisk --poll-us 200: 20000 verified random ops, the load mode, then idle again",
  async (dir) => {
    const img = `${dir}/disk.img`, ref = `${dir}/ref.img`, shadow = `${dir}/shadow.img`;
    randomImage(img, DISK, 4);
    Deno.copyFileSync(img, ref);
    await withTapdisk(dir, `tap:aio:${img}`, async (t) => {
      await frontend(t, "verify", "verify", ref, "20000", "103", shadow);
      const bin = await buildFrontend();
      for (const load of [["rand4k", "64"], ["seq1m", "16"]]) {
        const run = await runFrontend(bin, [t.sock, "load", ...load, "1", "200"]);
        assert.equal(run.code, 0, `load ${load[0]}: ${run.stdout}${run.stderr}`);
        const iops = /^iops (\d+)$/m.exec(run.stdout);
        assert.ok(iops && Number(iops[1]) > 0, `load ${load[0]}: ${run.stdout}`);
      }
      // Polling ends 200 µs after the last request: an idle second costs next to no CPU.
      await new Promise((r) => setTimeout(r, 200));
      const before = cpuTicks(t.pid);
      await new Promise((r) => setTimeout(r, 1000));
      const used = cpuTicks(t.pid) - before;
      assert.ok(used < 10, `an idle tapdisk --poll-us 200 used ${used} ticks of CPU in 1 s`);
      await t.stop();
    }, ["--poll-us", "200"]);
    assertSameDisk(Deno.readFileSync(img), Deno.readFileSync(shadow), "image vs shadow");
  },
);

ringTest(
  "ring: C frontend, qcow disk: 20000 random ops, image = shadow (qemu-img compare)",
  async (dir) => {
    const img = `${dir}/disk.qcow`, ref = `${dir}/zeros.img`, shadow = `${dir}/shadow.img`;
    const created = await new Deno.Command(TAPD, {
      args: ["qcow-create", "64", img],
      stdout: "piped",
      stderr: "piped",
    }).output();
    assert.equal(created.code, 0, `qcow-create: ${dec.decode(created.stderr)}`);
    Deno.writeFileSync(ref, new Uint8Array(0));
    Deno.truncateSync(ref, DISK);
    await withTapdisk(dir, `tap:qcow:${img}`, async (t) => {
      await frontend(t, "verify", "verify", ref, "20000", "202", shadow);
      await t.stop();
    });
    const cmp = await new Deno.Command("qemu-img", {
      args: ["compare", "-f", "qcow", "-F", "raw", img, shadow],
      stdout: "piped",
      stderr: "piped",
    }).output();
    assert.equal(
      cmp.code,
      0,
      `qemu-img compare: ${dec.decode(cmp.stdout).trim()} ${dec.decode(cmp.stderr).trim()}`,
    );
  },
);

ringTest(
  "ring: C frontend, malformed requests get errors and the ring keeps working",
  async (dir) => {
    const img = `${dir}/disk.img`, ref = `${dir}/ref.img`, shadow = `${dir}/shadow.img`;
    randomImage(img, 16 * MiB, 3);
    Deno.copyFileSync(img, ref);
    await withTapdisk(dir, `tap:aio:${img}`, async (t) => {
      // malformed restores what it wrote, so the disk is still ref afterwards.
      const n = assertFrontendOk(await frontend(t, "malformed", "malformed", "7"), "malformed");
      assert.ok(n > 100, `malformed checked only ${n} responses`);
      await frontend(t, "verify after malformed", "verify", ref, "5000", "303", shadow);
      await t.stop();
    });
    assertSameDisk(Deno.readFileSync(img), Deno.readFileSync(shadow), "image vs shadow");
  },
);

ringTest("ring: C frontends that vanish mid-flight leave tapdisk serving", async (dir) => {
  const img = `${dir}/disk.img`, ref = `${dir}/ref.img`, shadow = `${dir}/shadow.img`;
  randomImage(img, 16 * MiB, 4);
  Deno.copyFileSync(img, ref);
  await withTapdisk(dir, `tap:aio:${img}`, async (t) => {
    // vanish writes ref's own data: the disk's content does not change.
    for (let i = 0; i < 5; i++) {
      const run = await frontend(t, "vanish", "vanish", ref, "32");
      assert.equal(run.code, 0, `vanish: ${run.stdout} ${run.stderr}`);
      assert.match(run.stdout, /^submitted 32$/m);
    }
    // Connections that go away before (or right after) the attach message.
    for (let i = 0; i < 3; i++) {
      const conn = await Deno.connect({ transport: "unix", path: t.sock });
      if (i > 0) await conn.read(new Uint8Array(64));
      conn.close();
    }
    assert.ok(t.running, `tapdisk died: ${t.stderr()}`);
    await frontend(t, "verify after vanish", "verify", ref, "5000", "404", shadow);
    await t.stop();
  });
  assertSameDisk(Deno.readFileSync(img), Deno.readFileSync(shadow), "image vs shadow");
});

ringTest(
  "ring: two C frontends at once, each on its own ring and half of the disk",
  async (dir) => {
    const img = `${dir}/disk.img`, ref = `${dir}/ref.img`;
    const bytes = 32 * MiB, half = bytes / 512 / 2;
    randomImage(img, bytes, 5);
    Deno.copyFileSync(img, ref);
    await withTapdisk(dir, `tap:aio:${img}`, async (t) => {
      const [a, b] = await Promise.all([
        frontend(t, "frontend A", "verify", ref, "10000", "501", `${dir}/a.img`, "0", `${half}`),
        frontend(
          t,
          "frontend B",
          "verify",
          ref,
          "10000",
          "502",
          `${dir}/b.img`,
          `${half}`,
          `${2 * half}`,
        ),
      ]);
      assertFrontendOk(a, "frontend A");
      assertFrontendOk(b, "frontend B");
      await t.stop();
    });
    const image = Deno.readFileSync(img);
    const expected = Deno.readFileSync(`${dir}/a.img`);
    expected.set(Deno.readFileSync(`${dir}/b.img`).subarray(half * 512), half * 512);
    assertSameDisk(image, expected, "image vs shadows A|B");
  },
);

ringTest("ring: C frontend, read-only disk: reads work, writes fail", async (dir) => {
  const img = `${dir}/disk.img`, ref = `${dir}/ref.img`;
  randomImage(img, 4 * MiB, 6);
  Deno.copyFileSync(img, ref);
  await withTapdisk(dir, `tap:aio:${img},ro`, async (t) => {
    await frontend(t, "readonly", "readonly");
    await t.stop();
  });
  assertSameDisk(Deno.readFileSync(img), Deno.readFileSync(ref), "read-only image vs original");
});
