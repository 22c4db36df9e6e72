"""loss.png: train and validation loss against step, from metrics.jsonl."""
from __future__ import annotations

from pathlib import Path

from sheepop.train.metrics import latest_per_step, read_metrics


def plot_loss(run_dir: str | Path, out: str | Path | None = None, log_x: bool = False) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    out = Path(out) if out else run_dir / "loss.png"
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    steps, loss = latest_per_step(rows, "loss")
    ax.plot(steps, loss, label="train", lw=1.2)
    vsteps, vloss = latest_per_step(rows, "val_loss")
    if vsteps:
        ax.plot(vsteps, vloss, "o-", label="validation", lw=1.5, ms=4)
    for r in rows:  # mark restarts so a jump in the curve has an explanation
        if r.get("event") == "resume":
            ax.axvline(r["step"], color="grey", ls=":", lw=1)
    if log_x:
        ax.set_xscale("symlog")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(f"{run_dir.name}: next-token loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
