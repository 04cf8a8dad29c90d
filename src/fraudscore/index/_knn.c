/*
 * fraudscore.index._knn — the compiled core: parse the reference file, build
 * the index, and answer exact k = 5 nearest-neighbour queries over it.
 *
 * Exactness.  The contract's answers come from a brute force in double
 * precision: d(q, r) = sum over the 14 dimensions, in order, of (q_d - r_d)^2
 * with r_d the double nearest to the file's 4-decimal value, ties broken by
 * the lower position in the file.  Here every reference value is stored as
 * K = r * 10000 (an exact int16).  Pruning and the first filter run on
 * integers: the query is rounded to Qi = round(q * 10000), and
 * I(p) = sum (Qi_d - K_d)^2 is computed exactly in int32.  With
 * e = q * 10000 - Qi (|e_d| <= 0.5) the triangle inequality gives
 *     | sqrt(I(p)) - sqrt(1e8 * d(q, p)) | <= ||e|| = E        (1)
 * so a point can only enter the top 5 if sqrt(I(p)) <= sqrt(1e8 * d5) + E,
 * where d5 is the fifth-best exact distance seen so far.  Every point that
 * passes that test gets its distance computed exactly as the brute force
 * does; tree nodes whose integer lower bound fails it are skipped.  Nothing
 * that could be in the answer is ever skipped, so the answer is the brute
 * force's answer.
 *
 * Layout.  Dimensions 9, 10, 11 (0/1) and the -1 sentinels of 5 and 6 split
 * the references into groups; inside a group those dimensions are constant
 * and contribute one exact offset, so only the other (at most 11) are stored.
 * Each group is a wide KD-tree: an internal node is a run of up to 2^levels
 * child entries, each with the tight bounding box of its points, so a
 * descent costs a few cache misses rather than one per binary level (the
 * search is bound by memory latency, not arithmetic).  The search runs in
 * rounds of growing radius, so pruning is tight from the first leaf on
 * rather than only once good candidates happen to be found (see search()).  Leaves hold blocks
 * of 8 points stored as pairs of dimensions, [pair][point][2] int16, so one
 * _mm256_madd_epi16 yields d_a^2 + d_b^2 for 8 points at once.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "knn_api.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define HAVE_X86 1
#endif

#define DIMS 14
_Static_assert(DIMS == FS_KNN_DIMS, "knn_api.h and _knn.c disagree on the dimensions");
#define SCALE 10000
#define MAX_STORED 12 /* stored dimensions, padded to an even count */
#define MAX_PAIRS (MAX_STORED / 2)
#define LANES 8
#define K 5
_Static_assert(K == FS_KNN_K, "knn_api.h and _knn.c disagree on K");
#define MAX_K 64
#define STACK_DEPTH 1024
#define FORMAT_VERSION 3 /* 3: a whole-file checksum in the header; every tree entry checked at open */
#define MAX_FANOUT_LEVELS 5

static const char MAGIC[8] = {'F', 'S', 'K', 'N', 'N', 'I', 'D', 'X'};

/* ------------------------------------------------------------------ */
/* The file format (little-endian, every section 64-byte aligned).     */
/* ------------------------------------------------------------------ */

typedef struct {
    char magic[8];
    uint32_t version;     /* magic and version stay where every version had them */
    uint32_t header_size;
    uint64_t checksum;    /* XXH64 (seed 0) of bytes [CHECKSUMMED_FROM, file_size) */
    uint64_t n_points;
    uint64_t n_slots; /* points plus the padding slots of partial blocks */
    uint32_t n_groups;
    uint32_t leaf_size;
    uint64_t n_entries;
    uint64_t groups_off, entries_off, blocks_off, ids_off, file_size;
    uint8_t sha256[32]; /* of the uncompressed reference file */
    uint64_t n_fraud;
} file_header_t;

typedef struct {
    uint32_t key;      /* bit 0..2: dims 9..11; bit 3: dim 5 is -1; bit 4: dim 6 is -1 */
    uint32_t n_points;
    uint32_t n_stored; /* padded to even */
    uint32_t n_pairs;
    uint32_t root;     /* entry index */
    uint32_t n_entries;
    uint32_t n_blocks;
    uint32_t reserved;
    uint64_t block_off; /* bytes from the blocks section */
    uint64_t slot_off;  /* first slot in the ids section */
    uint8_t stored[MAX_STORED]; /* original dimension of each stored position, 255 = padding */
    int16_t constant[DIMS];     /* values of the dimensions that are not stored */
    uint8_t pad[128 - 48 - MAX_STORED - 2 * DIMS];
} group_t;

/* A tree entry: the bounding box of a subtree, and where the subtree is.
 * count > 0: a leaf of count points from block `link` (within its group);
 * count < 0: -count child entries from entry `link`. */
typedef struct {
    int16_t lo[MAX_STORED];
    int16_t hi[MAX_STORED];
    int32_t link;
    int32_t count;
    int32_t reserved[2];
} entry_t;

_Static_assert(sizeof(group_t) == 128, "group_t is 128 bytes");
_Static_assert(sizeof(entry_t) == 64, "entry_t is 64 bytes");
#define MAX_FANOUT (1 << MAX_FANOUT_LEVELS)
_Static_assert(sizeof(file_header_t) <= 256, "header fits");
#define CHECKSUMMED_FROM (offsetof(file_header_t, checksum) + sizeof(uint64_t))
_Static_assert(offsetof(file_header_t, checksum) == 16, "the checksum's place is part of the format");

#define HEADER_BYTES 4096
#define ID_PADDING 0xFFFFFFFFu
#define ID_FRAUD 0x80000000u
#define ID_POS 0x7FFFFFFFu

static double LUT[2 * SCALE + 1]; /* LUT[K + SCALE] == K / 10000.0, the double the JSON parser gives */

static inline double ref_value(int k) { return LUT[k + SCALE]; }

static uint64_t align64(uint64_t x) { return (x + 63u) & ~(uint64_t)63u; }

/* ------------------------------------------------------------------ */
/* The file's checksum: XXH64 (seed 0), written from its specification. */
/* Chosen because it is the fastest well-known 64-bit hash that portable */
/* scalar C computes identically everywhere (about 1 byte per cycle per */
/* lane, four lanes): the 91 MB file hashes in a few tens of ms, so the */
/* check costs /ready almost nothing, and a 64-bit result makes a random */
/* damage that keeps the sum a 2^-64 event.  It is not a defence against */
/* a crafted file (anyone can recompute it): the structural checks are. */
/* ------------------------------------------------------------------ */

#define XXH_P1 0x9E3779B185EBCA87ull
#define XXH_P2 0xC2B2AE3D27D4EB4Full
#define XXH_P3 0x165667B19E3779F9ull
#define XXH_P4 0x85EBCA77C2B2AE63ull
#define XXH_P5 0x27D4EB2F165667C5ull

static inline uint64_t rotl64(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }
static inline uint64_t read64(const unsigned char *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static inline uint32_t read32(const unsigned char *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline uint64_t xxh_round(uint64_t acc, uint64_t lane) { return rotl64(acc + lane * XXH_P2, 31) * XXH_P1; }
static inline uint64_t xxh_merge(uint64_t h, uint64_t v) { return (h ^ xxh_round(0, v)) * XXH_P1 + XXH_P4; }

static uint64_t xxh64(const void *data, size_t len) {
    const unsigned char *p = data, *end = p + len;
    uint64_t h;
    if (len >= 32) {
        uint64_t v1 = XXH_P1 + XXH_P2, v2 = XXH_P2, v3 = 0, v4 = (uint64_t)0 - XXH_P1;
        const unsigned char *last = end - 32;
        do {
            v1 = xxh_round(v1, read64(p)); v2 = xxh_round(v2, read64(p + 8));
            v3 = xxh_round(v3, read64(p + 16)); v4 = xxh_round(v4, read64(p + 24));
            p += 32;
        } while (p <= last);
        h = rotl64(v1, 1) + rotl64(v2, 7) + rotl64(v3, 12) + rotl64(v4, 18);
        h = xxh_merge(h, v1); h = xxh_merge(h, v2); h = xxh_merge(h, v3); h = xxh_merge(h, v4);
    } else {
        h = XXH_P5;
    }
    h += (uint64_t)len;
    for (; end - p >= 8; p += 8) h = rotl64(h ^ xxh_round(0, read64(p)), 27) * XXH_P1 + XXH_P4;
    if (end - p >= 4) { h = rotl64(h ^ (uint64_t)read32(p) * XXH_P1, 23) * XXH_P2 + XXH_P3; p += 4; }
    for (; p < end; p++) h = rotl64(h ^ (uint64_t)*p * XXH_P5, 11) * XXH_P1;
    h ^= h >> 33; h *= XXH_P2; h ^= h >> 29; h *= XXH_P3; h ^= h >> 32;
    return h;
}

/* The checksum an index file of len bytes (len >= CHECKSUMMED_FROM) should carry. */
static uint64_t file_checksum(const char *base, size_t len) {
    return xxh64(base + CHECKSUMMED_FROM, len - CHECKSUMMED_FROM);
}

PyDoc_STRVAR(checksum_doc,
"checksum($module, data, /)\n--\n\n"
"XXH64 (seed 0) of data.  An index file's header holds the XXH64 of its bytes\n"
"from offset 24 (just after the checksum field) to the end.");

static PyObject *py_checksum(PyObject *self, PyObject *obj) {
    Py_buffer buf;
    if (PyObject_GetBuffer(obj, &buf, PyBUF_SIMPLE) < 0) return NULL;
    uint64_t h;
    Py_BEGIN_ALLOW_THREADS
    h = xxh64(buf.buf, (size_t)buf.len);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&buf);
    return PyLong_FromUnsignedLongLong(h);
}

/* ------------------------------------------------------------------ */
/* Reference parser: a streaming reader of [{"vector":[...],"label":...}] */
/* ------------------------------------------------------------------ */

enum { PS_START = 0, PS_FIRST = 1, PS_NEXT = 2, PS_DONE = 3 };

typedef struct {
    const char *base;
    long long base_offset;
    char message[200];
} perr_t;

static int perr(perr_t *e, const char *at, const char *what) {
    snprintf(e->message, sizeof e->message, "%s at byte %lld", what,
             e->base_offset + (long long)(at - e->base));
    return -1;
}

static const char *skip_ws(const char *p, const char *end) {
    while (p < end && (*p == ' ' || *p == '\n' || *p == '\r' || *p == '\t')) p++;
    return p;
}

/* A JSON number with at most 4 decimals, in [-1, 1], as an exact int * 10000. */
static int parse_fixed4(const char **pp, const char *end, int32_t *out, perr_t *e) {
    const char *p = *pp;
    int neg = 0;
    uint64_t mant = 0;
    int digits = 0, frac = 0, exp10 = 0;
    if (p < end && *p == '-') { neg = 1; p++; }
    if (p >= end || *p < '0' || *p > '9') return perr(e, p, "expected a number");
    while (p < end && *p >= '0' && *p <= '9') {
        if (digits < 18) { mant = mant * 10 + (uint64_t)(*p - '0'); digits++; }
        else if (*p != '0') return perr(e, p, "number has too many digits");
        else exp10++;
        p++;
    }
    if (p < end && *p == '.') {
        p++;
        if (p >= end || *p < '0' || *p > '9') return perr(e, p, "expected a digit after '.'");
        while (p < end && *p >= '0' && *p <= '9') {
            if (digits < 18) { mant = mant * 10 + (uint64_t)(*p - '0'); digits++; frac++; }
            else if (*p != '0') return perr(e, p, "number has too many digits");
            p++;
        }
    }
    if (p < end && (*p == 'e' || *p == 'E')) {
        int eneg = 0, ev = 0;
        p++;
        if (p < end && (*p == '+' || *p == '-')) { eneg = (*p == '-'); p++; }
        if (p >= end || *p < '0' || *p > '9') return perr(e, p, "bad exponent");
        while (p < end && *p >= '0' && *p <= '9') { if (ev < 1000) ev = ev * 10 + (*p - '0'); p++; }
        exp10 += eneg ? -ev : ev;
    }
    int shift = exp10 - frac + 4; /* value * 10^4 == mant * 10^shift */
    if (mant == 0) shift = 0;
    while (shift > 0) {
        if (mant > (uint64_t)SCALE) break;
        mant *= 10; shift--;
    }
    while (shift < 0) {
        if (mant % 10) return perr(e, *pp, "value has more than 4 decimals");
        mant /= 10; shift++;
    }
    if (shift > 0 || mant > (uint64_t)SCALE) return perr(e, *pp, "value outside [-1, 1]");
    *out = neg ? -(int32_t)mant : (int32_t)mant;
    *pp = p;
    return 0;
}

/* One {"vector": [...], "label": "..."} object in [p, close]. */
static int parse_record(const char *p, const char *close, int16_t *vec, uint8_t *label, perr_t *e) {
    int have_vec = 0, have_label = 0;
    p = skip_ws(p + 1, close);
    for (;;) {
        if (*p != '"') return perr(e, p, "expected a key");
        const char *key = ++p;
        while (p < close && *p != '"') p++;
        size_t klen = (size_t)(p - key);
        p = skip_ws(p + 1, close);
        if (*p != ':') return perr(e, p, "expected ':'");
        p = skip_ws(p + 1, close);
        if (klen == 6 && memcmp(key, "vector", 6) == 0) {
            if (*p != '[') return perr(e, p, "\"vector\" must be an array");
            p = skip_ws(p + 1, close);
            for (int d = 0; d < DIMS; d++) {
                int32_t v;
                if (parse_fixed4(&p, close, &v, e)) return -1;
                vec[d] = (int16_t)v;
                p = skip_ws(p, close);
                if (d < DIMS - 1) {
                    if (*p != ',') return perr(e, p, "\"vector\" must have 14 numbers");
                    p = skip_ws(p + 1, close);
                }
            }
            if (*p != ']') return perr(e, p, "\"vector\" must have 14 numbers");
            p++;
            have_vec = 1;
        } else if (klen == 5 && memcmp(key, "label", 5) == 0) {
            if (close - p >= 7 && memcmp(p, "\"fraud\"", 7) == 0) *label = 1;
            else if (close - p >= 7 && memcmp(p, "\"legit\"", 7) == 0) *label = 0;
            else return perr(e, p, "\"label\" must be \"fraud\" or \"legit\"");
            p += 7;
            have_label = 1;
        } else {
            return perr(e, key, "unknown key (expected \"vector\" and \"label\")");
        }
        p = skip_ws(p, close);
        if (*p == ',') { p = skip_ws(p + 1, close); continue; }
        if (p == close) break;
        return perr(e, p, "expected ',' or '}'");
    }
    if (!have_vec || !have_label) return perr(e, close, "record needs both \"vector\" and \"label\"");
    return 0;
}

PyDoc_STRVAR(parse_references_doc,
"parse_references($module, chunk, state, final, offset, /)\n--\n\n"
"-> (consumed, state, vectors, labels)\n\n"
"Parse the complete records at the start of chunk (bytes of the reference\n"
"JSON array). Returns how many bytes were consumed, the new parser state, the\n"
"records' vectors (int16 * 14 each, value * 10000) and labels (1 = fraud).");

static PyObject *py_parse_references(PyObject *self, PyObject *args) {
    Py_buffer buf;
    int state, final;
    long long offset;
    if (!PyArg_ParseTuple(args, "y*ipL", &buf, &state, &final, &offset)) return NULL;
    const char *start = buf.buf, *end = start + buf.len, *p = start, *consumed = start;
    Py_ssize_t cap = buf.len / 40 + 1; /* a record is at least ~60 bytes */
    int16_t *vecs = PyMem_Malloc((size_t)cap * DIMS * sizeof(int16_t));
    uint8_t *labels = PyMem_Malloc((size_t)cap);
    Py_ssize_t n = 0;
    perr_t e = {start, offset, {0}};
    int failed = 0;
    if (!vecs || !labels) { PyBuffer_Release(&buf); PyMem_Free(vecs); PyMem_Free(labels); return PyErr_NoMemory(); }

    Py_BEGIN_ALLOW_THREADS
    for (;;) {
        p = skip_ws(p, end);
        if (p == end) break;
        if (state == PS_START) {
            if (*p != '[') { failed = perr(&e, p, "the reference file must be a JSON array"); break; }
            p++; state = PS_FIRST; consumed = p; continue;
        }
        if (state == PS_DONE) { failed = perr(&e, p, "unexpected data after the closing ']'"); break; }
        if (*p == ']') { p++; state = PS_DONE; consumed = p; continue; }
        if (state == PS_NEXT) {
            if (*p != ',') { failed = perr(&e, p, "expected ',' between records"); break; }
            p = skip_ws(p + 1, end);
            if (p == end) break;
        }
        if (*p != '{') { failed = perr(&e, p, "expected a record object"); break; }
        const char *close = memchr(p, '}', (size_t)(end - p));
        if (!close) break; /* incomplete: wait for more bytes */
        if (n >= cap) { failed = perr(&e, p, "internal: record buffer full"); break; }
        if (parse_record(p, close, vecs + n * DIMS, labels + n, &e)) { failed = -1; break; }
        n++;
        p = close + 1;
        state = PS_NEXT;
        consumed = p;
    }
    if (!failed && final) {
        const char *rest = skip_ws(consumed, end);
        if (rest != end) failed = perr(&e, rest, "truncated record at end of file");
        else if (state != PS_DONE) failed = perr(&e, end, "missing closing ']'");
    }
    Py_END_ALLOW_THREADS

    PyBuffer_Release(&buf);
    if (failed) {
        PyMem_Free(vecs); PyMem_Free(labels);
        PyErr_SetString(PyExc_ValueError, e.message);
        return NULL;
    }
    PyObject *r = Py_BuildValue("(nly#y#)", (Py_ssize_t)(consumed - start), (long)state,
                                (const char *)vecs, n * DIMS * (Py_ssize_t)sizeof(int16_t),
                                (const char *)labels, n);
    PyMem_Free(vecs); PyMem_Free(labels);
    return r;
}

/* ------------------------------------------------------------------ */
/* Index builder                                                       */
/* ------------------------------------------------------------------ */

typedef struct {
    const int16_t *vecs;
    const uint8_t *labels;
    int leaf_size;
    int levels; /* binary splits folded into one node: fan-out up to 2^levels */
    /* growing outputs */
    entry_t *entries; size_t n_entries, cap_entries;
    int16_t *blocks; size_t n_block_vals, cap_block_vals;
    uint32_t *ids; size_t n_slots, cap_slots;
    /* the group being built */
    const group_t *g;
    uint32_t group_blocks;
} builder_t;

static int grow(void **p, size_t *cap, size_t need, size_t item) {
    if (need <= *cap) return 0;
    size_t c = *cap ? *cap : 1024;
    while (c < need) c *= 2;
    void *q = realloc(*p, c * item);
    if (!q) return -1;
    *p = q; *cap = c;
    return 0;
}

static inline int16_t stored_value(const builder_t *b, uint32_t idx, int s) {
    int d = b->g->stored[s];
    return d == 255 ? 0 : b->vecs[(size_t)idx * DIMS + d];
}

/* Reorder idx[0..n) so that idx[m] holds the m-th smallest on stored position s. */
static void select_nth(const builder_t *b, uint32_t *idx, size_t n, size_t m, int s) {
    size_t lo = 0, hi = n; /* [lo, hi) still to partition */
    while (hi - lo > 1) {
        int16_t a = stored_value(b, idx[lo], s), c = stored_value(b, idx[hi - 1], s),
                mid = stored_value(b, idx[lo + (hi - lo) / 2], s);
        int16_t pivot = a < c ? (mid < a ? a : (mid > c ? c : mid)) : (mid < c ? c : (mid > a ? a : mid));
        /* three-way partition: [lo, lt) < pivot, [lt, gt) == pivot, [gt, hi) > pivot */
        size_t lt = lo, i = lo, gt = hi;
        while (i < gt) {
            int16_t v = stored_value(b, idx[i], s);
            if (v < pivot) { uint32_t t = idx[lt]; idx[lt++] = idx[i]; idx[i++] = t; }
            else if (v > pivot) { uint32_t t = idx[--gt]; idx[gt] = idx[i]; idx[i] = t; }
            else i++;
        }
        if (m < lt) hi = lt;
        else if (m >= gt) lo = gt;
        else return;
    }
}

static void bounding_box(const builder_t *b, const uint32_t *idx, size_t n, entry_t *e) {
    int ns = (int)b->g->n_stored;
    for (int s = 0; s < ns; s++) { e->lo[s] = INT16_MAX; e->hi[s] = INT16_MIN; }
    for (size_t i = 0; i < n; i++)
        for (int s = 0; s < ns; s++) {
            int16_t v = stored_value(b, idx[i], s);
            if (v < e->lo[s]) e->lo[s] = v;
            if (v > e->hi[s]) e->hi[s] = v;
        }
}

static int widest(const builder_t *b, const entry_t *e) {
    int split = -1, spread = 0;
    for (int s = 0; s < (int)b->g->n_stored; s++)
        if (e->hi[s] - e->lo[s] > spread) { spread = e->hi[s] - e->lo[s]; split = s; }
    return split;
}

/* A leaf: ceil(n / 8) blocks; padding slots repeat the last point and carry ID_PADDING. */
static int emit_leaf(builder_t *b, const uint32_t *idx, size_t n, entry_t *e) {
    size_t nb = (n + LANES - 1) / LANES, np = b->g->n_pairs;
    if (grow((void **)&b->blocks, &b->cap_block_vals, b->n_block_vals + nb * np * 2 * LANES, sizeof(int16_t)) ||
        grow((void **)&b->ids, &b->cap_slots, b->n_slots + nb * LANES, sizeof(uint32_t)))
        return -1;
    for (size_t blk = 0; blk < nb; blk++) {
        int16_t *out_vals = b->blocks + b->n_block_vals + blk * np * 2 * LANES;
        for (int j = 0; j < LANES; j++) {
            size_t i = blk * LANES + (size_t)j;
            uint32_t p = idx[i < n ? i : n - 1];
            for (size_t s = 0; s < np * 2; s++)
                out_vals[(s / 2) * 2 * LANES + (size_t)j * 2 + (s & 1)] = stored_value(b, p, (int)s);
            b->ids[b->n_slots + blk * LANES + (size_t)j] = i < n ? (p | (b->labels[p] ? ID_FRAUD : 0u)) : ID_PADDING;
        }
    }
    b->n_block_vals += nb * np * 2 * LANES;
    b->n_slots += nb * LANES;
    e->link = (int32_t)b->group_blocks;
    e->count = (int32_t)n;
    b->group_blocks += (uint32_t)nb;
    return 0;
}

/* Where to split idx[0..n): on the dimension whose values leave the widest empty gap near the
 * median, if that gap is at least MIN_GAP.  Those are the discrete dimensions (weekday, hour,
 * installments, ...): near neighbours rarely cross such a gap, so the boxes on either side
 * prune each other.  Otherwise the median of the widest dimension.  Sets *m (left count) and
 * leaves idx partitioned there; returns the dimension, or -1 when no dimension varies. */
#ifndef MIN_GAP
#define MIN_GAP 100
#endif
static int choose_split(const builder_t *b, uint32_t *idx, size_t n, const entry_t *box, size_t *m) {
    int ns = (int)b->g->n_stored, best = -1;
    int32_t best_gap = MIN_GAP - 1;
    size_t best_m = 0, min_side = n / 8 ? n / 8 : 1;
    for (int s = 0; s < ns; s++) {
        if (box->hi[s] == box->lo[s]) continue;
        select_nth(b, idx, n, n / 2, s);
        int16_t v = stored_value(b, idx[n / 2], s), below = INT16_MIN, above = INT16_MAX;
        size_t lt = 0, le = 0;
        for (size_t i = 0; i < n; i++) {
            int16_t x = stored_value(b, idx[i], s);
            if (x < v) { lt++; if (x > below) below = x; }
            else if (x == v) le++;
            else if (x < above) above = x;
        }
        le += lt;
        /* two boundaries around the median's run of equal values: take the more balanced one that is allowed */
        int32_t gap = -1;
        size_t at = 0;
        int ok_lo = lt >= min_side && n - lt >= min_side, ok_hi = le >= min_side && n - le >= min_side;
        if (ok_lo && (!ok_hi || n / 2 - lt <= le - n / 2)) { gap = v - below; at = lt; }
        else if (ok_hi) { gap = above - v; at = le; }
        if (gap > best_gap) { best_gap = gap; best = s; best_m = at; }
    }
    if (best >= 0) {
        select_nth(b, idx, n, best_m, best); /* a boundary between distinct values: a clean partition */
        *m = best_m;
        return best;
    }
    int split = widest(b, box);
    if (split < 0) return -1;
    *m = ((n + 15) / 16) * LANES; /* a multiple of 8 near the median, so leaves fill whole blocks */
    if (*m >= n) *m = n / 2;
    select_nth(b, idx, n, *m, split);
    return split;
}

/* Fill entry `at` with the subtree of idx[0..n): a leaf, or up to 2^levels children made by
 * that many rounds of median splits on the widest dimension, stored side by side. */
static int build_entry(builder_t *b, uint32_t *idx, size_t n, size_t at) {
    entry_t e;
    memset(&e, 0, sizeof e);
    bounding_box(b, idx, n, &e);
    if (n <= (size_t)b->leaf_size || widest(b, &e) < 0) {
        if (emit_leaf(b, idx, n, &e)) return -1;
        b->entries[at] = e;
        return 0;
    }
    size_t start[MAX_FANOUT + 1], parts = 1;
    start[0] = 0; start[1] = n;
    for (int level = 0; level < b->levels; level++) {
        size_t next[MAX_FANOUT + 1], np = 0;
        next[0] = 0;
        for (size_t i = 0; i < parts; i++) {
            size_t a = start[i], len = start[i + 1] - a;
            entry_t box;
            size_t m;
            if (len > (size_t)b->leaf_size) {
                bounding_box(b, idx + a, len, &box);
                if (choose_split(b, idx + a, len, &box, &m) >= 0) next[++np] = a + m;
            }
            next[++np] = a + len;
        }
        memcpy(start, next, (np + 1) * sizeof(size_t));
        parts = np;
    }
    if (grow((void **)&b->entries, &b->cap_entries, b->n_entries + parts, sizeof(entry_t))) return -1;
    size_t first = b->n_entries;
    b->n_entries += parts;
    for (size_t i = 0; i < parts; i++)
        if (build_entry(b, idx + start[i], start[i + 1] - start[i], first + i)) return -1;
    e.link = (int32_t)first;
    e.count = -(int32_t)parts;
    b->entries[at] = e;
    return 0;
}

static uint32_t group_key(const int16_t *v) {
    return (uint32_t)(v[9] == SCALE) | (uint32_t)(v[10] == SCALE) << 1 | (uint32_t)(v[11] == SCALE) << 2 |
           (uint32_t)(v[5] == -SCALE) << 3 | (uint32_t)(v[6] == -SCALE) << 4;
}

/* What a group's key fixes: which dimensions are constant (and their value), which are stored
 * and where.  The builder lays groups out with it and the reader checks them against it. */
static void group_layout(uint32_t key, group_t *g) {
    g->key = key;
    memset(g->constant, 0, sizeof g->constant);
    int ns = 0;
    for (int d = 0; d < DIMS; d++) {
        int constant = (d >= 9 && d <= 11) || (d == 5 && (key & 8)) || (d == 6 && (key & 16));
        if (constant) g->constant[d] = (int16_t)((d == 5 || d == 6) ? -SCALE : ((key >> (d - 9)) & 1 ? SCALE : 0));
        else g->stored[ns++] = (uint8_t)d;
    }
    if (ns & 1) g->stored[ns++] = 255;
    for (int s = ns; s < MAX_STORED; s++) g->stored[s] = 255;
    g->n_stored = (uint32_t)ns;
    g->n_pairs = (uint32_t)ns / 2;
}

PyDoc_STRVAR(build_index_doc,
"build_index($module, /, vectors, labels, sha256, leaf_size=64, fanout_levels=3)\n--\n\n"
"Build the index file's bytes from int16 vectors (value * 10000, 14 per\n"
"reference, in file order) and labels (one byte each, 1 = fraud).");

static PyObject *py_build_index(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"vectors", "labels", "sha256", "leaf_size", "fanout_levels", NULL};
    Py_buffer vb, lb, hb;
    int leaf_size = 64, levels = 3;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "y*y*y*|ii", kwlist, &vb, &lb, &hb, &leaf_size, &levels)) return NULL;
    PyObject *result = NULL;
    size_t n = (size_t)lb.len;
    const int16_t *vecs = vb.buf;
    const uint8_t *labels = lb.buf;
    uint32_t *idx = NULL, counts[32] = {0};
    group_t groups[32];
    builder_t b;
    memset(&b, 0, sizeof b);
    memset(groups, 0, sizeof groups);
    char msg[160] = {0};

    if ((size_t)vb.len != n * DIMS * sizeof(int16_t)) { snprintf(msg, sizeof msg, "vectors and labels disagree on the number of references"); goto fail; }
    if (hb.len != 32) { snprintf(msg, sizeof msg, "sha256 must be 32 bytes"); goto fail; }
    if (n == 0 || n > ID_POS) { snprintf(msg, sizeof msg, "need between 1 and 2^31-1 references, got %zu", n); goto fail; }
    if (leaf_size < LANES || leaf_size > 4096) { snprintf(msg, sizeof msg, "leaf_size must be in [8, 4096]"); goto fail; }
    if (levels < 1 || levels > MAX_FANOUT_LEVELS) { snprintf(msg, sizeof msg, "fanout_levels must be in [1, %d]", MAX_FANOUT_LEVELS); goto fail; }
    for (size_t i = 0; i < n; i++) {
        const int16_t *v = vecs + i * DIMS;
        for (int d = 9; d <= 11; d++)
            if (v[d] != 0 && v[d] != SCALE) { snprintf(msg, sizeof msg, "reference %zu: dimension %d must be 0 or 1", i, d); goto fail; }
        for (int d = 0; d < DIMS; d++)
            if (v[d] < -SCALE || v[d] > SCALE) { snprintf(msg, sizeof msg, "reference %zu: dimension %d outside [-1, 1]", i, d); goto fail; }
        counts[group_key(v)]++;
    }

    b.vecs = vecs; b.labels = labels; b.leaf_size = leaf_size; b.levels = levels;
    idx = malloc(n * sizeof(uint32_t));
    if (!idx) { PyErr_NoMemory(); goto done; }
    uint32_t n_groups = 0;
    uint64_t n_fraud = 0;
    for (size_t i = 0; i < n; i++) n_fraud += labels[i] ? 1 : 0;

    Py_BEGIN_ALLOW_THREADS
    size_t start = 0;
    for (uint32_t key = 0; key < 32; key++) {
        if (!counts[key]) continue;
        group_t *g = &groups[n_groups++];
        group_layout(key, g);
        g->n_points = counts[key];
        g->block_off = (uint64_t)b.n_block_vals * sizeof(int16_t);
        g->slot_off = b.n_slots;
        /* members in file order */
        size_t m = 0;
        for (size_t i = 0; i < n; i++)
            if (group_key(vecs + i * DIMS) == key) idx[start + m++] = (uint32_t)i;
        b.g = g;
        b.group_blocks = 0;
        size_t root = b.n_entries;
        if (grow((void **)&b.entries, &b.cap_entries, root + 1, sizeof(entry_t)) ||
            (b.n_entries++, build_entry(&b, idx + start, m, root))) { n_groups = 0; break; }
        g->root = (uint32_t)root;
        g->n_entries = (uint32_t)(b.n_entries - root);
        g->n_blocks = b.group_blocks;
        start += m;
    }
    Py_END_ALLOW_THREADS
    if (!n_groups) { PyErr_NoMemory(); goto done; }

    file_header_t h;
    memset(&h, 0, sizeof h);
    memcpy(h.magic, MAGIC, 8);
    h.version = FORMAT_VERSION;
    h.header_size = HEADER_BYTES;
    h.n_points = n;
    h.n_slots = b.n_slots;
    h.n_groups = n_groups;
    h.leaf_size = (uint32_t)leaf_size;
    h.n_entries = b.n_entries;
    h.n_fraud = n_fraud;
    memcpy(h.sha256, hb.buf, 32);
    h.groups_off = HEADER_BYTES;
    h.entries_off = align64(h.groups_off + n_groups * sizeof(group_t));
    h.blocks_off = align64(h.entries_off + b.n_entries * sizeof(entry_t));
    h.ids_off = align64(h.blocks_off + b.n_block_vals * sizeof(int16_t));
    h.file_size = align64(h.ids_off + b.n_slots * sizeof(uint32_t));
    result = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)h.file_size);
    if (!result) goto done;
    char *out = PyBytes_AS_STRING(result);
    memset(out, 0, h.file_size);
    memcpy(out, &h, sizeof h);
    memcpy(out + h.groups_off, groups, n_groups * sizeof(group_t));
    memcpy(out + h.entries_off, b.entries, b.n_entries * sizeof(entry_t));
    memcpy(out + h.blocks_off, b.blocks, b.n_block_vals * sizeof(int16_t));
    memcpy(out + h.ids_off, b.ids, b.n_slots * sizeof(uint32_t));
    uint64_t sum = file_checksum(out, h.file_size);
    memcpy(out + offsetof(file_header_t, checksum), &sum, sizeof sum);
    goto done;
fail:
    PyErr_SetString(PyExc_ValueError, msg);
done:
    free(idx); free(b.entries); free(b.blocks); free(b.ids);
    PyBuffer_Release(&vb); PyBuffer_Release(&lb); PyBuffer_Release(&hb);
    return result;
}

/* ------------------------------------------------------------------ */
/* Search                                                              */
/* ------------------------------------------------------------------ */

typedef struct {
    double d;
    uint32_t id;
} cand_t;

typedef struct {
    double q[DIMS];      /* the query, as given */
    int32_t qi[DIMS];    /* round(q * 10000) */
    double err;          /* E = ||q * 10000 - qi||, bound (1) */
    int k;
    int n;
    cand_t best[MAX_K];
    int64_t limit;       /* integer distances above this cannot enter the answer */
    int64_t cap;         /* this round's radius: the limit never exceeds it (see search) */
    int overflow;        /* the traversal stack ran out (set without the GIL; callers raise) */
    uint64_t exact_evals, blocks_scanned, nodes_visited;
} query_t;

/* One group, with what the search derives from it once at construction. */
typedef struct {
    const group_t *g;
    const entry_t *entries; /* the global entry array */
    const int16_t *blocks;
    const uint32_t *ids;
    int8_t where[DIMS];  /* stored position of each dimension, or -1 */
} gview_t;

typedef struct query_kernel {
    const char *name;
    /* `pq` is the query as prepare() laid it out for the group (its own type per kernel) */
    void (*scan_leaf)(const gview_t *, const entry_t *, query_t *, int64_t offset, const void *pq);
    /* lower bound of the integer distance to a box, and (for ordering ties) twice the distance
     * to its centre, squared, approximately */
    int64_t (*node_bound)(const entry_t *, const void *pq, int n_stored, int64_t *centre);
    void (*prepare)(const gview_t *, const query_t *, void *pq);
} kernel_t;

static inline int cand_less(double d, uint32_t id, const cand_t *c) {
    return d < c->d || (d == c->d && (id & ID_POS) < (c->id & ID_POS));
}

/* The limit the k-th best implies, ignoring the round's cap. */
static int64_t implied_limit(const query_t *qs) {
    if (qs->n < qs->k) return INT64_MAX;
    /* sqrt(I) <= sqrt(1e8 * d_k) + E, with a relative margin for the rounding of these few operations */
    double r = sqrt(qs->best[qs->k - 1].d * 1e8) * (1.0 + 1e-9) + qs->err + 1e-6;
    double lim = r * r;
    return lim >= 9.0e18 ? INT64_MAX : (int64_t)lim;
}

static void update_limit(query_t *qs) {
    int64_t lim = implied_limit(qs);
    qs->limit = lim < qs->cap ? lim : qs->cap;
}

static void offer(query_t *qs, double d, uint32_t id) {
    int k = qs->k, n = qs->n;
    if (n == k && !cand_less(d, id, &qs->best[k - 1])) return;
    for (int i = 0; i < n; i++)
        if (qs->best[i].id == id) return; /* met again in a later round */
    int i = n < k ? n : k - 1;
    while (i > 0 && cand_less(d, id, &qs->best[i - 1])) { qs->best[i] = qs->best[i - 1]; i--; }
    qs->best[i].d = d; qs->best[i].id = id;
    if (n < k) qs->n++;
    update_limit(qs);
}

/* The brute force's distance: dimensions in order, doubles, no fused multiply-add (-ffp-contract=off). */
static double exact_distance(const gview_t *v, const query_t *qs, const int16_t *block, int slot) {
    double s = 0.0;
    for (int d = 0; d < DIMS; d++) {
        int w = v->where[d];
        int kv = w < 0 ? v->g->constant[d] : block[(w / 2) * 2 * LANES + slot * 2 + (w & 1)];
        double diff = qs->q[d] - ref_value(kv);
        s += diff * diff;
    }
    return s;
}

static int64_t group_offset(const gview_t *v, const query_t *qs) {
    int64_t off = 0;
    for (int d = 0; d < DIMS; d++)
        if (v->where[d] < 0) {
            int64_t t = (int64_t)qs->qi[d] - v->g->constant[d];
            off += t * t;
        }
    return off;
}

/* -------- scalar kernel (any CPU) -------- */

typedef struct { int32_t q[MAX_STORED]; } scalar_q_t;

static void scalar_prepare(const gview_t *v, const query_t *qs, void *pq) {
    scalar_q_t *sq = pq;
    for (int s = 0; s < MAX_STORED; s++) {
        int d = v->g->stored[s];
        sq->q[s] = d == 255 ? 0 : qs->qi[d];
    }
}

static int64_t scalar_node_bound(const entry_t *nd, const void *pq, int n_stored, int64_t *centre) {
    const scalar_q_t *sq = pq;
    int64_t s = 0, c = 0;
    for (int i = 0; i < n_stored; i++) {
        int32_t q = sq->q[i], t = 0;
        if (q < nd->lo[i]) t = nd->lo[i] - q;
        else if (q > nd->hi[i]) t = q - nd->hi[i];
        s += (int64_t)t * t;
        int32_t m = ((q - nd->lo[i]) >> 1) + ((q - nd->hi[i]) >> 1);
        c += (int64_t)m * m;
    }
    *centre = c;
    return s;
}

static void scalar_scan_leaf(const gview_t *v, const entry_t *nd, query_t *qs, int64_t offset, const void *pq) {
    const scalar_q_t *sq = pq;
    int np = (int)v->g->n_pairs;
    size_t block_vals = (size_t)np * 2 * LANES;
    for (int32_t b = 0; b < (nd->count + LANES - 1) / LANES; b++) {
        int32_t blk = nd->link + b;
        const int16_t *block = v->blocks + (size_t)blk * block_vals;
        const uint32_t *ids = v->ids + (size_t)blk * LANES;
        qs->blocks_scanned++;
        for (int j = 0; j < LANES; j++) {
            if (ids[j] == ID_PADDING) continue;
            int64_t s = offset;
            for (int p = 0; p < np; p++) {
                int32_t a = sq->q[2 * p] - block[p * 2 * LANES + j * 2];
                int32_t c = sq->q[2 * p + 1] - block[p * 2 * LANES + j * 2 + 1];
                s += (int64_t)a * a + (int64_t)c * c;
            }
            if (s <= qs->limit) { qs->exact_evals++; offer(qs, exact_distance(v, qs, block, j), ids[j]); }
        }
    }
}

static const kernel_t SCALAR_KERNEL = {"scalar", scalar_scan_leaf, scalar_node_bound, scalar_prepare};

/* -------- AVX2 kernel -------- */
#ifdef HAVE_X86
typedef struct { __m256i pair[MAX_PAIRS]; __m256i box; __m256i mask; } avx2_q_t;

__attribute__((target("avx2")))
static void avx2_prepare(const gview_t *v, const query_t *qs, void *pq) {
    avx2_q_t *aq = pq;
    int16_t q[16] = {0}, m[16] = {0};
    for (int s = 0; s < MAX_STORED; s++) {
        int d = v->g->stored[s];
        q[s] = d == 255 ? 0 : (int16_t)qs->qi[d];
        m[s] = -1;
    }
    for (int p = 0; p < MAX_PAIRS; p++) {
        uint32_t two = (uint16_t)q[2 * p] | (uint32_t)(uint16_t)q[2 * p + 1] << 16;
        aq->pair[p] = _mm256_set1_epi32((int)two);
    }
    aq->box = _mm256_loadu_si256((const __m256i *)q);
    aq->mask = _mm256_loadu_si256((const __m256i *)m);
}

__attribute__((target("avx2")))
static int64_t avx2_node_bound(const entry_t *nd, const void *pq, int n_stored, int64_t *centre) {
    const avx2_q_t *aq = pq;
    (void)n_stored;
    __m256i lo = _mm256_loadu_si256((const __m256i *)nd->lo);
    __m256i hi = _mm256_loadu_si256((const __m256i *)nd->hi);
    /* values are in [-10000, 10000], so these differences fit int16 */
    __m256i below = _mm256_sub_epi16(lo, aq->box), above = _mm256_sub_epi16(aq->box, hi);
    __m256i t = _mm256_and_si256(_mm256_max_epi16(_mm256_max_epi16(below, above), _mm256_setzero_si256()), aq->mask);
    /* (q - lo)/2 + (q - hi)/2: the offset from the centre, halved so it fits int16 */
    __m256i c = _mm256_and_si256(
        _mm256_add_epi16(_mm256_srai_epi16(_mm256_sub_epi16(aq->box, lo), 1), _mm256_srai_epi16(above, 1)), aq->mask);
    __m256i bsq = _mm256_madd_epi16(t, t), csq = _mm256_madd_epi16(c, c); /* 8 x int32, each <= 8e8 */
    __m128i b4 = _mm_add_epi32(_mm256_castsi256_si128(bsq), _mm256_extracti128_si256(bsq, 1));
    __m128i c4 = _mm_add_epi32(_mm256_castsi256_si128(csq), _mm256_extracti128_si256(csq, 1));
    /* four partial sums each, <= 1.6e9: widen before the last adds */
    __m256i wb = _mm256_cvtepu32_epi64(b4), wc = _mm256_cvtepu32_epi64(c4);
    __m128i hb = _mm_add_epi64(_mm256_castsi256_si128(wb), _mm256_extracti128_si256(wb, 1));
    __m128i hc = _mm_add_epi64(_mm256_castsi256_si128(wc), _mm256_extracti128_si256(wc, 1));
    __m128i both = _mm_add_epi64(_mm_unpacklo_epi64(hb, hc), _mm_unpackhi_epi64(hb, hc));
    *centre = _mm_extract_epi64(both, 1);
    return _mm_cvtsi128_si64(both);
}

__attribute__((target("avx2")))
static void avx2_scan_leaf(const gview_t *v, const entry_t *nd, query_t *qs, int64_t offset, const void *pq) {
    const avx2_q_t *aq = pq;
    int np = (int)v->g->n_pairs;
    size_t block_vals = (size_t)np * 2 * LANES;
    int32_t nb = (nd->count + LANES - 1) / LANES;
    for (int32_t b = 0; b < nb; b++) {
        int64_t room = qs->limit - offset;
        if (room < 0) return;
        int32_t lim32 = room > INT32_MAX ? INT32_MAX : (int32_t)room;
        int32_t blk = nd->link + b;
        const int16_t *block = v->blocks + (size_t)blk * block_vals;
        __m256i acc = _mm256_setzero_si256();
        for (int p = 0; p < np; p++) {
            __m256i d = _mm256_sub_epi16(aq->pair[p], _mm256_loadu_si256((const __m256i *)(block + p * 2 * LANES)));
            acc = _mm256_add_epi32(acc, _mm256_madd_epi16(d, d));
        }
        qs->blocks_scanned++;
        unsigned reject = (unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(acc, _mm256_set1_epi32(lim32))));
        int valid = nd->count - b * LANES;
        unsigned pass = ~reject & (valid >= LANES ? 0xFFu : ((1u << valid) - 1u));
        if (!pass) continue;
        int32_t dist[LANES];
        _mm256_storeu_si256((__m256i *)dist, acc);
        const uint32_t *ids = v->ids + (size_t)blk * LANES;
        while (pass) {
            int j = __builtin_ctz(pass);
            pass &= pass - 1;
            if (dist[j] + offset > qs->limit) continue; /* the limit tightened within this block */
            qs->exact_evals++;
            offer(qs, exact_distance(v, qs, block, j), ids[j]);
        }
    }
}

static const kernel_t AVX2_KERNEL = {"avx2", avx2_scan_leaf, avx2_node_bound, avx2_prepare};
#endif

/* ------------------------------------------------------------------ */
/* The Index type                                                      */
/* ------------------------------------------------------------------ */

typedef struct {
    PyObject_HEAD
    Py_buffer view;
    const char *base;
    const file_header_t *h;
    const entry_t *entries;
    gview_t groups[32];
    const kernel_t *kernel;
} IndexObject;

/* ------------------------------------------------------------------ */
/* Checking a file before trusting it                                  */
/* ------------------------------------------------------------------ */

/* A file is used only if it is exactly what build_index writes: the checksum catches damage,
 * and these checks catch whatever the checksum cannot (a crafted file, a resealed one), so
 * that no entry can send the search out of the file, into a loop, past its fixed-size stacks,
 * or past the value table.  Every size is bounded by the file's length before it is multiplied,
 * so no sum below can wrap.  The tree must be in the builder's order: each run of children is
 * the next unused run of entries in depth-first order, and each leaf the next unused blocks,
 * so every entry and block is reached exactly once (no cycle, no sharing) by construction. */
typedef struct {
    const file_header_t *h;
    const entry_t *entries;
    const group_t *g;
    uint32_t group;
    const int16_t *blocks;   /* the group's */
    const uint32_t *ids;     /* the group's slots */
    uint64_t next_entry, end_entry, next_block;
    uint64_t points, frauds;
    uint8_t *seen;           /* one bit per reference position */
    char *msg;
    size_t msglen;
} checker_t;

static int bad(checker_t *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int bad(checker_t *c, const char *fmt, ...) {
    char what[160];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(what, sizeof what, fmt, ap);
    va_end(ap);
    snprintf(c->msg, c->msglen, "corrupt index: %s", what);
    return -1;
}

/* A box within [-1, 1] (so the AVX2 bound's int16 differences cannot wrap), zero where nothing
 * is stored, and inside its parent's (so pruning on it is sound). */
static int check_box(checker_t *c, uint64_t at, const entry_t *e, const entry_t *parent) {
    for (int s = 0; s < MAX_STORED; s++) {
        int lo = e->lo[s], hi = e->hi[s];
        if (c->g->stored[s] == 255) {
            if (lo != 0 || hi != 0) return bad(c, "tree entry %llu: box set on an unstored dimension", (unsigned long long)at);
            continue;
        }
        if (lo < -SCALE || hi > SCALE || lo > hi) return bad(c, "tree entry %llu: box out of range", (unsigned long long)at);
        if (parent && (lo < parent->lo[s] || hi > parent->hi[s]))
            return bad(c, "tree entry %llu: box outside its parent's", (unsigned long long)at);
    }
    return 0;
}

/* A leaf: the next blocks of its group, its points inside its box, real ids exactly where its
 * count says and padding after, each reference position once. */
static int check_leaf(checker_t *c, uint64_t at, const entry_t *e) {
    const group_t *g = c->g;
    if (e->count > INT32_MAX - LANES) return bad(c, "tree entry %llu: leaf of %d points", (unsigned long long)at, e->count);
    uint64_t nb = ((uint64_t)e->count + LANES - 1) / LANES;
    if (e->link < 0 || (uint64_t)e->link != c->next_block || nb > g->n_blocks - c->next_block)
        return bad(c, "tree entry %llu: leaf blocks out of order or out of range", (unsigned long long)at);
    size_t block_vals = (size_t)g->n_pairs * 2 * LANES;
    int ns = (int)g->n_stored;
    for (uint64_t b = (uint64_t)e->link; b < (uint64_t)e->link + nb; b++) {
        for (int j = 0; j < LANES; j++) {
            uint64_t i = (b - (uint64_t)e->link) * LANES + (uint64_t)j;
            uint32_t id = c->ids[b * LANES + (uint64_t)j];
            if (i >= (uint64_t)e->count) {
                if (id != ID_PADDING) return bad(c, "tree entry %llu: a reference past the leaf's count", (unsigned long long)at);
                continue;
            }
            uint32_t pos = id & ID_POS;
            if (id == ID_PADDING || pos >= c->h->n_points)
                return bad(c, "tree entry %llu: reference id out of range", (unsigned long long)at);
            if (c->seen[pos / 8] & (1u << (pos % 8))) return bad(c, "reference %u stored twice", pos);
            c->seen[pos / 8] |= (uint8_t)(1u << (pos % 8));
            c->points++;
            c->frauds += id >> 31;
        }
        /* every slot's values (padding slots repeat a point) inside the box: one flag per block,
         * in a loop the compiler vectorises, as this reads every stored value of the file */
        const int16_t *block = c->blocks + b * block_vals;
        int outside = 0;
        for (int s = 0; s < ns; s++) {
            /* an unstored position must hold 0: check_box made its box [0, 0] */
            int16_t lo = e->lo[s], hi = e->hi[s];
            const int16_t *col = block + (s / 2) * 2 * LANES + (s & 1);
            for (int j = 0; j < LANES; j++) outside |= (col[2 * j] < lo) | (col[2 * j] > hi);
        }
        if (outside) return bad(c, "tree entry %llu: a point outside its leaf's box", (unsigned long long)at);
    }
    c->next_block += nb;
    return 0;
}

/* `use`: the traversal stack's worst case on the way here (search_round pushes at most a
 * node's children after popping it, so a path needs 1 + the sum of (fan-out - 1) slots). */
static int check_node(checker_t *c, uint64_t at, const entry_t *parent, int use) {
    const entry_t *e = &c->entries[at];
    if (check_box(c, at, e, parent)) return -1;
    if (e->count > 0) return check_leaf(c, at, e);
    if (e->count > -2 || e->count < -MAX_FANOUT)
        return bad(c, "tree entry %llu: fan-out %lld outside [2, %d]", (unsigned long long)at, -(long long)e->count, MAX_FANOUT);
    uint64_t nc = (uint64_t)-(int64_t)e->count;
    if (e->link < 0 || (uint64_t)e->link != c->next_entry || nc > c->end_entry - c->next_entry)
        return bad(c, "tree entry %llu: child link out of order or out of range", (unsigned long long)at);
    use += (int)nc - 1;
    if (use + 1 > STACK_DEPTH) return bad(c, "group %u: tree too deep for the search's stack", c->group);
    c->next_entry += nc;
    for (uint64_t i = 0; i < nc; i++)
        if (check_node(c, (uint64_t)e->link + i, e, use)) return -1;
    return 0;
}

/* The header's sections, in the builder's canonical layout; then every group and its tree. */
static int check_file(const char *base, size_t len, char *msg, size_t msglen) {
    checker_t c;
    memset(&c, 0, sizeof c);
    c.msg = msg; c.msglen = msglen;
    const file_header_t *h = (const file_header_t *)base;
    c.h = h;
    /* bounds first: every count times its item size is then below 2^62 */
    if (h->n_groups == 0 || h->n_groups > 32) return bad(&c, "%u groups (1 to 32)", h->n_groups);
    if (h->n_entries == 0 || h->n_entries > len / sizeof(entry_t) || h->n_entries > INT32_MAX)
        return bad(&c, "%llu tree entries for a file of %zu bytes", (unsigned long long)h->n_entries, len);
    if (h->n_slots > len / sizeof(uint32_t) || h->n_slots % LANES)
        return bad(&c, "%llu slots for a file of %zu bytes", (unsigned long long)h->n_slots, len);
    if (h->n_points == 0 || h->n_points > h->n_slots || h->n_points > ID_POS || h->n_fraud > h->n_points)
        return bad(&c, "%llu references (%llu frauds) in %llu slots", (unsigned long long)h->n_points,
                   (unsigned long long)h->n_fraud, (unsigned long long)h->n_slots);
    if (h->groups_off != HEADER_BYTES || h->entries_off != align64(h->groups_off + h->n_groups * sizeof(group_t)) ||
        h->blocks_off != align64(h->entries_off + h->n_entries * sizeof(entry_t)) || h->ids_off > len ||
        h->ids_off < h->blocks_off || h->file_size != align64(h->ids_off + h->n_slots * sizeof(uint32_t)))
        return bad(&c, "sections out of place");
    const group_t *gs = (const group_t *)(base + h->groups_off);
    uint64_t entries = 0, block_bytes = 0, slots = 0;
    for (uint32_t i = 0; i < h->n_groups; i++) {
        const group_t *g = &gs[i];
        group_t want;
        memset(&want, 0, sizeof want);
        if (g->key >= 32 || (i > 0 && g->key <= gs[i - 1].key)) return bad(&c, "group %u: key %u out of order", i, g->key);
        group_layout(g->key, &want);
        if (g->n_stored != want.n_stored || g->n_pairs != want.n_pairs || memcmp(g->stored, want.stored, sizeof want.stored) ||
            memcmp(g->constant, want.constant, sizeof want.constant))
            return bad(&c, "group %u: dimensions do not match its key", i);
        uint64_t block_size = (uint64_t)g->n_pairs * 2 * LANES * sizeof(int16_t);
        if (g->root != entries || g->n_entries == 0 || g->n_entries > h->n_entries - entries || g->n_points == 0 ||
            g->block_off != block_bytes || g->slot_off != slots || g->n_blocks > (len - block_bytes) / block_size ||
            (uint64_t)g->n_blocks * LANES > h->n_slots - slots)
            return bad(&c, "group %u: sections out of place", i);
        entries += g->n_entries;
        block_bytes += (uint64_t)g->n_blocks * block_size;
        slots += (uint64_t)g->n_blocks * LANES;
    }
    if (entries != h->n_entries || slots != h->n_slots || h->ids_off != align64(h->blocks_off + block_bytes))
        return bad(&c, "groups do not add up to the header's sections");
    c.entries = (const entry_t *)(base + h->entries_off);
    c.seen = calloc(h->n_points / 8 + 1, 1);
    if (!c.seen) { snprintf(msg, msglen, "out of memory checking the index"); return -1; }
    int r = 0;
    for (uint32_t i = 0; i < h->n_groups && !r; i++) {
        const group_t *g = &gs[i];
        uint64_t before = c.points;
        c.g = g; c.group = i;
        c.blocks = (const int16_t *)(base + h->blocks_off + g->block_off);
        c.ids = (const uint32_t *)(base + h->ids_off) + g->slot_off;
        c.next_entry = (uint64_t)g->root + 1;
        c.end_entry = (uint64_t)g->root + g->n_entries;
        c.next_block = 0;
        r = check_node(&c, g->root, NULL, 0);
        if (!r && (c.next_entry != c.end_entry || c.next_block != g->n_blocks))
            r = bad(&c, "group %u: entries or blocks that no tree entry reaches", i);
        if (!r && c.points - before != g->n_points) r = bad(&c, "group %u: holds %llu references, says %u", i,
                                                            (unsigned long long)(c.points - before), g->n_points);
    }
    if (!r && (c.points != h->n_points || c.frauds != h->n_fraud))
        r = bad(&c, "%llu references (%llu frauds) found, header says %llu (%llu)", (unsigned long long)c.points,
                (unsigned long long)c.frauds, (unsigned long long)h->n_points, (unsigned long long)h->n_fraud);
    free(c.seen);
    return r;
}

/* Checks the buffer (without the GIL: it is the whole file) and maps it; -1 with msg set. */
static int index_check_and_map(IndexObject *self, char *msg, size_t msglen) {
    const char *base = self->base;
    size_t len = (size_t)self->view.len;
    if (len < HEADER_BYTES || memcmp(base, MAGIC, 8) != 0) { snprintf(msg, msglen, "not a fraudscore index (bad magic)"); return -1; }
    /* sections are 64-byte aligned within the file; the file itself must be 8-byte aligned in memory
     * for its fields to be read in place (a mapping is page-aligned; a slice of bytes may not be) */
    if ((uintptr_t)base % 8) { snprintf(msg, msglen, "index buffer is not 8-byte aligned in memory"); return -1; }
    const file_header_t *h = (const file_header_t *)base;
    if (h->version != FORMAT_VERSION) {
        snprintf(msg, msglen, "index format version %u, this fraudscore reads version %u: rebuild it with `fraudscore index build`",
                 h->version, FORMAT_VERSION);
        return -1;
    }
    if (h->header_size != HEADER_BYTES) { snprintf(msg, msglen, "corrupt index: header size %u", h->header_size); return -1; }
    if (h->file_size != len) { snprintf(msg, msglen, "index file is %zu bytes, its header says %llu: truncated or corrupt", len, (unsigned long long)h->file_size); return -1; }
    uint64_t sum = 0;
    int r;
    Py_BEGIN_ALLOW_THREADS
    sum = file_checksum(base, len);
    r = sum == h->checksum ? check_file(base, len, msg, msglen) : 1;
    Py_END_ALLOW_THREADS
    if (r == 1)
        snprintf(msg, msglen, "index checksum mismatch (header %016llx, contents %016llx): the file is damaged; rebuild it with `fraudscore index build`",
                 (unsigned long long)h->checksum, (unsigned long long)sum);
    if (r) return -1;
    self->h = h;
    self->entries = (const entry_t *)(base + h->entries_off);
    const group_t *gs = (const group_t *)(base + h->groups_off);
    for (uint32_t i = 0; i < h->n_groups; i++) {
        const group_t *g = &gs[i];
        gview_t *v = &self->groups[i];
        v->g = g;
        v->entries = self->entries;
        v->blocks = (const int16_t *)(base + h->blocks_off + g->block_off);
        v->ids = (const uint32_t *)(base + h->ids_off) + g->slot_off;
        for (int d = 0; d < DIMS; d++) v->where[d] = -1;
        for (int s = 0; s < MAX_STORED; s++)
            if (g->stored[s] != 255) v->where[g->stored[s]] = (int8_t)s;
    }
    return 0;
}

static int Index_init(IndexObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"buffer", "kernel", NULL};
    PyObject *obj;
    const char *want = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|z", kwlist, &obj, &want)) return -1;
    if (self->base) { PyErr_SetString(PyExc_RuntimeError, "Index is already initialised"); return -1; }
    if (PyObject_GetBuffer(obj, &self->view, PyBUF_SIMPLE) < 0) return -1;
    self->base = self->view.buf;
    char msg[200];
    if (index_check_and_map(self, msg, sizeof msg)) {
        PyBuffer_Release(&self->view); self->base = NULL;
        PyErr_SetString(PyExc_ValueError, msg);
        return -1;
    }
    /* the kernel is chosen once, here */
    self->kernel = &SCALAR_KERNEL;
#ifdef HAVE_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2")) self->kernel = &AVX2_KERNEL;
#endif
    if (want) {
        if (strcmp(want, "scalar") == 0) self->kernel = &SCALAR_KERNEL;
#ifdef HAVE_X86
        else if (strcmp(want, "avx2") == 0 && __builtin_cpu_supports("avx2")) self->kernel = &AVX2_KERNEL;
#endif
        else if (strcmp(want, self->kernel->name) != 0) {
            PyBuffer_Release(&self->view); self->base = NULL;
            PyErr_Format(PyExc_ValueError, "kernel '%s' is not available on this CPU", want);
            return -1;
        }
    }
    return 0;
}

static void Index_dealloc(IndexObject *self) {
    if (self->base) PyBuffer_Release(&self->view);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int ready(IndexObject *self) {
    if (!self->base) { PyErr_SetString(PyExc_RuntimeError, "Index is not initialised"); return 0; }
    return 1;
}

static int read_query(PyObject *obj, double *q) {
    PyObject *seq = PySequence_Fast(obj, "the query must be a sequence of 14 numbers");
    if (!seq) return -1;
    /* the size of seq, the list or tuple PySequence_Fast made: obj may be any iterable (a generator) */
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n != DIMS) {
        Py_DECREF(seq);
        PyErr_Format(PyExc_ValueError, "the query must have 14 numbers, got %zd", n);
        return -1;
    }
    PyObject **items = PySequence_Fast_ITEMS(seq);
    for (int d = 0; d < DIMS; d++) {
        q[d] = PyFloat_AsDouble(items[d]);
        if (q[d] == -1.0 && PyErr_Occurred()) { Py_DECREF(seq); return -1; }
    }
    Py_DECREF(seq);
    return 0;
}

static int validate_query(const double *q, char *msg, size_t len) {
    for (int d = 0; d < DIMS; d++)
        if (!(q[d] >= -1.0 && q[d] <= 1.0)) { snprintf(msg, len, "query dimension %d is %g, outside [-1, 1]", d, q[d]); return -1; }
    return 0;
}

static void query_init(query_t *qs, const double *q, int k) {
    double e2 = 0.0;
    for (int d = 0; d < DIMS; d++) {
        qs->q[d] = q[d];
        double s = q[d] * SCALE;
        qs->qi[d] = (int32_t)lrint(s);
        double e = fabs(s - qs->qi[d]) + 1e-9; /* + the rounding of q * 10000 itself */
        e2 += e * e;
    }
    qs->err = sqrt(e2) * (1.0 + 1e-12);
    qs->k = k;
    qs->n = 0;
    qs->limit = qs->cap = INT64_MAX;
    qs->overflow = 0;
    qs->exact_evals = qs->blocks_scanned = qs->nodes_visited = 0;
}

typedef struct { int64_t offset; int group; } gorder_t;

static void search_round(const IndexObject *self, query_t *qs) {
    const kernel_t *kern = self->kernel;
    int ng = (int)self->h->n_groups;
    gorder_t order[32];
    for (int i = 0; i < ng; i++) { order[i].offset = group_offset(&self->groups[i], qs); order[i].group = i; }
    for (int i = 1; i < ng; i++) { /* nearest group first */
        gorder_t t = order[i]; int j = i;
        while (j > 0 && order[j - 1].offset > t.offset) { order[j] = order[j - 1]; j--; }
        order[j] = t;
    }
    /* the query as the kernel wants it, rebuilt for each group's stored dimensions */
    union {
        scalar_q_t scalar;
#ifdef HAVE_X86
        avx2_q_t avx2;
#endif
    } qp __attribute__((aligned(32)));
    for (int gi = 0; gi < ng; gi++) {
        int64_t offset = order[gi].offset;
        if (offset > qs->limit) break; /* sorted: no later group can do better */
        const gview_t *v = &self->groups[order[gi].group];
        kern->prepare(v, qs, &qp);
        int ns = (int)v->g->n_stored;
        const entry_t *entries = v->entries;
        struct { int32_t entry; int64_t bound; } stack[STACK_DEPTH];
        int top = 0;
        stack[top].entry = (int32_t)v->g->root;
        int64_t centre;
        stack[top].bound = kern->node_bound(&entries[v->g->root], &qp, ns, &centre);
        top++;
        while (top > 0) {
            top--;
            if (offset + stack[top].bound > qs->limit) continue;
            const entry_t *e = &entries[stack[top].entry];
            qs->nodes_visited++;
            if (e->count > 0) { kern->scan_leaf(v, e, qs, offset, &qp); continue; }
            /* children nearest first: push them farthest first */
            int nc = -e->count;
            int32_t order_e[MAX_FANOUT];
            int64_t order_b[MAX_FANOUT];
            int64_t order_c[MAX_FANOUT];
            int kept = 0;
            for (int c = 0; c < nc; c++) {
                const entry_t *child = &entries[e->link + c];
                int64_t bound = kern->node_bound(child, &qp, ns, &centre);
                if (offset + bound > qs->limit) continue;
                /* equal bounds are common (the query inside overlapping boxes): then the nearer centre first */
                int j = kept++;
                while (j > 0 && (order_b[j - 1] < bound || (order_b[j - 1] == bound && order_c[j - 1] < centre))) {
                    order_b[j] = order_b[j - 1]; order_c[j] = order_c[j - 1]; order_e[j] = order_e[j - 1]; j--;
                }
                order_b[j] = bound; order_c[j] = centre; order_e[j] = e->link + c;
            }
            if (top + kept > STACK_DEPTH) { qs->overflow = 1; return; }
            for (int j = 0; j < kept; j++) { stack[top].entry = order_e[j]; stack[top].bound = order_b[j]; top++; }
        }
    }
}

/* Rounds of growing radius.  A round prunes at min(limit, cap); once it ends with k candidates
 * whose implied limit is within the cap, every point that could be among the k nearest was
 * within the pruning threshold the whole round (the limit only shrinks), so the answer is
 * exact.  Otherwise the cap grows 4-fold (the radius doubles) and the search runs again,
 * keeping its candidates.  The first cap only sets the speed, never the answer. */
/* The first round's radius, 0.06 (integer units squared).  It sets only the speed: measured
 * flat from 0.03 to 0.24 (BENCHMARKS.md), against the same dev payloads' 5th-neighbour
 * distances of 0.02 (10th percentile) to 0.22 (99th). */
#ifndef FIRST_CAP
#define FIRST_CAP 360000
#endif
static void search(const IndexObject *self, query_t *qs) {
    int64_t cap = FIRST_CAP;
    for (;;) {
        qs->cap = cap;
        update_limit(qs);
        search_round(self, qs);
        if (qs->overflow) return;
        if (cap == INT64_MAX || (qs->n == qs->k && implied_limit(qs) <= cap)) return;
        cap = cap > INT64_MAX / 4 ? INT64_MAX : cap * 4;
    }
}

static PyObject *neighbours_list(const query_t *qs) {
    PyObject *out = PyList_New(qs->n);
    if (!out) return NULL;
    for (int i = 0; i < qs->n; i++) {
        PyObject *t = Py_BuildValue("(kdO)", (unsigned long)(qs->best[i].id & ID_POS), qs->best[i].d,
                                    (qs->best[i].id & ID_FRAUD) ? Py_True : Py_False);
        if (!t) { Py_DECREF(out); return NULL; }
        PyList_SET_ITEM(out, i, t);
    }
    return out;
}

static int prepare_query(IndexObject *self, PyObject *obj, query_t *qs, int k) {
    double q[DIMS];
    char msg[120];
    if (!ready(self) || read_query(obj, q)) return -1;
    if (validate_query(q, msg, sizeof msg)) { PyErr_SetString(PyExc_ValueError, msg); return -1; }
    query_init(qs, q, k);
    return 0;
}

static int frauds_of(const query_t *qs) {
    int frauds = 0;
    for (int i = 0; i < qs->n; i++) frauds += (qs->best[i].id & ID_FRAUD) ? 1 : 0;
    return frauds;
}

static PyObject *overflow_error(void) {
    return PyErr_Format(PyExc_RuntimeError, "index tree deeper than %d: corrupt file?", STACK_DEPTH);
}

/* Read, check and search one query for the Python-facing methods; -1 with an exception set. */
static int run_query(IndexObject *self, PyObject *obj, int k, query_t *qs) {
    if (prepare_query(self, obj, qs, k)) return -1;
    search(self, qs);
    if (qs->overflow) { overflow_error(); return -1; }
    return 0;
}

static PyObject *Index_fraud_count(IndexObject *self, PyObject *obj) {
    query_t qs;
    if (run_query(self, obj, K, &qs)) return NULL;
    return PyLong_FromLong(frauds_of(&qs));
}

/* fs_knn_api.fraud_count (knn_api.h): the service's fast path calls this with its own vector */
static int api_fraud_count(PyObject *index, const double *q) {
    IndexObject *self = (IndexObject *)index;
    char msg[120];
    if (!self->base || validate_query(q, msg, sizeof msg)) return -1;
    query_t qs;
    query_init(&qs, q, K);
    search(self, &qs);
    return qs.overflow ? -1 : frauds_of(&qs);
}

static PyObject *Index_knn(IndexObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"query", "k", NULL};
    PyObject *obj;
    int k = K;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|i", kwlist, &obj, &k)) return NULL;
    if (k < 1 || k > MAX_K) { PyErr_Format(PyExc_ValueError, "k must be in [1, %d]", MAX_K); return NULL; }
    query_t qs;
    if (run_query(self, obj, k, &qs)) return NULL;
    return neighbours_list(&qs);
}

static PyObject *Index_search_stats(IndexObject *self, PyObject *obj) {
    query_t qs;
    if (run_query(self, obj, K, &qs)) return NULL;
    return Py_BuildValue("{s:K,s:K,s:K}", "nodes", (unsigned long long)qs.nodes_visited,
                         "blocks", (unsigned long long)qs.blocks_scanned, "exact", (unsigned long long)qs.exact_evals);
}

static PyObject *Index_brute_force(IndexObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"query", "k", NULL};
    PyObject *obj;
    int k = K;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|i", kwlist, &obj, &k)) return NULL;
    if (k < 1 || k > MAX_K) { PyErr_Format(PyExc_ValueError, "k must be in [1, %d]", MAX_K); return NULL; }
    query_t qs;
    if (prepare_query(self, obj, &qs, k)) return NULL;
    Py_BEGIN_ALLOW_THREADS
    for (uint32_t gi = 0; gi < self->h->n_groups; gi++) {
        const gview_t *v = &self->groups[gi];
        size_t block_vals = (size_t)v->g->n_pairs * 2 * LANES;
        for (uint32_t b = 0; b < v->g->n_blocks; b++)
            for (int j = 0; j < LANES; j++) {
                uint32_t id = v->ids[(size_t)b * LANES + j];
                if (id != ID_PADDING) offer(&qs, exact_distance(v, &qs, v->blocks + b * block_vals, j), id);
            }
    }
    Py_END_ALLOW_THREADS
    return neighbours_list(&qs);
}

PyDoc_STRVAR(fraud_counts_doc,
"fraud_counts($self, queries, /)\n--\n\n"
"For a buffer of n * 14 doubles, the number of frauds among each query's 5\n"
"nearest neighbours, one byte per query. Runs without the GIL.");

static PyObject *Index_fraud_counts(IndexObject *self, PyObject *obj) {
    if (!ready(self)) return NULL;
    Py_buffer qb;
    if (PyObject_GetBuffer(obj, &qb, PyBUF_SIMPLE) < 0) return NULL;
    if (qb.len % (DIMS * sizeof(double))) {
        PyBuffer_Release(&qb);
        PyErr_SetString(PyExc_ValueError, "queries must be a buffer of n * 14 doubles");
        return NULL;
    }
    Py_ssize_t n = qb.len / (Py_ssize_t)(DIMS * sizeof(double));
    const double *qv = qb.buf;
    char msg[120];
    for (Py_ssize_t i = 0; i < n; i++)
        if (validate_query(qv + i * DIMS, msg, sizeof msg)) {
            PyBuffer_Release(&qb);
            PyErr_Format(PyExc_ValueError, "query %zd: %s", i, msg);
            return NULL;
        }
    PyObject *out = PyBytes_FromStringAndSize(NULL, n);
    if (!out) { PyBuffer_Release(&qb); return NULL; }
    char *counts = PyBytes_AS_STRING(out);
    int overflow = 0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) {
        query_t qs;
        query_init(&qs, qv + i * DIMS, K);
        search(self, &qs);
        overflow |= qs.overflow;
        counts[i] = (char)frauds_of(&qs);
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&qb);
    if (overflow) {
        Py_DECREF(out);
        return overflow_error();
    }
    return out;
}

PyDoc_STRVAR(warm_doc, "warm($self, /)\n--\n\nTouch every page of the index so the first queries do not fault; returns a checksum.");

static PyObject *Index_warm(IndexObject *self, PyObject *unused) {
    if (!ready(self)) return NULL;
    unsigned long sum = 0;
    Py_BEGIN_ALLOW_THREADS
    const volatile unsigned char *p = (const unsigned char *)self->base;
    for (Py_ssize_t i = 0; i < self->view.len; i += 4096) sum += p[i];
    Py_END_ALLOW_THREADS
    return PyLong_FromUnsignedLong(sum);
}

static PyObject *Index_get_n_points(IndexObject *self, void *c) { return ready(self) ? PyLong_FromUnsignedLongLong(self->h->n_points) : NULL; }
static PyObject *Index_get_n_fraud(IndexObject *self, void *c) { return ready(self) ? PyLong_FromUnsignedLongLong(self->h->n_fraud) : NULL; }
static PyObject *Index_get_n_groups(IndexObject *self, void *c) { return ready(self) ? PyLong_FromUnsignedLong(self->h->n_groups) : NULL; }
static PyObject *Index_get_n_entries(IndexObject *self, void *c) { return ready(self) ? PyLong_FromUnsignedLongLong(self->h->n_entries) : NULL; }
static PyObject *Index_get_leaf_size(IndexObject *self, void *c) { return ready(self) ? PyLong_FromUnsignedLong(self->h->leaf_size) : NULL; }
static PyObject *Index_get_kernel(IndexObject *self, void *c) { return ready(self) ? PyUnicode_FromString(self->kernel->name) : NULL; }
static PyObject *Index_get_sha256(IndexObject *self, void *c) {
    if (!ready(self)) return NULL;
    char hex[65];
    for (int i = 0; i < 32; i++) snprintf(hex + 2 * i, 3, "%02x", self->h->sha256[i]);
    return PyUnicode_FromString(hex);
}

static PyObject *Index_get_checksum(IndexObject *self, void *c) {
    if (!ready(self)) return NULL;
    char hex[17];
    snprintf(hex, sizeof hex, "%016llx", (unsigned long long)self->h->checksum);
    return PyUnicode_FromString(hex);
}

static PyGetSetDef Index_getset[] = {
    {"n_points", (getter)Index_get_n_points, NULL, "number of references", NULL},
    {"n_fraud", (getter)Index_get_n_fraud, NULL, "number of references labelled fraud", NULL},
    {"n_groups", (getter)Index_get_n_groups, NULL, "partitions on the binary and sentinel dimensions", NULL},
    {"n_entries", (getter)Index_get_n_entries, NULL, "tree entries (subtree bounding boxes) over all groups", NULL},
    {"leaf_size", (getter)Index_get_leaf_size, NULL, "maximum points per leaf", NULL},
    {"kernel", (getter)Index_get_kernel, NULL, "the leaf kernel chosen at construction", NULL},
    {"sha256", (getter)Index_get_sha256, NULL, "SHA-256 of the uncompressed reference file", NULL},
    {"checksum", (getter)Index_get_checksum, NULL, "the file's XXH64 checksum, 16 hex digits (checked at open)", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMethodDef Index_methods[] = {
    {"fraud_count", (PyCFunction)Index_fraud_count, METH_O, "fraud_count($self, query, /)\n--\n\nThe frauds among the 5 nearest."},
    {"knn", (PyCFunction)(void (*)(void))Index_knn, METH_VARARGS | METH_KEYWORDS,
     "knn($self, /, query, k=5)\n--\n\n[(position, distance, is_fraud)] * k, nearest first, ties to the lower position."},
    {"search_stats", (PyCFunction)Index_search_stats, METH_O, "search_stats($self, query, /)\n--\n\nA dict of the work done by one search."},
    {"brute_force", (PyCFunction)(void (*)(void))Index_brute_force, METH_VARARGS | METH_KEYWORDS,
     "brute_force($self, /, query, k=5)\n--\n\nLike knn, by scanning every reference (the test oracle)."},
    {"fraud_counts", (PyCFunction)Index_fraud_counts, METH_O, fraud_counts_doc},
    {"warm", (PyCFunction)Index_warm, METH_NOARGS, warm_doc},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject IndexType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "fraudscore.index._knn.Index",
    .tp_basicsize = sizeof(IndexObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Index(buffer, kernel=None)\n--\n\nExact 5-NN search over an index file's bytes (kept referenced).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Index_init,
    .tp_dealloc = (destructor)Index_dealloc,
    .tp_methods = Index_methods,
    .tp_getset = Index_getset,
};

static PyMethodDef module_methods[] = {
    {"parse_references", py_parse_references, METH_VARARGS, parse_references_doc},
    {"build_index", (PyCFunction)(void (*)(void))py_build_index, METH_VARARGS | METH_KEYWORDS, build_index_doc},
    {"checksum", py_checksum, METH_O, checksum_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef knn_module = {
    PyModuleDef_HEAD_INIT, "_knn", "Exact k-nearest-neighbour core of fraudscore.", -1, module_methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__knn(void) {
    for (int k = -SCALE; k <= SCALE; k++) LUT[k + SCALE] = (double)k / (double)SCALE;
    if (PyType_Ready(&IndexType) < 0) return NULL;
    PyObject *m = PyModule_Create(&knn_module);
    if (!m) return NULL;
    Py_INCREF(&IndexType);
    if (PyModule_AddObject(m, "Index", (PyObject *)&IndexType) < 0) { Py_DECREF(&IndexType); Py_DECREF(m); return NULL; }
    static fs_knn_api api = {&IndexType, api_fraud_count};
    PyObject *capsule = PyCapsule_New(&api, FS_KNN_CAPSULE, NULL);
    if (!capsule || PyModule_AddObject(m, "_C_API", capsule) < 0) { Py_XDECREF(capsule); Py_DECREF(m); return NULL; }
    PyModule_AddIntConstant(m, "DIMS", DIMS);
    PyModule_AddIntConstant(m, "K", K);
    PyModule_AddIntConstant(m, "SCALE", SCALE);
    PyModule_AddIntConstant(m, "FORMAT_VERSION", FORMAT_VERSION);
    PyModule_AddIntConstant(m, "CHECKSUM_OFFSET", (long)offsetof(file_header_t, checksum));
    return m;
}
