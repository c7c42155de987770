"""Multi-class heads on SAM 2.1 backbones: what the heads and checkpoints promise there.

Every test here needs the ``sam2`` extra. Without it a test is skipped with a reason, except
when ``AUTOMASK_REQUIRE_SAM2=1`` (set by CI, which installs the extra): then it fails, as in
``tests/test_sam2.py``.
"""
from __future__ import annotations

import os

import pytest
import torch

from automask.errors import CheckpointError, ConfigError
from automask.models import build_segmenter

SIZE = 64
TINY = "sam2_tiny"


def _require_sam2() -> None:
    """Skip without the sam2 extra, or fail when CI requires it (as tests/test_sam2.py)."""
    if os.environ.get("AUTOMASK_REQUIRE_SAM2") == "1":
        import sam2  # noqa: F401  (the extra is required here: a missing package fails)
    else:
        pytest.importorskip("sam2", reason="SAM 2.1 tests need the sam2 extra: "
                                           "pip install 'automask[sam2]'")


def test_binary_sam2_model_ignores_the_multiclass_head_name():
    """A binary SAM 2.1 model builds with the paper presets' head name and is SAM 2's
    single-mask model, as a binary SAM model is."""
    _require_sam2()
    torch.manual_seed(0)
    named = build_segmenter(TINY, num_classes=1, input_size=SIZE, checkpoint="random",
                            multiclass_head="mask_classification").eval()
    torch.manual_seed(0)
    plain = build_segmenter(TINY, num_classes=1, input_size=SIZE, checkpoint="random").eval()
    assert named.num_classes == 1 and named.multiclass_head == "tokens"
    images = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(named(images), plain(images), atol=0, rtol=0)
    with pytest.raises(ConfigError, match="multi-class head must be one of"):
        build_segmenter(TINY, num_classes=1, input_size=SIZE, checkpoint="random",
                        multiclass_head="queries")


def test_sam2_refuses_the_mask_classification_head_when_set_directly():
    """Setting the paper's head on a SAM 2.1 segmenter is a ConfigError, never a model whose
    forward returns one map for K classes."""
    _require_sam2()
    model = build_segmenter(TINY, num_classes=1, input_size=SIZE, checkpoint="random")
    with pytest.raises(ConfigError, match="mask_classification.*sam2_tiny.*'tokens'"):
        model.set_num_classes(3, head="mask_classification")


def test_a_sam1_checkpoint_given_to_sam2_is_named_as_such(tmp_path):
    """A segment-anything (SAM 1) state dict given to a SAM 2.1 backbone is refused with an
    error that says it is a SAM 1 checkpoint, not a wall of missing keys."""
    _require_sam2()
    path = tmp_path / "sam_vit_tiny.pth"
    torch.save(build_segmenter("tiny", input_size=SIZE, checkpoint="random").state_dict(), path)
    with pytest.raises(CheckpointError, match="does not fit backbone 'sam2_tiny'") as info:
        build_segmenter(TINY, num_classes=3, input_size=SIZE, checkpoint=path)
    message = str(info.value)
    assert "SAM 1" in message and "SAM 2.1 checkpoint" in message
    assert "Missing key" not in message
