import assert from "node:assert/strict";
import { DRIVERS, parseDiskSpec } from "../../drivers/mod.ts";
import { SpecError } from "../../drivers/spec.ts";

Deno.test("parseDiskSpec: tap:TYPE:PATH", () => {
  assert.deepEqual(parseDiskSpec("tap:aio:/x"), {
    type: "aio",
    path: "/x",
    readOnly: false,
    persist: false,
  });
  assert.deepEqual(parseDiskSpec("tap:ram:/var/lib/img.raw"), {
    type: "ram",
    path: "/var/lib/img.raw",
    readOnly: false,
    persist: false,
  });
});

Deno.test("parseDiskSpec: TYPE:PATH without tap:", () => {
  assert.deepEqual(parseDiskSpec("aio:/x"), {
    type: "aio",
    path: "/x",
    readOnly: false,
    persist: false,
  });
  assert.deepEqual(parseDiskSpec("sync:/dev/loop0"), {
    type: "sync",
    path: "/dev/loop0",
    readOnly: false,
    persist: false,
  });
});

Deno.test("parseDiskSpec: ,ro and ,persist suffixes", () => {
  assert.deepEqual(parseDiskSpec("sync:/x,ro"), {
    type: "sync",
    path: "/x",
    readOnly: true,
    persist: false,
  });
  assert.deepEqual(parseDiskSpec("tap:aio:/x,ro"), {
    type: "aio",
    path: "/x",
    readOnly: true,
    persist: false,
  });
  assert.deepEqual(parseDiskSpec("ram:/x,persist"), {
    type: "ram",
    path: "/x",
    readOnly: false,
    persist: true,
  });
  assert.deepEqual(parseDiskSpec("ram:/x,persist,ro"), {
    type: "ram",
    path: "/x",
    readOnly: true,
    persist: true,
  });
  // ,rw is accepted and means the default.
  assert.deepEqual(parseDiskSpec("aio:/x,rw"), {
    type: "aio",
    path: "/x",
    readOnly: false,
    persist: false,
  });
});

Deno.test("parseDiskSpec: a comma that is not a known suffix stays in the path", () => {
  assert.deepEqual(parseDiskSpec("aio:/a,b"), {
    type: "aio",
    path: "/a,b",
    readOnly: false,
    persist: false,
  });
});

Deno.test("parseDiskSpec: a bare path means aio", () => {
  assert.deepEqual(parseDiskSpec("/x"), {
    type: "aio",
    path: "/x",
    readOnly: false,
    persist: false,
  });
  assert.deepEqual(parseDiskSpec("/x,ro"), {
    type: "aio",
    path: "/x",
    readOnly: true,
    persist: false,
  });
  assert.deepEqual(parseDiskSpec("relative/disk.img"), {
    type: "aio",
    path: "relative/disk.img",
    readOnly: false,
    persist: false,
  });
});

Deno.test("parseDiskSpec: an unknown type names the type and the known types", () => {
  for (const text of ["tap:qcow2:/x", "qcow9:/x"]) {
    const type = text.startsWith("tap:") ? "qcow2" : "qcow9";
    assert.throws(
      () => parseDiskSpec(text),
      (e: unknown) => {
        assert.ok(e instanceof SpecError, `expected SpecError, got ${e}`);
        assert.equal(e.name, "SpecError");
        assert.match(e.message, new RegExp(`"${type}"`));
        for (const known of DRIVERS.keys()) assert.match(e.message, new RegExp(`\\b${known}\\b`));
        return true;
      },
    );
  }
});

Deno.test("parseDiskSpec: the known types are aio, sync, ram, qcow, vmdk and vhd", () => {
  assert.deepEqual([...DRIVERS.keys()].sort(), ["aio", "qcow", "ram", "sync", "vhd", "vmdk"]);
});

Deno.test("parseDiskSpec: a missing path is a SpecError", () => {
  for (const text of ["tap:aio:", "aio:", "aio", "tap:aio", "sync", "ram:,persist", "aio:,ro"]) {
    assert.throws(
      () => parseDiskSpec(text),
      (e: unknown) => {
        assert.ok(e instanceof SpecError, `${JSON.stringify(text)}: expected SpecError, got ${e}`);
        assert.match(e.message, /[Mm]issing path/, text);
        return true;
      },
    );
  }
});

Deno.test("parseDiskSpec: the empty spec is a SpecError", () => {
  for (const text of ["", "tap:", ",ro"]) {
    assert.throws(
      () => parseDiskSpec(text),
      (e: unknown) => {
        assert.ok(e instanceof SpecError, `${JSON.stringify(text)}: expected SpecError, got ${e}`);
        return true;
      },
    );
  }
});
