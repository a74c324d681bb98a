import assert from "node:assert/strict";
import {
  BackRing,
  BLKIF_LAYOUT as L,
  BLKIF_OP_INDIRECT,
  BLKIF_OP_READ,
  BLKIF_OP_WRITE,
  BLKIF_RSP_OKAY,
} from "../../ring/blkif.ts";

/** Writes a direct request with `segs` ([gref, first, last]) into entry `i` of the ring. */
function putDirect(v: DataView, i: number, op: number, id: number, segs: number[][]): void {
  const base = L.RING_OFFSET + i * L.ENTRY_SIZE;
  v.setUint8(base + L.OFF_OPERATION, op);
  v.setUint8(base + L.OFF_NR_SEGMENTS, segs.length);
  v.setUint32(base + L.OFF_ID, id, true);
  v.setUint32(base + L.OFF_SECTOR_NUMBER, 8 * id, true);
  segs.forEach(([gref, first, last], k) => {
    const s = base + L.OFF_SEG + k * L.SEGMENT_SIZE;
    v.setUint32(s + L.OFF_SEG_GREF, gref, true);
    v.setUint8(s + L.OFF_SEG_FIRST_SECT, first);
    v.setUint8(s + L.OFF_SEG_LAST_SECT, last);
  });
}

Deno.test("blkif: an answered request's object is reused, and each take reads only its own entry", () => {
  const page = new Uint8Array(L.PAGE_SIZE);
  const v = new DataView(page.buffer);
  const words = new Uint32Array(page.buffer, 0, 4);
  const ring = new BackRing(page);
  ring.initShared();

  const eleven = Array.from({ length: 11 }, (_, k) => [100 + k, 0, 7]);
  putDirect(v, 0, BLKIF_OP_WRITE, 1, eleven);
  words[0] = 1; // req_prod
  const first = ring.take();
  assert.equal(first.nrSegments, 11);
  assert.deepEqual(Array.from(first.segments.subarray(0, 33)), eleven.flat());
  ring.respond(first, BLKIF_RSP_OKAY);

  // The next request comes in the same object, with its own fields throughout.
  putDirect(v, 1, BLKIF_OP_READ, 2, [[7, 2, 5]]);
  const base = L.RING_OFFSET + 2 * L.ENTRY_SIZE;
  v.setUint8(base + L.OFF_OPERATION, BLKIF_OP_INDIRECT);
  v.setUint8(base + L.OFF_INDIRECT_OP, BLKIF_OP_READ);
  v.setUint16(base + L.OFF_INDIRECT_NR_SEGMENTS, 40, true);
  v.setUint32(base + L.OFF_ID, 3, true);
  for (let k = 0; k < L.MAX_INDIRECT_PAGES; k++) {
    v.setUint32(base + L.OFF_INDIRECT_GREFS + 4 * k, 50 + k, true);
  }
  words[0] = 3;
  const second = ring.take();
  assert.equal(second, first);
  assert.equal(second.operation, BLKIF_OP_READ);
  assert.equal(second.responseOp, BLKIF_OP_READ);
  assert.equal(second.idLo, 2);
  assert.equal(second.sector, 16);
  assert.equal(second.nrSegments, 1);
  assert.deepEqual(Array.from(second.segments.subarray(0, 3)), [7, 2, 5]);

  // Two unanswered requests are two objects.
  const third = ring.take();
  assert.notEqual(third, second);
  assert.equal(third.operation, BLKIF_OP_INDIRECT);
  assert.equal(third.responseOp, BLKIF_OP_READ);
  assert.equal(third.nrSegments, 40);
  assert.equal(third.idLo, 3);
  assert.equal(third.indirectGrefs[0], 50);

  // Responses carry each request's own id and operation, whichever object it came in.
  ring.respond(third, BLKIF_RSP_OKAY);
  ring.respond(second, BLKIF_RSP_OKAY);
  ring.pushResponses();
  assert.equal(words[2], 3); // rsp_prod
  const rsp = (i: number) => L.RING_OFFSET + i * L.ENTRY_SIZE;
  assert.equal(v.getUint32(rsp(1) + L.OFF_RSP_ID, true), 3);
  assert.equal(v.getUint8(rsp(1) + L.OFF_RSP_OPERATION), BLKIF_OP_READ);
  assert.equal(v.getUint32(rsp(2) + L.OFF_RSP_ID, true), 2);
});
