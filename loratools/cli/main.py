"""The ``loratools`` entry point: a click group that loads each command only when it runs.

Commands are imported lazily so ``loratools --help`` stays instant (torch alone costs seconds).
A :class:`~loratools.errors.LoratoolsError` becomes one ``error: …`` line and exit code 1.
"""

from __future__ import annotations

import atexit
import gc
import importlib
import importlib.util
import os
import signal
import sys
import warnings
from typing import Any

import click

from loratools import __version__
from loratools.device import keep_thread_count

# name → (module, one-line help); each module defines a click command named like the module.
COMMANDS: dict[str, tuple[str, str]] = {
    "inspect": ("loratools.cli.inspect", "Summarise a checkpoint or an adapter."),
    "extract": (
        "loratools.cli.extract",
        "Extract a LoRA adapter from a full fine-tune (truncated SVD of ΔW).",
    ),
    "merge": ("loratools.cli.merge", "Merge adapters into base weights: W = W0 + Σ w·s·B·A."),
    "unmerge": ("loratools.cli.merge", "Subtract adapters from merged weights."),
    "swap": ("loratools.cli.merge", "Replace one merged adapter by another in one pass."),
    "spectrum": ("loratools.cli.spectrum", "Singular-value spectra: is ΔW really low-rank?"),
    "similarity": ("loratools.cli.similarity", "Subspace similarity φ(i, j) between two adapters."),
    "combine": ("loratools.cli.combine", "Weighted sums of adapters: exact, SVD-truncated, TIES or DARE."),
    "resize": ("loratools.cli.resize", "Lower an adapter's ranks optimally (fixed, energy or budget)."),
    "convert": ("loratools.cli.convert", "Convert adapters (PEFT, kohya, GGUF) and models (.bin, GGUF)."),
    "train": ("loratools.cli.train", "Train a LoRA adapter with the built-in loop."),
    "push": ("loratools.cli.push", "Publish an adapter folder to the Hugging Face Hub."),
    "pull": ("loratools.cli.push", "Download an adapter or model from the Hub."),
    "doctor": ("loratools.cli.doctor", "Will an adapter load in PEFT, vLLM, llama.cpp…? The fix if not."),
}


class LazyGroup(click.Group):
    """Loads command modules on demand and turns library errors into one-line messages."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [name for name, (module, _) in COMMANDS.items() if importlib.util.find_spec(module)]

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module = importlib.import_module(COMMANDS[name][0])
        command: click.Command = getattr(module, name)
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, COMMANDS[name][1]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def invoke(self, ctx: click.Context) -> Any:
        from loratools.errors import LoratoolsError

        debug = bool(ctx.params.get("debug"))
        try:
            return super().invoke(ctx)
        except LoratoolsError as exc:
            if debug:
                raise
            _fail(str(exc))
        except (OSError, MemoryError) as exc:
            if debug:
                raise
            _fail(f"{type(exc).__name__}: {exc}")
        except KeyboardInterrupt:
            _fail("interrupted; no output was written", code=130)
        except Terminated as exc:
            _stopped(exc)


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM/SIGHUP, so the run unwinds like Ctrl-C: every
    ``finally`` runs and temporaries are removed. A BaseException, so no ``except Exception``
    swallows it."""

    def __init__(self, number: int) -> None:
        self.number = number
        self.name = signal.Signals(number).name
        super().__init__(self.name)


def _terminate(number: int, _frame: object) -> None:
    # a second signal during the clean-up ends the process at once (a later run removes what is left)
    signal.signal(number, signal.SIG_DFL)
    raise Terminated(number)


def handle_termination() -> None:
    """Turn SIGTERM (and SIGHUP where it exists) into :class:`Terminated`, unless they are ignored
    (``nohup`` ignores SIGHUP: keep that)."""
    for name in ("SIGTERM", "SIGHUP"):
        number = getattr(signal, name, None)
        if number is not None and signal.getsignal(number) is not signal.SIG_IGN:
            signal.signal(number, _terminate)


def _stopped(exc: Terminated) -> None:
    _fail(f"stopped by {exc.name} before finishing; nothing partial was left behind", code=128 + exc.number)


def _fail(message: str, code: int = 1) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _show_warning(message: Warning | str, category: type[Warning], *_: Any, **__: Any) -> None:
    click.echo(f"warning: {message}", err=True)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="loratools")
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
def cli(debug: bool) -> None:
    """loratools — extract, merge, inspect and ship LoRA adapters (Hu et al., 2021)."""
    if not debug:
        warnings.showwarning = _show_warning


def main() -> None:
    """Console-script entry point."""
    handle_termination()
    # The interpreter's last collection walks every object torch made at import (hundreds of
    # thousands, none of them garbage): 0.1–0.2 s per run, profiled. Freezing them at exit skips
    # that walk; atexit runs before the final collection, and nothing is left to free by then.
    atexit.register(gc.freeze)
    if os.environ.get("OMP_NUM_THREADS"):  # the user's thread count: streaming passes keep it
        keep_thread_count()
    try:
        cli(prog_name="loratools")
    except Terminated as exc:  # outside a command (while parsing or rendering)
        _stopped(exc)
    except Exception as exc:  # a bug: still one line unless --debug was asked for
        if "--debug" in sys.argv:
            raise
        # bad input is a LoratoolsError with its own message (formats/validate.py, options'
        # __post_init__); anything reaching here is loratools' fault, and says so
        _fail(
            f"internal error ({type(exc).__name__}: {exc}); this is a bug in loratools, please report it "
            "with the traceback that --debug shows"
        )


if __name__ == "__main__":
    main()
