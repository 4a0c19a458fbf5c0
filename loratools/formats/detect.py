"""What a file is: one detector, from tensor names, shapes, metadata and configs (no file I/O here).

Every command asks this module what it was given and names it in its messages ("a kohya LoKr
adapter", "a GGUF model (llama, Q4_1)"), so a file is never guessed silently. The io layer
(:mod:`loratools.io.filekind`) reads the headers and calls the pure functions below.

Tables to extend (one line each):

- :data:`KEY_PARTS`: the tensor-name part after the module path → algorithm, in priority order
  (``lokr_w1`` → LoKr). PEFT and kohya/LyCORIS share most parts.
- :data:`PEFT_TYPES`: ``adapter_config.json`` ``peft_type`` → algorithm.
- :data:`LYCORIS_ALGOS`: kohya ``ss_network_args`` ``algo`` → algorithm.
- :data:`SUPPORTED`: the (family, algorithm) pairs loratools loads. A loader for a new kind
  (DoRA, LoHa, LoKr, LoCon, …) adds its pair here when it lands; until then every command refuses
  the file by name ("a kohya LoKr adapter: not supported by loratools yet").
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from loratools.errors import UnknownFormat

__all__ = [
    "KEY_PARTS",
    "KOHYA_PREFIX",
    "PEFT_TYPES",
    "SUPPORTED",
    "FileKind",
    "adapter_kind",
    "checkpoint_kind",
    "detect_adapter_format",
    "gguf_kind",
    "is_kohya_stem",
    "looks_like_adapter",
    "register",
]

ADAPTER, CHECKPOINT = "adapter", "checkpoint"
FAMILY_LABELS = {"peft": "PEFT", "kohya": "kohya", "cloneofsimo": "cloneofsimo lora", "gguf": "GGUF"}

# tensor-name part after the module path → algorithm; the first listed part found wins, so
# the parts that make a file "more than LoRA" (DoRA's magnitude beside lora_A/B) come first.
KEY_PARTS: dict[str, str] = {
    "lora_magnitude_vector": "DoRA",  # PEFT use_dora
    "dora_scale": "DoRA",  # kohya / LyCORIS
    "hada_w1_a": "LoHa",
    "hada_t1": "LoHa",
    "lokr_w1": "LoKr",
    "lokr_w1_a": "LoKr",
    "lokr_w2": "LoKr",
    "lokr_w2_a": "LoKr",
    "oft_r": "OFT",
    "oft_blocks": "OFT",
    "oft_diag": "OFT",
    "boft_R": "BOFT",
    "boft_blocks": "BOFT",
    "a1.weight": "GLoRA",
    "b1.weight": "GLoRA",
    "ia3_l": "IA3",
    "on_input": "IA3",
    "diff": "full/diff",
    "diff_b": "full/diff",
    "lora_mid.weight": "LoCon",  # LoCon's Tucker core
    "lora_A.weight": "LoRA",
    "lora_embedding_A": "LoRA",  # PEFT's embedding LoRA (loratools/kinds/embedding.py)
    "lora_down.weight": "LoRA",
}
PEFT_TYPES: dict[str, str] = {
    "LORA": "LoRA",
    "LOHA": "LoHa",
    "LOKR": "LoKr",
    "IA3": "IA3",
    "OFT": "OFT",
    "BOFT": "BOFT",
}
LYCORIS_ALGOS: dict[str, str] = {
    "lora": "LoRA",
    "locon": "LoCon",
    "loha": "LoHa",
    "lokr": "LoKr",
    "ia3": "IA3",
    "glora": "GLoRA",
    "full": "full/diff",
    "diag-oft": "OFT",
    "oft": "OFT",
    "boft": "BOFT",
}
ALGORITHM_LABELS = {"IA3": "IA³", "full/diff": "full-weight difference (diff)"}
# (family, algorithm) pairs that load_adapter turns into an Adapter; loaders register theirs here
SUPPORTED: set[tuple[str, str]] = {("peft", "LoRA"), ("kohya", "LoRA"), ("peft", "DoRA"), ("kohya", "DoRA")}
SUPPORTED |= {("peft", "LoHa"), ("peft", "LoKr"), ("kohya", "LoHa"), ("kohya", "LoKr"), ("kohya", "LoCon")}
CLONEOFSIMO_KEY = re.compile(r"^[^.:]+:\d+:(up|down)$")
KOHYA_STEM = re.compile(r"^lora_[A-Za-z0-9]+_[^.]+$")
# kohya's key prefix unless told otherwise (the UNet's); defined here, torch-free, so that
# `loratools convert --help` shows it without loading formats/kohya.py
KOHYA_PREFIX = "lora_unet"


@dataclass(frozen=True)
class FileKind:
    """What a file is.

    Attributes:
        kind: ``"adapter"`` or ``"checkpoint"``.
        family: ``"peft"``, ``"kohya"``, ``"cloneofsimo"`` or ``"gguf"`` for adapters and GGUF
            models; the storage (``"safetensors"``, ``"safetensors-sharded"``, ``"pytorch"``) for
            other checkpoints.
        algorithm: LoRA, DoRA, LoHa, LoKr, LoCon, IA3, OFT, BOFT, GLoRA, full/diff or other for
            adapters; None for checkpoints.
        label: what users read, e.g. "a kohya LoKr adapter".
        details: facts the label was made from (shards, architecture, quantization, peft_type).
    """

    kind: str
    family: str
    algorithm: str | None
    label: str
    details: Mapping[str, Any] = field(default_factory=dict)

    @property
    def supported(self) -> bool:
        """Whether loratools loads this adapter (checkpoints: always)."""
        return self.kind == CHECKPOINT or (self.family, str(self.algorithm)) in SUPPORTED

    def refuse(self, where: str, what: str = "loratools") -> UnknownFormat:
        """The error for a file ``what`` cannot use: it names the file's kind."""
        return UnknownFormat(f"{where}: {self.label}: not supported by {what} yet")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "details": dict(self.details)}


def register(family: str, algorithm: str) -> None:
    """Declare that loratools now loads ``family`` adapters of ``algorithm`` (a loader's hook)."""
    SUPPORTED.add((family, algorithm))


def _algorithm_label(algorithm: str) -> str:
    return ALGORITHM_LABELS.get(algorithm, algorithm)


def _adapter(family: str, algorithm: str, **details: Any) -> FileKind:
    label = f"a {FAMILY_LABELS[family]} {_algorithm_label(algorithm)} adapter"
    return FileKind(ADAPTER, family, algorithm, label, details)


def _part_of(key: str, parts: Iterable[str]) -> str | None:
    return next((p for p in parts if key.endswith("." + p) or key.endswith("." + p + ".weight")), None)


def _algorithm_of_keys(keys: Sequence[str]) -> str | None:
    found = {part for key in keys if (part := _part_of(key, KEY_PARTS)) is not None}
    return next((KEY_PARTS[p] for p in KEY_PARTS if p in found), None)


def is_kohya_stem(name: str) -> bool:
    """Whether a module name is a kohya stem kept as is (``lora_unet_…``: no dots), as loaded
    from a kohya file without a base to turn it into a dotted module path."""
    return bool(KOHYA_STEM.match(name))


def looks_like_adapter(keys: Sequence[str], metadata: Mapping[str, str] | None = None) -> bool:
    """Whether a file is an adapter: any known key part, cloneofsimo's ``x:0:up``, or kohya's
    ``ss_network_module`` training record (a LyCORIS kind whose key parts are not in the table)."""
    if metadata and "ss_network_module" in metadata:
        return True
    return _algorithm_of_keys(keys) is not None or any(CLONEOFSIMO_KEY.match(k) for k in keys)


def network_args(metadata: Mapping[str, str]) -> dict[str, Any]:
    """kohya's ``ss_network_args`` metadata (a JSON object in a string), or ``{}`` when absent or malformed."""
    try:
        args = json.loads(metadata.get("ss_network_args", "{}"))
    except ValueError:
        return {}
    return args if isinstance(args, dict) else {}


def _kohya_algorithm(
    keys: Sequence[str], shapes: Mapping[str, Sequence[int]], metadata: Mapping[str, str]
) -> str | None:
    """kohya/LyCORIS: the key parts decide; conv pairs or ``ss_network_args`` algo ``locon`` make
    LoRA LoCon; key parts loratools does not know are named by that algo (None if nothing does)."""
    algo = LYCORIS_ALGOS.get(str(network_args(metadata).get("algo", "")).lower())
    algorithm = _algorithm_of_keys(keys)
    if algorithm is None:
        return algo
    convs = any(k.endswith(".lora_down.weight") and len(shapes.get(k, ())) == 4 for k in keys)
    if algorithm == "LoRA" and (convs or algo == "LoCon"):
        return "LoCon"
    return algorithm


def adapter_kind(
    keys: Sequence[str],
    *,
    shapes: Mapping[str, Sequence[int]] | None = None,
    metadata: Mapping[str, str] | None = None,
    config: Mapping[str, Any] | None = None,
) -> FileKind:
    """The kind of an adapter from its tensor names (and shapes, metadata, adapter_config.json).

    Args:
        keys: tensor names.
        shapes: tensor name → shape (conv LoRA is LoCon).
        metadata: safetensors ``__metadata__`` (``ss_*``).
        config: the PEFT ``adapter_config.json`` beside the weights; None for single files.

    Raises:
        UnknownFormat: names of no known adapter, or of both PEFT and kohya conventions.
    """
    shapes, metadata = shapes or {}, metadata or {}
    if config is not None:
        return _peft_kind(keys, config)
    if any(CLONEOFSIMO_KEY.match(k) for k in keys):
        return _adapter("cloneofsimo", "LoRA", parts=sorted({k.split(":")[0] for k in keys if ":" in k}))
    peft_style = any(".lora_A." in k or ".lora_B." in k or k.startswith("base_model.model.") for k in keys)
    kohya_style = any(k.split(".")[0].startswith("lora_") for k in keys)
    if peft_style and kohya_style:
        raise UnknownFormat("holds both PEFT (lora_A/lora_B) and kohya (lora_down/lora_up) tensors")
    kohya = kohya_style and not peft_style
    algorithm = _kohya_algorithm(keys, shapes, metadata) if kohya else _algorithm_of_keys(keys)
    if algorithm is None:
        raise UnknownFormat(
            "no LoRA tensors found (expected PEFT '*.lora_A.weight', kohya '*.lora_down.weight' "
            "or a LyCORIS kind such as '*.lokr_w1')"
        )
    if peft_style:
        return _adapter("peft", algorithm, config=False)
    return _adapter("kohya", algorithm, network=_network_summary(metadata))


def _peft_kind(keys: Sequence[str], config: Mapping[str, Any]) -> FileKind:
    peft_type = str(config.get("peft_type", "LORA")).upper()
    algorithm = PEFT_TYPES.get(peft_type, "other")
    if algorithm == "LoRA" and (config.get("use_dora") or _algorithm_of_keys(keys) == "DoRA"):
        algorithm = "DoRA"
    kind = _adapter("peft", algorithm, peft_type=peft_type)
    if algorithm == "other":
        return FileKind(ADAPTER, "peft", "other", f"a PEFT {peft_type} adapter", kind.details)
    return kind


def _network_summary(metadata: Mapping[str, str]) -> dict[str, Any]:
    return {k: metadata[k] for k in ("ss_network_module",) if k in metadata}


def gguf_kind(kv: Mapping[str, Any], tensor_types: Iterable[str]) -> FileKind:
    """A GGUF file from its key/values and tensor types: a LoRA adapter or a model.

    The model's label names the architecture and the most common type of its 2-D tensors (the
    quantization), e.g. "a GGUF model (llama, Q4_1)".
    """
    arch = str(kv.get("general.architecture", "unknown"))
    if kv.get("general.type") == "adapter":
        algorithm = {"lora": "LoRA"}.get(str(kv.get("adapter.type", "")).lower(), "other")
        label = f"a GGUF {_algorithm_label(algorithm)} adapter ({arch})"
        return FileKind(ADAPTER, "gguf", algorithm, label, {"architecture": arch})
    counts = Counter(tensor_types)
    quant = counts.most_common(1)[0][0] if counts else "no tensors"
    return FileKind(
        CHECKPOINT, "gguf", None, f"a GGUF model ({arch}, {quant})", {"architecture": arch, "type": quant}
    )


def checkpoint_kind(storage: str, shards: int = 1) -> FileKind:
    """A model checkpoint: ``storage`` is ``"safetensors"``, ``"safetensors-sharded"`` or ``"pytorch"``."""
    if storage == "safetensors-sharded":
        label = f"a sharded safetensors checkpoint ({shards} shards)"
    elif storage == "pytorch":
        label = "a PyTorch checkpoint" + (f" ({shards} shards)" if shards > 1 else "")
    else:
        label = "a safetensors checkpoint"
    return FileKind(CHECKPOINT, storage, None, label, {"shards": shards})


def detect_adapter_format(keys: Sequence[str], where: str = "adapter") -> str:
    """``"peft"`` or ``"kohya"`` for a single-file adapter loratools loads.

    Raises:
        UnknownFormat: not an adapter, or one loratools does not load yet (named by kind).
    """
    try:
        kind = adapter_kind(keys)
    except UnknownFormat as exc:
        raise UnknownFormat(f"{where}: {exc}") from None
    if not kind.supported:
        raise kind.refuse(where)
    return kind.family
