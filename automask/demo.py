"""``automask demo``: the whole product on a fresh machine, in a few minutes.

Generates a synthetic binary dataset, fits (pretrained vit_b with Conv-LoRA when its
weights can be had, otherwise the random-init ``tiny`` preset from scratch, with a banner
saying so), prints the leaderboard and test metrics, and draws image / ground truth /
prediction overlays into the run directory.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .errors import AutomaskError

BANNER = "=" * 78


def _pretrained_available() -> str | None:
    """Path of usable vit_b weights (explicit, cached or downloaded), else None."""
    from .models import resolve_checkpoint

    try:
        return str(resolve_checkpoint("vit_b", None, progress=True))
    except AutomaskError:
        return None


def draw_overlays(images: list[np.ndarray], truths: list[np.ndarray], preds: list[np.ndarray],
                  dest: Path, tile: int = 192) -> Path:
    """Save a grid: one row per image with the image, ground truth and prediction overlays."""
    from PIL import Image

    from .utils import atomic_write

    def overlay(img: np.ndarray, mask: np.ndarray | None, colour) -> Image.Image:
        out = img.astype(np.float32)
        if mask is not None:
            m = mask.astype(bool)[..., None]
            out = np.where(m, 0.45 * out + 0.55 * np.array(colour, np.float32), out)
        return Image.fromarray(out.clip(0, 255).astype(np.uint8)).resize((tile, tile))

    canvas = Image.new("RGB", (3 * tile, len(images) * tile), "white")
    for row, (img, gt, pr) in enumerate(zip(images, truths, preds)):
        for col, (mask, colour) in enumerate([(None, None), (gt, (0, 200, 0)),
                                              (pr, (30, 110, 255))]):
            canvas.paste(overlay(img, mask, colour), (col * tile, row * tile))
    with atomic_write(dest) as fh:
        canvas.save(fh, format="PNG")
    return dest


def _refuse_a_used_folder(run: Path) -> None:
    """ConfigError when the demo's folder already holds what it would write: its data,
    picture or predictor (another demo's, or the user's own files), before anything is."""
    from .errors import ConfigError

    if run.exists() and not run.is_dir():
        raise ConfigError(f"--path {str(run)!r} is a file: the demo writes its data, "
                          "predictor and picture into a folder; pass a new folder or none")
    taken = [run / name for name in ("data", "predictor", "predictions.png")
             if (run / name).exists() and not ((run / name).is_dir()
                                               and not any((run / name).iterdir()))]
    if taken:
        raise ConfigError(
            f"the demo writes its data, predictor and picture into {str(run)!r}, which holds "
            f"{', '.join(repr(p.name) for p in taken)} already; pass a new folder (--path) "
            "or none (a new one under ./automask_runs)")


def run_demo(path: str | None = None, time_limit: float = 180.0, seed: int = 0) -> dict:
    """Run the demo; returns the test metrics."""
    from datetime import datetime

    from .data import read_image, read_mask
    from .datasets import make_synthetic, train_test_split
    from .segmentor import SemanticSegmentor

    started = time.monotonic()
    stamp = datetime.now().strftime("demo_%Y%m%d_%H%M%S")
    run = Path(path) if path else Path("automask_runs") / stamp
    _refuse_a_used_folder(run)  # before anything is written: no file of the user's replaced
    frame = make_synthetic(160, size=160, num_classes=2, seed=seed, root=run / "data")
    train, test = train_test_split(frame, test_size=0.25, seed=seed)

    checkpoint = _pretrained_available()
    if checkpoint is not None:
        presets = "medium_quality"
        hp = {"model.checkpoint": checkpoint, "model.input_size": 256, "optim.max_epochs": 4,
              "optim.batch_size": 4}
        print(f"{BANNER}\nautomask demo: pretrained SAM vit_b + Conv-LoRA\n{BANNER}")
    else:
        presets, hp = "tiny", {}
        print(
            f"{BANNER}\nautomask demo: pretrained SAM weights are not available here (no file,"
            " no cache,\nno network), so this demo trains the random-init `tiny` preset from"
            " scratch.\nFor real data, provide vit_b weights: a path in model.checkpoint, a"
            " file in the\ncache ($AUTOMASK_HOME), or network access for the official"
            f" download.\n{BANNER}"
        )
    remaining = max(30.0, time_limit - (time.monotonic() - started) - 20.0)
    seg = SemanticSegmentor(path=run / "predictor", seed=seed, verbosity=1)
    seg.fit(train, presets=presets, hyperparameters=hp, time_limit=remaining)

    print("\nLeaderboard (validation split):")
    print(seg.leaderboard().to_string(index=False))
    scores = seg.evaluate(test)
    print(f"\nTest metrics on {len(test)} held-out images:")
    for key, value in scores.items():
        print(f"  {key:<5} {value:.4f}")
    truths = [(read_mask(p) > 0).astype(np.uint8) for p in test["label"]]
    # Baselines: an all-background mask scores IoU 0; an all-foreground mask scores the
    # foreground fraction of each image.
    all_fg_iou = float(np.mean([t.mean() for t in truths]))
    print(f"  (baselines: all-background iou 0.0000, all-foreground iou {all_fg_iou:.4f})")

    show = test.iloc[:4]
    preds = seg.predict(show)
    picture = draw_overlays([read_image(p) for p in show["image"]], truths[:4], preds,
                            run / "predictions.png")
    print(f"\nOverlays (image | ground truth | prediction): {picture}")
    print(f"Predictor saved in {seg.path_}; demo took {time.monotonic() - started:.0f}s")
    return scores
