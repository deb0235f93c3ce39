"""In-order watermarks over sequence numbers, shared by the edge (received) and the archive."""

from __future__ import annotations


class Watermark:
    """Highest seq with every seq up to it seen, plus the seen seqs above it."""

    def __init__(self, start: int = 0) -> None:
        self.value = start
        self._above: set[int] = set()

    def seen(self, seq: int) -> bool:
        return seq <= self.value or seq in self._above

    def copy(self) -> Watermark:
        c = Watermark(self.value)
        c._above = set(self._above)
        return c

    def add(self, seq: int) -> None:
        if seq <= self.value:
            return
        self._above.add(seq)
        while self.value + 1 in self._above:
            self.value += 1
            self._above.discard(self.value)

    def advance_to(self, seq: int) -> None:
        """Everything up to seq is known to be taken (e.g. durable elsewhere)."""
        if seq > self.value:
            self.value = seq
            self._above = {s for s in self._above if s > seq}
            while self.value + 1 in self._above:
                self.value += 1
                self._above.discard(self.value)

    @property
    def pending(self) -> int:
        return len(self._above)
