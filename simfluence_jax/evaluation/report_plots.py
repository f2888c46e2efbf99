"""Figures of the report (matplotlib, Agg): each function returns PNG bytes.

Colors are fixed per method label (`color_for`) so a method looks the same in every figure;
the observed ("true") trajectory is always black.
"""

from __future__ import annotations

import io
import textwrap
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np

_PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2",
            "#17becf", "#bcbd22", "#7f7f7f")
TRUE_COLOR = "#111111"
plt.rcParams.update({"font.size": 9, "axes.titlesize": 9, "legend.fontsize": 8,
                     "axes.spines.top": False, "axes.spines.right": False})


def color_for(labels: Sequence[str]) -> dict[str, str]:
  """One palette color per label, in the order given (the table's order)."""
  return {label: _PALETTE[i % len(_PALETTE)] for i, label in enumerate(labels)}


def _png(fig) -> bytes:
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
  plt.close(fig)
  return buf.getvalue()


def _title(text: str, width: int = 42, lines: int = 2) -> str:
  return "\n".join(textwrap.wrap(text, width)[:lines]) or "(no text)"


def _grid(n: int, max_cols: int, width: float, height: float):
  """(fig, axes [rows, cols]) for n panels, the unused ones blanked."""
  ncols = min(max_cols, n)
  nrows = int(np.ceil(n / ncols))
  fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows),
                           squeeze=False)
  for ax in list(axes.flat)[n:]:
    ax.axis("off")
  return fig, axes


def _shared_legend(fig, axes, per_row: int, offset: float, step: float, bottom: float):
  """One legend (the first panel's entries) under the grid, `per_row` entries a row."""
  handles, labels = axes.flat[0].get_legend_handles_labels()
  fig.legend(handles, labels, loc="lower center", ncol=min(per_row, len(labels)),
             bbox_to_anchor=(0.5, offset - step * ((len(labels) - 1) // per_row)),
             frameon=False)
  fig.tight_layout(rect=(0, bottom, 1, 1))


def _frame(ax, observed: np.ndarray) -> None:
  """y from min(0, observed) to 2x the observed maximum: off-scale simulators are clipped."""
  observed = observed[np.isfinite(observed)]
  if observed.size:
    ax.set_ylim(min(0.0, float(observed.min())), 2.0 * float(observed.max()) + 1e-6)


def trajectories(true: np.ndarray, preds: Mapping[str, np.ndarray], columns: Sequence[int],
                 titles: Sequence[str], colors: Mapping[str, str]) -> bytes:
  """Figure 1/2: per test example (column), the observed loss vs each simulator's rollout.

  true: [T+1, m] observed; preds: label -> [T+1, m]; columns: which test examples.
  The y-axis frames the observed trajectory (0 to 2x its maximum): a simulator whose rollout
  leaves that frame (e.g. unscaled influence functions) is clipped, not allowed to flatten
  every other curve.
  """
  fig, axes = _grid(len(columns), 3, 3.6, 2.6)
  steps = np.arange(true.shape[0])
  for ax, col, title in zip(axes.flat, columns, titles):
    ax.plot(steps, true[:, col], color=TRUE_COLOR, lw=2.2, label="observed")
    for label, pred in preds.items():
      ax.plot(steps, pred[:, col], color=colors[label], lw=1.3, ls="--", label=label)
    _frame(ax, true[:, col])
    ax.set_title(_title(title))
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
  _shared_legend(fig, axes, 5, -0.02, 0.03, 0.06)
  return _png(fig)


def _scatter_grid(points: Mapping[str, tuple[np.ndarray, np.ndarray, str]],
                  colors: Mapping[str, str], *, xlabel: str, ylabel: str, size: float,
                  alpha: float, zero_lines: bool, max_points: int | None = None) -> bytes:
  """Simulated (y) vs observed (x), one panel per method with the line y = x;
  label -> (observed, simulated, legend text). At most `max_points` pairs per panel (one
  fixed subsample, the same pairs in every panel)."""
  fig, axes = _grid(len(points), 4, 3.0, 3.0)
  for ax, (label, (obs, sim, text)) in zip(axes.flat, points.items()):
    idx = np.arange(obs.size)
    if max_points is not None and obs.size > max_points:
      idx = np.random.default_rng(0).choice(obs.size, max_points, replace=False)
    o, p = obs[idx], sim[idx]
    ok = np.isfinite(o) & np.isfinite(p)
    ax.scatter(o[ok], p[ok], s=size, alpha=alpha, color=colors.get(label, "#555555"),
               label=text)
    both = np.concatenate([o[ok], p[ok]]) if ok.any() else np.array([-1.0, 1.0])
    lo, hi = float(both.min()), float(both.max())
    ax.plot([lo, hi], [lo, hi], color="#888888", lw=1, label="y = x")
    if zero_lines:
      ax.axhline(0, color="#cccccc", lw=0.8)
      ax.axvline(0, color="#cccccc", lw=0.8)
    ax.set_title(_title(label, 34))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(loc="upper left", frameon=False)
  fig.tight_layout()
  return _png(fig)


def final_loss_scatter(points: Mapping[str, tuple[np.ndarray, np.ndarray, float]],
                       colors: Mapping[str, str]) -> bytes:
  """Predicted vs observed final losses, one panel per method; label -> (true, pred, rho)."""
  return _scatter_grid({k: (t, p, f"Spearman ρ = {rho:.3f}") for k, (t, p, rho)
                        in points.items()}, colors, xlabel="observed final loss",
                       ylabel="simulated final loss", size=9, alpha=0.6, zero_lines=False)


def delta_scatter(points: Mapping[str, tuple[np.ndarray, np.ndarray, str]],
                  colors: Mapping[str, str], max_points: int = 3000) -> bytes:
  """Simulated vs observed Δ final loss (edited − base), one panel per method;
  label -> (observed [N], simulated [N], legend text); at most `max_points` per panel."""
  return _scatter_grid(points, colors, xlabel="observed Δ final loss",
                       ylabel="simulated Δ", size=4, alpha=0.35, zero_lines=True,
                       max_points=max_points)


def delta_trajectories(kinds: Mapping[str, tuple[np.ndarray, Mapping[str, np.ndarray]]],
                       colors: Mapping[str, str]) -> bytes:
  """Mean Δ_t = edited − base per step, observed (black dots: recorded steps) vs simulated
  (lines), one panel per edit kind; kind -> (observed [T], {label: simulated [T]})."""
  fig, axes = _grid(len(kinds), 4, 3.2, 2.6)
  for ax, (kind, (obs, sims)) in zip(axes.flat, kinds.items()):
    ax.axhline(0, color="#cccccc", lw=0.8)
    for label, sim in sims.items():
      ax.plot(np.arange(sim.size), sim, color=colors.get(label, "#555555"), lw=1.3,
              label=label)
    ok = np.isfinite(obs)
    ax.plot(np.flatnonzero(ok), obs[ok], "o-", color=TRUE_COLOR, ms=2.5, lw=1.2,
            label="observed")
    ax.set_title(_title(kind, 40, 1))
    ax.set_xlabel("step")
    ax.set_ylabel("mean Δ loss")
  _shared_legend(fig, axes, 3, -0.03, 0.04, 0.06)
  return _png(fig)
