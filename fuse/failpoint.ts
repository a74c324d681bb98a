/**
 * Failpoints for tests: `TAPD_FAILPOINT=NAME` makes the code at the point named NAME fail on
 * purpose, so that tests can show what a failure there leaves behind. Unset, nothing changes.
 *
 * - `fuse-thread`: a FUSE I/O thread or ring thread throws once its first disk I/O is in flight.
 */
export function failpoint(name: string): boolean {
  try {
    return Deno.env.get("TAPD_FAILPOINT") === name;
  } catch {
    return false; // no permission to read the environment: no failpoint
  }
}
