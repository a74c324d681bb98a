/*
 * xvdtest: writes and verifies a deterministic byte pattern on a block device or an image file.
 *
 *   xvdtest write  DEV [--seed N]             write the fixed region plan, fsync
 *   xvdtest verify DEV [--seed N] [--no-zero] check the regions (and, unless --no-zero, that a few
 *                                             never-written ranges still read as zeros)
 *   xvdtest busy   DEV [--seed N]             rewrite the device in a loop until killed
 *   xvdtest fill   FILE BYTES [--seed N]      buffered pattern file from offset 0, fsync
 *   xvdtest check  FILE BYTES [--seed N]      check such a file
 *   xvdtest plan   [SIZE]                     print the region plan
 *
 * Byte b of the pattern is a function of (absolute offset, seed) only, so any subset of a region
 * can be checked on its own. DEV must be at least 16 MiB; the plan puts one region on its last
 * sector. O_DIRECT regions use buffers that start 512..3584 bytes into a page and device offsets
 * that are 512- but not 4096-aligned, so a Xen blkfront sends segments with first_sect != 0.
 * Exit status: 0 ok, 1 mismatch, 2 usage or I/O error. Built with gcc -static by
 * tests/xen/harness.ts; runs in the domU, in dom0 and on the host.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/fs.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define KIB ((uint64_t)1024)
#define MIB (KIB * KIB)
#define MIN_SIZE (16 * MIB)
#define MAX_IO (3 * MIB + 4096)

enum kind { DIRECT, BUFFERED };

struct region {
  uint64_t off;     /* absolute device offset; negative plans are resolved against the size */
  uint64_t len;
  enum kind kind;
  unsigned misalign; /* buffer start within its page (O_DIRECT only) */
  const char *what;
};

/* Never-written ranges that must read as zeros on an image that started as zeros. */
struct range {
  uint64_t off, len;
};

static struct region plan[16];
static int nplan;
static struct range zeros[8];
static int nzeros;

static void add(uint64_t off, uint64_t len, enum kind kind, unsigned misalign, const char *what) {
  plan[nplan++] = (struct region){off, len, kind, misalign, what};
}

static void build_plan(uint64_t size) {
  nplan = 0;
  nzeros = 0;
  add(512, 3584, DIRECT, 512, "7 sectors at sector 1, buffer +512");
  add(3 * 4096 + 1536, 9216, DIRECT, 1024, "18 sectors across 4 pages, buffer +1024");
  add(64 * KIB - 512, 1024, DIRECT, 3584, "2 sectors across 64 KiB, buffer across a page");
  add(1 * MIB + 512, 1 * MIB, DIRECT, 512, "1 MiB at +512, buffer +512");
  add(4 * MIB, 3 * MIB, DIRECT, 0, "3 MiB aligned");
  add(9 * MIB + 123, 5000, BUFFERED, 0, "5000 bytes buffered at +123");
  add(10 * MIB + 7, 70000, BUFFERED, 0, "70000 bytes buffered at +7");
  add(12 * MIB + 5 * 4096, 64 * KIB, DIRECT, 2048, "64 KiB, buffer +2048");
  add(size - 512, 512, DIRECT, 512, "last sector");
  zeros[nzeros++] = (struct range){0, 512};
  zeros[nzeros++] = (struct range){4096, 3 * 4096 + 1536 - 4096};
  zeros[nzeros++] = (struct range){128 * KIB, 128 * KIB};
  zeros[nzeros++] = (struct range){8 * MIB, 1 * MIB};
  zeros[nzeros++] = (struct range){size - MIB, MIB - 512};
}

static inline uint64_t mix(uint64_t x) {
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ull;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebull;
  x ^= x >> 31;
  return x;
}

static inline uint8_t pattern_byte(uint64_t off, uint64_t seed) {
  uint64_t w = mix((off >> 3) + (seed + 1) * 0x9e3779b97f4a7c15ull);
  return (uint8_t)(w >> ((off & 7) * 8));
}

static void fill(uint8_t *buf, uint64_t off, uint64_t len, uint64_t seed) {
  uint64_t i = 0;
  while (i < len && ((off + i) & 7) != 0) {
    buf[i] = pattern_byte(off + i, seed);
    i++;
  }
  for (; i + 8 <= len; i += 8) {
    uint64_t w = mix(((off + i) >> 3) + (seed + 1) * 0x9e3779b97f4a7c15ull);
    memcpy(buf + i, &w, 8); /* little endian: byte k of the word is (w >> 8k) */
  }
  for (; i < len; i++) buf[i] = pattern_byte(off + i, seed);
}

static const char *prog_mode = "?";

static void die(const char *what, const char *dev) {
  fprintf(stderr, "xvdtest: %s %s: %s\n", what, dev, strerror(errno));
  printf("xvdtest: %s FAILED: %s %s: %s\n", prog_mode, what, dev, strerror(errno));
  exit(2);
}

static uint8_t *alloc_io(void) {
  void *p;
  if (posix_memalign(&p, 4096, MAX_IO + 4096) != 0) {
    fprintf(stderr, "xvdtest: out of memory\n");
    exit(2);
  }
  return p;
}

static uint64_t device_size(int fd, const char *dev) {
  struct stat st;
  if (fstat(fd, &st) < 0) die("stat", dev);
  if (S_ISBLK(st.st_mode)) {
    uint64_t size;
    if (ioctl(fd, BLKGETSIZE64, &size) < 0) die("BLKGETSIZE64", dev);
    return size;
  }
  return (uint64_t)st.st_size;
}

static int open_direct(const char *dev, int flags) {
  int fd = open(dev, flags | O_DIRECT);
  if (fd < 0) {
    if (errno == EINVAL) {
      printf("xvdtest: %s FAILED: O_DIRECT is not supported on %s\n", prog_mode, dev);
      exit(2);
    }
    die("open O_DIRECT", dev);
  }
  return fd;
}

static void pwrite_all(int fd, const uint8_t *buf, uint64_t len, uint64_t off, const char *dev) {
  while (len > 0) {
    ssize_t n = pwrite(fd, buf, len, (off_t)off);
    if (n < 0) {
      if (errno == EINTR) continue;
      die("pwrite", dev);
    }
    if (n == 0) {
      errno = ENOSPC;
      die("pwrite", dev);
    }
    buf += n;
    len -= (uint64_t)n;
    off += (uint64_t)n;
  }
}

static void pread_all(int fd, uint8_t *buf, uint64_t len, uint64_t off, const char *dev) {
  while (len > 0) {
    ssize_t n = pread(fd, buf, len, (off_t)off);
    if (n < 0) {
      if (errno == EINTR) continue;
      die("pread", dev);
    }
    if (n == 0) {
      errno = EIO;
      die("pread (short: past the end)", dev);
    }
    buf += n;
    len -= (uint64_t)n;
    off += (uint64_t)n;
  }
}

static uint64_t parse_u64(const char *s, const char *what) {
  char *end;
  errno = 0;
  unsigned long long v = strtoull(s, &end, 0);
  if (errno != 0 || end == s || *end != 0) {
    fprintf(stderr, "xvdtest: bad %s: %s\n", what, s);
    exit(2);
  }
  return v;
}

static uint64_t need_size(int fd, const char *dev) {
  uint64_t size = device_size(fd, dev);
  if (size < MIN_SIZE || size % 512 != 0) {
    printf("xvdtest: %s FAILED: %s is %" PRIu64 " bytes; need a multiple of 512, >= %" PRIu64 "\n",
           prog_mode, dev, size, MIN_SIZE);
    exit(2);
  }
  return size;
}

static int cmd_write(const char *dev, uint64_t seed) {
  int dfd = open_direct(dev, O_RDWR);
  int bfd = open(dev, O_RDWR);
  if (bfd < 0) die("open", dev);
  uint64_t size = need_size(dfd, dev);
  build_plan(size);
  uint8_t *io = alloc_io();
  uint64_t total = 0;
  for (int i = 0; i < nplan; i++) {
    struct region *r = &plan[i];
    uint8_t *buf = io + r->misalign;
    fill(buf, r->off, r->len, seed);
    pwrite_all(r->kind == DIRECT ? dfd : bfd, buf, r->len, r->off, dev);
    total += r->len;
  }
  if (fsync(bfd) < 0) die("fsync", dev);
  if (fsync(dfd) < 0) die("fsync", dev);
  close(bfd);
  close(dfd);
  printf("xvdtest: write ok: %s size=%" PRIu64 " seed=%" PRIu64 " regions=%d bytes=%" PRIu64 "\n",
         dev, size, seed, nplan, total);
  return 0;
}

/* Reads [off, off+len) with O_DIRECT in 256 KiB pieces into a buffer at +512 within its page,
   comparing against the pattern (zero = 0) or zeros (zero = 1). */
static int check_range(int fd, const char *dev, uint64_t off, uint64_t len, uint64_t seed,
                       int zero, const char *what, uint8_t *io, uint8_t *want) {
  const uint64_t piece = 256 * KIB;
  uint64_t start = off & ~511ull, end = (off + len + 511) & ~511ull;
  uint8_t *buf = io + 512;
  for (uint64_t at = start; at < end; at += piece) {
    uint64_t n = end - at < piece ? end - at : piece;
    pread_all(fd, buf, n, at, dev);
    uint64_t lo = at < off ? off - at : 0;
    uint64_t hi = at + n > off + len ? off + len - at : n;
    if (zero)
      memset(want, 0, n);
    else
      fill(want, at, n, seed);
    if (memcmp(buf + lo, want + lo, hi - lo) == 0) continue;
    for (uint64_t k = lo; k < hi; k++) {
      if (buf[k] != want[k]) {
        printf("xvdtest: verify FAILED: %s at offset %" PRIu64 " (%s%s): got 0x%02x expected "
               "0x%02x\n",
               dev, at + k, zero ? "should be zero: " : "", what, buf[k], want[k]);
        return 1;
      }
    }
  }
  return 0;
}

static int cmd_verify(const char *dev, uint64_t seed, int check_zeros) {
  int fd = open_direct(dev, O_RDONLY);
  uint64_t size = need_size(fd, dev);
  build_plan(size);
  uint8_t *io = alloc_io(), *want = alloc_io();
  uint64_t total = 0;
  for (int i = 0; i < nplan; i++) {
    if (check_range(fd, dev, plan[i].off, plan[i].len, seed, 0, plan[i].what, io, want)) return 1;
    total += plan[i].len;
  }
  uint64_t zeroed = 0;
  if (check_zeros) {
    for (int i = 0; i < nzeros; i++) {
      if (check_range(fd, dev, zeros[i].off, zeros[i].len, seed, 1, "untouched range", io, want))
        return 1;
      zeroed += zeros[i].len;
    }
  }
  close(fd);
  printf("xvdtest: verify ok: %s size=%" PRIu64 " seed=%" PRIu64 " regions=%d bytes=%" PRIu64
         " zero-checked=%" PRIu64 "\n",
         dev, size, seed, nplan, total, zeroed);
  return 0;
}

static __attribute__((noreturn)) void cmd_busy(const char *dev, uint64_t seed) {
  int fd = open_direct(dev, O_RDWR);
  uint64_t size = need_size(fd, dev);
  uint8_t *io = alloc_io();
  const uint64_t chunk = 256 * KIB;
  uint64_t off = MIB, writes = 0, errors = 0;
  printf("xvdtest: busy: writing %s in a loop\n", dev);
  fflush(stdout);
  for (;;) {
    if (off + chunk > size) off = MIB;
    uint8_t *buf = io + (writes % 8) * 512;
    fill(buf, off, chunk, seed);
    ssize_t n = pwrite(fd, buf, chunk, (off_t)off);
    if (n < 0) {
      if (errors++ % 100 == 0) {
        printf("xvdtest: busy: write error at %" PRIu64 ": %s (%" PRIu64 " errors)\n", off,
               strerror(errno), errors);
        fflush(stdout);
      }
      struct timespec ts = {0, 100 * 1000 * 1000};
      nanosleep(&ts, NULL);
      continue;
    }
    off += chunk;
    if (++writes % 64 == 0) {
      fdatasync(fd);
      if (writes % 1024 == 0) {
        printf("xvdtest: busy: %" PRIu64 " MiB written\n", writes * chunk / MIB);
        fflush(stdout);
      }
    }
  }
}

static int cmd_fill(const char *file, uint64_t bytes, uint64_t seed) {
  int fd = open(file, O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd < 0) die("open", file);
  uint8_t *io = alloc_io();
  for (uint64_t at = 0; at < bytes; at += MIB) {
    uint64_t n = bytes - at < MIB ? bytes - at : MIB;
    fill(io, at, n, seed);
    pwrite_all(fd, io, n, at, file);
  }
  if (fsync(fd) < 0) die("fsync", file);
  close(fd);
  printf("xvdtest: fill ok: %s bytes=%" PRIu64 " seed=%" PRIu64 "\n", file, bytes, seed);
  return 0;
}

static int cmd_check(const char *file, uint64_t bytes, uint64_t seed) {
  int fd = open(file, O_RDONLY);
  if (fd < 0) die("open", file);
  uint64_t size = device_size(fd, file);
  if (size != bytes) {
    printf("xvdtest: check FAILED: %s is %" PRIu64 " bytes, expected %" PRIu64 "\n", file, size,
           bytes);
    return 1;
  }
  uint8_t *io = alloc_io(), *want = alloc_io();
  for (uint64_t at = 0; at < bytes; at += MIB) {
    uint64_t n = bytes - at < MIB ? bytes - at : MIB;
    pread_all(fd, io, n, at, file);
    fill(want, at, n, seed);
    if (memcmp(io, want, n) == 0) continue;
    for (uint64_t k = 0; k < n; k++) {
      if (io[k] != want[k]) {
        printf("xvdtest: check FAILED: %s at offset %" PRIu64 ": got 0x%02x expected 0x%02x\n",
               file, at + k, io[k], want[k]);
        return 1;
      }
    }
  }
  close(fd);
  printf("xvdtest: check ok: %s bytes=%" PRIu64 " seed=%" PRIu64 "\n", file, bytes, seed);
  return 0;
}

static int cmd_plan(uint64_t size) {
  build_plan(size);
  for (int i = 0; i < nplan; i++)
    printf("%s %" PRIu64 " %" PRIu64 " buf+%u %s\n", plan[i].kind == DIRECT ? "direct" : "buffered",
           plan[i].off, plan[i].len, plan[i].misalign, plan[i].what);
  for (int i = 0; i < nzeros; i++) printf("zero %" PRIu64 " %" PRIu64 "\n", zeros[i].off, zeros[i].len);
  return 0;
}

static void usage(void) {
  fprintf(stderr,
          "usage: xvdtest write|verify|busy DEV [--seed N] [--no-zero]\n"
          "       xvdtest fill|check FILE BYTES [--seed N]\n"
          "       xvdtest plan [SIZE]\n");
  exit(2);
}

int main(int argc, char **argv) {
  setvbuf(stdout, NULL, _IOLBF, 0);
  const char *pos[3] = {0};
  int npos = 0, check_zeros = 1;
  uint64_t seed = 1;
  for (int i = 1; i < argc; i++) {
    if (strcmp(argv[i], "--seed") == 0 && i + 1 < argc)
      seed = parse_u64(argv[++i], "seed");
    else if (strcmp(argv[i], "--no-zero") == 0)
      check_zeros = 0;
    else if (npos < 3)
      pos[npos++] = argv[i];
    else
      usage();
  }
  if (npos < 1) usage();
  prog_mode = pos[0];
  if (strcmp(pos[0], "plan") == 0) return cmd_plan(npos > 1 ? parse_u64(pos[1], "size") : MIN_SIZE);
  if (npos < 2) usage();
  if (strcmp(pos[0], "write") == 0 && npos == 2) return cmd_write(pos[1], seed);
  if (strcmp(pos[0], "verify") == 0 && npos == 2) return cmd_verify(pos[1], seed, check_zeros);
  if (strcmp(pos[0], "busy") == 0 && npos == 2) cmd_busy(pos[1], seed);
  if (strcmp(pos[0], "fill") == 0 && npos == 3)
    return cmd_fill(pos[1], parse_u64(pos[2], "size"), seed);
  if (strcmp(pos[0], "check") == 0 && npos == 3)
    return cmd_check(pos[1], parse_u64(pos[2], "size"), seed);
  usage();
  return 2;
}
