"""``doctor``: will this adapter work where the user wants to run it — and if not, the command that
fixes it. Pure: facts in (:mod:`.facts`), findings out (:mod:`.findings`); the rules are
runtime-independent checks (:mod:`.general`) plus one file per runtime (:mod:`.runtimes`).
"""

from __future__ import annotations

from collections.abc import Sequence

from loratools.errors import LoratoolsError
from loratools.ops.doctor.facts import AdapterFacts, BaseFacts, adapter_facts, module_facts
from loratools.ops.doctor.findings import BLOCKER, CHANGE, INFO, DoctorReport, Finding, RuntimeVerdict
from loratools.ops.doctor.general import general_findings
from loratools.ops.doctor.runtimes import RUNTIMES, Runtime, runtime_names

__all__ = [
    "BLOCKER",
    "CHANGE",
    "INFO",
    "RUNTIMES",
    "AdapterFacts",
    "BaseFacts",
    "DoctorReport",
    "Finding",
    "Runtime",
    "RuntimeVerdict",
    "adapter_facts",
    "diagnose",
    "module_facts",
    "parse_runtimes",
    "runtime_names",
]


def parse_runtimes(text: str | None) -> list[str] | None:
    """``"vllm,llama.cpp"`` → the runtimes to check; None (or "all") → every runtime that runs
    models of the adapter's kind, decided by :func:`diagnose`."""
    if text is None or text.strip() in ("", "all"):
        return None
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in RUNTIMES]
    if unknown:
        raise LoratoolsError(f"--for {','.join(unknown)}: unknown runtime; choose from {', '.join(RUNTIMES)}")
    return list(dict.fromkeys(names))


def diagnose(facts: AdapterFacts, runtimes: Sequence[str] | None = None) -> DoctorReport:
    """Every general finding, then each runtime's verdict: the ``runtimes`` named, or by default
    every runtime for the adapter's kind of model (the others are listed as not applicable)."""
    if runtimes is None:
        runtimes = [n for n, r in RUNTIMES.items() if r.applies_to(facts)]
    skipped = tuple(n for n in RUNTIMES if n not in runtimes)
    verdicts = tuple(RUNTIMES[name].check(facts) for name in runtimes)
    base = facts.base.path if facts.base is not None else None
    return DoctorReport(
        facts.path, facts.label, base, general_findings(facts), verdicts, facts.to_dict(), not_checked=skipped
    )
