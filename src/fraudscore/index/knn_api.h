/* The search, for other native modules of fraudscore (the service's fast path).
 *
 * _knn exports this table as the capsule FS_KNN_CAPSULE: the caller imports
 * fraudscore.index._knn and calls PyCapsule_Import(FS_KNN_CAPSULE, 0) once. */
#ifndef FRAUDSCORE_KNN_API_H
#define FRAUDSCORE_KNN_API_H

#include <Python.h>

#define FS_KNN_CAPSULE "fraudscore.index._knn._C_API"
#define FS_KNN_DIMS 14
#define FS_KNN_K 5 /* neighbours per query: fraud_count answers 0..FS_KNN_K */

typedef struct {
    /* _knn.Index: check a Python object with PyObject_TypeCheck before passing it below */
    PyTypeObject *index_type;
    /* The frauds among the 5 nearest references of query (FS_KNN_DIMS doubles), or -1 when the
     * query has a value outside [-1, 1] or the index is unusable.  Sets no exception; needs the GIL
     * only in the sense that index must stay alive. */
    int (*fraud_count)(PyObject *index, const double *query);
} fs_knn_api;

#endif
