/**
 * tapd as a real Xen block backend: Xen 4.17 under QEMU TCG, a Linux 6.1 PV dom0 running tapd
 * from the 9p share, and PV guests whose own xen-blkfront gets /dev/xvda from tapd (the harness:
 * tests/xen/harness.ts, docs/xen-harness.md). One boot runs every scenario; each test below
 * checks one of them, from the guests' results and from the images on the host afterwards.
 */
import assert from "node:assert/strict";
import { prepareXen, runXen, type XenRun, xvdtestPath } from "./harness.ts";

const prepared = await prepareXen();
const skip = typeof prepared === "string" ? prepared : null;
if (skip) console.log(`xen guest tests skipped: ${skip}`);

const MIB = 1 << 20;
const SIZE = 32 * MIB;
const REPO = new URL("../../", import.meta.url).pathname;

/**
 * dom0's script. Scenarios:
 *  raw     — guest g1 writes xvdtest's pattern over tapd xen-backend on raw.img, verifies, powers
 *            off; tapd ends on its own when the domain goes.
 *  qcow    — g2 the same over a qcow overlay on a raw parent; g3 makes ext4 on another overlay
 *            (both guests at once).
 *  reattach — g4 verifies a pre-written disk; tapd is stopped (SIGTERM: unplug), the disk leaves
 *            the guest, a new tapd plugs it again, the guest verifies again.
 *  daemon  — `tapd daemon` + `ctl attach --xen`: g5 writes non-stop and is destroyed mid-I/O;
 *            the daemon survives with nothing mapped or bound; g6 is then served by it.
 */
const SCRIPT = String.raw`
W=/mnt/work
TAPD="$DENO run --no-prompt --allow-all --quiet /mnt/repo/main.ts"
export TAPD_LOG_LEVEL=info
backend() { # backend NAME SPEC: tapd xen-backend for guest NAME in the background; pid in $BPID
  $TAPD xen-backend "$2" --domid "$(guest_domid "$1")" --vdev xvda >"$W/$1.out" 2>"$W/$1.log" &
  BPID=$!
}
ended() { # ended PID NAME: waits for a backend, reports its exit status and last log line
  wait "$1"
  report "$2_tapd_exit" "$?"
  report "$2_tapd_last" "$(tail -n 1 "$W/$2.log")"
}
# what tapd's processes (all Deno) hold: gntdev mappings, evtchn descriptors
gntdev_maps() { n=0; for p in $(pidof deno); do n=$((n + $(grep -c gntdev /proc/$p/maps))); done; echo $n; }
evtchn_fds() { n=0; for p in $(pidof deno); do n=$((n + $(ls -l /proc/$p/fd | grep -c evtchn))); done; echo $n; }
vbd_nodes() { xenstore-ls /local/domain/0/backend/vbd3 2>/dev/null | wc -l; }

note "scenario raw"
GUEST_VCPUS=2 start_guest g1 pattern tapd.seed=11 || exit 1 # 2 vCPUs: blkfront uses 2 queues
wait_guest_ready g1 || exit 1
backend g1 "aio:$W/raw.img"
P1=$BPID
wait_guest_done g1 600
report raw_guest "$?"
ended "$P1" g1
report raw_connect "$(grep -o 'connected to domain.*' "$W/g1.log" | head -n 1)"

note "scenario qcow"
start_guest g2 pattern tapd.seed=12 tapd.zero=0 || exit 1
start_guest g3 mkfs tapd.seed=13 || exit 1
wait_guest_ready g2 || exit 1
wait_guest_ready g3 || exit 1
backend g2 "qcow:$W/overlay.qcow"
P2=$BPID
backend g3 "qcow:$W/fs.qcow"
P3=$BPID
wait_guest_done g2 600
report qcow_guest "$?"
wait_guest_done g3 600
report mkfs_guest "$?"
ended "$P2" g2
ended "$P3" g3

note "scenario reattach"
start_guest g4 reattach tapd.seed=14 || exit 1
wait_guest_ready g4 || exit 1
backend g4 "aio:$W/reattach.img"
P4=$BPID
wait_guest_line g4 'STEP reattach: first attach verified' 300
report reattach_first "$?"
kill -TERM "$P4"
ended "$P4" g4
report reattach_nodes "$(vbd_nodes)"
wait_guest_line g4 'STEP /dev/xvda disappeared' 120
report reattach_gone "$?"
$TAPD xen-backend "aio:$W/reattach.img" --domid "$(guest_domid g4)" --vdev xvda >"$W/g4b.out" 2>"$W/g4b.log" &
P4B=$!
wait_guest_done g4 600
report reattach_guest "$?"
ended "$P4B" g4b

note "scenario daemon"
mkdir -p /run/tapd
$TAPD daemon --no-default --state-dir /run/tapd >"$W/daemon.out" 2>"$W/daemon.log" &
PD=$!
CTL="$TAPD ctl --control /run/tapd/control.sock"
start_guest g5 busy tapd.seed=15 || exit 1
wait_guest_ready g5 || exit 1
$CTL attach "aio:$W/busy.img" --xen "$(guest_domid g5):xvda" >"$W/attach5.out" 2>&1
report daemon_attach5 "$?"
wait_guest_line g5 'STEP busy' 300
report daemon_busy "$?"
sleep 5
destroy_guest g5 60
report daemon_destroyed "$?"
sleep 3
report daemon_alive "$(kill -0 "$PD" && echo yes || echo no)"
report daemon_list5 "$($CTL list 2>&1 | tr '\n' ' ')"
report leaks_gntdev "$(gntdev_maps)"
report leaks_evtchn "$(evtchn_fds)"
report zombies "$(xl list | tail -n +3 | wc -l)"
start_guest g6 pattern tapd.seed=16 || exit 1
wait_guest_ready g6 || exit 1
$CTL attach "aio:$W/second.img" --xen "$(guest_domid g6):xvda" >"$W/attach6.out" 2>&1
report daemon_attach6 "$?"
wait_guest_done g6 600
report daemon_guest6 "$?"
sleep 2
report daemon_list6 "$($CTL list 2>&1 | tr '\n' ' ')"
kill -TERM "$PD"
wait "$PD"
report daemon_exit "$?"
report final_gntdev "$(gntdev_maps)"
report final_nodes "$(vbd_nodes)"
xl list
`;

async function run(cmd: string, args: string[], cwd?: string): Promise<string> {
  const out = await new Deno.Command(cmd, { args, cwd, stderr: "piped", stdout: "piped" }).output();
  const text = new TextDecoder().decode(out.stdout) + new TextDecoder().decode(out.stderr);
  if (!out.success) throw new Error(`${cmd} ${args.join(" ")} failed: ${text}`);
  return text;
}

async function zeros(path: string, size = SIZE): Promise<void> {
  await Deno.writeFile(path, new Uint8Array(0));
  await Deno.truncate(path, size);
}

async function sha(path: string): Promise<string> {
  return (await run("sha256sum", [path])).split(" ")[0];
}

interface Outcome {
  run: XenRun;
  work: string;
  parentHash: string;
}

let outcome: Promise<Outcome> | null = null;
const dirs: string[] = [];

/** Prepares the images, boots once, and keeps the run for every test. */
function boot(): Promise<Outcome> {
  if (outcome !== null) return outcome;
  return outcome = (async () => {
    if (typeof prepared === "string") throw new Error(prepared);
    const work = await Deno.makeTempDir({ dir: "/var/tmp", prefix: "tapd-xenguest-" });
    dirs.push(work);
    const xvdtest = await xvdtestPath();
    await zeros(`${work}/raw.img`);
    // A parent full of its own data, and an overlay over it
    const parent = `${work}/parent.raw`;
    await zeros(parent);
    await run(xvdtest, ["write", parent, "--seed", "99"]);
    // relative backing names: dom0 sees the directory under another path
    await run(`${REPO}/tapd`, ["qcow-create", "32M", "overlay.qcow", "parent.raw"], work);
    await zeros(`${work}/fsparent.raw`);
    await run(`${REPO}/tapd`, ["qcow-create", "32M", "fs.qcow", "fsparent.raw"], work);
    await zeros(`${work}/reattach.img`);
    await run(xvdtest, ["write", `${work}/reattach.img`, "--seed", "14"]);
    await zeros(`${work}/busy.img`);
    await zeros(`${work}/second.img`);
    const parentHash = await sha(parent);
    const result = await runXen(prepared, {
      dom0Script: SCRIPT,
      work,
      timeoutMs: 20 * 60_000,
      env: { TAPD_HOST_REPO: REPO },
    });
    return { run: result, work, parentHash };
  })();
}

function explain(o: Outcome): string {
  const tail = o.run.console.split("\n").slice(-80).join("\n");
  return `status ${o.run.status}, timed out ${o.run.timedOut}, reports ${
    JSON.stringify(o.run.reports)
  }\n${tail}`;
}

/** The image a guest's `xvdtest write --seed` leaves on `base` (a copy of it, written on the host). */
async function expected(base: string | null, seed: number, dir: string): Promise<string> {
  const out = `${dir}/expected-${seed}.raw`;
  if (base === null) await zeros(out);
  else await Deno.copyFile(base, out);
  await run(await xvdtestPath(), ["write", out, "--seed", String(seed)]);
  return out;
}

async function qcowToRaw(qcow: string, out: string): Promise<void> {
  await run(`${REPO}/tapd`, ["qcow2raw", out, qcow]);
}

/** One test over the shared boot: `check` reads its reports and the images it left. */
function scenario(
  name: string,
  check: (o: Outcome, r: Record<string, string>) => void | Promise<void>,
) {
  Deno.test({
    name: `xen guest: ${name}`,
    ignore: skip !== null,
    sanitizeResources: false,
    sanitizeOps: false,
    async fn() {
      const o = await boot();
      await check(o, o.run.reports);
    },
  });
}

scenario(
  "a PV guest writes and reads back its pattern on a raw image served by tapd",
  async (o, r) => {
    console.log(
      `xen: boot ${o.run.bootMs} ms, script ${o.run.scriptMs} ms, total ${o.run.durationMs} ms`,
    );
    assert.equal(r.raw_guest, "0", `guest g1 failed: ${explain(o)}`);
    assert.equal(r.g1_tapd_exit, "0", explain(o));
    assert.match(r.g1_tapd_last ?? "", /frontend vanished/, explain(o));
    // blkfront with 2 vCPUs and a multi-page ring option: 2 queues of 4-page rings
    assert.match(r.raw_connect ?? "", /2 queue\(s\), 4-page ring\(s\) of 128 requests/, explain(o));
    const want = await expected(null, 11, o.work);
    assert.equal(await sha(`${o.work}/raw.img`), await sha(want), "raw.img = zeros + the pattern");
  },
);

scenario(
  "qcow overlay on a raw parent (parent unchanged), and ext4 made by the guest",
  async (o, r) => {
    assert.equal(r.qcow_guest, "0", `guest g2 failed: ${explain(o)}`);
    assert.equal(r.mkfs_guest, "0", `guest g3 failed: ${explain(o)}`);
    assert.equal(r.g2_tapd_exit, "0", explain(o));
    assert.equal(r.g3_tapd_exit, "0", explain(o));
    assert.equal(await sha(`${o.work}/parent.raw`), o.parentHash, "the parent is unchanged");
    await run(`${REPO}/tapd`, ["check", `${o.work}/overlay.qcow`]);
    const flat = `${o.work}/overlay-flat.raw`;
    await qcowToRaw(`${o.work}/overlay.qcow`, flat);
    const want = await expected(`${o.work}/parent.raw`, 12, o.work);
    assert.equal(await sha(flat), await sha(want), "overlay = parent + the guest's pattern");
    await run("qemu-img", ["compare", "-f", "qcow", "-F", "raw", `${o.work}/overlay.qcow`, want]);
    const fs = `${o.work}/fs-flat.raw`;
    await qcowToRaw(`${o.work}/fs.qcow`, fs);
    const fsck = await new Deno.Command("e2fsck", {
      args: ["-fn", fs],
      stdout: "piped",
      stderr: "piped",
    })
      .output();
    assert.equal(fsck.code, 0, `e2fsck -fn: ${new TextDecoder().decode(fsck.stdout)}`);
    const listing = await run("debugfs", ["-R", "ls -l /dir", fs]);
    assert.match(listing, /big\.bin/);
    assert.match(listing, /6291456/);
  },
);

scenario(
  "stop tapd (the guest lets go of the idle disk), start it again, the guest sees it again",
  (o, r) => {
    assert.equal(r.reattach_first, "0", explain(o));
    assert.equal(r.g4_tapd_exit, "0", explain(o));
    assert.match(r.g4_tapd_last ?? "", /reason=unplugged|unplugged/, explain(o));
    assert.equal(r.reattach_nodes, "0", "no backend nodes left after the unplug");
    assert.equal(r.reattach_gone, "0", explain(o));
    assert.equal(r.reattach_guest, "0", `guest g4 failed: ${explain(o)}`);
    assert.equal(r.g4b_tapd_exit, "0", explain(o));
  },
);

scenario(
  "the daemon survives a guest destroyed mid-I/O, leaks nothing, and serves a second guest",
  async (o, r) => {
    try {
      assert.equal(r.daemon_attach5, "0", explain(o));
      assert.equal(r.daemon_busy, "0", explain(o));
      assert.equal(r.daemon_destroyed, "0", "g5 left xl list (no zombie held by our mappings)");
      assert.equal(r.daemon_alive, "yes", explain(o));
      assert.equal(r.leaks_gntdev, "0", "no gntdev mapping left");
      assert.equal(r.leaks_evtchn, "0", "no evtchn descriptor left");
      assert.equal(r.zombies, "0", "only Domain-0 left");
      assert.equal(r.daemon_attach6, "0", explain(o));
      assert.equal(r.daemon_guest6, "0", `guest g6 failed: ${explain(o)}`);
      assert.equal(r.daemon_exit, "0", explain(o));
      assert.equal(r.final_gntdev, "0");
      assert.equal(r.final_nodes, "0");
      const want = await expected(null, 16, o.work);
      assert.equal(await sha(`${o.work}/second.img`), await sha(want));
      assert.ok(o.run.ok, explain(o));
    } finally {
      for (const d of dirs) await Deno.remove(d, { recursive: true }).catch(() => {});
    }
  },
);
