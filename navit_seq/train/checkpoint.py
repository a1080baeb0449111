"""Orbax checkpoints holding the train state and the grain iterator state together.

One checkpoint = `state` (params, optimizer state, step, RNG streams, EMA; saved asynchronously
from device memory) + `data_iter` (the grain iterator's position, one JSON file per host).
Restoring both gives the exact batch stream an uninterrupted run would have seen.
A latest checkpoint that fails to restore (corrupted, half written) is skipped with a warning and
the previous one is used. Orbax never lists a checkpoint whose write was not finalized.
"""

import logging
import signal
import threading
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """Saves every `every_steps`, keeps the last `keep` plus every `keep_every_steps`-th."""

    def __init__(
        self,
        directory: Path | str,
        *,
        every_steps: int,
        keep: int = 3,
        keep_every_steps: int | None = None,
        asynchronous: bool = True,
    ):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=1,  # the loop decides when; see `should_save`
            max_to_keep=keep,
            keep_period=keep_every_steps or None,
            enable_async_checkpointing=asynchronous,
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self.every_steps = every_steps

    def should_save(self, step: int) -> bool:
        return self.every_steps > 0 and step % self.every_steps == 0

    def save(self, step: int, state: Any, data_iterator: Any, *, force: bool = False) -> None:
        """Starts an (asynchronous) save; the iterator's position is captured right now."""
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data_iter=grain.checkpoint.CheckpointSave(data_iterator),
        )
        self.manager.save(step, args=args, force=force)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def path(self, step: int) -> str:
        return str(self.directory / str(step))

    def restore_latest(self, abstract_state: Any, data_iterator: Any) -> tuple[int, Any] | None:
        """(step, state) from the newest checkpoint that restores; None if there is none.

        `abstract_state` carries the target shardings (any mesh shape: Orbax reshards), and
        `data_iterator` is moved to the saved position in place.
        """
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                restored = self.manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state),
                        data_iter=grain.checkpoint.CheckpointRestore(data_iterator),
                    ),
                )
            except Exception as error:  # noqa: BLE001 - any failure means "not restorable"
                logging.warning(
                    "Checkpoint %s could not be restored (%s: %s); falling back to an older one.",
                    self.path(step),
                    type(error).__name__,
                    str(error).splitlines()[0][:300] if str(error) else "",
                )
                continue
            return step, restored["state"]
        return None

    def restore_state(self, step: int | None, abstract_state: Any) -> tuple[int, Any]:
        """Only the train state (evaluation/export need no data iterator)."""
        saved = sorted(self.manager.all_steps(), reverse=True)
        if not saved:
            raise FileNotFoundError(
                f"No checkpoint in {self.directory}; train there first (`python -m "
                f"navit_seq.main --config <recipe> --workdir {self.directory.parent}`) or pass "
                "the --workdir of a trained run."
            )
        if step is not None and step not in saved:
            raise FileNotFoundError(
                f"--step {step}: no checkpoint of that step in {self.directory}; it holds steps "
                f"{sorted(saved)} (omit --step for the latest)."
            )
        steps = [step] if step is not None else saved
        for candidate in steps:
            try:
                restored = self.manager.restore(
                    candidate,
                    args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)),
                )
                return candidate, restored["state"]
            except Exception as error:  # noqa: BLE001
                if step is not None:
                    raise
                logging.warning("Checkpoint %s unreadable (%s); trying an older one.",
                                self.path(candidate), error)  # fmt: skip
        raise FileNotFoundError(
            f"No readable checkpoint in {self.directory} (the warnings above say why); train "
            "again in a new --workdir."
        )

    def wait(self) -> None:
        """Blocks until the last asynchronous save is on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


class PreemptionFlag:
    """Set by SIGTERM; the loop checks it after every step, saves and exits cleanly."""

    def __init__(self):
        self._event = threading.Event()
        self._previous = None

    def install(self) -> "PreemptionFlag":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        logging.warning("SIGTERM received: saving a checkpoint at the current step, then exiting.")
        self._event.set()

    def is_set(self) -> bool:
        """True on every host once any host was told to stop (hosts must agree to save)."""
        local = self._event.is_set()
        if jax.process_count() == 1:
            return local
        from jax.experimental import multihost_utils

        return bool(multihost_utils.process_allgather(local).any())

    def uninstall(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
