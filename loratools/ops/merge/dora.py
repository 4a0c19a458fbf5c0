"""DoRA in merge, unmerge and swap: PEFT's order of operations and the norms record.

A DoRA module does not add a fixed ``s·B@A``; it rescales each output row of ``W0 + s·B@A``
(see :mod:`loratools.ops.dora`). Merging several adapters follows PEFT's ``merge_and_unload``,
which merges them one after another in the order given::

    plain LoRA i:   W ← W + wᵢ·sᵢ·Bᵢ@Aᵢ
    DoRA i:         nᵢ = ‖W0 + sᵢ·Bᵢ@Aᵢ‖_row       (always against the unmerged base W0)
                    W ← diag(mᵢ / nᵢ) · (W + sᵢ·Bᵢ@Aᵢ)

so a DoRA adapter also rescales whatever was merged before it, and the result depends on the
order. A DoRA adapter enters with weight exactly 1 (its update is not linear in a multiplier).

Undoing a DoRA merge needs ``nᵢ``, which the merged weight does not determine. Every merge that
involves DoRA therefore writes a *norms record* (:class:`DoraRecord`, file
``dora_norms.loratools`` in the output folder, or ``NAME.dora_norms.loratools`` beside
``NAME.safetensors``): the ordered list of adapters merged (with a fingerprint of their
tensors) and ``nᵢ`` per adapted tensor. Unmerge and swap read it and undo the adapters merged
*last* (in reverse order): ``W ← W · nᵢ / mᵢ − sᵢ·Bᵢ@Aᵢ``, exact to float32 rounding. Without
the record, or for adapters that are not the last ones merged, they refuse.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from loratools.adapter import Adapter
from loratools.errors import LoratoolsError, list_problems
from loratools.ops.dora import add_direction, dora_modules, row_norms, scale_rows, unscale_rows
from loratools.ops.merge.precision import ModuleStats
from loratools.ops.merge.terms import MergeTerm, TensorUpdate
from loratools.ops.merge.update import Scratch, check_finite, sampled_rows

RECORD_FORMAT = "loratools-dora-norms"


def _bytes(t: torch.Tensor) -> bytes:
    return bytes(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def fingerprint(adapter: Adapter) -> str:
    """SHA-256 of every module's name, factors, alpha, rsLoRA flag and magnitude (16 hex digits)."""
    digest = hashlib.sha256()
    for name in sorted(adapter.weights):
        w = adapter.weights[name]
        digest.update(f"{name}|{getattr(w, 'alpha', None)!r}|{getattr(w, 'use_rslora', False)}|".encode())
        for t in (getattr(w, "a", None), getattr(w, "b", None), getattr(w, "magnitude", None)):
            if t is not None:
                digest.update(_bytes(t))
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class RecordTerm:
    """One adapter a merge applied: what messages call it, its weight, fingerprint and kind."""

    label: str
    weight: float
    fingerprint: str
    dora: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "weight": self.weight,
            "fingerprint": self.fingerprint,
            "dora": self.dora,
        }


@dataclass
class DoraRecord:
    """The adapters merged into a model, in order, and each DoRA adapter's norms per tensor.

    Attributes:
        terms: the adapters in the order they were merged.
        norms: (index into ``terms``, base tensor name) → ``‖W0 + s·B@A‖_row`` (out,) float32.
    """

    terms: list[RecordTerm] = field(default_factory=list)
    norms: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)

    def to_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Tensors ``"<index>:<tensor name>"`` and metadata (format, version, terms as JSON)."""
        tensors = {f"{i}:{name}": n.contiguous() for (i, name), n in self.norms.items()}
        terms = json.dumps([t.to_dict() for t in self.terms])
        return tensors, {"format": RECORD_FORMAT, "version": "1", "terms": terms}

    @classmethod
    def from_tensors(
        cls, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], where: str
    ) -> DoraRecord:
        """The inverse of :meth:`to_tensors`.

        Raises:
            LoratoolsError: not a loratools norms record.
        """
        if metadata.get("format") != RECORD_FORMAT or metadata.get("version") != "1":
            raise LoratoolsError(
                f"{where}: not a loratools DoRA norms record (format {metadata.get('format')!r})"
            )
        terms = [RecordTerm(**t) for t in json.loads(metadata["terms"])]
        norms = {}
        for key, tensor in tensors.items():
            index, _, name = key.partition(":")
            norms[(int(index), name)] = tensor.float()
        return cls(terms, norms)


def _record_term(term: MergeTerm) -> RecordTerm:
    return RecordTerm(
        term.label, abs(term.weight), fingerprint(term.adapter), bool(dora_modules(term.adapter))
    )


def _is_dora(weight: Any) -> bool:
    return getattr(weight, "magnitude", None) is not None


@dataclass
class DoraPlan:
    """How every tensor touched by DoRA is updated, and the record the output gets.

    Attributes:
        record: the base's record (or an empty one).
        removed: record index per adapter being removed (by ``id`` of its module weights).
        added: position among the added adapters (by ``id`` of its module weights).
        added_terms: the added adapters, in order.
        keep: how many of the record's adapters stay merged (the rest are removed).
        new_norms: filled while streaming: (added position, tensor) → norms.
    """

    record: DoraRecord
    removed: dict[int, int]
    added: dict[int, int]
    added_terms: list[RecordTerm]
    keep: int
    new_norms: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)

    def handles(self, update: TensorUpdate) -> bool:
        """Whether this tensor needs the DoRA path (a DoRA module adds to or leaves it)."""
        return any(_is_dora(lora) for lora, _, _ in update.loras)

    def output_record(self) -> DoraRecord:
        """The record of the output: the adapters that stay merged, then the ones added now."""
        norms = {k: v for k, v in self.record.norms.items() if k[0] < self.keep}
        norms.update({(self.keep + i, name): n for (i, name), n in self.new_norms.items()})
        return DoraRecord(self.record.terms[: self.keep] + self.added_terms, norms)

    def check_record(self, updates: Mapping[str, TensorUpdate], where: str) -> None:
        """Every DoRA module being removed has its norms in the record, checked before writing.

        Raises:
            LoratoolsError: the tensors whose norms are missing (the record belongs elsewhere).
        """
        missing = [
            name
            for name, update in updates.items()
            for lora, _, _ in update.loras
            if _is_dora(lora)
            and id(lora) in self.removed
            and (self.removed[id(lora)], name) not in self.record.norms
        ]
        if missing:
            raise LoratoolsError(
                f"{where} has no DoRA norms for {len(missing)} tensor(s) ({list_problems(missing, 3)}): "
                "it does not belong to this merged model; merge into the original base instead"
            )

    def _norms(self, index: int, name: str) -> torch.Tensor:
        norms = self.record.norms.get((index, name))
        if norms is None:
            raise LoratoolsError(
                f"the DoRA norms record has no norms of {self.record.terms[index].label} for {name}; "
                "it does not belong to this merged model — merge into the original base instead"
            )
        return norms

    def apply(
        self,
        name: str,
        w0: torch.Tensor,
        update: TensorUpdate,
        out_dtype: torch.dtype,
        device: torch.device,
        scratch: Scratch | None = None,
    ) -> tuple[torch.Tensor, ModuleStats]:
        """The new tensor: removals undone in reverse merge order, then additions in order.

        With ``scratch`` and a narrower output, the float32 working copy lives in the merge's reused
        buffer and the output is cast into recycled memory, as a plain merge does: a fresh float32
        copy per tensor made peak RSS grow with model size (1.04 GB vs 0.59 GB at 0.66 B)."""
        removals = sorted(
            ((self.removed[id(l)], l, w, t) for l, w, t in update.loras if id(l) in self.removed),
            key=lambda op: -op[0],
        )
        additions = sorted(
            ((self.added[id(l)], l, w, t) for l, w, t in update.loras if id(l) in self.added),
            key=lambda op: op[0],
        )
        base = w0.to(device)
        reuse = scratch is not None and out_dtype != torch.float32  # a float32 output *is* the working copy
        current = (
            scratch.get(base.shape).copy_(base)
            if scratch is not None and reuse
            else base.to(torch.float32, copy=True)
        )
        for index, lora, weight, transposed in removals:
            if (magnitude := getattr(lora, "magnitude", None)) is not None:
                unscale_rows(current, magnitude, self._norms(index, name).to(device), transposed)
            add_direction(current, lora, weight, transposed)
        # a DoRA's norm is taken against the unmerged base; keep it apart once something else is added
        reference = (
            current.clone() if len(additions) > 1 and any(_is_dora(op[1]) for op in additions) else None
        )
        for position, lora, weight, transposed in additions:
            magnitude = getattr(lora, "magnitude", None)  # DoRA only; other kinds add L @ R
            if magnitude is None:
                add_direction(current, lora, weight, transposed)
                continue
            if reference is None:
                add_direction(current, lora, 1.0, transposed)
                norms = row_norms(current, transposed)
            else:
                norms = row_norms(add_direction(reference.clone(), lora, 1.0, transposed), transposed)
                add_direction(current, lora, 1.0, transposed)
            scale_rows(current, magnitude, norms, transposed)
            self.new_norms[(position, name)] = norms.cpu()
        out = scratch.cast(current, out_dtype) if scratch is not None and reuse else current.to(out_dtype)
        return out, _stats(name, base, current, out, len(update.loras))


def _stats(
    name: str, w0: torch.Tensor, merged: torch.Tensor, out: torch.Tensor, adapters: int
) -> ModuleStats:
    """The precision record, as :func:`~loratools.ops.merge.update.apply_update` keeps it, with
    Δ = W' − W0 (a DoRA update is dense) measured on the same sampled rows (about 2²⁰ elements)."""
    check_finite(name, out, w0)
    rows, factor = sampled_rows(w0.shape)
    root = math.sqrt(factor)
    base = w0[rows].float()
    delta = merged[rows] - base  # (m, k) float32
    norm = float(torch.linalg.vector_norm(delta)) * root
    seen = (
        out[rows].to(torch.float32, copy=True).sub_(w0[rows].to(out.dtype).float())
    )  # round(W') − round(W0)
    if torch.finfo(out.dtype).eps > torch.finfo(w0.dtype).eps:  # narrower: the share of Δ kept on average
        kept = float((seen * delta).sum()) * factor / norm**2 if norm > 0 else 1.0
        lost = (1.0 - min(max(kept, 0.0), 1.0)) * norm
        base_round = float(torch.linalg.vector_norm(w0[rows].to(out.dtype).float().sub_(base))) * root
    else:
        lost, base_round = float(torch.linalg.vector_norm(seen.sub_(delta))) * root, 0.0
    return ModuleStats(
        name, tuple(w0.shape), str(out.dtype).removeprefix("torch."), adapters=adapters,
        base_norm=float(torch.linalg.vector_norm(base)) * root, delta_norm=norm, lost_norm=lost,
        base_round_norm=base_round,
    )  # fmt: skip


def _check_weights(terms: Sequence[MergeTerm]) -> None:
    for term in terms:
        if dora_modules(term.adapter) and not math.isclose(abs(term.weight), 1.0):
            raise LoratoolsError(
                f"{term.label}: a DoRA adapter merges with weight 1 only (got {abs(term.weight):g}); its "
                "update rescales whole rows and is not linear in a multiplier — drop --weight for it"
            )


def _match_removals(removes: Sequence[MergeTerm], record: DoraRecord, where: str) -> dict[int, int]:
    """Record index per removed adapter; they must be the last ones merged, in any order."""
    tail = record.terms[len(record.terms) - len(removes) :] if len(removes) <= len(record.terms) else []
    wanted = {(t.fingerprint, t.weight): len(record.terms) - len(tail) + i for i, t in enumerate(tail)}
    removed: dict[int, int] = {}
    for term in removes:
        index = wanted.pop((fingerprint(term.adapter), abs(term.weight)), None)
        if index is None:
            merged = ", ".join(t.label for t in record.terms) or "nothing"
            raise LoratoolsError(
                f"{term.label}: not among the adapters merged last according to {where} (merged, in "
                f"order: {merged}); with DoRA the order matters, so remove the last-merged adapters "
                "(with the weights they were merged with), or merge into the original base instead"
            )
        removed.update({id(w): index for w in term.adapter.weights.values()})
    return removed


def plan_dora(terms: Sequence[MergeTerm], record: DoraRecord | None, where: str) -> DoraPlan | None:
    """Check the DoRA rules and plan the DoRA path; None when neither DoRA nor a record is involved.

    Args:
        terms: the adapters with signed weights (negative = remove).
        record: the norms record found beside the base/merged model, if any.
        where: the record's path (or where it was looked for), for messages.

    Raises:
        LoratoolsError: a DoRA weight other than 1; removing DoRA without a record; removing
            adapters that are not the last merged; adding DoRA on top of adapters that stay merged.
    """
    if not any(dora_modules(t.adapter) for t in terms) and record is None:
        return None
    _check_weights(terms)
    removes = [t for t in terms if t.weight < 0]
    adds = [t for t in terms if t.weight > 0]
    if record is None:
        dora = [t.label for t in removes if dora_modules(t.adapter)]
        if dora:
            raise LoratoolsError(
                f"{dora[0]}: removing a DoRA adapter needs the per-row norms ‖W0 + s·B·A‖ that merge "
                f"records, and there is no record at {where}; the merged weights alone lose one number "
                "per output row, so the base cannot be recovered — merge into the original base instead"
            )
        record = DoraRecord()
    removed = _match_removals(removes, record, where) if removes else {}
    keep = len(record.terms) - len(removes)
    if keep > 0 and any(dora_modules(t.adapter) for t in adds):
        raise LoratoolsError(
            f"adding a DoRA adapter here needs the original base for its norms, but {keep} adapter(s) "
            f"stay merged ({', '.join(t.label for t in record.terms[:keep])}, per {where}); "
            "merge into the original base instead"
        )
    added = {id(w): i for i, t in enumerate(adds) for w in t.adapter.weights.values()}
    return DoraPlan(record, removed, added, [_record_term(t) for t in adds], keep)
