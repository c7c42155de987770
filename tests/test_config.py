"""The configuration tree, presets and the merge function."""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from automask.config import Config, flat_hyperparameters, reference, resolve
from automask.errors import ConfigError
from automask.presets import PRESETS, list_presets

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_resolve_to_one_candidate():
    [(name, cfg)] = resolve(None, {})
    assert name == "default"
    assert cfg == Config()


def test_user_keys_override_preset_which_overrides_defaults():
    [(_, cfg)] = resolve("high_quality", {"peft.rank": 8, "optim.lr": "3e-4"})
    assert cfg.model.backbone == "vit_l"  # from the preset
    assert cfg.peft.rank == 8  # user
    assert cfg.optim.lr == pytest.approx(3e-4)  # string coerced to the field's type
    assert cfg.optim.weight_decay == Config().optim.weight_decay  # default


def test_unknown_key_names_the_closest_valid_one():
    with pytest.raises(ConfigError, match=r"'peft\.rnak'.*did you mean 'peft\.rank'"):
        resolve(None, {"peft.rnak": 4})


def test_invalid_values_name_the_key():
    with pytest.raises(ConfigError, match=r"'peft\.method'.*did you mean 'conv_lora'"):
        resolve(None, {"peft.method": "convlora"})
    with pytest.raises(ConfigError, match=r"'model\.input_size'"):
        resolve(None, {"model.input_size": 1000})
    with pytest.raises(ConfigError, match=r"'optim\.lr'"):
        resolve(None, {"optim.lr": "fast"})
    with pytest.raises(ConfigError, match=r"'peft\.top_k'"):
        resolve(None, {"peft.top_k": 9})
    with pytest.raises(ConfigError, match=r"'data\.hflip'"):
        resolve(None, {"data.hflip": "sometimes"})


def test_unknown_key_suggests_the_known_alias_first():
    with pytest.raises(ConfigError, match=r"'optim\.learning_rate'.*did you mean 'optim\.lr'"):
        resolve(None, {"optim.learning_rate": 1e-3})
    with pytest.raises(ConfigError, match=r"'epochs'.*did you mean 'optim\.max_epochs'"):
        resolve(None, {"epochs": 3})
    for bare, key in [("lr", "optim.lr"), ("rank", "peft.rank"),
                      ("max_epochs", "optim.max_epochs"), ("Backbone", "model.backbone")]:
        with pytest.raises(ConfigError, match=rf"'{bare}'; did you mean '{re.escape(key)}'\?"):
            resolve(None, {bare: 1})


@pytest.mark.parametrize("given, meant", [
    ("Tiny", "tiny"), ("best", "best_quality"), ("medium", "medium_quality"),
    ("paper_kvasir", "paper_polyp"), ("paper_kvasr", "paper_polyp"), ("shadow", "paper_sbu"),
    ("paper_table_cod10k", "paper_table_camo"), ("isic2018", "paper_isic2017"),
    ("road_segmentation", "paper_road"), ("medium_qualty", "medium_quality"),
    ("paper_tabel", "paper_table"),
])
def test_an_unknown_preset_names_the_one_meant(given, meant):
    """A preset asked by its dataset's name (or mistyped, or cut short) suggests the preset
    made for that kind of data, not the closest spelling of another ('paper_kvasr' was
    answered with 'paper_sbu')."""
    with pytest.raises(ConfigError, match=rf"unknown preset '{given}'; did you mean "
                                          rf"'{meant}'\?; valid presets: medium_quality"):
        resolve(given, {})


def test_a_preset_like_no_other_gets_no_suggestion():
    with pytest.raises(ConfigError) as info:
        resolve("xyz", {})
    assert "did you mean" not in str(info.value) and "valid presets: " in str(info.value)


def test_nested_hyperparameters_resolve_as_their_dotted_keys():
    """``{"optim": {"lr": ...}}`` (as Hydra or a YAML file gives them) is ``optim.lr``;
    lists inside still make candidates; a key given both ways, or a nested typo, is named."""
    nested = resolve("tiny", {"optim": {"lr": 3e-4, "max_epochs": [1, 2]},
                              "peft": {"method": "lora", "rank": 8}})
    dotted = resolve("tiny", {"optim.lr": 3e-4, "optim.max_epochs": [1, 2],
                              "peft.method": "lora", "peft.rank": 8})
    assert nested == dotted and len(nested) == 2
    assert nested[0][1].optim.lr == pytest.approx(3e-4) and nested[1][1].peft.rank == 8
    with pytest.raises(ConfigError, match=r"'optim\.lr' is given twice"):
        resolve("tiny", {"optim": {"lr": 1e-3}, "optim.lr": 1e-4})
    with pytest.raises(ConfigError, match=r"'optim\.lrr'.*did you mean 'optim\.lr'"):
        resolve("tiny", {"optim": {"lrr": 1e-3}})


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(ConfigError, match="valid presets: " + ", ".join(PRESETS)):
        resolve("hgh_quality", {})


def test_list_values_make_candidates_with_readable_names():
    cands = resolve("tiny", {"peft.method": ["full", "lora"], "peft.rank": [2, 4]})
    # `full` has no rank: one candidate, named by what it uses.
    assert [n for n, _ in cands] == ["method=full", "method=lora,rank=2", "method=lora,rank=4"]
    assert cands[-1][1].peft.method == "lora" and cands[-1][1].peft.rank == 4
    [(name, _), _] = resolve("tiny", {"peft.method": ["conv_lora", "lora"]})
    assert name == "method=conv_lora"


def test_every_preset_changes_something_and_resolves():
    default = Config().to_dict()
    resolved = {}
    for name in list_presets():
        cands = resolve(name, {})
        flat = cands[0][1].to_dict()
        assert flat != default or len(cands) > 1, name
        resolved[name] = [c.to_dict() for _, c in cands]
    # No two presets resolve to the same thing.
    keys = [repr(v) for v in resolved.values()]
    assert len(set(keys)) == len(keys)


def test_paper_preset_is_the_papers_recipe():
    [(_, cfg)] = resolve("paper", {})
    assert (cfg.model.backbone, cfg.model.input_size) == ("vit_h", 1024)
    assert (cfg.peft.method, cfg.peft.rank, cfg.peft.num_experts, cfg.peft.top_k) == (
        "conv_lora", 3, 8, 1)
    assert cfg.peft.alpha == 32
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.lr_schedule) == (1e-4, 1e-4, "linear")
    assert (cfg.optim.max_epochs, cfg.optim.effective_batch_size) == (30, 4)
    assert cfg.optim.grad_clip == 1.0
    assert cfg.data.hflip and not cfg.data.vflip
    table = resolve("paper_table", {})
    assert [c.peft.method for _, c in table] == [
        "scratch", "decoder_only", "bitfit", "adapter", "vpt", "lst", "sam_adapter", "ssf",
        "lora", "conv_lora"]
    assert {c.model.backbone for _, c in table} == {"vit_h"}


def test_to_dict_round_trips():
    [(_, cfg)] = resolve("medium_quality", {"data.void_label": 11, "peft.targets": "qkv,proj"})
    again = Config.from_dict(cfg.to_dict())
    assert again == cfg
    assert again.peft.target_list == ("qkv", "proj")


def test_reference_covers_every_field_with_a_meaning():
    rows = reference()
    keys = {r["key"] for r in rows}
    from automask.peft import PEFT_METHODS

    every = set(Config().to_dict())
    for method in PEFT_METHODS:  # each method's own options
        every |= {f"peft.{k}" for k in PEFT_METHODS[method].options().to_dict()}
    assert keys == every
    assert all(r["meaning"] for r in rows), [r["key"] for r in rows if not r["meaning"]]


def test_readme_hyperparameter_table_matches_the_dataclasses():
    """The README documents every key with its current default."""
    readme = (ROOT / "README.md").read_text()
    rows = re.findall(r"^\| `([a-z_]+\.[a-z_0-9]+)` \| `([^`]*)` \|", readme, re.M)
    table = dict(rows)
    assert len(table) == len(rows), sorted(k for k, _ in rows if [r[0] for r in rows].count(k) > 1)
    expected = {r["key"]: repr(r["default"]) for r in reference()}
    assert table == expected


def test_config_sections_are_dataclasses_validating_themselves():
    for f in dataclasses.fields(Config):
        section = f.default_factory()
        assert dataclasses.is_dataclass(section)
    with pytest.raises(ConfigError):
        dataclasses.replace(Config().optim, batch_size=0)


def test_peft_keys_belong_to_the_method_that_uses_them():
    with pytest.raises(ConfigError, match=r"'peft\.num_experts'.*'lora'.*used by conv_lora"):
        resolve(None, {"peft.method": "lora", "peft.num_experts": 4})
    with pytest.raises(ConfigError, match=r"'peft\.bottleneck'.*used by adapter"):
        resolve(None, {"peft.method": ["lora", "vpt"], "peft.bottleneck": 4})
    # Used by one candidate of several: applied there, left out of the others.
    cands = dict(resolve(None, {"peft.method": ["conv_lora", "lora"], "peft.num_experts": 4}))
    assert cands["method=conv_lora"].peft.num_experts == 4
    assert "num_experts" not in cands["method=lora"].peft.options.to_dict()
    # A preset's keys that a user-chosen method does not use are dropped, not refused.
    [(_, cfg)] = resolve("tiny", {"peft.method": "vpt", "peft.num_prompts": 4})
    assert cfg.peft.num_prompts == 4


def test_peft_option_grid_crossed_with_a_method_without_it_is_deduplicated():
    cands = resolve("tiny", {"peft.method": ["lora", "bitfit"], "peft.rank": [2, 4]})
    assert [n for n, _ in cands] == ["method=lora,rank=2", "method=lora,rank=4", "method=bitfit"]


def test_every_imported_package_is_declared_in_pyproject():
    """A package automask imports is declared (dependencies or an extra), not merely present
    as another package's dependency (scipy came with scikit-learn and was missing)."""
    import ast
    import sys
    from importlib.metadata import packages_distributions

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = [*project["dependencies"],
                *(d for extra in project["optional-dependencies"].values() for d in extra)]

    def norm(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    names = {norm(re.split(r"[<>=!~\[ ;]", d, maxsplit=1)[0]) for d in declared}
    dists = packages_distributions()
    missing = {}
    for path in sorted((ROOT / "automask").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            for module in modules:
                top = module.partition(".")[0]
                if top in sys.stdlib_module_names or top == "automask":
                    continue
                if not {norm(d) for d in dists.get(top, [top])} & names:
                    missing.setdefault(top, path.relative_to(ROOT).as_posix())
    assert not missing, missing


def test_numpy_scalars_from_a_table_of_settings_are_read_by_their_kind():
    """np.bool_ for a bool field was refused ('invalid value np.False_ ... expected bool')
    while np.int64 and np.float32 were read; and as an int it must be refused as bool is."""
    import numpy as np

    [(_, cfg)] = resolve(None, {"data.hflip": np.bool_(False), "data.vflip": np.True_,
                                "optim.max_epochs": np.int64(3), "optim.lr": np.float32(1e-3)})
    assert (cfg.data.hflip, cfg.data.vflip, cfg.optim.max_epochs) == (False, True, 3)
    assert type(cfg.data.hflip) is bool and cfg.optim.lr == pytest.approx(1e-3)
    for key in ("optim.max_epochs", "optim.lr"):
        with pytest.raises(ConfigError, match=f"invalid value np.True_ for '{key}'"):
            resolve(None, {key: np.True_})
    # a numpy float with a fraction for an int field: refused, as 2.5 is (it was cut to 2)
    for value in (np.float32(2.5), np.float64(2.5), 2.5, np.float32(0.9)):
        with pytest.raises(ConfigError, match=r"invalid value .* for 'optim.max_epochs': "
                                              r"expected int"):
            resolve(None, {"optim.max_epochs": value})
    [(_, cfg)] = resolve(None, {"optim.max_epochs": np.float32(4.0), "data.hflip": np.int64(1)})
    assert cfg.optim.max_epochs == 4 and type(cfg.optim.max_epochs) is int
    assert cfg.data.hflip is True


class _ListLike(Sequence):
    """A sequence that is not a list or tuple, as Hydra's ListConfig."""

    def __init__(self, *items):
        self._items = list(items)

    def __getitem__(self, i):
        return self._items[i]

    def __len__(self):
        return len(self._items)


def test_any_sequence_or_1d_array_is_a_list_of_candidates():
    """Hydra's ListConfig and numpy arrays ask for one candidate per value, as a list does."""
    nested = resolve("tiny", {"peft": {"method": _ListLike("lora", "conv_lora")}})
    assert [c.peft.method for _, c in nested] == ["lora", "conv_lora"]
    lrs = resolve("tiny", {"optim.lr": np.logspace(-4, -2, 3)})
    assert [c.optim.lr for _, c in lrs] == pytest.approx([1e-4, 1e-3, 1e-2])
    assert all(type(c.optim.lr) is float for _, c in lrs)
    with pytest.raises(ConfigError, match="repeats the value"):
        resolve("tiny", {"optim.lr": np.array([1e-3, 1e-3])})
    assert flat_hyperparameters({"optim": {"lr": np.array([1e-3, 2e-3])}}) == {
        "optim.lr": [1e-3, 2e-3]}  # plain lists: the fit's record is JSON


def test_a_path_object_is_a_checkpoint_and_a_number_a_scale():
    [(_, cfg)] = resolve("tiny", {"model.checkpoint": Path("weights") / "sam.pth"})
    assert cfg.model.checkpoint == str(Path("weights") / "sam.pth")
    [(_, cfg)] = resolve("tiny", {"peft.method": "conv_lora", "peft.num_experts": 1,
                                  "peft.scales": 1.5})
    assert cfg.peft.options.scale_list == (1.5,)
    with pytest.raises(ConfigError, match="as one string such as '1,2,3'"):
        resolve("tiny", {"peft.method": "conv_lora", "peft.num_experts": 3,
                         "peft.scales": [1, 2, 3]})


def test_suggestions_ignore_case():
    with pytest.raises(ConfigError, match="did you mean 'lora'"):
        resolve("tiny", {"peft.method": "LoRA"})
    with pytest.raises(ConfigError, match="did you mean 'iou'"):
        resolve("tiny", {"optim.select_metric": "IoU"})


def test_num_queries_without_the_head_that_uses_it_is_refused():
    with pytest.raises(ConfigError, match="'model.num_queries'=10 is used by the "
                                          "'mask_classification' multi-class head only"):
        resolve("tiny", {"model.num_queries": 10})
    [(_, cfg)] = resolve("tiny", {"model.num_queries": 10,
                                  "model.multiclass_head": "mask_classification"})
    assert cfg.model.num_queries == 10
    # a saved configuration is read back as it was written
    assert Config.from_dict(
        {**Config().to_dict(), "model.num_queries": 10}).model.num_queries == 10


@pytest.mark.parametrize("name", ["checkpoint=/data/sam.pth", "checkpoint=C:\\w\\sam.pth",
                                  ".hidden", "lr=5%", "method=lora,rank=8"])
def test_log_folder_names_are_one_plain_folder_that_reads_back(name):
    from automask.saving import candidate_of_log_folder, log_folder_name

    folder = log_folder_name(name)
    assert "/" not in folder and "\\" not in folder and not folder.startswith(".")
    assert candidate_of_log_folder(folder) == name
    assert name != "method=lora,rank=8" or folder == name  # plain names stay as they were


def test_a_presets_random_weights_stay_with_a_backbone_that_has_no_others():
    """presets='tiny' with model.backbone='sam2_tiny' failed: the preset's 'random' was
    dropped for another backbone, and sam2_tiny has no published weights to fall back on."""
    from automask.config import UNPUBLISHED_BACKBONES
    from automask.models.backbones import get_spec

    [(_, cfg)] = resolve("tiny", {"model.backbone": "sam2_tiny"})
    assert cfg.model.checkpoint == "random"
    [(_, cfg)] = resolve("tiny", {"model.backbone": "vit_b"}, for_fit=False)
    assert cfg.model.checkpoint is None  # a real backbone gets its pretrained weights
    names = ("tiny", "vit_b", "vit_l", "vit_h", "sam2_tiny", "sam2.1_hiera_t",
             "sam2.1_hiera_s", "sam2.1_hiera_b+", "sam2.1_hiera_l")
    assert set(UNPUBLISHED_BACKBONES) == {n for n in names if get_spec(n).url is None}
