/** FLAT and VMFS extents (raw data at a sector offset of a file) and ZERO extents. */
import type { FileHandle } from "../../ffi/file.ts";
import type { IoEngine } from "../../io/engine.ts";
import { DiskError } from "../errors.ts";
import {
  Alloc,
  type ExtentRun,
  readData,
  SECTOR,
  type VmdkExtent,
  writeExactly,
} from "./extent.ts";

export class FlatExtent implements VmdkExtent {
  readonly size: number;
  readonly writable: boolean;
  readonly #path: string;
  readonly #file: FileHandle;
  readonly #engine: IoEngine;
  readonly #start: number;

  constructor(
    path: string,
    file: FileHandle,
    engine: IoEngine,
    sectors: number,
    offsetSectors: number,
    writable: boolean,
  ) {
    this.#path = path;
    this.#file = file;
    this.#engine = engine;
    this.size = sectors * SECTOR;
    this.#start = offsetSectors * SECTOR;
    this.writable = writable;
  }

  read(offset: number, target: Uint8Array): Promise<void> {
    return readData(this.#engine, this.#file, this.#start + offset, target);
  }

  write(offset: number, src: Uint8Array): Promise<void> {
    return writeExactly(this.#engine, this.#file, this.#path, this.#start + offset, src);
  }

  discard(): Promise<void> {
    return Promise.resolve(); // a flat extent keeps its data (it may be shared with a raw user)
  }

  status(_offset: number, length: number): Promise<ExtentRun> {
    return Promise.resolve({ length, state: Alloc.Data });
  }

  flush(): Promise<void> {
    return this.#engine.fsync(this.#file, true);
  }

  close(): Promise<void> {
    this.#file.close();
    return Promise.resolve();
  }
}

export class ZeroExtent implements VmdkExtent {
  readonly size: number;
  readonly writable = false;

  constructor(sectors: number) {
    this.size = sectors * SECTOR;
  }

  read(_offset: number, target: Uint8Array): Promise<void> {
    target.fill(0);
    return Promise.resolve();
  }

  write(offset: number): Promise<void> {
    return Promise.reject(new DiskError("EROFS", `write: offset ${offset} of a ZERO extent`));
  }

  discard(): Promise<void> {
    return Promise.resolve();
  }

  status(_offset: number, length: number): Promise<ExtentRun> {
    return Promise.resolve({ length, state: Alloc.Zero });
  }

  flush(): Promise<void> {
    return Promise.resolve();
  }

  close(): Promise<void> {
    return Promise.resolve();
  }
}
