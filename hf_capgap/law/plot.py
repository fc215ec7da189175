"""Plots of the law and of the sweep behind it (matplotlib, imported only when a plot is drawn)."""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from hf_capgap.law.fit import CONFIDENCE, Optimum, locate_optima
from hf_capgap.law.paper import PAPER_RATIO
from hf_capgap.law.params import format_params
from hf_capgap.law.records import curves, read_records, validated_records
from hf_capgap.utils.artifacts import atomic_write_bytes

if TYPE_CHECKING:
    from hf_capgap.law.law import CapacityGapLaw


def plot_measurements(records: str | os.PathLike | Iterable[Mapping[str, Any]] | Any, path: str | os.PathLike) -> None:
    """Save the loss-vs-teacher curves alone, with each student's best teacher marked.

    What to look at when :meth:`CapacityGapLaw.fit` refuses the records (too few bracketed optima):
    the curves show where the grid needs more teachers. Same record formats as ``fit``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = validated_records(read_records(records))
    optima = locate_optima(rows)
    figure = Figure(figsize=(6.5, 5), layout="constrained")
    FigureCanvasAgg(figure)
    draw_curves(figure.subplots(), rows, optima)
    save_png(figure, path)


def plot_law(law: CapacityGapLaw, path: str | os.PathLike, *, mark: tuple[float, float] | None = None) -> None:
    """Save ``law``'s PNG: the loss curves of its records (if any) beside its line; see ``CapacityGapLaw.plot``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = 2 if law.records else 1
    figure = Figure(figsize=(6.5 * panels, 5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, panels, squeeze=False)[0]
    if law.records:
        draw_curves(axes[0], law.records, law.optima)
    _draw_line(axes[-1], law, mark)
    save_png(figure, path)


def _draw_line(axis: Any, law: CapacityGapLaw, mark: tuple[float, float] | None) -> None:
    interior = [optimum for optimum in law.optima if optimum.interior]
    if interior:
        students = np.array([optimum.student_params for optimum in interior])
        low, high = students.min() / 1.5, students.max() * 1.5
    else:
        low, high = 5e7, 5e9
    if mark is not None:
        low, high = min(low, mark[0] / 1.5), max(high, mark[0] * 1.5)
    grid = np.geomspace(low, high, 400)
    slope, intercept = law.line()
    valid = grid[slope * grid + intercept > grid]  # an affine law predicts no teacher below some size
    if valid.size:
        prediction = law.predict(valid)
        axis.plot(valid, prediction.params, color="C0", lw=2, label=f"{law.formula()} ({law.source})")
        if prediction.lo is not None:
            axis.fill_between(
                valid,
                prediction.lo,
                prediction.hi,
                color="C0",
                alpha=0.2,
                label=f"{CONFIDENCE:.0%} bootstrap band",
            )
    if interior:
        axis.plot(
            students,
            [optimum.teacher_params for optimum in interior],
            "o",
            color="black",
            label="fitted t*(s)",
        )
    if law.source != "paper":
        axis.plot(grid, PAPER_RATIO * grid, ":", color="grey", label=f"paper: t* = {PAPER_RATIO} s")
    if mark is not None:
        axis.plot(
            *mark,
            "*",
            color="red",
            ms=14,
            mec="black",
            label=f"this pair: {format_params(mark[0])} from {format_params(mark[1])}",
        )
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlabel("student parameters s")
    axis.set_ylabel("optimal teacher parameters t*")
    axis.set_title(
        "Law of capacity gap" if law.source != "paper" else "Law of capacity gap: published prior (no interval)"
    )
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=8)


def draw_curves(axis: Any, rows: Sequence[Mapping[str, Any]], optima: Sequence[Optimum]) -> None:
    """Loss vs teacher size per student, with the quadratic through each optimum's bracket."""
    from matplotlib import colormaps

    by_student = curves(rows)
    colours = colormaps["viridis"](np.linspace(0, 0.9, max(len(optima), 1)))
    for colour, optimum in zip(colours, optima, strict=True):
        teachers, losses = by_student[optimum.student_params]
        label = f"student {format_params(optimum.student_params)}"
        axis.plot(teachers, losses, "o-", color=colour, lw=1.2, ms=4, label=label)
        if optimum.interior:
            used = np.isin(teachers, optimum.points_used)
            x = np.log(teachers[used])
            coefficients = np.polyfit(x, losses[used], 2)
            grid = np.linspace(x[0], x[-1], 50)
            axis.plot(np.exp(grid), np.polyval(coefficients, grid), "--", color=colour, lw=1)
            axis.plot(optimum.teacher_params, optimum.loss, "*", color=colour, ms=14, mec="black")
        else:
            axis.plot(optimum.teacher_params, optimum.loss, "X", color="red", ms=9, mec="black")
    axis.set_xscale("log")
    axis.set_xlabel("teacher parameters")
    axis.set_ylabel("student held-out loss")
    axis.set_title("Loss vs teacher size (* fitted minimum, X excluded: edge of grid)")
    axis.title.set_fontsize(10)
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=8)


def save_png(figure: Any, path: str | os.PathLike) -> None:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    atomic_write_bytes(path, buffer.getvalue())
