"""Plots of a replay report (matplotlib, Agg backend, PNG files): one line per run.

- ``accuracy.png``: rolling accuracy over the stream
- ``exit_cost.png``: rolling mean exit and rolling mean cost over the stream
- ``group_cost.png``: rolling mean cost per class group (labelled Fashion-MNIST bags; left out
  when no label matches a frame)
- ``exit_histogram.png``: answers per exit
- ``latency.png``: distribution of model latency and of end-to-end latency
- ``threshold_curve.png``: accuracy vs mean latency / mean cost, one point per threshold
  (without labels: mean latency and mean cost vs threshold)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ttspec_ros.files import save_figure

# Every file these functions may write; the ones a report does not list are not drawn for it.
PLOT_FILES = ("accuracy.png", "exit_cost.png", "group_cost.png", "exit_histogram.png",
              "latency.png", "threshold_curve.png")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def rolling_mean(x: Sequence[int], values: Sequence[float], window: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """At each point (frame index x), the mean of the values whose frame lies in the last
    ``window`` frames, so sparse series (a rare class group) are averaged over the same span
    of the stream as dense ones."""
    frames = np.asarray(x, dtype=np.int64)
    vals = np.asarray(values, dtype=np.float64)
    if vals.size == 0:
        return frames, vals
    csum = np.concatenate([[0.0], np.cumsum(vals)])
    hi = np.arange(1, vals.size + 1)
    lo = np.searchsorted(frames, frames - window + 1, side="left")
    return frames, (csum[hi] - csum[lo]) / (hi - lo)


def _save(fig, path: Path) -> Path:
    return save_figure(fig, path, dpi=110, bbox_inches="tight")


def _switch_line(ax, switch: int | None) -> None:
    if switch:
        ax.axvline(switch, color="grey", linestyle="--", linewidth=1, label="class-mix switch")


def stream_plots(out_dir: Path, results: Sequence, exit_cost: Sequence[float] | None, *,
                 num_exits: int, window: int, switch: int | None = None,
                 groups: Mapping[str, Sequence[int]] | None = None) -> list[Path]:
    plt = _pyplot()
    paths: list[Path] = []
    roll = max(1, window // 2)

    def answered(result):
        return [o for o in result.outcomes if o.answered]

    # accuracy
    fig, ax = plt.subplots(figsize=(8, 3.5))
    any_label = False
    for r in results:
        rows = [o for o in answered(r) if o.label is not None]
        if not rows:
            continue
        any_label = True
        x, y = rolling_mean([o.index for o in rows], [o.class_id == o.label for o in rows], roll)
        ax.plot(x, 100 * y, label=r.settings.name)
    if any_label:
        _switch_line(ax, switch)
        ax.set(xlabel="frame", ylabel=f"accuracy % (rolling {roll})",
               title="Accuracy over the stream")
        ax.legend()
        ax.grid(alpha=0.3)
        paths.append(_save(fig, out_dir / "accuracy.png"))
    plt.close(fig)

    # mean exit and mean cost
    fig, axes = plt.subplots(2, 1, figsize=(8, 5.5), sharex=True)
    for r in results:
        rows = answered(r)
        indices = [o.index for o in rows]
        axes[0].plot(*rolling_mean(indices, [o.exit_index for o in rows], roll),
                     label=r.settings.name)
        if exit_cost:
            axes[1].plot(*rolling_mean(indices, [exit_cost[o.exit_index] for o in rows], roll),
                         label=r.settings.name)
    axes[0].set(ylabel=f"mean exit (rolling {roll})",
                title="Exit depth and compute over the stream")
    axes[1].set(xlabel="frame", ylabel="mean cost (full model = 1)")
    for ax in axes:
        _switch_line(ax, switch)
        ax.grid(alpha=0.3)
        ax.legend()
    paths.append(_save(fig, out_dir / "exit_cost.png"))
    plt.close(fig)

    # cost per class group
    if groups and exit_cost:
        fig, ax = plt.subplots(figsize=(8, 3.5))
        styles = ["-", "--", ":", "-."]
        drawn = False
        for k, r in enumerate(results):
            for g, (name, classes) in enumerate(groups.items()):
                rows = [o for o in answered(r) if o.label in classes]
                if not rows:
                    continue
                costs = [exit_cost[o.exit_index] for o in rows]
                x, y = rolling_mean([o.index for o in rows], costs, roll)
                ax.plot(x, y, linestyle=styles[k % len(styles)], color=f"C{g}",
                        label=f"{name}, {r.settings.name}")
                drawn = True
        if drawn:  # labels that match no frame leave nothing to draw
            _switch_line(ax, switch)
            ax.set(xlabel="frame", ylabel="mean cost", title="Compute per class group (rolling)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, ncol=2)
            paths.append(_save(fig, out_dir / "group_cost.png"))
        plt.close(fig)

    # exit histogram
    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.8 / max(1, len(results))
    for k, r in enumerate(results):
        counts = np.bincount([o.exit_index for o in answered(r)], minlength=num_exits)[:num_exits]
        ax.bar(np.arange(num_exits) + k * width, counts, width, label=r.settings.name)
    ax.set(xlabel="exit", ylabel="frames", title="Answering exit")
    ax.set_xticks(np.arange(num_exits) + width * (len(results) - 1) / 2, range(num_exits))
    ax.legend()
    paths.append(_save(fig, out_dir / "exit_histogram.png"))
    plt.close(fig)

    # latency distribution
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for r in results:
        model = [o.latency_ms for o in answered(r) if o.latency_ms is not None]
        e2e = [o.e2e_ms for o in answered(r) if o.e2e_ms is not None]
        if model:
            axes[0].hist(model, bins=50, alpha=0.5, label=r.settings.name)
        if e2e:
            axes[1].hist(e2e, bins=50, alpha=0.5, label=r.settings.name)
    axes[0].set(xlabel="model latency ms", ylabel="frames", title="Classifier model time")
    axes[1].set(xlabel="end-to-end latency ms", title="Published -> prediction received")
    for ax in axes:
        ax.legend()
    paths.append(_save(fig, out_dir / "latency.png"))
    plt.close(fig)
    return paths


def threshold_curve(out_dir: Path, runs: Sequence[dict]) -> Path:
    """One point per threshold, one line per adapt mode: accuracy against mean latency and
    mean cost; on a bag without labels (no accuracy), mean latency and mean cost against the
    threshold, which is what tuning thresholds on an unlabelled recording can go by."""
    plt = _pyplot()
    labelled = any(r["accuracy"] is not None for r in runs)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for adapt in (True, False):
        # with labels every run is a point; without, only runs with a threshold to plot at
        rows = sorted((r for r in runs if r["adapt"] == adapt and (
            r["accuracy"] is not None if labelled else r["threshold"] is not None)),
            key=lambda r: r["threshold"] if r["threshold"] is not None else -1)
        if not rows:
            continue
        label = "adaptation on" if adapt else "adaptation off"
        for ax, key in zip(axes, ("mean_latency_ms", "mean_cost"), strict=True):
            if labelled:
                xs = [r[key] for r in rows]
                ys = [100 * r["accuracy"] for r in rows]
                ax.plot(xs, ys, marker="o", label=label)
                for r, x, y in zip(rows, xs, ys, strict=True):
                    ax.annotate(f"{r['threshold']:g}" if r["threshold"] is not None
                                else "default", (x, y), textcoords="offset points",
                                xytext=(4, 4), fontsize=7)
            else:
                ax.plot([r["threshold"] for r in rows], [r[key] for r in rows], marker="o",
                        label=label)
    if labelled:
        axes[0].set(xlabel="mean model latency ms", ylabel="accuracy %",
                    title="Threshold sweep: accuracy vs latency")
        axes[1].set(xlabel="mean cost (full model = 1)", title="accuracy vs compute")
    else:
        axes[0].set(xlabel="threshold", ylabel="mean model latency ms",
                    title="Threshold sweep (no labels): latency")
        axes[1].set(xlabel="threshold", ylabel="mean cost (full model = 1)",
                    title="compute")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    path = _save(fig, out_dir / "threshold_curve.png")
    plt.close(fig)
    return path
