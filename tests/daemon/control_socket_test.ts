/**
 * The control socket is created mode 0600, owned by the daemon's user; another user can neither
 * connect through the file mode nor, with the mode opened up, get a request served (the daemon
 * checks the peer's uid with SO_PEERCRED).
 */
import assert from "node:assert/strict";
import { tapd, TestDaemon } from "./helpers.ts";
import { tempDir } from "../util.ts";

const root = new URL("../../", import.meta.url).pathname;
const NOBODY = "65534";

function setprivMissing(): string | null {
  if (Deno.uid() !== 0) return "needs root (to run a peer as another user)";
  try {
    new Deno.Command("setpriv", { args: ["--version"], stdout: "null", stderr: "null" })
      .outputSync();
    return null;
  } catch {
    return "setpriv is not installed";
  }
}

/** `tapd ctl … list` run as the user nobody. */
async function ctlAsNobody(control: string, denoDir: string) {
  const { code, stderr } = await new Deno.Command("setpriv", {
    args: [
      `--reuid=${NOBODY}`,
      `--regid=${NOBODY}`,
      "--clear-groups",
      "env",
      `DENO_DIR=${denoDir}`,
      `HOME=${denoDir}`,
      `${root}tapd`,
      "ctl",
      "--control",
      control,
      "list",
    ],
    stdout: "piped",
    stderr: "piped",
  }).output();
  return { code, stderr: new TextDecoder().decode(stderr) };
}

const why = setprivMissing();

Deno.test({
  name: `daemon: the control socket is 0600 and refuses another user${
    why ? ` (skipped: ${why})` : ""
  }`,
  ignore: why !== null,
  fn: async () => {
    const dir = tempDir("tapd-daemon-");
    Deno.chmodSync(dir, 0o755); // let nobody reach the socket file itself
    const denoDir = tempDir("tapd-deno-dir-");
    Deno.chmodSync(denoDir, 0o777);
    const d = await TestDaemon.start(dir);
    try {
      const st = Deno.lstatSync(d.control);
      assert.ok(st.isSocket);
      assert.equal(st.mode! & 0o777, 0o600);
      assert.equal(st.uid, Deno.uid());

      // The file mode stops another user at connect().
      const refused = await ctlAsNobody(d.control, denoDir);
      assert.equal(refused.code, 1, refused.stderr);
      assert.match(
        refused.stderr,
        /^tapd: ctl: cannot reach the daemon at .*control\.sock: Permission denied\n$/,
      );

      // With the mode opened up, the daemon itself refuses the peer (SO_PEERCRED).
      Deno.chmodSync(d.control, 0o666);
      const checked = await ctlAsNobody(d.control, denoDir);
      assert.equal(checked.code, 1, checked.stderr);
      assert.equal(
        checked.stderr,
        `tapd: ctl: permission denied: uid ${NOBODY} may not control a daemon running as uid 0\n`,
      );
      assert.match(
        d.stderr,
        /level=warn component=daemon .*peerUid=65534 .*msg="refused a control connection"/,
      );
      // The daemon's own user still gets served.
      assert.equal((await tapd("ctl", "--control", d.control, "list")).code, 0);
    } finally {
      await d.dispose();
      Deno.removeSync(denoDir, { recursive: true });
    }
  },
});

Deno.test("daemon: a second daemon on the same control socket is refused", async () => {
  const d = await TestDaemon.start();
  try {
    const r = await tapd(
      "daemon",
      "--no-default",
      "--control",
      d.control,
      "--state-dir",
      d.stateDir,
    );
    assert.equal(r.code, 1);
    assert.equal(r.stderr, `tapd: daemon: another daemon is already running on ${d.control}\n`);
    assert.equal((await d.ctl("list")).code, 0);
  } finally {
    await d.dispose();
  }
});
