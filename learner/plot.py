"""A one-page PNG of a run from its metrics.jsonl: reward, KL, throughput and held-out evaluation per step.

    python -m learner.plot runs/x/metrics.jsonl runs/x/training.png

Drawn with matplotlib's Agg canvas directly (no pyplot, no display, no global backend change),
so it works on headless machines and inside the learner process.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path

log = logging.getLogger(__name__)


def read_metrics(path: str | Path) -> list[dict]:
    """The step records of a metrics.jsonl; blank or half-written lines (a crash) are skipped."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    records.sort(key=lambda r: r["step"])
    return records


def rolling_mean(values: list[float], window: int) -> list[float]:
    """Trailing mean over the last `window` finite values (fewer at the start; NaN if none)."""
    out = []
    for i in range(len(values)):
        finite = [v for v in values[max(0, i - window + 1): i + 1] if math.isfinite(v)]
        out.append(sum(finite) / len(finite) if finite else math.nan)
    return out


def plot_run(metrics_jsonl_path: str | Path, out_png: str | Path, window: int | None = None) -> Path | None:
    """Draw reward_mean (with a rolling mean), kl_ref and kl_behaviour, tokens_per_s and completions
    (`sequences`) per step into `out_png`, and, when the run evaluated, eval/reward_mean and eval/pass@k
    against the weight version evaluated. Returns its path, or None (with a warning) when there are
    no metrics to draw. `window`: rolling-mean width in steps (default: about a twentieth of the run)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(metrics_jsonl_path)
    records = read_metrics(path) if path.exists() else []
    if not records:
        log.warning("no metrics in %s: %s not drawn", path, out_png)
        return None
    steps = [r["step"] for r in records]

    def series(key: str) -> list[float] | None:
        if not any(key in r for r in records):
            return None
        return [float(v) if isinstance(v := r.get(key), (int, float)) else math.nan
                for r in records]

    evaluations = [r for r in records if "eval/step" in r]
    trained = sum(any(not k.startswith("eval/") for k in r if k not in ("step", "time_s")) for r in records)
    panels = 4 if evaluations else 3
    fig = Figure(figsize=(8, 3 * panels), layout="constrained")
    FigureCanvasAgg(fig)
    ax_reward, ax_kl, ax_speed, *ax_eval = fig.subplots(panels, 1, sharex=True)
    fig.suptitle(f"{path.parent.name or path.name}: {trained} steps")

    reward = series("reward_mean")
    if reward is not None:
        width = window or max(1, min(50, len(records) // 20))
        ax_reward.plot(steps, reward, color="tab:blue", alpha=0.35, linewidth=1, label="reward_mean")
        ax_reward.plot(steps, rolling_mean(reward, width), color="tab:blue", linewidth=2,
                       label=f"rolling mean ({width} steps)")
    _finish(ax_reward, "reward", reward is not None)

    # The two KLs differ by orders of magnitude: kl_behaviour (vLLM vs learner, near 0) gets its own axis.
    _two_axes(ax_kl, steps, (series("kl_ref"), "kl_ref", "kl_ref", "tab:red"),
              (series("kl_behaviour"), "kl_behaviour", "kl_behaviour", "tab:purple"))
    _two_axes(ax_speed, steps, (series("tokens_per_s"), "tokens_per_s", "tokens / s", "tab:green"),
              (series("sequences"), "completions per step", "completions per step", "tab:orange"))
    if evaluations:
        _evaluation(ax_eval[0], evaluations)
    (ax_eval or [ax_speed])[0].set_xlabel("step")

    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return out


def _evaluation(ax, records: list[dict]) -> None:
    """eval/reward_mean and every eval/pass@k of the evaluation rows, against the weight version
    evaluated (eval/step: the steps trained before it)."""
    versions = [r["eval/step"] for r in records]
    keys = ["eval/reward_mean"] + sorted({k for r in records for k in r if k.startswith("eval/pass@")})
    for key in keys:
        ax.plot(versions, [r.get(key, math.nan) for r in records], marker="o", linewidth=1.5, label=key)
    _finish(ax, "held-out evaluation", True)


def _finish(ax, ylabel: str, drawn: bool) -> None:
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(loc="best", fontsize="small")
    else:
        _empty(ax)


def _two_axes(ax, steps: list[int], left: tuple, right: tuple) -> None:
    """Plot `left` on `ax` and `right` (dashed) on a twin y-axis; each is (values or None, label,
    y-label, colour). A missing left series leaves `ax` to the right one."""
    handles = []
    values, label, ylabel, colour = left
    if values is not None:
        handles += ax.plot(steps, values, color=colour, linewidth=1.5, label=label)
        ax.set_ylabel(ylabel)
    values, label, ylabel, colour = right
    if values is not None:
        other = ax.twinx() if handles else ax
        handles += other.plot(steps, values, color=colour, linewidth=1.5, linestyle="--", label=label)
        other.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if handles:
        ax.legend(handles=handles, loc="best", fontsize="small")
    else:
        _empty(ax)


def _empty(ax) -> None:
    ax.text(0.5, 0.5, "not in metrics", ha="center", va="center", transform=ax.transAxes, color="gray")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m learner.plot", description="Draw a run's metrics.jsonl into a PNG.")
    parser.add_argument("metrics", help="metrics.jsonl of a run")
    parser.add_argument("out", nargs="?", help="PNG to write (default: training.png next to the metrics)")
    parser.add_argument("--window", type=int, default=None, help="Rolling-mean width in steps.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    out = plot_run(args.metrics, args.out or Path(args.metrics).with_name("training.png"), args.window)
    if out is not None:
        print(out)


if __name__ == "__main__":
    main()
