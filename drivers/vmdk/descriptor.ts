/**
 * The VMDK text descriptor: parsing (CID, parentCID, createType, parentFileNameHint, extent
 * lines, refusal of encrypted disks and unsupported extent types) and writing descriptors that
 * QEMU's naive parser reads back (`CID=` first, no spaces around `=`, formats.md §3.4).
 */
import { ImageError } from "../errors.ts";

export type Access = "RW" | "RDONLY" | "NOACCESS";
export type ExtentType = "SPARSE" | "FLAT" | "VMFS" | "ZERO";

export interface ExtentLine {
  access: Access;
  sectors: number;
  type: ExtentType;
  /** File name as written (relative to the descriptor's directory unless absolute). */
  file: string;
  /** Start of the data inside a flat file, in sectors. */
  offset: number;
}

export interface Descriptor {
  text: string;
  /** The CID as written (hex digits), and its value. */
  cidText: string;
  cid: number;
  parentCid: number;
  createType: string;
  parentFileNameHint: string | null;
  extents: ExtentLine[];
  ddb: Map<string, string>;
}

export const NO_PARENT = 0xffffffff;
/** Descriptors longer than this are refused (QEMU reads at most 1 MiB). */
export const MAX_DESCRIPTOR = 1024 * 1024;

const REFUSED_TYPES: Readonly<Record<string, string>> = {
  VMFSSPARSE: "COWD (vmfsSparse) extents are not supported",
  SESPARSE: "seSparse extents are not supported",
  VMFSRDM: "raw device mapping (VMFSRDM) extents are not supported",
  VMFSRAW: "raw device (VMFSRAW) extents are not supported",
};

const REFUSED_CREATE_TYPES: Readonly<Record<string, string>> = {
  vmfsSparse: "COWD (vmfsSparse) disks are not supported",
  seSparse: "seSparse disks are not supported",
  vmfsRDM: "raw device mappings (vmfsRDM) are not supported",
  vmfsRaw: "raw device (vmfsRaw) disks are not supported",
  fullDevice: "fullDevice disks are not supported",
  partitionedDevice: "partitionedDevice disks are not supported",
};

const unquote = (s: string) =>
  s.length >= 2 && s.startsWith('"') && s.endsWith('"') ? s.slice(1, -1) : s;

/** Whether `text` (a file's first bytes) looks like a VMDK text descriptor. */
export function isDescriptorText(head: Uint8Array): boolean {
  const text = new TextDecoder("latin1").decode(head.subarray(0, 1024));
  if (text.startsWith("# Disk DescriptorFile")) return true;
  // QEMU's rule: the first line that is not blank or a comment is version=1|2|3.
  for (const line of text.split("\n")) {
    const t = line.trim();
    if (t === "" || t.startsWith("#")) continue;
    return /^version=[123]$/.test(t) && text.includes("createType=");
  }
  return false;
}

/** Parses descriptor text; `where` names the file in messages. */
export function parseDescriptor(text: string, where: string): Descriptor {
  const bad = (why: string) => new ImageError(where, why);
  const keys = new Map<string, string>(), ddb = new Map<string, string>();
  const extents: ExtentLine[] = [];
  for (const raw of text.split(/\r?\n/)) {
    const line = raw.replace(/\0+$/, "").trim();
    if (line === "" || line.startsWith("#")) continue;
    const ext = /^(RW|RDONLY|NOACCESS)\s+(\d+)\s+([A-Za-z]+)(?:\s+"([^"]*)")?(?:\s+(\d+))?$/.exec(
      line,
    );
    if (ext !== null) {
      const type = ext[3].toUpperCase();
      const refused = REFUSED_TYPES[type];
      if (refused !== undefined) throw bad(refused);
      if (type !== "SPARSE" && type !== "FLAT" && type !== "VMFS" && type !== "ZERO") {
        throw bad(`unsupported extent type ${type}`);
      }
      const sectors = Number(ext[2]);
      if (!Number.isSafeInteger(sectors) || sectors <= 0 || sectors > 2 ** 42) {
        throw bad(`extent of ${ext[2]} sectors`);
      }
      if (type !== "ZERO" && (ext[4] === undefined || ext[4] === "")) {
        throw bad(`${type} extent without a file name`);
      }
      const offset = ext[5] === undefined ? 0 : Number(ext[5]);
      if (!Number.isSafeInteger(offset) || offset > 2 ** 42) throw bad(`extent offset ${ext[5]}`);
      extents.push({
        access: ext[1] as Access,
        sectors,
        type: type as ExtentType,
        file: ext[4] ?? "",
        offset,
      });
      continue;
    }
    const kv = /^([A-Za-z0-9_.]+)\s*=\s*(.*)$/.exec(line);
    if (kv === null) {
      if (/^(RW|RDONLY|NOACCESS)\s/.test(line)) throw bad(`bad extent line: ${line.slice(0, 80)}`);
      continue; // unknown lines are ignored, as VMware and QEMU do
    }
    const value = unquote(kv[2].trim());
    if (kv[1].startsWith("ddb.")) ddb.set(kv[1], value);
    else if (!keys.has(kv[1])) keys.set(kv[1], value);
  }
  if (keys.has("encryption.keySafe") || keys.has("encryption.data")) {
    throw bad("encrypted VMDK disks are not supported");
  }
  const version = keys.get("version");
  if (version !== undefined && !/^[123]$/.test(version)) {
    throw bad(`unsupported descriptor version ${version}`);
  }
  const cidText = keys.get("CID");
  if (cidText === undefined || !/^[0-9a-fA-F]{1,8}$/.test(cidText)) {
    throw bad(cidText === undefined ? "descriptor has no CID" : `bad CID ${cidText.slice(0, 20)}`);
  }
  const parentText = keys.get("parentCID") ?? "ffffffff";
  if (!/^[0-9a-fA-F]{1,8}$/.test(parentText)) throw bad(`bad parentCID ${parentText.slice(0, 20)}`);
  const createType = keys.get("createType") ?? "";
  const refused = REFUSED_CREATE_TYPES[createType];
  if (refused !== undefined) throw bad(refused);
  if (extents.length === 0) throw bad("descriptor has no extents");
  return {
    text,
    cidText,
    cid: parseInt(cidText, 16),
    parentCid: parseInt(parentText, 16),
    createType,
    parentFileNameHint: keys.get("parentFileNameHint") ?? null,
    extents,
    ddb,
  };
}

/** A random CID written with `digits` hex digits (so the descriptor keeps its length). */
export function randomCid(digits = 8, not = -1): number {
  const lo = digits <= 1 ? 0 : 16 ** (digits - 1), span = 16 ** Math.min(digits, 8) - lo;
  for (;;) {
    const cid = lo + Math.floor(Math.random() * span);
    if (cid !== not && cid !== NO_PARENT) return cid;
  }
}

/** The descriptor text with a new CID of the same width (same length in bytes). */
export function withCid(d: Descriptor, cid: number): string {
  const hex = cid.toString(16).padStart(d.cidText.length, "0");
  return d.text.replace(/^(\s*CID\s*=\s*)[0-9a-fA-F]+/m, `$1${hex}`);
}

export interface NewDescriptor {
  cid: number;
  parentCid: number;
  createType: string;
  parentFileNameHint?: string;
  extents: { sectors: number; type: "SPARSE" | "FLAT"; file: string }[];
  hwVersion: string;
  adapterType: string;
  toolsVersion: string;
  /** Virtual size in bytes (for the geometry). */
  size: number;
}

/** Descriptor text laid out as QEMU writes it (formats.md §3.4, §3.10). */
export function descriptorText(d: NewDescriptor): string {
  const heads = d.adapterType === "ide" ? 16 : 255;
  const cylinders = Math.floor(d.size / (63 * heads * 512));
  const lines = [
    "# Disk DescriptorFile",
    "version=1",
    `CID=${d.cid.toString(16)}`,
    `parentCID=${d.parentCid.toString(16)}`,
    `createType="${d.createType}"`,
  ];
  if (d.parentFileNameHint !== undefined) {
    lines.push(`parentFileNameHint="${d.parentFileNameHint}"`);
  } else lines.push("");
  lines.push("# Extent description");
  for (const e of d.extents) {
    lines.push(`RW ${e.sectors} ${e.type} "${e.file}"${e.type === "FLAT" ? " 0" : ""}`);
  }
  lines.push(
    "",
    "# The Disk Data Base",
    "#DDB",
    "",
    `ddb.virtualHWVersion = "${d.hwVersion}"`,
    `ddb.geometry.cylinders = "${cylinders}"`,
    `ddb.geometry.heads = "${heads}"`,
    'ddb.geometry.sectors = "63"',
    `ddb.adapterType = "${d.adapterType}"`,
    `ddb.toolsVersion = "${d.toolsVersion}"`,
    "",
  );
  return lines.join("\n");
}
