/* Writing a fill's runs into the clone file, many in one call without the GIL.
 *
 * A fill of a map the guest fragmented puts tens of thousands of small runs
 * (4 KiB pieces between present regions). One pwrite each from Python costs a
 * GIL release and re-take per run, and the copier's workers queue on the GIL
 * for every one. Here a whole read's runs go in one call: for each run, its
 * all-zero blocks (aligned to the clone, `zb` bytes) become holes and the data
 * between them is written, the same decisions as FillEngine._put in Python.
 *
 * Only the given runs are written or punched, never a byte between them: the
 * gaps are present regions (invariant 4).
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>

static int all_zero(const uint8_t *p, size_t n)
{
    return n == 0 || (p[0] == 0 && memcmp(p, p + 1, n - 1) == 0);
}

/* Punch [start, end) out of the clone, keeping its size. */
static int punch(int fd, uint64_t start, uint64_t end)
{
    while (fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                     (off_t)start, (off_t)(end - start)) != 0) {
        if (errno != EINTR)
            return errno;
    }
    return 0;
}

/* Write all of [p, p+n) at `off`; *progress follows the bytes written. */
static int write_all(int fd, const uint8_t *p, size_t n, uint64_t off, uint64_t *progress)
{
    while (n > 0) {
        ssize_t w = pwrite(fd, p, n, (off_t)off);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return errno;
        }
        if (w == 0)
            return EIO;
        p += w;
        n -= (size_t)w;
        off += (uint64_t)w;
        *progress = off;
    }
    return 0;
}

/* Put `n` runs: runs[2k], runs[2k+1] are the clone offsets [start, end) of run k,
 * sorted and apart; its bytes are at ptrs[k], or at buf + (start - base) when
 * `ptrs` is NULL. Return 0, or the errno of the first failure. *progress is set
 * to an offset below which every byte of the runs is written or punched. */
int lc_put_runs(int fd, const uint8_t *buf, uint64_t base, const uint64_t *runs,
                uint8_t **ptrs, size_t n, uint64_t zb, uint64_t *progress)
{
    uint64_t hole_start = 0, hole_end = 0; /* a zero stretch not punched yet */
    int err;
    for (size_t k = 0; k < n; k++) {
        uint64_t off = runs[2 * k], len = runs[2 * k + 1] - off;
        const uint8_t *d = ptrs ? ptrs[k] : buf + (off - base);
        uint64_t i = 0;
        while (i < len) {
            uint64_t j = (off + i) / zb * zb + zb - off;
            if (j > len)
                j = len;
            if (all_zero(d + i, (size_t)(j - i))) {
                if (hole_end != off + i) { /* not a continuation: punch the last */
                    if (hole_end > hole_start && (err = punch(fd, hole_start, hole_end)))
                        return err;
                    if (hole_end > hole_start)
                        *progress = hole_end;
                    hole_start = off + i;
                }
                hole_end = off + j;
                i = j;
                continue;
            }
            if (hole_end > hole_start) {
                if ((err = punch(fd, hole_start, hole_end)))
                    return err;
                *progress = hole_end;
                hole_start = hole_end = 0;
            }
            uint64_t e = j; /* extend over the following non-zero blocks */
            while (e < len && !all_zero(d + e, (size_t)(e + zb <= len ? zb : len - e)))
                e += zb;
            if (e > len)
                e = len;
            if ((err = write_all(fd, d + i, (size_t)(e - i), off + i, progress)))
                return err;
            i = e;
        }
    }
    if (hole_end > hole_start) {
        if ((err = punch(fd, hole_start, hole_end)))
            return err;
        *progress = hole_end;
    }
    return 0;
}
