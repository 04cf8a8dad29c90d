/* Drift's answer-path work (models/drift.py): one request's 14 features and score to their
 * reference bins, counted into both windows at once.
 *
 * numpy, counting batches, cost about 1 us per request once the request path had cooled its
 * caches; here a request is one call: a short scan of each series' edges (at most 10 for a
 * feature, 19 for the score), then 15 decrements and 15 increments for the count window (a ring
 * of the last `window` requests' codes) and 15 increments for the time window's current slot.
 *
 * A value's bin is the number of its series' edges strictly below it: (-inf, e0], (e0, e1], ...,
 * exactly as training counted (numpy.searchsorted, side="left"); NaN goes to the first bin.  Its
 * code is the bin plus the series' first code, so the counts of every series share one array.
 * The arrays are the caller's (bytearrays that drift.py also reads through numpy views).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

typedef struct {
    PyObject_HEAD
    Py_ssize_t series;   /* features + 1: the score is the last series */
    Py_ssize_t *nedges;  /* per series */
    Py_ssize_t *offset;  /* per series: its first edge in edges */
    int16_t *start;      /* per series: its first code */
    double *edges;       /* every series' edges, one after the other, increasing within a series */
    Py_ssize_t bins;     /* codes 0 .. bins - 1; code `bins` marks a ring row never written */
    Py_buffer ring_buf, counts_buf, slot_counts_buf, slot_ids_buf; /* held for the tracker's life */
    int16_t *ring;        /* window rows of `series` codes */
    int64_t *counts;      /* bins + 1: per code, in the count window */
    int64_t *slot_counts; /* slots rows of bins + 1: per code, per time slot */
    int64_t *slot_ids;    /* slots: which slot (time // slot_seconds) each row holds */
    Py_ssize_t window, pos, filled, slots, every, since;
    double slot_seconds;
    PyObject *clock;    /* a callable giving the time in seconds, or NULL: CLOCK_MONOTONIC */
    PyObject *on_every; /* called every `every` requests (drift.py checks its alerts) */
    unsigned long long observed;
} Tracker;

static int Tracker_traverse(Tracker *self, visitproc visit, void *arg) {
    Py_VISIT(self->clock);
    Py_VISIT(self->on_every);
    return 0;
}

static int Tracker_clear(Tracker *self) {
    Py_CLEAR(self->clock);
    Py_CLEAR(self->on_every);
    return 0;
}

static void Tracker_dealloc(Tracker *self) {
    PyObject_GC_UnTrack(self);
    Tracker_clear(self);
    if (self->ring_buf.obj != NULL) PyBuffer_Release(&self->ring_buf);
    if (self->counts_buf.obj != NULL) PyBuffer_Release(&self->counts_buf);
    if (self->slot_counts_buf.obj != NULL) PyBuffer_Release(&self->slot_counts_buf);
    if (self->slot_ids_buf.obj != NULL) PyBuffer_Release(&self->slot_ids_buf);
    PyMem_Free(self->nedges);
    PyMem_Free(self->offset);
    PyMem_Free(self->start);
    PyMem_Free(self->edges);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int take(PyObject *obj, Py_buffer *view, Py_ssize_t unit, Py_ssize_t *units, const char *name) {
    if (PyObject_GetBuffer(obj, view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) return -1;
    if (view->len == 0 || view->len % unit != 0) {
        PyErr_Format(PyExc_ValueError, "%s must hold a whole, non-zero number of %zd-byte rows", name, unit);
        return -1;
    }
    *units = view->len / unit;
    return 0;
}

/* Tracker(edges, ring, counts, slot_counts, slot_ids, slot_seconds, every) */
static int Tracker_init(Tracker *self, PyObject *args, PyObject *kwargs) {
    static char *keywords[] = {"edges", "ring",  "counts", "slot_counts", "slot_ids", "slot_seconds",
                               "every", "clock", "on_every", NULL};
    PyObject *edges_arg, *ring_arg, *counts_arg, *slot_counts_arg, *slot_ids_arg, *clock, *on_every;
    double slot_seconds;
    Py_ssize_t every;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOOdnOO", keywords, &edges_arg, &ring_arg, &counts_arg,
                                     &slot_counts_arg, &slot_ids_arg, &slot_seconds, &every, &clock, &on_every))
        return -1;
    if ((clock != Py_None && !PyCallable_Check(clock)) || !PyCallable_Check(on_every)) {
        PyErr_SetString(PyExc_TypeError, "clock must be None or callable, on_every callable");
        return -1;
    }
    if (!(slot_seconds > 0) || isinf(slot_seconds) || every < 1) {
        PyErr_SetString(PyExc_ValueError, "slot_seconds must be positive and finite, every at least 1");
        return -1;
    }
    if (self->ring_buf.obj != NULL || self->nedges != NULL) {
        PyErr_SetString(PyExc_TypeError, "a Tracker is initialised once");
        return -1;
    }
    PyObject *outer = PySequence_Fast(edges_arg, "edges must be a sequence of sequences of floats");
    if (outer == NULL) return -1;
    Py_ssize_t series = PySequence_Fast_GET_SIZE(outer);
    Py_ssize_t total = 0;
    int ok = series > 0;
    if (!ok) PyErr_SetString(PyExc_ValueError, "edges must hold at least one series");
    self->nedges = PyMem_Calloc((size_t)series + 1, sizeof(Py_ssize_t));
    self->offset = PyMem_Calloc((size_t)series + 1, sizeof(Py_ssize_t));
    self->start = PyMem_Calloc((size_t)series + 1, sizeof(int16_t));
    if (ok && (self->nedges == NULL || self->offset == NULL || self->start == NULL)) {
        PyErr_NoMemory();
        ok = 0;
    }
    for (Py_ssize_t s = 0; ok && s < series; s++) {
        Py_ssize_t n = PyObject_Length(PySequence_Fast_GET_ITEM(outer, s));
        if (n < 0) ok = 0;
        else {
            self->nedges[s] = n;
            self->offset[s] = total;
            total += n;
        }
    }
    Py_ssize_t codes = total + series; /* each series has one more bin than edges */
    if (ok && codes > INT16_MAX) {
        PyErr_SetString(PyExc_ValueError, "too many bins for int16 codes");
        ok = 0;
    }
    if (ok) {
        self->edges = PyMem_Calloc((size_t)total + 1, sizeof(double));
        if (self->edges == NULL) {
            PyErr_NoMemory();
            ok = 0;
        }
    }
    int16_t code = 0;
    for (Py_ssize_t s = 0; ok && s < series; s++) {
        self->start[s] = code;
        code = (int16_t)(code + self->nedges[s] + 1);
        PyObject *inner = PySequence_Fast(PySequence_Fast_GET_ITEM(outer, s), "each series' edges must be a sequence");
        if (inner == NULL) {
            ok = 0;
            break;
        }
        for (Py_ssize_t i = 0; i < self->nedges[s]; i++) {
            double e = PyFloat_AsDouble(PySequence_Fast_GET_ITEM(inner, i));
            if (e == -1.0 && PyErr_Occurred()) {
                ok = 0;
                break;
            }
            if (i > 0 && !(e > self->edges[self->offset[s] + i - 1])) {
                PyErr_SetString(PyExc_ValueError, "each series' edges must increase");
                ok = 0;
                break;
            }
            self->edges[self->offset[s] + i] = e;
        }
        Py_DECREF(inner);
    }
    Py_DECREF(outer);
    if (!ok) return -1;
    self->series = series;
    self->bins = codes;
    Py_ssize_t n_counts, n_ids, n_slot_rows;
    if (take(ring_arg, &self->ring_buf, series * (Py_ssize_t)sizeof(int16_t), &self->window, "ring") < 0) return -1;
    if (take(counts_arg, &self->counts_buf, (codes + 1) * 8, &n_counts, "counts") < 0) return -1;
    if (take(slot_counts_arg, &self->slot_counts_buf, (codes + 1) * 8, &n_slot_rows, "slot_counts") < 0) return -1;
    if (take(slot_ids_arg, &self->slot_ids_buf, 8, &n_ids, "slot_ids") < 0) return -1;
    if (n_counts != 1 || n_ids != n_slot_rows) {
        PyErr_SetString(PyExc_ValueError, "counts must hold one row, slot_ids one id per slot_counts row");
        return -1;
    }
    self->ring = self->ring_buf.buf;
    self->counts = self->counts_buf.buf;
    self->slot_counts = self->slot_counts_buf.buf;
    self->slot_ids = self->slot_ids_buf.buf;
    self->slots = n_ids;
    self->slot_seconds = slot_seconds;
    self->every = every;
    self->clock = clock == Py_None ? NULL : Py_NewRef(clock);
    self->on_every = Py_NewRef(on_every);
    for (Py_ssize_t i = 0; i < self->window * series; i++) {
        if (self->ring[i] < 0 || self->ring[i] > codes) {
            PyErr_SetString(PyExc_ValueError, "the ring holds a code out of range");
            return -1;
        }
    }
    return 0;
}

static inline int16_t bin_of(const Tracker *self, Py_ssize_t s, double x) {
    const double *e = self->edges + self->offset[s];
    Py_ssize_t n = self->nedges[s], b = 0;
    while (b < n && x > e[b]) b++; /* increasing edges: stop at the first not below x */
    return (int16_t)(self->start[s] + b);
}

static inline int value_of(PyObject *o, double *x) {
    if (PyFloat_CheckExact(o)) {
        *x = PyFloat_AS_DOUBLE(o);
        return 0;
    }
    *x = PyFloat_AsDouble(o);
    return (*x == -1.0 && PyErr_Occurred()) ? -1 : 0;
}

static int now(Tracker *self, double *t) {
    if (self->clock == NULL) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts); /* what time.monotonic() reads */
        *t = (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
        return 0;
    }
    PyObject *r = PyObject_CallNoArgs(self->clock);
    if (r == NULL) return -1;
    int rc = value_of(r, t);
    Py_DECREF(r);
    return rc;
}

/* observe(vector: list[float], score: float) -> None: count one request in both windows at the
 * clock's time; every `every` requests, call on_every (an exception it raises is reported as
 * unraisable: the request that happened to be the 1024th must not fail for it) */
static PyObject *Tracker_observe(Tracker *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "observe(vector, score) takes 2 arguments");
        return NULL;
    }
    PyObject *vector = args[0];
    Py_ssize_t series = self->series, features = series - 1;
    if (!PyList_Check(vector) || PyList_GET_SIZE(vector) != features) {
        PyErr_Format(PyExc_ValueError, "the vector must be a list of %zd floats", features);
        return NULL;
    }
    int16_t codes[64];
    if (series > 64) {
        PyErr_SetString(PyExc_ValueError, "at most 64 series");
        return NULL;
    }
    double x, t;
    for (Py_ssize_t s = 0; s < features; s++) {
        if (value_of(PyList_GET_ITEM(vector, s), &x) < 0) return NULL;
        codes[s] = bin_of(self, s, x);
    }
    if (value_of(args[1], &x) < 0) return NULL;
    codes[features] = bin_of(self, features, x);
    if (now(self, &t) < 0) return NULL;
    /* the count window: this request replaces the oldest in the ring */
    int16_t *row = self->ring + self->pos * series;
    for (Py_ssize_t s = 0; s < series; s++) {
        self->counts[row[s]]--;
        self->counts[codes[s]]++;
        row[s] = codes[s];
    }
    self->pos = self->pos + 1 == self->window ? 0 : self->pos + 1;
    if (self->filled < self->window) self->filled++;
    /* the time window: the slot of `t`, unless its row already holds a later slot */
    double q = floor(t / self->slot_seconds);
    if (q > -9.0e15 && q < 9.0e15) {
        int64_t slot = (int64_t)q;
        int64_t r = slot % self->slots;
        if (r < 0) r += self->slots;
        if (self->slot_ids[r] <= slot) {
            int64_t *counts = self->slot_counts + r * (self->bins + 1);
            if (self->slot_ids[r] != slot) {
                memset(counts, 0, (size_t)(self->bins + 1) * sizeof(int64_t));
                self->slot_ids[r] = slot;
            }
            for (Py_ssize_t s = 0; s < series; s++) counts[codes[s]]++;
        }
    }
    self->observed++;
    if (++self->since >= self->every) {
        self->since = 0;
        PyObject *r = PyObject_CallNoArgs(self->on_every);
        if (r == NULL) PyErr_WriteUnraisable(self->on_every);
        Py_XDECREF(r);
    }
    Py_RETURN_NONE;
}

static PyObject *Tracker_get_filled(Tracker *self, void *closure) {
    (void)closure;
    return PyLong_FromSsize_t(self->filled);
}

static PyObject *Tracker_get_observed(Tracker *self, void *closure) {
    (void)closure;
    return PyLong_FromUnsignedLongLong(self->observed);
}

static PyMethodDef Tracker_methods[] = {
    {"observe", (PyCFunction)(void (*)(void))Tracker_observe, METH_FASTCALL,
     "observe($self, vector, score, /)\n--\n\nCount one request in both windows at the clock's time."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Tracker_getset[] = {
    {"filled", (getter)Tracker_get_filled, NULL, "Requests in the count window.", NULL},
    {"observed", (getter)Tracker_get_observed, NULL, "Requests observed in all.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject TrackerType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "fraudscore.models._drift.Tracker",
    .tp_doc = PyDoc_STR("Tracker(edges, ring, counts, slot_counts, slot_ids, slot_seconds, every, clock, on_every)\n--\n\n"
                        "Bins requests against each series' edges and counts them in both windows."),
    .tp_basicsize = sizeof(Tracker),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_traverse = (traverseproc)Tracker_traverse,
    .tp_clear = (inquiry)Tracker_clear,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Tracker_init,
    .tp_dealloc = (destructor)Tracker_dealloc,
    .tp_methods = Tracker_methods,
    .tp_getset = Tracker_getset,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_drift", "Drift's per-request binning (see models/drift.py).", -1, NULL, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__drift(void) {
    if (PyType_Ready(&TrackerType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    Py_INCREF(&TrackerType);
    if (PyModule_AddObject(m, "Tracker", (PyObject *)&TrackerType) < 0) {
        Py_DECREF(&TrackerType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
