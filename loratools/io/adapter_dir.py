"""Loading and saving adapters: format detection + safetensors files + configs.

An adapter argument is a PEFT directory, a PEFT ``adapter_model.safetensors`` (its
``adapter_config.json`` beside it), a kohya ``.safetensors`` file, or a Hub id.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from loratools.adapter import Adapter
from loratools.errors import CheckpointError, UnknownFormat
from loratools.formats import LoadContext, kohya, peft
from loratools.formats.detect import is_kohya_stem
from loratools.formats.registry import FORMATS
from loratools.io.filekind import detect_path, read_adapter_config
from loratools.io.resolve import resolve_path
from loratools.io.safetensors_file import SafetensorsFile
from loratools.io.writer import atomic_output, write_tensors

__all__ = [
    "adapter_format",
    "check_output_form",
    "describe_adapter",
    "load_adapter",
    "read_safetensors",
    "save_adapter",
    "save_adapter_as",
    "save_kohya",
]


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors of a (small) .safetensors file and its metadata."""
    st = SafetensorsFile(path)
    return {name: st.read(name) for name in st.infos}, st.metadata


def _weights_file(folder: Path) -> Path:
    for name in (peft.WEIGHTS_NAME, "adapter_model.bin"):
        if (folder / name).is_file():
            if name.endswith(".bin"):
                raise UnknownFormat(
                    f"{folder / name}: pickled adapter weights; re-save with safetensors "
                    "(PEFT: save_pretrained(safe_serialization=True))"
                )
            return folder / name
    raise CheckpointError(f"{folder}: has {peft.CONFIG_NAME} but no {peft.WEIGHTS_NAME}")


def adapter_format(path: Path) -> str:
    """The family of a local adapter path loratools loads: ``"peft"`` or ``"kohya"``.

    Raises:
        UnknownFormat: not an adapter (a checkpoint, naming it), or an adapter kind loratools
            does not load yet (naming it: "a kohya LoKr adapter: not supported by loratools yet").
    """
    kind = detect_path(path)
    if kind.kind != "adapter":
        what = "folder" if path.is_dir() else "file"
        raise UnknownFormat(f"{path}: {kind.label}, not an adapter {what}")
    if not kind.supported:
        raise kind.refuse(str(path))
    return kind.family


def load_adapter(
    argument: str | Path,
    *,
    base_names: list[str] | None = None,
    base_shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> Adapter:
    """Load an adapter from a path or Hub id, whatever its format.

    Args:
        argument: PEFT folder, PEFT/kohya ``.safetensors`` file, or Hub id.
        base_names: the base checkpoint's tensor names; kohya needs them to turn
            ``lora_unet_a_b_c`` back into dotted module paths.
        base_shapes: the base's tensor name → shape; PEFT ``target_parameters`` LoRA on fused
            expert tensors needs them (see :mod:`loratools.kinds.fused`).

    Raises:
        UnknownFormat: unknown, ambiguous or unsupported adapter formats.
        CheckpointError: unreadable files.
    """
    path = resolve_path(argument, what="adapter")
    fmt = adapter_format(path)
    config: dict[str, Any] = {}
    if fmt == "peft":  # a folder, or its weights file: adapter_config.json lies beside them
        folder = path if path.is_dir() else path.parent
        weights = _weights_file(folder) if path.is_dir() else path
        if not (folder / peft.CONFIG_NAME).is_file():
            raise CheckpointError(
                f"{path}: PEFT weights without {peft.CONFIG_NAME} beside them; alpha and scaling are unknown"
            )
        tensors, metadata = read_safetensors(weights)
        config = read_adapter_config(folder / peft.CONFIG_NAME, missing_ok=False)
    else:
        tensors, metadata = read_safetensors(path)
    context = LoadContext(
        source=str(path),
        config=config,
        base_names=base_names,
        base_shapes=base_shapes,
        keep_stems=base_names is None,  # kohya without a base: module names stay the file's stems
    )
    return FORMATS[fmt](tensors, metadata, context=context)


def _write_adapter_file(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], path: str | Path, *, force: bool = False
) -> Path:
    """One adapter ``.safetensors`` file through loratools' writer (:func:`io.writer.write_tensors`),
    atomically. Tensors go in the reference writer's order (widest dtype first, then by name), so
    a file is byte-identical to ``safetensors.torch.save_file``'s when its tensors share a dtype:
    the committed fixtures regenerate exactly (tests/test_fixtures.py)."""
    order = sorted(tensors, key=lambda name: (-tensors[name].element_size(), name))
    return write_tensors({name: tensors[name] for name in order}, metadata, path, force=force)


def save_adapter(
    adapter: Adapter,
    output: str | Path,
    *,
    force: bool = False,
    readme: str | None = None,
    extra_files: Mapping[str, str] | None = None,
) -> Path:
    """Write ``adapter`` as a PEFT folder (adapter_config.json + adapter_model.safetensors), atomically.

    Args:
        adapter: what to write.
        output: the folder to create.
        force: replace an existing folder.
        readme: a model card written as README.md.
        extra_files: more text files to add (name → contents).
    """
    check_output_form(adapter, output)
    files = peft.from_adapter(adapter)
    with atomic_output(output, force=force) as folder:
        folder.mkdir()
        _write_adapter_file(files.tensors, files.metadata, folder / peft.WEIGHTS_NAME)
        (folder / peft.CONFIG_NAME).write_text(json.dumps(files.config, indent=2) + "\n")
        if readme is not None:
            (folder / "README.md").write_text(readme)
        for name, text in (extra_files or {}).items():
            (folder / name).write_text(text)
    return Path(output)


def describe_adapter(path: str | Path, adapter: Adapter) -> str:
    """One line naming what a command got: ``PATH: a kohya LoRA adapter, 72 modules`` (and that
    its module names are the file's kohya names when no base resolved them)."""
    kind = detect_path(resolve_path(path, what="adapter"))
    stems = bool(adapter.weights) and all(is_kohya_stem(m) for m in adapter.weights)
    names = "; module names as in the kohya file (pass --base to resolve them)" if stems else ""
    return f"{path}: {kind.label}, {len(adapter.weights)} modules{names}"


def check_output_form(adapter: Adapter, output: str | Path) -> None:
    """Refuse, before any work, a PEFT folder for an adapter whose module names are still kohya
    stems (a kohya file read without a base): PEFT needs dotted module paths.

    Raises:
        UnknownFormat: saying to pass --base or to write a kohya file.
    """
    if Path(output).suffix == ".safetensors":
        return
    stems = [m for m in adapter.weights if is_kohya_stem(m)]
    if stems:
        raise UnknownFormat(
            f"{output}: the adapter's module names are kohya names ({stems[0]}, …) read without a base; "
            "a PEFT folder needs dotted module paths: pass --base BASE (the model it was made for), "
            "or write kohya instead (-o NAME.safetensors; convert: --to kohya)"
        )


def save_kohya(
    adapter: Adapter, output: str | Path, *, force: bool = False, prefix: str = kohya.DEFAULT_PREFIX
) -> Path:
    """Write ``adapter`` as one kohya ``.safetensors`` file, atomically; module names that are
    already kohya stems (a kohya file read without a base) are written back unchanged."""
    files = kohya.from_adapter(adapter, prefix)
    return _write_adapter_file(files.tensors, files.metadata, output, force=force)


def save_adapter_as(adapter: Adapter, output: str | Path, *, force: bool = False) -> Path:
    """A kohya file when ``output`` ends in ``.safetensors``, else a PEFT folder (see check_output_form)."""
    if Path(output).suffix == ".safetensors":
        return save_kohya(adapter, output, force=force)
    return save_adapter(adapter, output, force=force)
