"""presets="paper_table": every row of the paper's table trained in one fit (tiny backbone)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from automask import SemanticSegmentor
from automask.datasets import make_synthetic, train_test_split
from automask.leaderboard import PARAMS_COLUMN
from automask.peft import PEFT_METHODS

PAPER_ROWS = [m for m in PEFT_METHODS if m != "full"]

# The paper's recipe on a test-sized model: tiny backbone from random weights, 64 px, 1 epoch,
# two seeds per method.
TINY_TABLE = {"model.backbone": "tiny", "model.checkpoint": "random", "model.input_size": 64,
              "optim.max_epochs": 1, "optim.batch_size": 4, "optim.effective_batch_size": 4,
              "env.eval_batch_size": 8, "env.seed": [0, 1]}


@pytest.mark.slow
def test_paper_table_trains_every_method_and_the_scratch_row(tmp_path):
    frame = make_synthetic(14, size=(64, 64), num_classes=2, seed=3, root=tmp_path / "data")
    train, test = train_test_split(frame, test_size=0.3, seed=0)
    seg = SemanticSegmentor(path=tmp_path / "run", verbosity=0)
    seg.fit(train, presets="paper_table", hyperparameters=TINY_TABLE)
    runs = [(info["config"].peft.method, info["config"].env.seed) for info in seg.models_.values()]
    assert sorted(runs) == sorted((m, s) for m in PAPER_ROWS for s in (0, 1))
    scratch = [i for i in seg.models_.values() if i["config"].peft.method == "scratch"]
    assert all(i["checkpoint"]["source"] == "random" for i in scratch)

    # An external row: a folder of masks from "another model" (here the ground truth).
    external = tmp_path / "external"
    external.mkdir()
    for mask in test["label"]:
        shutil.copy(mask, external / Path(mask).name)
    table = seg.leaderboard(test, extra={"Reference": external}, style="paper",
                            metrics=["sm", "iou"])
    assert list(table["Method"]) == ["Reference"] + [
        PEFT_METHODS[m].label for m in PAPER_ROWS]  # external rows first, then the paper's
    assert table.loc[0, PARAMS_COLUMN] == "-"
    iou = next(c for c in table.columns if c.startswith("IoU"))
    assert table.loc[0, iou].startswith("100.0")  # the ground truth scores perfectly
    methods = table.iloc[1:]
    assert methods[iou].str.contains("±").all()  # mean ± std over the two seeds
    assert methods.loc[methods["Method"] == "SAM (from scratch)", PARAMS_COLUMN].item() \
        .endswith("/ 100%")
    again = SemanticSegmentor.load(seg.path_)
    for name in list(seg.models_)[::2]:  # one seed of every method: the saved weights rebuild it
        assert (again.predict(test.iloc[:2], model=name)[0]
                == seg.predict(test.iloc[:2], model=name)[0]).all()
