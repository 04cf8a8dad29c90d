/* A gradient-boosted forest (LightGBM's binary model) evaluated natively, with the reasons.
 *
 * models/trees.py parses LightGBM's model.txt and hands over flat arrays: every node of every
 * tree in one array, each tree in pre-order, so a child always lies after its parent (the walk
 * ends, whatever the arrays say, because the constructor checks it).
 *
 * The answer must equal LightGBM's own predict:
 *  - a numerical split sends value <= threshold left (both doubles, as LightGBM compares them);
 *  - missing values follow the split's decision_type: bit 1 (2) is "default left", bits 2-3 the
 *    missing type (0 none, 1 zero, 2 NaN).  With missing type none or zero, a NaN is read as 0.0;
 *    then a NaN (type NaN) or a |value| <= 1e-35f (type zero) takes the default direction;
 *  - the raw score is the sum of the trees' leaf values in double, in the model's tree order,
 *    starting from 0; the probability is 1 / (1 + exp(-sigmoid * raw)).
 *
 * The reasons are Saabas path attributions: every node carries the expected value of the leaves
 * below it (count-weighted), and a split on feature f adds value(child) - value(node) to f.  A
 * leaf's path is fixed, so its sums per feature are computed once, here, when the forest is
 * built; the walk that finds the leaves then adds them.  Per tree they add up to leaf - root, so
 * over the forest the contributions add up to raw - bias, bias being the sum of the roots' values.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdint.h>
#include <string.h>

#include "trees_api.h"

#define DEFAULT_LEFT 2
#define CATEGORICAL 1
#define MISSING_ZERO 1
#define MISSING_NAN 2
#define MAX_FEATURES 256
#define GROUP 16 /* trees walked side by side */
static const double ZERO_THRESHOLD = (double)1e-35f; /* LightGBM's kZeroThreshold, a float */

typedef struct {
    double threshold;
    double value;     /* a leaf's output, or an internal node's expected value */
    int32_t child[2]; /* [0]: value <= threshold (left), [1]: otherwise; global node indices */
    int32_t feature;  /* -1 for a leaf */
    uint8_t decision; /* LightGBM's decision_type */
    uint8_t pad;
    uint16_t fidx;    /* the feature, or 0 for a leaf (whose children are itself: see walk_lockstep) */
} node_t;

typedef struct {
    double delta;    /* the sum of value(child) - value(parent) over the path's splits on feature */
    int32_t feature;
} reason_t;

typedef struct {
    PyObject_HEAD
    node_t *nodes;
    Py_ssize_t n_nodes;
    int32_t *roots;
    Py_ssize_t n_trees;
    int32_t *group_depth; /* per group of GROUP consecutive trees: the deepest path's splits */
    int32_t *entry_start; /* per node: its reasons are entries[entry_start[i] .. entry_start[i + 1]) */
    reason_t *entries;
    int n_features;
    int zero_missing; /* some split has missing type zero: rows need the general decision */
    int allow_nan;    /* NaN in a row is LightGBM's missing value; otherwise a ValueError */
    double sigmoid;
    double bias;
} Forest;

/* ---- the walk ---------------------------------------------------------------------------- */

static inline int go_right_general(const node_t *nd, double v) {
    int missing = (nd->decision >> 2) & 3;
    if (isnan(v) && missing != MISSING_NAN) v = 0.0;
    if ((missing == MISSING_ZERO && fabs(v) <= ZERO_THRESHOLD) || (missing == MISSING_NAN && isnan(v)))
        return (nd->decision & DEFAULT_LEFT) ? 0 : 1;
    return v <= nd->threshold ? 0 : 1;
}

/* A leaf's Saabas contributions were summed per feature along its path when the forest was
 * built: explaining a row costs a few additions per tree on top of finding its leaves. */
static inline void add_reasons(const Forest *f, int32_t leaf, double *contrib) {
    for (int32_t e = f->entry_start[leaf]; e < f->entry_start[leaf + 1]; e++)
        contrib[f->entries[e].feature] += f->entries[e].delta;
}

/* Any row, any missing-value rule: one tree after the other. */
static double walk_general(const Forest *f, const double *x, double *contrib) {
    const node_t *nodes = f->nodes;
    double sum = 0.0;
    for (Py_ssize_t t = 0; t < f->n_trees; t++) {
        int32_t i = f->roots[t];
        while (nodes[i].feature >= 0) i = nodes[i].child[go_right_general(&nodes[i], x[nodes[i].feature])];
        sum += nodes[i].value;
        if (contrib) add_reasons(f, i, contrib);
    }
    return sum;
}

/* The common case (no NaN in the row, no zero-missing split, so value <= threshold is the whole
 * rule), GROUP trees side by side: their walks are independent, so the CPU overlaps their loads
 * instead of waiting on one chain of them, and no branch depends on the data.  A leaf's children
 * are itself, so every tree of a group takes the group's deepest number of steps.  The leaf
 * values are then summed in tree order, as LightGBM sums them. */
static inline __attribute__((always_inline)) double walk_lockstep(const Forest *f, const double *x,
                                                                  double *contrib) {
    const node_t *nodes = f->nodes;
    double sum = 0.0;
    for (Py_ssize_t t = 0; t < f->n_trees; t += GROUP) {
        int32_t cur[GROUP];
        int depth = f->group_depth[t / GROUP];
        if (t + GROUP <= f->n_trees) {
            for (int g = 0; g < GROUP; g++) cur[g] = f->roots[t + g];
            for (int step = 0; step < depth; step++)
                for (int g = 0; g < GROUP; g++) {
                    const node_t *nd = &nodes[cur[g]];
                    cur[g] = nd->child[x[nd->fidx] > nd->threshold];
                }
            for (int g = 0; g < GROUP; g++) {
                sum += nodes[cur[g]].value;
                if (contrib) add_reasons(f, cur[g], contrib);
            }
        } else { /* the last, partial group */
            int lanes = (int)(f->n_trees - t);
            for (int g = 0; g < lanes; g++) cur[g] = f->roots[t + g];
            for (int step = 0; step < depth; step++)
                for (int g = 0; g < lanes; g++) {
                    const node_t *nd = &nodes[cur[g]];
                    cur[g] = nd->child[x[nd->fidx] > nd->threshold];
                }
            for (int g = 0; g < lanes; g++) {
                sum += nodes[cur[g]].value;
                if (contrib) add_reasons(f, cur[g], contrib);
            }
        }
    }
    return sum;
}

static int needs_general(const Forest *f, const double *x) {
    if (f->zero_missing) return 1;
    for (int i = 0; i < f->n_features; i++)
        if (isnan(x[i])) return 1;
    return 0;
}

static double raw_score(const Forest *f, const double *x) {
    return needs_general(f, x) ? walk_general(f, x, NULL) : walk_lockstep(f, x, NULL);
}

static double raw_explained(const Forest *f, const double *x, double *contrib) {
    return needs_general(f, x) ? walk_general(f, x, contrib) : walk_lockstep(f, x, contrib);
}

static inline double probability(const Forest *f, double raw) { return 1.0 / (1.0 + exp(-f->sigmoid * raw)); }

/* ---- arguments --------------------------------------------------------------------------- */

static int check_row(const Forest *f, const double *x, Py_ssize_t row) {
    if (f->allow_nan) return 0;
    for (int i = 0; i < f->n_features; i++) {
        if (!isfinite(x[i])) {
            if (row < 0) PyErr_Format(PyExc_ValueError, "feature %d is not a finite number", i);
            else PyErr_Format(PyExc_ValueError, "row %zd: feature %d is not a finite number", row, i);
            return -1;
        }
    }
    return 0;
}

/* One row from a sequence of numbers into x; -1 with an exception set on a bad row. */
static int read_row(const Forest *f, PyObject *seq, double *x) {
    PyObject *fast = PySequence_Fast(seq, "a row must be a sequence of numbers");
    if (!fast) return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    if (n != f->n_features) {
        Py_DECREF(fast);
        PyErr_Format(PyExc_ValueError, "a row must have %d numbers, got %zd", f->n_features, n);
        return -1;
    }
    PyObject **items = PySequence_Fast_ITEMS(fast);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = items[i];
        if (PyFloat_CheckExact(item)) {
            x[i] = PyFloat_AS_DOUBLE(item);
        } else {
            x[i] = PyFloat_AsDouble(item);
            if (x[i] == -1.0 && PyErr_Occurred()) { Py_DECREF(fast); return -1; }
        }
    }
    Py_DECREF(fast);
    return check_row(f, x, -1);
}

/* ---- methods ----------------------------------------------------------------------------- */

static PyObject *Forest_raw(Forest *self, PyObject *row) {
    double x[MAX_FEATURES];
    if (read_row(self, row, x) < 0) return NULL;
    return PyFloat_FromDouble(raw_score(self, x));
}

static PyObject *Forest_predict(Forest *self, PyObject *row) {
    double x[MAX_FEATURES];
    if (read_row(self, row, x) < 0) return NULL;
    return PyFloat_FromDouble(probability(self, raw_score(self, x)));
}

static PyObject *Forest_explain(Forest *self, PyObject *row) {
    double x[MAX_FEATURES], contrib[MAX_FEATURES];
    if (read_row(self, row, x) < 0) return NULL;
    memset(contrib, 0, sizeof(double) * (size_t)self->n_features);
    double raw = raw_explained(self, x, contrib);
    PyObject *list = PyList_New(self->n_features);
    if (!list) return NULL;
    for (int i = 0; i < self->n_features; i++) {
        PyObject *c = PyFloat_FromDouble(contrib[i]);
        if (!c) { Py_DECREF(list); return NULL; }
        PyList_SET_ITEM(list, i, c);
    }
    PyObject *p = PyFloat_FromDouble(probability(self, raw));
    if (!p) { Py_DECREF(list); return NULL; }
    return Py_BuildValue("(NN)", p, list);
}

/* Many rows (a buffer of doubles, row after row) in one call, without the GIL. */
static PyObject *many(Forest *self, PyObject *arg, int raw) {
    Py_buffer buf;
    if (PyObject_GetBuffer(arg, &buf, PyBUF_SIMPLE) < 0) return NULL;
    Py_ssize_t row_bytes = (Py_ssize_t)sizeof(double) * self->n_features;
    if (buf.len % row_bytes) {
        PyBuffer_Release(&buf);
        return PyErr_Format(PyExc_ValueError, "the rows must be doubles, %d per row", self->n_features);
    }
    Py_ssize_t n = buf.len / row_bytes;
    const double *rows = buf.buf;
    for (Py_ssize_t r = 0; r < n; r++) {
        if (check_row(self, rows + r * self->n_features, r) < 0) { PyBuffer_Release(&buf); return NULL; }
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, n * (Py_ssize_t)sizeof(double));
    if (!out) { PyBuffer_Release(&buf); return NULL; }
    double *dst = (double *)PyBytes_AS_STRING(out);
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t r = 0; r < n; r++) {
        double s = raw_score(self, rows + r * self->n_features);
        dst[r] = raw ? s : probability(self, s);
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&buf);
    return out;
}

static PyObject *Forest_predict_many(Forest *self, PyObject *arg) { return many(self, arg, 0); }
static PyObject *Forest_raw_many(Forest *self, PyObject *arg) { return many(self, arg, 1); }

/* ---- construction ------------------------------------------------------------------------ */

/* A running instance loads versions in a thread while its event loop serves, so the forest is
 * built without the GIL: the caller's arrays are copied once into the forest's own memory (what
 * is checked is then what is built, whatever the caller's buffers do meanwhile), memory comes
 * from the raw allocator (the one usable without the GIL), an error is kept as a message and
 * raised once the GIL is back, and the result is put into the object only then. */

typedef struct {
    Py_buffer view;
    int held;
} arg_buf;

typedef struct {
    PyObject *type; /* the exception to raise; NULL while all is well */
    char message[200];
} build_error;

static int fail(build_error *err, PyObject *type, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err->message, sizeof err->message, fmt, ap);
    va_end(ap);
    err->type = type;
    return -1;
}

static int out_of_memory(build_error *err) { return fail(err, PyExc_MemoryError, "no memory for the forest"); }

static void free_forest(Forest *f) {
    PyMem_RawFree(f->nodes);
    PyMem_RawFree(f->roots);
    PyMem_RawFree(f->group_depth);
    PyMem_RawFree(f->entry_start);
    PyMem_RawFree(f->entries);
    f->nodes = NULL;
    f->roots = NULL;
    f->group_depth = NULL;
    f->entry_start = NULL;
    f->entries = NULL;
}

static int take(PyObject *obj, arg_buf *b, Py_ssize_t itemsize, Py_ssize_t *count, const char *name) {
    if (PyObject_GetBuffer(obj, &b->view, PyBUF_SIMPLE) < 0) return -1;
    b->held = 1;
    if (b->view.len % itemsize) {
        PyErr_Format(PyExc_ValueError, "%s: %zd bytes is not a whole number of items", name, b->view.len);
        return -1;
    }
    Py_ssize_t n = b->view.len / itemsize;
    if (*count >= 0 && n != *count) {
        PyErr_Format(PyExc_ValueError, "%s: %zd items, expected %zd", name, n, *count);
        return -1;
    }
    *count = n;
    return 0;
}

/* Every node but a root has exactly one parent (else ValueError); each leaf gets its path's
 * Saabas sums, one entry per feature split on along the path.  Reads only the forest's own
 * nodes (a leaf's children are itself). */
static int build_reasons(Forest *f, build_error *err) {
    Py_ssize_t n = f->n_nodes;
    const node_t *nodes = f->nodes;
    int nf = f->n_features;
    int32_t *parent = PyMem_RawMalloc((size_t)n * sizeof(int32_t));
    double acc[MAX_FEATURES];
    int touched[MAX_FEATURES];
    int rc = -1;
    f->entry_start = PyMem_RawCalloc((size_t)n + 1, sizeof(int32_t));
    if (!parent || !f->entry_start) { out_of_memory(err); goto out; }
    for (Py_ssize_t i = 0; i < n; i++) parent[i] = -2; /* -2: no parent yet */
    for (Py_ssize_t t = 0; t < f->n_trees; t++) {
        if (parent[f->roots[t]] != -2) { fail(err, PyExc_ValueError, "tree %zd: root reached twice", t); goto out; }
        parent[f->roots[t]] = -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (nodes[i].feature < 0) continue;
        for (int k = 0; k < 2; k++) {
            int32_t kid = nodes[i].child[k];
            if (parent[kid] != -2) { fail(err, PyExc_ValueError, "node %d has two parents", kid); goto out; }
            parent[kid] = (int32_t)i;
        }
    }
    Py_ssize_t total = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (parent[i] == -2) { fail(err, PyExc_ValueError, "node %zd is in no tree", i); goto out; }
        if (nodes[i].feature >= 0) continue;
        int count = 0;
        memset(touched, 0, sizeof(int) * (size_t)nf);
        for (int32_t c = (int32_t)i; parent[c] >= 0; c = parent[c]) {
            int32_t feat = nodes[parent[c]].feature;
            count += !touched[feat];
            touched[feat] = 1;
        }
        total += count;
    }
    if (total > INT32_MAX) { fail(err, PyExc_ValueError, "the forest is too large"); goto out; }
    f->entries = PyMem_RawMalloc((size_t)(total ? total : 1) * sizeof(reason_t));
    if (!f->entries) { out_of_memory(err); goto out; }
    int32_t e = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        f->entry_start[i] = e;
        if (nodes[i].feature >= 0) continue;
        memset(touched, 0, sizeof(int) * (size_t)nf);
        for (int32_t c = (int32_t)i; parent[c] >= 0; c = parent[c]) {
            int32_t p = parent[c], feat = nodes[p].feature;
            if (!touched[feat]) acc[feat] = 0.0;
            touched[feat] = 1;
            acc[feat] += nodes[c].value - nodes[p].value;
        }
        for (int k = 0; k < nf; k++)
            if (touched[k]) f->entries[e++] = (reason_t){acc[k], k};
    }
    f->entry_start[n] = e;
    rc = 0;
out:
    PyMem_RawFree(parent);
    return rc;
}

/* The whole build, without the GIL: the arrays (n nodes, n_trees roots) into ``f``.  The nodes
 * are copied first, then checked and walked from the copy only. */
static int build(Forest *f, const arg_buf *b, Py_ssize_t n, Py_ssize_t n_trees, build_error *err) {
    const int32_t *feature = b[0].view.buf, *left = b[3].view.buf, *right = b[4].view.buf;
    const double *threshold = b[1].view.buf, *value = b[5].view.buf;
    const uint8_t *decision = b[2].view.buf;
    f->nodes = PyMem_RawCalloc((size_t)n, sizeof(node_t));
    f->roots = PyMem_RawMalloc((size_t)n_trees * sizeof(int32_t));
    if (!f->nodes || !f->roots) return out_of_memory(err);
    for (Py_ssize_t i = 0; i < n; i++) {
        node_t *nd = &f->nodes[i];
        int32_t feat = feature[i];
        int leaf = feat < 0;
        nd->threshold = threshold[i];
        nd->value = value[i];
        nd->feature = leaf ? -1 : feat;
        nd->fidx = (uint16_t)(leaf ? 0 : feat);
        nd->child[0] = leaf ? (int32_t)i : left[i];
        nd->child[1] = leaf ? (int32_t)i : right[i];
        nd->decision = decision[i];
    }
    memcpy(f->roots, b[6].view.buf, (size_t)n_trees * sizeof(int32_t));
    int zero_missing = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        const node_t *nd = &f->nodes[i];
        if (nd->feature < 0) continue; /* a leaf */
        if (nd->feature >= f->n_features)
            return fail(err, PyExc_ValueError, "node %zd splits on feature %d of %d", i, nd->feature, f->n_features);
        /* children after their parent: every walk ends */
        if (nd->child[0] <= i || nd->child[0] >= n || nd->child[1] <= i || nd->child[1] >= n)
            return fail(err, PyExc_ValueError, "node %zd: children must lie after it in the node array", i);
        if (nd->decision & CATEGORICAL)
            return fail(err, PyExc_ValueError, "node %zd: categorical splits are not supported", i);
        int missing = (nd->decision >> 2) & 3;
        if (missing == 3) return fail(err, PyExc_ValueError, "node %zd: unknown missing type", i);
        zero_missing |= missing == MISSING_ZERO;
    }
    for (Py_ssize_t t = 0; t < n_trees; t++)
        if (f->roots[t] < 0 || f->roots[t] >= n) return fail(err, PyExc_ValueError, "tree %zd: bad root", t);
    /* splits on the deepest path below each node: children lie after parents, so go backwards */
    int32_t *depth = PyMem_RawCalloc((size_t)n, sizeof(int32_t));
    Py_ssize_t n_groups = (n_trees + GROUP - 1) / GROUP;
    f->group_depth = PyMem_RawCalloc((size_t)n_groups, sizeof(int32_t));
    if (!depth || !f->group_depth) { PyMem_RawFree(depth); return out_of_memory(err); }
    for (Py_ssize_t i = n - 1; i >= 0; i--) {
        const node_t *nd = &f->nodes[i];
        if (nd->feature < 0) continue;
        int32_t l = depth[nd->child[0]], r = depth[nd->child[1]];
        depth[i] = 1 + (l > r ? l : r);
    }
    for (Py_ssize_t t = 0; t < n_trees; t++) {
        int32_t *g = &f->group_depth[t / GROUP];
        if (depth[f->roots[t]] > *g) *g = depth[f->roots[t]];
    }
    PyMem_RawFree(depth);
    f->n_nodes = n;
    f->n_trees = n_trees;
    if (build_reasons(f, err) < 0) return -1;
    double bias = 0.0;
    for (Py_ssize_t t = 0; t < n_trees; t++) bias += f->nodes[f->roots[t]].value;
    f->bias = bias;
    f->zero_missing = zero_missing;
    return 0;
}

static int Forest_init(Forest *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"feature", "threshold", "decision", "left", "right", "value", "roots",
                             "n_features", "sigmoid", "allow_nan", NULL};
    PyObject *o[7];
    int n_features, allow_nan = 0;
    double sigmoid;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOOOOOid|p", kwlist, &o[0], &o[1], &o[2], &o[3], &o[4],
                                     &o[5], &o[6], &n_features, &sigmoid, &allow_nan))
        return -1;
    if (self->nodes) { PyErr_SetString(PyExc_TypeError, "Forest is already initialised"); return -1; }
    if (n_features < 1 || n_features > MAX_FEATURES) {
        PyErr_Format(PyExc_ValueError, "n_features must be 1..%d", MAX_FEATURES);
        return -1;
    }
    arg_buf b[7] = {{{0}, 0}};
    static const Py_ssize_t sizes[7] = {4, 8, 1, 4, 4, 8, 4};
    static const char *names[7] = {"feature", "threshold", "decision", "left", "right", "value", "roots"};
    Py_ssize_t n = -1, n_trees = -1;
    int rc = -1;
    Forest built = {0};
    build_error err = {NULL, {0}};
    for (int i = 0; i < 6; i++)
        if (take(o[i], &b[i], sizes[i], &n, names[i]) < 0) goto done;
    if (take(o[6], &b[6], 4, &n_trees, "roots") < 0) goto done;
    if (n < 1 || n_trees < 1 || n > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "a forest needs at least one tree and one node");
        goto done;
    }
    built.n_features = n_features;
    Py_BEGIN_ALLOW_THREADS
    rc = build(&built, b, n, n_trees, &err);
    Py_END_ALLOW_THREADS
    if (rc < 0) {
        PyErr_SetString(err.type, err.message);
        goto done;
    }
    if (self->nodes) { /* another thread initialised it meanwhile */
        PyErr_SetString(PyExc_TypeError, "Forest is already initialised");
        rc = -1;
        goto done;
    }
    self->nodes = built.nodes;
    self->roots = built.roots;
    self->group_depth = built.group_depth;
    self->entry_start = built.entry_start;
    self->entries = built.entries;
    self->n_nodes = built.n_nodes;
    self->n_trees = built.n_trees;
    self->n_features = n_features;
    self->zero_missing = built.zero_missing;
    self->allow_nan = allow_nan;
    self->sigmoid = sigmoid;
    self->bias = built.bias;
    built.nodes = NULL; /* the object's now */
    built.roots = NULL;
    built.group_depth = NULL;
    built.entry_start = NULL;
    built.entries = NULL;
done:
    for (int i = 0; i < 7; i++)
        if (b[i].held) PyBuffer_Release(&b[i].view);
    free_forest(&built);
    return rc;
}

static void Forest_dealloc(Forest *self) {
    free_forest(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Forest_get(Forest *self, void *which) {
    switch ((intptr_t)which) {
    case 0: return PyLong_FromSsize_t(self->n_trees);
    case 1: return PyLong_FromSsize_t(self->n_nodes);
    case 2: return PyLong_FromLong(self->n_features);
    case 3: return PyFloat_FromDouble(self->bias);
    default: return PyFloat_FromDouble(self->sigmoid);
    }
}

#define GUARDED(name)                                                       \
    static PyObject *name##_guarded(Forest *self, PyObject *arg) {          \
        if (!self->nodes) {                                                 \
            PyErr_SetString(PyExc_ValueError, "Forest is not initialised"); \
            return NULL;                                                    \
        }                                                                   \
        return name(self, arg);                                             \
    }
GUARDED(Forest_raw)
GUARDED(Forest_predict)
GUARDED(Forest_explain)
GUARDED(Forest_predict_many)
GUARDED(Forest_raw_many)

static PyMethodDef Forest_methods[] = {
    {"raw", (PyCFunction)Forest_raw_guarded, METH_O, "raw(row) -> the sum of the trees' leaf values"},
    {"predict", (PyCFunction)Forest_predict_guarded, METH_O, "predict(row) -> probability"},
    {"explain", (PyCFunction)Forest_explain_guarded, METH_O,
     "explain(row) -> (probability, contributions): Saabas attributions, one per feature"},
    {"predict_many", (PyCFunction)Forest_predict_many_guarded, METH_O,
     "predict_many(doubles) -> bytes of doubles: one probability per row, without the GIL"},
    {"raw_many", (PyCFunction)Forest_raw_many_guarded, METH_O,
     "raw_many(doubles) -> bytes of doubles: one raw score per row, without the GIL"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Forest_getset[] = {
    {"n_trees", (getter)Forest_get, NULL, "trees in the forest", (void *)0},
    {"n_nodes", (getter)Forest_get, NULL, "nodes and leaves of all trees", (void *)1},
    {"n_features", (getter)Forest_get, NULL, "numbers per row", (void *)2},
    {"bias", (getter)Forest_get, NULL, "sum of the roots' expected values", (void *)3},
    {"sigmoid", (getter)Forest_get, NULL, "the binary objective's sigmoid parameter", (void *)4},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject ForestType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "fraudscore.models._trees.Forest",
    .tp_basicsize = sizeof(Forest),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A binary LightGBM forest as flat arrays, evaluated natively (see models/trees.py).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Forest_init,
    .tp_dealloc = (destructor)Forest_dealloc,
    .tp_methods = Forest_methods,
    .tp_getset = Forest_getset,
};

/* ---- the C API (trees_api.h): explain without the GIL, for the service's fast path ---------- */

static int api_n_features(PyObject *forest) {
    const Forest *f = (const Forest *)forest;
    return f->nodes ? f->n_features : -1;
}

static int api_explain(PyObject *forest, const double *row, double *prob, double *contrib) {
    const Forest *f = (const Forest *)forest;
    if (!f->nodes) return -1;
    if (!f->allow_nan)
        for (int i = 0; i < f->n_features; i++)
            if (!isfinite(row[i])) return -1;
    memset(contrib, 0, sizeof(double) * (size_t)f->n_features);
    *prob = probability(f, raw_explained(f, row, contrib));
    return 0;
}

static struct PyModuleDef trees_module = {
    PyModuleDef_HEAD_INIT, "_trees", "Native evaluator of LightGBM forests, with Saabas reasons.", -1, NULL,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__trees(void) {
    if (PyType_Ready(&ForestType) < 0) return NULL;
    PyObject *m = PyModule_Create(&trees_module);
    if (!m) return NULL;
    Py_INCREF(&ForestType);
    if (PyModule_AddObject(m, "Forest", (PyObject *)&ForestType) < 0) {
        Py_DECREF(&ForestType);
        Py_DECREF(m);
        return NULL;
    }
    PyModule_AddIntConstant(m, "MAX_FEATURES", MAX_FEATURES);
    static fs_trees_api api = {&ForestType, api_n_features, api_explain};
    PyObject *capsule = PyCapsule_New(&api, FS_TREES_CAPSULE, NULL);
    if (!capsule || PyModule_AddObject(m, "_C_API", capsule) < 0) {
        Py_XDECREF(capsule);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
