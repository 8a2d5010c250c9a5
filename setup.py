"""Build script: compiles every ``fastbus/*.pyx`` with one global set of directives.

``FASTBUS_DEBUG_BUILD=1`` turns bounds/wraparound checks back on and defines
``FASTBUS_DEBUG`` so that the invariant assertions in the C helpers and the
``assert`` statements in the Cython modules are compiled in (they are compiled
away otherwise, through ``CYTHON_WITHOUT_ASSERTIONS``). It also builds the WAL's
wake-up gate (``fastbus/_wakegate.h``) on a mutex and a condition variable, the
branch other systems than Linux use, so ``make test`` runs that branch too.
"""

import glob
import os

from setuptools import Extension, setup

DEBUG = os.environ.get("FASTBUS_DEBUG_BUILD", "") not in ("", "0")


def _extensions():
    import cysignals
    import numpy
    from Cython.Build import cythonize

    directives = {
        "language_level": 3,
        "boundscheck": DEBUG,
        "wraparound": DEBUG,
        "initializedcheck": DEBUG,
        "cdivision": not DEBUG,
        "embedsignature": True,
        "freethreading_compatible": False,
    }
    macros = [("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")]
    if DEBUG:
        macros.append(("FASTBUS_DEBUG", "1"))
        macros.append(("FASTBUS_GATE_PTHREAD", "1"))
        cflags = ["-O1", "-g", "-fno-omit-frame-pointer"]
    else:
        macros.append(("CYTHON_WITHOUT_ASSERTIONS", "1"))
        cflags = ["-O3"]
    include_dirs = ["fastbus", numpy.get_include(), *cysignals.__path__]
    extensions = []
    for pyx in sorted(glob.glob("fastbus/*.pyx")):
        name = "fastbus." + os.path.splitext(os.path.basename(pyx))[0]
        extensions.append(
            Extension(
                name,
                [pyx],
                include_dirs=include_dirs,
                define_macros=macros,
                extra_compile_args=cflags,
                depends=glob.glob("fastbus/*.pxd") + glob.glob("fastbus/*.h"),
            )
        )
    return cythonize(
        extensions,
        compiler_directives=directives,
        include_path=["fastbus", *cysignals.__path__],
        # A debug build must not reuse C generated for a release build.
        force=DEBUG or os.environ.get("FASTBUS_FORCE_CYTHON") == "1",
        quiet=True,
    )


setup(ext_modules=_extensions())
