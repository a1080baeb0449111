"""XLA:CPU settings that make training on a CPU fast. Numerics are unchanged; on GPU/TPU
`compiler_options()` is empty and `prepare_process_for_training()` changes nothing.

All three were measured on the shared ViT-S/16 training step (experiments/benchmarks/README.md,
2-core VM, jax 0.10.2); each one is a separate, documented knob rather than a global flag:

1. Page faults (`keep_freed_memory`). XLA:CPU mallocs a step's temporary buffers (activations
   kept for the backward pass: about 2 GiB for that step) and frees them when the step ends.
   glibc serves every request over its mmap threshold (at most 32 MiB) with fresh pages from
   mmap and gives them back with munmap, so each step faults in and zeroes all of its temporary
   memory again (expensive in a VM). Serving them from glibc's heap and never trimming it lets
   later steps reuse the same pages: 3.8 -> 3.0 s per step. The process keeps its peak memory
   until it exits, as a training process does anyway. There is no XLA:CPU option for a pooled
   allocator in jax 0.10, and glibc's `mallopt` is the documented way to set this at run time
   (the MALLOC_MMAP_MAX_/MALLOC_TRIM_THRESHOLD_ environment variables work only at start-up).
2. Elementwise ops left to XLA (`compiler_options`). In jax 0.10 XLA:CPU hands dots,
   reductions and elementwise ops to YNNPACK; keeping YNNPACK for dot fusions only used 20% less
   CPU time on that step (8.6 -> 6.9 CPU-s), XLA's own loops doing the rest.
3. Asynchronous dispatch (`synchronous_cpu_dispatch`). With `jax_cpu_enable_async_dispatch`
   (the default) a step runs on a client thread beside XLA's worker pool, one thread more than
   there are cores on a small machine, and the pool's partitioned elementwise ops stall: the
   same step took 4.2-6.0 s instead of 3.3 s. A program with a host callback (the learned
   tables' index check, models/index_check.py) is dispatched synchronously anyway, which hid
   this for the default recipe; a sinusoidal or `out_of_range="clamp"` position embedding
   showed it. The trainer reads every step's metrics before the next step (loop.host_metrics)
   and grain prefetches in its own workers, so synchronous dispatch loses no overlap.
"""

import ctypes
import logging
import platform

import jax

# Per-compilation XLA:CPU options (passed to jax.jit); see item 2 of the module docstring.
CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}

# glibc <malloc.h> mallopt parameters; -1 and 0 are the values mallopt(3) documents for
# "never trim" and "never use mmap".
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_NEVER = -1


def compiler_options(backend: str | None = None) -> dict[str, str]:
    """The options to compile a training or eval step with on `backend` (default: JAX's)."""
    return dict(CPU_COMPILER_OPTIONS) if (backend or jax.default_backend()) == "cpu" else {}


def keep_freed_memory() -> bool:
    """Makes glibc keep freed large blocks for reuse (item 1 of the module docstring).

    Returns whether it took effect: False, with a log line, where the C library is not glibc
    (macOS, musl), since nothing equivalent is wired there. Safe to call more than once.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        logging.info(
            "cpu_runtime.keep_freed_memory: C library %s on %s is not glibc; steps may refault "
            "their temporary memory.",
            platform.libc_ver()[0] or "unknown",
            platform.system(),
        )
        return False
    libc = ctypes.CDLL("libc.so.6")
    done = libc.mallopt(_M_MMAP_MAX, 0) == 1
    return libc.mallopt(_M_TRIM_THRESHOLD, _NEVER) == 1 and done


def synchronous_cpu_dispatch() -> None:
    """Runs CPU computations in the calling thread (item 3 of the module docstring).

    Takes effect only if called before JAX creates its CPU client (its first computation,
    `jax.devices()` or `jax.default_backend()`); GPU and TPU dispatch is not affected.
    """
    jax.config.update("jax_cpu_enable_async_dispatch", False)
    # jax 0.10 has no public "is the backend up yet"; without the private one, skip the warning.
    from jax._src import xla_bridge  # noqa: PLC0415

    initialized = getattr(xla_bridge, "backends_are_initialized", lambda: False)
    if initialized():
        logging.warning(
            "cpu_runtime.synchronous_cpu_dispatch: JAX's backends already exist, so CPU "
            "dispatch stays asynchronous; call it before the first JAX computation."
        )


def prepare_process_for_training() -> str:
    """What a training entry point calls once, before JAX's first computation; returns a line
    saying what it set (empty off CPU), for the entry point to print.

    Call it after `jax.distributed.initialize` (which must also precede the backend).
    """
    synchronous_cpu_dispatch()
    if jax.default_backend() != "cpu":
        return ""
    kept = keep_freed_memory()
    memory = "glibc keeps freed memory" if kept else "freed memory not kept (not glibc)"
    return f"cpu_runtime: synchronous dispatch, {memory}, YNNPACK for matmuls only"
