"""What to extract: :class:`ExtractOptions`, one frozen dataclass whose fields are the CLI flags."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

import torch

from loratools.errors import InvalidOptions
from loratools.formats.targets import matches_target
from loratools.linalg import RULES, RankRule, RuleName, Split

DEFAULT_MAX_RANK = 64  # SVD width for --energy/--sv-threshold/--budget when --max-rank is not given
REGEX_CHARS = set("*+?()[]{}|^$\\")


@dataclass(frozen=True)
class ExtractOptions:
    """How to extract; exactly one of ``rank``, ``energy``, ``sv_threshold``, ``budget``.

    Attributes:
        rank: the same rank r for every module (capped at min(out, in)).
        energy: per module, the smallest rank keeping this fraction of ‖ΔW‖²_F, in (0, 1].
        sv_threshold: per module, keep every singular value σᵢ ≥ this (absolute).
        budget: total rank over all modules, spent on the model-wide largest σᵢ².
        max_rank: cap per module for energy/sv_threshold/budget (default 64): the SVD computed.
        targets: PEFT ``target_modules``: leaf names (``q_proj``) or one full-match regex
            over module paths; None means every 2-D weight except embeddings and lm_head.
        exact: full SVD (``torch.linalg.svd``) instead of the randomized range finder.
        split: ``"sqrt"`` (B = U√S, A = √S Vᵀ) or ``"b"`` (B = U S, A = Vᵀ).
        alpha: LoRA alpha of every module; None means alpha = rank, so scale = 1.
        modules_to_save: carry norms/biases/untargeted weights that differ, in full.
        include_embeddings: carry embeddings and lm_head that differ (also grown vocabularies);
            the same as ``embeddings="full"``.
        embeddings: what to do with embeddings and lm_head that differ: ``"skip"`` (report
            them), ``"full"`` (carry them whole, PEFT's modules_to_save) or ``"lora"`` (factor
            them like any module, with the same rank rule; an input embedding is written in
            PEFT's embedding layout, see :mod:`loratools.kinds.embedding`).
        dtype: output dtype; None keeps the fine-tune's float dtype.
        seed: seed of the randomized SVD's Gaussian sketch.
    """

    rank: int | None = None
    energy: float | None = None
    sv_threshold: float | None = None
    budget: int | None = None
    max_rank: int | None = None
    targets: tuple[str, ...] | None = None
    exact: bool = False
    split: Split = "sqrt"
    alpha: float | None = None
    modules_to_save: bool = False
    include_embeddings: bool = False
    embeddings: Literal["skip", "full", "lora"] = "skip"
    dtype: torch.dtype | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        self.rank_rule.check(RULES)
        checks = [
            (self.max_rank is None or self.max_rank >= 1, "--max-rank must be at least 1"),
            (
                self.max_rank is None or self.rank is None,
                "--max-rank goes with --energy/--sv-threshold/--budget",
            ),
            (self.alpha is None or 0 < self.alpha < math.inf, "--alpha must be a positive number"),
            (self.split in ("sqrt", "b"), "--split must be 'sqrt' or 'b'"),
            (not self.targets or all(self.targets), "--targets names must not be empty"),
            (self.embeddings in ("skip", "full", "lora"), "--embeddings must be 'skip', 'full' or 'lora'"),
            (
                not (self.include_embeddings and self.embeddings == "lora"),
                "--include-embeddings carries embeddings whole; it cannot go with --embeddings lora",
            ),
        ]
        problems = [message for ok, message in checks if not ok]
        if self.targets and len(self.targets) == 1 and REGEX_CHARS & set(self.targets[0]):
            try:
                re.compile(self.targets[0])
            except re.error as exc:
                problems.append(f"--targets {self.targets[0]!r} is not a valid regex ({exc})")
        if problems:
            raise InvalidOptions("; ".join(problems))

    @property
    def rank_rule(self) -> RankRule:
        """The rank rule these options give (validated: raises ``InvalidOptions``)."""
        return RankRule(
            rank=self.rank, energy=self.energy, sv_threshold=self.sv_threshold, budget=self.budget
        )

    @property
    def rule(self) -> RuleName:
        """The rank rule's name: ``rank``, ``energy``, ``sv_threshold`` or ``budget``."""
        return self.rank_rule.name or "budget"

    @property
    def embedding_mode(self) -> Literal["skip", "full", "lora"]:
        """``embeddings``, with ``include_embeddings`` meaning ``"full"``."""
        return "full" if self.include_embeddings else self.embeddings

    @property
    def width(self) -> int:
        """How many singular triplets to compute per module before choosing its rank."""
        return self.rank if self.rank is not None else (self.max_rank or DEFAULT_MAX_RANK)

    def targets_module(self, module: str) -> bool:
        """PEFT's rule: a one-entry regex must full-match the path; names match the path's tail."""
        if self.targets is None:
            return True
        if len(self.targets) == 1 and REGEX_CHARS & set(self.targets[0]):
            return matches_target(module, self.targets[0])
        return matches_target(module, self.targets)
