/* The forest's walk, for other native modules of fraudscore (the service's fast path).
 *
 * _trees exports this table as the capsule FS_TREES_CAPSULE: the caller imports
 * fraudscore.models._trees and calls PyCapsule_Import(FS_TREES_CAPSULE, 0) once. */
#ifndef FRAUDSCORE_TREES_API_H
#define FRAUDSCORE_TREES_API_H

#include <Python.h>

#define FS_TREES_CAPSULE "fraudscore.models._trees._C_API"

typedef struct {
    /* _trees.Forest: check a Python object with PyObject_TypeCheck before passing it below */
    PyTypeObject *forest_type;
    /* numbers per row of an initialised forest, or -1 when it is not initialised */
    int (*n_features)(PyObject *forest);
    /* Forest.explain of one row of n_features doubles: the probability and one Saabas contribution
     * per feature (contrib: n_features doubles).  0, or -1 when the row has a value the forest
     * refuses (not finite without allow_nan) or the forest is not initialised.  Sets no exception
     * and needs no GIL: a built forest is never changed, and the caller keeps it alive. */
    int (*explain)(PyObject *forest, const double *row, double *probability, double *contrib);
} fs_trees_api;

#endif
