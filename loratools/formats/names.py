"""Matching an adapter's module names to a base checkpoint's tensor names.

An adapter module ``model.layers.0.self_attn.q_proj`` adapts the base tensor
``model.layers.0.self_attn.q_proj.weight``. Adapters written against a differently wrapped model
(``layers.0…`` vs ``model.layers.0…``) are matched by a unique suffix, in either direction.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

from loratools.errors import MissingKeys, list_problems

__all__ = ["resolve_modules", "resolve_tensor_names", "suffix_matches"]


def suffix_matches(name: str, known: Collection[str], sep: str = ".") -> list[str]:
    """The known names ``name`` refers to: itself when known, else every known name that ends
    with ``sep + name`` or that ``name`` ends with after a ``sep``.

    ``layers.0.q_proj.weight`` finds ``model.layers.0.q_proj.weight`` and
    ``base_model.model.layers.0.q_proj`` finds ``layers.0.q_proj``: the wrapper prefixes (``model.``,
    ``base_model.model.``) differ between a model class and its checkpoint, the path below does not.
    Matches keep ``known``'s order; pass a dict (``dict.fromkeys(names)``) for an O(1) exact test.
    The caller decides what zero or several matches mean.
    """
    if name in known:
        return [name]
    return [k for k in known if k.endswith(sep + name) or name.endswith(sep + k)]


def resolve_tensor_names(
    names: Iterable[str], base_names: Iterable[str], what: str = "adapter"
) -> dict[str, str]:
    """Map each tensor name to the base tensor it refers to: exact match, else a unique suffix match.

    Args:
        names: tensor names as the adapter knows them (``<module>.weight``).
        base_names: the base checkpoint's tensor names.
        what: word used in the error message.

    Returns:
        name → base tensor name.

    Raises:
        MissingKeys: every name that matches nothing or several base tensors, listed at once.
    """
    base = dict.fromkeys(base_names)
    resolved: dict[str, str] = {}
    problems: list[str] = []
    for name in names:
        matches = suffix_matches(name, base)
        if len(matches) == 1:
            resolved[name] = matches[0]
        elif matches:
            problems.append(f"{name} matches {len(matches)} base tensors ({', '.join(matches[:3])})")
        else:
            problems.append(f"{name} matches no base tensor")
    if problems:
        raise MissingKeys(
            f"{len(problems)} {what} module(s) do not fit the base: {list_problems(problems)}; "
            "is this the base model the adapter was made for?"
        )
    return resolved


def resolve_modules(modules: Iterable[str], base_names: Iterable[str]) -> dict[str, str]:
    """Map LoRA module paths to the base's ``<path>.weight`` tensor names (see resolve_tensor_names)."""
    modules = list(modules)
    weights = resolve_tensor_names([f"{m}.weight" for m in modules], base_names)
    return {m: weights[f"{m}.weight"] for m in modules}
