"""Training curves as a PNG."""
from __future__ import annotations

from pathlib import Path


def plot_history(history: list[dict], path: Path) -> None:
    """Total loss per epoch (by stage) and the dev score, in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for stage in dict.fromkeys(r["stage"] for r in history):
        rows = [r for r in history if r["stage"] == stage and "loss_total" in r]  # closed-form fits have no loss
        ax.plot([r["epoch"] for r in rows], [r["loss_total"] for r in rows], marker="o", label=f"loss ({stage})")
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss")
    dev = [r for r in history if "dev_map" in r]
    if dev:
        twin = ax.twinx()
        twin.plot([r["epoch"] for r in dev], [r["dev_map"] for r in dev], color="black", linestyle="--", label="dev MAP")
        twin.set_ylabel("dev MAP@all (labels)")
        twin.legend(loc="upper right")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
