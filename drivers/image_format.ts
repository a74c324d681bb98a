/**
 * What `tapd create` and `tapd check` need from an image format, beside its Driver (which opens
 * it as a disk). Each format module exports one ImageFormat; tools/formats.ts lists them.
 */

export interface CreateOptions {
  /** Virtual size in bytes. */
  size: number;
  /** Backing (parent) image path, as it should be recorded in the new image. */
  backing?: string;
  /** The backing image's format (a driver type), when known. */
  backingFormat?: string;
  /** `-o subformat=…` (vmdk: monolithicSparse, …; vhd: dynamic, fixed). */
  subformat?: string;
  /** `-o cluster_size=…` in bytes (qcow cluster, vmdk grain, vhd block). */
  clusterSize?: number;
  /** Every other `-o key=value`, for format-specific options (e.g. vmdk adapter_type). */
  extra?: Readonly<Record<string, string>>;
}

/** The result of checking an image, with qemu-img's exit codes in mind. */
export interface CheckReport {
  format: string;
  /** Corruptions: entries outside the file, two entries on one cluster, bad checksums, … */
  errors: string[];
  /** Space allocated but referenced by nothing (harmless). */
  leaks: string[];
  /** Allocated and total clusters/grains/blocks, when the format has them. */
  allocated?: number;
  total?: number;
}

export interface ImageFormat {
  /** The driver type, e.g. "vhd". */
  readonly type: string;
  /** Creates a new image; fails if `path` exists. */
  create(path: string, options: CreateOptions): Promise<void>;
  /** Checks an image's metadata without changing it. */
  check(path: string): Promise<CheckReport>;
}

/** qemu-img check's exit status: 0 clean, 2 corruption, 3 leaks only. */
export function checkExitCode(report: CheckReport): number {
  if (report.errors.length > 0) return 2;
  if (report.leaks.length > 0) return 3;
  return 0;
}
