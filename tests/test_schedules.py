import numpy as np
import pytest

from ddpm.errors import ConfigError
from ddpm.schedules import SCHEDULES, make_betas


def test_linear_schedule_matches_paper():
    betas = make_betas("linear", 1000)
    assert betas.dtype == np.float64
    assert betas[0] == 1e-4 and betas[-1] == 0.02
    alphas_cumprod = np.cumprod(1 - betas)
    # The value the paper's schedule gives at code t = 999 (paper t = T).
    assert alphas_cumprod[-1] == pytest.approx(4.0358e-5, rel=1e-4)


def test_quad_and_warmup_shapes():
    quad = make_betas("quad", 100, 1e-4, 0.02)
    assert np.allclose(np.sqrt(quad), np.linspace(0.01, np.sqrt(0.02), 100))
    warm = make_betas("warmup10", 100, 1e-4, 0.02)
    assert np.allclose(warm[:10], np.linspace(1e-4, 0.02, 10)) and np.all(warm[10:] == 0.02)
    assert np.all(make_betas("const", 7, 1e-4, 0.02) == 0.02)


def test_cosine_schedule_follows_its_alphabar():
    T = 1000
    betas = make_betas("cosine", T)
    f = np.cos((np.arange(T + 1) / T + 0.008) / 1.008 * np.pi / 2) ** 2
    expected = np.minimum(1 - f[1:] / f[:-1], 0.999)
    assert np.allclose(betas, expected)
    assert betas.max() == pytest.approx(0.999)


@pytest.mark.parametrize("name", SCHEDULES)
def test_any_T(name):
    for T in (1, 10, 4000):
        betas = make_betas(name, T)
        assert betas.shape == (T,) and np.all((betas > 0) & (betas < 1))


@pytest.mark.parametrize(
    "args",
    [("linear", 0), ("linear", -5), ("linear", 10, 0.0, 0.02), ("linear", 10, 1e-4, 1.5), ("nope", 10)],
)
def test_bad_schedules(args):
    with pytest.raises(ConfigError):
        make_betas(*args)
