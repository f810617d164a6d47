"""LR schedule against its closed form; the micro-batch stream against a brute-force replay."""
import math

import pytest

from trainer.sampling import MicroBatchStream
from trainer.schedule import lr_factor


def test_warmup_then_cosine_matches_formula():
    total, warm = 100, 10
    assert [lr_factor(s, total, warm, "cosine") for s in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    for s in (10, 40, 99):
        assert lr_factor(s, total, warm, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * (s - 10) / 90)))
    assert lr_factor(55, total, warm, "linear") == pytest.approx(1 - 45 / 90)
    assert lr_factor(70, total, 0, "constant") == 1.0


def test_stream_covers_each_example_once_per_epoch_across_processes():
    n, bs, world = 23, 3, 2
    streams = [MicroBatchStream(n, bs, seed=5, rank=r, world_size=world) for r in range(world)]
    per_epoch = n // (bs * world)
    seen = [i for _ in range(per_epoch) for s in streams for i in s.next_indices()]
    assert len(seen) == len(set(seen)) == per_epoch * bs * world


def test_stream_resume_is_exact():
    a = MicroBatchStream(50, 4, seed=1)
    straight = [a.next_indices() for _ in range(30)]  # spans several epochs
    b = MicroBatchStream(50, 4, seed=1)
    first = [b.next_indices() for _ in range(13)]
    c = MicroBatchStream(50, 4, seed=1)
    c.load_state_dict(b.state_dict())
    assert first + [c.next_indices() for _ in range(17)] == straight
    assert straight[:12] != straight[12:24]  # epochs are reshuffled


def test_stream_refuses_too_few_examples():
    with pytest.raises(ValueError):
        MicroBatchStream(3, 4, seed=0)
