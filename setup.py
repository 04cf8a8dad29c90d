"""Builds the one native module; everything else is declared in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "fraudscore.index._knn",
            sources=["src/fraudscore/index/_knn.c"],
            # -ffp-contract=off: the exact distance must round like the brute force (no fused multiply-add).
            # The AVX2 kernel is compiled per function and chosen at run time, so no -march here.
            extra_compile_args=["-O3", "-std=c11", "-ffp-contract=off", "-fno-strict-aliasing"],
        )
    ],
)
