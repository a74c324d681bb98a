/**
 * The qcow geometry the tools create: QEMU's defaults (formats.md §1.7), or for another cluster
 * size L2 tables of at least one cluster whose L1 entries each cover at least 2 MiB.
 */
import { UsageError } from "../cli/command.ts";
import { parseSize } from "../cli/args.ts";
import { defaultGeometry } from "../drivers/qcow/header.ts";

export interface Geometry {
  clusterBits: number;
  l2Bits: number;
}

const MIN_CLUSTER_BITS = 9;
const MAX_CLUSTER_BITS = 16;
const MAX_L2_BITS = 13;
/** QEMU refuses L1 tables of more entries (INT_MAX / 8). */
const MAX_L1_ENTRIES = 2 ** 28;

/** `--cluster-size`: a power of two from 512 to 64k; returns log2 of it. */
export function parseClusterSize(text: string): number {
  const bytes = parseSize(text, "--cluster-size");
  const bits = Math.log2(bytes);
  if (!Number.isInteger(bits) || bits < MIN_CLUSTER_BITS || bits > MAX_CLUSTER_BITS) {
    throw new UsageError(
      `Invalid --cluster-size "${text}": expected a power of two from 512 to 64k`,
    );
  }
  return bits;
}

/** The geometry for a cluster size (undefined: QEMU's default for the case). */
export function geometryFor(clusterBits: number | undefined, hasBacking: boolean): Geometry {
  if (clusterBits === undefined) return defaultGeometry(hasBacking);
  const l2Bits = Math.min(MAX_L2_BITS, Math.max(clusterBits - 3, 21 - clusterBits));
  return { clusterBits, l2Bits };
}

/** Throws a UsageError when a qcow image of `size` bytes cannot have this geometry. */
export function checkVirtualSize(size: number, g: Geometry): void {
  const span = 2 ** (g.clusterBits + g.l2Bits);
  if (!Number.isSafeInteger(size) || Math.ceil(size / span) > MAX_L1_ENTRIES) {
    throw new UsageError(
      `A qcow image with ${2 ** g.clusterBits}-byte clusters can hold at most ` +
        `${MAX_L1_ENTRIES * span} bytes (${size} asked for)`,
    );
  }
}

/** Bytes a fully written image takes at most: metadata, every L2 table and every cluster. */
export function fullImageBytes(headerBytes: number, size: number, g: Geometry): number {
  const cluster = 2 ** g.clusterBits;
  const l2Bytes = Math.max(2 ** (g.l2Bits + 3), cluster);
  const l1Size = Math.ceil(size / 2 ** (g.clusterBits + g.l2Bits));
  return alignUp(headerBytes, cluster) + l1Size * alignUp(l2Bytes, cluster) +
    alignUp(size, cluster);
}

export function alignUp(x: number, a: number): number {
  return Math.ceil(x / a) * a;
}
