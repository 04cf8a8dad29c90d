/* Drift's per-request binning (models/drift.py): one request's 14 features and score to their
 * reference bins, written as int16 codes into a caller's buffer.
 *
 * numpy bins a batch at 10-20 ns per value once the request path has cooled its caches (about
 * 1 us per request in all); here a request costs one call and a short scan of each series'
 * edges (at most 10 for a feature, 19 for the score), a few tens of nanoseconds.
 *
 * A value's bin is the number of its series' edges strictly below it: (-inf, e0], (e0, e1], ...,
 * exactly as training counted (numpy.searchsorted, side="left"); NaN goes to the first bin.  Its
 * code is the bin plus the series' first code, so one bincount over all codes counts every
 * series at once.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

typedef struct {
    PyObject_HEAD
    Py_ssize_t series;   /* features + 1: the score is the last series */
    Py_ssize_t *nedges;  /* per series */
    Py_ssize_t *offset;  /* per series: its first edge in edges */
    int16_t *start;      /* per series: its first code */
    double *edges;       /* every series' edges, one after the other, increasing within a series */
    Py_buffer out;       /* the codes: rows of `series` int16, held for the binner's life */
    Py_ssize_t rows;     /* rows the buffer holds */
} Binner;

static void Binner_dealloc(Binner *self) {
    if (self->out.obj != NULL) PyBuffer_Release(&self->out);
    PyMem_Free(self->nedges);
    PyMem_Free(self->offset);
    PyMem_Free(self->start);
    PyMem_Free(self->edges);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Binner(edges: sequence of sequences of float, out: writable buffer of int16 rows) */
static int Binner_init(Binner *self, PyObject *args, PyObject *kwargs) {
    static char *keywords[] = {"edges", "out", NULL};
    PyObject *edges_arg, *out_arg;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO", keywords, &edges_arg, &out_arg)) return -1;
    if (self->out.obj != NULL || self->nedges != NULL) {
        PyErr_SetString(PyExc_TypeError, "a Binner is initialised once");
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
    if (PyObject_GetBuffer(out_arg, &self->out, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) return -1;
    if (self->out.itemsize != 1 && self->out.itemsize != (Py_ssize_t)sizeof(int16_t)) {
        PyErr_SetString(PyExc_TypeError, "out must be a buffer of bytes or int16");
        PyBuffer_Release(&self->out);
        return -1;
    }
    self->rows = self->out.len / (Py_ssize_t)(series * sizeof(int16_t));
    return 0;
}

static inline int16_t bin_of(const Binner *self, Py_ssize_t s, double x) {
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

/* bin(vector: list[float], score: float, row: int) -> None: codes of one request into row `row` */
static PyObject *Binner_bin(Binner *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "bin(vector, score, row) takes 3 arguments");
        return NULL;
    }
    PyObject *vector = args[0];
    Py_ssize_t features = self->series - 1;
    if (!PyList_Check(vector) || PyList_GET_SIZE(vector) != features) {
        PyErr_Format(PyExc_ValueError, "the vector must be a list of %zd floats", features);
        return NULL;
    }
    Py_ssize_t row = PyLong_AsSsize_t(args[2]);
    if (row == -1 && PyErr_Occurred()) return NULL;
    if (row < 0 || row >= self->rows) {
        PyErr_Format(PyExc_IndexError, "row %zd is outside the buffer's %zd rows", row, self->rows);
        return NULL;
    }
    int16_t codes[64];
    int16_t *dst = (int16_t *)self->out.buf + row * self->series;
    int16_t *tmp = self->series <= 64 ? codes : dst; /* whole row or nothing: written at the end */
    double x;
    for (Py_ssize_t s = 0; s < features; s++) {
        if (value_of(PyList_GET_ITEM(vector, s), &x) < 0) return NULL;
        tmp[s] = bin_of(self, s, x);
    }
    if (value_of(args[1], &x) < 0) return NULL;
    tmp[features] = bin_of(self, features, x);
    if (tmp != dst) memcpy(dst, tmp, (size_t)self->series * sizeof(int16_t));
    Py_RETURN_NONE;
}

static PyObject *Binner_get_rows(Binner *self, void *closure) {
    (void)closure;
    return PyLong_FromSsize_t(self->rows);
}

static PyMethodDef Binner_methods[] = {
    {"bin", (PyCFunction)(void (*)(void))Binner_bin, METH_FASTCALL,
     "bin($self, vector, score, row, /)\n--\n\nWrite the codes of one request's features and score into row ``row``."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Binner_getset[] = {
    {"rows", (getter)Binner_get_rows, NULL, "Rows the codes buffer holds.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject BinnerType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "fraudscore.models._drift.Binner",
    .tp_doc = PyDoc_STR("Binner(edges, out)\n--\n\nBins requests against each series' edges into ``out``'s int16 rows."),
    .tp_basicsize = sizeof(Binner),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Binner_init,
    .tp_dealloc = (destructor)Binner_dealloc,
    .tp_methods = Binner_methods,
    .tp_getset = Binner_getset,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_drift", "Drift's per-request binning (see models/drift.py).", -1, NULL, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__drift(void) {
    if (PyType_Ready(&BinnerType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    Py_INCREF(&BinnerType);
    if (PyModule_AddObject(m, "Binner", (PyObject *)&BinnerType) < 0) {
        Py_DECREF(&BinnerType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
