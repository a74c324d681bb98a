/**
 * The group commit of table entries: entries set together go out in one write, entries set while
 * a write is in flight go out in the next (never two writes in flight), an entry is visible in
 * memory only once a write carrying it is issued, and a failed write puts the old entries back.
 */
import assert from "node:assert/strict";
import { TableCommits } from "../../../drivers/qcow/table_commits.ts";
import { getEntry, L2Table } from "../../../drivers/qcow/tables.ts";

interface Issued {
  lo: number;
  hi: number;
  entries: number[]; // the whole table as it was when the write was issued
  finish: (error?: Error) => void;
}

function harness(entries = 64) {
  const table = new L2Table(4096, new Uint8Array(entries * 8));
  const issued: Issued[] = [];
  let inFlight = 0, maxInFlight = 0, idle = 0;
  const commits = new TableCommits(
    table,
    (t, lo, hi) => {
      inFlight++;
      maxInFlight = Math.max(maxInFlight, inFlight);
      return new Promise<void>((resolve, reject) => {
        const snapshot = Array.from({ length: entries }, (_, i) => t.entry(i));
        issued.push({
          lo,
          hi,
          entries: snapshot,
          finish: (error) => {
            inFlight--;
            if (error === undefined) resolve();
            else reject(error);
          },
        });
      });
    },
    () => idle++,
  );
  return {
    table,
    commits,
    issued,
    maxInFlight: () => maxInFlight,
    idle: () => idle,
  };
}

const turn = () => new Promise<void>((resolve) => setTimeout(resolve, 0));

Deno.test("table commits: entries set in one turn go out in one write covering them", async () => {
  const h = harness();
  const a = h.commits.set([3 * 8, 0x10000]);
  const b = h.commits.set([9 * 8, 0x20000, 4 * 8, 0x30000]);
  assert.equal(h.table.entry(3), 0, "not visible before the write is issued");
  await turn();
  assert.equal(h.issued.length, 1);
  assert.deepEqual([h.issued[0].lo, h.issued[0].hi], [3 * 8, 10 * 8]);
  assert.equal(h.issued[0].entries[3], 0x10000);
  assert.equal(h.issued[0].entries[9], 0x20000);
  assert.equal(h.table.entry(4), 0x30000, "visible once issued");
  h.issued[0].finish();
  await Promise.all([a, b]);
  await h.commits.settled();
  assert.equal(h.idle(), 1);
});

Deno.test("table commits: one write in flight; what comes meanwhile goes out next, together", async () => {
  const h = harness();
  const first = h.commits.set([0, 0x1000]);
  await turn();
  let laterDone = 0;
  const later = [1, 2, 3].map((i) => h.commits.set([i * 8, i * 0x1000]).then(() => laterDone++));
  await turn();
  assert.equal(h.issued.length, 1, "no second write while the first is in flight");
  assert.equal(h.table.entry(2), 0);
  h.issued[0].finish();
  await first;
  await turn();
  assert.equal(laterDone, 0);
  assert.equal(h.issued.length, 2);
  assert.deepEqual([h.issued[1].lo, h.issued[1].hi], [8, 32]);
  assert.deepEqual(h.issued[1].entries.slice(0, 4), [0x1000, 0x1000, 0x2000, 0x3000]);
  h.issued[1].finish();
  await Promise.all(later);
  assert.equal(laterDone, 3);
  assert.equal(h.maxInFlight(), 1);
  await h.commits.settled();
  assert.equal(h.idle(), 1);
});

Deno.test("table commits: a failed write rejects its waiters and restores the old entries", async () => {
  const h = harness();
  const ok = h.commits.set([5 * 8, 0x5000]);
  await turn();
  h.issued[0].finish();
  await ok;
  const failing = h.commits.set([5 * 8, 0x9000, 6 * 8, 0x6000]);
  await turn();
  assert.equal(h.table.entry(5), 0x9000);
  h.issued[1].finish(new Error("EIO pwrite"));
  await assert.rejects(failing, /EIO pwrite/);
  assert.equal(h.table.entry(5), 0x5000);
  assert.equal(h.table.entry(6), 0);
  // The table keeps working after a failure.
  const again = h.commits.set([6 * 8, 0x7000]);
  await turn();
  h.issued[2].finish();
  await again;
  assert.equal(getEntry(h.table.view, 6 * 8), 0x7000);
  await h.commits.settled();
});

Deno.test("table commits: settled() waits for the writes queued before it", async () => {
  const h = harness();
  h.commits.set([0, 0x1000]);
  await turn();
  h.commits.set([8, 0x2000]);
  let settled = false;
  const s = h.commits.settled().then(() => settled = true);
  h.issued[0].finish();
  await turn();
  assert.equal(settled, false, "the second write is still to come");
  h.issued[1].finish();
  await s;
  assert.equal(settled, true);
  assert.equal(await Promise.resolve(h.commits.settled()), undefined);
});
