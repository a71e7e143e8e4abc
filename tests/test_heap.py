"""layerwise.heap: large allocations mmapped while weights load, the steady threshold and one trim after."""

from __future__ import annotations

import pytest

from layerwise import heap


class FakeLibc:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append(("mallopt", param, value))
        return 1

    def malloc_trim(self, pad: int) -> int:
        self.calls.append(("malloc_trim", pad))
        return 1


def test_lean_loading_sets_and_restores_the_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    libc = FakeLibc()
    monkeypatch.setattr(heap, "_libc", lambda: libc)
    with pytest.raises(RuntimeError):  # a failing load still restores the steady state
        with heap.lean_loading():
            assert libc.calls == [("mallopt", heap.M_MMAP_THRESHOLD, 1 << 20)]
            raise RuntimeError("load failed")
    assert libc.calls[1:] == [("mallopt", heap.M_MMAP_THRESHOLD, 32 << 20), ("malloc_trim", 0)]


def test_lean_loading_is_a_no_op_without_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(heap.sys, "platform", "darwin")
    assert heap._libc() is None
    with heap.lean_loading():
        pass


@pytest.mark.skipif(not heap.sys.platform.startswith("linux"), reason="glibc only")
def test_the_real_libc_is_found() -> None:
    assert heap._libc() is not None
