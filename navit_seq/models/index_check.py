"""A table lookup's index check that works eagerly and under jit.

Learned tables (positions, token embeddings) must never be read out of range silently. Eagerly
the check raises at once; under jit it runs as a host callback whose error surfaces when the
step's results are read. The callback receives only the reduced maximum as a numpy value, and
its static arguments are bound with `functools.partial` (passing them through
`jax.debug.callback` would turn them into JAX arrays, and a JAX op inside a callback can
deadlock the CPU client: jax-ml/jax#25861).
"""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np


def _raise_if_at_least(largest, *, limit: int, message: Callable[[int], str]) -> None:
    largest = int(np.asarray(largest))
    if largest >= limit:
        raise ValueError(message(largest))


def check_index_below(values: jax.Array, limit: int, message: Callable[[int], str]) -> None:
    """Raises ValueError(message(largest)) when any of `values` is >= `limit`."""
    largest = jnp.max(values)
    check = functools.partial(_raise_if_at_least, limit=limit, message=message)
    if isinstance(largest, jax.core.Tracer):
        jax.debug.callback(check, largest)
    else:
        check(largest)
