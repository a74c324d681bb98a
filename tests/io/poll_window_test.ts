import assert from "node:assert/strict";
import { PollWindow } from "../../io/poll_window.ts";

Deno.test("PollWindow: keeps looking within the window, stops after it, touch restarts it", async () => {
  const w = new PollWindow(20_000); // 20 ms
  w.touch();
  for (let i = 0; i < 100; i++) assert.ok(w.keepLooking(), `look ${i} inside the window`);
  await new Promise((r) => setTimeout(r, 40));
  let stopped = false;
  for (let i = 0; i < 32 && !stopped; i++) stopped = !w.keepLooking();
  assert.ok(stopped, "still looking 40 ms after the last activity");
  w.touch();
  for (let i = 0; i < 32; i++) assert.ok(w.keepLooking(), `look ${i} after touch()`);
});

Deno.test("PollWindow: a spinning poller still lets timers and I/O run", async () => {
  const w = new PollWindow(1_000_000);
  let timerRan = false, looks = 0;
  setTimeout(() => timerRan = true, 0);
  await new Promise<void>((resolve) => {
    const look = () => {
      looks++;
      if (timerRan) return resolve();
      if (looks > 100_000) return resolve();
      w.schedule(look);
    };
    w.schedule(look);
  });
  assert.ok(timerRan, `a timer never ran during ${looks} looks`);
  assert.ok(looks > 1, "the poller looked only once");
});
