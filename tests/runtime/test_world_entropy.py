"""The entropy seam: ids are UUIDv7 (time-ordered, version 7, variant
RFC 9562) whichever source draws them; the real source's pooled bits are
never handed out twice, not even across a fork."""

from __future__ import annotations

import os
import uuid

import pytest

from agor_actors.world import SecureEntropy, SeededEntropy


@pytest.mark.parametrize("entropy", [SecureEntropy(), SeededEntropy(7)], ids=["secure", "seeded"])
def test_ids_are_uuid7_of_the_given_millisecond(entropy: SecureEntropy | SeededEntropy) -> None:
    now_ms = 1_764_000_000_123
    ids = [entropy.new_id(now_ms + i // 100) for i in range(1_000)]
    assert len(set(ids)) == len(ids)
    for i, text in enumerate(ids):
        parsed = uuid.UUID(text)
        assert str(parsed) == text  # canonical lower-case 8-4-4-4-12
        assert parsed.version == 7
        assert parsed.variant == uuid.RFC_4122
        assert parsed.int >> 80 == now_ms + i // 100
    # ordered by their millisecond, as strings too (the store sorts on them)
    assert ids[0][:13] <= ids[-1][:13]


def test_seeded_ids_are_a_function_of_the_seed() -> None:
    first = [SeededEntropy("s").new_id(1) for _ in range(3)]
    again = [SeededEntropy("s").new_id(1) for _ in range(3)]
    assert first == again
    stream = SeededEntropy("s")
    assert stream.new_id(1) == first[0]
    assert stream.new_id(1) != first[0]


def test_secure_ids_outlast_the_pool_without_repeating() -> None:
    entropy = SecureEntropy()
    ids = {entropy.new_id(0) for _ in range(5_000)}  # > 10 refills of the pool
    assert len(ids) == 5_000


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_does_not_reuse_the_parents_pooled_bits() -> None:
    entropy = SecureEntropy()
    entropy.new_id(0)  # the pool is filled; the next ids would come from it
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: send its next id, exit without cleanup
        try:
            os.write(write_end, entropy.new_id(0).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    child_id = os.read(read_end, 64).decode()
    os.close(read_end)
    os.waitpid(pid, 0)
    assert uuid.UUID(child_id).version == 7
    assert entropy.new_id(0) != child_id
