/**
 * The attributes of the one file a file-root export shows (protocols.md §20, §21.1, §21.6):
 * a regular file of the disk's size, with the mount point's owner and permissions (write bits
 * dropped when read-only). chmod, chown and touch change them in memory; the size never changes.
 */
import { ATTR, FATTR, SETATTR_IN } from "./protocol.ts";

const S_IFREG = 0o100000;
const ST_BLKSIZE = 4096;

interface Time {
  sec: number;
  nsec: number;
}

function timeOf(ms: number): Time {
  return { sec: Math.floor(ms / 1000), nsec: Math.floor(ms % 1000) * 1_000_000 };
}

function now(): Time {
  return timeOf(Date.now());
}

/** What the file starts as. */
export interface InitialAttributes {
  size: number;
  /** Permission bits (the file type is always a regular file). */
  mode: number;
  uid: number;
  gid: number;
  readOnly: boolean;
  mtime?: Date | null;
}

export class FileAttributes {
  readonly size: number;
  #mode: number;
  #uid: number;
  #gid: number;
  #atime: Time;
  #mtime: Time;
  #ctime: Time;

  constructor(initial: InitialAttributes) {
    this.size = initial.size;
    this.#mode = initial.mode & (initial.readOnly ? 0o7555 : 0o7777);
    this.#uid = initial.uid;
    this.#gid = initial.gid;
    this.#mtime = initial.mtime ? timeOf(initial.mtime.getTime()) : now();
    this.#atime = this.#mtime;
    this.#ctime = now();
  }

  get mode(): number {
    return S_IFREG | this.#mode;
  }

  /** Writes a fuse_attr at `at`. */
  encode(v: DataView, at: number): void {
    new Uint8Array(v.buffer, v.byteOffset + at, ATTR.size).fill(0);
    v.setBigUint64(at + ATTR.ino, 1n, true);
    v.setBigUint64(at + ATTR.fileSize, BigInt(this.size), true);
    v.setBigUint64(at + ATTR.blocks, BigInt(Math.ceil(this.size / 512)), true);
    v.setBigUint64(at + ATTR.atime, BigInt(this.#atime.sec), true);
    v.setBigUint64(at + ATTR.mtime, BigInt(this.#mtime.sec), true);
    v.setBigUint64(at + ATTR.ctime, BigInt(this.#ctime.sec), true);
    v.setUint32(at + ATTR.atimensec, this.#atime.nsec, true);
    v.setUint32(at + ATTR.mtimensec, this.#mtime.nsec, true);
    v.setUint32(at + ATTR.ctimensec, this.#ctime.nsec, true);
    v.setUint32(at + ATTR.mode, this.mode, true);
    v.setUint32(at + ATTR.nlink, 1, true);
    v.setUint32(at + ATTR.uid, this.#uid, true);
    v.setUint32(at + ATTR.gid, this.#gid, true);
    v.setUint32(at + ATTR.blksize, ST_BLKSIZE, true);
  }

  /**
   * Applies a fuse_setattr_in found at `at`. A size change is refused (the disk has a fixed
   * size): returns the requested size then, and changes nothing; null on success.
   */
  apply(v: DataView, at: number): number | null {
    const valid = v.getUint32(at + SETATTR_IN.valid, true);
    if ((valid & FATTR.SIZE) !== 0) {
      const size = Number(v.getBigUint64(at + SETATTR_IN.size, true));
      if (size !== this.size) return size;
    }
    if ((valid & FATTR.MODE) !== 0) this.#mode = v.getUint32(at + SETATTR_IN.mode, true) & 0o7777;
    if ((valid & FATTR.UID) !== 0) this.#uid = v.getUint32(at + SETATTR_IN.uid, true);
    if ((valid & FATTR.GID) !== 0) this.#gid = v.getUint32(at + SETATTR_IN.gid, true);
    if ((valid & FATTR.ATIME_NOW) !== 0) this.#atime = now();
    else if ((valid & FATTR.ATIME) !== 0) {
      this.#atime = {
        sec: Number(v.getBigUint64(at + SETATTR_IN.atime, true)),
        nsec: v.getUint32(at + SETATTR_IN.atimensec, true),
      };
    }
    if ((valid & FATTR.MTIME_NOW) !== 0) this.#mtime = now();
    else if ((valid & FATTR.MTIME) !== 0) {
      this.#mtime = {
        sec: Number(v.getBigUint64(at + SETATTR_IN.mtime, true)),
        nsec: v.getUint32(at + SETATTR_IN.mtimensec, true),
      };
    }
    this.#ctime = now();
    return null;
  }
}
