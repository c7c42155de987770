"""The ``automask`` command line: fit, predict, evaluate, leaderboard, params, score, demo.

Bad input ends with a one-line message on stderr and exit status 2; ``--debug`` shows
the traceback instead.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence

from .errors import AutomaskError

EXIT_USER_ERROR = 2


def _parse_hp(items: Sequence[str]) -> dict[str, Any]:
    """``key=value`` pairs; values parse as JSON when they can; a repeated key -> a list."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise AutomaskError(f"--hp expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        if key in out:
            prev = out[key] if isinstance(out[key], list) else [out[key]]
            value = prev + (value if isinstance(value, list) else [value])
        out[key] = value
    return out


def _print_table(df, as_json: bool) -> None:
    import pandas as pd

    if as_json:
        print(df.to_json(orient="records", indent=2))
    else:
        with pd.option_context("display.max_columns", None, "display.width", 200):
            print(df.to_string(index=False))


def _print_scores(scores: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(scores, indent=2))
        return
    width = max(len(k) for k in scores)
    for key, value in scores.items():
        if isinstance(value, list):
            text = ", ".join("nan" if v != v else f"{v:.4f}" for v in value)
            print(f"{key:<{width}}  [{text}]")
        else:
            print(f"{key:<{width}}  {value:.4f}")


def _cmd_fit(args) -> None:
    from .segmentor import SemanticSegmentor

    seg = SemanticSegmentor(label=args.label, image=args.image, path=args.path,
                            eval_metric=args.eval_metric, seed=args.seed,
                            verbosity=args.verbosity)
    seg.fit(args.train, tuning_data=args.tuning, presets=args.presets,
            hyperparameters=_parse_hp(args.hp), time_limit=args.time_limit,
            num_classes=args.num_classes)
    _print_table(seg.leaderboard(), as_json=False)
    print(f"saved to {seg.path_}")


def _load(run: str):
    from .segmentor import SemanticSegmentor

    return SemanticSegmentor.load(run)


def _cmd_predict(args) -> None:
    seg = _load(args.run)
    written = seg.predict(args.data, model=args.model, save_to=args.out)
    print(f"wrote {len(written)} masks to {args.out}")


def _cmd_evaluate(args) -> None:
    seg = _load(args.run)
    metrics = args.metrics.split(",") if args.metrics else None
    _print_scores(seg.evaluate(args.data, metrics=metrics, model=args.model), args.json)


def _cmd_leaderboard(args) -> None:
    _print_table(_load(args.run).leaderboard(args.data), args.json)


def _cmd_params(args) -> None:
    from .models import parameter_summary

    methods = args.methods.split(",") if args.methods else None
    _print_table(parameter_summary(args.backbone, methods=methods,
                                   num_classes=args.num_classes), args.json)


def _cmd_score(args) -> None:
    from .metrics import score_folders

    metrics = args.metrics.split(",") if args.metrics else None
    _print_scores(score_folders(args.pred, args.gt, task=args.task, metrics=metrics), args.json)


def _cmd_demo(args) -> None:
    from .demo import run_demo

    run_demo(path=args.path, time_limit=args.time_limit, seed=args.seed)


def _cmd_export(args) -> None:
    path = _load(args.run).export(args.out, format=args.format, model=args.model)
    print(f"exported to {path}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="automask", description="Semantic segmentation with SAM and Conv-LoRA."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("fit", help="fit models on a CSV of image/mask paths")
    p.add_argument("--train", required=True, help="CSV with image and label columns")
    p.add_argument("--tuning", help="CSV of validation data (default: a holdout split)")
    p.add_argument("--presets", default="medium_quality")
    p.add_argument("--hp", action="append", default=[], metavar="KEY=VALUE",
                   help="hyperparameter override; repeat a key for several candidates")
    p.add_argument("--time-limit", type=float, help="seconds for the whole fit")
    p.add_argument("--path", required=True, help="run directory to save the predictor in")
    p.add_argument("--label", default="label")
    p.add_argument("--image", default="image")
    p.add_argument("--eval-metric")
    p.add_argument("--num-classes", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verbosity", type=int, default=2)
    p.set_defaults(func=_cmd_fit)

    p = sub.add_parser("predict", help="write predicted masks as PNG files")
    p.add_argument("run", help="saved predictor directory")
    p.add_argument("--data", required=True, help="CSV, image folder or image file")
    p.add_argument("--out", required=True, help="folder for the masks")
    p.add_argument("--model", help="candidate name (default: the best)")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("evaluate", help="score a saved predictor on labelled data")
    p.add_argument("run")
    p.add_argument("--data", required=True, help="CSV with image and label columns")
    p.add_argument("--metrics", help="comma-separated metric names")
    p.add_argument("--model")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("leaderboard", help="one row per trained model")
    p.add_argument("run")
    p.add_argument("--data", help="CSV of test data to score every model on")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_leaderboard)

    p = sub.add_parser("export", help="export a model to ONNX (or a torch.export .pt2)")
    p.add_argument("run", help="saved predictor directory")
    p.add_argument("--out", required=True, help="file to write, e.g. model.onnx")
    p.add_argument("--format", choices=["onnx", "pt2"], default="onnx")
    p.add_argument("--model", help="candidate name (default: the best)")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("params", help="trainable parameters per PEFT method")
    p.add_argument("--backbone", default="vit_h")
    p.add_argument("--methods", help="comma-separated PEFT methods (default: all)")
    p.add_argument("--num-classes", type=int, default=1, help="output maps (1 = binary)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_params)

    p = sub.add_parser("score", help="score mask files against ground-truth files")
    p.add_argument("--pred", required=True, help="folder of predicted masks/probability maps")
    p.add_argument("--gt", required=True, help="folder of ground-truth masks")
    p.add_argument("--task", choices=["binary", "multiclass"])
    p.add_argument("--metrics", help="comma-separated metric names")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_score)

    p = sub.add_parser("demo", help="generate data, fit, evaluate and draw predictions")
    p.add_argument("--path", help="run directory (default: a new one under automask_runs/)")
    p.add_argument("--time-limit", type=float, default=180.0)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (AutomaskError, ValueError, OSError) as exc:  # bad input, unusable files or folders
        if args.debug:
            raise
        print(f"automask: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("automask: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
