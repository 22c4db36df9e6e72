"""Plots of a run, from metrics.jsonl: loss (train and validation), learning rate, and
throughput/MFU/memory. `plot_loss` writes the run's loss.png; the report embeds all three.

Every function takes the metrics rows and returns a matplotlib Figure, so the caller decides
whether it becomes a file or bytes for an HTML page.
"""
from __future__ import annotations

import io
from pathlib import Path

from sheepop.monitor.metrics_file import latest_per_step, read_metrics

TRAIN, VAL, ACCENT = "#1f77b4", "#d62728", "#2ca02c"


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    return plt


def _restarts(ax, rows: list[dict]) -> None:
    """Mark where each later attempt began (a resume, or a start over from step 0 when a run
    failed before its first checkpoint), so a jump in a curve has an explanation. The curves
    themselves take the last record of each step (latest_per_step): re-run steps count once."""
    starts = [r for r in rows if r.get("event") in ("start", "resume")]
    marks = [r for i, r in enumerate(starts) if r["event"] == "resume" or i > 0]
    for i, r in enumerate(marks):
        ax.axvline(r.get("step", 0), color="grey", ls=":", lw=1, label="resume" if i == 0 else None)


def smooth(values: list[float], alpha: float | None = None) -> list[float]:
    """Exponential moving average, bias-corrected so the first points are not pulled to zero.
    The default span is ~1/10 of the run, so short and long runs are smoothed alike."""
    alpha = alpha or min(0.3, max(0.02, 20 / max(1, len(values))))
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = (1 - alpha) * avg + alpha * v
        out.append(avg / (1 - (1 - alpha) ** i))
    return out


def loss_figure(rows: list[dict], title: str = "", log_x: bool = False):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4), dpi=110)
    steps, loss = latest_per_step(rows, "loss")
    if len(steps) > 20:  # raw steps faint, their moving average on top
        ax.plot(steps, loss, color=TRAIN, alpha=0.3, lw=0.8)
        ax.plot(steps, smooth(loss), color=TRAIN, lw=1.6, label="train (EMA)")
    else:
        ax.plot(steps, loss, color=TRAIN, lw=1.4, label="train")
    vsteps, vloss = latest_per_step(rows, "val_loss")
    if vsteps:
        ax.plot(vsteps, vloss, "o-", color=VAL, label="validation", lw=1.5, ms=4)
    _restarts(ax, rows)
    if log_x:
        ax.set_xscale("symlog", linthresh=1)  # symlog: step 0 (the initial val loss) stays on the plot
    ax.set_xlabel("step" + (" (log scale)" if log_x else ""))
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title or "next-token loss")
    ax.grid(alpha=0.3)
    if steps or vsteps:
        ax.legend()
    fig.tight_layout()
    return fig


def lr_figure(rows: list[dict]):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 2.8), dpi=110)
    steps, lr = latest_per_step(rows, "lr")
    ax.plot(steps, lr, color=ACCENT, lw=1.6)
    _restarts(ax, rows)
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax.set_title("learning-rate schedule")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def throughput_figure(rows: list[dict]):
    """tokens/s, MFU and memory against step, one panel each (they share the x axis)."""
    plt = _plt()
    panels = [("tokens_per_sec", "tokens/s", 1.0), ("mfu", "MFU (%)", 100.0), ("mem_allocated", "memory (GiB)", 1.0)]
    panels = [p for p in panels if latest_per_step(rows, p[0])[0]]
    fig, axes = plt.subplots(len(panels) or 1, 1, figsize=(7.5, 1.9 * max(1, len(panels)) + 0.6), dpi=110,
                             sharex=True, squeeze=False)
    for ax, (key, label, scale) in zip(axes[:, 0], panels):
        steps, vals = latest_per_step(rows, key)
        vals = [v * scale for v in vals]
        ax.plot(steps, vals, color=TRAIN, alpha=0.35, lw=0.8)
        if len(vals) > 20:
            ax.plot(steps, smooth(vals), color=TRAIN, lw=1.5)
        _restarts(ax, rows)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        # The first steps (compilation, warm-up) are far slower: keep them from flattening the rest.
        if len(vals) > 10:
            lo, hi = sorted(vals)[len(vals) // 20], max(vals)
            ax.set_ylim(bottom=min(0, lo), top=hi * 1.1 if hi > 0 else None)
    axes[-1, 0].set_xlabel("step")
    axes[0, 0].set_title("throughput, model FLOPs utilisation and memory (max over ranks)")
    fig.tight_layout()
    return fig


def png_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    _plt().close(fig)
    return buf.getvalue()


def save(fig, out: str | Path) -> Path:
    out = Path(out)
    out.write_bytes(png_bytes(fig))
    return out


def plot_loss(run_dir: str | Path, out: str | Path | None = None, log_x: bool = False) -> Path:
    """loss.png of a run: train and validation loss against step."""
    run_dir = Path(run_dir)
    fig = loss_figure(read_metrics(run_dir), f"{run_dir.name}: next-token loss", log_x)
    return save(fig, Path(out) if out else run_dir / "loss.png")
