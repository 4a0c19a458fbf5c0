"""Reading LoHa, LoKr and LoCon / conv LoRA from kohya (LyCORIS) files and PEFT folders.

References: modules built by ``lycoris-lora`` and PEFT themselves, with random non-zero factors; a
module's ΔW read by loratools must reproduce what their layers add to the base layer's output.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from loratools.adapter import LoraWeight, base_weight_shape
from loratools.errors import InvalidAdapter, UnknownFormat
from loratools.formats import LoadContext, kohya, lycoris, peft
from loratools.kinds.loha import LohaWeight
from loratools.kinds.lokr import LokrWeight

lycoris_modules = pytest.importorskip("lycoris.modules")

# float32 layers vs the same ΔW applied by one matmul/conv: sums of up to a few hundred products
LAYER_TOL = {"rtol": 1e-4, "atol": 1e-4}


def _randomize(module: torch.nn.Module) -> None:
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def _lycoris(
    cls: type, base: torch.nn.Module, **kwargs: object
) -> tuple[dict[str, torch.Tensor], torch.nn.Module]:
    """A lycoris-lora module on ``base`` with random factors: (its kohya tensors, the wrapped layer)."""
    module = cls("lora_unet_blk", base, multiplier=1.0, **kwargs)
    _randomize(module)
    tensors = {f"lora_unet_blk.{k}": v.detach().clone() for k, v in module.custom_state_dict().items()}
    module.apply_to()  # base's forward now adds the adapter, as in training
    return tensors, base


def _layer_delta(layer: torch.nn.Module, w0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """What the adapted layer adds to the base layer's output."""
    with torch.no_grad():
        plain = F.conv2d(x, w0, padding=1) if w0.ndim == 4 else x @ w0.T
        return layer(x) - plain


def _applied(delta: torch.Tensor, shape: tuple[int, ...], x: torch.Tensor) -> torch.Tensor:
    return F.conv2d(x, delta.reshape(shape), padding=1) if len(shape) == 4 else x @ delta.T


LINEAR_CASES = {
    "loha": (lycoris_modules.LohaModule, {"lora_dim": 4, "alpha": 2.0}),
    "lokr-lowrank": (lycoris_modules.LokrModule, {"lora_dim": 2, "alpha": 3.0, "factor": 4}),
    "lokr-both-full": (lycoris_modules.LokrModule, {"lora_dim": 16, "alpha": 3.0, "factor": 4}),  # scale 1
    "locon": (lycoris_modules.LoConModule, {"lora_dim": 4, "alpha": 2.0}),
}
CONV_CASES = {
    "loha": (lycoris_modules.LohaModule, {"lora_dim": 2, "alpha": 1.0}),
    "loha-tucker": (lycoris_modules.LohaModule, {"lora_dim": 2, "alpha": 1.0, "use_tucker": True}),
    "lokr": (lycoris_modules.LokrModule, {"lora_dim": 2, "alpha": 1.0, "factor": 2}),
    "lokr-tucker": (
        lycoris_modules.LokrModule,
        {"lora_dim": 2, "alpha": 3.0, "factor": 2, "use_tucker": True},
    ),
    "locon": (lycoris_modules.LoConModule, {"lora_dim": 3, "alpha": 1.5}),
    "locon-tucker": (lycoris_modules.LoConModule, {"lora_dim": 3, "alpha": 1.5, "use_tucker": True}),
}


@pytest.mark.parametrize("case", sorted(LINEAR_CASES))
def test_kohya_linear_modules_reproduce_the_lycoris_layer(case: str) -> None:
    cls, kwargs = LINEAR_CASES[case]
    base = torch.nn.Linear(32, 48, bias=False)
    w0 = base.weight.detach().clone()
    tensors, layer = _lycoris(cls, base, **kwargs)
    adapter = kohya.to_adapter(tensors, {}, keep_stems=True)
    weight = adapter.weights["lora_unet_blk"]
    x = torch.randn(5, 32)
    torch.testing.assert_close(x @ weight.delta().T, _layer_delta(layer, w0, x), **LAYER_TOL)
    if case == "lokr-both-full":  # LyCORIS ignores alpha when neither factor is low-rank
        assert isinstance(weight, LokrWeight) and weight.dim is None and weight.scale == 1.0


@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_kohya_conv_modules_reproduce_the_lycoris_layer(case: str) -> None:
    cls, kwargs = CONV_CASES[case]
    base = torch.nn.Conv2d(8, 12, 3, padding=1, bias=False)
    w0 = base.weight.detach().clone()
    tensors, layer = _lycoris(cls, base, **kwargs)
    adapter = kohya.to_adapter(tensors, {}, keep_stems=True)
    weight = adapter.weights["lora_unet_blk"]
    assert weight.shape == (12, 72)
    x = torch.randn(2, 8, 6, 6)
    torch.testing.assert_close(
        _applied(weight.delta(), (12, 8, 3, 3), x), _layer_delta(layer, w0, x), **LAYER_TOL
    )
    if case.startswith("locon") or case.endswith("tucker"):  # the kernel is in the file
        assert base_weight_shape(weight) == (12, 8, 3, 3)


def test_locon_tucker_core_folds_into_a_plain_conv_lora() -> None:
    base = torch.nn.Conv2d(8, 12, 3, padding=1, bias=False)
    tensors, _ = _lycoris(lycoris_modules.LoConModule, base, lora_dim=3, alpha=1.5, use_tucker=True)
    weight = kohya.to_adapter(tensors, {}, keep_stems=True).weights["lora_unet_blk"]
    assert isinstance(weight, LoraWeight) and weight.rank == 3 and weight.weight_shape == (12, 8, 3, 3)
    down, up = lycoris.stored_factors(weight)
    assert down.shape == (3, 8, 3, 3) and up.shape == (12, 3, 1, 1)


def test_a_kohya_lokr_file_names_its_training() -> None:
    w1, w2a, w2b = torch.randn(4, 4), torch.randn(12, 2), torch.randn(2, 8)
    tensors = {"lora_te1_q.lokr_w1": w1, "lora_te1_q.lokr_w2_a": w2a, "lora_te1_q.lokr_w2_b": w2b}
    metadata = {
        "ss_network_module": "lycoris.kohya",
        "ss_network_args": '{"algo": "lokr", "factor": "4", "conv_dim": "4"}',
        "ss_network_dim": "2",
        "ss_network_alpha": "1",
        "ss_num_epochs": "10",
    }
    adapter = kohya.to_adapter({**tensors, "lora_te1_q.alpha": torch.tensor(1.0)}, metadata, keep_stems=True)
    summary = adapter.provenance["kohya"]
    assert summary["algo"] == "lokr" and summary["network_args"]["factor"] == "4"
    assert summary["training"]["num_epochs"] == "10"
    weight = adapter.weights["lora_te1_q"]
    torch.testing.assert_close(weight.delta(), torch.kron(w1, w2a @ w2b) * 0.5)  # alpha / r = 1 / 2


@pytest.mark.parametrize(
    ("part", "name"),
    [
        ("oft_blocks", "OFT"),
        ("a1.weight", "GLoRA"),
        ("on_input", "IA³"),
        ("diff", "full/diff"),
        ("w_norm", "norm"),
    ],
)
def test_unsupported_lycoris_algorithms_are_named(part: str, name: str) -> None:
    tensors = {f"lora_unet_x.{part}": torch.randn(4, 4), "lora_unet_y.hada_w1_a": torch.randn(4, 2)}
    with pytest.raises(UnknownFormat, match=name):
        kohya.to_adapter(tensors, {}, keep_stems=True, source="x.safetensors")


def test_incomplete_loha_is_refused() -> None:
    tensors = {"lora_unet_x.hada_w1_a": torch.randn(4, 2), "lora_unet_x.hada_w1_b": torch.randn(2, 3)}
    with pytest.raises(InvalidAdapter, match="hada_w2_a"):
        kohya.to_adapter(tensors, {}, keep_stems=True)


@pytest.mark.parametrize("alpha", [torch.tensor([2.0, 3.0]), torch.tensor(float("nan"))])
def test_a_vector_or_nan_alpha_is_one_clear_error(alpha: torch.Tensor) -> None:
    parts = {"hada_w1_a": (4, 2), "hada_w1_b": (2, 3), "hada_w2_a": (4, 2), "hada_w2_b": (2, 3)}
    tensors = {f"lora_unet_x.{name}": torch.randn(*shape) for name, shape in parts.items()}
    with pytest.raises(InvalidAdapter, match="lora_unet_x.alpha"):
        kohya.to_adapter({**tensors, "lora_unet_x.alpha": alpha}, {}, keep_stems=True)


# -- PEFT --------------------------------------------------------------------------------------------
class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 8, 3, padding=1)
        self.lin = torch.nn.Linear(32, 24)


def _peft_adapter(config: object) -> tuple[torch.nn.Module, dict[str, torch.Tensor], dict[str, object]]:
    from peft import get_peft_model, get_peft_model_state_dict

    model = get_peft_model(Net(), config)  # type: ignore[arg-type]
    _randomize_peft(model)
    state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    return model, state, model.peft_config["default"].to_dict()


def _randomize_peft(model: torch.nn.Module) -> None:
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(part in name for part in ("hada_", "lokr_", "lora_")):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def _json(config: dict[str, object]) -> dict[str, object]:
    """adapter_config.json as PEFT writes it (sets become lists, enums strings)."""
    return {k: (sorted(v) if isinstance(v, set) else getattr(v, "value", v)) for k, v in config.items()}


PEFT_CONFIGS = {
    "loha": ("LoHaConfig", {"r": 4, "alpha": 8}),
    "loha-effective-conv": ("LoHaConfig", {"r": 3, "alpha": 2, "use_effective_conv2d": True}),
    "lokr": ("LoKrConfig", {"r": 2, "alpha": 4}),
    "lokr-both": ("LoKrConfig", {"r": 2, "alpha": 4, "decompose_both": True, "decompose_factor": 4}),
    "lokr-effective-conv": (
        "LoKrConfig",
        {"r": 1, "alpha": 3, "use_effective_conv2d": True, "decompose_factor": 2},
    ),
    "lora-conv": ("LoraConfig", {"r": 3, "lora_alpha": 6}),
}


@pytest.mark.parametrize("case", sorted(PEFT_CONFIGS))
def test_peft_modules_equal_peft_get_delta_weight(case: str) -> None:
    import peft as peft_lib

    name, kwargs = PEFT_CONFIGS[case]
    init = {"init_lora_weights": False} if name == "LoraConfig" else {"init_weights": False}
    config = getattr(peft_lib, name)(target_modules=["conv", "lin"], **init, **kwargs)
    model, state, config_dict = _peft_adapter(config)
    adapter = peft.to_adapter(state, context=LoadContext(config=_json(config_dict)))
    for module in ("conv", "lin"):
        layer = model.base_model.model.get_submodule(module)
        expected = layer.get_delta_weight("default").detach()
        weight = adapter.weights[module]
        assert weight.kind == {"LoHaConfig": "loha", "LoKrConfig": "lokr", "LoraConfig": "lora"}[name]
        # float32 einsum/kron vs PEFT's own, in another order; O(1) entries
        torch.testing.assert_close(
            weight.delta(), expected.reshape(expected.shape[0], -1), rtol=1e-5, atol=1e-5
        )
    conv = adapter.weights["conv"]
    if isinstance(conv, LoraWeight) or case.endswith("effective-conv"):
        assert base_weight_shape(conv) == (8, 4, 3, 3)
    if isinstance(conv, LohaWeight | LokrWeight):
        assert conv.alpha == kwargs["alpha"]
