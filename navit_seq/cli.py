"""What every command line shares: one-line errors, a `--help` that lists the command's flags
and exits 0, and JAX's persistent compilation cache.

Expected errors (bad config, missing dataset, bad data, incompatible workdir, missing
checkpoint: `ValueError`, `OSError` and their subclasses, `FloatingPointError` for a diverged
run) end a command with one line `error: <message>` on stderr and exit code 1; `--verbose` or
NAVIT_SEQ_DEBUG=1 prints the traceback too. Any other exception is a bug and keeps its
traceback.
"""

import os
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from absl import app, flags

DEBUG_ENV = "NAVIT_SEQ_DEBUG"
CACHE_ENV = "NAVIT_SEQ_COMPILATION_CACHE"
EXPECTED_ERRORS = (ValueError, OSError, FloatingPointError)
# absl defines -?, --help and --helpshort (and exits 1 after them); -h is what people type.
HELP_ARGS = ("-h", "-?", "--help", "--helpshort")
VERBOSE_HELP = f"On an error, print the traceback too (or set {DEBUG_ENV}=1)."

VERBOSE = flags.DEFINE_bool("verbose", False, VERBOSE_HELP)


def verbose(argv: Sequence[str]) -> bool:
    """Whether a failing command shows its traceback: `--verbose` or NAVIT_SEQ_DEBUG=1."""
    return "--verbose" in argv or os.environ.get(DEBUG_ENV, "0") not in ("", "0")


def one_line(error: BaseException) -> str:
    """The error's message on one line (its type's name if it has none)."""
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip()) or (
        type(error).__name__
    )


def run(command: Callable[[], int | None], argv: Sequence[str] | None = None) -> NoReturn:
    """Runs a command and exits with its code; an expected error exits 1 with one line."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        code = command()
    except EXPECTED_ERRORS as error:
        if verbose(argv):
            traceback.print_exc()
        sys.exit(f"error: {one_line(error)}")
    sys.exit(code)


def add_verbose_argument(parser: Any) -> None:
    """`--verbose` for an argparse command (`run` reads it from the command line)."""
    parser.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)


def run_absl(
    main: Callable[[list[str]], Any],
    flags_parser: Callable[[list[str]], list[str]] = app.parse_flags_with_usage,
) -> NoReturn:
    """`absl.app.run(main)` under `run`, with `-h`/`--help` printing the flags and exiting 0.

    absl's own `--help` exits 1 and lists only the key flags of the `__main__` module, so each
    command declares the flags it reads as key flags (`flags.adopt_module_key_flags`).
    """

    def parse(argv: list[str]) -> list[str]:
        own = argv[1 : argv.index("--")] if "--" in argv else argv[1:]
        if any(arg in HELP_ARGS for arg in own):
            app.usage(shorthelp=True, writeto_stdout=True, exitcode=0)
        return flags_parser(argv)

    run(lambda: app.run(main, flags_parser=parse))


def default_compilation_cache_dir() -> str:
    """$NAVIT_SEQ_COMPILATION_CACHE, else ~/.cache/navit_seq/jax ('' = no cache)."""
    return os.environ.get(CACHE_ENV, os.fspath(Path.home() / ".cache" / "navit_seq" / "jax"))


def enable_compilation_cache(path: str | os.PathLike | None) -> str | None:
    """Points JAX's persistent compilation cache at `path` (None or '': leaves it off); returns
    the folder. Every program is cached: JAX's defaults skip programs compiled in under 1 s,
    which are most of a CPU run's. Call before the first compilation."""
    if not path:
        return None
    # Imported here: the commands that never compile (data.build, quickstart) do not load JAX.
    import jax

    folder = os.fspath(Path(path).expanduser().absolute())
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)  # no size threshold
    return folder
