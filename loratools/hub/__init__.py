"""The Hugging Face Hub: push / pull adapters (:mod:`.publish`), folder checks (:mod:`.check`),
Hub failures as one-line errors (:mod:`.failures`) and model cards (:mod:`.card`).

``from loratools.hub import push, pull, PushOptions, …`` is the public surface; ``huggingface_hub``
is imported only inside the functions that talk to the Hub.
"""

from loratools.hub.check import check_adapter_folder
from loratools.hub.failures import HubError, hub_errors
from loratools.hub.publish import (
    PICKLES,
    PullOptions,
    PullResult,
    PushOptions,
    PushResult,
    is_pickle,
    parse_repo_ref,
    pull,
    push,
)

__all__ = [
    "PICKLES",
    "HubError",
    "PullOptions",
    "PullResult",
    "PushOptions",
    "PushResult",
    "check_adapter_folder",
    "hub_errors",
    "is_pickle",
    "parse_repo_ref",
    "pull",
    "push",
]
