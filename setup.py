"""Builds the native modules; everything else is declared in pyproject.toml."""

from setuptools import Extension, setup

CFLAGS = ["-O3", "-std=c11", "-ffp-contract=off", "-fno-strict-aliasing"]

setup(
    ext_modules=[
        Extension(
            "fraudscore.index._knn",
            sources=["src/fraudscore/index/_knn.c"],
            depends=["src/fraudscore/index/knn_api.h"],
            # -ffp-contract=off: the exact distance must round like the brute force (no fused multiply-add).
            # The AVX2 kernel is compiled per function and chosen at run time, so no -march here.
            extra_compile_args=CFLAGS,
        ),
        Extension(
            "fraudscore.service._fastpath",
            sources=["src/fraudscore/service/_fastpath.c"],
            depends=["src/fraudscore/index/knn_api.h", "src/fraudscore/models/trees_api.h"],
            include_dirs=["src/fraudscore/index", "src/fraudscore/models"],
            # the vector must round exactly as the Python vectorizer's does: no fused multiply-add either
            extra_compile_args=CFLAGS,
        ),
        Extension(
            "fraudscore.models._trees",
            sources=["src/fraudscore/models/_trees.c"],
            depends=["src/fraudscore/models/trees_api.h"],
            # the leaf sums must round like LightGBM's: no fused multiply-add
            extra_compile_args=CFLAGS,
        ),
        Extension(
            "fraudscore.models._drift",
            sources=["src/fraudscore/models/_drift.c"],
            extra_compile_args=CFLAGS,
        ),
    ],
)
