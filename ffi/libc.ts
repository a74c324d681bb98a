/**
 * Every libc symbol tapd uses, declared once. Variadic functions (open, ioctl) are declared with
 * exactly the integer/pointer arguments passed (sound on x86-64 System V; see
 * shared/specs/deno-ffi.md §1.8). Names ending in `_nb` are `nonblocking` twins of the same C
 * function: they run on Deno's blocking pool and cannot report errno (use `pooled()`).
 */

const symbols = {
  __errno_location: { parameters: [], result: "pointer" },
  strerror: { parameters: ["i32"], result: "pointer" }, // int errnum

  open: {
    parameters: [
      "buffer", // const char *pathname
      "i32", // int flags
      "u32", // mode_t mode
    ],
    result: "i32",
  },
  close: { parameters: ["i32"], result: "i32" },
  dup: { parameters: ["i32"], result: "i32" },
  fstat: {
    parameters: [
      "i32", // int fd
      "buffer", // struct stat *statbuf (144 bytes)
    ],
    result: "i32",
  },
  pread: {
    parameters: [
      "i32", // int fd
      "buffer", // void *buf
      "usize", // size_t count
      "i64", // off_t offset
    ],
    result: "isize",
  },
  pwrite: { parameters: ["i32", "buffer", "usize", "i64"], result: "isize" },
  pread_nb: {
    name: "pread",
    parameters: ["i32", "buffer", "usize", "i64"],
    result: "isize",
    nonblocking: true,
  },
  pwrite_nb: {
    name: "pwrite",
    parameters: ["i32", "buffer", "usize", "i64"],
    result: "isize",
    nonblocking: true,
  },
  preadv_nb: {
    name: "preadv",
    parameters: [
      "i32", // int fd
      "buffer", // const struct iovec *iov
      "i32", // int iovcnt
      "i64", // off_t offset
    ],
    result: "isize",
    nonblocking: true,
  },
  pwritev_nb: {
    name: "pwritev",
    parameters: ["i32", "buffer", "i32", "i64"],
    result: "isize",
    nonblocking: true,
  },
  read: { parameters: ["i32", "buffer", "usize"], result: "isize" },
  read_nb: {
    name: "read",
    parameters: ["i32", "buffer", "usize"],
    result: "isize",
    nonblocking: true,
  },
  write: { parameters: ["i32", "buffer", "usize"], result: "isize" },
  writev: { parameters: ["i32", "buffer", "i32"], result: "isize" },
  fsync: { parameters: ["i32"], result: "i32" },
  fsync_nb: { name: "fsync", parameters: ["i32"], result: "i32", nonblocking: true },
  fdatasync: { parameters: ["i32"], result: "i32" },
  fdatasync_nb: { name: "fdatasync", parameters: ["i32"], result: "i32", nonblocking: true },
  fallocate: {
    parameters: [
      "i32", // int fd
      "i32", // int mode
      "i64", // off_t offset
      "i64", // off_t len
    ],
    result: "i32",
  },
  fallocate_nb: {
    name: "fallocate",
    parameters: ["i32", "i32", "i64", "i64"],
    result: "i32",
    nonblocking: true,
  },
  ftruncate: { parameters: ["i32", "i64"], result: "i32" },
  lseek: {
    parameters: [
      "i32", // int fd
      "i64", // off_t offset
      "i32", // int whence
    ],
    result: "i64",
  },
  lseek_nb: { name: "lseek", parameters: ["i32", "i64", "i32"], result: "i64", nonblocking: true },
  ioctl: {
    parameters: [
      "i32", // int fd
      "u64", // unsigned long request
      "buffer", // void *argp
    ],
    result: "i32",
  },
  ioctl_value: {
    name: "ioctl",
    parameters: ["i32", "u64", "u64"], // int fd, unsigned long request, unsigned long arg
    result: "i32",
  },
  ioctl_nb: {
    name: "ioctl",
    parameters: ["i32", "u64", "buffer"],
    result: "i32",
    nonblocking: true,
  },
  flock: { parameters: ["i32", "i32"], result: "i32" },
  /** fcntl(2) with a struct flock (F_OFD_SETLK, F_OFD_GETLK: never blocks). */
  fcntl_lock: { name: "fcntl", parameters: ["i32", "i32", "buffer"], result: "i32" },
  flock_nb: { name: "flock", parameters: ["i32", "i32"], result: "i32", nonblocking: true },

  sched_setaffinity: {
    parameters: [
      "i32", // pid_t pid (0: the calling thread)
      "usize", // size_t cpusetsize
      "buffer", // const cpu_set_t *mask
    ],
    result: "i32",
  },

  socket: {
    parameters: [
      "i32", // int domain
      "i32", // int type
      "i32", // int protocol
    ],
    result: "i32",
  },
  bind: {
    parameters: [
      "i32", // int sockfd
      "buffer", // const struct sockaddr *addr
      "u32", // socklen_t addrlen
    ],
    result: "i32",
  },
  connect: { parameters: ["i32", "buffer", "u32"], result: "i32" },
  listen: { parameters: ["i32", "i32"], result: "i32" }, // int sockfd, int backlog
  accept4_nb: {
    name: "accept4",
    parameters: [
      "i32", // int sockfd
      "pointer", // struct sockaddr *addr (NULL)
      "pointer", // socklen_t *addrlen (NULL)
      "i32", // int flags
    ],
    result: "i32",
    nonblocking: true,
  },
  shutdown: { parameters: ["i32", "i32"], result: "i32" }, // int sockfd, int how
  getsockopt: {
    parameters: [
      "i32", // int sockfd
      "i32", // int level
      "i32", // int optname
      "buffer", // void *optval
      "buffer", // socklen_t *optlen
    ],
    result: "i32",
  },
  send: {
    parameters: [
      "i32", // int sockfd
      "buffer", // const void *buf
      "usize", // size_t len
      "i32", // int flags
    ],
    result: "isize",
  },
  send_nb: {
    name: "send",
    parameters: ["i32", "buffer", "usize", "i32"],
    result: "isize",
    nonblocking: true,
  },
  sendmsg: {
    parameters: [
      "i32", // int sockfd
      "buffer", // const struct msghdr *msg
      "i32", // int flags
    ],
    result: "isize",
  },
  recvmsg: {
    parameters: [
      "i32", // int sockfd
      "buffer", // struct msghdr *msg
      "i32", // int flags
    ],
    result: "isize",
  },

  // Used only as a full memory barrier: on x86-64 it is one `lock cmpxchg` (see memory.ts).
  pthread_spin_trylock: { parameters: ["buffer"], result: "i32" }, // pthread_spinlock_t *lock

  posix_memalign: {
    parameters: [
      "buffer", // void **memptr
      "usize", // size_t alignment
      "usize", // size_t size
    ],
    result: "i32", // returns the error number; errno is not set
  },
  free: { parameters: ["pointer"], result: "void" },
  mmap: {
    parameters: [
      "pointer", // void *addr
      "usize", // size_t length
      "i32", // int prot
      "i32", // int flags
      "i32", // int fd
      "i64", // off_t offset
    ],
    result: "pointer",
  },
  munmap: { parameters: ["pointer", "usize"], result: "i32" },
  madvise: {
    parameters: [
      "pointer", // void *addr
      "usize", // size_t length
      "i32", // int advice
    ],
    result: "i32",
  },
  memfd_create: {
    parameters: [
      "buffer", // const char *name
      "u32", // unsigned int flags
    ],
    result: "i32",
  },
  eventfd: {
    parameters: [
      "u32", // unsigned int initval
      "i32", // int flags
    ],
    result: "i32",
  },
  epoll_create1: { parameters: ["i32"], result: "i32" },
  epoll_ctl: {
    parameters: [
      "i32", // int epfd
      "i32", // int op
      "i32", // int fd
      "buffer", // struct epoll_event *event (packed: u32 events, u64 data)
    ],
    result: "i32",
  },
  /** Blocks its thread: only for Workers (fuse/io_thread.ts), never the event loop. */
  epoll_wait: {
    parameters: [
      "i32", // int epfd
      "buffer", // struct epoll_event *events
      "i32", // int maxevents
      "i32", // int timeout (ms)
    ],
    result: "i32",
  },
  shm_open: {
    parameters: [
      "buffer", // const char *name
      "i32", // int oflag
      "u32", // mode_t mode
    ],
    result: "i32",
  },
  shm_unlink: { parameters: ["buffer"], result: "i32" },

  // The FUSE export (fuse/): mounting, unmounting, waiting on /dev/fuse, PR_SET_IO_FLUSHER.
  mount: {
    parameters: [
      "buffer", // const char *source
      "buffer", // const char *target
      "buffer", // const char *filesystemtype
      "u64", // unsigned long mountflags
      "buffer", // const void *data
    ],
    result: "i32",
  },
  umount2: {
    parameters: [
      "buffer", // const char *target
      "i32", // int flags
    ],
    result: "i32",
  },
  umount2_nb: { name: "umount2", parameters: ["buffer", "i32"], result: "i32", nonblocking: true },
  /** Blocks its thread: only for Workers (fuse/io_thread.ts), never the event loop. */
  poll: { parameters: ["buffer", "u64", "i32"], result: "i32" },
  poll_nb: {
    name: "poll",
    parameters: [
      "buffer", // struct pollfd *fds
      "u64", // nfds_t nfds
      "i32", // int timeout (ms)
    ],
    result: "i32",
    nonblocking: true,
  },
  prctl: {
    parameters: [
      "i32", // int option
      "u64", // unsigned long arg2
      "u64", // unsigned long arg3
      "u64", // unsigned long arg4
      "u64", // unsigned long arg5
    ],
    result: "i32",
  },
} as const satisfies Deno.ForeignLibraryInterface;

/** The C library's symbols, loaded once for the process. */
export const libc: Deno.StaticForeignLibraryInterface<typeof symbols> =
  Deno.dlopen("libc.so.6", symbols).symbols;

const encoder = new TextEncoder();

/** A NUL-terminated copy of a string for `const char *` arguments. */
export function cString(s: string): Uint8Array<ArrayBuffer> {
  const bytes = new Uint8Array(s.length * 3 + 1);
  const { written } = encoder.encodeInto(s, bytes);
  return bytes.subarray(0, written + 1);
}
