"""Learning curves: one run, or many runs grouped by (env, algo) with a confidence band."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from natgrad.rl._errors import ConfigError, MissingExtraError
from natgrad.rl.checkpoint import writable_file, write_output
from natgrad.rl.logger import PROGRESS_NAME, read_progress

__all__ = ["load_curve", "plot_runs"]


def _figure() -> Any:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise MissingExtraError("plotting", "rl", "matplotlib") from error
    # A bare Figure with the Agg canvas: no pyplot, no global backend switch, no display.
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def load_curve(run_dir: str | Path, y: str = "episodic_return_mean") -> tuple[np.ndarray, ...]:
    """Return ``(steps, values)`` of a run's ``progress.csv``, NaN rows dropped."""
    path = Path(run_dir) / PROGRESS_NAME
    if not path.exists():
        raise ConfigError(f"{run_dir} has no {PROGRESS_NAME}; is it a `natgrad train` output dir?")
    rows = read_progress(path)
    if rows and y not in rows[0]:
        raise ConfigError(
            f"--y {y!r} is not a column of {path}; choose one of {', '.join(rows[0])}"
        )
    steps = np.array([r["step"] for r in rows])
    values = np.array([r.get(y, math.nan) for r in rows])
    keep = np.isfinite(values)
    return steps[keep], values[keep]


def _label(run_dir: Path) -> str:
    config = run_dir / "config.json"
    if config.exists():
        data = json.loads(config.read_text())
        return f"{data.get('env', '?')} / {data.get('algo', '?')}"
    return run_dir.name


def plot_runs(
    run_dirs: Sequence[str | Path],
    out: str | Path,
    y: str = "episodic_return_mean",
    title: str | None = None,
    labels: Sequence[str] | None = None,
    flag: str = "--out",
) -> Path:
    """Overlay runs; runs with the same env and algo are one curve with a 95% band.

    Each group's curves are interpolated onto a common step grid (up to the shortest run
    in the group); the band is ``mean +- 1.96 * standard error`` across seeds.

    Parameters
    ----------
    run_dirs
        Output directories of ``natgrad train``.
    out
        PNG path to write.
    y
        Column of ``progress.csv`` to plot.
    title
        Figure title (default: the column name).
    labels
        One curve label per run directory (runs with the same label are one curve);
        default: ``env / algo`` of each run's ``config.json``, else the folder name.
    flag
        How errors name ``out`` (the CLI flag by default).

    Returns
    -------
    Path
        ``out``.
    """
    if not run_dirs:
        raise ConfigError("plot needs at least one run directory")
    if labels is not None and len(labels) != len(run_dirs):
        raise ConfigError(f"plot got {len(labels)} labels for {len(run_dirs)} run directories")
    out = writable_file(out, flag)
    fmt = out.suffix[1:].lower()
    groups: dict[str, list[tuple[np.ndarray, np.ndarray]]] = defaultdict(list)
    for i, run in enumerate(map(Path, run_dirs)):
        steps, values = load_curve(run, y)
        if len(steps):
            groups[_label(run) if labels is None else labels[i]].append((steps, values))
    fig = _figure()
    if fmt not in fig.canvas.get_supported_filetypes():
        raise ConfigError(
            f"{flag} {str(out)!r}: unknown image format {out.suffix!r}; "
            "end it in .png, .pdf or .svg"
        )
    ax = fig.add_subplot()
    for label, curves in sorted(groups.items()):
        end = min(s[-1] for s, _ in curves)
        start = max(s[0] for s, _ in curves)
        grid = np.linspace(start, end, 200) if end > start else np.array([end])
        ys = np.stack([np.interp(grid, s, v) for s, v in curves])
        mean = ys.mean(0)
        (line,) = ax.plot(grid, mean, label=f"{label} (n={len(curves)})")
        if len(curves) > 1:
            half = 1.96 * ys.std(0, ddof=1) / math.sqrt(len(curves))
            ax.fill_between(grid, mean - half, mean + half, alpha=0.25, color=line.get_color())
    ax.set_xlabel("environment steps")
    ax.set_ylabel(y)
    ax.set_title(title or y)
    ax.grid(alpha=0.3)
    if groups:
        ax.legend(loc="best", fontsize="small")
    write_output(out, lambda handle: fig.savefig(handle, format=fmt, dpi=110), flag)
    return out
