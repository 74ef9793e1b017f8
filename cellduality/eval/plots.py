"""The evaluation's PNG plots: confusion matrices, PCA scatters, per-perturbation bars, reward curves.

Every plot must say what it shows and hide nothing: identical generated cells are drawn once with a
marker whose area grows with their count (a greedy model often writes the same sentence for every
prompt of a type, and 120 cells stacked on 8 points look like 8 cells), a scatter with more groups
than colours says which groups got a colour, a bar plot shows every group or says "N of M" in its
title, and curves that share a scale get their own panels so that one cannot hide another. Plots use
matplotlib's ``Figure`` directly (Agg canvas, no pyplot state): writing a report never opens a window.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from cellduality.eval.scoring import TaskResult


def _figure(n_panels: int, panel: tuple[float, float], cols: int = 3) -> tuple[Any, list[Any]]:
    from matplotlib.figure import Figure

    cols = max(1, min(cols, n_panels))
    rows = math.ceil(n_panels / cols)
    fig = Figure(figsize=(panel[0] * cols, panel[1] * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes[:n_panels]


def slug(text: str) -> str:
    """A file-name-safe version of ``text``."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "plot"


def plot_confusions(result: TaskResult, path: Path) -> Path | None:
    """Row-normalised confusion matrices, one panel per method; the last column counts invalid answers."""
    scored = [s for s in result.methods if s.confusion is not None]
    if not scored or not result.labels:
        return None
    labels = result.labels
    size = max(3.2, 0.35 * len(labels) + 2.0)
    fig, axes = _figure(len(scored), (size + 0.6, size))
    for ax, score in zip(axes, scored, strict=True):
        counts = np.asarray(score.confusion, dtype=float)
        totals = counts.sum(axis=1, keepdims=True)
        frac = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
        image = ax.imshow(frac, vmin=0, vmax=1, cmap="Blues", aspect="auto")
        ax.set_title(score.name, fontsize=9)
        ax.set_xticks(range(len(labels) + 1), [*labels, "(invalid)"], rotation=90, fontsize=7)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.set_xlabel("predicted", fontsize=8)
        ax.set_ylabel("true", fontsize=8)
        if len(labels) <= 12:
            for (i, j), c in np.ndenumerate(counts):
                if c:
                    color = "white" if frac[i, j] > 0.5 else "black"
                    ax.text(j, i, str(int(c)), ha="center", va="center", fontsize=6, color=color)
    fig.colorbar(image, ax=axes, shrink=0.6, label="share of the true class")
    fig.savefig(path, dpi=110)
    return path


def stack_identical(points: np.ndarray, decimals: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """Distinct points (rounded to ``decimals``) and how many input points fall on each."""
    pts = np.asarray(points, dtype=float).reshape(-1, 2)
    if pts.shape[0] == 0:
        return pts, np.zeros(0, dtype=np.int64)
    unique, inverse, counts = np.unique(
        np.round(pts, decimals), axis=0, return_inverse=True, return_counts=True
    )
    first = np.full(unique.shape[0], -1, dtype=np.int64)
    for i, u in enumerate(np.asarray(inverse).ravel()):
        if first[u] < 0:
            first[u] = i
    return pts[first], counts


def coloured_groups(labels: Sequence[str], max_legend: int) -> list[str]:
    """The groups that get their own colour: all of them, or the ``max_legend`` with most cells."""
    counts: dict[str, int] = {}
    for lab in labels:
        counts[lab] = counts.get(lab, 0) + 1
    order = sorted(counts, key=lambda g: (-counts[g], g))
    return sorted(order[:max_legend])


def plot_pca(result: TaskResult, path: Path, max_legend: int = 12) -> Path | None:
    """Generated cells over the real ones in PCA (see :func:`pca_figure`), saved to ``path``."""
    fig = pca_figure(result, max_legend)
    if fig is None:
        return None
    fig.savefig(path, dpi=110)
    return path


def pca_figure(result: TaskResult, max_legend: int = 12) -> Any:
    """Generated cells over the real ones in the first two principal components of the real cells.

    Identical generated cells are drawn once, marker area proportional to their count and the count
    written next to it; the title gives cells and distinct positions. With more groups than
    ``max_legend``, the groups with most real cells get a colour and a legend entry, the others share
    one dark grey marked "other", and the title says so.
    """
    if result.reference_points is None or result.reference_points.shape[0] == 0:
        return None
    panels = [s for s in result.methods if s.kind == "model" and s.points is not None]
    if not panels:
        return None
    from matplotlib import colormaps

    ref = result.reference_points
    all_groups = sorted(set(result.reference_labels or []))
    shown = coloured_groups(list(result.reference_labels or []), max_legend)
    cmap = colormaps["tab20" if len(shown) > 10 else "tab10"]
    color = {c: cmap(i % cmap.N) for i, c in enumerate(shown)}
    other = f"other ({len(all_groups) - len(shown)} groups)"
    fig, axes = _figure(len(panels), (5.6, 4.0), cols=2)
    for ax, score in zip(axes, panels, strict=True):
        ax.scatter(ref[:, 0], ref[:, 1], s=8, c="lightgrey", label="real cells", linewidths=0)
        pts = score.points if score.points is not None else np.zeros((0, 2))
        labels = np.asarray(score.point_labels or [], dtype=object)
        n_distinct = 0
        for cls in [*shown, other]:
            mask = ~np.isin(labels, shown) if cls == other else labels == cls
            if not mask.any():
                continue
            where, counts = stack_identical(pts[mask])
            n_distinct += where.shape[0]
            ax.scatter(
                where[:, 0],
                where[:, 1],
                s=14 * counts,
                color="dimgrey" if cls == other else color[cls],
                alpha=0.75,
                edgecolors="black",
                linewidths=0.3,
                label=f"{cls} ({int(mask.sum())})",
            )
            for (x, y), c in zip(where, counts, strict=True):
                if c > 1:
                    ax.annotate(f"×{c}", (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        if pts.shape[0] == 0:
            ax.text(0.5, 0.5, "no valid generated cell", transform=ax.transAxes, ha="center", va="center")
        title = f"{score.name}: {pts.shape[0]} generated cells at {n_distinct} distinct positions"
        if n_distinct < pts.shape[0]:
            title += "\n(identical cells drawn once: marker area ∝ count, ×n = count)"
        if len(shown) < len(all_groups):
            title += f"\ncolour: the {len(shown)} largest of {len(all_groups)} groups"
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("PC1 (of the real cells)", fontsize=8)
        ax.set_ylabel("PC2", fontsize=8)
        legend = ax.legend(
            fontsize=6,
            loc="upper left",
            bbox_to_anchor=(1.01, 1.0),
            borderaxespad=0,
            title="generated (cells)",
        )
        legend.get_title().set_fontsize(6)
        for handle in legend.legend_handles:  # legend markers at one size, whatever the counts
            if hasattr(handle, "set_sizes"):
                handle.set_sizes([20])
    return fig


def plot_pearson_delta(result: TaskResult, path: Path, limit: int | None = None) -> Path | None:
    """Per-perturbation Pearson Δ bars (see :func:`pearson_delta_figure`), saved to ``path``."""
    fig = pearson_delta_figure(result, limit)
    if fig is None:
        return None
    fig.savefig(path, dpi=110)
    return path


def pearson_delta_figure(result: TaskResult, limit: int | None = None) -> Any:
    """Per-perturbation Pearson Δ (all genes), one bar per method; missing bars are unmeasurable.

    Every group is shown by default; with ``limit`` below the number of groups, the title says
    "first N of M" so no group disappears silently. Reference rows (real cells' split-half agreement)
    are drawn as black ticks, not bars: they are not methods.
    """
    all_groups = list(result.info.get("perturbations") or [])
    groups = all_groups[:limit] if limit is not None else all_groups
    methods = [s for s in result.methods if s.per_condition and s.kind not in ("reference", "ceiling")]
    refs = [s for s in result.methods if s.per_condition and s.kind in ("reference", "ceiling")]
    if not groups or not methods:
        return None
    from matplotlib.figure import Figure

    height = 1.8 + len(groups) * (0.1 + 0.06 * len(methods))
    fig = Figure(figsize=(8.0, height), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / len(methods)
    y = np.arange(len(groups))
    for k, score in enumerate(methods):
        values = [score.per_condition.get(g, {}).get("pearson_delta", float("nan")) for g in groups]
        ax.barh(
            y + k * width - 0.4 + width / 2, np.nan_to_num(values, nan=0.0), height=width, label=score.name
        )
    for ref, marker in zip(refs, ("|", "x", "+"), strict=False):
        values = [ref.per_condition.get(g, {}).get("pearson_delta", float("nan")) for g in groups]
        ax.scatter(values, y, marker=marker, s=120, color="black", label=f"{ref.name} ({ref.kind})", zorder=3)
    ax.axvline(0, color="grey", linewidth=0.8)
    ax.set_yticks(y, groups, fontsize=7)
    ax.set_ylim(len(groups) - 0.5, -0.5)
    shown = (
        f"all {len(groups)}"
        if len(groups) == len(all_groups)
        else f"first {len(groups)} of {len(all_groups)}"
    )
    ax.set_title(f"Pearson Δ per perturbation ({shown} perturbations)", fontsize=9)
    ax.set_xlabel("Pearson Δ, all genes ↑ (missing bar = not measurable)")
    ax.legend(fontsize=7, loc="lower left", bbox_to_anchor=(0.0, 1.02), ncols=3, borderaxespad=0)
    return fig


def plot_reward_curves(
    curves: Mapping[str, Sequence[tuple[int, float]]],
    path: Path,
    title: str = "Self-supervised dual reward during GRPO",
    ylabel: str = "dual reward (batch mean)",
) -> Path:
    """One panel per curve (small multiples, shared axes), saved to ``path``; see :func:`reward_figure`."""
    reward_figure(curves, title, ylabel).savefig(path, dpi=120)
    return path


def reward_figure(
    curves: Mapping[str, Sequence[tuple[int, float]]],
    title: str = "Self-supervised dual reward during GRPO",
    ylabel: str = "dual reward (batch mean)",
) -> Any:
    """One panel per curve (small multiples, shared axes): raw values as dots and a running mean.

    Curves in one axes hid each other where they overlapped (two tasks at the same reward); separate
    panels on the same scale keep every curve visible and still comparable.
    """
    names = sorted(curves)
    fig, axes = _figure(max(1, len(names)), (3.4, 2.6), cols=min(3, max(1, len(names))))
    for ax in axes[1:]:
        ax.sharex(axes[0])
        ax.sharey(axes[0])
    if not names:
        axes[0].text(0.5, 0.5, "no reward was logged", transform=axes[0].transAxes, ha="center")
    for ax, name in zip(axes, names, strict=False):
        points = list(curves[name])
        steps = np.array([s for s, _ in points], dtype=float)
        values = np.array([v for _, v in points], dtype=float)
        ax.scatter(steps, values, s=10, alpha=0.4, color="tab:blue", linewidths=0)
        if values.size:
            window = max(1, values.size // 6)
            smooth = np.convolve(values, np.ones(window) / window, mode="valid")
            ax.plot(steps[window - 1 :], smooth, color="tab:blue", linewidth=1.6)
        ax.set_title(f"{name} ({values.size} steps)", fontsize=9)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("GRPO step", fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{title}: dots per step, line = running mean", fontsize=10)
    return fig


def write_plots(tasks: Mapping[str, TaskResult], out: Path) -> dict[str, list[str]]:
    """Every plot the report embeds, as paths relative to ``out``."""
    folder = out / "plots"
    folder.mkdir(parents=True, exist_ok=True)
    made: dict[str, list[str]] = {}
    for name, result in tasks.items():
        paths: list[Path | None] = []
        if result.labels:
            paths.append(plot_confusions(result, folder / f"confusion_{slug(name)}.png"))
        if name in ("generation", "perturbation"):
            paths.append(plot_pca(result, folder / f"pca_{slug(name)}.png"))
        if name == "perturbation":
            paths.append(plot_pearson_delta(result, folder / "pearson_delta_per_perturbation.png"))
        if name == "neighbourhood":
            paths.append(plot_pearson_delta(result, folder / "pearson_delta_per_target_neighbourhood.png"))
        made[name] = [str(p.relative_to(out)) for p in paths if p is not None]
    return made


__all__ = [
    "coloured_groups",
    "pca_figure",
    "pearson_delta_figure",
    "plot_confusions",
    "plot_pca",
    "plot_pearson_delta",
    "plot_reward_curves",
    "reward_figure",
    "stack_identical",
    "write_plots",
]
