"""The loss plot (nf4lora.train.plot, matplotlib): the PNG has the promised size and is a drawing, not a
blank page (pixel spread, many distinct colours, the train curve's and the held-out markers'
colours present, the learning-rate panel's colour present only when the history has lr); without
matplotlib nothing is written, the note says how to get the plot, and a fine-tune still finishes."""
import json
import sys

import numpy as np
import pytest

from nf4lora.train import plot

from .tiny_lm import save_tiny_model

mpl = pytest.importorskip("matplotlib", reason="the plot needs matplotlib (the demo / test extras)")


def _read(path):
    from matplotlib.image import imread
    img = imread(str(path))                           # float RGBA in [0, 1], shape [H, W, 4]
    return np.round(img[..., :3] * 255).astype(np.uint8)


def _has_colour(img, hex_colour, tol=12, min_pixels=20):
    rgb = np.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)], dtype=np.int16)
    close = (np.abs(img.astype(np.int16) - rgb).max(axis=-1) <= tol).sum()
    return close >= min_pixels


def _columns_with(img, hex_colour, tol=12):
    """Fraction of the image's columns holding the colour: a curve across the axes, not just the
    legend's sample line."""
    rgb = np.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)], dtype=np.int16)
    close = np.abs(img.astype(np.int16) - rgb).max(axis=-1) <= tol
    return close.any(axis=0).mean()


HISTORY = [{"step": i + 1, "loss": 3.5 - 0.04 * i + 0.1 * (-1) ** i, "lr": 1e-3 * min(1.0, (i + 1) / 3)}
           for i in range(30)]


def test_plot_is_a_drawing_of_the_run(tmp_path):
    note = plot.write_loss_png(tmp_path / "loss.png", HISTORY, {"loss": 3.2, "perplexity": 24.5},
                               {"loss": 2.4, "perplexity": 11.0}, "tiny on d.jsonl: run out")
    assert note == f"loss curve: {tmp_path / 'loss.png'}"
    img = _read(tmp_path / "loss.png")
    assert img.shape == (plot.HEIGHT, plot.WIDTH, 3)
    assert img.std() > 20                              # a blank (one-colour) page has 0
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 50   # lines, text, antialiasing
    assert (img == 255).all(axis=-1).mean() > 0.5       # mostly white background, not noise
    for colour in (plot.TRAIN_COLOR, plot.EVAL_COLOR, plot.LR_COLOR):
        assert _has_colour(img, colour), colour
    assert _columns_with(img, plot.TRAIN_COLOR) > 0.6 and _columns_with(img, plot.LR_COLOR) > 0.6
    assert not list(tmp_path.glob(".loss.png.*"))      # no temp file left behind


def test_plot_without_lr_or_eval_has_one_panel(tmp_path):
    plot.write_loss_png(tmp_path / "l.png", [3.0, 2.0, 1.0])
    img = _read(tmp_path / "l.png")
    assert img.shape == (plot.HEIGHT, plot.WIDTH, 3)
    assert _columns_with(img, plot.TRAIN_COLOR) > 0.6
    assert not _has_colour(img, plot.LR_COLOR, min_pixels=1)
    assert not _has_colour(img, plot.EVAL_COLOR, min_pixels=1)


def test_without_matplotlib_the_finetune_finishes_and_says_how(tmp_path, monkeypatch, capsys):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)   # import matplotlib -> ImportError
    assert plot.write_loss_png(tmp_path / "x.png", [1.0, 0.5]) == plot.NO_MATPLOTLIB
    assert not (tmp_path / "x.png").exists()
    assert "pip install matplotlib" in plot.NO_MATPLOTLIB

    from nf4lora.cli import main
    tiny = save_tiny_model(tmp_path / "tiny")
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"say {i}", "response": f"{i}"}) for i in range(12)))
    out = tmp_path / "out"
    assert main(["finetune", "--model", str(tiny), "--data", str(data), "--output-dir", str(out), "--steps", "1",
                 "--seq-len", "32", "--max-eval", "2", "--no-bf16"]) == 0
    assert (out / "metrics.json").exists() and not (out / "loss.png").exists()
    assert plot.NO_MATPLOTLIB in capsys.readouterr().out


def test_title_names_model_data_and_run():
    from nf4lora.train import TrainOptions
    t = plot.describe_run(TrainOptions(model="/m/SmolThing", data="/d/my.jsonl", output_dir="runs/a", r=8, lr=5e-4))
    assert "SmolThing" in t and "my.jsonl" in t and "runs/a" in t and "r=8" in t and "0.0005" in t
    assert "pydoc topics" in plot.describe_run(TrainOptions())
