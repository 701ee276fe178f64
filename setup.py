"""Build the Cython extensions: dairllm._ops (kernels) and dairllm._net (wire framing).

Flags: -O3 always; OpenMP when the compiler accepts it (a build without it runs single-threaded);
no -march=native, so wheels run on any CPU of their architecture. SIMD paths are chosen at run
time in csrc/ (function-level target attributes plus CPU feature checks).
Set DAIRLLM_NO_OPENMP=1 to build without OpenMP, DAIRLLM_DEBUG=1 for bounds-checked Cython.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


def _compiler_accepts(compiler: list[str], flags: list[str]) -> bool:
    """Compile and link a tiny OpenMP program with the given flags."""
    src = "#include <omp.h>\nint main(void){return omp_get_max_threads() > 0 ? 0 : 1;}\n"
    with tempfile.TemporaryDirectory() as tmp:
        c_file = os.path.join(tmp, "probe.c")
        with open(c_file, "w") as f:
            f.write(src)
        cmd = [*compiler, *flags, c_file, "-o", os.path.join(tmp, "probe")]
        try:
            return subprocess.run(cmd, capture_output=True).returncode == 0
        except OSError:
            return False


def _compiler_command(compiler_so: list[str]) -> list[str]:
    """The compiler itself, without its flags: ["ccache", "gcc"] stays whole."""
    command = []
    for part in compiler_so:
        if part.startswith("-"):
            break
        command.append(part)
    return command or ["cc"]


class BuildExt(build_ext):
    def build_extensions(self) -> None:
        compiler = _compiler_command(getattr(self.compiler, "compiler_so", None) or ["cc"])
        use_openmp = os.environ.get("DAIRLLM_NO_OPENMP") != "1" and sys.platform != "win32"
        openmp_flags = ["-fopenmp"] if use_openmp and _compiler_accepts(compiler, ["-fopenmp"]) else []
        if use_openmp and not openmp_flags:
            print("dairllm: compiler has no OpenMP; building single-threaded kernels")
        for ext in self.extensions:
            debug_info = ["-g"] if debug else ["-g0"]      # wheels for small boards stay small
            ext.extra_compile_args += ["-O3", "-std=gnu11", *debug_info,
                                       "-fno-strict-aliasing", "-Wno-unused-function",
                                       "-Wno-unreachable-code", *openmp_flags]
            ext.extra_link_args += openmp_flags
            ext.define_macros.append(("DAIRLLM_OPENMP", "1" if openmp_flags else "0"))
        super().build_extensions()


debug = os.environ.get("DAIRLLM_DEBUG") == "1"
directives = {
    "language_level": 3,
    "boundscheck": debug,
    "wraparound": debug,
    "cdivision": True,
    "initializedcheck": debug,
    "embedsignature": True,
}
common = dict(
    include_dirs=[np.get_include(), "src/dairllm/csrc"],
    define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
)
# csrc/: the portable kernels (the spec), the x86 and ARM paths, the table that picks between them
KERNEL_SOURCES = ["dl_scalar", "dl_x86", "dl_x86_vnni", "dl_arm", "dl_dispatch",
                  "dl_gguf_scalar", "dl_x86_kquant", "dl_arm_kquant"]      # + the GGUF block types
KERNEL_HEADERS = ["dl_kernels.h", "dl_table.h", "dl_dllama.h", "dl_omp.h", "dl_gguf.h", "dl_gguf_blocks.h",
                  "dl_x86_util.h", "dl_arm_util.h"]
extensions = [
    Extension("dairllm._ops", ["src/dairllm/_ops.pyx",
                               *(f"src/dairllm/csrc/{name}.c" for name in KERNEL_SOURCES)],
              depends=[f"src/dairllm/csrc/{name}" for name in KERNEL_HEADERS], **common),
    Extension("dairllm._net", ["src/dairllm/_net.pyx"], **common),
]

setup(
    ext_modules=cythonize(extensions, compiler_directives=directives),
    cmdclass={"build_ext": BuildExt},
)
