/*
 * A blkif test frontend for `tapd tapdisk SPEC --ring unix:PATH` (see docs/ring.md).
 *
 * It speaks the ring through Xen's own public headers (xen/io/ring.h, xen/io/blkif.h): the ring
 * types come from DEFINE_RING_TYPES in blkif.h, and every index update, notification decision and
 * final check goes through the header's macros, so it is an independent check of tapd's ring code.
 * It speaks version 2 of the attach protocol: a ring of any size up to 256 entries, and INDIRECT
 * requests (struct blkif_request_indirect, descriptors in data pages) when tapdisk offers them.
 *
 * Usage:
 *   frontend layout
 *   frontend SOCKET verify REF OPS SEED [SHADOW|- [START END]]
 *   frontend SOCKET malformed [SEED]
 *   frontend SOCKET vanish REF [COUNT]
 *   frontend SOCKET readonly
 *   frontend SOCKET load rand4k|seq1m QD SECONDS [SPIN_US]
 *
 * Success prints `ok N` (N = responses checked) and exits 0; a failure prints one line saying why
 * and exits 1. Statistics go to stderr.
 *
 * Build: gcc -O2 -Wall -Werror -o frontend frontend.c (needs libxen-dev's headers).
 */
#define _GNU_SOURCE

/*
 * ring.h maps xen_mb/xen_rmb/xen_wmb to the kernel's mb()/rmb()/wmb() for guests that ask for an
 * interface older than 0x00030208 (the default); from then on the includer provides them. Xen's
 * own tools get the current interface with __XEN_TOOLS__, and so do we.
 */
#define __XEN_TOOLS__ 1

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

/* The other side is another process on this host: full hardware barriers all round. */
#define xen_mb() __sync_synchronize()
#define xen_rmb() __sync_synchronize()
#define xen_wmb() __sync_synchronize()

#include <xen/io/blkif.h>

#define SECTOR 512
#define SECTORS_PER_PAGE 8
#define PAGE_BYTES 4096
#define MAX_SEGS BLKIF_MAX_SEGMENTS_PER_REQUEST
/* Segment descriptors in one indirect page: 512. */
#define DESCS_PER_PAGE (PAGE_BYTES / sizeof(struct blkif_request_segment))
/* The most descriptors one INDIRECT request can name (8 pages of 512). */
#define MAX_INDIRECT_NAMEABLE (BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST * DESCS_PER_PAGE)
#define IND_SEGS_MAX 128       /* verify: most segments in one INDIRECT request */
#define REQ_SEGS 512           /* segments a tracked request can describe (one descriptor page) */
#define WAIT_MS 15000          /* longest wait for one notification */
#define POISON 0xA5            /* read pages are filled with this before the request */
#define JUNK 0xEE              /* write pages outside first_sect..last_sect */
/* "tapdring": the first 8 bytes of a written sector hold sector ^ STAMP */
#define STAMP UINT64_C(0x676e697264706174)

_Static_assert(DESCS_PER_PAGE == 512, "8-byte segment descriptors");
_Static_assert(sizeof(struct blkif_request_indirect) <= sizeof(union blkif_sring_entry),
               "an indirect request fits a ring slot");
_Static_assert(IND_SEGS_MAX > MAX_SEGS && IND_SEGS_MAX <= REQ_SEGS, "segment limits");

/* ---------------------------------------------------------------- errors */

static void die(const char *fmt, ...) __attribute__((noreturn, format(printf, 1, 2)));

static void die(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    putchar('\n');
    fflush(stdout);
    exit(1);
}

static uint64_t parse_u64(const char *s, const char *what)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 0);
    if (errno || end == s || *end)
        die("bad %s: %s", what, s);
    return v;
}

/* ---------------------------------------------------------------- random numbers */

static uint64_t rng_state = 0x9e3779b97f4a7c15ULL;

static uint64_t rnd(void)
{
    uint64_t x = rng_state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    rng_state = x;
    return x * 0x2545f4914f6cdd1dULL;
}

static uint32_t below(uint32_t n)
{
    return (uint32_t)((rnd() >> 32) % n);
}

static void seed_rng(uint64_t seed)
{
    rng_state = seed * 0x9e3779b97f4a7c15ULL + 0x632be59bd9b4e019ULL;
    if (!rng_state)
        rng_state = 1;
    for (int i = 0; i < 8; i++)
        rnd();
}

/*
 * The content a frontend writes: sector number and generation in the first 16 bytes (so a wrong
 * read can say what it got), then bytes that depend on both.
 */
static void pattern(uint8_t *p, uint64_t sector, uint64_t gen)
{
    uint64_t h[2] = { sector ^ STAMP, gen };
    memcpy(p, h, sizeof h);
    uint64_t x = (sector * 0xff51afd7ed558ccdULL) ^ (gen * 0xc4ceb9fe1a85ec53ULL) ^ 0x5bd1e995ULL;
    for (int i = 16; i < SECTOR; i += 8) {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        uint64_t v = x * 0x2545f4914f6cdd1dULL;
        memcpy(p + i, &v, 8);
    }
}

static void describe(const uint8_t *p, char *out, size_t n)
{
    uint64_t h[2];
    memcpy(h, p, sizeof h);
    int all_poison = 1;
    for (int i = 0; i < SECTOR; i++)
        all_poison &= p[i] == POISON;
    if (all_poison)
        snprintf(out, n, "the poison the page was filled with (nothing was copied in)");
    else if ((h[0] ^ STAMP) >> 48 == 0)
        snprintf(out, n, "data written for sector %" PRIu64 " (generation %" PRIu64 ")",
                 h[0] ^ STAMP, h[1]);
    else
        snprintf(out, n, "data not written by a frontend (first bytes %016" PRIx64 ")", h[0]);
}

/* ---------------------------------------------------------------- the attached ring */

static struct {
    int sock, mem, kick, notify;
    uint32_t ring_pages, data_pages, page_size, sector_size, flags, max_segments, max_indirect;
    uint32_t slot_stride;      /* data pages of each tracking slot (slot_pages) */
    uint64_t sectors;
    uint8_t *map;
    size_t map_len;
    blkif_front_ring_t fr;
    uint64_t kicks, waits, notifications;
} R;

#define FLAG_RO 1u
#define FLAG_FLUSH 2u
#define FLAG_DISCARD 4u

static uint32_t le32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t le64(const uint8_t *p)
{
    return (uint64_t)le32(p) | (uint64_t)le32(p + 4) << 32;
}

static uint8_t *page(uint32_t p)
{
    return R.map + ((size_t)R.ring_pages + p) * R.page_size;
}

static void attach(const char *path)
{
    struct sockaddr_un sa = { .sun_family = AF_UNIX };
    if (strlen(path) >= sizeof sa.sun_path)
        die("socket path too long: %s", path);
    strcpy(sa.sun_path, path);
    R.sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (R.sock < 0)
        die("socket: %s", strerror(errno));
    if (connect(R.sock, (struct sockaddr *)&sa, sizeof sa) < 0)
        die("connect %s: %s", path, strerror(errno));

    uint8_t msg[64];
    size_t got = 0;
    int fds[3], nfds = 0;
    while (got < sizeof msg) {
        union {
            struct cmsghdr h;
            char buf[CMSG_SPACE(sizeof(int) * 3)];
        } ctl;
        struct iovec iov = { .iov_base = msg + got, .iov_len = sizeof msg - got };
        struct msghdr mh = {
            .msg_iov = &iov,
            .msg_iovlen = 1,
            .msg_control = ctl.buf,
            .msg_controllen = sizeof ctl.buf,
        };
        ssize_t n = recvmsg(R.sock, &mh, MSG_CMSG_CLOEXEC);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            die("recvmsg: %s", strerror(errno));
        if (n == 0)
            die("tapdisk closed the connection after %zu of the 64 bytes of the attach message",
                got);
        if (mh.msg_flags & MSG_CTRUNC)
            die("attach message: control data truncated (more than 3 descriptors?)");
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c)) {
            if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
                die("attach message: unexpected control message level %d type %d",
                    c->cmsg_level, c->cmsg_type);
            size_t k = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
            if (nfds + k > 3)
                die("attach message: more than 3 descriptors");
            memcpy(fds + nfds, CMSG_DATA(c), k * sizeof(int));
            nfds += (int)k;
        }
        got += (size_t)n;
    }
    if (nfds != 3)
        die("attach message came with %d descriptors, expected 3 (memfd, kick, notify)", nfds);
    R.mem = fds[0];
    R.kick = fds[1];
    R.notify = fds[2];

    if (memcmp(msg, "TAPDRING", 8))
        die("bad attach magic %.8s", (const char *)msg);
    uint32_t version = le32(msg + 8);
    if (version != 2)
        die("attach version %u: this frontend speaks version 2 of the attach protocol only",
            version);
    R.ring_pages = le32(msg + 12);
    R.data_pages = le32(msg + 16);
    R.page_size = le32(msg + 20);
    R.sectors = le64(msg + 24);
    R.sector_size = le32(msg + 32);
    R.flags = le32(msg + 36);
    R.max_segments = le32(msg + 40);
    R.max_indirect = le32(msg + 44);
    for (int i = 48; i < 64; i++)
        if (msg[i])
            die("attach message: reserved byte %d is %u, expected 0", i, msg[i]);
    if (R.page_size != PAGE_BYTES)
        die("page_size %u, expected %d", R.page_size, PAGE_BYTES);
    /* A first bound before mapping; the ring's real limit is checked after FRONT_RING_INIT. */
    if (R.ring_pages == 0 || R.ring_pages > 64)
        die("ring_pages %u, expected 1..64", R.ring_pages);
    if (R.max_segments != MAX_SEGS)
        die("max_segments %u, expected %d", R.max_segments, MAX_SEGS);
    if (R.max_indirect > MAX_INDIRECT_NAMEABLE)
        die("max_indirect %u: more segments than the %zu that %d indirect pages can describe",
            R.max_indirect, (size_t)MAX_INDIRECT_NAMEABLE, BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST);
    if (R.sectors == 0)
        die("the disk has 0 sectors");
    if (R.sector_size < SECTOR || R.sector_size > 4096 || (R.sector_size & (R.sector_size - 1)))
        die("odd sector_size %u", R.sector_size);

    R.map_len = ((size_t)R.ring_pages + R.data_pages) * R.page_size;
    struct stat st;
    if (fstat(R.mem, &st) < 0)
        die("fstat memfd: %s", strerror(errno));
    if ((size_t)st.st_size < R.map_len)
        die("memfd is %lld bytes, expected at least %zu", (long long)st.st_size, R.map_len);
    R.map = mmap(NULL, R.map_len, PROT_READ | PROT_WRITE, MAP_SHARED, R.mem, 0);
    if (R.map == MAP_FAILED)
        die("mmap memfd: %s", strerror(errno));

    blkif_sring_t *s = (blkif_sring_t *)R.map;
    if (s->req_prod || s->rsp_prod || s->req_event != 1 || s->rsp_event != 1)
        die("shared ring not initialised: req_prod %u req_event %u rsp_prod %u rsp_event %u",
            s->req_prod, s->req_event, s->rsp_prod, s->rsp_event);
    FRONT_RING_INIT(&R.fr, s, (size_t)R.ring_pages * R.page_size);
    if (RING_SIZE(&R.fr) < 1 || RING_SIZE(&R.fr) > 256)
        die("a ring of %u pages has %u entries: this frontend handles 1..256", R.ring_pages,
            RING_SIZE(&R.fr));
    /* Each tracking slot gets its own pages: 11 for a direct request and one for descriptors. */
    R.slot_stride = R.data_pages / RING_SIZE(&R.fr);
    if (R.slot_stride < MAX_SEGS + 1)
        die("data_pages %u: this frontend needs at least %u (%d for each of the %u ring entries)",
            R.data_pages, (MAX_SEGS + 1) * RING_SIZE(&R.fr), MAX_SEGS + 1, RING_SIZE(&R.fr));
}

static void kick(void)
{
    uint64_t one = 1;
    ssize_t n = write(R.kick, &one, sizeof one);
    if (n != sizeof one && !(n < 0 && errno == EAGAIN))
        die("write to the kick eventfd: %s", n < 0 ? strerror(errno) : "short write");
    R.kicks++;
}

static void push(void)
{
    int notify;
    RING_PUSH_REQUESTS_AND_CHECK_NOTIFY(&R.fr, notify);
    if (notify)
        kick();
}

static unsigned inflight(void)
{
    return R.fr.req_prod_pvt - R.fr.rsp_cons;
}

/* Sleeps until tapdisk notifies (or fails after WAIT_MS, or when tapdisk goes away). */
static void wait_notify(void)
{
    struct pollfd p[2] = {
        { .fd = R.notify, .events = POLLIN },
        { .fd = R.sock, .events = POLLIN },
    };
    int n = poll(p, 2, WAIT_MS);
    if (n < 0 && errno == EINTR)
        return;
    if (n < 0)
        die("poll: %s", strerror(errno));
    blkif_sring_t *s = R.fr.sring;
    if (n == 0)
        die("no notification from tapdisk in %d s with %u requests in flight "
            "(req_prod %u req_event %u rsp_prod %u rsp_event %u rsp_cons %u)",
            WAIT_MS / 1000, inflight(), s->req_prod, s->req_event, s->rsp_prod, s->rsp_event,
            R.fr.rsp_cons);
    if (p[1].revents) {
        char c;
        ssize_t k = recv(R.sock, &c, 1, MSG_PEEK | MSG_DONTWAIT);
        if (k > 0)
            die("unexpected data from tapdisk on the socket");
        if (k == 0 || (p[1].revents & (POLLHUP | POLLERR)))
            die("tapdisk closed the connection with %u requests in flight", inflight());
    }
    if (p[0].revents & POLLIN) {
        uint64_t v;
        ssize_t k = read(R.notify, &v, sizeof v);
        if (k < 0 && errno != EAGAIN && errno != EINTR)
            die("read from the notify eventfd: %s", strerror(errno));
        if (k == sizeof v)
            R.notifications += v;
    }
    R.waits++;
}

/* Takes the next response if there is one. */
static int get_response(blkif_response_t *out)
{
    if (!RING_HAS_UNCONSUMED_RESPONSES(&R.fr))
        return 0;
    xen_rmb(); /* the response after the index that published it */
    RING_IDX rp = R.fr.sring->rsp_prod;
    if (RING_RESPONSE_PROD_OVERFLOW(&R.fr, rp) ||
        (RING_IDX)(rp - R.fr.rsp_cons) > (RING_IDX)(R.fr.req_prod_pvt - R.fr.rsp_cons))
        die("tapdisk published rsp_prod %u with rsp_cons %u and req_prod %u: "
            "more responses than requests",
            rp, R.fr.rsp_cons, R.fr.req_prod_pvt);
    RING_COPY_RESPONSE(&R.fr, R.fr.rsp_cons, out);
    R.fr.rsp_cons++;
    return 1;
}

/* Waits for the next response. */
static void next_response(blkif_response_t *out)
{
    for (;;) {
        if (get_response(out))
            return;
        int more;
        RING_FINAL_CHECK_FOR_RESPONSES(&R.fr, more);
        if (!more)
            wait_notify();
    }
}

/* ---------------------------------------------------------------- requests in flight */

enum check { CHK_NONE, CHK_SHADOW, CHK_PATTERN, CHK_COPY };

#define X_OK 1
#define X_ERR 2
#define X_NOTSUPP 4

struct req {
    int used;
    uint64_t id;
    uint8_t op;                /* for an INDIRECT request its indirect_op */
    uint8_t indirect;          /* sent as BLKIF_OP_INDIRECT, descriptors in ind_page[] */
    uint16_t nseg;             /* segments actually described (≤ 11 direct, ≤ REQ_SEGS indirect) */
    uint8_t nind;              /* indirect descriptor pages */
    uint64_t sector;
    uint32_t nsect;
    uint32_t page[REQ_SEGS];
    uint8_t first[REQ_SEGS], last[REQ_SEGS];
    uint32_t ind_page[BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST];
    int expect;                /* X_* set of acceptable statuses */
    int expect_op;             /* operation the response must carry, -1: op */
    const char *what;
    enum check check;
    uint64_t gen;              /* CHK_PATTERN: generation; writes: generation written */
    uint8_t *buf;              /* CHK_COPY / writes from a buffer */
};

static struct req tr[256];
static uint64_t next_seq = 1;
static uint8_t *shadow;        /* verify: the disk as it must be */
static uint64_t checked;       /* responses checked */

static struct req *new_req(uint8_t op, const char *what)
{
    for (unsigned i = 0; i < RING_SIZE(&R.fr); i++) {
        if (tr[i].used)
            continue;
        struct req *q = &tr[i];
        memset(q, 0, sizeof *q);
        q->used = 1;
        q->id = 0x8000000000000000ULL | (next_seq++ << 16) | i; /* all 64 bits must come back */
        q->op = op;
        q->expect = X_OK;
        q->expect_op = -1;
        q->what = what;
        return q;
    }
    die("internal: no free tracking entry with %u in flight", inflight());
}

static struct req *find_req(const blkif_response_t *r)
{
    unsigned i = (unsigned)(r->id & 0xffff);
    if (i >= RING_SIZE(&R.fr) || !tr[i].used || tr[i].id != r->id)
        die("response with unknown id 0x%016" PRIx64 " (operation %u, status %d)", r->id,
            r->operation, r->status);
    return &tr[i];
}

/* Page k (< R.slot_stride) of the pages that belong to q's tracking slot i: i × stride + k. */
static uint32_t slot_page(const struct req *q, uint32_t k)
{
    return (uint32_t)(q->id & 0xffff) * R.slot_stride + k;
}

/* Sets up direct segments on the first 11 pages of q's tracking slot. */
static void slot_pages(struct req *q)
{
    for (int s = 0; s < MAX_SEGS; s++)
        q->page[s] = slot_page(q, (uint32_t)s);
}

/* Whole-page segments covering nsect sectors (≤ 8 × the pages q has) from q->sector. */
static void whole_pages(struct req *q, uint32_t nsect)
{
    q->nsect = nsect;
    q->nseg = (uint16_t)((nsect + SECTORS_PER_PAGE - 1) / SECTORS_PER_PAGE);
    for (int s = 0; s < q->nseg; s++) {
        uint32_t left = nsect - (uint32_t)s * SECTORS_PER_PAGE;
        q->first[s] = 0;
        q->last[s] = (uint8_t)((left < SECTORS_PER_PAGE ? left : SECTORS_PER_PAGE) - 1);
    }
}

/*
 * Makes q an INDIRECT request of nseg whole-page segments on the first pages of its tracking slot,
 * its descriptors in the slot's last page (nseg < R.slot_stride).
 */
static void slot_indirect(struct req *q, uint32_t nseg)
{
    for (uint32_t s = 0; s < nseg; s++)
        q->page[s] = slot_page(q, s);
    whole_pages(q, nseg * SECTORS_PER_PAGE);
    q->indirect = 1;
    q->nind = 1;
    q->ind_page[0] = slot_page(q, R.slot_stride - 1);
}

/* Fills the pages of a write: its sectors from the shadow source, the rest with junk. */
static void fill_write(struct req *q)
{
    uint64_t sector = q->sector;
    for (int s = 0; s < q->nseg; s++) {
        uint8_t *p = page(q->page[s]);
        memset(p, JUNK, R.page_size);
        for (int k = q->first[s]; k <= q->last[s]; k++, sector++) {
            if (q->buf)
                memcpy(p + k * SECTOR, q->buf + (sector - q->sector) * SECTOR, SECTOR);
            else
                pattern(p + k * SECTOR, sector, q->gen);
        }
    }
}

static void poison(struct req *q)
{
    for (int s = 0; s < q->nseg; s++)
        memset(page(q->page[s]), POISON, R.page_size);
}

/* Writes segment descriptor j of an indirect request into its descriptor pages. */
static void put_descriptor(const uint32_t *ind_page, unsigned j, uint32_t gref, uint8_t first,
                           uint8_t last)
{
    struct blkif_request_segment d;
    memset(&d, 0, sizeof d);
    d.gref = gref;
    d.first_sect = first;
    d.last_sect = last;
    memcpy(page(ind_page[j / DESCS_PER_PAGE]) + (j % DESCS_PER_PAGE) * sizeof d, &d, sizeof d);
}

/* Reads back the INDIRECT request in ring slot r (through Xen's struct, not offsets). */
static struct blkif_request_indirect get_indirect(const blkif_request_t *r)
{
    struct blkif_request_indirect ind;
    memcpy(&ind, r, sizeof ind);
    return ind;
}

static void set_indirect(blkif_request_t *r, const struct blkif_request_indirect *ind)
{
    memset(r, 0, sizeof *r);
    memcpy(r, ind, sizeof *ind);
}

/*
 * Puts q into the next request slot (not yet visible to tapdisk: see push()). An indirect q gets
 * its descriptors written into its descriptor pages (junk after the last one) and the slot a
 * struct blkif_request_indirect.
 */
static blkif_request_t *place(struct req *q)
{
    blkif_request_t *r = RING_GET_REQUEST(&R.fr, R.fr.req_prod_pvt);
    if (q->indirect) {
        for (int i = 0; i < q->nind; i++)
            memset(page(q->ind_page[i]), JUNK, R.page_size);
        for (unsigned j = 0; j < q->nseg; j++)
            put_descriptor(q->ind_page, j, q->page[j], q->first[j], q->last[j]);
        struct blkif_request_indirect ind;
        memset(&ind, 0, sizeof ind);
        ind.operation = BLKIF_OP_INDIRECT;
        ind.indirect_op = q->op;
        ind.nr_segments = q->nseg;
        ind.id = q->id;
        ind.sector_number = q->sector;
        ind.handle = 0;
        for (int i = 0; i < q->nind; i++)
            ind.indirect_grefs[i] = q->ind_page[i];
        set_indirect(r, &ind);
        R.fr.req_prod_pvt++;
        return r;
    }
    memset(r, 0, sizeof *r);
    r->operation = q->op;
    r->nr_segments = (uint8_t)q->nseg;
    r->handle = 0;
    r->id = q->id;
    r->sector_number = q->sector;
    for (int s = 0; s < q->nseg && s < MAX_SEGS; s++) {
        r->seg[s].gref = q->page[s];
        r->seg[s].first_sect = q->first[s];
        r->seg[s].last_sect = q->last[s];
    }
    R.fr.req_prod_pvt++;
    return r;
}

static const char *op_name(int op)
{
    switch (op) {
    case BLKIF_OP_READ: return "read";
    case BLKIF_OP_WRITE: return "write";
    case BLKIF_OP_WRITE_BARRIER: return "barrier";
    case BLKIF_OP_FLUSH_DISKCACHE: return "flush";
    case BLKIF_OP_DISCARD: return "discard";
    case BLKIF_OP_INDIRECT: return "indirect";
    default: return "op";
    }
}

/* Checks a successful read's pages: poison outside the sectors asked for, the data inside. */
static void check_read(struct req *q)
{
    uint64_t sector = q->sector;
    char got[160], want[160];
    for (int s = 0; s < q->nseg; s++) {
        uint8_t *p = page(q->page[s]);
        for (int k = 0; k < SECTORS_PER_PAGE; k++) {
            uint8_t *d = p + k * SECTOR;
            if (k < q->first[s] || k > q->last[s]) {
                for (int b = 0; b < SECTOR; b++)
                    if (d[b] != POISON)
                        die("%s id 0x%" PRIx64 " sector %" PRIu64 "+%u: tapdisk wrote page %u "
                            "sector %d outside first_sect %u..last_sect %u",
                            q->what, q->id, q->sector, q->nsect, q->page[s], k, q->first[s],
                            q->last[s]);
                continue;
            }
            uint8_t expect[SECTOR];
            const uint8_t *e = expect;
            switch (q->check) {
            case CHK_SHADOW: e = shadow + sector * SECTOR; break;
            case CHK_PATTERN: pattern(expect, sector, q->gen); break;
            case CHK_COPY: memcpy(q->buf + (sector - q->sector) * SECTOR, d, SECTOR); e = d; break;
            case CHK_NONE: e = d; break;
            }
            if (memcmp(d, e, SECTOR)) {
                int b = 0;
                while (d[b] == e[b])
                    b++;
                describe(d, got, sizeof got);
                describe(e, want, sizeof want);
                die("%s id 0x%" PRIx64 " of sector %" PRIu64 "+%u: sector %" PRIu64
                    " (segment %d, page %u, sector %d of the page) differs at byte %d: "
                    "got %s, expected %s",
                    q->what, q->id, q->sector, q->nsect, sector, s, q->page[s], k, b, got, want);
            }
            sector++;
        }
    }
}

/* Checks a response against its request; returns the request (still marked used). */
static struct req *complete(const blkif_response_t *r)
{
    struct req *q = find_req(r);
    /* The response to an INDIRECT request carries its indirect_op (q->op). */
    int want_op = q->expect_op == -1 ? q->op : q->expect_op;
    if (r->operation != want_op)
        die("%s id 0x%" PRIx64 ": response operation %u, expected %d", q->what, q->id,
            r->operation, want_op);
    int bit = r->status == BLKIF_RSP_OKAY ? X_OK
            : r->status == BLKIF_RSP_ERROR ? X_ERR
            : r->status == BLKIF_RSP_EOPNOTSUPP ? X_NOTSUPP : 0;
    if (!(bit & q->expect))
        die("%s (%s%s id 0x%" PRIx64 ", sector %" PRIu64 ", %u sectors, %u segments): "
            "status %d, expected %s",
            q->what, q->indirect ? "indirect " : "", op_name(q->op), q->id, q->sector, q->nsect,
            q->nseg, r->status,
            q->expect == X_OK ? "0 (okay)"
            : q->expect == X_ERR ? "-1 (error)"
            : q->expect == X_NOTSUPP ? "-2 (not supported)"
            : q->expect == (X_ERR | X_NOTSUPP) ? "-1 or -2" : "0 or -1 or -2");
    if (bit == X_OK && q->op == BLKIF_OP_READ && q->check != CHK_NONE)
        check_read(q);
    checked++;
    return q;
}

/* ---------------------------------------------------------------- layout */

#define SHOW(name, value) printf("%s %lld\n", name, (long long)(value))

static int layout(void)
{
    static union {
        blkif_sring_t s;
        uint8_t page[4096];
    } ring;
    blkif_sring_t *s = &ring.s;
    SHOW("REQUEST_SIZE", sizeof(struct blkif_request));
    SHOW("RESPONSE_SIZE", sizeof(struct blkif_response));
    SHOW("SEGMENT_SIZE", sizeof(struct blkif_request_segment));
    SHOW("DISCARD_SIZE", sizeof(struct blkif_request_discard));
    SHOW("INDIRECT_SIZE", sizeof(struct blkif_request_indirect));
    SHOW("ENTRY_SIZE", sizeof(union blkif_sring_entry));
    SHOW("RING_OFFSET", offsetof(struct blkif_sring, ring));
    SHOW("RING_SIZE", __RING_SIZE(s, 4096));
    SHOW("CONST_RING_SIZE", __CONST_RING_SIZE(blkif, 4096));
    SHOW("PAGE_SIZE", sizeof ring.page); /* the page __RING_SIZE was given */
    SHOW("OFF_SRING_REQ_PROD", offsetof(struct blkif_sring, req_prod));
    SHOW("OFF_SRING_REQ_EVENT", offsetof(struct blkif_sring, req_event));
    SHOW("OFF_SRING_RSP_PROD", offsetof(struct blkif_sring, rsp_prod));
    SHOW("OFF_SRING_RSP_EVENT", offsetof(struct blkif_sring, rsp_event));
    SHOW("OFF_REQ_OPERATION", offsetof(struct blkif_request, operation));
    SHOW("OFF_REQ_NR_SEGMENTS", offsetof(struct blkif_request, nr_segments));
    SHOW("OFF_REQ_HANDLE", offsetof(struct blkif_request, handle));
    SHOW("OFF_REQ_ID", offsetof(struct blkif_request, id));
    SHOW("OFF_REQ_SECTOR_NUMBER", offsetof(struct blkif_request, sector_number));
    SHOW("OFF_REQ_SEG", offsetof(struct blkif_request, seg));
    /* The same offsets under the shorter names tapd's ring/blkif.ts uses. */
    SHOW("OFF_REQ_PROD", offsetof(struct blkif_sring, req_prod));
    SHOW("OFF_REQ_EVENT", offsetof(struct blkif_sring, req_event));
    SHOW("OFF_RSP_PROD", offsetof(struct blkif_sring, rsp_prod));
    SHOW("OFF_RSP_EVENT", offsetof(struct blkif_sring, rsp_event));
    SHOW("OFF_OPERATION", offsetof(struct blkif_request, operation));
    SHOW("OFF_NR_SEGMENTS", offsetof(struct blkif_request, nr_segments));
    SHOW("OFF_HANDLE", offsetof(struct blkif_request, handle));
    SHOW("OFF_ID", offsetof(struct blkif_request, id));
    SHOW("OFF_SECTOR_NUMBER", offsetof(struct blkif_request, sector_number));
    SHOW("OFF_SEG", offsetof(struct blkif_request, seg));
    SHOW("OFF_RSP_ID", offsetof(struct blkif_response, id));
    SHOW("OFF_RSP_OPERATION", offsetof(struct blkif_response, operation));
    SHOW("OFF_RSP_STATUS", offsetof(struct blkif_response, status));
    SHOW("OFF_SEG_GREF", offsetof(struct blkif_request_segment, gref));
    SHOW("OFF_SEG_FIRST_SECT", offsetof(struct blkif_request_segment, first_sect));
    SHOW("OFF_SEG_LAST_SECT", offsetof(struct blkif_request_segment, last_sect));
    SHOW("OFF_DISCARD_OPERATION", offsetof(struct blkif_request_discard, operation));
    SHOW("OFF_DISCARD_FLAG", offsetof(struct blkif_request_discard, flag));
    SHOW("OFF_DISCARD_HANDLE", offsetof(struct blkif_request_discard, handle));
    SHOW("OFF_DISCARD_ID", offsetof(struct blkif_request_discard, id));
    SHOW("OFF_DISCARD_SECTOR_NUMBER", offsetof(struct blkif_request_discard, sector_number));
    SHOW("OFF_DISCARD_NR_SECTORS", offsetof(struct blkif_request_discard, nr_sectors));
    SHOW("OFF_INDIRECT_OPERATION", offsetof(struct blkif_request_indirect, operation));
    SHOW("OFF_INDIRECT_INDIRECT_OP", offsetof(struct blkif_request_indirect, indirect_op));
    SHOW("OFF_INDIRECT_NR_SEGMENTS", offsetof(struct blkif_request_indirect, nr_segments));
    SHOW("OFF_INDIRECT_ID", offsetof(struct blkif_request_indirect, id));
    SHOW("OFF_INDIRECT_SECTOR_NUMBER", offsetof(struct blkif_request_indirect, sector_number));
    SHOW("OFF_INDIRECT_HANDLE", offsetof(struct blkif_request_indirect, handle));
    SHOW("OFF_INDIRECT_GREFS", offsetof(struct blkif_request_indirect, indirect_grefs));
    SHOW("OP_READ", BLKIF_OP_READ);
    SHOW("OP_WRITE", BLKIF_OP_WRITE);
    SHOW("OP_WRITE_BARRIER", BLKIF_OP_WRITE_BARRIER);
    SHOW("OP_FLUSH_DISKCACHE", BLKIF_OP_FLUSH_DISKCACHE);
    SHOW("OP_RESERVED_1", BLKIF_OP_RESERVED_1);
    SHOW("OP_DISCARD", BLKIF_OP_DISCARD);
    SHOW("OP_INDIRECT", BLKIF_OP_INDIRECT);
    SHOW("RSP_OKAY", BLKIF_RSP_OKAY);
    SHOW("RSP_ERROR", BLKIF_RSP_ERROR);
    SHOW("RSP_EOPNOTSUPP", BLKIF_RSP_EOPNOTSUPP);
    SHOW("MAX_SEGMENTS_PER_REQUEST", BLKIF_MAX_SEGMENTS_PER_REQUEST);
    SHOW("MAX_SEGMENTS", BLKIF_MAX_SEGMENTS_PER_REQUEST);
    SHOW("MAX_INDIRECT_PAGES_PER_REQUEST", BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST);
    SHOW("DISCARD_SECURE", BLKIF_DISCARD_SECURE);
    return 0;
}

/* ---------------------------------------------------------------- verify */

/*
 * The free data pages: free_pages[0..nfree) in any order, free_pos[p] = where page p is in it
 * (TAKEN when in use), so that a run of consecutive pages can be taken as well as random ones.
 */
#define TAKEN UINT32_MAX
static uint32_t *free_pages, *free_pos;
static uint32_t nfree;

static uint32_t take_at(uint32_t i)
{
    uint32_t p = free_pages[i], moved = free_pages[--nfree];
    free_pages[i] = moved;
    free_pos[moved] = i;
    free_pos[p] = TAKEN;
    return p;
}

static uint32_t take_page(void)
{
    return take_at(below(nfree));
}

/* Takes n consecutive free pages into out[]; 0 if a few random tries find none. */
static int take_run(uint32_t n, uint32_t *out)
{
    if (n == 0 || n > R.data_pages)
        return 0;
    for (int attempt = 0; attempt < 8; attempt++) {
        uint32_t start = below(R.data_pages - n + 1), k = 0;
        while (k < n && free_pos[start + k] != TAKEN)
            k++;
        if (k < n)
            continue;
        for (k = 0; k < n; k++) {
            out[k] = start + k;
            take_at(free_pos[start + k]);
        }
        return 1;
    }
    return 0;
}

static void give_page(uint32_t p)
{
    if (p >= R.data_pages || free_pos[p] != TAKEN)
        die("internal: page %u given back twice", p);
    free_pos[p] = nfree;
    free_pages[nfree++] = p;
}

static int overlaps(uint64_t a, uint32_t na, uint64_t b, uint32_t nb)
{
    return a < b + nb && b < a + na;
}

/* May a request of op on [sector, sector+n) start now? */
static int conflicts(int is_write, uint64_t sector, uint32_t n)
{
    for (unsigned i = 0; i < RING_SIZE(&R.fr); i++) {
        struct req *q = &tr[i];
        if (!q->used || q->nsect == 0)
            continue;
        int q_write = q->op != BLKIF_OP_READ;
        if ((is_write || q_write) && overlaps(sector, n, q->sector, q->nsect))
            return 1;
    }
    return 0;
}

static struct {
    uint64_t reads, writes, flushes, barriers, sectors_read, sectors_written, max_inflight;
    uint64_t indirect, indirect_segments, runs;
} st;

/* Starts one random request within [lo, hi); 0 if none fits now. */
static int start_random(uint64_t lo, uint64_t hi, uint32_t align)
{
    int can_flush = (R.flags & FLAG_FLUSH) != 0;
    uint32_t r = below(100);
    uint8_t op = r < 46 ? BLKIF_OP_READ : BLKIF_OP_WRITE;
    if (can_flush && r >= 92)
        op = r >= 96 ? BLKIF_OP_FLUSH_DISKCACHE : BLKIF_OP_WRITE_BARRIER;
    if (op == BLKIF_OP_FLUSH_DISKCACHE || (op == BLKIF_OP_WRITE_BARRIER && below(4) == 0)) {
        struct req *q = new_req(op, op == BLKIF_OP_FLUSH_DISKCACHE ? "flush" : "empty barrier");
        place(q);
        if (op == BLKIF_OP_FLUSH_DISKCACHE)
            st.flushes++;
        else
            st.barriers++;
        return 1;
    }

    /*
     * A quarter of the reads and writes are INDIRECT requests of 12..min(max_indirect, 128)
     * segments, when tapdisk offers them and there are pages for one (descriptors included).
     */
    uint64_t len = hi - lo;
    uint32_t ind_max = R.max_indirect < IND_SEGS_MAX ? R.max_indirect : IND_SEGS_MAX;
    int indirect = (op == BLKIF_OP_READ || op == BLKIF_OP_WRITE) && ind_max > MAX_SEGS &&
                   len >= 4 * (uint64_t)ind_max * SECTORS_PER_PAGE && nfree >= MAX_SEGS + 2 &&
                   below(4) == 0;
    uint32_t min_seg = indirect ? MAX_SEGS + 1 : 1;
    uint32_t max_seg = indirect ? ind_max : MAX_SEGS;
    uint32_t avail = indirect ? nfree - 1 : nfree; /* ind_max ≤ 128: one descriptor page */
    if (max_seg > avail)
        max_seg = avail;
    if (max_seg == 0)
        return 0;
    for (int attempt = 0; attempt < 8; attempt++) {
        uint16_t nseg = (uint16_t)(min_seg + below(max_seg - min_seg + 1));
        uint8_t first[REQ_SEGS], last[REQ_SEGS];
        uint32_t n = 0;
        /*
         * A third whole pages, a third random sectors in each page, a third a run: consecutive
         * pages, contiguous in memory (the first segment may start and the last end mid-page).
         */
        uint32_t shape = below(3);
        int whole = shape == 0, run = shape == 1;
        for (int s = 0; s < nseg; s++) {
            if (run) {
                first[s] = s == 0 && align == 1 ? (uint8_t)below(SECTORS_PER_PAGE) : 0;
                last[s] = s == nseg - 1 && align == 1
                              ? (uint8_t)(first[s] + below(SECTORS_PER_PAGE - first[s]))
                              : SECTORS_PER_PAGE - 1;
            } else if (whole || align > 1) {
                first[s] = 0;
                last[s] = SECTORS_PER_PAGE - 1;
            } else {
                first[s] = (uint8_t)below(SECTORS_PER_PAGE);
                last[s] = (uint8_t)(first[s] + below(SECTORS_PER_PAGE - first[s]));
            }
            n += last[s] - first[s] + 1u;
        }
        if (n > len)
            continue;
        /* A third of the requests go to a 1 MiB hot zone, where they crowd each other. */
        uint64_t span = below(3) == 0 && len > 2048 ? 2048 : len;
        if (n > span)
            span = len;
        uint64_t sector = lo + ((((uint64_t)rnd() >> 1) % (span - n + 1)) / align) * align;
        int is_write = op != BLKIF_OP_READ;
        if (conflicts(is_write, sector, n))
            continue;
        const char *what = op == BLKIF_OP_READ    ? (indirect ? "indirect read" : "read")
                         : op == BLKIF_OP_WRITE ? (indirect ? "indirect write" : "write")
                                                : "barrier";
        struct req *q = new_req(op, what);
        q->sector = sector;
        q->nsect = n;
        q->nseg = nseg;
        memcpy(q->first, first, nseg);
        memcpy(q->last, last, nseg);
        if (run && take_run(nseg, q->page)) {
            st.runs++;
        } else {
            for (int s = 0; s < nseg; s++)
                q->page[s] = take_page();
        }
        if (indirect) {
            q->indirect = 1;
            q->nind = (uint8_t)((nseg + DESCS_PER_PAGE - 1) / DESCS_PER_PAGE);
            for (int i = 0; i < q->nind; i++)
                q->ind_page[i] = take_page();
            st.indirect++;
            st.indirect_segments += nseg;
        }
        if (is_write) {
            q->gen = next_seq;
            fill_write(q);
            st.writes += op == BLKIF_OP_WRITE;
            st.barriers += op == BLKIF_OP_WRITE_BARRIER;
            st.sectors_written += n;
        } else {
            q->check = CHK_SHADOW;
            poison(q);
            st.reads++;
            st.sectors_read += n;
        }
        place(q);
        return 1;
    }
    return 0;
}

static void finish_random(const blkif_response_t *r)
{
    struct req *q = complete(r);
    if (q->op != BLKIF_OP_READ && q->nseg) {
        uint64_t sector = q->sector;
        for (int s = 0; s < q->nseg; s++) {
            uint8_t *p = page(q->page[s]);
            for (int k = q->first[s]; k <= q->last[s]; k++, sector++)
                memcpy(shadow + sector * SECTOR, p + k * SECTOR, SECTOR);
        }
    }
    /* Only now, with a read's data checked, do its pages go back (docs/ring.md). */
    for (int s = 0; s < q->nseg; s++)
        give_page(q->page[s]);
    for (int i = 0; i < q->nind; i++)
        give_page(q->ind_page[i]);
    q->used = 0;
}

static void load_file(const char *path, uint8_t *buf, size_t len)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        die("open %s: %s", path, strerror(errno));
    struct stat sb;
    if (fstat(fd, &sb) < 0)
        die("fstat %s: %s", path, strerror(errno));
    if ((uint64_t)sb.st_size != len)
        die("%s is %lld bytes, the disk %zu", path, (long long)sb.st_size, len);
    for (size_t done = 0; done < len;) {
        ssize_t n = read(fd, buf + done, len - done);
        if (n <= 0)
            die("read %s: %s", path, n < 0 ? strerror(errno) : "end of file");
        done += (size_t)n;
    }
    close(fd);
}

static void save_file(const char *path, const uint8_t *buf, size_t len)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0)
        die("create %s: %s", path, strerror(errno));
    for (size_t done = 0; done < len;) {
        ssize_t n = write(fd, buf + done, len - done);
        if (n <= 0)
            die("write %s: %s", path, n < 0 ? strerror(errno) : "short write");
        done += (size_t)n;
    }
    if (close(fd) < 0)
        die("close %s: %s", path, strerror(errno));
}

static int verify(int argc, char **argv)
{
    if (argc < 3 || argc == 5 || argc > 6)
        die("usage: frontend SOCKET verify REF OPS SEED [SHADOW|- [START END]]");
    const char *ref = argv[0];
    uint64_t ops = parse_u64(argv[1], "OPS");
    seed_rng(parse_u64(argv[2], "SEED"));
    const char *out = argc > 3 && strcmp(argv[3], "-") ? argv[3] : NULL;
    uint64_t lo = argc > 4 ? parse_u64(argv[4], "START") : 0;
    uint64_t hi = argc > 4 ? parse_u64(argv[5], "END") : R.sectors;
    uint32_t align = R.sector_size / SECTOR;
    if (lo >= hi || hi > R.sectors || lo % align || hi % align)
        die("bad range %" PRIu64 "..%" PRIu64 " for a disk of %" PRIu64 " sectors of %u bytes", lo,
            hi, R.sectors, R.sector_size);
    if (R.flags & FLAG_RO)
        die("the disk is read-only (flags 0x%x)", R.flags);

    size_t bytes = (size_t)R.sectors * SECTOR;
    shadow = malloc(bytes);
    free_pages = malloc(R.data_pages * sizeof *free_pages);
    free_pos = malloc(R.data_pages * sizeof *free_pos);
    if (!shadow || !free_pages || !free_pos)
        die("out of memory for a shadow of %zu bytes", bytes);
    load_file(ref, shadow, bytes);
    for (uint32_t p = 0; p < R.data_pages; p++) {
        free_pos[p] = nfree;
        free_pages[nfree++] = p;
    }

    uint64_t started = 0, done = 0;
    while (done < ops) {
        while (started < ops && !RING_FULL(&R.fr) && start_random(lo, hi, align))
            started++;
        if (inflight() > st.max_inflight)
            st.max_inflight = inflight();
        push();
        blkif_response_t r;
        if (!get_response(&r)) {
            int more;
            RING_FINAL_CHECK_FOR_RESPONSES(&R.fr, more);
            if (!more)
                wait_notify();
            continue;
        }
        do {
            finish_random(&r);
            done++;
        } while (get_response(&r));
    }
    if (out)
        save_file(out, shadow, bytes);
    fprintf(stderr,
            "verify: %" PRIu64 " reads (%" PRIu64 " sectors), %" PRIu64 " writes, %" PRIu64
            " barriers (%" PRIu64 " sectors written), %" PRIu64 " flushes; %" PRIu64
            " indirect (%" PRIu64 " segments, max_indirect %u), %" PRIu64 " page runs; max %" PRIu64
            " in flight of %u; %" PRIu64 " kicks, %" PRIu64 " waits\n",
            st.reads, st.sectors_read, st.writes, st.barriers, st.sectors_written, st.flushes,
            st.indirect, st.indirect_segments, R.max_indirect, st.runs, st.max_inflight,
            RING_SIZE(&R.fr), R.kicks, R.waits);
    printf("ok %" PRIu64 "\n", checked);
    return 0;
}

/* ---------------------------------------------------------------- malformed */

/* Runs the requests started by the caller until none is in flight. */
static void drain(void)
{
    push();
    while (inflight()) {
        blkif_response_t r;
        next_response(&r);
        complete(&r)->used = 0;
    }
}

/* Whole-page I/O on [sector, sector+n), in requests of up to 88 sectors; waits for all. */
static void io_sync(uint8_t op, uint64_t sector, uint64_t n, uint8_t *buf, uint64_t gen,
                    enum check check, const char *what)
{
    while (n) {
        if (RING_FULL(&R.fr)) {
            blkif_response_t r;
            push();
            next_response(&r);
            complete(&r)->used = 0;
            continue;
        }
        uint32_t k = n < MAX_SEGS * SECTORS_PER_PAGE ? (uint32_t)n : MAX_SEGS * SECTORS_PER_PAGE;
        struct req *q = new_req(op, what);
        slot_pages(q);
        q->sector = sector;
        whole_pages(q, k);
        q->gen = gen;
        q->check = check;
        q->buf = buf;
        if (op == BLKIF_OP_READ)
            poison(q);
        else
            fill_write(q);
        place(q);
        sector += k;
        n -= k;
        if (buf)
            buf += (size_t)k * SECTOR;
    }
    drain();
}

#define CANARY_A 512           /* sectors 0..511 (room for REQ_SEGS one-sector segments) */
#define CANARY_Z 64            /* the last 64 sectors */
#define REGION_B 1024          /* 8 writes of 88 sectors from here */
#define B_WRITES 8

_Static_assert(CANARY_A >= REQ_SEGS && CANARY_A <= REGION_B, "canary A holds an indirect request");

enum mcase {
    M_BAD_OP, M_RESERVED_OP, M_READ_0SEG, M_WRITE_0SEG, M_READ_12SEG, M_WRITE_255SEG,
    M_WRITE_FIRST_GT_LAST, M_READ_FIRST_GT_LAST, M_WRITE_LAST_8, M_READ_FIRST_LAST_8,
    M_WRITE_GREF_END, M_READ_GREF_MAX, M_WRITE_STRADDLE_END, M_READ_AT_END, M_WRITE_HUGE_SECTOR,
    M_READ_WRAPPING_SECTOR, M_IND_0SEG, M_IND_TOO_MANY, M_IND_FLUSH_OP, M_IND_DESC_GREF_END,
    M_DISCARD_PAST_END, M_BARRIER_LAST_9, M_COUNT
};

/*
 * Each case's operation (for the INDIRECT cases the indirect_op, which the response must carry)
 * and name. Designated initialisers keep the table in step with the enum.
 */
static const struct {
    uint8_t op, indirect;
    const char *name;
} mcases[M_COUNT] = {
    [M_BAD_OP] = { 99, 0, "operation 99" },
    [M_RESERVED_OP] = { BLKIF_OP_RESERVED_1, 0, "operation 4 (reserved)" },
    [M_READ_0SEG] = { BLKIF_OP_READ, 0, "read with 0 segments" },
    [M_WRITE_0SEG] = { BLKIF_OP_WRITE, 0, "write with 0 segments" },
    [M_READ_12SEG] = { BLKIF_OP_READ, 0, "read with 12 segments" },
    [M_WRITE_255SEG] = { BLKIF_OP_WRITE, 0, "write with 255 segments" },
    [M_WRITE_FIRST_GT_LAST] = { BLKIF_OP_WRITE, 0, "write with first_sect 5 > last_sect 2" },
    [M_READ_FIRST_GT_LAST] = { BLKIF_OP_READ, 0, "read with first_sect 6 > last_sect 1" },
    [M_WRITE_LAST_8] = { BLKIF_OP_WRITE, 0, "write with last_sect 8" },
    [M_READ_FIRST_LAST_8] = { BLKIF_OP_READ, 0, "read with first/last 8" },
    [M_WRITE_GREF_END] = { BLKIF_OP_WRITE, 0, "write with gref = data_pages" },
    [M_READ_GREF_MAX] = { BLKIF_OP_READ, 0, "read with gref 0xffffffff" },
    [M_WRITE_STRADDLE_END] = { BLKIF_OP_WRITE, 0, "write straddling the end" },
    [M_READ_AT_END] = { BLKIF_OP_READ, 0, "read at the end" },
    [M_WRITE_HUGE_SECTOR] = { BLKIF_OP_WRITE, 0, "write at sector 2^63" },
    [M_READ_WRAPPING_SECTOR] = { BLKIF_OP_READ, 0, "read at sector 2^64-4 (wraps)" },
    [M_IND_0SEG] = { BLKIF_OP_WRITE, 1, "indirect write with 0 segments" },
    [M_IND_TOO_MANY] = { BLKIF_OP_WRITE, 1, "indirect write with max_indirect+1 segments" },
    [M_IND_FLUSH_OP] = { BLKIF_OP_FLUSH_DISKCACHE, 1, "indirect with indirect_op 3 (flush)" },
    [M_IND_DESC_GREF_END] = { BLKIF_OP_WRITE, 1,
                              "indirect write with descriptor page gref = data_pages" },
    [M_DISCARD_PAST_END] = { BLKIF_OP_DISCARD, 0, "discard past the end" },
    [M_BARRIER_LAST_9] = { BLKIF_OP_WRITE_BARRIER, 0, "barrier with last_sect 9" },
};

/*
 * Starts a malformed INDIRECT case: a request that would be a valid write of one-sector segments
 * into canary A (segment j = sector q->sector + j, from sector j % 8 of data page j / 8 of the
 * slot, the descriptor pages at the slot's end) but for the one thing case c breaks.
 */
static void start_malformed_indirect(struct req *q, enum mcase c)
{
    /* Segments a valid request of this case describes: 1..40, within max_indirect. */
    uint32_t cap = R.max_indirect && R.max_indirect < 40 ? R.max_indirect : 40;
    uint32_t nr = 1 + below(cap);             /* nr_segments the request will carry */
    if (c == M_IND_TOO_MANY)
        nr = R.max_indirect + 1;
    else if (c == M_IND_0SEG)
        nr = 0;
    /* Descriptors written: all nr of them (as many as REQ_SEGS), or for 0, a valid-looking set. */
    uint32_t nd = c == M_IND_0SEG ? 1 + below(cap) : nr < REQ_SEGS ? nr : REQ_SEGS;
    uint32_t pages_named = (uint32_t)((nr + DESCS_PER_PAGE - 1) / DESCS_PER_PAGE);
    if (pages_named < 1)
        pages_named = 1;
    if (pages_named > BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST)
        pages_named = BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST;

    q->indirect = 1;
    q->expect = R.max_indirect ? X_ERR : X_ERR | X_NOTSUPP; /* 0: indirect not offered */
    q->gen = 0xbad;
    q->nind = (uint8_t)pages_named;
    for (uint32_t i = 0; i < pages_named; i++)
        q->ind_page[i] = slot_page(q, R.slot_stride - 1 - i);
    uint32_t data = R.slot_stride - pages_named; /* the slot's pages left for data */
    q->sector = below(CANARY_A - nd + 1);
    q->nseg = (uint16_t)nd;
    q->nsect = nd;
    for (uint32_t j = 0; j < nd; j++) {
        q->page[j] = slot_page(q, (j / SECTORS_PER_PAGE) % data);
        q->first[j] = q->last[j] = (uint8_t)(j % SECTORS_PER_PAGE);
        pattern(page(q->page[j]) + q->first[j] * SECTOR, q->sector + j, q->gen);
    }

    blkif_request_t *r = place(q); /* a struct blkif_request_indirect, descriptors written */
    struct blkif_request_indirect ind = get_indirect(r);
    switch (c) {
    case M_IND_0SEG: ind.nr_segments = 0; break;
    case M_IND_TOO_MANY: ind.nr_segments = (uint16_t)nr; break;
    case M_IND_DESC_GREF_END: ind.indirect_grefs[0] = R.data_pages; break;
    default: break; /* M_IND_FLUSH_OP: q->op already is the wrong indirect_op */
    }
    set_indirect(r, &ind);
}

/* Starts malformed case c; its write data (junk) aims at the canaries. */
static void start_malformed(enum mcase c)
{
    struct req *q = new_req(mcases[c].op, mcases[c].name);
    if (mcases[c].indirect) {
        start_malformed_indirect(q, c);
        return;
    }
    slot_pages(q);
    q->expect = X_ERR;
    q->sector = 8 * below(16);
    whole_pages(q, 8 * (1 + below(4)));
    q->gen = 0xbad;
    for (int s = 0; s < MAX_SEGS; s++) {
        uint8_t *p = page(q->page[s]);
        for (int k = 0; k < SECTORS_PER_PAGE; k++)
            pattern(p + k * SECTOR, q->sector + (uint64_t)s * SECTORS_PER_PAGE + k, 0xbad);
    }
    int nr = -1; /* nr_segments, when not q->nseg */
    switch (c) {
    case M_BAD_OP: q->expect = X_ERR | X_NOTSUPP; break;
    case M_RESERVED_OP: q->expect = X_ERR | X_NOTSUPP; break;
    case M_READ_0SEG: case M_WRITE_0SEG: nr = 0; break;
    case M_READ_12SEG: whole_pages(q, 88); nr = 12; break;
    case M_WRITE_255SEG: whole_pages(q, 88); nr = 255; break;
    case M_WRITE_FIRST_GT_LAST:
        whole_pages(q, 32);
        q->first[2] = 5;
        q->last[2] = 2;
        break;
    case M_READ_FIRST_GT_LAST: q->first[0] = 6; q->last[0] = 1; break;
    case M_WRITE_LAST_8: q->last[q->nseg - 1] = 8; break;
    case M_READ_FIRST_LAST_8: q->first[0] = 8; q->last[0] = 8; break;
    case M_WRITE_GREF_END: q->page[q->nseg - 1] = R.data_pages; break;
    case M_READ_GREF_MAX: q->page[0] = 0xffffffffu; break;
    case M_WRITE_STRADDLE_END: q->sector = R.sectors - 4; whole_pages(q, 8); break;
    case M_READ_AT_END: q->sector = R.sectors; whole_pages(q, 1); break;
    case M_WRITE_HUGE_SECTOR: q->sector = 1ULL << 63; break;
    case M_READ_WRAPPING_SECTOR: q->sector = ~0ULL - 3; whole_pages(q, 8); break;
    case M_DISCARD_PAST_END:
        q->expect = R.flags & FLAG_DISCARD ? X_ERR : X_NOTSUPP;
        break;
    case M_BARRIER_LAST_9:
        q->last[0] = 9;
        if (!(R.flags & FLAG_FLUSH))
            q->expect = X_ERR | X_NOTSUPP;
        break;
    case M_IND_0SEG: case M_IND_TOO_MANY: case M_IND_FLUSH_OP: case M_IND_DESC_GREF_END:
    case M_COUNT: break;
    }
    blkif_request_t *r = place(q);
    if (nr >= 0)
        r->nr_segments = (uint8_t)nr;
    if (c == M_DISCARD_PAST_END) {
        struct blkif_request_discard d;
        memset(&d, 0, sizeof d);
        d.operation = BLKIF_OP_DISCARD;
        d.id = q->id;
        d.sector_number = R.sectors - 8;
        d.nr_sectors = 16;
        memset(r, 0, sizeof *r);
        memcpy(r, &d, sizeof d);
    }
}

static int malformed(int argc, char **argv)
{
    seed_rng(argc > 0 ? parse_u64(argv[0], "SEED") : 1);
    if (R.sectors < 4096)
        die("malformed needs a disk of at least 4096 sectors (this one has %" PRIu64 ")",
            R.sectors);
    if (R.flags & FLAG_RO)
        die("the disk is read-only (flags 0x%x)", R.flags);
    if (R.sector_size != SECTOR)
        die("malformed expects 512-byte sectors, not %u", R.sector_size);
    const uint64_t z = R.sectors - CANARY_Z, nb = B_WRITES * 88;
    uint8_t *save_a = malloc(CANARY_A * SECTOR), *save_z = malloc(CANARY_Z * SECTOR);
    uint8_t *save_b = malloc(nb * SECTOR);
    if (!save_a || !save_z || !save_b)
        die("out of memory");

    /* Keep what was there, then write the canaries. */
    io_sync(BLKIF_OP_READ, 0, CANARY_A, save_a, 0, CHK_COPY, "saving canary A");
    io_sync(BLKIF_OP_READ, z, CANARY_Z, save_z, 0, CHK_COPY, "saving canary Z");
    io_sync(BLKIF_OP_READ, REGION_B, nb, save_b, 0, CHK_COPY, "saving region B");
    io_sync(BLKIF_OP_WRITE, 0, CANARY_A, NULL, 1, CHK_NONE, "writing canary A");
    io_sync(BLKIF_OP_WRITE, z, CANARY_Z, NULL, 1, CHK_NONE, "writing canary Z");

    for (int round = 0; round < 4; round++) {
        /* Malformed cases, valid reads of the canary and valid writes of region B, shuffled. */
        int plan[M_COUNT + 16], n = 0;
        for (int c = 0; c < M_COUNT; c++)
            plan[n++] = c;
        for (int i = 0; i < 8; i++)
            plan[n++] = 100 + i;          /* read canary A */
        for (int i = 0; i < B_WRITES; i++)
            plan[n++] = 200 + i;          /* write chunk i of region B */
        for (int i = n - 1; i > 0; i--) {
            int j = (int)below((uint32_t)i + 1), t = plan[i];
            plan[i] = plan[j];
            plan[j] = t;
        }
        for (int i = 0; i < n; i++) {
            while (RING_FULL(&R.fr)) {
                blkif_response_t r;
                push();
                next_response(&r);
                complete(&r)->used = 0;
            }
            if (plan[i] < 100) {
                start_malformed((enum mcase)plan[i]);
            } else if (plan[i] < 200) {
                struct req *q = new_req(BLKIF_OP_READ, "valid read of canary A");
                slot_pages(q);
                q->nseg = (uint8_t)(1 + below(MAX_SEGS));
                q->nsect = 0;
                for (int s = 0; s < q->nseg; s++) {
                    q->first[s] = (uint8_t)below(SECTORS_PER_PAGE);
                    q->last[s] = (uint8_t)(q->first[s] + below(SECTORS_PER_PAGE - q->first[s]));
                    q->nsect += q->last[s] - q->first[s] + 1u;
                }
                q->sector = below(CANARY_A - q->nsect + 1);
                q->check = CHK_PATTERN;
                q->gen = 1;
                poison(q);
                place(q);
            } else {
                struct req *q = new_req(BLKIF_OP_WRITE, "valid write of region B");
                slot_pages(q);
                q->sector = REGION_B + (uint64_t)(plan[i] - 200) * 88;
                whole_pages(q, 88);
                q->gen = 2 + (uint64_t)round;
                fill_write(q);
                place(q);
            }
            if (below(4) == 0)
                push();
        }
        drain();
        /* The ring still works, the malformed writes wrote nothing, the valid ones everything. */
        io_sync(BLKIF_OP_READ, 0, CANARY_A, NULL, 1, CHK_PATTERN, "reading back canary A");
        io_sync(BLKIF_OP_READ, z, CANARY_Z, NULL, 1, CHK_PATTERN, "reading back canary Z");
        io_sync(BLKIF_OP_READ, REGION_B, nb, NULL, 2 + (uint64_t)round, CHK_PATTERN,
                "reading back region B");
    }

    /* Put everything back as it was. */
    io_sync(BLKIF_OP_WRITE, 0, CANARY_A, save_a, 0, CHK_NONE, "restoring canary A");
    io_sync(BLKIF_OP_WRITE, z, CANARY_Z, save_z, 0, CHK_NONE, "restoring canary Z");
    io_sync(BLKIF_OP_WRITE, REGION_B, nb, save_b, 0, CHK_NONE, "restoring region B");
    free(save_a);
    free(save_z);
    free(save_b);
    fprintf(stderr, "malformed: %" PRIu64 " responses, %" PRIu64 " kicks, %" PRIu64 " waits\n",
            checked, R.kicks, R.waits);
    printf("ok %" PRIu64 "\n", checked);
    return 0;
}

/* ---------------------------------------------------------------- vanish, readonly */

/* Starts COUNT big writes of REF's own data (so the disk's content does not change), then exits. */
static int vanish(int argc, char **argv)
{
    if (argc < 1)
        die("usage: frontend SOCKET vanish REF [COUNT]");
    uint64_t count = argc > 1 ? parse_u64(argv[1], "COUNT") : 32;
    seed_rng((uint64_t)getpid());
    int fd = open(argv[0], O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        die("open %s: %s", argv[0], strerror(errno));
    if (R.sectors < 88 || R.sector_size != SECTOR)
        die("vanish needs a disk of 88 sectors or more, of 512 bytes");
    uint8_t buf[88 * SECTOR];
    uint64_t n = 0;
    for (; n < count && !RING_FULL(&R.fr); n++) {
        struct req *q = new_req(BLKIF_OP_WRITE, "vanishing write");
        slot_pages(q);
        q->sector = ((uint64_t)rnd() >> 1) % (R.sectors - 88 + 1);
        whole_pages(q, 88);
        if (pread(fd, buf, sizeof buf, (off_t)(q->sector * SECTOR)) != (ssize_t)sizeof buf)
            die("read %s at sector %" PRIu64 " failed", argv[0], q->sector);
        q->buf = buf;
        fill_write(q);
        place(q);
        if (n % 8 == 7)
            push();
    }
    push();
    printf("submitted %" PRIu64 "\n", n);
    fflush(stdout);
    _exit(0);
}

static int readonly(void)
{
    if (!(R.flags & FLAG_RO))
        die("the disk is not read-only (flags 0x%x)", R.flags);
    if (R.sectors < 4 * 88 || R.sector_size != SECTOR)
        die("readonly needs a disk of 352 sectors or more, of 512 bytes");
    /* INDIRECT requests too, when offered: up to 32 pages, within a slot and the disk. */
    uint32_t ind = R.max_indirect < R.slot_stride - 1 ? R.max_indirect : R.slot_stride - 1;
    if (ind > 32)
        ind = 32;
    if (R.sectors < (uint64_t)ind * SECTORS_PER_PAGE + 32)
        ind = 0;
    for (int i = 0; i < 4; i++) {
        struct req *q = new_req(BLKIF_OP_READ, "read of a read-only disk");
        slot_pages(q);
        q->sector = 88 * (uint64_t)i;
        whole_pages(q, 88);
        poison(q);
        place(q);

        q = new_req(BLKIF_OP_WRITE, "write to a read-only disk");
        slot_pages(q);
        q->sector = 8 * (uint64_t)i;
        whole_pages(q, 16);
        q->expect = X_ERR;
        fill_write(q);
        place(q);

        q = new_req(BLKIF_OP_WRITE_BARRIER, "barrier write to a read-only disk");
        slot_pages(q);
        q->sector = 8 * (uint64_t)i;
        whole_pages(q, 8);
        q->expect = X_ERR | X_NOTSUPP;
        fill_write(q);
        place(q);

        if (ind > MAX_SEGS) {
            q = new_req(BLKIF_OP_READ, "indirect read of a read-only disk");
            slot_indirect(q, ind);
            q->sector = 8 * (uint64_t)i;
            poison(q);
            place(q);

            q = new_req(BLKIF_OP_WRITE, "indirect write to a read-only disk");
            slot_indirect(q, ind);
            q->sector = 8 * (uint64_t)i;
            q->expect = X_ERR;
            fill_write(q);
            place(q);
        }

        if (R.flags & FLAG_DISCARD) {
            struct req *d = new_req(BLKIF_OP_DISCARD, "discard on a read-only disk");
            d->expect = X_ERR | X_NOTSUPP;
            blkif_request_t *r = place(d);
            struct blkif_request_discard *rd = (struct blkif_request_discard *)r;
            rd->sector_number = 0;
            rd->nr_sectors = 8;
        }
        drain();
    }
    printf("ok %" PRIu64 "\n", checked);
    return 0;
}

/* ---------------------------------------------------------------- load */

static uint64_t now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

/*
 * A load generator for bench/ring_vs_fio.ts, with fio's shape: rand4k keeps QD random 4 KiB reads
 * in flight, seq1m QD sequential 1 MiB reads (each as four INDIRECT requests of 64 pages, the
 * most a tracking slot holds). A response is answered by the next request at once; with SPIN_US
 * the frontend looks at the ring for that long before it sleeps on the notify eventfd. Data is not
 * checked. Prints `iops N` (1 MiB units for seq1m) and `waits N`.
 */
static int load(int argc, char **argv)
{
    if (argc < 3)
        die("usage: frontend SOCKET load rand4k|seq1m QD SECONDS [SPIN_US]");
    int seq = !strcmp(argv[0], "seq1m");
    if (!seq && strcmp(argv[0], "rand4k"))
        die("unknown load %s (rand4k or seq1m)", argv[0]);
    uint64_t qd = parse_u64(argv[1], "QD"), parts = seq ? 4 : 1;
    uint64_t spin_ns = argc > 3 ? parse_u64(argv[3], "SPIN_US") * 1000 : 0;
    if (qd == 0 || qd * parts > RING_SIZE(&R.fr))
        die("QD %" PRIu64 ": the ring holds %u requests", qd, RING_SIZE(&R.fr));
    uint32_t nsect = seq ? 64 * SECTORS_PER_PAGE : SECTORS_PER_PAGE;
    uint64_t units = R.sectors / nsect, next = 0;
    if (units < parts)
        die("the disk is too small for this load");
    seed_rng(1);

    uint64_t done = 0, deadline = now_ns() + parse_u64(argv[2], "SECONDS") * 1000000000u;
    for (uint64_t i = 0; i < qd * parts; i++) {
        struct req *q = new_req(BLKIF_OP_READ, "load");
        if (seq) {
            slot_indirect(q, 64);
            q->sector = (next++ % units) * nsect;
        } else {
            slot_pages(q);
            whole_pages(q, nsect);
            q->sector = (rnd() % units) * nsect;
        }
        place(q);
    }
    push();
    uint64_t start = now_ns(), end = start;
    while (end < deadline) {
        blkif_response_t r;
        if (!get_response(&r)) {
            /* Spin without asking for a notification (tapdisk sends none meanwhile), then ask
             * for one (rsp_event) and sleep. */
            uint64_t until = now_ns() + spin_ns;
            while (spin_ns && !RING_HAS_UNCONSUMED_RESPONSES(&R.fr) && now_ns() < until)
                __builtin_ia32_pause();
            if (RING_HAS_UNCONSUMED_RESPONSES(&R.fr))
                continue;
            int more;
            RING_FINAL_CHECK_FOR_RESPONSES(&R.fr, more);
            if (!more)
                wait_notify();
            end = now_ns();
            continue;
        }
        struct req *q = find_req(&r);
        if (r.status != BLKIF_RSP_OKAY)
            die("load: read at sector %" PRIu64 " failed with status %d", q->sector, r.status);
        done++;
        q->sector = seq ? (next++ % units) * nsect : (rnd() % units) * nsect;
        place(q);
        push();
        end = now_ns();
    }
    double secs = (double)(end - start) / 1e9;
    printf("iops %.0f\nwaits %" PRIu64 "\n", (double)done / parts / secs, R.waits);
    return 0;
}

/* ---------------------------------------------------------------- main */

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc == 2 && !strcmp(argv[1], "layout"))
        return layout();
    if (argc < 3)
        die("usage: frontend layout | frontend SOCKET verify|malformed|vanish|readonly ARGS...");
    attach(argv[1]);
    const char *mode = argv[2];
    if (!strcmp(mode, "verify"))
        return verify(argc - 3, argv + 3);
    if (!strcmp(mode, "malformed"))
        return malformed(argc - 3, argv + 3);
    if (!strcmp(mode, "vanish"))
        return vanish(argc - 3, argv + 3);
    if (!strcmp(mode, "readonly"))
        return readonly();
    if (!strcmp(mode, "load"))
        return load(argc - 3, argv + 3);
    die("unknown mode %s", mode);
}
