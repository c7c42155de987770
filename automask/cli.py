"""The ``automask`` command line: fit, predict, evaluate, leaderboard, params, score, show,
history, demo.

Bad input ends with a one-line message on stderr and exit status 2; ``--debug`` shows
the traceback instead. Only the standard library is imported at start-up: torch,
Lightning, pandas and matplotlib load inside the commands that need them, so ``--help``
answers at once.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import re
import sys
from typing import Any, Iterator, Sequence

from .errors import AutomaskError
from .utils.signals import sigterm_as_interrupt

EXIT_USER_ERROR = 2
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, as a shell reports a writer whose reader left


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
            new = value if isinstance(value, list) else [value]
            for entry in new:
                if any(type(e) is type(entry) and e == entry for e in prev):  # would vanish
                    raise AutomaskError(f"--hp {key} repeats the value {entry!r}: give each "
                                        "candidate's value once")
                prev = prev + [entry]
            value = prev
        out[key] = value
    return out


def _print_table(df, as_json: bool) -> None:
    import pandas as pd

    if as_json:
        print(df.to_json(orient="records", indent=2))
    else:
        with pd.option_context("display.max_columns", None, "display.width", 200):
            print(df.to_string(index=False))


def _json_safe(value):
    """``value`` with every non-finite float replaced by None (JSON has no NaN)."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _print_scores(scores: dict, as_json: bool, class_names: Sequence[str] | None = None) -> None:
    if as_json:  # strict JSON: NaN (a class absent everywhere) becomes null, as in tables
        print(json.dumps(_json_safe(scores), indent=2, allow_nan=False))
        return
    width = max(len(k) for k in scores)
    for key, value in scores.items():
        if isinstance(value, list) and class_names and len(class_names) == len(value):
            _print_per_class(key, value, class_names)
        elif isinstance(value, list):
            text = ", ".join("nan" if v != v else f"{v:.4f}" for v in value)
            print(f"{key:<{width}}  [{text}]")
        elif isinstance(value, int):  # counts (n_images) are not scores
            print(f"{key:<{width}}  {value}")
        else:
            print(f"{key:<{width}}  {value:.4f}")


def _cmd_fit(args) -> None:
    if args.resume:
        train, fit_args, params = _resume_inputs(args)
    else:
        params = {key: default if getattr(args, key) is None else getattr(args, key)
                  for key, default in _FIT_PARAMS.items()}
        train, class_names, hp, color_map = _fit_inputs(args)
        fit_args = {"tuning_data": args.tuning, "presets": args.presets or DEFAULT_PRESETS,
                    "hyperparameters": hp, "time_limit": args.time_limit,
                    "num_classes": args.num_classes, "class_names": class_names,
                    "color_map": color_map}
    _check_fit_options(args, fit_args)
    # (imported once the options are read: their errors need neither torch nor Lightning)
    from .segmentor import SemanticSegmentor

    seg = SemanticSegmentor(path=args.path, verbosity=args.verbosity, **params)
    seg.fit(train, overwrite=args.overwrite, resume=args.resume, **fit_args)
    from .training.distributed import is_main_process

    if is_main_process():  # a distributed fit runs this command in every process
        _print_table(seg.leaderboard(), as_json=False)
        print(f"saved to {os.path.normpath(seg.path_)}")


def _check_fit_options(args, fit_args: dict[str, Any]) -> None:
    """The options' own errors before Lightning, torchmetrics, scikit-learn and
    segment-anything load (a bad ``--hp`` in about 2.6 s instead of 7 s on 2 cores,
    benchmarks/README.md), in the order ``fit`` checks them: a preset or a hyperparameter
    key or value (:func:`automask.config.resolve`; it loads torch for the PEFT registry),
    then a ``--train`` or ``--tuning`` CSV that is not there. ``fit`` checks them all
    again."""
    from .config import resolve

    resolve(fit_args.get("presets"), fit_args.get("hyperparameters"), for_fit=False)
    for option, path in (("--train", args.train), ("--tuning", args.tuning)):
        if path is not None and not os.path.exists(os.path.expanduser(path)):
            raise AutomaskError(f"{option} {path!r} does not exist: give a CSV of image and "
                                "mask paths")


def _read_color_map(path: str) -> tuple[dict, list[str] | None]:
    """``--color-map``: one ``R G B CLASS_ID`` line per colour (commas or spaces; blank
    lines and ``#`` comments skipped), e.g. ``128,64,128,3``, ``VALUE CLASS_ID`` lines (a
    value map), or a ``class_dict.csv`` table (``name,r,g,b``); with the table's class
    names, if it has them."""
    from .datasets.color_maps import read_color_map

    try:
        return read_color_map(path)
    except AutomaskError as exc:
        raise AutomaskError(f"--color-map: {exc}") from None


DEFAULT_PRESETS = "medium_quality"
# SemanticSegmentor arguments of ``fit``: their defaults, used when not given (and, with
# --resume, replaced by the interrupted fit's recorded values instead)
_FIT_PARAMS = {"label": "label", "image": "image", "eval_metric": None, "seed": 0}


def _resume_inputs(args):
    """(train data, fit arguments, constructor arguments) of ``fit --resume``.

    Every option starts from the interrupted fit's record; the options given on the
    command line replace their recorded values, so that the fit checks them against the
    record (a differing one is refused, naming it) instead of silently ignoring them.
    """
    train, call, params = _recorded_fit(args.path)
    for key in _FIT_PARAMS:
        if getattr(args, key) is not None:
            params[key] = getattr(args, key)
    if args.train is not None or args.images is not None or args.masks is not None:
        train, names, hp, color_map = _fit_inputs(args, params["image"], params["label"])
    else:
        color_map, table_names = (_read_color_map(args.color_map) if args.color_map
                                  else (None, None))
        hp = _fit_hp(args)
        names = _fit_names(args, hp, table_names)
    if hp:  # the keys given replace theirs; the others stay as recorded
        call["hyperparameters"] = {**(call.get("hyperparameters") or {}), **hp}
    given = {"tuning_data": args.tuning, "presets": args.presets,
             "time_limit": args.time_limit, "num_classes": args.num_classes,
             "class_names": names, "color_map": color_map}
    call.update({key: value for key, value in given.items() if value is not None})
    return train, call, params


def _recorded_fit(path: str):
    """(train data, fit arguments, constructor arguments) of the interrupted fit in path."""
    from pathlib import Path

    from .data.io import color_map_from_rows
    from .training.state import FitState

    state = FitState(Path(path))
    if not state.exists():
        raise AutomaskError(f"nothing to resume: {path!r} holds no interrupted fit")
    plan = state.plan()  # unreadable JSON: ConfigError naming the file
    record = state.root / "plan.json"
    try:  # valid JSON, but not a plan (edited, truncated by hand, another version)
        call, params = dict(plan["call"]), dict(plan["params"])
        call["color_map"] = color_map_from_rows(call["color_map"])
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise AutomaskError(f"cannot resume: {str(record)!r} is not a fit record "
                            f"({type(exc).__name__}: {exc}); fit again with --overwrite") from None
    train = state.data_file("train")
    if train is None:
        raise AutomaskError(f"cannot resume: {str(state.root / 'train.csv')!r}, the recorded "
                            "training data, is missing; fit again with --overwrite")
    tuning = state.data_file("tuning")
    call["tuning_data"] = str(tuning) if tuning is not None else None
    return str(train), call, params


def _load(run: str, args=None):
    """The predictor saved in ``run``, reading the columns ``--image`` / ``--label`` of
    ``args`` (where the command has them) instead of the ones it was fitted with."""
    from .segmentor import SemanticSegmentor

    seg = SemanticSegmentor.load(run, checkpoint=getattr(args, "checkpoint", None))
    for column in ("image", "label"):
        name = getattr(args, column, None)
        if name is not None:
            setattr(seg, column, name)
    return seg


def _cmd_predict(args) -> None:
    from .tiling import check_tiling

    check_tiling(args.tile)  # before loading anything
    tta = _tta(args.tta)
    if args.proba and args.values != "class_ids":
        raise AutomaskError("--values applies to masks; --proba writes probabilities")
    if os.path.isdir(os.path.expanduser(args.run)):  # (else loading names the run first)
        _check_predict_paths(args.data, args.out)  # before the models load (vit_h: seconds)
    seg = _load(args.run, args)
    if args.values == "dataset" and not seg.color_map_:  # said in this command's options
        raise AutomaskError("--values dataset needs a model fitted with a color map (its "
                            "class ids are the values its training masks held); leave "
                            "--values out, or give --values class_ids")
    boxes, rows = _read_boxes(args.boxes, args.data, seg.image) if args.boxes else (None, [])
    with _boxes_csv_rows(args.boxes, rows):  # a box's error names its --boxes row
        if args.proba:
            written = _write_probabilities(seg, args.data, args.model, args.out,
                                           args.overwrite, args.tile, boxes, tta)
            print(f"wrote {written} probability maps (.npy, float32) to {args.out}")
            return
        written = seg.predict(args.data, model=args.model, save_to=args.out,
                              overwrite=args.overwrite, tiling=args.tile, boxes=boxes,
                              tta=tta, values=args.values)
    print(f"wrote {len(written)} masks to {args.out}")


def _check_predict_paths(data: str, out: str) -> None:
    """AutomaskError for a ``--data`` that is not there, or an ``--out`` that names a file
    (``--out x.png`` would become a folder called x.png), before any image is read or
    file written."""
    from .datasets.folders import IMAGE_SUFFIXES

    if not os.path.exists(os.path.expanduser(data)):
        raise AutomaskError(f"--data {data!r} does not exist: give a CSV, a folder of images "
                            "or an image file")
    suffix = os.path.splitext(out)[1].lower()
    if not os.path.isdir(out) and suffix in {*IMAGE_SUFFIXES, ".npy", ".csv"}:
        raise AutomaskError(f"--out {out!r} looks like a file name; --out is the folder the "
                            "masks (or .npy maps) are written into, one per image")


_RESOLUTION_HELP = ("score each prediction at its mask's original size (default), or at the "
                    "model's input resolution with the mask resized to it by nearest "
                    "neighbour (the paper's authors' protocol, with --tile off: a tiled "
                    "image is scored at its own size)")
_TILE_HELP = ("sliding windows at the original resolution: auto (the rule the model was "
              "trained with, data.large_images: by default images whose longer side exceeds "
              "1.25 x the model input), on (every image larger than the input) or off "
              "(resize to the input); default auto")


def _cmd_evaluate(args) -> None:
    tta = _tta(args.tta)
    _check_data_options(args, "no data: give --data CSV or --images DIR --masks DIR")
    seg = _load(args.run, args)
    metrics = _split(args.metrics, "--metrics")
    data = _folders(args, seg.image, seg.label)
    data = data if data is not None else args.data
    _print_scores(seg.evaluate(data, metrics=metrics, model=args.model,
                               resolution=args.resolution, tiling=args.tile, tta=tta), args.json,
                  class_names=seg.classes_)


def _tta(text: str | None) -> bool | list[str]:
    """``--tta``: absent False, alone True (the flips the model was trained with), else
    comma-separated flip names; checked before any model loads."""
    if text is None:
        return False
    if text == _TTA_TRAINED:
        return True
    names = _split(text, "--tta")
    from .tta import FLIPS

    bad = [name for name in names or [] if name not in FLIPS]
    if bad:
        raise AutomaskError(f"--tta expects flip names among {sorted(FLIPS)} (comma-"
                            f"separated), or nothing for the model's training flips; got "
                            f"{', '.join(map(repr, bad))}")
    return names


_TTA_TRAINED = "trained"  # --tta with no value
_TTA_HELP = ("test-time augmentation: also predict each image mirrored and average the "
             "probabilities; alone, the flips the model was trained with, or name them: "
             "hflip, vflip or hflip,vflip (one more forward pass per flip)")


def _parse_extra(items: Sequence[str]) -> dict[str, str]:
    """``NAME=DIR`` pairs of ``--extra``; a name given twice is an error."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise AutomaskError(f"--extra expects NAME=DIR, got {item!r}")
        if name in out:
            raise AutomaskError(f"--extra names {name!r} twice")
        out[name] = folder
    return out


def _show_or_save(df, args) -> None:
    """Print a table (or its JSON); with ``--out``, write it as .csv or .md as well."""
    from .leaderboard import save_table

    if args.out:  # checked by the command before any work (check_output_file)
        save_table(df, args.out)
    _print_table(df, args.json)
    if args.out:
        print(f"wrote {args.out}", file=sys.stderr)


def _cmd_leaderboard(args) -> None:
    _check_data_options(args, None)  # without data: the validation scores of the fit
    from .leaderboard import check_table_path

    extra = _parse_extra(args.extra)
    if args.out:
        check_table_path(args.out)  # a bad suffix or folder fails before any model is scored
        from .prediction import check_output_file

        data = {os.path.realpath(os.path.expanduser(args.data)): "--data file"} \
            if args.data is not None else None
        check_output_file(args.out, "the table", inputs=data, predictor=args.run)
    metrics = _split(args.metrics, "--metrics")
    seg = _load(args.run, args)
    frame = _folders(args, seg.image, seg.label)  # --images/--masks, as evaluate takes them
    board = seg.leaderboard(frame if frame is not None else args.data, extra=extra,
                            style=args.style, metrics=metrics, resolution=args.resolution,
                            tiling=args.tile)
    _show_or_save(board, args)


def _cmd_params(args) -> None:
    from .leaderboard import paper_params
    from .models import parameter_summary

    methods = _split(args.methods, "--methods")
    if not 1 <= args.num_classes <= 255:  # as fit takes it (1 or 2: binary)
        raise AutomaskError(f"--num-classes must be an integer in [1, 255] (background "
                            f"included; 1 or 2: binary), got {args.num_classes}")
    if args.out:  # a bad file fails before the models are built
        from .leaderboard import check_table_path
        from .prediction import check_output_file

        check_table_path(args.out)
        check_output_file(args.out, "the table")
    summary = parameter_summary(args.backbone, methods=methods, num_classes=args.num_classes,
                                multiclass_head=args.multiclass_head)
    _show_or_save(paper_params(summary) if args.style == "paper" else summary, args)


def _cmd_score(args) -> None:
    for option, folder in (("--pred", args.pred), ("--gt", args.gt)):
        if not os.path.isdir(os.path.expanduser(folder)):  # before torch loads: in 0.1 s
            what = "does not exist" if not os.path.exists(os.path.expanduser(folder)) else \
                "is a file"
            raise AutomaskError(f"{option} {folder!r} {what}: give the folder of the "
                                f"{'predicted masks' if option == '--pred' else 'ground truths'}")
    from .metrics import score_folders

    metrics = _split(args.metrics, "--metrics")
    conventions = {} if args.ignore_index is None else {"ignore_index": args.ignore_index}
    names = _split(args.class_names)
    color_map, table_names = _score_color_map(args)
    if names is None and table_names is None and args.task != "binary":
        names = _classes_file_beside(args.gt, args.ignore_index, color_map)  # classes.txt
        if names is not None and len(names) <= 2 and args.task is None:
            names = None  # background and object: the task stays the data's to say
    task = args.task
    if names is not None and task != "binary" and (task == "multiclass" or len(names) > 2):
        # the names say how many classes there are, as a fit's class_names do: one that no
        # labelled pixel holds (void wherever it occurs) is still a class, of IoU NaN
        task, conventions["num_classes"] = "multiclass", len(names)
    try:
        scores = score_folders(args.pred, args.gt, task=task, metrics=metrics,
                               color_map=color_map, extra_masks=args.extra_masks,
                               **conventions)
    except (ValueError, TypeError) as exc:  # its advice in this command's options
        beyond = re.search(r"(target|predicted) class index (\d+) is outside \[0, \d+\)",
                           str(exc))
        if beyond and "num_classes" in conventions:  # set from the names above
            whose = "ground truths" if beyond.group(1) == "target" else "predictions"
            given = "--class-names" if args.class_names is not None else \
                "the classes.txt beside --gt"
            raise AutomaskError(
                f"{given} has {len(names)} names but the {whose} hold class "
                f"{beyond.group(2)} ({str(exc).split(': ')[0]}): name every class, "
                "background first") from exc
        fewer = re.search(r"score maps have (\d+) classes along dim 0, expected "
                          r"num_classes=(\d+)", str(exc))
        if fewer and "num_classes" in conventions:  # set from the names above
            from .data.validation import _VOID_NAMES, _folded

            given = "--class-names" if args.class_names is not None else \
                "the classes.txt beside --gt"
            void = [c for c, name in enumerate(names) if _folded(name) in _VOID_NAMES]
            advice = (f"; it names class {void[0]} {names[void[0]]!r}, as datasets name "
                      f"unlabelled pixels: pass --void-label {void[0]} to leave them out"
                      if void else ": name the classes of the model that wrote the maps, "
                      "background first")
            raise AutomaskError(
                f"{given} has {len(names)} names but the score maps have {fewer.group(1)} "
                f"classes ({str(exc).split(': ')[0]}){advice}") from exc
        raise AutomaskError(_as_options(str(exc))) from exc
    if args.class_names is None and table_names is None:
        _warn_of_a_scored_void(args.gt, args.ignore_index, scores)
    if names is None and table_names is not None:  # the table's, where they fit the scores
        per_class = {len(v) for v in scores.values() if isinstance(v, list)}
        if args.ignore_index == len(table_names) - 1:
            table_names = table_names[:-1]  # the void id is last (CamVid's "Void")
        names = table_names if per_class == {len(table_names)} else None
    _check_names(names, scores)
    _print_scores(scores, args.json, class_names=names)


def _classes_file_beside(gt: str, ignore_index: int | None,
                         color_map: dict | None) -> list[str] | None:
    """The class names of a ``classes.txt`` in or beside the ``--gt`` folder, as ``fit``
    reads them: through a value map's renumbering (names one per mask value), less a void
    last name (``--void-label`` its id). None without a file, or for one that names no
    class list automask reads (ids with gaps: a warning says so)."""
    import warnings

    from .data.io import is_value_map
    from .datasets.folders import (_renumbered_names, find_classes_file, read_class_names,
                                   without_void)

    found = find_classes_file(gt)
    if found is None:
        return None
    try:
        names = read_class_names(found)
    except (AutomaskError, ValueError) as exc:
        warnings.warn(f"the class names of {found} are not used: {exc}", stacklevel=2)
        return None
    if color_map and is_value_map(color_map):
        names = _renumbered_names(names, color_map)
    return without_void(names, ignore_index)


def _warn_of_a_scored_void(gt: str, ignore_index: int | None, scores: dict) -> None:
    """Warn when, without ``--void-label``, the scores count a class that the
    ``classes.txt`` in or beside ``--gt`` names as datasets name their unlabelled pixels
    (CamVid's ``11 Unlabelled``)."""
    import warnings

    from .data.validation import _VOID_NAMES, _folded
    from .datasets.folders import find_classes_file, read_class_names

    per_class = [v for v in scores.values() if isinstance(v, list)]
    found = find_classes_file(gt) if per_class else None
    if found is None:
        return
    try:
        names = read_class_names(found)
    except (AutomaskError, ValueError):
        return
    void = [c for c, name in enumerate(names) if _folded(name) in _VOID_NAMES]
    if ignore_index is None or ignore_index == 255:
        counted = [c for c in void if c < len(per_class[0])]
        if counted:
            c = counted[0]
            warnings.warn(
                f"{found} names class {c} {names[c]!r}, as datasets name the pixels they leave "
                f"unlabelled, and it is scored as a class; pass --void-label {c} to leave "
                "its pixels out", stacklevel=2)


def _score_color_map(args):
    """(colour map, its class names) of ``automask score``: ``--color-map``'s, else that of
    the colour table in or beside ``--gt`` when its ground truths are in colour."""
    if args.color_map:
        return _read_color_map(args.color_map)
    from pathlib import Path

    from .datasets.color_maps import color_table_for, read_color_map
    from .datasets.folders import listing

    try:
        first = min(listing(Path(args.gt).expanduser(), "ground-truth").values(), default=None)
    except AutomaskError:  # an empty folder, a broken link: score_folders names it
        return None, None
    table = color_table_for(args.gt, first) if first is not None else None
    return read_color_map(table) if table is not None else (None, None)


# score's advice in Python's words -> the options of ``automask score``
_OPTION_WORDS = [
    (re.compile(r"\btask='(binary|multiclass)'"), r"--task \1"),
    (re.compile(r"\bignore_index=(-?\d+)"), r"--ignore-index \1"),
    (re.compile(r"\bpass ignore_index=None\b"), "leave out --ignore-index"),
    (re.compile(r"\bextra_masks='union'"), "--extra-masks union"),
]


def _as_options(message: str) -> str:
    for pattern, words in _OPTION_WORDS:
        message = pattern.sub(words, message)
    return message


# The Python arguments that errors of predict, evaluate, leaderboard and show name, in
# their options' words (those commands take --tile, --boxes, --tta, --extra, --data, --n).
_PREDICT_OPTION_WORDS = [
    (re.compile(r"\btiling='(auto|on|off)' or '(auto|on|off)'"), r"--tile \1 or \2"),
    (re.compile(r"\btiling='(auto|on|off)'"), r"--tile \1"),
    (re.compile(r"\bpoints= and boxes= need\b"), "--boxes needs"),
    (re.compile(r"\bpoints= or boxes="), "--boxes"),
    (re.compile(r"^tta cannot\b"), "--tta cannot"),
    (re.compile(r"\bleave tta unset\b"), "leave out --tta"),
    (re.compile(r"\(extra=\.\.\.\)"), "(--extra)"),
    (re.compile(r"\(data=\.\.\.\)"), "(--data)"),
    (re.compile(r"^n must be\b"), "--n must be"),
    (re.compile(r"^save_to\b"), "--out"),
]
_PREDICTING_COMMANDS = ("predict", "evaluate", "leaderboard", "show")
# fit's options for the arguments of SemanticSegmentor.fit that its errors name
_FIT_OPTION_WORDS = [
    (re.compile(r"\b(overwrite|resume)=True \(--\1\)"), r"--\1"),
    (re.compile(r"\bfit\(\.\.\., resume=True\)"), "--resume"),
    (re.compile(r"\b(overwrite|resume)=True\b"), r"--\1"),
    (re.compile(r"^path\b"), "--path"),
    (re.compile(r"; pass None for a new folder under \S+$"), ""),  # --path is required
]


def _in_command_words(command: str | None, message: str) -> str:
    """An error's message as the command line says it: the options of ``command`` for the
    Python arguments an error names (``tiling='off'`` -> ``--tile off``,
    ``overwrite=True`` -> ``--overwrite``)."""
    if command in _PREDICTING_COMMANDS:
        words = _PREDICT_OPTION_WORDS
    elif command == "fit":
        words = _FIT_OPTION_WORDS
    else:
        return message
    for pattern, replacement in words:
        message = pattern.sub(replacement, message)
    return message


def _cmd_demo(args) -> None:
    from .demo import run_demo

    run_demo(path=args.path, time_limit=args.time_limit, seed=args.seed)


# ------------------------------------------- folders, class names, pictures
def _split(text: str | None, option: str = "--class-names") -> list[str] | None:
    """``"a,b,c"`` -> ``["a", "b", "c"]``; None stays None; ``option`` names the argument
    in the error an empty name raises."""
    if text is None:
        return None
    names = [part.strip() for part in text.split(",")]
    if not all(names):
        raise AutomaskError(f"{option} expects comma-separated names, got {text!r}")
    return names


def _folder_options(args) -> bool:
    """Whether ``--images``/``--masks`` are given; AutomaskError for one without the other,
    or a pairing option (``--mask-suffix``, ...) without them."""
    if args.images is None and args.masks is None:
        if args.mask_suffix is not None or args.image_suffix is not None \
                or args.extra_masks is not None or args.drop_unpaired:
            raise AutomaskError("--mask-suffix, --image-suffix, --extra-masks and "
                                "--drop-unpaired go with --images/--masks")
        return False
    if args.images is None or args.masks is None:
        raise AutomaskError("--images and --masks go together: give both folders")
    return True


def _folders(args, image_col: str, label_col: str):
    """DataFrame paired from ``--images``/``--masks`` (as ``from_folders``), or None."""
    if not _folder_options(args):
        return None
    from .datasets import from_folders

    return from_folders(args.images, args.masks, image_col=image_col, label_col=label_col,
                        mask_suffix=args.mask_suffix, image_suffix=args.image_suffix,
                        extra_masks=args.extra_masks, strict=not args.drop_unpaired)


def _check_data_options(args, missing: str | None) -> None:
    """The data options of evaluate, leaderboard and show, before the predictor loads
    (imports and weights: seconds): ``--data`` beside ``--images``/``--masks``, a folder
    option alone, and no data at all where the command needs some (``missing``: the message;
    None where data is optional)."""
    if not os.path.isdir(os.path.expanduser(args.run)):  # loading names the run first
        return
    folders = _folder_options(args)
    if folders and args.data is not None:
        raise AutomaskError("give either --data or --images/--masks, not both")
    if missing and not folders and args.data is None:
        raise AutomaskError(missing)


def _fit_inputs(args, image: str | None = None, label: str | None = None):
    """(training data, class names, hyperparameters, colour map) of ``automask fit``;
    ``image`` and ``label``: the columns of a frame paired from folders (default: --image,
    --label). The colour map is ``--color-map``'s, else that of the colour table found
    beside colour masks by ``from_folders``, else None."""
    image = image or args.image or _FIT_PARAMS["image"]
    label = label or args.label or _FIT_PARAMS["label"]
    frame = _folders(args, image, label)
    if frame is not None and args.train is not None:
        raise AutomaskError("give either --train or --images/--masks, not both")
    if frame is None and args.train is None:
        raise AutomaskError("no training data: give --train CSV or --images DIR --masks DIR")
    hp = _fit_hp(args)
    color_map, table_names = None, None
    if args.color_map:
        color_map, table_names = _read_color_map(args.color_map)
    # the colour table and classes.txt found beside the folders are the frame's attrs,
    # which fit takes for the options not given here (and says so)
    names = _fit_names(args, hp, table_names)
    return (frame if frame is not None else args.train), names, hp, color_map


def _fit_hp(args) -> dict[str, Any]:
    """``--hp`` overrides with ``--void-label`` folded in as ``data.void_label``."""
    hp = _parse_hp(args.hp)
    if args.void_label is not None:
        if hp.get("data.void_label", args.void_label) != args.void_label:
            raise AutomaskError(
                f"--void-label {args.void_label} disagrees with --hp "
                f"data.void_label={hp['data.void_label']}"
            )
        hp["data.void_label"] = args.void_label
    return hp


def _fit_names(args, hp: dict[str, Any], table_names: list[str] | None = None
               ) -> list[str] | None:
    """Class names of ``fit``: ``--class-names``, else those of the ``--color-map`` table
    (``table_names``); else None, and fit takes the folders' (their classes.txt, else
    their colour table's)."""
    from .datasets.folders import without_void

    names = _split(args.class_names)
    if names is None:
        names = table_names
    return without_void(names, hp.get("data.void_label"))


def _check_names(names: Sequence[str] | None, scores: dict) -> None:
    for key, value in scores.items():
        if names is not None and isinstance(value, list) and len(value) != len(names):
            raise AutomaskError(
                f"the class names are {len(names)} but {key} has {len(value)} classes"
            )


def _print_per_class(key: str, values: list, class_names: Sequence[str]) -> None:
    print(f"{key}:")
    width = max(len(n) for n in class_names)
    for i, (name, value) in enumerate(zip(class_names, values)):
        text = "nan (absent)" if value != value else f"{value:.4f}"
        print(f"  {i:>3} {name:<{width}}  {text}")


def _csv_number(value):
    """A CSV cell as a number where its text spells one (``" 4 "``, ``"2.5"``); else as it is."""
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return value
    return value


def _read_boxes(path: str, data, image_col: str) -> tuple[list, list]:
    """One box (or None) per image of ``data`` from ``--boxes``: a CSV with the image
    column and ``x0, y0, x1, y1`` (original pixels), one row per prompted image; and
    for each image its row of the CSV and the path written there (or None).

    Images are matched by path: the CSV's relative paths resolve against its folder,
    those of ``data`` as in predict. Images of ``data`` missing from the CSV get no box.
    """
    import math
    import os
    from pathlib import Path

    from .data.prompts import _check_box
    from .data.validation import _raw_path, _resolve, read_table
    from .errors import DataValidationError
    from .prediction import as_frame

    if Path(path).is_dir():
        raise DataValidationError(f"--boxes {path!r} is a folder, not a CSV file")
    if not Path(path).is_file():
        raise DataValidationError(f"--boxes file not found: {path!r}")
    table = read_table(Path(path), "--boxes")
    missing = [c for c in (image_col, "x0", "y0", "x1", "y1") if c not in table.columns]
    if missing:
        raise DataValidationError(
            f"--boxes {path!r} lacks the column(s) {missing}; it needs the image column "
            f"{image_col!r} and x0, y0, x1, y1")
    frame, root = as_frame(data, image_col)
    if image_col not in frame.columns:
        raise DataValidationError(
            f"--data {str(data)!r} has no image column {image_col!r} (columns: "
            f"{list(frame.columns)}), so --boxes cannot be matched to its images")
    base = Path(path).resolve().parent
    boxes: dict[str, tuple] = {}
    rows: dict[str, tuple] = {}
    for row, image, *box in table[[image_col, "x0", "y0", "x1", "y1"]].itertuples():
        raw = _raw_path(image)
        if raw is None:  # None, NaN, ""
            raise DataValidationError(
                f"--boxes {path!r}: row {row} has no image path (got {image!r})")
        key = os.path.realpath(_resolve(raw, base))  # "~" and relative paths as in --data
        if key in boxes:
            raise DataValidationError(f"--boxes {path!r}: row {row} repeats image {image!r}")
        # a CSV's cells are text where a column holds a word: "4" is read as the number
        # it spells, "four" stays for the check to refuse
        box = [_csv_number(v) for v in box]
        if all(isinstance(v, float) and math.isnan(v) for v in box):
            boxes[key], rows[key] = None, (row, image)  # an empty row: no box, as a NaN row
            continue
        try:  # values and order here, where the row is the CSV's; the image's bounds later
            _check_box(row, box, math.inf, math.inf)
        except DataValidationError as exc:
            raise DataValidationError(
                f"--boxes {path!r}: {str(exc).replace(f'row {row}:', f'row {row} ({image!r}):', 1)}"
            ) from None
        boxes[key] = tuple(box)
        rows[key] = (row, image)
    keys = [os.path.realpath(_resolve(_raw_path(p) or "", root or Path.cwd()))
            for p in frame[image_col]]  # a missing path matches nothing; predict names it
    unknown = sorted(set(boxes) - set(keys))
    if unknown:
        raise DataValidationError(
            f"--boxes {path!r} names images that are not in --data: {unknown[:3]}")
    return [boxes.get(key) for key in keys], [rows.get(key) for key in keys]


@contextlib.contextmanager
def _boxes_csv_rows(path: str | None, rows: list) -> Iterator[None]:
    """A box's error (outside its image, whose size is known only when predicting) names
    the ``--boxes`` CSV's row and image, not the row of ``--data`` it was matched to."""
    from .errors import DataValidationError

    try:
        yield
    except DataValidationError as exc:
        found = re.match(r"row (\d+): (box .*)", str(exc), re.DOTALL)
        pos = int(found.group(1)) if found else -1
        if not 0 <= pos < len(rows) or rows[pos] is None:
            raise
        row, image = rows[pos]
        raise DataValidationError(
            f"--boxes {path!r}: row {row} ({image!r}): {found.group(2)}") from None


def _write_probabilities(seg, data, model: str | None, out: str, overwrite: bool,
                         tiling: str = "auto", boxes: list | None = None,
                         tta: Any = False) -> int:
    """Write ``<stem>.npy`` float32 probability maps; returns how many.

    As for masks, every destination is checked first: an input file is never replaced, an
    existing file only with ``--overwrite``; if writing fails, the files written (and the
    folders created) are removed. ``boxes``: one box or None per image.
    """
    from .prediction import (
        as_frame,
        images_spec,
        iter_proba,
        mask_destinations,
        output_folder,
        write_probabilities,
    )

    from .data.arrays import as_files

    folder = output_folder(out, overwrite, predictor=seg.path_, option="--out")
    frame, root = as_frame(data, seg.image)
    with as_files(frame, [seg.image]) as files:  # a TIFF stack's pages, as temporary files
        spec = images_spec(files, seg.image, root)  # every image checked before writing
        dests = mask_destinations(spec, folder, root=root, label_col=seg.label,
                                  overwrite=overwrite, suffix=".npy")
        prompts = seg._prompts(spec, tiling, None, boxes)  # every box checked, too
        net, cfg = seg._model(model), seg._config(model)  # an unknown --model fails here
        with contextlib.closing(iter_proba(net, cfg, seg.task_, spec, tiling, prompts,
                                           tta=tta)) as probs:
            write_probabilities(probs, dests, folder, seg.task_,
                                overwrite=overwrite)  # streaming
    return len(spec)


def _model_names(values: list[str], known) -> list[str]:
    """The candidates ``--models`` names (each value one name or several, comma-separated):
    commas inside a candidate's own name (``method=lora,seed=1``) are kept, the longest
    known name read first; an unknown part stays as it is, for the error to name."""
    names = []
    for value in values:
        parts = _split(value, "--models")
        i = 0
        while i < len(parts):
            j = next((j for j in range(len(parts), i, -1) if ",".join(parts[i:j]) in known),
                     i + 1)
            names.append(",".join(parts[i:j]))
            i = j
    return names


def _cmd_show(args) -> None:
    _check_data_options(args, "no data: give --data (CSV, folder, image) or --images/--masks")
    if args.models is not None:
        _split(",".join(args.models), "--models")  # an empty name, before the model loads
    seg = _load(args.run, args)
    models = None if args.models in (None, ["all"]) else _model_names(args.models, seg.models_)
    data = _folders(args, seg.image, seg.label)
    if data is None and os.path.splitext(args.data)[1].lower() in (".csv", ".tsv"):
        _warn_without_labels(args.data, seg.label)
    data = data if data is not None else args.data
    if args.models:
        seg.plot_comparison(data, models=models, n=args.n, path=args.out)
    else:
        seg.plot_predictions(data, n=args.n, model=args.model, path=args.out)
    print(f"wrote {_picture_path(args.out)}")


def _warn_without_labels(table: str, label: str) -> None:
    """Warn when the ``--data`` table of ``show`` has no ``label`` column: the picture
    is drawn without its ground-truth column, which another column may hold."""
    import warnings
    from pathlib import Path

    from .data.validation import read_table

    try:
        columns = list(read_table(Path(os.path.expanduser(table)), "--data").columns)
    except (AutomaskError, ValueError, OSError):
        return  # drawing names the problem
    if label not in columns:
        warnings.warn(f"--data {table!r} has no label column {label!r} (columns: {columns}): "
                      "drawn without the ground truth; --label names the mask column",
                      stacklevel=2)


def _picture_path(out: str) -> str:
    """The file a picture named ``out`` was written to (``.png`` added to a bare name)."""
    from .plots import check_path

    return str(check_path(out))


def _cmd_history(args) -> None:
    from .plots import plot_history

    plot_history(args.run, metric=args.metric, path=args.out)
    print(f"wrote {_picture_path(args.out)}")


def _seconds(text: str) -> float:
    """argparse type of ``--time-limit``: a positive, finite number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(
            f"must be a positive, finite number of seconds, got {text!r}")
    return value


def _add_command(sub, name: str, **kwargs) -> argparse.ArgumentParser:
    """A command's parser, taking ``--debug`` after the command as well as before it (this
    copy has no default, so it never resets a ``--debug`` given before the command)."""
    p = sub.add_parser(name, **kwargs)
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show tracebacks on errors")
    return p


def _add_checkpoint_arg(p: argparse.ArgumentParser) -> None:
    """``--checkpoint PATH`` of the commands that load a saved predictor."""
    p.add_argument("--checkpoint", metavar="PATH",
                   help="the SAM checkpoint the models were trained on, where it is now "
                        "(when the file recorded at fit time has moved)")


def _add_folder_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", help="folder of images, paired by file name with --masks")
    p.add_argument("--masks", help="folder of masks (pairing as automask.datasets.from_folders)")
    p.add_argument("--mask-suffix", metavar="END",
                   help="ending of the masks' names after the shared name, e.g. "
                        "_gtFine_labelIds (default: one of the usual ones, or one all masks share)")
    p.add_argument("--image-suffix", metavar="END",
                   help="ending of the images' names after the shared name, e.g. _leftImg8bit")
    p.add_argument("--extra-masks", choices=["union"],
                   help="an image's further masks, named as its mask plus a number "
                        "(BUSI's x_mask_1.png beside x_mask.png): merged into one")
    p.add_argument("--drop-unpaired", action="store_true",
                   help="leave out (with a warning listing them) the images without a mask "
                        "and the masks without an image, instead of stopping")


def _add_class_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--class-names", metavar="A,B,C",
                   help="class names, background first (default: classes.txt in or beside "
                        "the --masks folder, one name or '<id> <name>' per line)")
    p.add_argument("--void-label", type=int, metavar="N",
                   help="mask value to ignore in losses and metrics (data.void_label)")


def _add_score_conventions(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument("--ignore-index", type=int, metavar="N",
                       help="ground-truth value left out of the metrics: void (multi-class "
                            "default 255; binary: none)")
    group.add_argument("--void-label", type=int, dest="ignore_index", metavar="N",
                       help="same as --ignore-index (e.g. 11 for CamVid's void)")
    p.add_argument("--class-names", metavar="A,B,C", help="names for per-class results")


def _add_picture_commands(sub) -> None:
    p = _add_command(sub, "show", help="draw image | ground truth | prediction overlays (PNG)")
    p.add_argument("run", help="saved predictor directory")
    _add_checkpoint_arg(p)
    p.add_argument("--data", help="CSV (with labels: ground truth shown), image folder or image")
    p.add_argument("--label", help="label column of the --data CSV (default: the fit's)")
    p.add_argument("--image", help="image column of the --data CSV (default: the fit's)")
    _add_folder_args(p)
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--n", type=int, default=4, help="images to draw (the first n; default: 4)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--model", help="candidate to draw (default: the best)")
    which.add_argument("--models", metavar="A,B,C", action="append",
                       help="compare these candidates side by side ('all' for every one): "
                            "comma-separated or the option repeated; a name with commas "
                            "of its own (method=lora,seed=1) is read whole")
    p.set_defaults(func=_cmd_show)

    p = _add_command(sub, "history", help="draw training loss and validation curves (PNG)")
    p.add_argument("run", help="run directory of a fit (holding logs/<candidate>/metrics.csv)")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--metric", help="validation metric to draw (default: the one logged)")
    p.set_defaults(func=_cmd_history)


def _cmd_export(args) -> None:
    path = _load(args.run, args).export(args.out, format=args.format, model=args.model)
    print(f"exported to {path}")


class _Parser(argparse.ArgumentParser):
    """A usage error is one line, as every other error of the command line (exit status 2),
    naming the ``--help`` to read instead of printing the whole usage."""

    commands: dict[str, argparse.ArgumentParser] | None = None  # the top parser's commands
    given: list[str] = []  # the arguments being parsed, for hints in a command's errors

    def error(self, message: str):
        if message.startswith("the following arguments are required"):  # predict RUN data.csv
            name = self.prog.split()[-1]
            given = _Parser.given
            after = given[given.index(name) + 1:] if name in given else []
            message += _data_hint(name, _stray_paths(self, after))
        self.exit(EXIT_USER_ERROR, f"automask: error: {message} (see: {self.prog} --help)\n")

    def parse_args(self, args=None, namespace=None):
        """As argparse's, but arguments a command does not take name that command's
        ``--help`` (argparse reports them from the top parser: ``automask --help``)."""
        _Parser.given = list(sys.argv[1:] if args is None else args)
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            name = getattr(parsed, "command", None)
            command = (self.commands or {}).get(name, self)
            command.error(f"unrecognized arguments: {' '.join(extras)}{_data_hint(name, extras)}")
        return parsed


# where each command takes the files of its data, for a path given without its option
_DATA_OPTIONS = {
    "fit": "--train CSV, or --images DIR --masks DIR",
    "predict": "--data (a CSV, an image folder or an image file)",
    "evaluate": "--data CSV, or --images DIR --masks DIR",
    "leaderboard": "--data CSV, or --images DIR --masks DIR",
    "show": "--data CSV, or --images DIR --masks DIR",
    "score": "--pred and --gt",
}


def _stray_paths(command: argparse.ArgumentParser, given: list[str]) -> list[str]:
    """Existing paths among a command's arguments given without an option, past those its
    positional arguments (its ``run``) take."""
    stray, after_option = [], False
    for token in given:
        if token.startswith("-"):
            after_option = "=" not in token
        elif not after_option and os.path.exists(token):
            stray.append(token)
        else:
            after_option = False
    taken = sum(1 for a in command._actions if not a.option_strings)
    return stray[taken:]


def _data_hint(command: str | None, extras: list[str]) -> str:
    """``automask fit data.csv --path run``: name the option that takes the file."""
    if command not in _DATA_OPTIONS or not any(
            not e.startswith("-") and os.path.exists(e) for e in extras):
        return ""
    return f"; give data files after their option: {command} {_DATA_OPTIONS[command]}"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="automask", description="Semantic segmentation with SAM and Conv-LoRA."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"automask {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    parser.commands = sub.choices

    p = _add_command(sub, "fit", help="fit models on a CSV of image/mask paths or on two folders")
    p.add_argument("--train", help="CSV with image and label columns (or --images/--masks; "
                                   "not needed with --resume)")
    p.add_argument("--tuning", help="CSV of validation data (default: a holdout split)")
    p.add_argument("--presets", help=f"preset (default: {DEFAULT_PRESETS}; with --resume: "
                                      "the recorded one)")
    p.add_argument("--hp", action="append", default=[], metavar="KEY=VALUE",
                   help="hyperparameter override; repeat a key for several candidates")
    p.add_argument("--time-limit", type=_seconds, help="seconds for the whole fit")
    p.add_argument("--path", required=True, help="run directory to save the predictor in")
    p.add_argument("--label", help="label column of the CSVs (default: label)")
    p.add_argument("--image", help="image column of the CSVs (default: image)")
    p.add_argument("--eval-metric",
                   help="validation metric that chooses the best epoch and model (default: iou "
                        "binary, miou multi-class)")
    p.add_argument("--num-classes", type=int,
                   help="classes including background (default: from the masks; 2 for binary)")
    p.add_argument("--color-map", metavar="FILE",
                   help="colour masks: a text file of 'R G B CLASS_ID' lines (commas or "
                        "spaces), every colour of the masks listed, or a class_dict.csv "
                        "(name,r,g,b: ids in row order); default: the class_dict.csv in or "
                        "beside the --masks folder when the masks are in colour. Grey or "
                        "palette masks to renumber: 'VALUE CLASS_ID' lines, every value "
                        "listed (a void 0 below classes 1..K: '0 255', '1 0', '2 1', ...)")
    p.add_argument("--seed", type=int, help="random seed (default: 0)")
    p.add_argument("--verbosity", type=int, default=2, choices=range(4),
                   help="0 silent, 1 a line per epoch and a summary, 2 also a progress bar "
                        "on a terminal (default), 3 debug")
    _add_folder_args(p)
    _add_class_args(p)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--overwrite", action="store_true",
                      help="replace the predictor already in --path")
    mode.add_argument("--resume", action="store_true",
                      help="continue the interrupted fit in --path (other options: as recorded)")
    p.set_defaults(func=_cmd_fit)

    p = _add_command(sub, "predict", help="write predicted masks as PNG files")
    p.add_argument("run", help="saved predictor directory")
    _add_checkpoint_arg(p)
    p.add_argument("--data", required=True,
                   help="CSV, image folder, image file, or a list of image paths one per line")
    p.add_argument("--out", required=True, help="folder for the masks")
    p.add_argument("--image", help="image column of the CSV (default: the fit's)")
    p.add_argument("--model", help="candidate name (default: the best)")
    p.add_argument("--proba", action="store_true",
                   help="write probability maps instead of masks: <stem>.npy, float32, "
                        "(H, W) foreground probability (binary) or (K, H, W) (multi-class)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing mask files in --out (input files never are)")
    p.add_argument("--tile", default="auto", choices=("auto", "on", "off"), help=_TILE_HELP)
    p.add_argument("--boxes", metavar="CSV",
                   help="box prompts (binary models): a CSV with the image column and x0, "
                        "y0, x1, y1 in original pixels, one row per prompted image; the "
                        "other images are predicted without prompts")
    p.add_argument("--tta", nargs="?", const=_TTA_TRAINED, metavar="FLIPS", help=_TTA_HELP)
    p.add_argument("--values", choices=("class_ids", "dataset"), default="class_ids",
                   help="what the masks hold: class ids (default; 0/255 for binary), or, "
                        "for a model fitted with a color map, the training masks' own "
                        "values or colours (the map read backwards)")
    p.set_defaults(func=_cmd_predict)

    p = _add_command(sub, "evaluate", help="score a saved predictor on labelled data")
    p.add_argument("run", help="saved predictor directory")
    _add_checkpoint_arg(p)
    p.add_argument("--data", help="CSV with image and label columns (or --images/--masks)")
    p.add_argument("--metrics", help="comma-separated metric names")
    p.add_argument("--model", help="candidate name (default: the best)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--label", help="label column of the CSV (default: the fit's)")
    p.add_argument("--image", help="image column of the CSV (default: the fit's)")
    p.add_argument("--resolution", choices=["original", "input"], default="original",
                   help=_RESOLUTION_HELP)
    p.add_argument("--tile", default="auto", choices=("auto", "on", "off"), help=_TILE_HELP)
    p.add_argument("--tta", nargs="?", const=_TTA_TRAINED, metavar="FLIPS", help=_TTA_HELP)
    _add_folder_args(p)
    p.set_defaults(func=_cmd_evaluate)

    p = _add_command(sub, "leaderboard", help="the trained models side by side")
    p.add_argument("run", help="saved predictor directory")
    _add_checkpoint_arg(p)
    p.add_argument("--data", help="CSV of test data to score every model on (or "
                                  "--images/--masks)")
    p.add_argument("--extra", action="append", default=[], metavar="NAME=DIR",
                   help="a row scoring another model's masks in DIR on the test data; "
                        "repeatable")
    p.add_argument("--style", choices=["models", "methods", "paper"],
                   help="rows per model, per method (mean and std over seeds), or the "
                        "paper's table (default: methods when runs differ only by seed)")
    p.add_argument("--metrics", help="comma-separated test metric names")
    p.add_argument("--label", help="label column of the --data CSV (default: the fit's)")
    p.add_argument("--image", help="image column of the --data CSV (default: the fit's)")
    p.add_argument("--out", help="also write the table to this .csv or .md file")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--resolution", choices=["original", "input"], default="original",
                   help=_RESOLUTION_HELP)
    p.add_argument("--tile", default="auto", choices=("auto", "on", "off"), help=_TILE_HELP)
    _add_folder_args(p)
    p.set_defaults(func=_cmd_leaderboard)

    p = _add_command(sub, "export", help="export a model to ONNX (or a torch.export .pt2)")
    p.add_argument("run", help="saved predictor directory")
    _add_checkpoint_arg(p)
    p.add_argument("--out", required=True, help="file to write, e.g. model.onnx")
    p.add_argument("--format", choices=["onnx", "pt2"],
                   help="default: from the suffix of --out (.onnx or .pt2)")
    p.add_argument("--model", help="candidate name (default: the best)")
    p.set_defaults(func=_cmd_export)

    p = _add_command(sub, "params", help="trainable parameters per PEFT method")
    p.add_argument("--backbone", default="vit_h",
                   help="backbone to count (default: vit_h, the paper's)")
    p.add_argument("--methods", help="comma-separated PEFT methods (default: all)")
    p.add_argument("--num-classes", type=int, default=1,
                   help="classes, background included, as fit counts them (1 or 2 = binary)")
    p.add_argument("--multiclass-head", default="tokens",
                   choices=["tokens", "mask_classification"], help="head for 2+ classes")
    p.add_argument("--style", choices=["counts", "paper"], default="counts",
                   help="raw counts, or the paper's '#Params (M) / Ratio (%%)' column")
    p.add_argument("--out", help="also write the table to this .csv or .md file")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_cmd_params)

    p = _add_command(sub, "score", help="score mask files against ground-truth files")
    p.add_argument("--pred", required=True, help="folder of predicted masks/probability maps")
    p.add_argument("--gt", required=True, help="folder of ground-truth masks")
    p.add_argument("--task", choices=["binary", "multiclass"],
                   help="the task of the masks (default: from their values and any class names)")
    p.add_argument("--metrics", help="comma-separated metric names")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--color-map", metavar="FILE",
                   help="colour-coded ground truths: their colour table, as fit's --color-map "
                        "(default: the class_dict.csv in or beside --gt when the ground "
                        "truths are in colour); 'VALUE CLASS_ID' lines renumber grey ground "
                        "truths, not the predictions")
    p.add_argument("--extra-masks", choices=["union"],
                   help="a ground truth's further masks, named as it plus a number (BUSI's "
                        "x_mask_1.png beside x_mask.png): scored as their union")
    _add_score_conventions(p)
    p.set_defaults(func=_cmd_score)
    _add_picture_commands(sub)

    p = _add_command(sub, "demo", help="generate data, fit, evaluate and draw predictions")
    p.add_argument("--path", help="run directory (default: a new one under automask_runs/)")
    p.add_argument("--time-limit", type=_seconds, default=180.0,
                   help="seconds for the demo's fit (default 180; at least 30 are used)")
    p.add_argument("--seed", type=int, default=0,
                   help="random seed of the data and the fit (default: 0)")
    p.set_defaults(func=_cmd_demo)
    return parser


# options whose empty value means something (masks named exactly as their images) or is
# refused by the option's own check, which says more (--tta lists the flips it takes)
_MAY_BE_EMPTY = {"mask_suffix", "image_suffix", "tta"}


def _check_blank_options(args) -> None:
    """An option given as an empty string (an unset environment variable, ``--data "$X"``)
    is refused, naming it: read as a path it would be the working folder, and tested for
    truth it would be no option at all."""
    for name, value in vars(args).items():
        if isinstance(value, str) and not value.strip() and name not in _MAY_BE_EMPTY \
                and name not in ("command", "run"):  # run: named by _check_run
            raise AutomaskError(f"--{name.replace('_', '-')} is empty ({value!r}); an unset "
                                "environment variable?")


def _check_run(args) -> None:
    """The ``run`` folder of a command that reads one, when it is not there: named at once
    rather than after torch and Lightning load (seconds), in the words of loading it."""
    run = getattr(args, "run", None)
    if run is None or (run.strip() and os.path.exists(os.path.expanduser(run))):
        return
    from .errors import SavedModelError

    what = ("the run directory of a fit" if args.command == "history"
            else "the folder of a saved automask predictor")
    if not run.strip():  # "" is no folder, not the working one
        raise SavedModelError(f"the run folder is empty ({run!r}): pass {what}")
    raise SavedModelError(f"no such folder {os.path.abspath(os.path.expanduser(run))!r}: "
                          f"pass {what}")


@contextlib.contextmanager
def _plain_warnings():
    """automask's own warnings printed as ``automask: warning: ...``, as its errors are,
    without the file, line number and source line that Python adds (``--debug`` keeps
    them); other libraries' warnings as Python prints them."""
    import warnings

    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    python_format = warnings.formatwarning

    def format_warning(message, category, filename, lineno, line=None):
        if os.path.abspath(filename).startswith(package):
            return f"automask: warning: {message}\n"
        return python_format(message, category, filename, lineno, line)

    warnings.formatwarning = format_warning
    try:
        yield
    finally:
        warnings.formatwarning = python_format


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _check_blank_options(args)
        _check_run(args)
        # SIGTERM (docker stop, SLURM) as Ctrl-C: what a command wrote goes; a fit keeps
        # Lightning's own handling, which keeps its completed epochs
        with contextlib.nullcontext() if args.debug else _plain_warnings(), \
                contextlib.nullcontext() if args.func is _cmd_fit else sigterm_as_interrupt():
            args.func(args)
    except BrokenPipeError:  # stdout's reader is gone (| head): end quietly, as cat does
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except (AutomaskError, ValueError, OSError) as exc:  # bad input, unusable files or folders
        if args.debug:
            raise
        print(f"automask: error: {_in_command_words(args.command, str(exc))}",
              file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("automask: interrupted", file=sys.stderr)
        return 130
    return 0


def run() -> int:
    """The process's entry point (the ``automask`` script, ``python -m automask``):
    :func:`main` on ``sys.argv``, then its exit status.

    Before the interpreter exits, every object is moved out of the garbage collector's
    reach (``gc.freeze``): its final collection would walk the several hundred thousand
    objects that torch, Lightning and torchmetrics create at import, about 1.2 s of every
    command on a 2-core CPU (``benchmarks/bench_startup.py``). Exit handlers and
    ``weakref.finalize`` callbacks (temporary folders) still run; the process ends anyway,
    so the uncollected cycles are not leaked to anything.
    """
    try:
        return main()
    finally:
        gc.freeze()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run())
