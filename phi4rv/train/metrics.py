"""Metrics: one JSON line per logged step (always), TensorBoard scalars (when `tensorboard` or the
lighter `tensorboardX` is installed), and a PNG of the curves at the end of each stage. Only
rank 0 writes.

On resume the JSONL file is cut back to the checkpoint's step, so the file always reads as one
uninterrupted run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


class MetricsLog:
    def __init__(self, stage_dir: Path, enabled: bool, tensorboard: bool, resume_step: int | None = None):
        self.enabled = enabled
        self.path = stage_dir / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        stage_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        else:
            # steps up to the checkpoint; an end-of-stage eval at that very step is redone
            keep = [r for r in read_metrics(self.path) if r["step"] < resume_step or (r["step"] == resume_step and "train/loss" in r)]
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
            os.replace(tmp, self.path)
        writer = summary_writer() if tensorboard else None
        if writer is not None:
            self.tb = writer(str(stage_dir / "tensorboard"), purge_step=None if resume_step is None else resume_step + 1)
        self._file = self.path.open("a")

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self.tb is not None:
            step = record["step"]
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self.tb is not None:
            self.tb.close()


def summary_writer():
    """A TensorBoard SummaryWriter class: torch's (needs the `tensorboard` package, ~14 MB with
    grpcio) or tensorboardX's (needs only protobuf); None when neither is installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter
    except ImportError:
        pass
    try:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    except ImportError:
        return None


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a crash
            break
    return out


PANELS = [
    ("loss", ["train/loss", "eval/loss"]),
    ("accuracy", ["eval/token_acc", "eval/answer_acc"]),
    ("learning rate", None),  # every lr/* key
    ("grad norm", ["train/grad_norm"]),
    ("tokens/s", ["perf/tokens_per_s"]),
]


def plot_metrics(path: Path, out: Path, title: str = "") -> Path | None:
    records = read_metrics(path)
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lr_keys = sorted({k for r in records for k in r if k.startswith("lr/")})
    panels = [(name, keys if keys is not None else lr_keys) for name, keys in PANELS]
    panels = [(n, ks) for n, ks in panels if any(k in r for r in records for k in ks)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
    for ax, (name, keys) in zip(axes[0], panels):
        for k in keys:
            pts = [(r["step"], r[k]) for r in records if k in r]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o" if len(pts) < 30 else None, markersize=3, label=k)
        ax.set_title(name)
        ax.set_xlabel("step")
        if name == "loss":
            ax.set_yscale("log")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
