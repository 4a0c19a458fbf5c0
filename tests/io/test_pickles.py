"""A pickle holding more than tensors is refused without running it, and the refusal never
advises running it (torch's own message suggests ``weights_only=False``; issue 12 §3)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from loratools.errors import CheckpointError
from loratools.io.checkpoint import open_checkpoint


class Exploit:
    """Runs ``os.mkdir`` when unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.mkdir, (str(self.marker),))


@pytest.mark.parametrize("name", ["evil.bin", "evil.pt"])
def test_the_refusal_says_pickle_and_safetensors_and_never_suggests_running_it(
    tmp_path: Path, name: str
) -> None:
    marker = tmp_path / "pwned"
    torch.save({"w": torch.ones(2), "payload": Exploit(marker)}, tmp_path / name)
    with pytest.warns(UserWarning), pytest.raises(CheckpointError) as caught:
        open_checkpoint(tmp_path / name)
    message = str(caught.value)
    assert "\n" not in message and str(tmp_path / name) in message
    assert "pickle" in message and "safetensors" in message and "will not execute" in message
    assert "os.mkdir" in message or "posix.mkdir" in message  # what it holds, named
    for advice in (
        "weights_only=False",
        "weights_only` set to `False",
        "likely succeed",
        "can still be loaded",
    ):
        assert advice not in message
    assert not marker.exists()
