"""The draft service's delta protocol (protos/tandem/v1/draft.proto), client side, in one place.

The draft keeps a copy of every sequence its callers speculate on: the token list last sent
plus the proposals it returned. Each call sends, per sequence, `num_kept` (how many tokens of
that copy are still the sequence's: the longest prefix they share, i.e. everything up to the
first rejected proposal) and the tokens after them; ended sequences are released with the next
call; a sequence the draft answers "unknown" for (it restarted or evicted it) is sent whole
next time. `DeltaTracker` is that bookkeeping, for the decode worker's proposer (torch engine)
and for the TensorRT-LLM drafter's client alike; the draft engine itself uses `common_prefix`.
No grpc, no torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


def common_prefix(a: Sequence[int], b: Sequence[int], start: int = 0) -> int:
    """Length of the common prefix of a and b, given that their first `start` tokens agree."""
    n = min(len(a), len(b))
    i = min(start, n)
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass(frozen=True)
class Delta:
    """What to send for one sequence."""

    num_kept: int  # tokens of the draft's copy that are still valid (0: token_ids is the whole list)
    token_ids: list[int]  # the sequence's tokens after them (never empty)
    num_accepted: int  # how many of the previous call's proposals the sequence kept


class DeltaTracker:
    """The draft's copy of each sequence, as far as this client knows it. Not thread-safe."""

    def __init__(self) -> None:
        # sequence id -> (the draft's copy of its tokens, how many of them were the sequence's)
        self._copies: dict[str, tuple[list[int], int]] = {}
        self._sent: set[str] = set()  # sequences any call carried (the draft may hold them)
        self._released: list[str] = []  # ended sequences the draft has not been told of

    def delta(self, seq_id: str, token_ids: list[int]) -> Delta:
        keep = accepted = 0
        if seq_id in self._copies:
            copy, num_sent = self._copies[seq_id]
            # a sequence only grows: its first num_sent tokens are still the copy's
            keep = min(common_prefix(copy, token_ids, num_sent), len(token_ids) - 1)  # send at least one
            accepted = max(0, keep - num_sent)
        return Delta(keep, token_ids[keep:], accepted)

    def sent(self, seq_ids: Sequence[str]) -> None:
        """A call carrying these sequences is going out."""
        self._sent.update(seq_ids)

    def answered(self, seq_id: str, token_ids: list[int], proposals: list[int]) -> None:
        """The draft proposed `proposals` after `token_ids`: that is its copy now."""
        self._copies[seq_id] = (list(token_ids) + list(proposals), len(token_ids))

    def unknown(self, seq_id: str) -> None:
        """The draft has no copy of this sequence: send it whole next time."""
        self._copies.pop(seq_id, None)

    def release(self, seq_id: str) -> None:
        """The sequence ended: forget it, and tell the draft with the next call."""
        self._copies.pop(seq_id, None)
        if seq_id in self._sent:
            self._sent.discard(seq_id)
            self._released.append(seq_id)

    def tracks(self, seq_id: str) -> bool:
        """Whether the sequence has not ended (release) since a call carried it."""
        return seq_id in self._sent

    def tracked(self) -> list[str]:
        """Sequences the draft may hold."""
        return list(self._sent)

    @property
    def releases(self) -> list[str]:
        """Ended sequences to name in the next call (ProposeRequest.released_ids or Release)."""
        return list(self._released)

    def releases_delivered(self, seq_ids: Sequence[str]) -> None:
        """A call naming these releases succeeded."""
        done = set(seq_ids)
        self._released = [s for s in self._released if s not in done]
