"""Presets, hyperparameter overrides, candidates and a time limit.

A preset picks the SAM backbone, the PEFT method with its rank and expert count, the
input size and the training recipe; `hyperparameters` overrides any of it with dotted
keys (the README lists them all). A list value trains one candidate per value, and the
best by the validation metric becomes the default model.
"""
import tempfile

from automask import PRESETS, SemanticSegmentor
from automask.datasets import make_synthetic, train_test_split

print("presets:", ", ".join(PRESETS))

frame = make_synthetic(60, size=128, num_classes=2, seed=0, root=tempfile.mkdtemp())
train_df, test_df = train_test_split(frame, test_size=0.2, seed=0)

seg = SemanticSegmentor(path=tempfile.mkdtemp(), eval_metric="dice").fit(
    train_df,
    presets="tiny",
    hyperparameters={
        "peft.method": ["full", "lora", "conv_lora"],  # three candidates
        "peft.rank": 4,
        "optim.lr": 1e-3,
        "optim.max_epochs": 10,
        "data.rotate_degrees": 10,
    },
    time_limit=240,  # seconds for the whole fit, all candidates together
)
print(seg.leaderboard().to_string(index=False))
print("best:", seg.best_model_)
print("lora on the test set:", seg.evaluate(test_df, model="method=lora", metrics=["iou", "dice"]))
