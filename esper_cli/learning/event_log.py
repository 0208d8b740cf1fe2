"""TensorBoard curves of a learning run (`--tensorboard DIR` on train, improve and dagger).

Real event files, written with torch's `SummaryWriter`; one step per epoch, update or round. A
resumed run opens the same folder with `purge_step` = the first step it will write again, so
TensorBoard drops whatever a killed run had logged past its last saved state: every step appears
once, and the curves continue where the state does. TensorBoard is an optional extra.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

TENSORBOARD_INSTALL_HINT = 'pip install "simic[tensorboard]"'


class TensorBoardUnavailable(Exception):
    """`--tensorboard` was asked for but the tensorboard package is not installed."""


def check_tensorboard() -> None:
    """Raise `TensorBoardUnavailable` (one line, with the install hint) unless TensorBoard is installed."""
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None:
        raise TensorBoardUnavailable(f"--tensorboard needs TensorBoard, which is not installed; "
                                     f"install the extra: {TENSORBOARD_INSTALL_HINT}")


class EventLog:
    """Scalars for TensorBoard under `log_dir`; `resume_from` = the first step this run writes."""

    def __init__(self, log_dir: Path, resume_from: int | None = None) -> None:
        check_tensorboard()
        from torch.utils.tensorboard import SummaryWriter

        log_dir.mkdir(parents=True, exist_ok=True)
        self._writer = SummaryWriter(log_dir=str(log_dir), purge_step=resume_from)

    def scalars(self, step: int, values: Mapping[str, Any]) -> None:
        """One step of every curve in `values` (name -> number); None and non-numbers are skipped."""
        for name, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self._writer.add_scalar(name, float(value), global_step=step)
        self._writer.flush()  # a kill loses nothing already logged

    def close(self) -> None:
        self._writer.close()

    def __enter__(self) -> EventLog:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()


def read_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar curve under `log_dir`, as TensorBoard's own `EventAccumulator` reads it back:
    tag -> [(step, value), ...] in step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
