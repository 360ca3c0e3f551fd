/* The NBD lane: plain READs and WRITEs of present data, done in C.
 *
 * lc_lane() walks the whole requests in a buffer the client sent. It answers:
 *
 *  - a READ with no flags, of 1..max_block bytes within the export, whose regions
 *    are all present (or every region is: present == NULL) and whose bytes the
 *    page cache holds (preadv2 with RWF_NOWAIT), by appending its reply (simple,
 *    or one OFFSET_DATA chunk with structured replies) to `out`;
 *  - a WRITE with no flags, of 1..max_write bytes within the export, on an export
 *    that takes writes (max_write > 0), whose regions are all present and all
 *    marked (their digest slots durably say "guest", so no write intent is due:
 *    core/digests.py), by one pwrite from the request's own payload and a simple
 *    reply. This is Clone.write_nowait's path for present regions.
 *
 * Every other message it copies, in order, to `rest`, which the caller gives to
 * the protocol layer to validate and answer as any other (NBD lets a server
 * answer requests in flight in any order); so does a READ whose reply would not
 * fit in what is left of `cap`, one not all cached, and a WRITE whose pwrite
 * failed (the protocol's path does it again and reports the error). It stops at
 * a partial message, at DISC or at a bad magic: what it did not reach goes to
 * the protocol layer too.
 *
 * It answers only what validate_request's own fast path accepts, so never a
 * request the protocol layer would reject. Its only I/O is those preads and
 * pwrites: the caller sends `out`. It runs without the GIL (cffi lets it go), so
 * its I/O overlaps the other threads' work.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <poll.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#ifndef __NR_cachestat
#define __NR_cachestat 451 /* the same on every architecture (Linux 6.5) */
#endif

#ifndef RWF_NOWAIT
#define RWF_NOWAIT 0x00000008
#endif

#define REQUEST_SIZE 28
#define REQUEST_MAGIC 0x25609513u
#define SIMPLE_MAGIC 0x67446698u
#define STRUCTURED_MAGIC 0x668e33efu
#define SIMPLE_SIZE 16
#define CHUNK_SIZE 28 /* structured header (20) and the chunk's offset (8) */
#define CMD_READ 0
#define CMD_WRITE 1
#define CMD_DISC 2

struct lc_lane {
    int fd;                  /* the clone file */
    int structured;          /* structured replies negotiated */
    uint32_t max_block;      /* largest READ the export takes */
    uint32_t max_write;      /* largest WRITE the lane does; 0: none */
    uint32_t shift;          /* log2 of the region size */
    uint64_t size;           /* the export's size */
    const uint8_t *present;  /* present regions, bit r of byte r/8; NULL: all */
    const uint8_t *marked;   /* regions whose slot says "guest"; NULL: none */
};

struct lc_done {
    size_t out_used;         /* bytes of replies in `out` */
    size_t rest_used;        /* bytes of messages passed on in `rest` */
    uint64_t reads, read_bytes, writes, write_bytes;
};

static uint32_t get32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static uint64_t get64(const uint8_t *p)
{
    return (uint64_t)get32(p) << 32 | get32(p + 4);
}

static void put16(uint8_t *p, uint16_t v)
{
    p[0] = v >> 8;
    p[1] = (uint8_t)v;
}

static void put32(uint8_t *p, uint32_t v)
{
    put16(p, v >> 16);
    put16(p + 2, (uint16_t)v);
}

static void put64(uint8_t *p, uint64_t v)
{
    put32(p, v >> 32);
    put32(p + 4, (uint32_t)v);
}

/* Whether every region of [offset, offset+length) has its bit set in `bits`
 * (NULL: `all`). Bits only go from 0 to 1 while we look (RegionMap). */
static int all_set(const uint8_t *bits, int all, uint32_t shift, uint64_t offset,
                   uint32_t length)
{
    if (bits == NULL)
        return all;
    uint64_t r = offset >> shift, last = (offset + length - 1) >> shift;
    for (; r <= last; r++)
        if (!(bits[r >> 3] >> (r & 7) & 1))
            return 0;
    return 1;
}

static void simple_reply(uint8_t *reply, const uint8_t *cookie)
{
    put32(reply, SIMPLE_MAGIC);
    put32(reply + 4, 0);
    memcpy(reply + 8, cookie, 8);
}

/* The READ's reply at `reply`, header and data; 0 if it cannot be done now. */
static int do_read(const struct lc_lane *l, uint8_t *reply, const uint8_t *cookie,
                   uint64_t offset, uint32_t length)
{
    size_t header = l->structured ? CHUNK_SIZE : SIMPLE_SIZE;
    struct iovec iov = { reply + header, length };
    if (preadv2(l->fd, &iov, 1, (off_t)offset, RWF_NOWAIT) != (ssize_t)length)
        return 0; /* not all cached, or an error */
    if (l->structured) {
        put32(reply, STRUCTURED_MAGIC);
        put16(reply + 4, 1); /* NBD_REPLY_FLAG_DONE */
        put16(reply + 6, 1); /* NBD_REPLY_TYPE_OFFSET_DATA */
        memcpy(reply + 8, cookie, 8);
        put32(reply + 16, length + 8);
        put64(reply + 20, offset);
    } else {
        simple_reply(reply, cookie);
    }
    return 1;
}

static int do_write(const struct lc_lane *l, const uint8_t *data, uint64_t offset,
                    uint32_t length)
{
    while (length) {
        ssize_t n = pwrite(l->fd, data, length, (off_t)offset);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return 0;
        data += n;
        offset += (uint64_t)n;
        length -= (uint32_t)n;
    }
    return 1;
}

/* The walk described at the top. `rest` NULL: stop at the first message not
 * answered, instead of passing it on (what was walked is then all answered). */
size_t lc_lane(const struct lc_lane *l, const uint8_t *in, size_t n,
               uint8_t *out, size_t cap, uint8_t *rest, struct lc_done *done)
{
    size_t pos = 0;
    size_t header = l->structured ? CHUNK_SIZE : SIMPLE_SIZE;

    memset(done, 0, sizeof *done);
    while (n - pos >= REQUEST_SIZE) {
        const uint8_t *r = in + pos;
        uint32_t magic = get32(r);
        uint16_t flags = (uint16_t)(r[4] << 8 | r[5]);
        uint16_t type = (uint16_t)(r[6] << 8 | r[7]);
        const uint8_t *cookie = r + 8;
        uint64_t offset = get64(r + 16);
        uint32_t length = get32(r + 24);

        if (magic != REQUEST_MAGIC || type == CMD_DISC)
            break; /* the protocol layer's to judge, with all that follows */
        /* A message as the protocol layer frames it: a WRITE carries its payload,
         * whatever its length. */
        size_t whole = REQUEST_SIZE + (type == CMD_WRITE ? (size_t)length : 0);
        if (whole > n - pos)
            break;
        int plain = flags == 0 && length != 0 && offset <= l->size
                    && length <= l->size - offset;
        int answered = 0;
        if (plain && type == CMD_READ && length <= l->max_block
            && header + length <= cap - done->out_used
            && all_set(l->present, 1, l->shift, offset, length)
            && do_read(l, out + done->out_used, cookie, offset, length)) {
            done->out_used += header + length;
            done->reads++;
            done->read_bytes += length;
            answered = 1;
        } else if (plain && type == CMD_WRITE && length <= l->max_write
                   && SIMPLE_SIZE <= cap - done->out_used
                   && all_set(l->present, 1, l->shift, offset, length)
                   && all_set(l->marked, 0, l->shift, offset, length)
                   && do_write(l, r + REQUEST_SIZE, offset, length)) {
            simple_reply(out + done->out_used, cookie);
            done->out_used += SIMPLE_SIZE;
            done->writes++;
            done->write_bytes += length;
            answered = 1;
        }
        if (!answered) { /* the protocol layer's, in order */
            if (rest == NULL)
                break;
            memcpy(rest + done->rest_used, r, whole);
            done->rest_used += whole;
        }
        pos += whole;
    }
    return pos;
}

/* What cachestat(2) takes and fills (linux/mman.h, Linux 6.5). */
struct lc_cachestat_range {
    uint64_t off, len;
};
struct lc_cachestat {
    uint64_t nr_cache, nr_dirty, nr_writeback, nr_evicted, nr_recently_evicted;
};

/* Whether a plain READ of [offset, offset+length) may be sent from the clone
 * file by the kernel (sendfile) without waiting for the disk: every region
 * present, and every page of the range in the page cache (cachestat). 1 yes,
 * 0 no, -1 this kernel cannot tell (no cachestat, or a filter refuses it: never
 * ask again). */
int lc_sendable(const struct lc_lane *l, uint64_t offset, uint32_t length)
{
    if (length == 0 || !all_set(l->present, 1, l->shift, offset, length))
        return 0;
    long page = sysconf(_SC_PAGESIZE);
    uint64_t first = offset / (uint64_t)page;
    uint64_t end = (offset + length + (uint64_t)page - 1) / (uint64_t)page;
    struct lc_cachestat_range range = { first * (uint64_t)page, (end - first) * (uint64_t)page };
    struct lc_cachestat st;
    if (syscall(__NR_cachestat, l->fd, &range, &st, 0) != 0)
        return errno == ENOSYS || errno == EPERM ? -1 : 0; /* EPERM: a seccomp filter */
    return st.nr_cache >= end - first;
}

static int64_t now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

/* Poll `fds` without sleeping, for up to `ns` nanoseconds (nbd/poll.py): 1 as
 * soon as one of them has an event, 0 once the time is up, -1 on an error of
 * poll(2) (errno says which). It runs without the GIL. */
int lc_poll(struct pollfd *fds, unsigned n, int64_t ns)
{
    int64_t end = now_ns() + ns;
    for (;;) {
        int r = poll(fds, n, 0);
        if (r > 0)
            return 1;
        if (r < 0 && errno != EINTR)
            return -1;
        if (now_ns() >= end)
            return 0;
    }
}

/* What lc_serve did. */
struct lc_served {
    size_t out_used;         /* bytes of replies in `out`, of the last batch */
    size_t sent;             /* of them, what the socket took: the rest is the caller's */
    uint64_t reads, read_bytes, writes, write_bytes; /* answered, all batches */
    int idle;                /* 1: nothing came within `ns`; 0: the event loop has work */
};

/* Poll as lc_poll does, and answer, here, the client fds[self] while what it
 * sends begins with plain READs and WRITEs that the lane answers (a client at
 * queue depth 1 sends one request at a time), so that these answers do not wait
 * for a turn of the event loop. What the client sent is read with MSG_PEEK; the
 * messages the lane answered, up to the first one it does not, are taken off the
 * socket and answered; from that one on, everything stays on the socket for the
 * event loop and the protocol layer, whole. So every message is either taken and
 * answered here or left untouched: none is done twice.
 *
 * Returns when nothing came within `ns` of the last answer (idle = 1), or (idle
 * = 0) when another fd has an event, the client sent what the lane does not
 * answer (or closed), the socket did not take all the replies (the caller sends
 * the rest: out[sent:out_used]), or `budget` ns have passed, so that the loop's
 * other work waits at most that long. `l` describes fds[self]'s lane; `in` has
 * `in_cap` bytes, `out` has `cap`. */
void lc_serve(const struct lc_lane *l, struct pollfd *fds, unsigned n, unsigned self,
              int64_t ns, int64_t budget, uint8_t *in, size_t in_cap, uint8_t *out,
              size_t cap, struct lc_served *s)
{
    int64_t start = now_ns(), end = start + ns;
    int fd = fds[self].fd;
    struct lc_done d;

    memset(s, 0, sizeof *s);
    for (;;) {
        int r = poll(fds, n, 0);
        if (r < 0 && errno != EINTR)
            return;
        if (r > 0) {
            for (unsigned i = 0; i < n; i++)
                if (fds[i].revents && (i != self || fds[i].revents != POLLIN))
                    return; /* another client, or this one closed or failed */
            ssize_t got = recv(fd, in, in_cap, MSG_PEEK | MSG_DONTWAIT);
            if (got <= 0)
                return;
            size_t used = lc_lane(l, in, (size_t)got, out, cap, NULL, &d);
            if (used == 0)
                return; /* its first message is the event loop's */
            if (recv(fd, in, used, MSG_DONTWAIT) != (ssize_t)used)
                return; /* cannot happen: what was peeked is there */
            s->reads += d.reads;
            s->read_bytes += d.read_bytes;
            s->writes += d.writes;
            s->write_bytes += d.write_bytes;
            s->out_used = d.out_used;
            s->sent = 0;
            while (s->sent < d.out_used) {
                ssize_t w = send(fd, out + s->sent, d.out_used - s->sent,
                                 MSG_DONTWAIT | MSG_NOSIGNAL);
                if (w < 0 && errno == EINTR)
                    continue;
                if (w <= 0)
                    return; /* full, or broken: the caller's transport says which */
                s->sent += (size_t)w;
            }
            if (used != (size_t)got)
                return; /* the rest is the event loop's */
            int64_t now = now_ns();
            if (now - start >= budget)
                return;
            end = now + ns;
            continue;
        }
        if (now_ns() >= end) {
            s->idle = 1;
            return;
        }
    }
}
