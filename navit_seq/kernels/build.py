"""Compiles a C++ XLA FFI kernel of this package on first use and caches the shared library.

Why not a setuptools extension: the kernels are built with `-march=native`, so the library must
be compiled on the machine that runs it (a wheel built elsewhere could use instructions this CPU
lacks), and against the headers of the jaxlib installed next to it (`jax.ffi.include_dir()`).
Compiling at first use, keyed by everything that changes the binary, gives both and needs no
build step; torch's `cpp_extension.load` makes the same choice. No library in our stack builds
FFI kernels this way, so it is written here (about 60 lines).

The cache lives in `$NAVIT_SEQ_KERNEL_CACHE`, else `~/.cache/navit_seq/kernels`. A build writes
to a temporary file and renames it into place, so processes that build at once (pytest workers)
never load a half-written library.
"""

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jaxlib

COMPILER_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")
KERNEL_DIR = Path(__file__).parent


class KernelBuildError(RuntimeError):
    """The C++ compiler is missing or failed; the message says what to do instead."""


def cache_dir() -> Path:
    default = Path.home() / ".cache" / "navit_seq" / "kernels"
    return Path(os.environ.get("NAVIT_SEQ_KERNEL_CACHE", default))


def _cpu_flags() -> str:
    """The CPU's feature flags (what -march=native compiles for), so a cache shared between
    different machines never hands one machine another's binary."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _compiler() -> str:
    wanted = os.environ.get("CXX")
    candidates = (wanted,) if wanted else ("g++", "c++")
    found = next((path for name in candidates if (path := shutil.which(name))), None)
    if found is None:
        raise KernelBuildError(
            f"no C++ compiler found (looked for {' or '.join(candidates)}"
            f"{', from $CXX' if wanted else ''}): the fused CPU attention kernel is compiled on "
            "first use. Install one (Debian: apt-get install g++) or set "
            "model.attention_impl='xla'."
        )
    return found


@functools.cache
def load_kernel(source_name: str) -> ctypes.CDLL:
    """The shared library built from `navit_seq/kernels/<source_name>`, compiled if needed."""
    source = KERNEL_DIR / source_name
    compiler = _compiler()
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, check=False
    ).stdout
    key = hashlib.sha256(
        "\0".join(
            (source.read_text(), compiler, version, " ".join(COMPILER_FLAGS), jaxlib.__version__,
             _cpu_flags())
        ).encode()
    ).hexdigest()[:16]  # fmt: skip
    library = cache_dir() / f"{source.stem}-{key}.so"
    if not library.exists():
        try:
            library.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=library.parent, suffix=".so", delete=False) as f:
                partial = Path(f.name)
        except OSError as error:
            raise KernelBuildError(
                f"cannot write the kernel cache {library.parent} ({error}); point "
                "$NAVIT_SEQ_KERNEL_CACHE at a writable folder or set model.attention_impl='xla'."
            ) from error
        command = [
            compiler, *COMPILER_FLAGS, f"-I{jax.ffi.include_dir()}", str(source), "-o",
            str(partial),
        ]  # fmt: skip
        built = subprocess.run(command, capture_output=True, text=True, check=False)
        if built.returncode != 0:
            partial.unlink(missing_ok=True)
            raise KernelBuildError(
                f"compiling {source} failed ({' '.join(command)}):\n{built.stderr[-4000:]}\n"
                "Set model.attention_impl='xla' to train without the fused CPU kernel."
            )
        os.replace(partial, library)
    return ctypes.CDLL(str(library))
