"""merge / unmerge of LoHa, LoKr and conv LoRA equal PEFT's merge_and_unload and LyCORIS's merge.

Bases: the tiny Llama fixture (Linear layers) and a small conv net saved as one safetensors file.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loratools.commands.merge import merge_paths
from tests.peft_helpers import load_llama

# merged float32 weights: W0 + ΔW rounded once (loratools) vs PEFT's own float32 sum
MERGED_TOL = {"rtol": 1e-5, "atol": 1e-5}


class ConvNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 8, 3, padding=1)
        self.point = torch.nn.Conv2d(8, 8, 1)
        self.lin = torch.nn.Linear(32, 24)


def _randomize(model: torch.nn.Module, parts: tuple[str, ...], seed: int = 3) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(part in name for part in parts):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def _peft_config(kind: str, targets: list[str]) -> object:
    import peft

    if kind == "loha":
        return peft.LoHaConfig(r=3, alpha=5, target_modules=targets, init_weights=False)
    if kind == "loha-effective":
        return peft.LoHaConfig(
            r=2, alpha=3, target_modules=targets, init_weights=False, use_effective_conv2d=True
        )
    if kind == "lokr":
        return peft.LoKrConfig(r=2, alpha=3, target_modules=targets, init_weights=False, decompose_factor=4)
    return peft.LoraConfig(r=3, lora_alpha=6, target_modules=targets, init_lora_weights=False)


def _save_peft(model: torch.nn.Module, kind: str, targets: list[str], folder: Path) -> torch.nn.Module:
    from peft import get_peft_model

    wrapped = get_peft_model(model, _peft_config(kind, targets))  # type: ignore[arg-type]
    _randomize(wrapped, ("hada_", "lokr_", "lora_"))
    wrapped.save_pretrained(folder)
    return wrapped


@pytest.mark.parametrize("kind", ["loha", "loha-effective", "lokr", "lora"])
def test_conv_net_merge_equals_peft_merge_and_unload(kind: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = ConvNet()
    base = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(base))
    adapter = tmp_path / "adapter"
    wrapped = _save_peft(net, kind, ["conv", "point", "lin"], adapter)
    expected = wrapped.merge_and_unload().state_dict()

    merged = tmp_path / "merged.safetensors"
    merge_paths(str(base), merged, add=[(str(adapter), 1.0)])
    out = load_file(str(merged))
    for name, tensor in expected.items():
        torch.testing.assert_close(out[name], tensor, **MERGED_TOL)

    unmerged = tmp_path / "unmerged.safetensors"
    merge_paths(str(merged), unmerged, remove=[(str(adapter), 1.0)])
    original = load_file(str(base))
    for name, tensor in load_file(str(unmerged)).items():
        torch.testing.assert_close(tensor, original[name], **MERGED_TOL)


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_tiny_llama_merge_equals_peft_merge_and_unload(kind: str, fixtures_dir: Path, tmp_path: Path) -> None:
    model = load_llama(fixtures_dir / "base")
    adapter = tmp_path / "adapter"
    wrapped = _save_peft(model, kind, ["q_proj", "v_proj", "down_proj"], adapter)
    expected = wrapped.merge_and_unload().state_dict()
    merged = tmp_path / "merged"
    merge_paths(str(fixtures_dir / "base"), merged, add=[(str(adapter), 1.0)])
    out: dict[str, torch.Tensor] = {}
    for shard in merged.glob("*.safetensors"):
        out |= load_file(str(shard))
    adapted = [n for n in out if any(t in n for t in ("q_proj", "v_proj", "down_proj"))]
    assert adapted
    for name in adapted:
        torch.testing.assert_close(out[name].float(), expected[name].float(), **MERGED_TOL)


LYCORIS = {
    "loha": ("LohaModule", {"lora_dim": 2}),
    "loha-tucker": ("LohaModule", {"lora_dim": 2, "use_tucker": True}),
    "lokr": ("LokrModule", {"lora_dim": 2, "factor": 2}),
    "locon": ("LoConModule", {"lora_dim": 3}),
    "locon-tucker": ("LoConModule", {"lora_dim": 3, "use_tucker": True}),
}


@pytest.mark.parametrize("case", sorted(LYCORIS))
def test_kohya_lycoris_merge_equals_lycoris_merge_to(case: str, tmp_path: Path) -> None:
    modules = pytest.importorskip("lycoris.modules")
    name, kwargs = LYCORIS[case]
    torch.manual_seed(0)
    net = ConvNet()
    base = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(base))
    tensors = {}
    for layer in ("conv", "lin"):
        # alpha = dim (scale 1): lycoris-lora's merge_to applies the scale twice for LoHa/LoKr when
        # alpha ≠ dim (its layers apply it once; loratools follows the layers, see formats/lycoris.py)
        module = getattr(modules, name)(
            f"lora_unet_{layer}", getattr(net, layer), 1.0, alpha=kwargs["lora_dim"], **kwargs
        )
        _randomize(module, ("",), seed=5)
        tensors |= {
            f"lora_unet_{layer}.{k}": v.detach().clone() for k, v in module.custom_state_dict().items()
        }
        module.merge_to(1.0)
    adapter = tmp_path / "lycoris.safetensors"
    save_file(tensors, str(adapter), metadata={"ss_network_module": "lycoris.kohya"})
    merged = tmp_path / "merged.safetensors"
    merge_paths(str(base), merged, add=[(str(adapter), 1.0)])
    out = load_file(str(merged))
    for layer in ("conv", "lin"):
        # merged checkpoint vs PEFT's merged module: float32 W0 + ΔW in another order
        torch.testing.assert_close(
            out[f"{layer}.weight"], getattr(net, layer).weight.detach(), rtol=1e-5, atol=1e-5
        )


def test_swap_loha_for_lokr_on_a_conv_net(tmp_path: Path) -> None:
    torch.manual_seed(0)
    base = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in ConvNet().state_dict().items()}, str(base))
    adapters = {}
    for kind in ("loha", "lokr"):
        net = ConvNet()
        net.load_state_dict(load_file(str(base)))
        adapters[kind] = tmp_path / kind
        _save_peft(net, kind, ["conv", "point", "lin"], adapters[kind])
    with_loha, swapped, with_lokr = (
        tmp_path / f"{n}.safetensors" for n in ("with_loha", "swapped", "with_lokr")
    )
    merge_paths(str(base), with_loha, add=[(str(adapters["loha"]), 1.0)])
    merge_paths(
        str(with_loha), swapped, add=[(str(adapters["lokr"]), 1.0)], remove=[(str(adapters["loha"]), 1.0)]
    )
    merge_paths(str(base), with_lokr, add=[(str(adapters["lokr"]), 1.0)])
    expected = load_file(str(with_lokr))
    for name, tensor in load_file(str(swapped)).items():
        torch.testing.assert_close(tensor, expected[name], **MERGED_TOL)
