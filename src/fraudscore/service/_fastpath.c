/* The service's fast path: the bytes of one whole scoring request in, its response out, with no
 * Python in between (HTTP framing, JSON, the 14-dimension vector and the search, in one call).
 *
 * It answers only what it is sure of: a complete `POST /fraud-score HTTP/1.1` request, alone in
 * the buffer, with plain headers, a Content-Length body, and a payload of the ordinary shape
 * (ASCII strings without escapes, timestamps written YYYY-MM-DDTHH:MM:SS with an optional Z,
 * numbers in range).  For anything else -- an error of any kind, an unusual but valid form, a
 * request split over two reads or pipelined behind another -- it returns None, and the Python
 * path (httptools and contract/vectorize.py, which define the behaviour) answers.  So the fast
 * path can change the speed and never the answer: tests/test_fastpath.py holds its vectors and
 * answers to the Python path's on the dev payloads and on thousands of mutations of them.
 *
 * Where it must compute what Python computes, it does the same IEEE operations in the same
 * order: numbers are read with strtod in the C locale (correctly rounded, as Python's parsers are,
 * and with '.' as the decimal point whatever locale the process runs in), and every
 * dimension is rounded to 4 decimals exactly as round(x, 4) would (ties to even on the exact
 * binary value).  Build with -ffp-contract=off so no multiply-add is fused.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <locale.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include "knn_api.h"

#define DIMS FS_KNN_DIMS
#define N_ANSWERS (FS_KNN_K + 1) /* 0..K frauds among the K nearest: the search's K, from knn_api.h */
#define MAX_KNOWN 64     /* known_merchants entries kept; a longer list goes to the Python path */
#define MAX_DEPTH 32     /* nesting of ignored members; deeper goes to the Python path */
#define MAX_NUMBER 32    /* characters in one number */
#define MAX_MCC 64

static const fs_knn_api *knn;
static locale_t c_locale; /* numbers are read in it: a process's LC_NUMERIC could say ',' */

/* ---- Reading: every reader returns 0 when it read what it expects, -1 to decline ---------- */

typedef struct { const char *p, *end; } cur_t;
typedef struct { const char *s; size_t n; } slice_t;

static inline void ws(cur_t *c) {
    while (c->p < c->end && (*c->p == ' ' || *c->p == '\n' || *c->p == '\r' || *c->p == '\t')) c->p++;
}

static inline int eat(cur_t *c, char ch) {
    ws(c);
    if (c->p >= c->end || *c->p != ch) return -1;
    c->p++;
    return 0;
}

static int literal(cur_t *c, const char *word) {
    size_t n = strlen(word);
    if ((size_t)(c->end - c->p) < n || memcmp(c->p, word, n) != 0) return -1;
    c->p += n;
    return 0;
}

/* A string of printable ASCII without escapes; anything else (valid or not) is declined. */
static int read_string(cur_t *c, slice_t *out) {
    if (eat(c, '"')) return -1;
    const char *s = c->p;
    while (c->p < c->end) {
        unsigned char ch = (unsigned char)*c->p;
        if (ch == '"') {
            out->s = s;
            out->n = (size_t)(c->p - s);
            c->p++;
            return 0;
        }
        if (ch < 0x20 || ch > 0x7e || ch == '\\') return -1;
        c->p++;
    }
    return -1;
}

static int skip_digits(cur_t *c) {
    const char *start = c->p;
    while (c->p < c->end && *c->p >= '0' && *c->p <= '9') c->p++;
    return c->p > start ? 0 : -1;
}

/* A JSON number (the grammar checked here, the value by strtod), finite. */
static int read_number(cur_t *c, double *out) {
    ws(c);
    const char *start = c->p;
    if (c->p < c->end && *c->p == '-') c->p++;
    if (c->p < c->end && *c->p == '0') c->p++;
    else if (skip_digits(c)) return -1;
    if (c->p < c->end && *c->p == '.') { c->p++; if (skip_digits(c)) return -1; }
    if (c->p < c->end && (*c->p == 'e' || *c->p == 'E')) {
        c->p++;
        if (c->p < c->end && (*c->p == '+' || *c->p == '-')) c->p++;
        if (skip_digits(c)) return -1;
    }
    size_t n = (size_t)(c->p - start);
    if (n > MAX_NUMBER) return -1;
    char buf[MAX_NUMBER + 1];
    memcpy(buf, start, n);
    buf[n] = '\0';
    *out = strtod_l(buf, NULL, c_locale);
    return isfinite(*out) ? 0 : -1;
}

static int read_non_negative(cur_t *c, double *out) {
    return read_number(c, out) || *out < 0.0 ? -1 : 0;
}

static int read_bool(cur_t *c, int *out) {
    ws(c);
    if (literal(c, "true") == 0) { *out = 1; return 0; }
    if (literal(c, "false") == 0) { *out = 0; return 0; }
    return -1;
}

/* Walks an object's members: call with *first = 1 just after '{'.  Returns 1 with the key read
 * and its ':' eaten, 0 after the closing '}', -1 to decline. */
static int next_member(cur_t *c, int *first, slice_t *key) {
    ws(c);
    if (c->p >= c->end) return -1;
    if (*c->p == '}') { c->p++; return 0; }
    if (!*first && eat(c, ',')) return -1;
    *first = 0;
    if (read_string(c, key) || eat(c, ':')) return -1;
    return 1;
}

/* The same for an array's elements: 1 when an element follows, 0 after ']'. */
static int next_element(cur_t *c, int *first) {
    ws(c);
    if (c->p >= c->end) return -1;
    if (*c->p == ']') { c->p++; return 0; }
    if (!*first && eat(c, ',')) return -1;
    *first = 0;
    ws(c);
    return 1;
}

/* A value nobody reads, still checked to be valid JSON (the Python path would refuse it). */
static int skip_value(cur_t *c, int depth) {
    if (depth > MAX_DEPTH) return -1;
    ws(c);
    if (c->p >= c->end) return -1;
    int first = 1, r;
    slice_t s;
    switch (*c->p) {
    case '{':
        c->p++;
        while ((r = next_member(c, &first, &s)) == 1)
            if (skip_value(c, depth + 1)) return -1;
        return r;
    case '[':
        c->p++;
        while ((r = next_element(c, &first)) == 1)
            if (skip_value(c, depth + 1)) return -1;
        return r;
    case '"': return read_string(c, &s);
    case 't': return literal(c, "true");
    case 'f': return literal(c, "false");
    case 'n': return literal(c, "null");
    default: { double x; return read_number(c, &x); }
    }
}

static inline int is_key(slice_t k, const char *name) {
    size_t n = strlen(name);
    return k.n == n && memcmp(k.s, name, n) == 0;
}

/* ---- The payload ---------------------------------------------------------------------------- */

typedef struct {
    int has_last;
    double amount, installments, avg_amount, tx_count, merchant_avg, km_home, km_last;
    int64_t now, then; /* seconds since 1970-01-01T00:00:00Z */
    int online, card_present;
    slice_t merchant_id, mcc;
    slice_t known[MAX_KNOWN];
    int n_known;
} payload_t;

/* Days from 1970-01-01 to a proleptic Gregorian date (H. Hinnant's days_from_civil). */
static int64_t days_from_civil(int y, int m, int d) {
    y -= m <= 2;
    int64_t era = (y >= 0 ? y : y - 399) / 400;
    int64_t yoe = y - era * 400;
    int64_t doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1;
    int64_t doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    return era * 146097 + doe - 719468;
}

static int digits(const char *s, int n, int *out) {
    int v = 0;
    for (int i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9') return -1;
        v = v * 10 + (s[i] - '0');
    }
    *out = v;
    return 0;
}

/* YYYY-MM-DDTHH:MM:SS, then Z or nothing (both UTC, as the Python path reads them). */
static int read_timestamp(cur_t *c, int64_t *seconds) {
    slice_t s;
    if (read_string(c, &s)) return -1;
    if (!(s.n == 19 || (s.n == 20 && s.s[19] == 'Z'))) return -1;
    const char *t = s.s;
    int y, mo, d, h, mi, se;
    if (t[4] != '-' || t[7] != '-' || t[10] != 'T' || t[13] != ':' || t[16] != ':') return -1;
    if (digits(t, 4, &y) || digits(t + 5, 2, &mo) || digits(t + 8, 2, &d) || digits(t + 11, 2, &h) ||
        digits(t + 14, 2, &mi) || digits(t + 17, 2, &se))
        return -1;
    static const int month_days[12] = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
    int leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    if (y < 1 || mo < 1 || mo > 12 || d < 1 || d > month_days[mo - 1] + (mo == 2 && leap)) return -1;
    if (h > 23 || mi > 59 || se > 59) return -1;
    *seconds = days_from_civil(y, mo, d) * 86400 + h * 3600 + mi * 60 + se;
    return 0;
}

static int read_known(cur_t *c, payload_t *pl) {
    int first = 1, r;
    if (eat(c, '[')) return -1;
    while ((r = next_element(c, &first)) == 1) {
        if (pl->n_known == MAX_KNOWN || read_string(c, &pl->known[pl->n_known])) return -1;
        pl->n_known++;
    }
    return r;
}

/* The payload's shape, as tables: each field's key, how it is read, and where it goes. */
typedef enum { NUMBER, NON_NEGATIVE, STRING, BOOLEAN, TIMESTAMP, KNOWN_LIST, OBJECT, OBJECT_OR_NULL } kind_t;
typedef struct field {
    const char *key;
    kind_t kind;
    size_t offset;           /* in payload_t */
    const struct field *sub; /* the members of an OBJECT, ended by a NULL key */
    int optional;            /* may be absent (only last_transaction, which then reads as null) */
} field_t;

#define AT(member) offsetof(payload_t, member)
static const field_t TRANSACTION[] = {
    {"amount", NON_NEGATIVE, AT(amount), NULL, 0},
    {"installments", NON_NEGATIVE, AT(installments), NULL, 0},
    {"requested_at", TIMESTAMP, AT(now), NULL, 0},
    {NULL, 0, 0, NULL, 0},
};
static const field_t CUSTOMER[] = {
    {"avg_amount", NUMBER, AT(avg_amount), NULL, 0},
    {"tx_count_24h", NON_NEGATIVE, AT(tx_count), NULL, 0},
    {"known_merchants", KNOWN_LIST, 0, NULL, 0},
    {NULL, 0, 0, NULL, 0},
};
static const field_t MERCHANT[] = {
    {"id", STRING, AT(merchant_id), NULL, 0},
    {"mcc", STRING, AT(mcc), NULL, 0},
    {"avg_amount", NON_NEGATIVE, AT(merchant_avg), NULL, 0},
    {NULL, 0, 0, NULL, 0},
};
static const field_t TERMINAL[] = {
    {"is_online", BOOLEAN, AT(online), NULL, 0},
    {"card_present", BOOLEAN, AT(card_present), NULL, 0},
    {"km_from_home", NON_NEGATIVE, AT(km_home), NULL, 0},
    {NULL, 0, 0, NULL, 0},
};
static const field_t LAST_TRANSACTION[] = {
    {"timestamp", TIMESTAMP, AT(then), NULL, 0},
    {"km_from_current", NON_NEGATIVE, AT(km_last), NULL, 0},
    {NULL, 0, 0, NULL, 0},
};
static const field_t PAYLOAD[] = {
    {"transaction", OBJECT, 0, TRANSACTION, 0},
    {"customer", OBJECT, 0, CUSTOMER, 0},
    {"merchant", OBJECT, 0, MERCHANT, 0},
    {"terminal", OBJECT, 0, TERMINAL, 0},
    {"last_transaction", OBJECT_OR_NULL, AT(has_last), LAST_TRANSACTION, 1},
    {NULL, 0, 0, NULL, 0},
};
#undef AT

static int read_object(cur_t *c, payload_t *pl, const field_t *fields, int depth);

static int read_field(cur_t *c, payload_t *pl, const field_t *f, int depth) {
    char *at = (char *)pl + f->offset;
    switch (f->kind) {
    case NUMBER: return read_number(c, (double *)at);
    case NON_NEGATIVE: return read_non_negative(c, (double *)at);
    case STRING: return read_string(c, (slice_t *)at);
    case BOOLEAN: return read_bool(c, (int *)at);
    case TIMESTAMP: return read_timestamp(c, (int64_t *)at);
    case KNOWN_LIST: return read_known(c, pl);
    case OBJECT: return read_object(c, pl, f->sub, depth + 1);
    case OBJECT_OR_NULL:
        ws(c);
        if (literal(c, "null") == 0) return 0;
        *(int *)at = 1;
        return read_object(c, pl, f->sub, depth + 1);
    }
    return -1;
}

/* One object of the payload: each field read once (twice is declined), any other member checked
 * and skipped, then every field that must be there, there. */
static int read_object(cur_t *c, payload_t *pl, const field_t *fields, int depth) {
    int first = 1, r;
    unsigned seen = 0; /* bit i: fields[i] was read */
    slice_t k;
    if (eat(c, '{')) return -1;
    while ((r = next_member(c, &first, &k)) == 1) {
        const field_t *f = fields;
        while (f->key && !is_key(k, f->key)) f++;
        if (!f->key) r = skip_value(c, depth + 1);
        else {
            unsigned bit = 1u << (f - fields);
            if (seen & bit) return -1;
            seen |= bit;
            r = read_field(c, pl, f, depth);
        }
        if (r) return -1;
    }
    if (r) return -1;
    for (const field_t *f = fields; f->key; f++)
        if (!f->optional && !(seen & (1u << (f - fields)))) return -1;
    return 0;
}

static int read_payload(const char *body, size_t n, payload_t *pl) {
    cur_t c = {body, body + n};
    memset(pl, 0, sizeof *pl);
    if (read_object(&c, pl, PAYLOAD, 0)) return -1;
    ws(&c);
    return c.p == c.end ? 0 : -1;
}

/* ---- The vector --------------------------------------------------------------------------------- */

typedef struct {
    double max_amount, max_installments, amount_vs_avg_ratio, max_minutes, max_km, max_tx_count_24h,
        max_merchant_avg_amount;
} divisors_t;

/* Each divisor by its name in contract/vectorize.py (NORMALIZATION_KEYS): the constructor takes
 * them as a mapping, so no order is shared between the two files, only these names. */
#define DIVISOR(name) {#name, offsetof(divisors_t, name)}
static const struct { const char *name; size_t offset; } DIVISORS[] = {
    DIVISOR(max_amount), DIVISOR(max_installments), DIVISOR(amount_vs_avg_ratio), DIVISOR(max_minutes),
    DIVISOR(max_km), DIVISOR(max_tx_count_24h), DIVISOR(max_merchant_avg_amount),
};
#undef DIVISOR
#define N_DIVISORS (sizeof DIVISORS / sizeof DIVISORS[0])
_Static_assert(N_DIVISORS * sizeof(double) == sizeof(divisors_t), "every divisor has its name");

typedef struct { char code[MAX_MCC]; size_t n; double risk; } mcc_t;

static inline double clamp01(double x) { return x < 0.0 ? 0.0 : x > 1.0 ? 1.0 : x; }

/* vectorize.py's round4, bit for bit: k / 10^4 for the k nearest x * 10^4, and near a tie what
 * round(x, 4) gives (ties to even on the exact product; -0.0 for a negative x rounding to 0).
 * x * 10^4 rounded is s; s + e is the exact product (fma gives e exactly). */
static double round4(double x) {
    double s = x * 10000.0;
    double k = floor(s + 0.5);
    if (fabs(s - k) <= 0.4999) return k / 10000.0;
    double e = fma(x, 10000.0, -s);
    double f = floor(s);
    double above = s - (f + 0.5); /* exact (Sterbenz): |f + 0.5| >= 0.5 and s is within 1e-4 of it */
    if (above > -e) k = f + 1.0;
    else if (above < -e) k = f;
    else k = fmod(f, 2.0) == 0.0 ? f : f + 1.0;
    return k == 0.0 ? copysign(0.0, x) : k / 10000.0;
}

/* The constants the vector is made with, all given by Python at construction. */
typedef struct {
    divisors_t divisors;
    double unknown_mcc_risk;
    mcc_t *mcc;
    int n_mcc;
} constants_t;

static int vectorize(const payload_t *pl, const constants_t *k, double *v) {
    const divisors_t *dv = &k->divisors;
    double minutes_dim = -1.0, km_last_dim = -1.0;
    if (pl->has_last) {
        double minutes = (double)(pl->now - pl->then) / 60.0;
        minutes_dim = clamp01(minutes / dv->max_minutes);
        km_last_dim = clamp01(pl->km_last / dv->max_km);
    }
    double ratio_dim;
    if (pl->avg_amount > 0) ratio_dim = clamp01((pl->amount / pl->avg_amount) / dv->amount_vs_avg_ratio);
    else ratio_dim = pl->amount > 0 ? 1.0 : 0.0;
    int64_t days = pl->now / 86400 - (pl->now % 86400 < 0); /* floor: years before 1970 too */
    int64_t seconds_of_day = pl->now - days * 86400;
    int weekday = (int)((days % 7 + 7 + 3) % 7); /* Monday 0; 1970-01-01 was a Thursday */
    double unknown = 1.0;
    for (int i = 0; i < pl->n_known; i++)
        if (pl->known[i].n == pl->merchant_id.n && memcmp(pl->known[i].s, pl->merchant_id.s, pl->merchant_id.n) == 0) {
            unknown = 0.0;
            break;
        }
    if (pl->mcc.n >= MAX_MCC) return -1; /* longer than any code the table keeps */
    double risk = k->unknown_mcc_risk;
    for (int i = 0; i < k->n_mcc; i++)
        if (k->mcc[i].n == pl->mcc.n && memcmp(k->mcc[i].code, pl->mcc.s, pl->mcc.n) == 0) { risk = k->mcc[i].risk; break; }
    double raw[DIMS] = {
        clamp01(pl->amount / dv->max_amount),
        clamp01(pl->installments / dv->max_installments),
        ratio_dim,
        (double)(seconds_of_day / 3600) / 23.0,
        (double)weekday / 6.0,
        minutes_dim,
        km_last_dim,
        clamp01(pl->km_home / dv->max_km),
        clamp01(pl->tx_count / dv->max_tx_count_24h),
        pl->online ? 1.0 : 0.0,
        pl->card_present ? 1.0 : 0.0,
        unknown,
        risk,
        clamp01(pl->merchant_avg / dv->max_merchant_avg_amount),
    };
    for (int d = 0; d < DIMS; d++) v[d] = round4(raw[d]);
    return 0;
}

/* ---- HTTP framing ------------------------------------------------------------------------------- */

#define SCORE_PATH "/fraud-score"
static const char REQUEST_LINE[] = "POST " SCORE_PATH " HTTP/1.1\r\n";

static inline int is_tchar(unsigned char ch) {
    return (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
           (ch != 0 && strchr("!#$%&'*+-.^_`|~", ch) != NULL);
}

static int name_is(const char *s, size_t n, const char *lower) {
    size_t m = strlen(lower);
    if (n != m) return 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)s[i];
        if (ch >= 'A' && ch <= 'Z') ch = (unsigned char)(ch + 32);
        if (ch != (unsigned char)lower[i]) return 0;
    }
    return 1;
}

/* The limits on a request's head (ServiceConfig's): a request over any of them is the Python
 * path's to refuse (414, 431), so the fast path declines it. */
typedef struct { Py_ssize_t max_body, max_headers, max_header_bytes; int url_fits; } limits_t;

/* The body of data if it is exactly one plain POST /fraud-score request within the limits; -1 to
 * decline.  Header bytes are counted as the Python path counts them (name, value, 4) but with the
 * value's trailing blanks kept, so near the limit this declines at least whatever Python refuses. */
static int frame(const char *data, size_t n, const limits_t *limits, const char **body, size_t *body_len) {
    size_t line = sizeof REQUEST_LINE - 1;
    if (!limits->url_fits || n < line || memcmp(data, REQUEST_LINE, line) != 0) return -1;
    const char *p = data + line, *end = data + n;
    long long length = -1;
    Py_ssize_t headers = 0, header_bytes = 0;
    for (;;) {
        if (end - p >= 2 && p[0] == '\r' && p[1] == '\n') { p += 2; break; }
        const char *name = p;
        while (p < end && is_tchar((unsigned char)*p)) p++;
        if (p == name || p >= end || *p != ':') return -1;
        size_t name_len = (size_t)(p - name);
        p++;
        while (p < end && (*p == ' ' || *p == '\t')) p++;
        const char *value = p;
        while (p < end && ((unsigned char)*p >= 0x20 ? (unsigned char)*p <= 0x7e : *p == '\t')) p++;
        if (end - p < 2 || p[0] != '\r' || p[1] != '\n') return -1;
        header_bytes += (Py_ssize_t)(name_len + (size_t)(p - value) + 4);
        if (++headers > limits->max_headers || header_bytes > limits->max_header_bytes) return -1;
        const char *value_end = p;
        while (value_end > value && (value_end[-1] == ' ' || value_end[-1] == '\t')) value_end--;
        size_t value_len = (size_t)(value_end - value);
        p += 2;
        if (name_is(name, name_len, "content-length")) {
            if (length >= 0 || value_len == 0 || value_len > 9 || (value_len > 1 && value[0] == '0')) return -1;
            length = 0;
            for (size_t i = 0; i < value_len; i++) {
                if (value[i] < '0' || value[i] > '9') return -1;
                length = length * 10 + (value[i] - '0');
            }
        } else if (name_is(name, name_len, "connection")) {
            if (!name_is(value, value_len, "keep-alive")) return -1;
        } else if (name_is(name, name_len, "transfer-encoding") || name_is(name, name_len, "expect") ||
                   name_is(name, name_len, "upgrade")) {
            return -1;
        }
    }
    if (length < 0 || length > limits->max_body || (long long)(end - p) != length) return -1;
    *body = p;
    *body_len = (size_t)length;
    return 0;
}

/* ---- Request metrics: counted here, read only when scraped (service/metrics.py) --------------------
 *
 * A counter costs an increment and a histogram a few comparisons, so the fast path's ~5 us answer
 * pays nanoseconds for them; prometheus_client's objects (about a microsecond per call) are used
 * only at scrape time, to write out what these arrays hold.  The native loop (NativeLoop, below)
 * answers on a thread of its own, without the GIL, beside the event loop's thread: so every count
 * is added and read atomically (relaxed: each is a count on its own, no order between them). */

#define MAX_ROUTES 8       /* named routes; one more slot counts every other path */
#define ROUTE_CHARS 32     /* a route's path, at most */
#define MIN_STATUS 100
#define MAX_STATUS 600     /* statuses 100..599 */
enum { NATIVE, PYTHON, N_ANSWERERS }; /* who answered: this file's fast path, or httptools and Python */

/* Upper bounds of the histograms' buckets, in nanoseconds (a last bucket holds what is above).
 * Latency: the fast path answers in ~5 us, the Python path in ~15-50 us, a slow request or a
 * timeout takes milliseconds to seconds.  The search: median ~5 us, p99 ~40 us. */
static const uint64_t LATENCY_BOUNDS[] = {2500, 5000, 7500, 10000, 15000, 25000, 50000, 100000, 250000,
                                          500000, 1000000, 2500000, 10000000, 100000000, 1000000000};
static const uint64_t SEARCH_BOUNDS[] = {1000, 2000, 3000, 4000, 5000, 7500, 10000, 15000, 20000,
                                         30000, 40000, 60000, 100000, 250000, 1000000};
#define N_LATENCY (sizeof LATENCY_BOUNDS / sizeof LATENCY_BOUNDS[0])
#define N_SEARCH (sizeof SEARCH_BOUNDS / sizeof SEARCH_BOUNDS[0])

typedef struct { uint64_t buckets[N_LATENCY + 1]; uint64_t sum_ns; } latency_t;
typedef struct { uint64_t buckets[N_SEARCH + 1]; uint64_t sum_ns; } search_t;

typedef struct {
    PyObject_HEAD
    int n_routes;
    char route[MAX_ROUTES][ROUTE_CHARS];
    size_t route_len[MAX_ROUTES];
    PyObject *answers[N_ANSWERS]; /* the scoring answers: a response that is one of them is a decision */
    uint64_t requests[N_ANSWERERS][MAX_ROUTES + 1][MAX_STATUS - MIN_STATUS];
    latency_t latency[N_ANSWERERS][MAX_ROUTES + 1];
    search_t search[N_ANSWERERS];
    uint64_t decisions[N_ANSWERS]; /* by frauds among the neighbours */
    uint64_t declined;             /* reads the fast path passed to the Python path */
} MetricsObject;

static inline uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts); /* the clock of Python's time.monotonic(), through the vDSO */
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

#define ADD(x, n) __atomic_fetch_add(&(x), (n), __ATOMIC_RELAXED)
#define LOAD(x) __atomic_load_n(&(x), __ATOMIC_RELAXED)

static inline size_t bucket_of(const uint64_t *bounds, size_t n, uint64_t ns) {
    size_t i = 0;
    while (i < n && ns > bounds[i]) i++;
    return i;
}

static inline void observe_latency(latency_t *h, uint64_t ns) {
    ADD(h->buckets[bucket_of(LATENCY_BOUNDS, N_LATENCY, ns)], 1);
    ADD(h->sum_ns, ns);
}

static inline void observe_search(search_t *h, uint64_t ns) {
    ADD(h->buckets[bucket_of(SEARCH_BOUNDS, N_SEARCH, ns)], 1);
    ADD(h->sum_ns, ns);
}

static int match_route(const MetricsObject *m, const char *path, size_t n) {
    for (int r = 0; r < m->n_routes; r++)
        if (m->route_len[r] == n && memcmp(m->route[r], path, n) == 0) return r;
    return m->n_routes;
}

/* The route of a request target: its path (up to '?') among the named routes, else n_routes.
 * The target may come in pieces (a list of bytes, as httptools reports it); only the first
 * ROUTE_CHARS + 1 bytes can matter. */
static int route_of(const MetricsObject *m, PyObject *target) {
    char path[ROUTE_CHARS + 1];
    size_t n = 0;
    PyObject *const *pieces = &target;
    Py_ssize_t count = 1;
    if (PyList_Check(target)) {
        pieces = ((PyListObject *)target)->ob_item;
        count = PyList_GET_SIZE(target);
    }
    for (Py_ssize_t i = 0; i < count && n <= ROUTE_CHARS; i++) {
        if (!PyBytes_Check(pieces[i])) return m->n_routes;
        const char *s = PyBytes_AS_STRING(pieces[i]);
        for (Py_ssize_t j = 0; j < PyBytes_GET_SIZE(pieces[i]) && n <= ROUTE_CHARS; j++) {
            if (s[j] == '?') goto done;
            path[n++] = s[j];
        }
    }
done:
    return match_route(m, path, n);
}

static int Metrics_init(MetricsObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"routes", "answers", NULL};
    PyObject *routes, *answers;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O!O!", kwlist, &PyTuple_Type, &routes, &PyTuple_Type, &answers))
        return -1;
    if (PyTuple_GET_SIZE(routes) > MAX_ROUTES) {
        PyErr_Format(PyExc_ValueError, "at most %d routes", MAX_ROUTES);
        return -1;
    }
    if (PyTuple_GET_SIZE(answers) != N_ANSWERS) {
        PyErr_Format(PyExc_ValueError, "answers must be a tuple of %d bytes (0 to %d frauds)", N_ANSWERS, FS_KNN_K);
        return -1;
    }
    for (Py_ssize_t r = 0; r < PyTuple_GET_SIZE(routes); r++) {
        PyObject *route = PyTuple_GET_ITEM(routes, r);
        if (!PyBytes_Check(route) || PyBytes_GET_SIZE(route) == 0 || PyBytes_GET_SIZE(route) > ROUTE_CHARS) {
            PyErr_Format(PyExc_ValueError, "a route must be a path of 1 to %d bytes", ROUTE_CHARS);
            return -1;
        }
        memcpy(self->route[r], PyBytes_AS_STRING(route), (size_t)PyBytes_GET_SIZE(route));
        self->route_len[r] = (size_t)PyBytes_GET_SIZE(route);
    }
    for (int i = 0; i < N_ANSWERS; i++) {
        PyObject *a = PyTuple_GET_ITEM(answers, i);
        if (!PyBytes_Check(a)) { PyErr_SetString(PyExc_TypeError, "answers must be bytes"); return -1; }
        Py_INCREF(a);
        Py_XSETREF(self->answers[i], a);
    }
    self->n_routes = (int)PyTuple_GET_SIZE(routes);
    return 0;
}

static void Metrics_dealloc(MetricsObject *self) {
    for (int i = 0; i < N_ANSWERS; i++) Py_CLEAR(self->answers[i]);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* record(target, response, started): one response of the Python path.  target is the request's
 * URL (bytes, or the list of pieces httptools gave), response the bytes written (the status is
 * read from "HTTP/1.1 NNN"), started the time.monotonic() at which the request's first byte was
 * read. */
static PyObject *Metrics_record(MetricsObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) return PyErr_Format(PyExc_TypeError, "record() takes 3 arguments (%zd given)", nargs);
    PyObject *response = args[1];
    double started = PyFloat_AsDouble(args[2]);
    if (started == -1.0 && PyErr_Occurred()) return NULL;
    if (!PyBytes_Check(response) || PyBytes_GET_SIZE(response) < 12)
        return PyErr_Format(PyExc_ValueError, "record() takes an HTTP response's bytes");
    const char *s = PyBytes_AS_STRING(response) + 9;
    int status = 0;
    if (digits(s, 3, &status) || status < MIN_STATUS || status >= MAX_STATUS)
        return PyErr_Format(PyExc_ValueError, "record() takes an HTTP response's bytes");
    int route = route_of(self, args[0]);
    double elapsed = (double)now_ns() - started * 1e9;
    ADD(self->requests[PYTHON][route][status - MIN_STATUS], 1);
    observe_latency(&self->latency[PYTHON][route], elapsed > 0 ? (uint64_t)elapsed : 0);
    for (int i = 0; i < N_ANSWERS; i++)
        if (response == self->answers[i]) { ADD(self->decisions[i], 1); break; }
    Py_RETURN_NONE;
}

/* searched(ns): one search of the Python path, timed by its caller. */
static PyObject *Metrics_searched(MetricsObject *self, PyObject *arg) {
    long long ns = PyLong_AsLongLong(arg);
    if (ns == -1 && PyErr_Occurred()) return NULL;
    observe_search(&self->search[PYTHON], ns > 0 ? (uint64_t)ns : 0);
    Py_RETURN_NONE;
}

static PyObject *bounds_tuple(const uint64_t *bounds, size_t n) {
    PyObject *out = PyTuple_New((Py_ssize_t)n);
    if (!out) return NULL;
    for (size_t i = 0; i < n; i++) {
        PyObject *x = PyFloat_FromDouble((double)bounds[i] / 1e9);
        if (!x) { Py_DECREF(out); return NULL; }
        PyTuple_SET_ITEM(out, (Py_ssize_t)i, x);
    }
    return out;
}

/* (bucket counts, not cumulative; sum in seconds) */
static PyObject *histogram_tuple(uint64_t *buckets, size_t n, uint64_t sum_ns) {
    PyObject *counts = PyTuple_New((Py_ssize_t)n);
    if (!counts) return NULL;
    for (size_t i = 0; i < n; i++) {
        PyObject *x = PyLong_FromUnsignedLongLong(LOAD(buckets[i]));
        if (!x) { Py_DECREF(counts); return NULL; }
        PyTuple_SET_ITEM(counts, (Py_ssize_t)i, x);
    }
    return Py_BuildValue("(Nd)", counts, (double)sum_ns / 1e9); /* sum_ns: read with LOAD by the caller */
}

static int append_new(PyObject *list, PyObject *item) {
    if (!item) return -1;
    int r = PyList_Append(list, item);
    Py_DECREF(item);
    return r;
}

/* snapshot() -> dict: every count as it is now (see _fastpath.pyi for its shape). */
static PyObject *Metrics_snapshot(MetricsObject *self, PyObject *unused) {
    PyObject *requests = PyList_New(0), *latency = PyList_New(0), *search = PyList_New(0), *decisions = NULL;
    if (!requests || !latency || !search) goto fail;
    for (int a = 0; a < N_ANSWERERS; a++) {
        for (int r = 0; r <= self->n_routes; r++) {
            for (int st = 0; st < MAX_STATUS - MIN_STATUS; st++) {
                uint64_t count = LOAD(self->requests[a][r][st]);
                if (count && append_new(requests, Py_BuildValue("(iiiK)", a, r, st + MIN_STATUS, (unsigned long long)count)))
                    goto fail;
            }
            latency_t *h = &self->latency[a][r];
            uint64_t total = 0;
            for (size_t b = 0; b <= N_LATENCY; b++) total += LOAD(h->buckets[b]);
            if (total && append_new(latency, Py_BuildValue("(iiN)", a, r, histogram_tuple(h->buckets, N_LATENCY + 1, LOAD(h->sum_ns)))))
                goto fail;
        }
        search_t *h = &self->search[a];
        if (append_new(search, Py_BuildValue("(iN)", a, histogram_tuple(h->buckets, N_SEARCH + 1, LOAD(h->sum_ns)))))
            goto fail;
    }
    decisions = PyTuple_New(N_ANSWERS);
    if (!decisions) goto fail;
    for (int i = 0; i < N_ANSWERS; i++) {
        PyObject *x = PyLong_FromUnsignedLongLong(LOAD(self->decisions[i]));
        if (!x) goto fail;
        PyTuple_SET_ITEM(decisions, i, x);
    }
    return Py_BuildValue("{sNsNsNsNsK}", "requests", requests, "latency", latency, "search", search,
                         "decisions", decisions, "declined", (unsigned long long)LOAD(self->declined));
fail:
    Py_XDECREF(requests);
    Py_XDECREF(latency);
    Py_XDECREF(search);
    Py_XDECREF(decisions);
    return NULL;
}

static PyMethodDef Metrics_methods[] = {
    {"record", (PyCFunction)(void (*)(void))Metrics_record, METH_FASTCALL,
     "record($self, target, response, started, /)\n--\n\nCount one response of the Python path and its latency."},
    {"searched", (PyCFunction)Metrics_searched, METH_O,
     "searched($self, ns, /)\n--\n\nOne search of the Python path, in nanoseconds."},
    {"snapshot", (PyCFunction)Metrics_snapshot, METH_NOARGS, "snapshot($self, /)\n--\n\nEvery count as it is now."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject MetricsType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "fraudscore.service._fastpath.RequestMetrics",
    .tp_basicsize = sizeof(MetricsObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "RequestMetrics(routes, answers)\n--\n\nThe service's request counters and histograms, kept natively.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Metrics_init,
    .tp_dealloc = (destructor)Metrics_dealloc,
    .tp_methods = Metrics_methods,
};

/* ---- The Python type ---------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    PyObject *index;
    PyObject *answers[N_ANSWERS];
    constants_t constants;
    limits_t limits;
    unsigned long long answered, declined; /* requests, for the service's log (atomic: see ADD) */
    int loops;                             /* NativeLoops answering with this object: it must not change */
    MetricsObject *metrics;                /* or NULL: where answered requests are counted and timed */
    int route;                             /* /fraud-score's slot in metrics */
} FastPathObject;

static void FastPath_clear_fields(FastPathObject *self) {
    Py_CLEAR(self->index);
    Py_CLEAR(self->metrics);
    for (int i = 0; i < N_ANSWERS; i++) Py_CLEAR(self->answers[i]);
    PyMem_Free(self->constants.mcc);
    self->constants.mcc = NULL;
    self->constants.n_mcc = 0;
}

/* A positive finite number, or -1 with ValueError naming `what`. */
static int read_positive(PyObject *obj, const char *what, double *out) {
    *out = PyFloat_AsDouble(obj);
    if (*out == -1.0 && PyErr_Occurred()) return -1;
    if (!(*out > 0.0) || isinf(*out)) {
        PyErr_Format(PyExc_ValueError, "%s must be a positive number", what);
        return -1;
    }
    return 0;
}

static int read_divisors(PyObject *map, divisors_t *dv) {
    if (!PyDict_Check(map)) { PyErr_SetString(PyExc_TypeError, "divisors must be a dict of name: number"); return -1; }
    if ((size_t)PyDict_Size(map) != N_DIVISORS) {
        PyErr_Format(PyExc_ValueError, "divisors must hold the %d divisors max_amount ... max_merchant_avg_amount, got %zd",
                     (int)N_DIVISORS, PyDict_Size(map));
        return -1;
    }
    for (size_t i = 0; i < N_DIVISORS; i++) {
        PyObject *value = PyDict_GetItemString(map, DIVISORS[i].name); /* borrowed */
        if (!value) { PyErr_Format(PyExc_ValueError, "divisors has no %s", DIVISORS[i].name); return -1; }
        char what[64];
        snprintf(what, sizeof what, "divisor %s", DIVISORS[i].name);
        if (read_positive(value, what, (double *)((char *)dv + DIVISORS[i].offset))) return -1;
    }
    return 0;
}

static int read_mcc(PyObject *dict, FastPathObject *self) {
    if (!PyDict_Check(dict)) { PyErr_SetString(PyExc_TypeError, "mcc_risk must be a dict"); return -1; }
    Py_ssize_t n = PyDict_Size(dict), pos = 0, i = 0;
    mcc_t *mcc = self->constants.mcc = PyMem_Calloc(n ? (size_t)n : 1, sizeof(mcc_t));
    if (!mcc) { PyErr_NoMemory(); return -1; }
    PyObject *key, *value;
    while (PyDict_Next(dict, &pos, &key, &value)) {
        Py_ssize_t len;
        const char *s = PyUnicode_Check(key) ? PyUnicode_AsUTF8AndSize(key, &len) : NULL;
        if (!s) {
            if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "mcc_risk keys must be strings");
            return -1;
        }
        double risk = PyFloat_AsDouble(value);
        if (risk == -1.0 && PyErr_Occurred()) return -1;
        if (len >= MAX_MCC) continue; /* no request's code that long reaches the fast path's table */
        memcpy(mcc[i].code, s, (size_t)len);
        mcc[i].n = (size_t)len;
        mcc[i].risk = risk;
        i++;
    }
    self->constants.n_mcc = (int)i;
    return 0;
}

static int FastPath_init(FastPathObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"index", "divisors", "mcc_risk", "unknown_mcc_risk", "answers", "max_body", "metrics",
                             "max_url", "max_headers", "max_header_bytes", NULL};
    PyObject *index, *divisors, *mcc, *answers, *metrics = Py_None;
    double unknown_mcc_risk;
    Py_ssize_t max_body, max_url = PY_SSIZE_T_MAX, max_headers = PY_SSIZE_T_MAX, max_header_bytes = PY_SSIZE_T_MAX;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O!OOdOn|$Onnn", kwlist, knn->index_type, &index, &divisors, &mcc,
                                     &unknown_mcc_risk, &answers, &max_body, &metrics, &max_url, &max_headers,
                                     &max_header_bytes))
        return -1;
    if (self->loops) {
        PyErr_SetString(PyExc_RuntimeError, "a NativeLoop answers with this FastPath: it cannot be changed");
        return -1;
    }
    FastPath_clear_fields(self);
    if (metrics != Py_None) {
        if (!PyObject_TypeCheck(metrics, &MetricsType)) {
            PyErr_SetString(PyExc_TypeError, "metrics must be a RequestMetrics or None");
            return -1;
        }
        MetricsObject *m = (MetricsObject *)metrics;
        self->route = match_route(m, SCORE_PATH, sizeof SCORE_PATH - 1);
        if (self->route == m->n_routes) {
            PyErr_Format(PyExc_ValueError, "metrics has no route %s", SCORE_PATH);
            return -1;
        }
        Py_INCREF(metrics);
        self->metrics = m;
    }
    if (read_divisors(divisors, &self->constants.divisors) || read_mcc(mcc, self)) return -1;
    if (!isfinite(unknown_mcc_risk)) { PyErr_SetString(PyExc_ValueError, "unknown_mcc_risk must be a finite number"); return -1; }
    self->constants.unknown_mcc_risk = unknown_mcc_risk;
    if (!PyTuple_Check(answers) || PyTuple_GET_SIZE(answers) != N_ANSWERS) {
        PyErr_Format(PyExc_ValueError, "answers must be a tuple of %d bytes (0 to %d frauds among the %d nearest)",
                     N_ANSWERS, FS_KNN_K, FS_KNN_K);
        return -1;
    }
    for (int i = 0; i < N_ANSWERS; i++) {
        PyObject *a = PyTuple_GET_ITEM(answers, i);
        if (!PyBytes_Check(a)) { PyErr_SetString(PyExc_TypeError, "answers must be bytes"); return -1; }
        Py_INCREF(a);
        self->answers[i] = a;
    }
    if (max_body < 0 || max_url < 0 || max_headers < 0 || max_header_bytes < 0) {
        PyErr_SetString(PyExc_ValueError, "max_body, max_url, max_headers and max_header_bytes must not be negative");
        return -1;
    }
    Py_INCREF(index);
    self->index = index;
    self->limits = (limits_t){max_body, max_headers, max_header_bytes, max_url >= (Py_ssize_t)(sizeof SCORE_PATH - 1)};
    return 0;
}

static void FastPath_dealloc(FastPathObject *self) {
    FastPath_clear_fields(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int body_vector(FastPathObject *self, const char *body, size_t n, double *v) {
    payload_t pl;
    if (read_payload(body, n, &pl)) return -1;
    return vectorize(&pl, &self->constants, v);
}

static int check_initialised(FastPathObject *self) {
    if (self->index) return 0;
    PyErr_SetString(PyExc_RuntimeError, "FastPath is not initialised");
    return -1;
}

/* The frauds among the neighbours (0..K) when data is exactly one ordinary scoring request, counted
 * and timed in the metrics from started_ns (a CLOCK_MONOTONIC time; < 0: now); -1 when it declines,
 * which the caller counts.  Needs no GIL: it reads only C data, and the index and the answers stay
 * alive as long as self does (the caller holds self). */
static int answer_frauds(FastPathObject *self, const char *data, size_t n, double started_ns) {
    MetricsObject *m = self->metrics;
    uint64_t searched = 0, done = 0;
    if (m && started_ns < 0) started_ns = (double)now_ns();
    const char *body;
    size_t body_len;
    double v[DIMS];
    if (frame(data, n, &self->limits, &body, &body_len) || body_vector(self, body, body_len, v)) return -1;
    if (m) searched = now_ns();
    int frauds = knn->fraud_count(self->index, v);
    if (m) done = now_ns(); /* what follows is a few increments: the answer's time ends here */
    if (frauds < 0 || frauds >= N_ANSWERS) return -1;
    ADD(self->answered, 1);
    if (m) {
        ADD(m->requests[NATIVE][self->route][200 - MIN_STATUS], 1);
        double elapsed = (double)done - started_ns;
        observe_latency(&m->latency[NATIVE][self->route], elapsed > 0 ? (uint64_t)elapsed : 0);
        observe_search(&m->search[NATIVE], done - searched);
        ADD(m->decisions[frauds], 1);
    }
    return frauds;
}

static void count_declined(FastPathObject *self) {
    ADD(self->declined, 1);
    /* its time is the Python path's: that path's clock started before this call */
    if (self->metrics) ADD(self->metrics->declined, 1);
}

/* answer(data[, started]): started is the time.monotonic() at which data was read (the Python path
 * times its requests from the same moment); without it the time is taken here, at the cost of one
 * more clock read (37-60 ns on the development machine, BENCHMARKS.md "Metrics"). */
static PyObject *FastPath_answer(FastPathObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (check_initialised(self)) return NULL;
    if (nargs < 1 || nargs > 2) return PyErr_Format(PyExc_TypeError, "answer() takes 1 or 2 arguments (%zd given)", nargs);
    PyObject *data = args[0];
    if (!PyBytes_Check(data)) return PyErr_Format(PyExc_TypeError, "answer() takes bytes, not %.100s", Py_TYPE(data)->tp_name);
    double read_at = -1.0;
    if (nargs == 2) {
        read_at = PyFloat_AsDouble(args[1]);
        if (read_at == -1.0 && PyErr_Occurred()) return NULL;
    }
    int frauds = answer_frauds(self, PyBytes_AS_STRING(data), (size_t)PyBytes_GET_SIZE(data), read_at < 0 ? -1.0 : read_at * 1e9);
    if (frauds < 0) {
        count_declined(self);
        Py_RETURN_NONE;
    }
    PyObject *answer = self->answers[frauds];
    Py_INCREF(answer);
    return answer;
}

static PyObject *FastPath_vectorize(FastPathObject *self, PyObject *arg) {
    if (check_initialised(self)) return NULL;
    Py_buffer buf;
    if (PyObject_GetBuffer(arg, &buf, PyBUF_SIMPLE)) return NULL;
    double v[DIMS];
    int r = body_vector(self, buf.buf, (size_t)buf.len, v);
    PyBuffer_Release(&buf);
    if (r) Py_RETURN_NONE;
    PyObject *out = PyList_New(DIMS);
    if (!out) return NULL;
    for (int d = 0; d < DIMS; d++) {
        PyObject *x = PyFloat_FromDouble(v[d]);
        if (!x) { Py_DECREF(out); return NULL; }
        PyList_SET_ITEM(out, d, x);
    }
    return out;
}

static PyObject *py_round4(PyObject *module, PyObject *arg) {
    double x = PyFloat_AsDouble(arg);
    if (x == -1.0 && PyErr_Occurred()) return NULL;
    return PyFloat_FromDouble(round4(x));
}

static PyMethodDef FastPath_methods[] = {
    {"answer", (PyCFunction)(void (*)(void))FastPath_answer, METH_FASTCALL,
     "answer($self, data, started=-1.0, /)\n--\n\nThe response when data is exactly one ordinary scoring request, else None; "
     "started: the time.monotonic() at which data was read (the metrics' latency starts there)"},
    {"vectorize", (PyCFunction)FastPath_vectorize, METH_O,
     "vectorize($self, body, /)\n--\n\nThe payload's vector as the fast path computes it, or None where it declines"},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef FastPath_members[] = {
    {"answered", T_ULONGLONG, offsetof(FastPathObject, answered), READONLY, "requests answered here"},
    {"declined", T_ULONGLONG, offsetof(FastPathObject, declined), READONLY, "reads passed to the Python path"},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject FastPathType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "fraudscore.service._fastpath.FastPath",
    .tp_basicsize = sizeof(FastPathObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "FastPath(index, divisors, mcc_risk, unknown_mcc_risk, answers, max_body, *, metrics=None, "
              "max_url=sys.maxsize, max_headers=sys.maxsize, max_header_bytes=sys.maxsize)\n--\n\n"
              "Whole scoring requests answered natively; what it answers is counted in metrics. A request over "
              "the URL or header limits is declined (the Python path refuses it).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)FastPath_init,
    .tp_dealloc = (destructor)FastPath_dealloc,
    .tp_methods = FastPath_methods,
    .tp_members = FastPath_members,
};

/* ---- The native loop: handed-over connections served on a thread of their own -------------------
 *
 * Python keeps control (readiness, metrics, reloads, shutdown, and every request the fast path
 * declines); this loop only carries the ordinary ones.  adopt(fd) gives it an accepted socket.  On
 * each read it answers when the bytes are exactly one ordinary scoring request (answer_frauds, no
 * GIL), and writes the prebuilt answer.  Anything else -- a split or pipelined request, another
 * route, an error -- and the connection moves to Python for good: the loop stops watching it and
 * queues (fd, the bytes read), then signals migrate_fd, which the event loop watches; take() hands
 * them over, and Python serves the connection from those bytes on (service/native_loop.py).
 *
 * No request is ever half done here: a read is answered or moved within one iteration.  Only an
 * answer the socket could not take whole waits, for EPOLLOUT, with reads paused meanwhile.
 * Connections idle longer than idle_timeout are closed, checked about once a second.  stop() closes
 * what the loop holds and joins the thread. */

#define LOOP_EVENTS 64
#define LOOP_READ_BYTES (256 * 1024) /* as much as uvloop reads at once */
#define SWEEP_MS 1000

typedef struct conn {
    int fd;
    struct conn *prev, *next; /* the loop's ring, least recently active first */
    const char *out;          /* the rest of an answer not yet written (prebuilt bytes, alive with the FastPath) */
    size_t out_left;
    uint64_t last_active;
} conn_t;

typedef struct { int fd; char *data; size_t n; } migrant_t;

typedef struct {
    PyObject_HEAD
    FastPathObject *fast;
    int epfd, wake_fd, migrate_fd;
    int running;
    pthread_t thread;
    uint64_t idle_ns;
    pthread_mutex_t lock; /* guards inbox, outbox and stopping: the only state both threads touch */
    int *inbox;
    size_t n_in, cap_in;
    migrant_t *outbox;
    size_t n_out, cap_out;
    int stopping;
    /* the loop thread's own */
    conn_t ring;
    char *buf;
    unsigned long long answered, migrated, idle_closed, open; /* read by Python after a join (or racily, for a log) */
} LoopObject;

static void ring_remove(conn_t *c) { c->prev->next = c->next; c->next->prev = c->prev; }
static void ring_push(LoopObject *L, conn_t *c) {
    c->prev = L->ring.prev;
    c->next = &L->ring;
    L->ring.prev->next = c;
    L->ring.prev = c;
}

static void conn_close(LoopObject *L, conn_t *c) {
    L->open--; /* first: whoever sees the close sees the count without it */
    ring_remove(c);
    epoll_ctl(L->epfd, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    free(c);
}

static void signal_fd(int fd) {
    uint64_t one = 1;
    ssize_t r;
    do r = write(fd, &one, sizeof one); while (r < 0 && errno == EINTR);
    /* EAGAIN: the counter is full, so it is signalled already */
}

static void drain_fd(int fd) {
    uint64_t count;
    ssize_t r;
    do r = read(fd, &count, sizeof count); while (r < 0 && errno == EINTR);
}

/* The connection goes to Python with the bytes it sent: the loop forgets it. */
static void conn_migrate(LoopObject *L, conn_t *c, const char *data, size_t n) {
    int fd = c->fd;
    ring_remove(c);
    epoll_ctl(L->epfd, EPOLL_CTL_DEL, fd, NULL);
    free(c);
    L->open--;
    char *copy = malloc(n);
    pthread_mutex_lock(&L->lock);
    if (copy && L->n_out == L->cap_out) {
        size_t cap = L->cap_out ? 2 * L->cap_out : 16;
        migrant_t *grown = realloc(L->outbox, cap * sizeof *grown);
        if (grown) {
            L->outbox = grown;
            L->cap_out = cap;
        }
    }
    if (!copy || L->n_out == L->cap_out) {
        pthread_mutex_unlock(&L->lock);
        free(copy);
        close(fd); /* out of memory: the client sees a close, as after any failed read */
        return;
    }
    memcpy(copy, data, n);
    L->outbox[L->n_out++] = (migrant_t){fd, copy, n};
    L->migrated++;
    pthread_mutex_unlock(&L->lock);
    signal_fd(L->migrate_fd);
}

/* Write what the connection still owes; 0 when done or waiting for EPOLLOUT, -1 when it failed. */
static int conn_flush(LoopObject *L, conn_t *c) {
    while (c->out_left) {
        ssize_t w = send(c->fd, c->out, c->out_left, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (w < 0) {
            if (errno == EINTR) continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK) return -1;
            struct epoll_event ev = {.events = EPOLLOUT, .data.ptr = c};
            return epoll_ctl(L->epfd, EPOLL_CTL_MOD, c->fd, &ev);
        }
        c->out += w;
        c->out_left -= (size_t)w;
        if (!c->out_left) { /* written whole after a wait: read again */
            struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
            return epoll_ctl(L->epfd, EPOLL_CTL_MOD, c->fd, &ev);
        }
    }
    return 0;
}

static void conn_event(LoopObject *L, conn_t *c) {
    if (c->out_left) {
        if (conn_flush(L, c)) conn_close(L, c);
        return;
    }
    ssize_t n;
    do n = recv(c->fd, L->buf, LOOP_READ_BYTES, MSG_DONTWAIT); while (n < 0 && errno == EINTR);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
    if (n <= 0) { conn_close(L, c); return; } /* the client closed, or the connection failed */
    uint64_t now = now_ns();
    int frauds = answer_frauds(L->fast, L->buf, (size_t)n, (double)now);
    if (frauds < 0) { /* not counted as declined here: Python offers the same bytes to the fast path again */
        conn_migrate(L, c, L->buf, (size_t)n);
        return;
    }
    L->answered++;
    c->last_active = now;
    ring_remove(c); /* most recently active: to the end of the ring */
    ring_push(L, c);
    PyObject *answer = L->fast->answers[frauds];
    c->out = PyBytes_AS_STRING(answer);
    c->out_left = (size_t)PyBytes_GET_SIZE(answer);
    if (conn_flush(L, c)) conn_close(L, c);
}

/* The descriptors adopt() queued: each becomes a watched connection. */
static int take_inbox(LoopObject *L) {
    pthread_mutex_lock(&L->lock);
    int stopping = L->stopping;
    size_t n = L->n_in;
    int *fds = L->inbox;
    L->inbox = NULL;
    L->n_in = L->cap_in = 0;
    pthread_mutex_unlock(&L->lock);
    uint64_t now = now_ns();
    for (size_t i = 0; i < n; i++) {
        conn_t *c = stopping ? NULL : calloc(1, sizeof *c);
        if (!c) { close(fds[i]); continue; }
        c->fd = fds[i];
        c->last_active = now;
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
        if (epoll_ctl(L->epfd, EPOLL_CTL_ADD, c->fd, &ev)) { close(c->fd); free(c); continue; }
        ring_push(L, c);
        L->open++;
    }
    free(fds);
    return stopping;
}

static void *loop_main(void *arg) {
    LoopObject *L = arg;
    struct epoll_event events[LOOP_EVENTS];
    uint64_t next_sweep = now_ns() + (uint64_t)SWEEP_MS * 1000000u;
    for (;;) {
        int n = epoll_wait(L->epfd, events, LOOP_EVENTS, SWEEP_MS);
        if (n < 0 && errno != EINTR) break;
        int stop = 0;
        for (int i = 0; i < n; i++) {
            if (events[i].data.ptr == NULL) { /* adopt() or stop() */
                drain_fd(L->wake_fd);
                stop = take_inbox(L);
            } else {
                conn_event(L, events[i].data.ptr); /* errors and hang-ups show in the read or write */
            }
        }
        if (stop) break;
        uint64_t now = now_ns();
        if (now >= next_sweep) {
            next_sweep = now + (uint64_t)SWEEP_MS * 1000000u;
            while (L->ring.next != &L->ring && now - L->ring.next->last_active > L->idle_ns) {
                L->idle_closed++;
                conn_close(L, L->ring.next);
            }
        }
    }
    while (L->ring.next != &L->ring) conn_close(L, L->ring.next); /* stopping: nothing here is mid-request */
    return NULL;
}

static int Loop_init(LoopObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"fast", "idle_timeout", NULL};
    PyObject *fast;
    double idle_timeout;
    if (self->fast) { PyErr_SetString(PyExc_RuntimeError, "NativeLoop is initialised already"); return -1; }
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O!d", kwlist, &FastPathType, &fast, &idle_timeout)) return -1;
    if (check_initialised((FastPathObject *)fast)) return -1;
    if (!(idle_timeout > 0) || isinf(idle_timeout)) {
        PyErr_SetString(PyExc_ValueError, "idle_timeout must be a positive number of seconds");
        return -1;
    }
    self->epfd = epoll_create1(EPOLL_CLOEXEC);
    self->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    self->migrate_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    self->buf = malloc(LOOP_READ_BYTES);
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
    if (self->epfd < 0 || self->wake_fd < 0 || self->migrate_fd < 0 ||
        epoll_ctl(self->epfd, EPOLL_CTL_ADD, self->wake_fd, &ev)) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    if (!self->buf) { PyErr_NoMemory(); return -1; }
    pthread_mutex_init(&self->lock, NULL);
    self->ring.next = self->ring.prev = &self->ring;
    self->idle_ns = (uint64_t)(idle_timeout * 1e9);
    Py_INCREF(fast);
    self->fast = (FastPathObject *)fast;
    self->fast->loops++;
    return 0;
}

static PyObject *Loop_start(LoopObject *self, PyObject *unused) {
    if (!self->fast) return PyErr_Format(PyExc_RuntimeError, "NativeLoop is not initialised");
    if (self->running || self->stopping) return PyErr_Format(PyExc_RuntimeError, "NativeLoop runs once");
    int err = pthread_create(&self->thread, NULL, loop_main, self);
    if (err) { errno = err; return PyErr_SetFromErrno(PyExc_OSError); }
    self->running = 1;
    Py_RETURN_NONE;
}

/* adopt(fd): the loop serves the connection from now on, and owns (closes) the descriptor. */
static PyObject *Loop_adopt(LoopObject *self, PyObject *arg) {
    int fd = PyObject_AsFileDescriptor(arg);
    if (fd < 0) return NULL;
    if (!self->running) return PyErr_Format(PyExc_RuntimeError, "NativeLoop is not running");
    int flags = fcntl(fd, F_GETFL);
    if (flags < 0 || fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0) return PyErr_SetFromErrno(PyExc_OSError);
    pthread_mutex_lock(&self->lock);
    if (self->stopping) {
        pthread_mutex_unlock(&self->lock);
        return PyErr_Format(PyExc_RuntimeError, "NativeLoop is stopping");
    }
    if (self->n_in == self->cap_in) {
        size_t cap = self->cap_in ? 2 * self->cap_in : 16;
        int *grown = realloc(self->inbox, cap * sizeof *grown);
        if (!grown) { pthread_mutex_unlock(&self->lock); return PyErr_NoMemory(); }
        self->inbox = grown;
        self->cap_in = cap;
    }
    self->inbox[self->n_in++] = fd;
    pthread_mutex_unlock(&self->lock);
    signal_fd(self->wake_fd);
    Py_RETURN_NONE;
}

/* take() -> [(fd, data)]: the connections moved to Python since the last call, in order. */
static PyObject *Loop_take(LoopObject *self, PyObject *unused) {
    if (!self->fast) return PyErr_Format(PyExc_RuntimeError, "NativeLoop is not initialised");
    drain_fd(self->migrate_fd); /* first: a connection queued after the swap below signals again */
    pthread_mutex_lock(&self->lock);
    migrant_t *out = self->outbox;
    size_t n = self->n_out;
    self->outbox = NULL;
    self->n_out = self->cap_out = 0;
    pthread_mutex_unlock(&self->lock);
    PyObject *list = PyList_New((Py_ssize_t)n);
    for (size_t i = 0; i < n; i++) {
        PyObject *item = list ? Py_BuildValue("(iy#)", out[i].fd, out[i].data, (Py_ssize_t)out[i].n) : NULL;
        if (item) PyList_SET_ITEM(list, (Py_ssize_t)i, item);
        else close(out[i].fd); /* no memory for it: the client sees a close */
        free(out[i].data);
    }
    free(out);
    if (list && PyErr_Occurred()) Py_CLEAR(list);
    return list;
}

static void loop_join(LoopObject *self) {
    if (!self->running) return;
    pthread_mutex_lock(&self->lock);
    self->stopping = 1;
    pthread_mutex_unlock(&self->lock);
    signal_fd(self->wake_fd);
    Py_BEGIN_ALLOW_THREADS
    pthread_join(self->thread, NULL);
    Py_END_ALLOW_THREADS
    self->running = 0;
}

/* stop(): close what the loop holds (every connection there is between requests) and join it. */
static PyObject *Loop_stop(LoopObject *self, PyObject *unused) {
    if (!self->running && !self->stopping) {
        pthread_mutex_lock(&self->lock);
        self->stopping = 1; /* never started: it never will */
        pthread_mutex_unlock(&self->lock);
    }
    loop_join(self);
    Py_RETURN_NONE;
}

static void Loop_dealloc(LoopObject *self) {
    if (self->fast) {
        loop_join(self);
        pthread_mutex_destroy(&self->lock);
        self->fast->loops--;
    }
    Py_CLEAR(self->fast);
    for (size_t i = 0; i < self->n_in; i++) close(self->inbox[i]);
    for (size_t i = 0; i < self->n_out; i++) { close(self->outbox[i].fd); free(self->outbox[i].data); }
    free(self->inbox);
    free(self->outbox);
    free(self->buf);
    if (self->epfd >= 0) close(self->epfd);
    if (self->wake_fd >= 0) close(self->wake_fd);
    if (self->migrate_fd >= 0) close(self->migrate_fd);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Loop_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    LoopObject *self = (LoopObject *)type->tp_alloc(type, 0);
    if (self) self->epfd = self->wake_fd = self->migrate_fd = -1;
    return (PyObject *)self;
}

static PyMethodDef Loop_methods[] = {
    {"start", (PyCFunction)Loop_start, METH_NOARGS, "start($self, /)\n--\n\nStart the loop's thread."},
    {"adopt", (PyCFunction)Loop_adopt, METH_O,
     "adopt($self, fd, /)\n--\n\nServe this connected socket from now on; the loop owns the descriptor."},
    {"take", (PyCFunction)Loop_take, METH_NOARGS,
     "take($self, /)\n--\n\nThe connections moved to Python since the last call: (fd, the bytes read), in order."},
    {"stop", (PyCFunction)Loop_stop, METH_NOARGS,
     "stop($self, /)\n--\n\nClose every connection the loop holds and join its thread."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef Loop_members[] = {
    {"migrate_fd", T_INT, offsetof(LoopObject, migrate_fd), READONLY, "readable when take() has connections"},
    {"answered", T_ULONGLONG, offsetof(LoopObject, answered), READONLY, "requests answered by the loop"},
    {"migrated", T_ULONGLONG, offsetof(LoopObject, migrated), READONLY, "connections moved to Python"},
    {"idle_closed", T_ULONGLONG, offsetof(LoopObject, idle_closed), READONLY, "connections closed for idling"},
    {"open", T_ULONGLONG, offsetof(LoopObject, open), READONLY, "connections the loop holds"},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject LoopType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "fraudscore.service._fastpath.NativeLoop",
    .tp_basicsize = sizeof(LoopObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "NativeLoop(fast, idle_timeout)\n--\n\n"
              "Connections served on a thread of their own: ordinary scoring requests answered by fast, "
              "every other read's connection moved to Python (take()).",
    .tp_new = Loop_new,
    .tp_init = (initproc)Loop_init,
    .tp_dealloc = (destructor)Loop_dealloc,
    .tp_methods = Loop_methods,
    .tp_members = Loop_members,
};

static PyMethodDef module_methods[] = {
    {"round4", py_round4, METH_O, "round4($module, x, /)\n--\n\nround(x, 4), as the fast path computes it."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef fastpath_module = {
    PyModuleDef_HEAD_INIT, "_fastpath", "The service's native fast path for ordinary scoring requests.", -1,
    module_methods, NULL, NULL, NULL, NULL,
};

/* PyModule_AddObjectRef for a new reference (NULL passes an error on) */
static int add_new(PyObject *module, const char *name, PyObject *value) {
    if (!value) return -1;
    int r = PyModule_AddObjectRef(module, name, value);
    Py_DECREF(value);
    return r;
}

PyMODINIT_FUNC PyInit__fastpath(void) {
    knn = (const fs_knn_api *)PyCapsule_Import(FS_KNN_CAPSULE, 0);
    if (!knn) return NULL;
    c_locale = newlocale(LC_NUMERIC_MASK, "C", (locale_t)0);
    if (c_locale == (locale_t)0) return PyErr_SetFromErrno(PyExc_OSError);
    if (PyType_Ready(&FastPathType) < 0 || PyType_Ready(&MetricsType) < 0 || PyType_Ready(&LoopType) < 0) return NULL;
    PyObject *m = PyModule_Create(&fastpath_module);
    if (!m) return NULL;
    if (PyModule_AddObjectRef(m, "FastPath", (PyObject *)&FastPathType) < 0 ||
        PyModule_AddObjectRef(m, "RequestMetrics", (PyObject *)&MetricsType) < 0 ||
        PyModule_AddObjectRef(m, "NativeLoop", (PyObject *)&LoopType) < 0 ||
        add_new(m, "LATENCY_BOUNDS", bounds_tuple(LATENCY_BOUNDS, N_LATENCY)) < 0 ||
        add_new(m, "SEARCH_BOUNDS", bounds_tuple(SEARCH_BOUNDS, N_SEARCH)) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
