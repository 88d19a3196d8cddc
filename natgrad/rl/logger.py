"""Run metrics: ``progress.csv`` (always) and TensorBoard events (when installed)."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

from natgrad.rl.checkpoint import atomic_write_text

__all__ = ["RunLogger", "read_progress"]

PROGRESS_NAME = "progress.csv"
# Leading columns, in this order, for every algorithm; the rest follow alphabetically.
LEADING = (
    "step",
    "iteration",
    "episodic_return_mean",
    "episodic_length_mean",
    "episodes",
    "kl",
    "kl_target",
    "entropy",
    "value_loss",
    "steps_per_sec",
    "wall_time",
)


def read_progress(path: str | Path) -> list[dict[str, float]]:
    """Read a ``progress.csv`` as a list of rows of floats (empty cells become NaN)."""
    with open(path, newline="") as handle:
        return [
            {k: float(v) if v not in ("", None) else math.nan for k, v in row.items()}
            for row in csv.DictReader(handle)
        ]


class RunLogger:
    """Append one row per update to ``progress.csv`` and, if possible, TensorBoard.

    Parameters
    ----------
    out_dir
        Run directory.
    resume_step
        When resuming, rows with ``step > resume_step`` (written after the checkpoint) are
        dropped from the CSV and purged from TensorBoard, so the log matches an
        uninterrupted run.
    tensorboard
        Write TensorBoard events when ``torch.utils.tensorboard`` is importable.
    """

    def __init__(
        self, out_dir: Path, resume_step: int | None = None, tensorboard: bool = True
    ) -> None:
        self.path = Path(out_dir) / PROGRESS_NAME
        self.fields: list[str] | None = None
        if resume_step is not None and self.path.exists():
            with open(self.path, newline="") as handle:
                reader = csv.DictReader(handle)
                self.fields = list(reader.fieldnames or [])
                rows = [r for r in reader if float(r["step"]) <= resume_step]
            self._rewrite(rows)
        elif self.path.exists():
            self.path.unlink()
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is the optional natgrad[tensorboard] extra
                SummaryWriter = None  # noqa: N806
            if SummaryWriter is not None:
                purge = None if resume_step is None else resume_step + 1
                self.writer = SummaryWriter(str(Path(out_dir) / "tb"), purge_step=purge)

    def write(self, row: dict[str, Any]) -> None:
        """Append ``row``.

        Keys no earlier row had become new columns (the file is rewritten with the wider
        header, earlier rows empty there), so no metric is ever dropped.
        """
        if self.fields is None:
            rest = sorted(k for k in row if k not in LEADING)
            self.fields = [k for k in LEADING if k in row] + rest
            with open(self.path, "w", newline="") as handle:
                csv.DictWriter(handle, self.fields).writeheader()
        elif any(k not in self.fields for k in row):
            self._widen(sorted(k for k in row if k not in self.fields))
        with open(self.path, "a", newline="") as handle:
            writer = csv.DictWriter(handle, self.fields, extrasaction="ignore")
            writer.writerow({k: _fmt(row.get(k)) for k in self.fields})
        if self.writer is not None:
            step = int(row["step"])
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    group = "charts" if key.startswith("episodic") else "train"
                    self.writer.add_scalar(f"{group}/{key}", value, step)

    def _widen(self, new: list[str]) -> None:
        """Rewrite the CSV with ``new`` columns appended to its header."""
        assert self.fields is not None
        with open(self.path, newline="") as handle:
            rows = list(csv.DictReader(handle))
        self.fields = [*self.fields, *new]
        self._rewrite(rows)

    def _rewrite(self, rows: list[dict[str, Any]]) -> None:
        """Replace the CSV by ``rows`` under the current header, atomically.

        An interruption leaves the old file whole (rows are never lost mid-rewrite).
        """
        assert self.fields is not None
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, self.fields)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(self.path, text.getvalue())

    def close(self) -> None:
        """Flush and close TensorBoard."""
        if self.writer is not None:
            self.writer.close()


def _fmt(value: Any) -> Any:
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)
    return value
