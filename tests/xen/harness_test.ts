/**
 * Proves the Xen harness (tests/xen/harness.ts): QEMU boots Xen and dom0, dom0 starts a PV guest
 * that reaches READY, `xl list` shows it, `xl destroy` removes it, and the run ends with dom0's
 * status. Along the way dom0 checks what the backend's tests rely on: Deno and ./tapd run from
 * the 9p share, O_DIRECT works on the read-write 9p share, and a virtio-blk disk works (both
 * then verified from the host with xvdtest).
 */
import assert from "node:assert/strict";
import { prepareXen, runXen, xvdtestPath } from "./harness.ts";
import { withTempDir } from "../util.ts";

const prepared = await prepareXen();
const skip = typeof prepared === "string" ? prepared : null;
if (skip) console.log(`xen harness test skipped: ${skip}`);

const DISK_MIB = 32;

const SCRIPT = `
report deno "$($DENO --version 2>&1 | head -n 1)"
if /mnt/repo/tapd --help >/tmp/help 2>&1; then report tapd_help ok
else report tapd_help "fail: $(tail -n 2 /tmp/help | tr '\\n' ' ')"; fi

# O_DIRECT on the read-write 9p share: dd, then xvdtest (O_DIRECT at 512-byte offsets)
if dd if=/dev/zero of=/mnt/work/odirect bs=4096 count=1 oflag=direct 2>/tmp/dd.err
then report odirect_9p_dd ok; else report odirect_9p_dd "fail: $(cat /tmp/dd.err)"; fi
truncate -s 16M /mnt/work/9p.img
if xvdtest write /mnt/work/9p.img >/tmp/x 2>&1 && xvdtest verify /mnt/work/9p.img >>/tmp/x 2>&1
then report odirect_9p_xvdtest ok; else report odirect_9p_xvdtest "fail: $(tail -n 1 /tmp/x)"; fi

# A virtio-blk disk (the run attaches one)
if [ -b /dev/vda ] && xvdtest write /dev/vda >/tmp/x 2>&1 && xvdtest verify /dev/vda >>/tmp/x 2>&1
then report virtio_blk ok; else report virtio_blk "fail: $(tail -n 1 /tmp/x 2>/dev/null)"; fi

# The guest (started by runXen before this script)
wait_guest_ready g1 || exit 1
report domid "$(guest_domid g1)"
xl list
report xl_list "$(xl list | awk '$1 == "g1" { print $2 }')"
destroy_guest g1 || exit 1
if guest_alive g1; then note "g1 still exists after xl destroy"; exit 1; fi
report destroyed yes
guest_log g1
`;

Deno.test({
  name: "xen harness: boot, guest READY, xl list, xl destroy, clean end",
  ignore: skip !== null,
  async fn() {
    if (typeof prepared === "string") return;
    await withTempDir(async (work) => {
      const disk = `${work}/disk.raw`;
      Deno.writeFileSync(disk, new Uint8Array(0));
      Deno.truncateSync(disk, DISK_MIB << 20);
      const run = await runXen(prepared, {
        dom0Script: SCRIPT,
        work,
        timeoutMs: 180_000,
        guests: [{ name: "g1", mode: "idle" }],
        disks: [disk],
      });
      const tail = run.console.split("\n").slice(-60).join("\n");
      assert.ok(
        run.ok,
        `run failed (status ${run.status}, timed out ${run.timedOut}):\n${tail}\n${run.qemuStderr}`,
      );
      const r = run.reports;
      console.log(
        `xen harness: boot ${run.bootMs} ms, script ${run.scriptMs} ms, total ${run.durationMs} ms; ` +
          `O_DIRECT on 9p: dd ${r.odirect_9p_dd}, xvdtest ${r.odirect_9p_xvdtest}; ` +
          `virtio-blk: ${r.virtio_blk}; ${r.deno}`,
      );
      assert.match(r.domid ?? "", /^[1-9][0-9]*$/, "guest_domid g1");
      assert.equal(r.xl_list, r.domid, "xl list shows g1 with its domid");
      assert.equal(r.destroyed, "yes");
      assert.match(run.console, /^\[guest g1\] TAPD-GUEST READY mode=idle/m);
      assert.match(r.deno ?? "", /^deno \d/, "Deno runs in dom0");
      assert.equal(r.tapd_help, "ok", "./tapd --help runs in dom0");
      assert.equal(r.virtio_blk, "ok", "a virtio-blk disk works in dom0");
      const xvdtest = await xvdtestPath();
      const verify = async (file: string) => {
        const out = await new Deno.Command(xvdtest, { args: ["verify", file] }).output();
        assert.equal(out.code, 0, new TextDecoder().decode(out.stdout));
      };
      await verify(disk); // what dom0 wrote through virtio-blk reached the host file
      if (r.odirect_9p_xvdtest === "ok") await verify(`${work}/9p.img`);
    });
  },
});
