"""LiveBytesTracker counts storages the way a caching allocator would see them."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from loraforge.vram.tracker import LiveBytesTracker, rounded_bytes


def test_rounding_matches_the_allocator_block_size():
    assert rounded_bytes(0) == 0
    assert rounded_bytes(1) == 512
    assert rounded_bytes(512) == 512
    assert rounded_bytes(513) == 1024


def _sequence(tracker: LiveBytesTracker) -> None:
    with tracker:
        tracker.phase("first")
        a = torch.empty(256)  # 1024 B
        b = torch.empty(512)  # 2048 B
        view = b[:10]  # shares b's storage: free
        del a
        tracker.phase("second")
        c = torch.empty(1024)  # 4096 B -> peak 2048 + 4096
        del c, view
        d = torch.empty(100)  # 400 B -> rounded to 512
        del b
        tracker.keep = d  # keep d alive past the block


@pytest.mark.parametrize("fake", [False, True])
def test_peak_current_and_categories_at_peak(fake):
    tracker = LiveBytesTracker()
    mode = FakeTensorMode() if fake else None
    if mode is None:
        _sequence(tracker)
    else:
        with mode:
            _sequence(tracker)
    assert tracker.peak == 2048 + 4096
    assert tracker.current == 512
    assert tracker.live_at_peak() == {"first": 2048, "second": 4096}


def test_registered_tensors_count_and_can_be_recategorized():
    weights = [torch.empty(1000), torch.empty(24)]  # 4000 -> 4096, 96 -> 512
    tracker = LiveBytesTracker()
    tracker.register(weights, "weights")
    assert tracker.current == 4096 + 512
    with tracker:
        grad = torch.zeros(128)  # 512 B
    tracker.recategorize([grad], "gradients")
    assert tracker.live_at_peak() == {"weights": 4608, "gradients": 512}
    del grad
    assert tracker.current == 4608


def test_autograd_saved_tensors_are_counted_until_backward_frees_them():
    w = torch.randn(64, 32, requires_grad=True)
    x = torch.randn(16, 64)  # 4096 B, created before tracking: registered
    tracker = LiveBytesTracker()
    tracker.register([x], "input")
    with tracker:
        h = (x @ w).relu()  # h: 16x32 floats (2048 B); relu saves its output h
        loss = h.sum()
        tracker.phase("backward")
        loss.backward()
    # forward: mm output (2048) + relu output (2048) + loss; backward adds w.grad (8192)
    assert tracker.peak >= 4096 + 2048 + 8192
    assert w.grad is not None
    del h, loss
    assert tracker.current == 4096 + 8192  # x and w.grad stay; the graph's tensors are gone


def test_item_on_fake_tensors_keeps_the_memory_hungry_branch():
    tracker = LiveBytesTracker()
    with FakeTensorMode(), tracker:
        assert torch.rand(1).item() == 1.0  # `rand() < module_dropout` is false: module runs
        assert torch.randint(0, 5, (1,)).item() == 0
        assert bool(torch.tensor(True)) is True
