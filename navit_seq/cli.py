"""What every command line shares: one-line errors, a `--help` that lists the command's flags
and exits 0, progress lines with `--quiet` to silence them, and JAX's persistent compilation
cache.

Expected errors (bad config, missing dataset, bad data, incompatible workdir, missing
checkpoint: `ValueError`, `OSError` and their subclasses, `FloatingPointError` for a diverged
run) end a command with one line `error: <message>` on stderr and exit code 1; `--verbose` or
NAVIT_SEQ_DEBUG=1 prints the traceback too. Any other exception is a bug and keeps its
traceback.

Long loops (training steps, evaluation, dataset builds, a folder of predictions) report on
stderr with `Progress`: a line every PROGRESS_EVERY_S seconds with what is done, the rate and
the time left. `--quiet` or NAVIT_SEQ_QUIET=1 turns the lines off (the processes a command
starts inherit it); results and where they were written are printed regardless.
"""

import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from absl import app, flags

DEBUG_ENV = "NAVIT_SEQ_DEBUG"
QUIET_ENV = "NAVIT_SEQ_QUIET"
CACHE_ENV = "NAVIT_SEQ_COMPILATION_CACHE"
EXPECTED_ERRORS = (ValueError, OSError, FloatingPointError)
# absl defines -?, --help and --helpshort (and exits 1 after them); -h is what people type.
HELP_ARGS = ("-h", "-?", "--help", "--helpshort")
VERBOSE_HELP = f"On an error, print the traceback too (or set {DEBUG_ENV}=1)."

QUIET_HELP = f"No progress lines (done, rate, time left) on stderr; for scripts (or {QUIET_ENV}=1)."
PROGRESS_EVERY_S = 10.0  # seconds between two progress lines

VERBOSE = flags.DEFINE_bool("verbose", False, VERBOSE_HELP)
QUIET = flags.DEFINE_bool("quiet", False, QUIET_HELP)


def verbose(argv: Sequence[str]) -> bool:
    """Whether a failing command shows its traceback: `--verbose` or NAVIT_SEQ_DEBUG=1."""
    return "--verbose" in argv or os.environ.get(DEBUG_ENV, "0") not in ("", "0")


def one_line(error: BaseException) -> str:
    """The error's message on one line (its type's name if it has none)."""
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip()) or (
        type(error).__name__
    )


def quiet() -> bool:
    """Whether progress lines are off: `--quiet` (exported by `run`) or NAVIT_SEQ_QUIET=1."""
    return os.environ.get(QUIET_ENV, "0") not in ("", "0")


def run(command: Callable[[], int | None], argv: Sequence[str] | None = None) -> NoReturn:
    """Runs a command and exits with its code; an expected error exits 1 with one line.
    `--quiet` is exported to the environment, so the command's own processes stay quiet too."""
    argv = sys.argv[1:] if argv is None else argv
    if "--quiet" in argv:
        os.environ[QUIET_ENV] = "1"
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


def add_quiet_argument(parser: Any) -> None:
    """`--quiet` for an argparse command that reports progress (`run` reads it)."""
    parser.add_argument("--quiet", action="store_true", help=QUIET_HELP)


def format_duration(seconds: float) -> str:
    """A duration as 45s, 3m05s or 2h04m."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def progress_line(
    what: str, done: int, total: int | None, unit: str, rate: float | None, elapsed: float
) -> str:
    """`train: 120/300 steps (40%), 1.52 steps/s, 1m19s elapsed, ETA 1m58s`; without a rate
    (not measured yet) no rate and no ETA, without a total only the count, once done no ETA."""
    parts = [f"{done}/{total} {unit} ({100 * done / total:.0f}%)" if total else f"{done} {unit}"]
    if rate:
        parts.append(f"{rate:.3g} {unit}/s")
    parts.append(f"{format_duration(elapsed)} elapsed")
    if rate and total and done < total:
        parts.append(f"ETA {format_duration((total - done) / rate)}")
    return f"{what}: {', '.join(parts)}"


class Progress:
    """A loop's progress on stderr: a `progress_line` at the first `update` at least `every_s`
    seconds after the last line (or the start), and one more at `close` for the end if any was
    printed, so work shorter than `every_s` prints nothing. The rate is timed from the first
    update, so what comes before it (compilation) does not count. Silent when `quiet()`."""

    def __init__(
        self,
        what: str,
        total: int | None = None,
        unit: str = "steps",
        every_s: float = PROGRESS_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.what, self.total, self.unit, self.every_s = what, total, unit, every_s
        self.enabled = not quiet()
        self._clock = clock
        self._started = self._last_line = clock()
        self._first: tuple[float, int] | None = None  # (time, count) at the first update
        self._done, self._shown = 0, None  # the count now, and in the last line printed

    def update(self, done: int) -> None:
        """`done` units are finished (a count since the start, not an increment)."""
        now = self._clock()
        if self._first is None:
            self._first = (now, done)
        self._done = done
        if self.enabled and now - self._last_line >= self.every_s:
            self._print(now)

    def close(self) -> None:
        """The final line, if any line was printed and the count moved since."""
        if self.enabled and self._shown is not None and self._shown != self._done:
            self._print(self._clock())

    def _print(self, now: float) -> None:
        first_time, first_done = self._first or (now, self._done)
        timed = now - first_time
        rate = (self._done - first_done) / timed if timed > 0 and self._done > first_done else None
        line = progress_line(
            self.what, self._done, self.total, self.unit, rate, now - self._started
        )
        print(line, file=sys.stderr, flush=True)
        self._last_line, self._shown = now, self._done


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
