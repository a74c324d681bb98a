/**
 * `tapd info`: what an image is (the peer is `qemu-img info`): format, virtual size, space used,
 * cluster size, backing chain, and for qcow images the header fields. Read from the headers
 * alone; no disk is opened.
 */
import { formatSize, parseChoice, parseCommandLine } from "../cli/args.ts";
import { type Command, UsageError } from "../cli/command.ts";
import { backingChain, type ChainLayer, type ImageProbe, probeImage } from "./image_probe.ts";

type Json = string | number | boolean | null | Json[] | { [key: string]: Json };

/** The JSON object, keys named as `qemu-img info --output=json` names them where it has them. */
export function infoJson(image: ImageProbe, chain: ChainLayer[]): { [key: string]: Json } {
  const out: { [key: string]: Json } = {
    "filename": image.path,
    "format": image.format,
    "virtual-size": image.virtualSize,
    "actual-size": image.allocated,
  };
  const h = image.header;
  if (h !== null) out["cluster-size"] = 2 ** h.clusterBits;
  if (image.backing !== null) {
    out["backing-filename"] = image.backing;
    out["full-backing-filename"] = chain[0].filename;
    if (chain[0].probe !== undefined) out["backing-filename-format"] = chain[0].probe.format;
  }
  out["dirty-flag"] = false;
  if (chain.length > 0) {
    out["backing-chain"] = chain.map((layer): Json =>
      layer.probe === undefined ? { "filename": layer.filename, "error": layer.error } : {
        "filename": layer.filename,
        "format": layer.probe.format,
        "virtual-size": layer.probe.virtualSize,
      }
    );
  }
  if (h !== null) {
    const data: { [key: string]: Json } = {
      "version": 1,
      "size": h.size,
      "cluster-bits": h.clusterBits,
      "l2-bits": h.l2Bits,
      "l1-size": h.l1Size,
      "l1-table-offset": h.l1Offset,
      "backing-file-offset": h.backingOffset,
      "backing-file-size": h.backingLength,
      "mtime": h.mtime,
      "crypt-method": h.cryptMethod,
    };
    if (h.xen !== null) {
      data["xen"] = {
        "checksum": h.xen.checksum,
        "min-cluster-alloc": h.xen.minClusterAlloc,
        "flags": h.xen.flags,
      };
    }
    out["format-specific"] = { "type": "qcow", "data": data };
  }
  return out;
}

function sizeText(bytes: number): string {
  return `${formatSize(bytes)} (${bytes} bytes)`;
}

/** The text form, laid out as `qemu-img info` lays it out. */
export function infoText(image: ImageProbe, chain: ChainLayer[]): string {
  const lines = [
    `image: ${image.path}`,
    `file format: ${image.format}`,
    `virtual size: ${sizeText(image.virtualSize)}`,
    `disk size: ${formatSize(image.allocated)}`,
  ];
  const h = image.header;
  if (h !== null) lines.push(`cluster_size: ${2 ** h.clusterBits}`);
  if (image.backing !== null) {
    const full = chain[0].filename;
    lines.push(
      `backing file: ${image.backing}${full === image.backing ? "" : ` (actual path: ${full})`}`,
    );
    if (chain[0].probe !== undefined) lines.push(`backing file format: ${chain[0].probe.format}`);
    lines.push("backing chain:");
    for (const layer of chain) {
      lines.push(
        layer.probe === undefined
          ? `    ${layer.filename}: ${layer.error}`
          : `    ${layer.filename}: ${layer.probe.format}, ${sizeText(layer.probe.virtualSize)}`,
      );
    }
  }
  if (h !== null) {
    lines.push(
      "Format specific information:",
      `    version: 1`,
      `    cluster bits: ${h.clusterBits}`,
      `    l2 bits: ${h.l2Bits} (${2 ** h.l2Bits} entries, ${2 ** (h.l2Bits + 3)} bytes per table)`,
      `    l1 table: ${h.l1Size} entries at offset ${h.l1Offset}`,
      `    backing file name: ${h.backingLength} bytes at offset ${h.backingOffset}`,
      `    mtime: ${h.mtime}`,
      `    crypt method: ${h.cryptMethod}`,
    );
    if (h.xen !== null) {
      lines.push(
        `    xen extended header: checksum ${h.xen.checksum}, min cluster alloc ` +
          `${h.xen.minClusterAlloc}, flags ${h.xen.flags}`,
      );
    }
  }
  return lines.join("\n");
}

export const infoCommand: Command = {
  name: "info",
  summary: "show an image's format, sizes, backing chain and header (qemu-img info)",
  usage: `Usage: tapd info [--output=human|json] IMAGE

Prints what IMAGE is: its format (qcow, or raw for anything that is not qcow), virtual size,
the bytes it takes on disk, and for qcow images the cluster size, the backing file (as stored,
and resolved against IMAGE's directory), the backing chain (each layer's file name, format and
virtual size) and the header fields. Only the headers are read.

With --output=json the keys are those of \`qemu-img info --output=json\` (filename, format,
virtual-size, actual-size, cluster-size, backing-filename, full-backing-filename,
backing-filename-format, dirty-flag), plus backing-chain and format-specific.

Options:
  --output human|json   output format (default human)
  -h, --help            this text`,

  async run(args: string[]): Promise<number> {
    const { values, positionals } = parseCommandLine("info", args, {
      output: { type: "string", default: "human" },
    });
    const output = parseChoice(values.output, "--output", ["human", "json"] as const);
    if (positionals.length !== 1) {
      throw new UsageError(`info: expected one IMAGE, got ${positionals.length}`);
    }
    if (positionals[0] === "") throw new UsageError("info: empty file name");
    const image = await probeImage(positionals[0]);
    const chain = await backingChain(image);
    console.log(
      output === "json" ? JSON.stringify(infoJson(image, chain), null, 4) : infoText(image, chain),
    );
    return 0;
  },
};
