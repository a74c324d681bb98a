/**
 * `tapd img2qcow` against `qemu-img convert -f raw -O qcow` on the same raw file: a 2 GiB file of
 * mixed content (random data with scattered zero clusters, written zeros, holes), interleaved
 * rounds (the order alternates), each output checked identical to the source once. The page
 * cache is dropped before every run when root (both tools then read from the device), so the
 * order does not favour either. Prints the medians and the ratio tapd time ÷ qemu-img time.
 *
 *   deno run -A bench/img2qcow.ts [--file PATH] [--size 2G] [--rounds 3] [--no-drop-caches]
 */
import { parseArgs } from "node:util";
import { median, ROOT as root } from "./common.ts";

const { values } = parseArgs({
  options: {
    file: { type: "string" },
    size: { type: "string", default: "2G" },
    rounds: { type: "string", default: "3" },
    "no-drop-caches": { type: "boolean", default: false },
  },
});
const GiB = 2 ** 30, SEGMENT = 16 * 2 ** 20;
const size = Number(values.size.replace(/G$/i, "")) * GiB;
const rounds = Number(values.rounds);
const dropCaches = !values["no-drop-caches"] && Deno.uid() === 0;

async function run(cmd: string, args: string[]): Promise<string> {
  const r = await new Deno.Command(cmd, { args, stdout: "piped", stderr: "piped" }).output();
  if (r.code !== 0) {
    throw new Error(`${cmd} ${args.join(" ")} failed: ${new TextDecoder().decode(r.stderr)}`);
  }
  return new TextDecoder().decode(r.stdout);
}

/** Per 64 MiB: 32 MiB of random data (every 7th 4 KiB cluster zero), 16 MiB zeros, 16 MiB hole. */
async function makeSource(path: string): Promise<void> {
  const data = new Uint8Array(SEGMENT);
  for (let off = 0; off < data.length; off += 65536) {
    crypto.getRandomValues(data.subarray(off, off + 65536));
  }
  for (let off = 0; off < data.length; off += 7 * 4096) data.fill(0, off, off + 4096);
  const zeros = new Uint8Array(SEGMENT);
  using f = await Deno.open(path, { write: true, create: true, truncate: true });
  for (let i = 0; i < size / SEGMENT; i++) {
    const kind = i % 4;
    if (kind === 3) {
      await f.seek(SEGMENT, Deno.SeekMode.Current);
      continue;
    }
    const buf = kind === 2 ? zeros : data;
    for (let done = 0; done < buf.length;) done += await f.write(buf.subarray(done));
  }
  await f.truncate(size);
  await f.syncData();
}

async function ensureSource(): Promise<{ path: string; made: boolean }> {
  if (values.file) return { path: values.file, made: false };
  const path = `/var/tmp/tapd-bench-img2qcow-${values.size}.raw`;
  try {
    if ((await Deno.stat(path)).size === size) return { path, made: false };
  } catch { /* make it */ }
  console.log(`creating ${path} (${values.size}, mixed data, zeros and holes) ...`);
  await makeSource(path);
  return { path, made: true };
}

async function dropPageCache(): Promise<void> {
  if (!dropCaches) return;
  await run("sync", []);
  await Deno.writeTextFile("/proc/sys/vm/drop_caches", "3");
}

async function timed(cmd: string, args: string[]): Promise<number> {
  await dropPageCache();
  const start = performance.now();
  await run(cmd, args);
  return (performance.now() - start) / 1000;
}

const { path, made } = await ensureSource();
const dir = await Deno.makeTempDir({ dir: "/var/tmp", prefix: "tapd-bench-img2qcow-" });
const ours = `${dir}/tapd.qcow`, theirs = `${dir}/qemu.qcow`;
const tapdArgs = ["img2qcow", "--force", "--quiet", ours, path];
const qemuArgs = ["convert", "-f", "raw", "-O", "qcow", path, theirs];
try {
  console.log(
    `source ${path}; ${rounds} interleaved rounds; page cache ${
      dropCaches ? "dropped before every run" : "left alone"
    }\n`,
  );
  const t: number[] = [], q: number[] = [], ratios: number[] = [];
  for (let r = 0; r < rounds; r++) {
    let a: number, b: number;
    if (r % 2 === 0) {
      a = await timed(`${root}tapd`, tapdArgs);
      b = await timed("qemu-img", qemuArgs);
    } else {
      b = await timed("qemu-img", qemuArgs);
      a = await timed(`${root}tapd`, tapdArgs);
    }
    t.push(a);
    q.push(b);
    ratios.push(a / b);
    console.log(`round ${r + 1}: tapd ${a.toFixed(2)} s, qemu-img ${b.toFixed(2)} s`);
    if (r === 0) {
      await run("qemu-img", ["compare", "-q", "-f", "qcow", "-F", "raw", ours, path]);
      await run("qemu-img", ["compare", "-q", "-f", "qcow", "-F", "raw", theirs, path]);
    }
  }
  const [so, sq] = [(await Deno.stat(ours)).size, (await Deno.stat(theirs)).size];
  console.log(
    `\nimg2qcow ${values.size}: tapd ${median(t).toFixed(2)} s, qemu-img convert -O qcow ` +
      `${median(q).toFixed(2)} s; tapd/qemu-img time ratio (median over rounds) ` +
      `${median(ratios).toFixed(2)} (${(1 / median(ratios)).toFixed(1)}× as fast)`,
  );
  console.log(`output sizes: tapd ${so} bytes, qemu-img ${sq} bytes; both compare identical`);
  console.log(`target (tapd not slower than qemu-img): ${median(ratios) <= 1 ? "met" : "NOT met"}`);
} finally {
  await Deno.remove(dir, { recursive: true });
  if (!values.file) console.log(`(${made ? "kept" : "reused"} ${path}; delete it when done)`);
}
