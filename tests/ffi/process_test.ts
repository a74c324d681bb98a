import assert from "node:assert/strict";

const root = new URL("../../", import.meta.url).pathname;

Deno.test("pinProcess restricts every thread of the process, helper threads included", async () => {
  const code = `
    import { pinProcess } from "${root}ffi/process.ts";
    pinProcess([0]);
    const tasks = [...Deno.readDirSync("/proc/self/task")].map((t) => t.name);
    const lists = tasks.map((t) =>
      /Cpus_allowed_list:\\s*(\\S+)/.exec(Deno.readTextFileSync("/proc/self/task/" + t + "/status"))![1]
    );
    console.log(JSON.stringify({ tasks: tasks.length, lists: [...new Set(lists)] }));
  `;
  const r = await new Deno.Command(Deno.execPath(), {
    args: ["eval", "--quiet", code],
    stdout: "piped",
    stderr: "piped",
  }).output();
  assert.equal(r.code, 0, new TextDecoder().decode(r.stderr));
  const out = JSON.parse(new TextDecoder().decode(r.stdout));
  assert.ok(out.tasks > 1, "Deno runs helper threads");
  assert.deepEqual(out.lists, ["0"]);
});

Deno.test("pinProcess refuses CPU numbers out of range", async () => {
  const { pinProcess } = await import("../../ffi/process.ts");
  assert.throws(() => pinProcess([4096]), /No CPU 4096/);
});
