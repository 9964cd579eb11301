"""voxtral.sampling: the one sampler behind the training sample and the server."""

from __future__ import annotations

import math

import pytest
import torch

from voxtral.sampling import Sampling, filter_logits, sample_tokens

NEG = float("-inf")


def kept(x: torch.Tensor) -> list[int]:
    """The ids a filtered row can still draw."""
    return torch.isfinite(x).nonzero().flatten().tolist()


def mask(v: int, ids) -> torch.Tensor:
    m = torch.zeros(v, dtype=torch.bool)
    m[list(ids)] = True
    return m


def test_mask_is_respected_even_against_the_strongest_logits():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(256, 50, generator=g)
    logits[:, 0] = 100.0  # what an unmasked sampler would always pick
    allowed = mask(50, range(10, 20))
    for s in (
        Sampling(),
        Sampling(0.5),
        Sampling(3.0),
        Sampling(1.0, top_k=3),
        Sampling(1.0, top_k=40),
        Sampling(1.0, top_p=0.5),
        Sampling(2.0, top_k=5, top_p=0.9),
        Sampling(0.0),
    ):
        ids = sample_tokens(logits, allowed, s, g)
        assert ids.shape == (256,)
        assert ((ids >= 10) & (ids < 20)).all(), s


def test_per_row_masks():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 8, generator=g)
    allowed = torch.stack([mask(8, [1, 2]), mask(8, [6])])
    for _ in range(20):
        a, b = sample_tokens(logits, allowed, Sampling(1.0), g).tolist()
        assert a in (1, 2) and b == 6


def test_greedy_takes_the_best_allowed_id_and_draws_nothing():
    logits = torch.tensor([[5.0, 1.0, 3.0, 2.0], [0.0, 4.0, 9.0, 1.0]])
    allowed = mask(4, [1, 2, 3])
    g = torch.Generator().manual_seed(3)
    before = g.get_state()
    assert sample_tokens(logits, allowed, Sampling(0.0), g).tolist() == [2, 2]
    assert sample_tokens(logits, allowed, Sampling(-1.0, top_k=1), g).tolist() == [2, 2]
    assert torch.equal(g.get_state(), before)  # greedy leaves the generator alone


def test_top_k_keeps_the_k_best_allowed_ids():
    logits = torch.tensor([10.0, 9.0, 1.0, 0.0, 5.0])
    # id 0 is masked: it must not take one of the k places
    x = filter_logits(logits, mask(5, [1, 2, 3, 4]), Sampling(1.0, top_k=2))
    assert kept(x) == [1, 4]
    assert kept(filter_logits(logits, mask(5, range(5)), Sampling(1.0, top_k=5))) == [0, 1, 2, 3, 4]
    assert kept(filter_logits(logits, mask(5, range(5)), Sampling(1.0, top_k=0))) == [0, 1, 2, 3, 4]
    g = torch.Generator().manual_seed(4)
    drawn = sample_tokens(logits.expand(2000, 5), mask(5, [1, 2, 3, 4]), Sampling(1.0, 2), g)
    assert set(drawn.tolist()) == {1, 4}


def test_top_p_keeps_the_smallest_set_that_reaches_p():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()
    everything = mask(4, range(4))
    assert kept(filter_logits(logits, everything, Sampling(1.0, top_p=0.4))) == [0]
    assert kept(filter_logits(logits, everything, Sampling(1.0, top_p=0.7))) == [0, 1]
    assert kept(filter_logits(logits, everything, Sampling(1.0, top_p=0.85))) == [0, 1, 2]
    assert kept(filter_logits(logits, everything, Sampling(1.0, top_p=1.0))) == [0, 1, 2, 3]
    # the mass is counted among the allowed ids only: without id 0, id 1 holds 0.6 of it
    x = filter_logits(logits, mask(4, [1, 2, 3]), Sampling(1.0, top_p=0.55))
    assert kept(x) == [1]
    # order of the vocabulary does not matter
    shuffled = filter_logits(logits[[3, 1, 0, 2]], everything, Sampling(1.0, top_p=0.7))
    assert kept(shuffled) == [1, 2]


def test_temperature_draws_from_the_scaled_softmax():
    logits = torch.tensor([2.0, 1.0, 0.0, 50.0])
    allowed = mask(4, [0, 1, 2])
    n = 40_000
    g = torch.Generator().manual_seed(5)
    for t in (0.5, 1.0, 2.0):
        drawn = sample_tokens(logits.expand(n, 4), allowed, Sampling(t), g)
        freq = torch.bincount(drawn, minlength=4).double() / n
        want = torch.softmax(torch.tensor([2.0, 1.0, 0.0], dtype=torch.float64) / t, -1)
        assert freq[3] == 0
        assert torch.allclose(freq[:3], want, atol=0.015), (t, freq, want)


def test_filter_scales_by_temperature_and_leaves_the_input_alone():
    logits = torch.tensor([2.0, -1.0, 4.0], dtype=torch.bfloat16)
    before = logits.clone()
    x = filter_logits(logits, mask(3, [0, 2]), Sampling(2.0))
    assert x.dtype == torch.float32
    assert x.tolist() == [1.0, NEG, 2.0]
    assert torch.equal(logits, before)
    assert filter_logits(logits, mask(3, [0, 2]), Sampling(0.0)).tolist() == [2.0, NEG, 4.0]


@pytest.mark.parametrize("s", [Sampling(0.8, 250), Sampling(0.7, 50, 0.95), Sampling(1.0)])
def test_seeded_draws_repeat_and_one_row_equals_a_batch_of_one(s):
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(6))
    allowed = mask(1000, range(0, 1000, 3))

    def draws(batched: bool) -> list[int]:
        g = torch.Generator().manual_seed(7)
        row = logits[None] if batched else logits
        return [int(sample_tokens(row, allowed, s, g)) for _ in range(50)]

    one = draws(False)
    assert one == draws(False) == draws(True)
    assert all(i % 3 == 0 for i in one)
    assert len(set(one)) > 1  # really sampled, not greedy
    assert sample_tokens(logits, allowed, s, torch.Generator().manual_seed(7)).dim() == 0


def test_defaults_change_nothing():
    s = Sampling()
    assert (s.temperature, s.top_k, s.top_p) == (1.0, 0, 1.0)
    logits = torch.tensor([0.5, 1.5, -2.0])
    x = filter_logits(logits, mask(3, range(3)), s)
    assert torch.equal(x, logits)
    assert math.isclose(float(torch.softmax(x, -1).sum()), 1.0, rel_tol=1e-6)
