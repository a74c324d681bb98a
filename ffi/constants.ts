/** Linux x86-64 constants for the calls declared in ffi/. Values from the kernel's UAPI headers. */

export const O_RDONLY = 0;
export const O_WRONLY = 1;
export const O_RDWR = 2;
export const O_CREAT = 0o100;
export const O_EXCL = 0o200;
export const O_TRUNC = 0o1000;
export const O_DIRECT = 0o40000;
export const O_CLOEXEC = 0o2000000;

// fcntl(2) open file description locks (struct flock: l_type i16, l_whence i16, l_start i64 at 8,
// l_len i64 at 16, l_pid i32 at 24; 32 bytes).
export const F_OFD_GETLK = 36;
export const F_OFD_SETLK = 37;
export const F_RDLCK = 0;
export const F_WRLCK = 1;
export const F_UNLCK = 2;
export const FLOCK_SIZE = 32;

export const S_IFMT = 0o170000;
export const S_IFREG = 0o100000;
export const S_IFBLK = 0o060000;

export const SEEK_SET = 0;
export const SEEK_DATA = 3;
export const SEEK_HOLE = 4;

export const FALLOC_FL_KEEP_SIZE = 0x01;
export const FALLOC_FL_PUNCH_HOLE = 0x02;
export const FALLOC_FL_ZERO_RANGE = 0x10;

export const LOCK_SH = 1;
export const LOCK_EX = 2;
export const LOCK_NB = 4;
export const LOCK_UN = 8;

export const PROT_READ = 1;
export const PROT_WRITE = 2;
export const MAP_SHARED = 0x01;
export const MAP_PRIVATE = 0x02;
export const MAP_ANONYMOUS = 0x20;
export const MAP_POPULATE = 0x8000;

export const MADV_HUGEPAGE = 14;

export const MFD_CLOEXEC = 1;
export const EFD_CLOEXEC = 0o2000000;
export const EFD_NONBLOCK = 0o4000;

// epoll (sys/epoll.h).
export const EPOLL_CLOEXEC = 0o2000000;
export const EPOLL_CTL_ADD = 1;
export const EPOLLIN = 0x1;
/** Of the epoll instances waiting on one file with this flag, an event wakes one. */
export const EPOLLEXCLUSIVE = 1 << 28;

// Block device ioctls (linux/fs.h): _IO(0x12, n) and _IOR(0x12, n, size_t).
export const BLKSSZGET = 0x1268n;
export const BLKDISCARD = 0x1277n;
export const BLKZEROOUT = 0x127fn;
export const BLKPBSZGET = 0x127bn;
export const BLKGETSIZE64 = 0x80081272n;

export const ENOENT = 2;
export const EACCES = 13;
export const EINTR = 4;
export const EIO = 5;
export const EAGAIN = 11;
export const EINVAL = 22;
export const ENOSPC = 28;
export const EROFS = 30;
export const ENXIO = 6;
export const EOPNOTSUPP = 95;
