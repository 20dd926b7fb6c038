"""write_loss_png: the fine-tune's loss curve as a PNG drawn by matplotlib (an optional dependency:
the `demo` and `test` extras). Top panel: train loss per optimizer step and the held-out loss before
(step 0) and after (last step), each marked and labelled with its value; bottom panel: the learning
rate. Without matplotlib nothing is drawn and the note says how to get the plot; the numbers are in
metrics.json either way. Tested by tests/test_plot.py (size, not blank, the curve's colour present)."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from ..files import write_atomic

WIDTH, HEIGHT, DPI = 960, 600, 100          # pixels of the written PNG
TRAIN_COLOR, EVAL_COLOR, LR_COLOR = "#1f5ac8", "#d62728", "#2ca02c"
NO_MATPLOTLIB = ("loss curve not drawn: matplotlib is not installed "
                 "(pip install matplotlib, or pip install 'nf4lora[demo]'); the numbers are in metrics.json")


def describe_run(opts: Any) -> str:
    """The plot title for a TrainOptions: model, data, run folder and the main hyperparameters."""
    model = Path(opts.model).name if opts.model else "SmolLM2-135M-Instruct (GGUF)"
    data = Path(opts.data).name if opts.data else "pydoc topics"
    base = opts.quantize.upper() if opts.quantize else "bf16"
    return (f"{model} on {data}: run {opts.output_dir}\n"
            f"{base} base, LoRA r={opts.r}, batch {opts.batch_size}, peak lr {opts.lr:g}, {opts.schedule}")


def _points(history: Sequence[Union[float, Mapping[str, float]]]) -> tuple[list[int], list[float], list[float]]:
    steps, losses, lrs = [], [], []
    for i, h in enumerate(history):
        if isinstance(h, Mapping):
            steps.append(int(h.get("step", i + 1)))
            losses.append(float(h["loss"]))
            if "lr" in h:
                lrs.append(float(h["lr"]))
        else:
            steps.append(i + 1)
            losses.append(float(h))
    return steps, losses, lrs if len(lrs) == len(steps) else []


def loss_figure_png(history: Sequence[Union[float, Mapping[str, float]]],
                    eval_before: Optional[Mapping[str, float]] = None,
                    eval_after: Optional[Mapping[str, float]] = None, title: str = "") -> bytes:
    """The PNG bytes (WIDTH x HEIGHT). history: per-step dicts {"step", "loss", "lr"} (as in
    metrics.json) or plain losses. Raises ImportError without matplotlib."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    steps, losses, lrs = _points(history)
    fig = Figure(figsize=(WIDTH / DPI, HEIGHT / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    if lrs:
        ax, ax_lr = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    else:
        ax, ax_lr = fig.subplots(1, 1), None
    ax.plot(steps, losses, color=TRAIN_COLOR, marker="o" if len(steps) <= 60 else None, markersize=3,
            linewidth=1.5, label="train loss (per step)")
    last = steps[-1] if steps else 1
    for ev, x, name, ha in ((eval_before, 0, "before", "left"), (eval_after, last, "after", "right")):
        if ev and ev.get("loss") is not None:
            v = float(ev["loss"])
            ax.plot([x], [v], linestyle="none", marker="D", markersize=8, color=EVAL_COLOR,
                    label="held-out loss (before / after)" if name == "before" or not eval_before else None)
            ppl = f", ppl {ev['perplexity']:.1f}" if ev.get("perplexity") is not None else ""
            ax.annotate(f"held-out {name}: {v:.3f}{ppl}", (x, v), textcoords="offset points",
                        xytext=(8 if ha == "left" else -8, 8), ha=ha, color=EVAL_COLOR, fontsize=9,
                        bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "none", "alpha": 0.85})
    ax.set_ylabel("loss (cross-entropy, nats/token)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper right", fontsize=9)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if ax_lr is not None:
        ax_lr.plot(steps, lrs, color=LR_COLOR, linewidth=1.5)
        ax_lr.set_ylabel("learning rate")
        ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        ax_lr.grid(True, alpha=0.3)
        ax_lr.set_xlabel("optimizer step")
    else:
        ax.set_xlabel("optimizer step")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


def write_loss_png(path: Path, history: Sequence[Union[float, Mapping[str, float]]],
                   eval_before: Optional[Mapping[str, float]] = None,
                   eval_after: Optional[Mapping[str, float]] = None, title: str = "") -> str:
    """Draws the curve and writes it atomically; returns a one-line note for the log (without
    matplotlib: writes nothing and says how to get the plot)."""
    try:
        png = loss_figure_png(history, eval_before, eval_after, title)
    except ImportError:
        return NO_MATPLOTLIB
    path = Path(path)
    write_atomic(path, png)
    return f"loss curve: {path}"
