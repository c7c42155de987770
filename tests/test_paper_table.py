"""presets="paper_table": every row of the paper's table trained in one fit (tiny backbone)."""
from __future__ import annotations

import pytest

from automask import SemanticSegmentor
from automask.datasets import make_synthetic, train_test_split
from automask.peft import PEFT_METHODS

PAPER_ROWS = [m for m in PEFT_METHODS if m != "full"]

# The paper's recipe on a test-sized model: tiny backbone from random weights, 64 px, 1 epoch.
TINY_TABLE = {"model.backbone": "tiny", "model.checkpoint": "random", "model.input_size": 64,
              "optim.max_epochs": 1, "optim.batch_size": 4, "optim.effective_batch_size": 4,
              "env.eval_batch_size": 8}


@pytest.mark.slow
def test_paper_table_trains_every_method_and_the_scratch_row(tmp_path):
    frame = make_synthetic(16, size=(64, 64), num_classes=2, seed=3, root=tmp_path / "data")
    train, test = train_test_split(frame, test_size=0.25, seed=0)
    seg = SemanticSegmentor(path=tmp_path / "run", verbosity=0)
    seg.fit(train, presets="paper_table", hyperparameters=TINY_TABLE)
    methods = [info["config"].peft.method for info in seg.models_.values()]
    assert methods == PAPER_ROWS
    scratch = next(i for i in seg.models_.values() if i["config"].peft.method == "scratch")
    assert scratch["checkpoint"]["source"] == "random"
    board = seg.leaderboard()
    assert sorted(board["method"]) == sorted(PAPER_ROWS)
    full_size = board.loc[board["method"] == "scratch", "ratio_pct"].item()
    assert full_size == 100.0
    assert (board.loc[board["method"] != "scratch", "ratio_pct"] < 100.0).all()
    again = SemanticSegmentor.load(seg.path_)
    for name in seg.models_:  # every method's saved weights rebuild the same model
        assert (again.predict(test.iloc[:2], model=name)[0]
                == seg.predict(test.iloc[:2], model=name)[0]).all()
