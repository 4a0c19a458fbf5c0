"""The CPU thread policy of streaming passes (loratools.device)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from loratools.device import cpu_math_threads, keep_thread_count, leaves_cores_for_io, math_threads


@pytest.fixture
def four_threads() -> Iterator[None]:
    """torch at 4 intra-op threads; restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize(("cores", "io_threads", "want"), [(4, 1, 3), (4, 2, 2), (4, 4, 1), (4, 9, 1)])
def test_torchs_default_of_one_thread_per_core_leaves_cores_for_io(
    four_threads: None, cores: int, io_threads: int, want: int
) -> None:
    assert math_threads(io_threads, cores=cores) == want


@pytest.mark.parametrize("cores", [2, 8, 16])
def test_a_count_other_than_one_per_core_was_chosen_and_is_kept(four_threads: None, cores: int) -> None:
    assert math_threads(1, cores=cores) == 4


@pytest.mark.parametrize("cores", [1, 2])
def test_small_machines_keep_a_thread_per_core(cores: int) -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(cores)  # torch's default on such a machine
    try:
        assert math_threads(1, cores=cores) == cores  # half the math is worth more than the reader's core
    finally:
        torch.set_num_threads(before)


def test_the_thread_count_is_restored_after_the_call_even_when_it_fails(four_threads: None) -> None:
    seen = []

    @leaves_cores_for_io(3)
    def work(fail: bool) -> int:
        seen.append(torch.get_num_threads())
        if fail:
            raise ValueError("boom")
        return 7

    assert work(False) == 7
    with pytest.raises(ValueError, match="boom"):
        work(True)
    assert seen == [math_threads(3)] * 2
    assert torch.get_num_threads() == 4
    with cpu_math_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 4


def test_a_thread_count_the_user_set_is_kept_even_at_one_per_core(four_threads: None) -> None:
    keep_thread_count()
    try:
        assert math_threads(1, cores=4) == 4
    finally:
        keep_thread_count(False)
    assert math_threads(1, cores=4) == 3
