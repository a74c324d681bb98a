/*
 * The floor of a FUSE disk export on this kernel: a one-file FUSE server that does no I/O at all.
 * READ answers zeros, WRITE is acknowledged and dropped; one thread, one blocking read(2) and one
 * write(2) per request, nothing else. Whatever a loop device over its file reaches is the most any
 * FUSE server can reach here (bench/fuse_floor.ts drives it next to tapd). Written from
 * shared/specs/protocols.md §16–§21; not part of tapd.
 *
 *   fuse_floor PATH SIZE_BYTES     mounts PATH (an existing regular file); serves until unmounted
 */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/uio.h>
#include <unistd.h>

#define MAX_IO (1024 * 1024)

struct in_header { uint32_t len, opcode; uint64_t unique, nodeid; uint32_t uid, gid, pid, pad; };
struct out_header { uint32_t len; int32_t error; uint64_t unique; };
struct rw_in { uint64_t fh, offset; uint32_t size, flags; uint64_t lock_owner; uint32_t f2, pad; };
struct init_in { uint32_t major, minor, max_readahead, flags; };
struct init_out {
  uint32_t major, minor, max_readahead, flags;
  uint16_t max_background, congestion_threshold;
  uint32_t max_write, time_gran;
  uint16_t max_pages, map_alignment;
  uint32_t flags2, unused[7];
};
struct attr {
  uint64_t ino, size, blocks, atime, mtime, ctime;
  uint32_t atimensec, mtimensec, ctimensec, mode, nlink, uid, gid, rdev, blksize, flags;
};
struct attr_out { uint64_t attr_valid; uint32_t attr_valid_nsec, dummy; struct attr attr; };
struct open_out { uint64_t fh; uint32_t open_flags, backing_id; };
struct write_out { uint32_t size, pad; };
struct statfs_out { uint64_t blocks, bfree, bavail, files, ffree; uint32_t bsize, namelen, frsize, pad, spare[6]; };

enum { LOOKUP = 1, FORGET = 2, GETATTR = 3, SETATTR = 4, OPEN = 14, READ = 15, WRITE = 16,
       STATFS = 17, RELEASE = 18, FSYNC = 20, FLUSH = 25, INIT = 26, DESTROY = 38,
       BATCH_FORGET = 42 };

static int dev;
static uint64_t disk_size;
static char zeros[MAX_IO];

static void reply(uint64_t unique, int error, const void *body, size_t size) {
  struct out_header h = { (uint32_t)(sizeof h + (error ? 0 : size)), -error, unique };
  struct iovec iov[2] = { { &h, sizeof h }, { (void *)body, error ? 0 : size } };
  if (writev(dev, iov, 2) < 0 && errno != ENOENT) perror("fuse_floor: write /dev/fuse");
}

static void attr(struct attr *a) {
  memset(a, 0, sizeof *a);
  a->ino = 1;
  a->size = disk_size;
  a->blocks = disk_size / 512;
  a->mode = 0100600;
  a->nlink = 1;
  a->blksize = 4096;
}

int main(int argc, char **argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: fuse_floor PATH SIZE_BYTES\n");
    return 2;
  }
  disk_size = strtoull(argv[2], NULL, 10);
  dev = open("/dev/fuse", O_RDWR | O_CLOEXEC);
  if (dev < 0) { perror("fuse_floor: open /dev/fuse"); return 1; }
  char opts[256];
  snprintf(opts, sizeof opts,
           "fd=%d,rootmode=100000,user_id=0,group_id=0,allow_other,max_read=%d", dev, MAX_IO);
  if (mount("fuse_floor", argv[1], "fuse", MS_NOSUID | MS_NODEV, opts) < 0) {
    perror("fuse_floor: mount");
    return 1;
  }
  static char buf[MAX_IO + 4096] __attribute__((aligned(4096)));
  for (;;) {
    ssize_t n = read(dev, buf, sizeof buf);
    if (n < 0) {
      if (errno == EINTR || errno == ENOENT || errno == EAGAIN) continue;
      if (errno == ENODEV) return 0; /* unmounted */
      perror("fuse_floor: read /dev/fuse");
      return 1;
    }
    struct in_header *in = (struct in_header *)buf;
    void *body = buf + sizeof *in;
    switch (in->opcode) {
      case INIT: {
        struct init_in *ii = body;
        struct init_out o = { 7, ii->minor < 36 ? ii->minor : 36, ii->max_readahead,
                              ii->flags & ((1 << 0) | (1 << 5) | (1 << 15) | (1 << 18) | (1 << 22)),
                              128, 96, MAX_IO, 1, MAX_IO / 4096, 0, 0, { 0 } };
        reply(in->unique, 0, &o, sizeof o);
        break;
      }
      case GETATTR:
      case SETATTR: {
        struct attr_out o = { 3600, 0, 0, { 0 } };
        attr(&o.attr);
        reply(in->unique, 0, &o, sizeof o);
        break;
      }
      case OPEN: {
        struct open_out o = { 1, 0x40 /* PARALLEL_DIRECT_WRITES */, 0 };
        reply(in->unique, 0, &o, sizeof o);
        break;
      }
      case READ: {
        struct rw_in *r = body;
        uint64_t len = r->offset >= disk_size ? 0 : disk_size - r->offset;
        if (len > r->size) len = r->size;
        reply(in->unique, 0, zeros, len);
        break;
      }
      case WRITE: {
        struct write_out o = { ((struct rw_in *)body)->size, 0 };
        reply(in->unique, 0, &o, sizeof o);
        break;
      }
      case STATFS: {
        struct statfs_out o = { disk_size / 4096, 0, 0, 1, 0, 4096, 255, 4096, 0, { 0 } };
        reply(in->unique, 0, &o, sizeof o);
        break;
      }
      case FSYNC: case FLUSH: case RELEASE: case DESTROY:
        reply(in->unique, 0, NULL, 0);
        break;
      case FORGET: case BATCH_FORGET:
        break;
      case LOOKUP:
        reply(in->unique, ENOENT, NULL, 0);
        break;
      default:
        reply(in->unique, ENOSYS, NULL, 0);
    }
  }
}
