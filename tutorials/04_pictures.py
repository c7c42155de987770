"""Pictures: prediction overlays, a side-by-side model comparison, training curves.

Usage::

    python tutorials/04_pictures.py [OUT_DIR]   # synthetic data, `tiny` preset

Writes three PNG files (and prints where):

- ``predictions.png``: image | ground truth | prediction. Binary tasks colour the
  prediction against the ground truth: true positives bluish green, false positives
  vermillion, false negatives blue (Okabe-Ito colours, readable with colour blindness).
  Multi-class tasks colour each class and name it in the legend.
- ``comparison.png``: image | ground truth | one column per candidate model.
- ``history.png``: training loss and validation metric per epoch, one line per candidate.

The same pictures from the command line::

    automask show RUN --data test.csv --out predictions.png
    automask show RUN --data test.csv --out comparison.png --models all
    automask history RUN --out history.png
"""
import sys
import tempfile
from pathlib import Path

from automask import SemanticSegmentor
from automask.datasets import make_synthetic, train_test_split

out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp())
frame = make_synthetic(40, size=96, num_classes=2, seed=0, root=out / "data")
train_df, test_df = train_test_split(frame, test_size=0.2, seed=0)

seg = SemanticSegmentor(path=out / "run", verbosity=1).fit(
    train_df, presets="tiny",
    hyperparameters={"peft.method": ["full", "lora"], "optim.max_epochs": 4,
                     "model.input_size": 96},
)
print(seg.fit_summary())  # the printed summary, as a dict

seg.plot_predictions(test_df, n=4, path=out / "predictions.png")
seg.plot_comparison(test_df, n=4, path=out / "comparison.png")  # every candidate
seg.plot_history(path=out / "history.png")
print("test iou:", round(seg.evaluate(test_df, metrics=["iou"])["iou"], 4))
print("pictures in", out)
