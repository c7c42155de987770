"""decoder_only fits with image embeddings kept (``data.embedding_cache_mb``) against without.

Real ``SemanticSegmentor`` fits on the first ``--images`` pairs of a shared dataset: vit_b
with random values saved as an official checkpoint (so that the fit treats it as a
pretrained backbone), ``decoder_only``, random horizontal flips only as in the ``paper``
presets, every image resized (none cropped), the machine's default precision. Each setting
fits once for 1 epoch and once for ``--epochs`` epochs. Printed per setting: the fit's
training time (Lightning's fit loop, validation included) for 1 and for E epochs, the time
of one later epoch ((t_E - t_1) / (E - 1)), the encoder passes the kept embeddings saved,
and the ratio kept / recomputed of the later-epoch time. Run from the repository root::

    python -m benchmarks.bench_embedding_cache --size 512 --images 16 --epochs 6
"""
from __future__ import annotations

import argparse
import logging
import re
import shutil
import tempfile
from pathlib import Path

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def frame_of(dataset: str, n: int):
    from automask.datasets import from_folders

    root = SHARED / dataset
    if not root.is_dir():
        raise SystemExit(f"{root} is absent: the shared data folder sits beside the checkout")
    return from_folders(root / "images", root / "masks").head(n).reset_index(drop=True)


def official_checkpoint(folder: Path) -> Path:
    """vit_b's state dict with random values, saved as segment-anything's files are."""
    import torch

    from automask.models import build_segmenter

    torch.manual_seed(0)
    path = folder / "sam_vit_b_random.pth"
    torch.save(build_segmenter("vit_b", checkpoint="random", progress=False).state_dict(), path)
    return path


class _Saved(logging.Handler):
    """Keeps the fit's "N of M encoder passes saved" line."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.line = ""

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "encoder passes saved" in message:
            self.line = re.sub(r"^\S+: ", "", message)


def fit(frame, checkpoint: Path, size: int, epochs: int, budget: int,
        batch: int) -> tuple[float, str]:
    from automask import SemanticSegmentor

    hp = {"model.backbone": "vit_b", "model.checkpoint": str(checkpoint), "model.input_size": size,
          "peft.method": "decoder_only", "optim.max_epochs": epochs, "optim.batch_size": batch,
          "optim.effective_batch_size": batch, "optim.patience": 0, "data.hflip": True,
          "data.vflip": False, "data.scale_min": 1.0, "data.scale_max": 1.0,
          "data.large_images": "resize", "data.embedding_cache_mb": budget}
    saved = _Saved()
    logger = logging.getLogger("automask")
    logger.addHandler(saved)
    path = Path(tempfile.mkdtemp(prefix="bench_embeddings_"))
    try:
        seg = SemanticSegmentor(path=path / "run", verbosity=1, seed=0).fit(
            frame, hyperparameters=hp)
        return seg.models_[seg.best_model_]["train_time"], saved.line
    finally:
        logger.removeHandler(saved)
        shutil.rmtree(path, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="kvasir_seg")
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--batch", type=int, default=4)
    args = ap.parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore")
    frame = frame_of(args.dataset, args.images)
    times: dict[tuple[int, int], float] = {}
    saved: dict[int, str] = {}
    folder = Path(tempfile.mkdtemp(prefix="bench_embeddings_ckpt_"))
    try:
        checkpoint = official_checkpoint(folder)
        for budget, epochs in ((1024, 1), (0, 1), (0, args.epochs), (1024, args.epochs)):
            times[(budget, epochs)], line = fit(frame, checkpoint, args.size, epochs, budget,
                                                args.batch)
            if epochs == args.epochs:
                saved[budget] = line or "no embeddings kept"
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(f"vit_b decoder_only, {len(frame)} images of {args.dataset} (80% training), "
          f"{args.size} px, batch {args.batch}; training time of the fit (s)")
    later = {}
    for budget, name in ((1024, "kept"), (0, "recomputed")):
        one, many = times[(budget, 1)], times[(budget, args.epochs)]
        later[budget] = (many - one) / (args.epochs - 1)
        print(f"  {name:>10}: 1 epoch {one:7.1f}  {args.epochs} epochs {many:7.1f}  "
              f"later epoch {later[budget]:6.1f}  ({saved[budget]})")
    print(f"  later epoch, kept / recomputed: {later[1024] / later[0]:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
