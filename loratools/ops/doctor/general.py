"""Checks that need no runtime: every runtime would misbehave the same way on these."""

from __future__ import annotations

from collections.abc import Callable

from loratools.ops.doctor.facts import AdapterFacts
from loratools.ops.doctor.findings import BLOCKER, CHANGE, INFO, Finding

__all__ = ["GENERAL_RULES", "general_findings"]

LARGE_SCALE = 64.0  # s = alpha/r above this multiplies B·A so much that bf16 training rarely meant it
SMALL_SCALE = 1e-3  # below this the update is a rounding error in bf16 (2⁻⁸ relative spacing)
LOST_WARNING = 0.5  # the merge precision report's own threshold
SOURCE = "loratools"


def _not_loaded(facts: AdapterFacts) -> list[Finding]:
    if facts.load_error is None:
        return []
    return [Finding(
        "general.unreadable", BLOCKER, "rejects",
        f"loratools cannot use it: {facts.load_error}", source=SOURCE,
    )]  # fmt: skip


def _zero(facts: AdapterFacts) -> list[Finding]:
    if not facts.zero_modules:
        return []
    everything = len(facts.zero_modules) == len(facts.kinds)
    return [Finding(
        "general.zero_update", CHANGE, "changes nothing",
        ("every module's update is exactly zero (B = 0: the adapter was never trained, or saved "
         "right after initialisation)") if everything else "these modules' updates are exactly zero (B = 0)",
        facts.zero_modules, SOURCE,
    )]  # fmt: skip


def _duplicates(facts: AdapterFacts) -> list[Finding]:
    if not facts.duplicates:
        return []
    return [Finding(
        "general.duplicate_modules", BLOCKER, "applies one of them, or both",
        "the same module appears under two spellings; which one a runtime applies depends on its loader",
        facts.duplicates, SOURCE,
    )]  # fmt: skip


def _rank_too_high(facts: AdapterFacts) -> list[Finding]:
    over = tuple(m for m, r in facts.ranks.items() if facts.shapes.get(m) and r >= min(facts.shapes[m][:2]))
    if not over:
        return []
    smallest = min(min(facts.shapes[m][:2]) for m in over)
    return [Finding(
        "general.rank_exceeds_dims", CHANGE, "wastes memory",
        "rank ≥ min(out, in): the factors are no smaller than the weight itself and add nothing a lower rank "
        "could not hold",
        over, SOURCE, facts.command("resize", "ADAPTER", "-r", str(smallest), "-o", "resized/"),
    )]  # fmt: skip


def _extreme_scale(facts: AdapterFacts) -> list[Finding]:
    large = tuple(m for m, s in facts.scales.items() if abs(s) > LARGE_SCALE)
    small = tuple(m for m, s in facts.scales.items() if 0 < abs(s) < SMALL_SCALE)
    findings = []
    if large:
        findings.append(Finding(
            "general.extreme_scale", INFO, "applies as written",
            f"effective scale alpha/r (or alpha/√r) above {LARGE_SCALE:g}: check that alpha and the rank "
            "patterns say what training used", large, SOURCE,
        ))  # fmt: skip
    if small:
        findings.append(Finding(
            "general.tiny_scale", INFO, "applies as written",
            f"effective scale below {SMALL_SCALE:g}: the update may round away in bf16", small, SOURCE,
        ))  # fmt: skip
    return findings


def _base_fit(facts: AdapterFacts) -> list[Finding]:
    base = facts.base
    if base is None:
        return []
    findings = []
    if base.missing:
        findings.append(Finding(
            "general.base_missing_modules", BLOCKER, "rejects",
            f"no tensor in {base.path} for these modules; is it the adapter's base model?"
            + (f" The adapter records {base.recorded}." if base.recorded else ""),
            base.missing, SOURCE,
        ))  # fmt: skip
    if base.mismatched:
        findings.append(Finding(
            "general.base_shape_mismatch", BLOCKER, "rejects",
            "shapes differ from the base: " + "; ".join(base.mismatched[:4]), source=SOURCE,
        ))  # fmt: skip
    lost = tuple(m for m, f in base.lost.items() if f > LOST_WARNING)
    if lost:
        findings.append(Finding(
            "general.merge_precision", CHANGE, "loses the update when merged",
            f"merged in the base's {base.dtype}, more than {LOST_WARNING:.0%} of these modules' update rounds "
            "away; serve the adapter unmerged, or merge to float32",
            lost, SOURCE, facts.command("merge", "BASE", "ADAPTER", "--dtype", "float32", "-o", "merged/"),
        ))  # fmt: skip
    return findings


GENERAL_RULES: tuple[Callable[[AdapterFacts], list[Finding]], ...] = (
    _not_loaded, _zero, _duplicates, _rank_too_high, _extreme_scale, _base_fit,
)  # fmt: skip


def general_findings(facts: AdapterFacts) -> tuple[Finding, ...]:
    """Every runtime-independent finding, in rule order."""
    return tuple(f for rule in GENERAL_RULES for f in rule(facts))
