"""settle_heap: start-up objects leave the collector's sight, young collections come rarer."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from telehealth.runtime import YOUNG_THRESHOLD, settle_heap


@pytest.fixture
def restored_gc() -> Iterator[None]:
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


def test_settle_heap_freezes_what_lives_and_raises_the_young_threshold(restored_gc: None) -> None:
    kept = [object() for _ in range(1000)]  # alive through the settle, like start-up state
    gc.unfreeze()
    settle_heap()
    assert gc.get_freeze_count() >= len(kept)
    assert gc.get_threshold()[0] == YOUNG_THRESHOLD

    # Cycles made afterwards are still found and freed.
    class Node:
        ref: object = None

    a, b = Node(), Node()
    a.ref, b.ref = b, a
    del a, b
    assert gc.collect() >= 2
