/**
 * `deno task bench:xen`: tapd's Xen backend with grant copy, with grant mapping, and the dom0
 * kernel's own xen-blkback, side by side in one boot of the Xen harness (tests/xen/harness.ts:
 * Xen 4.17 under QEMU TCG). Each backend serves a fresh PV guest a virtio-blk disk of dom0; the
 * guest times O_DIRECT dd runs (1 MiB and 4 KiB blocks, write then read). Absolute figures mean
 * little under TCG; the ratios between backends in the same run are the result.
 *
 *   deno run -A bench/xen_backends.ts [--rounds N] [--mib N]
 */
import { parseArgs } from "node:util";
import { median } from "./common.ts";
import { prepareXen, runXen } from "../tests/xen/harness.ts";

const { values } = parseArgs({
  options: {
    rounds: { type: "string", default: "2" },
    mib: { type: "string", default: "16" },
  },
});
const rounds = Number(values.rounds), mib = Number(values.mib);
const BACKENDS = ["copy", "map", "blkback"] as const;
type Backend = typeof BACKENDS[number];
const TESTS = ["write_1m", "read_1m", "write_4k", "read_4k"] as const;

const script = String.raw`
W=/mnt/work
TAPD="$DENO run --no-prompt --allow-all --quiet /mnt/repo/main.ts"
for round in $(seq 1 ${rounds}); do
  for b in ${BACKENDS.join(" ")}; do
    g=b$round$b
    start_guest "$g" bench tapd.mib=${mib} || exit 1
    wait_guest_ready "$g" || exit 1
    D=$(guest_domid "$g")
    if [ "$b" = blkback ]; then
      blkback_add "$D" xvda /dev/vdb || exit 1
    else
      $TAPD xen-backend aio:/dev/vda --domid "$D" --vdev xvda --data "$b" >"$W/$g.log" 2>&1 &
      P=$!
    fi
    wait_guest_done "$g" 900 || note "guest $g failed"
    if [ "$b" = blkback ]; then
      xenstore-rm "/local/domain/0/backend/vbd/$D" 2>/dev/null
    else
      wait "$P"
    fi
  done
done
`;

const prepared = await prepareXen();
if (typeof prepared === "string") {
  console.error(`bench:xen: cannot run the Xen harness: ${prepared}`);
  Deno.exit(1);
}
const work = await Deno.makeTempDir({ dir: "/var/tmp", prefix: "tapd-xenbench-" });
try {
  const disks = [`${work}/tapd.raw`, `${work}/blkback.raw`];
  for (const d of disks) {
    await Deno.writeFile(d, new Uint8Array(0));
    await Deno.truncate(d, (mib + 16) << 20);
  }
  const run = await runXen(prepared, {
    dom0Script: script,
    work,
    timeoutMs: 60 * 60_000,
    disks,
  });
  if (!run.ok) {
    console.error(run.console.split("\n").slice(-60).join("\n"));
    throw new Error("the Xen run failed");
  }
  // "[guest b1copy] TAPD-GUEST BENCH write_1m=1.23 read_1m=..." (seconds)
  const seconds = new Map<Backend, Map<string, number[]>>();
  for (const m of run.console.matchAll(/^\[guest b\d+(\w+)\] TAPD-GUEST BENCH (.*)$/gm)) {
    const backend = m[1] as Backend;
    const per = seconds.get(backend) ?? new Map<string, number[]>();
    seconds.set(backend, per);
    for (const [k, v] of m[2].split(" ").map((kv) => kv.split("="))) {
      per.set(k, [...(per.get(k) ?? []), Number(v)]);
    }
  }
  const mbps = (b: Backend, t: string) => {
    const s = seconds.get(b)?.get(t);
    // the 4 KiB tests move a quarter as much (domu_init.sh mode_bench)
    const moved = t.endsWith("_4k") ? mib / 4 : mib;
    return s === undefined || s.length === 0 ? NaN : (moved * 1.048576) / median(s);
  };
  console.log(
    `Xen PV guest, O_DIRECT dd of ${mib} MiB (1 MiB blocks) and ${mib / 4} MiB (4 KiB blocks), ` +
      `median of ${rounds} round(s); MB/s ` +
      `(ratio to the kernel's xen-blkback). QEMU TCG: compare ratios, not absolute figures.`,
  );
  console.log(`| test | tapd copy | tapd map | xen-blkback | copy ÷ blkback | map ÷ blkback |`);
  console.log(`|---|---|---|---|---|---|`);
  for (const t of TESTS) {
    const c = mbps("copy", t), m = mbps("map", t), k = mbps("blkback", t);
    console.log(
      `| ${t} | ${c.toFixed(2)} | ${m.toFixed(2)} | ${k.toFixed(2)} | ${(c / k).toFixed(2)}× | ${
        (m / k).toFixed(2)
      }× |`,
    );
  }
} finally {
  await Deno.remove(work, { recursive: true });
}
