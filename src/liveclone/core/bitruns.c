/* The region map's runs and the copier's batch end, read from the map's bits in C.
 *
 * The same answers as RegionMap.runs and RegionMap.batch_end in Python (bit r of
 * byte r/8 set: region r present), without a Python object per run: a map the
 * guest fragmented has tens of thousands of runs per batch.
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

static int bit(const uint8_t *bits, uint64_t r)
{
    return bits[r >> 3] >> (r & 7) & 1;
}

/* The first region in [r, stop) whose bit is not `v`, or stop. */
static uint64_t run_end(const uint8_t *bits, uint64_t r, uint64_t stop, int v)
{
    const uint8_t same = v ? 0xFF : 0x00;
    while (r < stop && (r & 7)) {
        if (bit(bits, r) != v)
            return r;
        r++;
    }
    while (r + 64 <= stop) { /* whole words of the same bit */
        uint64_t w;
        memcpy(&w, bits + (r >> 3), 8);
        if (w != (v ? UINT64_MAX : 0))
            break;
        r += 64;
    }
    while (r + 8 <= stop && bits[r >> 3] == same)
        r += 8;
    while (r < stop && bit(bits, r) == v)
        r++;
    return r;
}

/* Edges of the runs of [start, stop): out[0] = start, then each region where the
 * bit changes, then stop. Return how many were written; `cap` must be at least
 * stop - start + 1. */
size_t lc_run_edges(const uint8_t *bits, uint64_t start, uint64_t stop, uint64_t *out,
                    size_t cap)
{
    size_t n = 0;
    uint64_t r = start;
    if (start >= stop || cap < 2)
        return 0;
    out[n++] = start;
    while (r < stop) {
        r = run_end(bits, r, stop, bit(bits, r));
        out[n++] = r;
    }
    return n;
}

/* RegionMap.batch_end: where a copy batch from `start` ends, at most `stop`;
 * max_reads 0 means no limit on separate reads. */
uint64_t lc_batch_end(const uint8_t *bits, uint64_t start, uint64_t stop, uint64_t budget,
                      uint64_t gap, uint64_t max_reads)
{
    uint64_t cost = 0, reads = 1, last = 0, r = start;
    int have_last = 0;
    while (r < stop) {
        int present = bit(bits, r);
        uint64_t end = run_end(bits, r, stop, present);
        if (!present) {
            if (have_last) { /* the present gap before this run */
                if (r - last <= gap) {
                    cost += r - last;
                } else {
                    cost += gap > 1 ? gap : 1;
                    reads++;
                }
                if (cost >= budget || (max_reads && reads > max_reads))
                    return last;
            }
            if (end - r >= budget - cost)
                return r + budget - cost;
            cost += end - r;
            last = end;
            have_last = 1;
        }
        r = end;
    }
    return stop;
}
