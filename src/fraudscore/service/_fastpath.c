/* The service's fast path: the bytes of one whole scoring request in, its response out, with no
 * Python in between (HTTP framing, JSON, the 14-dimension vector and the search, in one call).
 *
 * It answers only what it is sure of: a complete `POST /fraud-score HTTP/1.1` request (or
 * `POST /v1/score`, once Python has set a V1Plan: see below), alone in the buffer, with plain headers, a Content-Length body, and a payload of the ordinary shape
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
#include "trees_api.h"

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

/* An id the answer does not use but /v1/score's A/B split hashes: absent (0), a string (1), or any
 * other JSON value (2, read and skipped). */
typedef struct { slice_t s; int state; } ident_t;

typedef struct {
    int has_last;
    double amount, installments, avg_amount, tx_count, merchant_avg, km_home, km_last;
    int64_t now, then; /* seconds since 1970-01-01T00:00:00Z */
    int online, card_present;
    slice_t merchant_id, mcc;
    slice_t known[MAX_KNOWN];
    int n_known;
    ident_t tx_id, customer_id; /* the payload's "id" and customer.id */
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
typedef enum { NUMBER, NON_NEGATIVE, STRING, BOOLEAN, TIMESTAMP, KNOWN_LIST, OBJECT, OBJECT_OR_NULL, IDENT } kind_t;
typedef struct field {
    const char *key;
    kind_t kind;
    size_t offset;           /* in payload_t */
    const struct field *sub; /* the members of an OBJECT, ended by a NULL key */
    int optional;            /* may be absent (last_transaction, which then reads as null; the ids) */
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
    {"id", IDENT, AT(customer_id), NULL, 1},
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
    {"id", IDENT, AT(tx_id), NULL, 1},
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
    case IDENT: {
        ident_t *id = (ident_t *)at;
        ws(c);
        id->state = c->p < c->end && *c->p == '"' ? 1 : 2;
        return id->state == 1 ? read_string(c, &id->s) : skip_value(c, depth + 1);
    }
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
#define V1_PATH "/v1/score"
static const char REQUEST_LINE[] = "POST " SCORE_PATH " HTTP/1.1\r\n";
static const char V1_REQUEST_LINE[] = "POST " V1_PATH " HTTP/1.1\r\n";

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

/* The body of data if it is exactly one plain POST /fraud-score (or, *v1 set, POST /v1/score)
 * request within the limits; -1 to decline.  Header bytes are counted as the Python path counts them (name, value, 4) but with the
 * value's trailing blanks kept, so near the limit this declines at least whatever Python refuses. */
static int frame(const char *data, size_t n, const limits_t *limits, const char **body, size_t *body_len, int *v1) {
    size_t line = sizeof REQUEST_LINE - 1;
    *v1 = 0;
    if (!limits->url_fits) return -1; /* /v1/score is the shorter path: it fits where /fraud-score does */
    if (n < line || memcmp(data, REQUEST_LINE, line) != 0) {
        line = sizeof V1_REQUEST_LINE - 1;
        if (n < line || memcmp(data, V1_REQUEST_LINE, line) != 0) return -1;
        *v1 = 1;
    }
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

/* ---- POST /v1/score: the plan Python builds at each swap (service/v1.py) ------------------------
 *
 * The Python path (service/v1.py, V1Live.answer) defines every /v1/score answer; a V1Plan holds
 * what it needs to give the same answers here: per A/B arm the model's forest (or none), its
 * threshold, who decides, and the answer's fixed parts serialized by Python; the candidate's
 * version and share for the split.  Native answers are counted per arm (decisions) and queued
 * (arm, vector, probability, approved) for Python to feed the drift trackers and shadow versions
 * (drain()): a full queue drops and counts.  FastPath.set_v1 installs a plan under a write lock;
 * every native /v1/score answer holds the read lock, so a plan replaced is in no one's hands when
 * set_v1 returns, and its Python references go then, with the GIL. */

#define REASONS 3        /* service/v1.py's REASONS: checked by the tests, which compare whole answers */
#define V1_OUT 8192      /* a whole /v1/score response at most: the plan's pieces are bounded to fit */
#define V1_PIECE 4096    /* the longest fixed part of a body */
#define V1_FEATURE 256   /* the longest reason opening */
#define MAX_CANDIDATE 512
#define AB_KEY_BYTES 16
#define V1_ARMS 2        /* production, candidate: the order of models/live.py's arms */

static const fs_trees_api *trees;

typedef struct {
    PyObject *forest;                  /* a _trees.Forest, or NULL: no model (knn_only answers) */
    double threshold;
    int model_decides;
    int knn_approves[N_ANSWERS];
    PyObject *knn_only[N_ANSWERS];     /* whole responses, without a model */
    PyObject *middle[N_ANSWERS];       /* with a model: from ,"decided_by" to "probability": */
    uint64_t decisions[2];             /* [approved]: atomic */
} arm_t;

typedef struct { double v[DIMS]; double probability; uint8_t arm, approved; } after_t;

typedef struct {
    PyObject_HEAD
    int n_arms;
    arm_t arms[V1_ARMS];
    PyObject *features[DIMS];          /* each reason's opening, up to "value": */
    PyObject *ok_head;                 /* a 200's head up to its Content-Length's digits */
    unsigned char ab_key[AB_KEY_BYTES];
    char candidate[MAX_CANDIDATE];     /* the candidate's version and a zero byte, hashed before the key */
    size_t candidate_len;
    uint64_t cut;                      /* buckets below it are the candidate's */
    uint64_t buckets;
    pthread_mutex_t lock;              /* guards the queue */
    int lock_ready;
    after_t *queue;
    size_t n_queued, capacity;
    uint64_t dropped;
    int notify_fd;                     /* written when the queue stops being empty; -1: none */
} PlanObject;

/* SipHash-2-4 (Aumasson and Bernstein) of a + b, the two parts read as one message: the A/B split
 * hashes the candidate's version, a zero byte and the customer's key (models/live.py arm_bucket). */
#define ROTL(x, b) (uint64_t)(((x) << (b)) | ((x) >> (64 - (b))))
#define SIPROUND                                                                                   \
    do {                                                                                           \
        v0 += v1; v1 = ROTL(v1, 13); v1 ^= v0; v0 = ROTL(v0, 32);                                  \
        v2 += v3; v3 = ROTL(v3, 16); v3 ^= v2;                                                     \
        v0 += v3; v3 = ROTL(v3, 21); v3 ^= v0;                                                     \
        v2 += v1; v1 = ROTL(v1, 17); v1 ^= v2; v2 = ROTL(v2, 32);                                  \
    } while (0)

static inline uint64_t le64(const unsigned char *p) {
    uint64_t x = 0;
    for (int i = 7; i >= 0; i--) x = (x << 8) | p[i];
    return x;
}

static uint64_t siphash24(const unsigned char key[16], const char *a, size_t na, const char *b, size_t nb) {
    uint64_t k0 = le64(key), k1 = le64(key + 8);
    uint64_t v0 = 0x736f6d6570736575ULL ^ k0, v1 = 0x646f72616e646f6dULL ^ k1;
    uint64_t v2 = 0x6c7967656e657261ULL ^ k0, v3 = 0x7465646279746573ULL ^ k1;
    size_t n = na + nb, i = 0;
    unsigned char block[8];
    for (; i + 8 <= n; i += 8) {
        for (int j = 0; j < 8; j++) block[j] = (unsigned char)(i + j < na ? a[i + j] : b[i + j - na]);
        uint64_t m = le64(block);
        v3 ^= m; SIPROUND; SIPROUND; v0 ^= m;
    }
    memset(block, 0, sizeof block);
    for (size_t j = 0; i + j < n; j++) block[j] = (unsigned char)(i + j < na ? a[i + j] : b[i + j - na]);
    block[7] = (unsigned char)n;
    uint64_t m = le64(block);
    v3 ^= m; SIPROUND; SIPROUND; v0 ^= m;
    v2 ^= 0xff;
    SIPROUND; SIPROUND; SIPROUND; SIPROUND;
    return v0 ^ v1 ^ v2 ^ v3;
}

static PyObject *py_siphash24(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) return PyErr_Format(PyExc_TypeError, "siphash24() takes 2 arguments (%zd given)", nargs);
    Py_buffer key, data;
    if (PyObject_GetBuffer(args[0], &key, PyBUF_SIMPLE)) return NULL;
    if (key.len != AB_KEY_BYTES) {
        PyBuffer_Release(&key);
        return PyErr_Format(PyExc_ValueError, "the key must be %d bytes", AB_KEY_BYTES);
    }
    if (PyObject_GetBuffer(args[1], &data, PyBUF_SIMPLE)) { PyBuffer_Release(&key); return NULL; }
    uint64_t h = siphash24(key.buf, data.buf, (size_t)data.len, "", 0);
    PyBuffer_Release(&key);
    PyBuffer_Release(&data);
    return PyLong_FromUnsignedLongLong(h);
}

/* ---- writing the answer ---- */

typedef struct { char *p, *end; } out_t;

static inline void put(out_t *o, const char *s, size_t n) {
    if (o->p > o->end || (size_t)(o->end - o->p) < n) { o->p = o->end + 1; return; } /* overflow: the caller sees it */
    memcpy(o->p, s, n);
    o->p += n;
}
#define PUT_LIT(o, s) put(o, s, sizeof(s) - 1)
static inline void put_bytes(out_t *o, PyObject *b) { put(o, PyBytes_AS_STRING(b), (size_t)PyBytes_GET_SIZE(b)); }

/* The shortest of %.15g, %.16g, %.17g that reads back as x (as a JSON number: a float's text keeps a
 * '.' or an exponent, so it parses back to a float).  %.17g always does; most doubles need 16 or
 * 17 digits, so 16 is tried first (then 15 only if 16 reads back).  Needs the C locale (uselocale
 * by the caller). */
static void put_double(out_t *o, double x) {
    char text[40], shorter[40];
    int n = snprintf(text, sizeof text, "%.16g", x);
    if (strtod_l(text, NULL, c_locale) == x) {
        int m = snprintf(shorter, sizeof shorter, "%.15g", x);
        if (strtod_l(shorter, NULL, c_locale) == x) { memcpy(text, shorter, (size_t)m + 1); n = m; }
    } else {
        n = snprintf(text, sizeof text, "%.17g", x);
    }
    if (!strpbrk(text, ".eEn")) { text[n++] = '.'; text[n++] = '0'; text[n] = '\0'; }
    put(o, text, (size_t)n);
}

/* A vector's component: round4 made it k / 10^4 for an integer k, whose shortest text is k's
 * digits with the point 4 places in, trailing zeros dropped (no shorter decimal reads back as the
 * same double near [-1, 1]).  Anything else goes to put_double. */
static void put_component(out_t *o, double x) {
    double k = nearbyint(x * 10000.0);
    if (!(fabs(x) <= 1.0) || k / 10000.0 != x) { put_double(o, x); return; }
    char text[16];
    int n = 0;
    long long units = llabs((long long)k);
    if (signbit(x)) text[n++] = '-';
    text[n++] = (char)('0' + units / 10000);
    text[n++] = '.';
    int frac = (int)(units % 10000), digits_ = 4;
    while (digits_ > 1 && frac % 10 == 0) { frac /= 10; digits_--; }
    for (int i = digits_ - 1; i >= 0; i--) { text[n + i] = (char)('0' + frac % 10); frac /= 10; }
    n += digits_;
    put(o, text, (size_t)n);
}

/* The REASONS features of largest |contribution|, largest first, ties in feature order (v1.py). */
static void rank_reasons(const double *contrib, int *top) {
    int taken[DIMS] = {0};
    for (int r = 0; r < REASONS; r++) {
        int best = -1;
        for (int i = 0; i < DIMS; i++)
            if (!taken[i] && (best < 0 || fabs(contrib[i]) > fabs(contrib[best]))) best = i;
        taken[best] = 1;
        top[r] = best;
    }
}

static void queue_after(PlanObject *plan, int arm, const double *v, double probability, int approved) {
    pthread_mutex_lock(&plan->lock);
    if (plan->n_queued == plan->capacity) {
        plan->dropped++;
        pthread_mutex_unlock(&plan->lock);
        return;
    }
    after_t *item = &plan->queue[plan->n_queued++];
    int first = plan->n_queued == 1;
    memcpy(item->v, v, sizeof item->v);
    item->probability = probability;
    item->arm = (uint8_t)arm;
    item->approved = (uint8_t)approved;
    pthread_mutex_unlock(&plan->lock);
    if (first && plan->notify_fd >= 0) {
        uint64_t one = 1;
        ssize_t r;
        do r = write(plan->notify_fd, &one, sizeof one); while (r < 0 && errno == EINTR);
    }
}

/* The whole /v1/score response of one request, into out (V1_OUT bytes): its length, or -1 to
 * decline.  The caller holds the plan (the FastPath's read lock). */
static Py_ssize_t v1_answer(PlanObject *plan, PyObject *index, const payload_t *pl, const double *v, char *out) {
    const ident_t *cid = &pl->customer_id;
    if (cid->state == 2 || (cid->state == 1 && cid->s.n == 0)) return -1; /* Python's 400 */
    int frauds = knn->fraud_count(index, v);
    if (frauds < 0 || frauds >= N_ANSWERS) return -1;
    int arm = 0;
    if (plan->n_arms > 1) {
        slice_t key = {"", 0};
        if (cid->state == 1) key = cid->s;
        else if (pl->tx_id.state == 1) key = pl->tx_id.s;
        uint64_t h = siphash24(plan->ab_key, plan->candidate, plan->candidate_len, key.s, key.n);
        arm = h % plan->buckets < plan->cut ? 1 : 0;
    }
    arm_t *a = &plan->arms[arm];
    if (!a->forest) {
        int approved = a->knn_approves[frauds];
        ADD(a->decisions[approved], 1);
        PyObject *whole = a->knn_only[frauds];
        memcpy(out, PyBytes_AS_STRING(whole), (size_t)PyBytes_GET_SIZE(whole));
        return PyBytes_GET_SIZE(whole);
    }
    double probability, contrib[DIMS];
    if (trees->explain(a->forest, v, &probability, contrib)) return -1;
    int approved;
    double score;
    if (a->model_decides) {
        approved = probability < a->threshold;
        score = probability;
    } else {
        approved = a->knn_approves[frauds];
        score = (double)frauds / (double)FS_KNN_K; /* scorer.decision: frauds / K */
    }
    int top[REASONS];
    rank_reasons(contrib, top);
    char body[V1_OUT];
    out_t o = {body, body + sizeof body};
    locale_t previous = uselocale(c_locale);
    if (approved) PUT_LIT(&o, "{\"approved\":true,\"fraud_score\":");
    else PUT_LIT(&o, "{\"approved\":false,\"fraud_score\":");
    char *score_text = o.p;
    put_double(&o, score);
    size_t score_len = (size_t)(o.p - score_text);
    put_bytes(&o, a->middle[frauds]);
    if (a->model_decides && o.p <= o.end) put(&o, score_text, score_len); /* the same number: its text again */
    else put_double(&o, probability);
    PUT_LIT(&o, "},\"reasons\":[");
    for (int r = 0; r < REASONS; r++) {
        if (r) PUT_LIT(&o, ",");
        put_bytes(&o, plan->features[top[r]]);
        put_component(&o, v[top[r]]);
        PUT_LIT(&o, ",\"contribution\":");
        put_double(&o, contrib[top[r]]);
        PUT_LIT(&o, "}");
    }
    PUT_LIT(&o, "]}");
    if (o.p > o.end) { uselocale(previous); return -1; }
    size_t body_len = (size_t)(o.p - body);
    out_t w = {out, out + V1_OUT};
    put_bytes(&w, plan->ok_head);
    char digits_[24];
    int nd = snprintf(digits_, sizeof digits_, "%zu\r\n\r\n", body_len);
    uselocale(previous);
    put(&w, digits_, (size_t)nd);
    put(&w, body, body_len);
    if (w.p > w.end) return -1;
    ADD(a->decisions[approved], 1);
    queue_after(plan, arm, v, probability, approved);
    return w.p - out;
}

/* ---- the Python type ---- */

static int bytes_tuple(PyObject *t, PyObject **out, int n, Py_ssize_t longest, const char *what) {
    if (!PyTuple_Check(t) || PyTuple_GET_SIZE(t) != n) {
        PyErr_Format(PyExc_ValueError, "%s must be a tuple of %d bytes", what, n);
        return -1;
    }
    for (int i = 0; i < n; i++) {
        PyObject *b = PyTuple_GET_ITEM(t, i);
        if (!PyBytes_Check(b) || PyBytes_GET_SIZE(b) > longest) {
            PyErr_Format(PyExc_ValueError, "%s must be a tuple of %d bytes of at most %zd", what, n, longest);
            return -1;
        }
        Py_INCREF(b);
        Py_XSETREF(out[i], b);
    }
    return 0;
}

static int read_arm(PyObject *spec, arm_t *a) {
    PyObject *forest, *approves, *knn_only, *middle;
    int model_decides;
    if (!PyArg_ParseTuple(spec, "OdpOOO;an arm is (forest, threshold, model_decides, knn_approves, knn_only, middle)",
                          &forest, &a->threshold, &model_decides, &approves, &knn_only, &middle))
        return -1;
    a->model_decides = model_decides;
    if (forest != Py_None) {
        if (!PyObject_TypeCheck(forest, trees->forest_type) || trees->n_features(forest) != DIMS) {
            PyErr_Format(PyExc_ValueError, "an arm's forest must be an initialised Forest of %d features", DIMS);
            return -1;
        }
        Py_INCREF(forest);
        a->forest = forest;
        if (bytes_tuple(middle, a->middle, N_ANSWERS, V1_PIECE, "middle")) return -1;
    } else if (model_decides) {
        PyErr_SetString(PyExc_ValueError, "the model cannot decide without a forest");
        return -1;
    }
    if (bytes_tuple(knn_only, a->knn_only, N_ANSWERS, V1_PIECE, "knn_only")) return -1;
    if (!PyTuple_Check(approves) || PyTuple_GET_SIZE(approves) != N_ANSWERS) {
        PyErr_Format(PyExc_ValueError, "knn_approves must be a tuple of %d bools", N_ANSWERS);
        return -1;
    }
    for (int i = 0; i < N_ANSWERS; i++) {
        int t = PyObject_IsTrue(PyTuple_GET_ITEM(approves, i));
        if (t < 0) return -1;
        a->knn_approves[i] = t;
    }
    return 0;
}

static int Plan_init(PlanObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"arms", "features", "ok_head", "ab_key", "candidate", "cut", "buckets", "capacity",
                             "notify_fd", NULL};
    PyObject *arms, *features, *ok_head, *candidate;
    Py_buffer ab_key;
    unsigned long long cut, buckets;
    Py_ssize_t capacity;
    int notify_fd;
    if (self->lock_ready) { PyErr_SetString(PyExc_RuntimeError, "V1Plan is initialised already"); return -1; }
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O!O!O!y*OKKni", kwlist, &PyTuple_Type, &arms, &PyTuple_Type,
                                     &features, &PyBytes_Type, &ok_head, &ab_key, &candidate, &cut, &buckets,
                                     &capacity, &notify_fd))
        return -1;
    int bad_key = ab_key.len != AB_KEY_BYTES;
    if (!bad_key) memcpy(self->ab_key, ab_key.buf, AB_KEY_BYTES);
    PyBuffer_Release(&ab_key);
    if (bad_key) { PyErr_Format(PyExc_ValueError, "ab_key must be %d bytes", AB_KEY_BYTES); return -1; }
    Py_ssize_t n_arms = PyTuple_GET_SIZE(arms);
    if (n_arms < 1 || n_arms > V1_ARMS || (n_arms == 2) != (candidate != Py_None)) {
        PyErr_SetString(PyExc_ValueError, "arms: the production's, and the candidate's when there is one");
        return -1;
    }
    if (candidate != Py_None) {
        if (!PyBytes_Check(candidate) || PyBytes_GET_SIZE(candidate) >= MAX_CANDIDATE) {
            PyErr_Format(PyExc_ValueError, "candidate must be bytes shorter than %d, or None", MAX_CANDIDATE);
            return -1;
        }
        /* with the zero byte that ends it in the hashed message (the candidate[] is zeroed) */
        self->candidate_len = (size_t)PyBytes_GET_SIZE(candidate) + 1;
        memcpy(self->candidate, PyBytes_AS_STRING(candidate), self->candidate_len - 1);
    }
    if (buckets == 0 || cut > buckets || capacity < 1 || capacity > (1 << 24)) {
        PyErr_SetString(PyExc_ValueError, "need 0 <= cut <= buckets, buckets > 0 and 1 <= capacity <= 2**24");
        return -1;
    }
    if (PyBytes_GET_SIZE(ok_head) > 512) { PyErr_SetString(PyExc_ValueError, "ok_head is too long"); return -1; }
    for (Py_ssize_t i = 0; i < n_arms; i++)
        if (read_arm(PyTuple_GET_ITEM(arms, i), &self->arms[i])) return -1;
    if (bytes_tuple(features, self->features, DIMS, V1_FEATURE, "features")) return -1;
    self->queue = PyMem_Calloc((size_t)capacity, sizeof(after_t));
    if (!self->queue) { PyErr_NoMemory(); return -1; }
    Py_INCREF(ok_head);
    self->ok_head = ok_head;
    self->n_arms = (int)n_arms;
    self->cut = cut;
    self->buckets = buckets;
    self->capacity = (size_t)capacity;
    self->notify_fd = notify_fd;
    pthread_mutex_init(&self->lock, NULL);
    self->lock_ready = 1;
    return 0;
}

static void Plan_dealloc(PlanObject *self) {
    for (int a = 0; a < V1_ARMS; a++) {
        Py_CLEAR(self->arms[a].forest);
        for (int i = 0; i < N_ANSWERS; i++) {
            Py_CLEAR(self->arms[a].knn_only[i]);
            Py_CLEAR(self->arms[a].middle[i]);
        }
    }
    for (int d = 0; d < DIMS; d++) Py_CLEAR(self->features[d]);
    Py_CLEAR(self->ok_head);
    if (self->lock_ready) pthread_mutex_destroy(&self->lock);
    PyMem_Free(self->queue);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* drain() -> ([(arm, vector, probability, approved)], dropped): what was queued since the last call */
static PyObject *Plan_drain(PlanObject *self, PyObject *unused) {
    if (!self->lock_ready) return PyErr_Format(PyExc_RuntimeError, "V1Plan is not initialised");
    size_t n;
    uint64_t dropped;
    after_t *items = PyMem_Malloc((self->capacity) * sizeof(after_t));
    if (!items) return PyErr_NoMemory();
    pthread_mutex_lock(&self->lock);
    n = self->n_queued;
    memcpy(items, self->queue, n * sizeof(after_t));
    self->n_queued = 0;
    dropped = self->dropped;
    self->dropped = 0;
    pthread_mutex_unlock(&self->lock);
    PyObject *list = PyList_New((Py_ssize_t)n);
    for (size_t i = 0; list && i < n; i++) {
        PyObject *vector = PyList_New(DIMS);
        for (int d = 0; vector && d < DIMS; d++) {
            PyObject *x = PyFloat_FromDouble(items[i].v[d]);
            if (!x) Py_CLEAR(vector);
            else PyList_SET_ITEM(vector, d, x);
        }
        PyObject *item = vector ? Py_BuildValue("(iNdO)", items[i].arm, vector, items[i].probability,
                                                items[i].approved ? Py_True : Py_False)
                                : NULL;
        if (!item) Py_CLEAR(list);
        else PyList_SET_ITEM(list, (Py_ssize_t)i, item);
    }
    PyMem_Free(items);
    if (!list) return NULL;
    return Py_BuildValue("(NK)", list, (unsigned long long)dropped);
}

/* decisions() -> ((approved, denied) per arm): the native answers' decisions so far */
static PyObject *Plan_decisions(PlanObject *self, PyObject *unused) {
    PyObject *out = PyTuple_New(self->n_arms);
    for (int a = 0; out && a < self->n_arms; a++) {
        PyObject *pair = Py_BuildValue("(KK)", (unsigned long long)LOAD(self->arms[a].decisions[1]),
                                       (unsigned long long)LOAD(self->arms[a].decisions[0]));
        if (!pair) Py_CLEAR(out);
        else PyTuple_SET_ITEM(out, a, pair);
    }
    return out;
}

static PyMethodDef Plan_methods[] = {
    {"drain", (PyCFunction)Plan_drain, METH_NOARGS,
     "drain($self, /)\n--\n\nThe native answers queued for drift and shadows since the last call: "
     "([(arm, vector, probability, approved)], dropped)."},
    {"decisions", (PyCFunction)Plan_decisions, METH_NOARGS,
     "decisions($self, /)\n--\n\nPer arm, (approved, denied): the native answers' decisions so far."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject PlanType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "fraudscore.service._fastpath.V1Plan",
    .tp_basicsize = sizeof(PlanObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "V1Plan(arms, features, ok_head, ab_key, candidate, cut, buckets, capacity, notify_fd)\n--\n\n"
              "What the fast path needs to answer POST /v1/score as service/v1.py does (FastPath.set_v1).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Plan_init,
    .tp_dealloc = (destructor)Plan_dealloc,
    .tp_methods = Plan_methods,
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
    int v1_route;                          /* /v1/score's, or -1: metrics has none (no native /v1/score) */
    PlanObject *v1;                        /* or NULL: /v1/score goes to Python (set_v1) */
    pthread_rwlock_t v1_lock;              /* read: one native /v1/score answer; write: set_v1 */
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
        self->v1_route = match_route(m, V1_PATH, sizeof V1_PATH - 1);
        if (self->v1_route == m->n_routes) self->v1_route = -1;
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
    Py_CLEAR(self->v1);
    pthread_rwlock_destroy(&self->v1_lock);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int check_initialised(FastPathObject *self);

static PyObject *FastPath_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    FastPathObject *self = (FastPathObject *)type->tp_alloc(type, 0);
    if (!self) return NULL;
    /* writers first: a swap waits for the answers in progress, not for every answer to come */
    pthread_rwlockattr_t attr;
    pthread_rwlockattr_init(&attr);
    pthread_rwlockattr_setkind_np(&attr, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    pthread_rwlock_init(&self->v1_lock, &attr);
    pthread_rwlockattr_destroy(&attr);
    return (PyObject *)self;
}

/* set_v1(plan or None): native /v1/score answers from now on come from plan (None: Python answers
 * them).  When it returns, no native answer uses the plan it replaced. */
static PyObject *FastPath_set_v1(FastPathObject *self, PyObject *plan) {
    if (check_initialised(self)) return NULL;
    if (plan != Py_None && !PyObject_TypeCheck(plan, &PlanType))
        return PyErr_Format(PyExc_TypeError, "set_v1() takes a V1Plan or None");
    if (plan != Py_None && !((PlanObject *)plan)->lock_ready)
        return PyErr_Format(PyExc_RuntimeError, "V1Plan is not initialised");
    if (plan != Py_None && self->metrics && self->v1_route < 0)
        return PyErr_Format(PyExc_ValueError, "metrics has no route %s", V1_PATH);
    PlanObject *new = plan == Py_None ? NULL : (PlanObject *)plan, *old;
    Py_XINCREF(new);
    Py_BEGIN_ALLOW_THREADS
    pthread_rwlock_wrlock(&self->v1_lock);
    old = self->v1;
    __atomic_store_n(&self->v1, new, __ATOMIC_RELAXED); /* also read unlocked, as a hint (answer_request) */
    pthread_rwlock_unlock(&self->v1_lock);
    Py_END_ALLOW_THREADS
    Py_XDECREF(old);
    Py_RETURN_NONE;
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

#define V1_ANSWER N_ANSWERS /* answer_request's result for a /v1/score response written to out */

/* /v1/score from the plan in place, counted and timed like /fraud-score's answers */
static int answer_v1(FastPathObject *self, const payload_t *pl, const double *v, double started_ns, char *out,
                     size_t *out_len) {
    pthread_rwlock_rdlock(&self->v1_lock);
    Py_ssize_t n = self->v1 ? v1_answer(self->v1, self->index, pl, v, out) : -1;
    pthread_rwlock_unlock(&self->v1_lock);
    if (n < 0) return -1;
    *out_len = (size_t)n;
    ADD(self->answered, 1);
    MetricsObject *m = self->metrics;
    if (m) {
        uint64_t done = now_ns();
        ADD(m->requests[NATIVE][self->v1_route][200 - MIN_STATUS], 1);
        double elapsed = (double)done - started_ns;
        observe_latency(&m->latency[NATIVE][self->v1_route], elapsed > 0 ? (uint64_t)elapsed : 0);
    }
    return V1_ANSWER;
}

/* The frauds among the neighbours (0..K) when data is exactly one ordinary scoring request, counted
 * and timed in the metrics from started_ns (a CLOCK_MONOTONIC time; < 0: now); V1_ANSWER when it is
 * a /v1/score request answered natively (the response in out, V1_OUT bytes, its length in
 * *out_len); -1 when it declines, which the caller counts.  Needs no GIL: it reads only C data, and
 * the index and the answers stay alive as long as self does (the caller holds self), the plan as
 * long as the read lock is held. */
static int answer_request(FastPathObject *self, const char *data, size_t n, double started_ns, char *out,
                          size_t *out_len) {
    MetricsObject *m = self->metrics;
    uint64_t searched = 0, done = 0;
    if (m && started_ns < 0) started_ns = (double)now_ns();
    const char *body;
    size_t body_len;
    double v[DIMS];
    int v1;
    if (frame(data, n, &self->limits, &body, &body_len, &v1)) return -1;
    if (v1) {
        payload_t pl;
        if (!__atomic_load_n(&self->v1, __ATOMIC_RELAXED) || read_payload(body, body_len, &pl) || vectorize(&pl, &self->constants, v)) return -1;
        return answer_v1(self, &pl, v, started_ns, out, out_len);
    }
    if (body_vector(self, body, body_len, v)) return -1;
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
    char out[V1_OUT];
    size_t out_len = 0;
    int frauds = answer_request(self, PyBytes_AS_STRING(data), (size_t)PyBytes_GET_SIZE(data),
                                read_at < 0 ? -1.0 : read_at * 1e9, out, &out_len);
    if (frauds < 0) {
        count_declined(self);
        Py_RETURN_NONE;
    }
    if (frauds == V1_ANSWER) return PyBytes_FromStringAndSize(out, (Py_ssize_t)out_len);
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
    {"set_v1", (PyCFunction)FastPath_set_v1, METH_O,
     "set_v1($self, plan, /)\n--\n\nAnswer POST /v1/score natively from plan (a V1Plan) from now on; None: "
     "leave it to Python.  On return no answer uses the plan replaced."},
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
    .tp_new = FastPath_new,
    .tp_init = (initproc)FastPath_init,
    .tp_dealloc = (destructor)FastPath_dealloc,
    .tp_methods = FastPath_methods,
    .tp_members = FastPath_members,
};

/* ---- The native loop: handed-over connections served on a thread of their own -------------------
 *
 * Python keeps control (readiness, metrics, reloads, shutdown, and every request the fast path
 * declines); this loop only carries the ordinary ones.  adopt(fd) gives it an accepted socket.  On
 * each read it answers when the bytes are exactly one ordinary scoring request (answer_request, no
 * GIL), and writes the prebuilt answer (or, for /v1/score with a plan set, the answer written for it).  Anything else -- a split or pipelined request, another
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
    const char *out;          /* the rest of an answer not yet written (prebuilt bytes, alive with the FastPath, */
    size_t out_left;          /* or held, a copy of the rest of a /v1/score answer) */
    char *held;
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
    char *scratch; /* a /v1/score answer, V1_OUT bytes */
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
    free(c->held);
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
            free(c->held);
            c->held = NULL;
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
    size_t out_len = 0;
    int frauds = answer_request(L->fast, L->buf, (size_t)n, (double)now, L->scratch, &out_len);
    if (frauds < 0) { /* not counted as declined here: Python offers the same bytes to the fast path again */
        conn_migrate(L, c, L->buf, (size_t)n);
        return;
    }
    L->answered++;
    c->last_active = now;
    ring_remove(c); /* most recently active: to the end of the ring */
    ring_push(L, c);
    if (frauds == V1_ANSWER) {
        c->out = L->scratch;
        c->out_left = out_len;
    } else {
        PyObject *answer = L->fast->answers[frauds];
        c->out = PyBytes_AS_STRING(answer);
        c->out_left = (size_t)PyBytes_GET_SIZE(answer);
    }
    if (conn_flush(L, c)) { conn_close(L, c); return; }
    if (c->out_left && frauds == V1_ANSWER) { /* waits for room: the scratch is the next read's */
        c->held = malloc(c->out_left);
        if (!c->held) { conn_close(L, c); return; }
        memcpy(c->held, c->out, c->out_left);
        c->out = c->held;
    }
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
    self->scratch = malloc(V1_OUT);
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
    if (self->epfd < 0 || self->wake_fd < 0 || self->migrate_fd < 0 ||
        epoll_ctl(self->epfd, EPOLL_CTL_ADD, self->wake_fd, &ev)) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    if (!self->buf || !self->scratch) { PyErr_NoMemory(); return -1; }
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
    free(self->scratch);
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
    {"siphash24", (PyCFunction)(void (*)(void))py_siphash24, METH_FASTCALL,
     "siphash24($module, key, data, /)\n--\n\nSipHash-2-4 of data under a 16-byte key, as the /v1/score A/B split "
     "hashes (models/live.py arm_bucket)."},
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
    /* PyCapsule_Import finds a submodule only once imported: import both first, whoever came first */
    static const char *const providers[] = {"fraudscore.index._knn", "fraudscore.models._trees"};
    for (size_t i = 0; i < sizeof providers / sizeof providers[0]; i++) {
        PyObject *module = PyImport_ImportModule(providers[i]);
        if (!module) return NULL;
        Py_DECREF(module);
    }
    knn = (const fs_knn_api *)PyCapsule_Import(FS_KNN_CAPSULE, 0);
    if (!knn) return NULL;
    trees = (const fs_trees_api *)PyCapsule_Import(FS_TREES_CAPSULE, 0);
    if (!trees) return NULL;
    c_locale = newlocale(LC_NUMERIC_MASK, "C", (locale_t)0);
    if (c_locale == (locale_t)0) return PyErr_SetFromErrno(PyExc_OSError);
    if (PyType_Ready(&FastPathType) < 0 || PyType_Ready(&MetricsType) < 0 || PyType_Ready(&LoopType) < 0 ||
        PyType_Ready(&PlanType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&fastpath_module);
    if (!m) return NULL;
    if (PyModule_AddObjectRef(m, "FastPath", (PyObject *)&FastPathType) < 0 ||
        PyModule_AddObjectRef(m, "RequestMetrics", (PyObject *)&MetricsType) < 0 ||
        PyModule_AddObjectRef(m, "NativeLoop", (PyObject *)&LoopType) < 0 ||
        PyModule_AddObjectRef(m, "V1Plan", (PyObject *)&PlanType) < 0 ||
        add_new(m, "LATENCY_BOUNDS", bounds_tuple(LATENCY_BOUNDS, N_LATENCY)) < 0 ||
        add_new(m, "SEARCH_BOUNDS", bounds_tuple(SEARCH_BOUNDS, N_SEARCH)) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
