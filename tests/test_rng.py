import torch

from ddpm.rng import (
    SEED_BATCH_ORDER,
    SEED_CAPTIONS,
    SEED_DROPOUT,
    SEED_SAMPLING,
    SEED_STEP,
    derived_seed,
    randn,
    randn_like,
    sampling_generator,
    seed_dropout,
    step_generator,
)


def test_derived_seeds_are_stable_and_never_collide():
    # The value is part of every recorded result: it must never change.
    assert derived_seed(0, SEED_STEP, 0) == 8597659618385908031
    assert derived_seed(7, SEED_SAMPLING, 3) == 4064374570681395613
    purposes = (SEED_BATCH_ORDER, SEED_STEP, SEED_DROPOUT, SEED_SAMPLING, SEED_CAPTIONS)
    assert len(set(purposes)) == len(purposes)
    seeds = {derived_seed(s, p, i) for s in range(5) for p in purposes for i in range(50)}
    assert (
        len(seeds) == 5 * len(purposes) * 50
    )  # no two (seed, purpose, index) share a stream, unlike seed + step
    assert all(0 <= s < 2**63 for s in seeds)


def test_generators_are_their_streams():
    a = torch.rand(4, generator=step_generator(7, 3))
    assert torch.equal(
        a, torch.rand(4, generator=torch.Generator().manual_seed(derived_seed(7, SEED_STEP, 3)))
    )
    b = torch.rand(4, generator=sampling_generator(7, 3))
    assert not torch.equal(a, b)
    seed_dropout(7, 3)
    c = torch.rand(4)
    torch.manual_seed(derived_seed(7, SEED_DROPOUT, 3))
    assert torch.equal(c, torch.rand(4))


def test_noise_is_drawn_on_the_generators_device_and_keeps_dtype():
    g = torch.Generator().manual_seed(0)
    x = randn((3, 2), g, "cpu")
    assert torch.equal(x, torch.randn(3, 2, generator=torch.Generator().manual_seed(0)))
    y = randn_like(torch.zeros(3, 2, dtype=torch.float64), torch.Generator().manual_seed(0))
    assert y.dtype == torch.float64 and torch.equal(y.float(), x)
