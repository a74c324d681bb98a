import assert from "node:assert/strict";
import { denortAvailable, PERMISSIONS } from "../../scripts/denort.ts";

const root = new URL("../../", import.meta.url).pathname;

interface Run {
  code: number;
  stdout: string;
  stderr: string;
}

async function tapd(...args: string[]): Promise<Run> {
  const { code, stdout, stderr } = await new Deno.Command(`${root}tapd`, {
    args,
    stdout: "piped",
    stderr: "piped",
    env: { TAPD_STATE_DIR: `${root}.test-state` },
  }).output();
  const dec = new TextDecoder();
  return { code, stdout: dec.decode(stdout), stderr: dec.decode(stderr) };
}

function oneLineError(r: Run, code: number, pattern: RegExp): void {
  assert.equal(r.code, code, r.stderr);
  const lines = r.stderr.trim().split("\n");
  assert.equal(lines.length, 1, `expected one line, got:\n${r.stderr}`);
  assert.match(lines[0], pattern);
}

Deno.test("tapd --help lists the commands and help NAME prints a command's usage", async () => {
  const help = await tapd("--help");
  assert.equal(help.code, 0);
  assert.match(help.stdout, /bench/);
  assert.match(help.stdout, /tap:TYPE:PATH/);
  const bench = await tapd("help", "bench");
  assert.equal(bench.code, 0);
  assert.match(bench.stdout, /Usage: tapd bench/);
  assert.match(bench.stdout, /--engine aio\|uring\|sync/);
});

Deno.test("tapd version prints the version", async () => {
  const r = await tapd("version");
  assert.equal(r.code, 0);
  assert.match(r.stdout, /^tapd \d+\.\d+\.\d+ \(deno 2\.9\.6\)$/m);
});

Deno.test("unknown commands and bad flags give one line and exit 2", async () => {
  oneLineError(await tapd("frobnicate"), 2, /^tapd: Unknown command "frobnicate"/);
  oneLineError(await tapd("help", "frobnicate"), 2, /Unknown command "frobnicate"/);
  oneLineError(await tapd("bench", "--bogus"), 2, /^tapd: bench: Unknown option '--bogus'$/);
  oneLineError(await tapd("bench", "--rw", "sideways"), 2, /Invalid --rw "sideways"/);
  oneLineError(await tapd("bench", "--bs", "3x"), 2, /Invalid --bs "3x"/);
  oneLineError(await tapd("bench", "--bs", "1000"), 2, /multiple of 512/);
  oneLineError(await tapd("bench", "--qd", "0"), 2, /Invalid --qd "0"/);
  oneLineError(await tapd("bench", "--engine", "posix"), 2, /Invalid --engine "posix"/);
  oneLineError(await tapd("bench", "--cpus", "3-1"), 2, /Invalid CPU list "3-1"/);
  oneLineError(await tapd("bench", "--batch", "x"), 2, /Invalid --batch "x"/);
  oneLineError(
    await tapd("bench", "--poll-us", "-5"),
    2,
    /Invalid --poll-us "-5"|Option '--poll-us/,
  );
});

Deno.test("bad disk specs and missing images give one line and exit 1", async () => {
  oneLineError(
    await tapd("bench", "tap:nope:/x"),
    1,
    /Unknown disk type "nope".*aio, sync, ram, qcow/,
  );
  oneLineError(await tapd("bench", "tap:aio:"), 1, /Missing path/);
  oneLineError(
    await tapd("bench", "aio:/nonexistent/disk.img"),
    1,
    /^tapd: ENOENT open \/nonexistent\/disk\.img: No such file or directory$/,
  );
});

Deno.test("tapd bench drives aio, uring, sync and ram disks and reports JSON", async () => {
  const dir = await Deno.makeTempDir({ dir: "/var/tmp", prefix: "tapd-cli-" });
  try {
    const img = `${dir}/disk.img`;
    await Deno.writeFile(img, crypto.getRandomValues(new Uint8Array(65536)).slice(0, 65536));
    const f = await Deno.open(img, { write: true });
    await f.truncate(32 << 20);
    f.close();
    for (
      const [spec, extra] of [
        [`tap:aio:${img}`, ["--engine", "aio"]],
        [`tap:aio:${img}`, ["--engine", "uring", "--rw", "randwrite"]],
        [`tap:aio:${img}`, ["--cpus", "0", "--poll-us", "200", "--batch", "8"]],
        [`sync:${img}`, ["--rw", "read", "--bs", "64k"]],
        [`ram:${img}`, ["--rw", "randwrite"]],
      ] as const
    ) {
      const r = await tapd("bench", spec, "--seconds", "1", "--qd", "8", "--json", ...extra);
      assert.equal(r.code, 0, r.stderr);
      const j = JSON.parse(r.stdout);
      assert.equal(j.spec, spec);
      assert.ok(j.iops > 0 && j.ops > 0 && j.p99Us >= j.p50Us, r.stdout);
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

const denortMissing = denortAvailable();
Deno.test({
  name: denortMissing === null
    ? "deno compile builds one binary that runs"
    : `deno compile builds one binary that runs (skipped: ${denortMissing})`,
  ignore: denortMissing !== null,
  async fn() {
    const dir = await Deno.makeTempDir();
    try {
      const bin = `${dir}/tapd`;
      const build = await new Deno.Command(Deno.execPath(), {
        args: ["run", ...PERMISSIONS, `${root}scripts/compile.ts`, bin],
      }).output();
      assert.equal(build.code, 0);
      const r = await new Deno.Command(bin, { args: ["version"], stdout: "piped" }).output();
      assert.equal(r.code, 0);
      assert.match(new TextDecoder().decode(r.stdout), /^tapd /);
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});
