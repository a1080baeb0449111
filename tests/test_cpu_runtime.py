"""navit_seq.cpu_runtime: the XLA:CPU compiler options and glibc's keep-freed-memory setting."""

import platform
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from navit_seq import cpu_runtime


def test_compiler_options_only_on_cpu():
    assert cpu_runtime.compiler_options("cpu") == cpu_runtime.CPU_COMPILER_OPTIONS
    assert cpu_runtime.compiler_options("gpu") == {}
    assert cpu_runtime.compiler_options("tpu") == {}


def test_options_keep_the_reductions_out_of_ynnpack_and_the_numbers_the_same():
    def softmax_of_matmul(x):
        return jax.nn.softmax(x @ x.T, axis=-1)  # one dot, then reductions + elementwise

    x = jax.random.normal(jax.random.key(0), (64, 32))
    default = jax.jit(softmax_of_matmul).lower(x).compile()
    tuned = jax.jit(softmax_of_matmul, compiler_options=cpu_runtime.compiler_options("cpu"))
    tuned = tuned.lower(x).compile()
    # The default hands the dot and the softmax to YNNPACK; the option keeps only the dot there.
    assert default.as_text().count('"kind":"__ynn_fusion"') == 2
    assert tuned.as_text().count('"kind":"__ynn_fusion"') == 1
    np.testing.assert_allclose(tuned(x), default(x), rtol=1e-6, atol=1e-7)


def number_printed_by(script: str, mode: str) -> float:
    """Runs `script` with argument `mode` in a fresh Python (process-wide settings stay there)."""
    result = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return float(result.stdout)


RSS_AFTER_FREE = textwrap.dedent(
    """
    import ctypes, sys
    from navit_seq import cpu_runtime
    if sys.argv[1] == "keep":
        assert cpu_runtime.keep_freed_memory()
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    def rss_mib():
        return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
    size = 256 * 2**20
    block = libc.malloc(ctypes.c_size_t(size))
    ctypes.memset(block, 1, size)  # fault every page in
    before = rss_mib()
    libc.free(ctypes.c_void_p(block))
    print(before - rss_mib())  # MiB given back to the OS by free()
    """
)


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only"
)
def test_keep_freed_memory_keeps_a_freed_large_block_for_reuse():
    assert number_printed_by(RSS_AFTER_FREE, "default") > 200  # glibc munmaps 256 MiB at free()
    assert number_printed_by(RSS_AFTER_FREE, "keep") < 1  # kept: the next step reuses the pages


def test_keep_freed_memory_says_when_it_cannot(monkeypatch):
    monkeypatch.setattr(platform, "system", lambda: "Darwin")
    assert cpu_runtime.keep_freed_memory() is False


def test_prepare_process_for_training_leaves_other_backends_alone(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu_runtime, "keep_freed_memory", lambda: calls.append(1) or True)
    monkeypatch.setattr(cpu_runtime, "synchronous_cpu_dispatch", lambda: None)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert cpu_runtime.prepare_process_for_training() == ""
    assert calls == []
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    assert "glibc keeps freed memory" in cpu_runtime.prepare_process_for_training()
    assert calls == [1]


DISPATCH_SHARE = textwrap.dedent(
    """
    import sys, time
    import jax, jax.numpy as jnp
    from navit_seq import cpu_runtime
    if sys.argv[1] == "sync":
        cpu_runtime.synchronous_cpu_dispatch()
    power = jax.jit(lambda x: jnp.linalg.matrix_power(x, 40))  # ~0.1 s of matmuls
    x = jnp.ones((1000, 1000)) / 1000
    power(x).block_until_ready()
    start = time.perf_counter()
    y = power(x)
    dispatched = time.perf_counter() - start
    y.block_until_ready()
    print(dispatched / (time.perf_counter() - start))  # share of the run spent in the call
    """
)


def test_synchronous_cpu_dispatch_returns_only_when_the_computation_is_done():
    assert number_printed_by(DISPATCH_SHARE, "async") < 0.5  # returns before the work is done
    assert number_printed_by(DISPATCH_SHARE, "sync") > 0.9


def test_synchronous_cpu_dispatch_warns_when_called_too_late(caplog):
    jnp.zeros(2).block_until_ready()  # the backend exists in this test process
    cpu_runtime.synchronous_cpu_dispatch()
    assert "call it before the first JAX computation" in caplog.text
    jax.config.update("jax_cpu_enable_async_dispatch", True)  # leave the process's config


def test_jitted_step_with_the_options_matches_the_default_step():
    # A small transformer-like step (matmul, layer norm, GELU, softmax) and its gradient.
    def loss(w, x):
        h = jax.nn.gelu(x @ w)
        h = (h - h.mean(-1, keepdims=True)) / jnp.sqrt(h.var(-1, keepdims=True) + 1e-6)
        return jnp.sum(jax.nn.log_softmax(h @ w.T, axis=-1) ** 2)

    w = jax.random.normal(jax.random.key(1), (16, 48)) / 4
    x = jax.random.normal(jax.random.key(2), (40, 16))
    step = jax.value_and_grad(loss)
    tuned = jax.jit(step, compiler_options=cpu_runtime.compiler_options("cpu"))(w, x)
    default = jax.jit(step)(w, x)
    np.testing.assert_allclose(tuned[0], default[0], rtol=1e-5)
    np.testing.assert_allclose(tuned[1], default[1], rtol=1e-4, atol=1e-6)
