"""Building a segmenter from a SAM checkpoint: on the meta device against initialised at random.

``build_segmenter(backbone, checkpoint=file)`` builds the model on the meta device and
gives it the file's tensors (``automask/models/checkpoint.py``; SAM 2.1 backbones, which
need the ``sam2`` extra, through ``automask/models/sam2.py``); before, it initialised
every weight at random and then copied the file's into them. A fit with a pretrained
backbone and a loaded predictor's first prediction (every ``automask predict``) build one. Here an
official-format file of random weights is written once per backbone, then the two ways
alternate in one process, the order swapped each round. Printed: the median seconds of
each, their ratio, and whether the two models hold the same weights; with ``--rss``, the
peak RSS of a fresh interpreter that builds one each way (Linux). Run from the repository root::

    python -m benchmarks.bench_build --backbones vit_b vit_h sam2.1_hiera_b+ --rounds 5 [--rss]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

from automask.models.sam2 import is_sam2_backbone

# VmHWM, not ru_maxrss: Linux carries ru_maxrss over an exec, so a child would report
# its parent's peak when that is higher.
_PEAK = '''
import sys
from benchmarks.bench_build import build
build(*sys.argv[1:3], int(sys.argv[3]), sys.argv[4])
print([int(line.split()[1]) // 1024 for line in open("/proc/self/status")
       if line.startswith("VmHWM")][0])
'''


def build(kind: str, backbone: str, size: int, path: str):
    """``build_segmenter`` now ("meta"), or as it was before ("init")."""
    from automask.models import build_segmenter
    from automask.models.checkpoint import load_sam_weights, locate_checkpoint

    if kind == "meta":
        return build_segmenter(backbone, input_size=size, checkpoint=path, progress=False)
    resolved = locate_checkpoint(backbone, path, progress=False)  # hashes the file, as now
    model = _random_model(backbone, size)
    if is_sam2_backbone(backbone):
        from automask.models.sam2 import load_sam2_weights

        load_sam2_weights(model, resolved.path)  # copied into the initialised weights
    else:
        load_sam_weights(model, resolved.path)
    model.set_num_classes(1)
    return model


def _random_model(backbone: str, size: int):
    """The binary segmenter of ``backbone``, initialised at random (on torch's default
    device: the meta device gives its shapes only)."""
    if is_sam2_backbone(backbone):
        from automask.models.sam2 import SAM2_BACKBONES, Sam2Segmenter, build_sam2_parts

        return Sam2Segmenter(*build_sam2_parts(SAM2_BACKBONES[backbone], size),
                             backbone=backbone, input_size=size)
    from automask.models.backbones import build_sam_parts, get_spec
    from automask.models.segmenter import SamSegmenter

    return SamSegmenter(*build_sam_parts(get_spec(backbone), size), backbone=backbone,
                        input_size=size)


def _official_file(backbone: str, size: int, path: str) -> None:
    """Random weights in ``backbone``'s official format: a state dict for SAM, and
    ``{"model": ...}`` with SAM2Base's key names for SAM 2.1."""
    import torch

    with torch.device("meta"):
        shapes = _random_model(backbone, size).state_dict()
    gen = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v.shape, generator=gen) * 0.02 for k, v in shapes.items()}
    if is_sam2_backbone(backbone):
        renamed = (("prompt_encoder.", "sam_prompt_encoder."),
                   ("mask_decoder.", "sam_mask_decoder."))
        state = {next((new + k[len(old):] for old, new in renamed if k.startswith(old)), k): v
                 for k, v in state.items()}
        state = {"model": state}
    torch.save(state, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbones", nargs="+", default=["vit_b"])
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--rss", action="store_true",
                    help="also the peak RSS (MiB) of a fresh interpreter per build")
    args = ap.parse_args(argv)

    import torch

    folder = tempfile.mkdtemp()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.size} px")
    print("| backbone | file | meta device | random init, then copied | ratio | same weights |")
    print("|---|---|---|---|---|---|")
    for backbone in args.backbones:
        path = os.path.join(folder, f"sam_{backbone}.pth")
        _official_file(backbone, args.size, path)

        times = {"meta": [], "init": []}
        for r in range(args.rounds + 1):
            for kind in ("meta", "init") if r % 2 else ("init", "meta"):
                t = time.perf_counter()
                model = build(kind, backbone, args.size, path)
                if r:  # the first round warms up
                    times[kind].append(time.perf_counter() - t)
                del model
        a = build("meta", backbone, args.size, path).state_dict()
        b = build("init", backbone, args.size, path).state_dict()
        same = list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"| {backbone} | {os.path.getsize(path) / 2**20:.0f} MiB | {med['meta']:.2f} s | "
              f"{med['init']:.2f} s | {med['meta'] / med['init']:.2f} | {same} |")
        del a, b
        if args.rss:
            root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
            peaks = {kind: subprocess.run(
                [sys.executable, "-c", _PEAK, kind, backbone, str(args.size), path],
                capture_output=True, text=True, check=True, cwd=root).stdout.split()[-1]
                for kind in ("meta", "init")}
            print(f"  {backbone} peak RSS: meta device {peaks['meta']} MiB, "
                  f"random init then copied {peaks['init']} MiB")
        os.remove(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
