"""Builds mhd_fast._C from csrc/*.cpp with pybind11 and OpenMP (no torch at build time).

The kernels are portable C++ compiled for the baseline ISA; hot loops carry AVX2/FMA and AVX-512 clones
selected at run time (no -march=native, so the wheel runs on any x86-64 / aarch64 machine).
"""
import glob
import os
import sys

from pybind11.setup_helpers import ParallelCompile, Pybind11Extension, build_ext
from setuptools import setup

# The translation units (one per ISA build, and the bindings) compile in parallel, one job per
# core unless MHD_FAST_BUILD_JOBS says how many.
ParallelCompile("MHD_FAST_BUILD_JOBS", default=0).install()

sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
headers = sorted(glob.glob(os.path.join("csrc", "*.h")))  # a changed header rebuilds too

# -ffp-contract=off: the branch-free fp16 conversions in csrc/simd.h need their multiplies
# rounded one at a time; the exp / log polynomials ask for FMA explicitly.
compile_args = ["-O3", "-fno-math-errno", "-ffp-contract=off"]
link_args = []
if sys.platform != "win32":
    compile_args += ["-fopenmp"]
    link_args += ["-fopenmp"]

ext_modules = []
if sources:
    ext_modules.append(
        Pybind11Extension(
            "mhd_fast._C",
            sources,
            depends=headers,
            cxx_std=17,
            extra_compile_args=compile_args,
            extra_link_args=link_args,
        )
    )

setup(ext_modules=ext_modules, cmdclass={"build_ext": build_ext})
