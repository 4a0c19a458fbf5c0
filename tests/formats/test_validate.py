"""Broken adapters never load: every bad config value or tensor is one ``error:`` line naming the
file, what is wrong and what to do (exit 1), and ``merge`` writes nothing."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from loratools.adapter import Adapter
from loratools.errors import InvalidAdapter
from loratools.formats import kohya, peft, targets, validate
from loratools.io.adapter_dir import load_adapter
from loratools.io.checkpoint import open_checkpoint

Q0 = "model.layers.0.self_attn.q_proj"
KEY_A = f"base_model.model.{Q0}.lora_A.weight"
KEY_B = f"base_model.model.{Q0}.lora_B.weight"


def peft_copy(fixtures_dir: Path, folder: Path, config: dict[str, Any] | None = None, tensors=None) -> Path:
    """The fixture adapter with config fields replaced and/or tensors edited in place."""
    shutil.copytree(fixtures_dir / "adapter", folder)
    if config is not None:
        data = json.loads((folder / peft.CONFIG_NAME).read_text())
        data.update(config)
        (folder / peft.CONFIG_NAME).write_text(json.dumps(data))  # NaN/Infinity as Python writes them
    if tensors is not None:
        weights = load_file(folder / peft.WEIGHTS_NAME)
        tensors(weights)
        save_file(weights, folder / peft.WEIGHTS_NAME, metadata={"format": "pt"})
    return folder


def kohya_copy(fixtures_dir: Path, path: Path, edit) -> Path:
    """The fixture adapter as a kohya file (module names recorded), with its tensors edited."""
    tensors, metadata, _ = kohya.from_adapter(load_adapter(fixtures_dir / "adapter"))
    edit(tensors, kohya.kohya_stem(Q0))
    save_file(tensors, path, metadata=metadata)
    return path


def refused(result, *fragments: str) -> None:
    """Exit 1, one line on stderr starting ``error:``, nothing on stdout, no traceback."""
    assert result.exit_code == 1, result.stdout + result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert "unexpected" not in result.stderr and result.stdout == ""
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def merge_refused(run_cli, fixtures_dir: Path, adapter: Path, out: Path, *fragments: str) -> None:
    refused(run_cli("merge", fixtures_dir / "base", adapter, "-o", out), str(adapter), *fragments)
    assert not out.exists() and not list(out.parent.glob(f".{out.name}*"))


def set_value(key: str, value: float):
    def edit(weights: dict[str, torch.Tensor]) -> None:
        weights[key][0, 0] = value

    return edit


CONFIGS = [
    ({"lora_alpha": math.nan}, "lora_alpha is nan"),
    ({"lora_alpha": math.inf}, "lora_alpha is inf"),
    ({"lora_alpha": -math.inf}, "lora_alpha is -inf"),
    ({"lora_alpha": "nan"}, "lora_alpha is 'nan', not a number"),
    ({"lora_alpha": "abc"}, "lora_alpha is 'abc', not a number"),
    ({"lora_alpha": None}, "lora_alpha is None, not a number"),
    ({"lora_alpha": [8]}, "lora_alpha is [8], not a number"),
    ({"lora_alpha": True}, "lora_alpha is True, not a number"),
    ({"lora_alpha": {"a": 1}}, "lora_alpha is {'a': 1}, not a number"),
    ({"r": 0}, "r is 0; a LoRA rank must be at least 1"),
    ({"r": -4}, "r is -4"),
    ({"r": "4"}, "r is '4', not an integer"),
    ({"r": 8}, "4 module(s) disagree with r/rank_pattern"),
    ({"rank_pattern": {"q_proj": 2}}, "model.layers.0.self_attn.q_proj has rank 4, config says 2"),
    ({"rank_pattern": {"(q_proj": 4}}, "rank_pattern key '(q_proj' is not a valid regex"),
    ({"rank_pattern": ["q_proj"]}, "rank_pattern is ['q_proj']"),
    ({"rank_pattern": {"q_proj": [4]}}, "rank_pattern['q_proj'] is [4], not an integer"),
    ({"alpha_pattern": {"[": 2}}, "alpha_pattern key '[' is not a valid regex"),
    ({"alpha_pattern": {"q_proj": "16"}}, "alpha_pattern['q_proj'] is '16', not a number"),
    ({"alpha_pattern": {"q_proj": math.nan}}, "alpha_pattern['q_proj'] is nan"),
    ({"target_modules": ["q_proj"]}, "does not select 2 module(s)"),
    ({"target_modules": ".*q_proj"}, "model.layers.0.self_attn.v_proj"),
    ({"target_modules": "(q_proj"}, "target_modules '(q_proj' is not a valid regex"),
    ({"target_modules": [["q_proj"]]}, "target_modules is [['q_proj']]"),
    ({"target_modules": ["q_proj", "v_proj"], "layers_to_transform": [0]}, "does not select 2"),
    ({"target_modules": ["q_proj", "v_proj"], "exclude_modules": ["v_proj"]}, "does not select 2"),
    ({"use_rslora": "false"}, "use_rslora is 'false'; it must be true or false"),
    ({"fan_in_fan_out": 1}, "fan_in_fan_out is 1"),
]


@pytest.mark.parametrize(("config", "fragment"), CONFIGS, ids=[f for _, f in CONFIGS])
def test_bad_config_values_are_one_clear_error(run_cli, fixtures_dir, tmp_path, config, fragment) -> None:
    adapter = peft_copy(fixtures_dir, tmp_path / "bad", config)
    merge_refused(run_cli, fixtures_dir, adapter, tmp_path / "out", "adapter_config.json", fragment)


TENSORS = [
    (set_value(KEY_A, math.nan), "lora_A"),
    (set_value(KEY_B, math.inf), "lora_B"),
    (set_value(KEY_B, -math.inf), "(1 NaN/Inf of 128)"),
]


@pytest.mark.parametrize(("edit", "fragment"), TENSORS)
def test_non_finite_factors_are_refused(run_cli, fixtures_dir, tmp_path, edit, fragment) -> None:
    adapter = peft_copy(fixtures_dir, tmp_path / "bad", tensors=edit)
    merge_refused(run_cli, fixtures_dir, adapter, tmp_path / "out", Q0, fragment, "non-finite")


def test_factors_of_different_ranks_are_refused(run_cli, fixtures_dir, tmp_path) -> None:
    def edit(weights: dict[str, torch.Tensor]) -> None:
        weights[KEY_B] = weights[KEY_B][:, :3].contiguous()

    adapter = peft_copy(fixtures_dir, tmp_path / "bad", tensors=edit)
    merge_refused(
        run_cli, fixtures_dir, adapter, tmp_path / "out", "lora_A [4, 32], lora_B [32, 3] do not pair up"
    )


def test_rank_zero_factors_are_refused(run_cli, fixtures_dir, tmp_path) -> None:
    def edit(weights: dict[str, torch.Tensor]) -> None:
        weights[KEY_A], weights[KEY_B] = torch.zeros(0, 32), torch.zeros(32, 0)

    adapter = peft_copy(fixtures_dir, tmp_path / "bad", {"rank_pattern": {Q0: 0}}, tensors=edit)
    merge_refused(run_cli, fixtures_dir, adapter, tmp_path / "out", "rank_pattern")


def test_unreadable_provenance_metadata_is_ignored(fixtures_dir, tmp_path) -> None:
    folder = peft_copy(fixtures_dir, tmp_path / "a")
    weights = load_file(folder / peft.WEIGHTS_NAME)
    save_file(weights, folder / peft.WEIGHTS_NAME, metadata={"format": "pt", "loratools": "{not json"})
    assert load_adapter(folder).provenance == {}


def _kohya_alpha(value: torch.Tensor):
    def edit(tensors: dict[str, torch.Tensor], stem: str) -> None:
        tensors[f"{stem}.alpha"] = value

    return edit


def _kohya_factor(part: str, value: float):
    def edit(tensors: dict[str, torch.Tensor], stem: str) -> None:
        tensors[f"{stem}.{part}"][0, 0] = value

    return edit


def _kohya_rank(tensors: dict[str, torch.Tensor], stem: str) -> None:
    tensors[f"{stem}.lora_up.weight"] = tensors[f"{stem}.lora_up.weight"][:, :3].contiguous()


KOHYA = [
    (_kohya_alpha(torch.tensor(math.nan)), ".alpha is nan"),
    (_kohya_alpha(torch.tensor(math.inf)), ".alpha is inf"),
    (_kohya_alpha(torch.tensor([8.0, 8.0])), ".alpha holds 2 values (shape [2])"),
    (_kohya_factor("lora_down.weight", math.nan), "q_proj lora_down (1 NaN/Inf of 128)"),
    (_kohya_factor("lora_up.weight", math.inf), "non-finite"),
    (_kohya_rank, "lora_down [4, 32], lora_up [32, 3] do not pair up"),
]


@pytest.mark.parametrize(("edit", "fragment"), KOHYA)
def test_bad_kohya_files_are_one_clear_error(run_cli, fixtures_dir, tmp_path, edit, fragment) -> None:
    adapter = kohya_copy(fixtures_dir, tmp_path / "bad.safetensors", edit)
    merge_refused(run_cli, fixtures_dir, adapter, tmp_path / "out", fragment)


def test_a_good_kohya_alpha_of_shape_one_still_loads(fixtures_dir, tmp_path) -> None:
    path = kohya_copy(fixtures_dir, tmp_path / "ok.safetensors", _kohya_alpha(torch.tensor([8.0])))
    assert load_adapter(path).weights[Q0].alpha == 8.0


def test_peft_defaults_are_peft_defaults(fixtures_dir, tmp_path) -> None:
    """Without lora_alpha PEFT uses 8 (LoraConfig's default), whatever r is."""
    folder = peft_copy(fixtures_dir, tmp_path / "a")
    config = json.loads((folder / peft.CONFIG_NAME).read_text())
    del config["lora_alpha"]
    config["rank_pattern"] = {}
    (folder / peft.CONFIG_NAME).write_text(json.dumps(config))
    assert {w.alpha for w in load_adapter(folder).weights.values()} == {8.0}


def test_regex_targets_and_patterns_select_like_peft() -> None:
    config = {"target_modules": r".*\.(q|v)_proj", "layers_to_transform": [1]}
    assert targets.peft_selects(config, Q0)  # a regex ignores layers_to_transform, as in PEFT
    config = {"target_modules": ["q_proj"], "layers_to_transform": [1]}
    assert not targets.peft_selects(config, Q0)
    assert targets.peft_selects(config, "model.layers.1.self_attn.q_proj")
    config = {"target_modules": ["q_proj"], "modules_to_save": ["self_attn"]}
    assert not targets.peft_selects(config, Q0)


def test_validation_works_for_any_kind_of_module() -> None:
    """check_adapter looks at every tensor field, so new kinds (DoRA magnitudes, …) are covered."""
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class Other:
        w1: torch.Tensor
        alpha: float = 1.0

    validate.check_adapter({"m": Other(torch.ones(2, 2))}, "x")
    with pytest.raises(InvalidAdapter, match=r"x: non-finite values in 1 place\(s\): m w1"):
        validate.check_adapter({"m": Other(torch.tensor([[1.0, math.nan]]))}, "x")
    with pytest.raises(InvalidAdapter, match="m alpha nan"):
        validate.check_adapter({"m": Other(torch.ones(1), math.nan)}, "x")


def test_loratools_output_passes_its_own_checks(fixtures_dir, tmp_path) -> None:
    """What loratools writes (rank/alpha patterns, exact target names) loads again unchanged."""
    adapter = load_adapter(fixtures_dir / "adapter")
    weights = dict(adapter.weights)
    weights[Q0] = type(weights[Q0])(weights[Q0].a[:2], weights[Q0].b[:, :2], 3.0)
    from loratools.io.adapter_dir import save_adapter

    save_adapter(Adapter(weights, base_model="fixtures/base"), tmp_path / "a")
    again = load_adapter(tmp_path / "a")
    assert again.ranks[Q0] == 2 and again.weights[Q0].alpha == 3.0
    assert open_checkpoint(fixtures_dir / "base")  # the base itself is untouched by any of this


@pytest.mark.parametrize(("field", "value"), [("base_model", [1]), ("task_type", 3), ("extra_config", "x")])
def test_a_damaged_loratools_record_in_a_kohya_file_is_ignored(fixtures_dir, tmp_path, field, value) -> None:
    """The record is only a convenience: a damaged one is not trusted, the tensors are (with a base
    to name the modules, the merge is the same as from the intact file)."""
    tensors, metadata, _ = kohya.from_adapter(load_adapter(fixtures_dir / "adapter"))
    record = json.loads(metadata[kohya.ADAPTER_METADATA])
    record[field] = value
    save_file(
        tensors, tmp_path / "k.safetensors", metadata={**metadata, kohya.ADAPTER_METADATA: json.dumps(record)}
    )
    names = open_checkpoint(fixtures_dir / "base").names()
    adapter = load_adapter(tmp_path / "k.safetensors", base_names=names)
    assert adapter.base_model is None and set(adapter.weights) == set(
        load_adapter(fixtures_dir / "adapter").weights
    )


def test_target_selection_agrees_with_peft() -> None:
    """peft_selects gives PEFT's own answer (check_target_module_exists) on every config × module.

    Its only cost is importing peft (~10 s alone), which a suite run pays once for every PEFT test."""
    pytest.importorskip("peft")
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    modules = [Q0, "model.layers.1.self_attn.v_proj", "model.layers.12.mlp.up_proj", "lm_head", "q_proj"]
    configs = [
        {"target_modules": ["q_proj", "v_proj"]},
        {"target_modules": ["self_attn.q_proj"]},
        {"target_modules": r".*\.(q|v)_proj"},
        {"target_modules": ["q_proj", "up_proj"], "layers_to_transform": [1, 12]},
        {"target_modules": ["up_proj"], "layers_to_transform": 12, "layers_pattern": "layers"},
        {"target_modules": ["q_proj", "v_proj"], "exclude_modules": ["v_proj"]},
        {"target_modules": ["q_proj", "v_proj"], "exclude_modules": r".*layers\.0.*"},
        {"target_modules": ["q_proj", "lm_head"], "modules_to_save": ["lm_head"]},
    ]
    for config in configs:
        peft_config = LoraConfig(**config)
        for module in modules:
            expected = bool(check_target_module_exists(peft_config, module)) and not type(
                check_target_module_exists(peft_config, module)
            ).__name__.startswith("_Excluded")
            assert targets.peft_selects(config, module) == expected, (config, module)
