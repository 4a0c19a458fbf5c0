"""What ``doctor`` reports: findings, one verdict per runtime, and the whole report.

A finding says which modules it concerns, what the runtime does with them, where that rule
comes from, and the loratools command that fixes it. A runtime's verdict follows from its worst
finding: ``will not load`` (a blocker), ``loads with changes`` (something is ignored, rescaled
or must be converted first), or ``loads``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["BLOCKER", "CHANGE", "INFO", "VERDICTS", "DoctorReport", "Finding", "RuntimeVerdict"]

BLOCKER, CHANGE, INFO = "blocker", "change", "info"
SEVERITY_ORDER = {BLOCKER: 0, CHANGE: 1, INFO: 2}
VERDICTS = {BLOCKER: "will not load", CHANGE: "loads with changes", INFO: "loads"}
MODULES_SHOWN = 6  # module names spelled out in a message; the JSON lists them all


@dataclass(frozen=True)
class Finding:
    """One thing a runtime will do with this adapter that its user should know.

    Attributes:
        rule: a stable identifier (``vllm.dora``), for scripts and docs/doctor.md.
        severity: ``blocker`` (the runtime refuses the adapter), ``change`` (it loads, but
            something is ignored, applied at another scale, or needs converting first), ``info``.
        effect: what the runtime does: ``rejects``, ``ignores silently``, ``applies with a
            different scale``, ``needs conversion``, ``wastes memory``, ``changes nothing``, ….
        message: one sentence for a person.
        modules: the modules concerned (empty: the whole adapter).
        source: where the rule comes from (runtime version and file, or docs page).
        fix: the exact command that fixes it, or None when loratools cannot.
    """

    rule: str
    severity: str
    effect: str
    message: str
    modules: tuple[str, ...] = ()
    source: str = ""
    fix: str | None = None

    def modules_text(self) -> str:
        """The modules in a few words: all of them when few, else a count and the first few."""
        if not self.modules:
            return ""
        shown = ", ".join(self.modules[:MODULES_SHOWN])
        more = len(self.modules) - MODULES_SHOWN
        return f"{len(self.modules)} module(s): {shown}" + (f", … and {more} more" if more > 0 else "")

    def to_dict(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "severity": self.severity,
            "effect": self.effect,
            "message": self.message,
            "modules": list(self.modules),
            "source": self.source,
            "fix": self.fix,
        }


@dataclass(frozen=True)
class RuntimeVerdict:
    """Everything ``doctor`` found for one runtime."""

    runtime: str
    version: str
    findings: tuple[Finding, ...] = ()

    @property
    def verdict(self) -> str:
        worst = min((SEVERITY_ORDER[f.severity] for f in self.findings), default=SEVERITY_ORDER[INFO])
        return VERDICTS[next(s for s, o in SEVERITY_ORDER.items() if o == worst)]

    @property
    def loads(self) -> bool:
        return not any(f.severity == BLOCKER for f in self.findings)

    def to_dict(self) -> dict[str, Any]:
        return {
            "runtime": self.runtime,
            "version": self.version,
            "verdict": self.verdict,
            "findings": [f.to_dict() for f in self.findings],
        }


@dataclass(frozen=True)
class DoctorReport:
    """The adapter, what was checked everywhere (``general``), and one verdict per runtime."""

    adapter: str
    label: str
    base: str | None
    general: tuple[Finding, ...]
    runtimes: tuple[RuntimeVerdict, ...]
    facts: dict[str, Any] = field(default_factory=dict)
    not_checked: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """Every runtime asked for loads the adapter, and nothing general blocks it."""
        return all(r.loads for r in self.runtimes) and not any(f.severity == BLOCKER for f in self.general)

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "adapter": self.adapter,
            "label": self.label,
            "base": self.base,
            "ok": self.ok,
            "general": [f.to_dict() for f in self.general],
            "runtimes": [r.to_dict() for r in self.runtimes],
            "not_checked": list(self.not_checked),
            "facts": self.facts,
        }
