/** Picks and creates an I/O engine by name. */
import { AioEngine } from "./aio_engine.ts";
import type { EngineKind, EngineOptions, IoEngine } from "./engine.ts";
import { SyncEngine } from "./sync_engine.ts";
import { UringEngine } from "./uring_engine.ts";

export function createEngine(kind: EngineKind, options: EngineOptions = {}): IoEngine {
  switch (kind) {
    case "aio":
      return new AioEngine(options);
    case "uring":
      return new UringEngine(options);
    case "sync":
      return new SyncEngine(options);
  }
}
