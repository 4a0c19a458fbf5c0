"""``loratools push ADAPTER_DIR REPO_ID`` and ``loratools pull REPO_ID[@rev] -o DIR``."""

from __future__ import annotations

from pathlib import Path

import click

from loratools.cli import render
from loratools.cli.options import force_flag, reporting

token_option = click.option(
    "--token",
    default=None,
    metavar="TOKEN",
    help="Hub token (default: HF_TOKEN or the `hf auth login` token). Prefer HF_TOKEN: a flag lands in shell history.",
)


def _quiet_hub_bars(quiet: bool) -> None:
    """huggingface_hub draws its own tqdm bars on stderr; keep them only on an interactive stderr."""
    if quiet or not render.err.is_terminal:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()


@click.command()
@click.argument("adapter_dir", type=click.Path(path_type=Path))
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repository private (ignored when it exists).")
@click.option("--revision", default=None, help="Branch to commit to (created from main if missing).")
@click.option("-m", "--message", default=None, help="Commit message.")
@click.option(
    "--license", "license_", default=None, help="License id for a generated card (apache-2.0, mit, …)."
)
@click.option(
    "--base-model", default=None, help="Base model Hub id for a generated card (default: from the config)."
)
@click.option("--no-card", is_flag=True, help="Do not generate README.md when the folder has none.")
@token_option
@reporting
def push(
    adapter_dir: Path,
    repo_id: str,
    private: bool,
    revision: str | None,
    message: str | None,
    license_: str | None,
    base_model: str | None,
    no_card: bool,
    token: str | None,
    as_json: bool,
    quiet: bool,
) -> None:
    """Publish ADAPTER_DIR (a PEFT adapter folder) to the Hub as REPO_ID, in one commit.

    The folder is validated before anything is sent; a model card is generated when it has no
    README.md (the folder itself is never modified). Prints the repository URL.
    """
    from loratools.commands.push import open_push
    from loratools.hub import PushOptions

    options = PushOptions(repo_id, private, revision, message, token, license_, base_model, card=not no_card)
    opened = open_push(adapter_dir, options)  # validated before any network call
    _quiet_hub_bars(quiet)
    result = opened.run()
    if as_json:
        render.emit_json(result.to_dict())
        return
    for warning in result.warnings:
        render.warn(warning)
    if not quiet:
        card = "generated model card" if result.card == "generated" else "the folder's README.md"
        render.note(f"pushed {len(result.files)} files ({card}) to {result.repo_id}@{result.revision}")
        if result.skipped:
            render.note(f"skipped: {', '.join(result.skipped)}")
    click.echo(result.url)


@click.command()
@click.argument("repo")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Folder to create.")
@force_flag
@token_option
@reporting
def pull(repo: str, output: Path, force: bool, token: str | None, as_json: bool, quiet: bool) -> None:
    """Download the Hub repository REPO (org/name or org/name@revision) into the new folder OUTPUT.

    All files of one commit are fetched, except pickled weights (*.bin, *.pt, *.pth, *.pkl, *.ckpt).
    """
    from loratools.commands.push import pull as pull_repo
    from loratools.hub import PullOptions, parse_repo_ref

    repo_id, revision = parse_repo_ref(repo)
    options = PullOptions(repo_id, output, revision, force, token)
    _quiet_hub_bars(quiet)
    result = pull_repo(options)
    if as_json:
        render.emit_json(result.to_dict())
        return
    if result.skipped:
        render.warn(f"not downloaded (pickled weights): {', '.join(result.skipped)}")
    if not quiet:
        render.note(
            f"pulled {len(result.files)} files of {result.repo_id}@{result.commit[:12]} into {result.output}"
        )
    click.echo(result.output)
