/* The NBD read lane: plain READs of present data, answered from the page cache.
 *
 * lc_lane_reads() walks the whole requests in a buffer the client sent. It
 * answers each one that is a READ with no flags, of 1..max_block bytes within
 * the export, whose regions are all present (or every region is: bits == NULL)
 * and whose bytes the page cache holds (preadv2 with RWF_NOWAIT), by appending
 * its reply (simple, or one OFFSET_DATA chunk with structured replies) to `out`.
 * Every other message it copies, in order, to `rest`, which the caller gives to
 * the protocol layer to validate and answer as any other (NBD lets a server
 * answer requests in flight in any order), as it does a READ whose reply would
 * not fit in what is left of `cap`. It stops at a partial message, at DISC or
 * at a bad magic: what it did not reach goes to the protocol layer too.
 *
 * Accepting only what validate_request's own fast path accepts means the lane
 * never answers a request the protocol layer would reject. It does no other I/O
 * than that pread: the caller sends `out`. It runs without the GIL (cffi lets
 * it go), so its reads overlap the other threads' work.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/uio.h>

#ifndef RWF_NOWAIT
#define RWF_NOWAIT 0x00000008
#endif

#define REQUEST_SIZE 28
#define REQUEST_MAGIC 0x25609513u
#define SIMPLE_MAGIC 0x67446698u
#define STRUCTURED_MAGIC 0x668e33efu
#define SIMPLE_SIZE 16
#define CHUNK_SIZE 28 /* structured header (20) and the chunk's offset (8) */

struct lc_lane {
    int fd;                /* the clone file */
    int structured;        /* structured replies negotiated */
    uint32_t max_block;    /* largest READ the export takes */
    uint32_t shift;        /* log2 of the region size */
    uint64_t size;         /* the export's size */
    const uint8_t *bits;   /* present regions, bit r of byte r/8; NULL: all */
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

static int all_present(const struct lc_lane *l, uint64_t offset, uint32_t length)
{
    if (l->bits == NULL)
        return 1;
    uint64_t r = offset >> l->shift, last = (offset + length - 1) >> l->shift;
    for (; r <= last; r++)
        if (!(l->bits[r >> 3] >> (r & 7) & 1))
            return 0;
    return 1;
}

size_t lc_lane_reads(const struct lc_lane *l, const uint8_t *in, size_t n,
                     uint8_t *out, size_t cap, size_t *out_used,
                     uint8_t *rest, size_t *rest_used,
                     uint64_t *count, uint64_t *nbytes)
{
    size_t pos = 0, used = 0, kept = 0;
    uint64_t answered = 0, total = 0;
    size_t header = l->structured ? CHUNK_SIZE : SIMPLE_SIZE;

    while (n - pos >= REQUEST_SIZE) {
        const uint8_t *r = in + pos;
        uint32_t magic = get32(r);
        uint16_t flags = (uint16_t)(r[4] << 8 | r[5]);
        uint16_t type = (uint16_t)(r[6] << 8 | r[7]);
        const uint8_t *cookie = r + 8;
        uint64_t offset = get64(r + 16);
        uint32_t length = get32(r + 24);

        if (magic != REQUEST_MAGIC || type == 2 /* DISC */)
            break; /* the protocol layer's to judge, with all that follows */
        if (flags != 0 || type != 0 /* READ */ || length == 0 || length > l->max_block
            || offset > l->size || length > l->size - offset
            || header + length > cap - used || !all_present(l, offset, length)) {
            /* Not ours: pass the whole message on (a WRITE with its payload,
             * framed as the protocol layer frames it, whatever its length). */
            size_t whole = REQUEST_SIZE + (type == 1 /* WRITE */ ? (size_t)length : 0);
            if (whole > n - pos)
                break;
            memcpy(rest + kept, r, whole);
            kept += whole;
            pos += whole;
            continue;
        }
        uint8_t *reply = out + used;
        struct iovec iov = { reply + header, length };
        ssize_t got = preadv2(l->fd, &iov, 1, (off_t)offset, RWF_NOWAIT);
        if (got != (ssize_t)length) {
            /* Not all cached (or an error): the protocol layer's path reads it
             * in a worker thread, and reports any error. */
            memcpy(rest + kept, r, REQUEST_SIZE);
            kept += REQUEST_SIZE;
            pos += REQUEST_SIZE;
            continue;
        }
        if (l->structured) {
            put32(reply, STRUCTURED_MAGIC);
            put16(reply + 4, 1); /* NBD_REPLY_FLAG_DONE */
            put16(reply + 6, 1); /* NBD_REPLY_TYPE_OFFSET_DATA */
            memcpy(reply + 8, cookie, 8);
            put32(reply + 16, length + 8);
            put64(reply + 20, offset);
        } else {
            put32(reply, SIMPLE_MAGIC);
            put32(reply + 4, 0);
            memcpy(reply + 8, cookie, 8);
        }
        used += header + length;
        answered++;
        total += length;
        pos += REQUEST_SIZE;
    }
    *out_used = used;
    *rest_used = kept;
    *count = answered;
    *nbytes = total;
    return pos;
}
