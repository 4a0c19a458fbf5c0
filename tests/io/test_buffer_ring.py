"""The recycled read/output buffers: a buffer anyone still holds is never handed out again."""

from __future__ import annotations

from pathlib import Path

import torch

from loratools.io.buffers import BufferRing
from loratools.io.checkpoint import open_checkpoint
from loratools.io.safetensors_file import TensorSpec
from loratools.io.writer import CheckpointWriter, plan_shards
from loratools.ops.merge.update import Scratch


def test_a_held_buffer_is_never_reused_and_a_dropped_one_is() -> None:
    ring = BufferRing(slots=2)
    held = ring.take(1000)
    held.fill_(7)
    dropped = ring.take(1000)
    pointer = dropped.data_ptr()
    del dropped
    for _ in range(5):  # every later take finds only the dropped buffer free
        again = ring.take(800)
        again.fill_(1)
        assert again.data_ptr() == pointer
        del again
    assert ring.reused == 5
    assert bool((held == 7).all())  # untouched by the takes above


def test_views_and_arrays_of_a_buffer_keep_it_held() -> None:
    ring = BufferRing(slots=1)
    array = ring.take(64).view(torch.float32).reshape(4, 4).numpy()  # only a numpy view survives
    array[:] = 3.0
    other = ring.take(64)
    other.fill_(0)
    assert (array == 3.0).all()
    assert ring.reused == 0


def test_an_oversized_free_buffer_is_replaced_not_pinned() -> None:
    ring = BufferRing(slots=1)
    big = ring.take(2 * BufferRing.SHRINK * BufferRing.SMALL)  # an embedding, say
    del big
    large = ring.take(BufferRing.SMALL + 1)  # far smaller: the embedding's buffer goes
    assert ring.reused == 0 and ring._slots[0].numel() == BufferRing.SMALL + 1
    del large


def test_a_small_read_between_two_matrices_does_not_evict_their_buffer() -> None:
    """A norm read between two layers' matrices gets fresh memory; the matrix buffer stays for the next."""
    ring = BufferRing(slots=1)
    size = BufferRing.SHRINK * BufferRing.SMALL + 4096  # too big to lend to a small read (an MLP matrix)
    matrix = ring.take(size)
    pointer = matrix.data_ptr()
    del matrix
    norm = ring.take(8192)
    assert norm.data_ptr() != pointer
    del norm
    again = ring.take(size)
    assert again.data_ptr() == pointer and ring.reused == 1


def _write_checkpoint(folder: Path, count: int) -> dict[str, torch.Tensor]:
    tensors = {f"layer.{i}.weight": torch.randn(8 + i, 16).bfloat16() for i in range(count)}
    specs = [TensorSpec(name, tuple(t.shape), t.dtype) for name, t in tensors.items()]
    with CheckpointWriter(folder, plan_shards(specs, 2000)) as writer:  # several shards
        for name, tensor in tensors.items():
            writer.write(name, tensor)
    return tensors


def test_iter_tensors_kept_or_dropped_equal_the_stored_tensors(tmp_path: Path) -> None:
    tensors = _write_checkpoint(tmp_path / "ckpt", 9)
    ckpt = open_checkpoint(tmp_path / "ckpt")
    kept = dict(ckpt.iter_tensors())  # a consumer that keeps all: no buffer may be shared
    for name, expected in tensors.items():  # stored bytes read back: exact
        assert torch.equal(kept[name], expected)
    del kept
    for name, tensor in ckpt.iter_tensors():  # a consumer that drops each: buffers recycle
        assert torch.equal(tensor, tensors[name])
        tensor.zero_()  # its own to scribble on; the next reads must not see it
    assert torch.equal(ckpt.get_buffered("layer.3.weight", BufferRing()), tensors["layer.3.weight"])


def test_scratch_cast_rounds_like_to_and_keeps_earlier_outputs() -> None:
    scratch = Scratch("cpu", BufferRing().take)
    totals = [torch.randn(32, 48) for _ in range(4)]
    outputs = [scratch.cast(total, torch.bfloat16) for total in totals]  # all held at once
    for total, out in zip(totals, outputs, strict=True):
        # one float32 → bf16 rounding (round to nearest even) either way: exactly equal
        assert torch.equal(out, total.to(torch.bfloat16))
    assert len({out.data_ptr() for out in outputs}) == len(outputs)
