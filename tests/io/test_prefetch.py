"""The one-ahead reader: same items, same order, each loaded once, never more than one ahead."""

from __future__ import annotations

import threading

import pytest

from loratools.io.prefetch import prefetched


@pytest.mark.parametrize("count", [0, 1, 2, 7])
def test_yields_each_item_once_in_order_at_most_one_ahead(count: int) -> None:
    names = [f"t{i}" for i in range(count)]
    loaded: list[str] = []
    lock = threading.Lock()

    def load(name: str) -> str:
        with lock:
            loaded.append(name)
        return name.upper()

    seen = []
    for name, item in prefetched(names, load):
        with lock:
            assert len(loaded) <= len(seen) + 2  # the one yielded now and at most the next
        seen.append((name, item))
    assert seen == [(n, n.upper()) for n in names]
    assert loaded == names


def test_a_failing_load_surfaces_in_the_caller() -> None:
    def load(name: str) -> str:
        if name == "bad":
            raise OSError("disk gone")
        return name

    with pytest.raises(OSError, match="disk gone"):
        list(prefetched(["a", "bad", "c"], load))
