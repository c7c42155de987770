"""A paper-style leaderboard, save / load, and scoring masks made by any model.

`leaderboard(test_df)` has one row per trained model with its trainable parameters (M)
and ratio (%), the validation score, fit time, prediction speed, and every test metric,
like the tables of the Conv-LoRA paper. `automask.metrics.score` computes the same
metrics (S-alpha, E-phi, weighted F, MAE, IoU, Dice, BER; accuracy and mIoU for
multi-class) for masks produced by any model.
"""
import tempfile

from automask import SemanticSegmentor
from automask.datasets import make_synthetic, train_test_split
from automask.metrics import score

frame = make_synthetic(60, size=128, num_classes=2, seed=0, root=tempfile.mkdtemp())
train_df, test_df = train_test_split(frame, test_size=0.2, seed=0)

run = tempfile.mkdtemp()
seg = SemanticSegmentor(path=run, verbosity=1).fit(
    train_df, presets="tiny",
    hyperparameters={"peft.method": ["full", "decoder_only"], "optim.max_epochs": 8},
)
board = seg.leaderboard(test_df)
print(board.to_string(index=False))

# The run directory holds the predictor: JSON + trainable weights (no SAM backbone copy).
again = SemanticSegmentor.load(run)
probs = again.predict_proba(test_df)  # HxW float32 foreground probabilities

# Score probability maps against the ground truth without any automask model.
from automask.data import read_mask  # noqa: E402

truths = [read_mask(p) for p in test_df["label"]]
print(score(probs, truths, metrics=["sm", "em", "wfm", "mae", "iou", "ber"]))
