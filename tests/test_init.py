"""Each initializer draws with the variance its formula states, within sampling error on a large layer."""
import math

import pytest
import torch

from gradbook import init

FAN_OUT, FAN_IN = 300, 500   # 150,000 weights: the sample variance has relative error ~ sqrt(2/n) ~ 0.4%

# the formulas, written out here independently of gradbook.init.variance
EXPECTED = {
    "standard": 1 / (3 * FAN_IN),
    "xavier_uniform": 2 / (FAN_IN + FAN_OUT),
    "xavier_normal": 2 / (FAN_IN + FAN_OUT),
    "he": 2 / FAN_IN,
    "lecun": 1 / FAN_IN,
    "orthogonal": 1 / FAN_IN,
    "normal": 0.05**2,
}
KWARGS = {"normal": {"std": 0.05}}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_empirical_variance_matches_the_formula(name):
    w = torch.empty(FAN_OUT, FAN_IN, dtype=torch.float64)
    init.get(name)(w, **KWARGS.get(name, {}), generator=torch.Generator().manual_seed(1))
    n = w.numel()
    # 5 standard errors of a sample variance; uniform weights have kurtosis 1.8, normal 3
    tol = 5 * math.sqrt(2.0 / n) * EXPECTED[name]
    assert abs(w.var().item() - EXPECTED[name]) < tol
    assert abs(w.mean().item()) < 5 * math.sqrt(EXPECTED[name] / n)
    assert init.variance(name, FAN_IN, FAN_OUT, **KWARGS.get(name, {})) == pytest.approx(EXPECTED[name])


@pytest.mark.parametrize("name,bound", [("standard", 1 / math.sqrt(FAN_IN)),
                                        ("xavier_uniform", math.sqrt(6 / (FAN_IN + FAN_OUT)))])
def test_uniform_initializers_stay_within_their_interval(name, bound):
    w = init.get(name)(torch.empty(FAN_OUT, FAN_IN), generator=torch.Generator().manual_seed(2))
    assert w.abs().max().item() <= bound
    assert w.abs().max().item() > 0.99 * bound


def test_orthogonal_has_all_singular_values_equal_to_the_gain():
    for shape in [(64, 64), (32, 80), (80, 32)]:
        w = init.orthogonal(torch.empty(*shape, dtype=torch.float64), gain=1.5)
        s = torch.linalg.svdvals(w)
        torch.testing.assert_close(s, torch.full_like(s, 1.5))


def test_he_fan_out_and_leaky_slope():
    w = init.he(torch.empty(FAN_OUT, FAN_IN, dtype=torch.float64), mode="fan_out", negative_slope=0.5,
                generator=torch.Generator().manual_seed(3))
    expected = 2 / (1.25 * FAN_OUT)
    assert abs(w.var().item() - expected) < 5 * math.sqrt(2 / w.numel()) * expected


def test_conv_fans_include_the_kernel():
    assert init.fans(torch.empty(16, 8, 3, 3)) == (72, 144)


def test_every_initializer_states_its_formula_and_source():
    for name in init.names():
        doc = init.get(name).__doc__
        assert "~" in doc or "Var" in doc or "singular" in doc, name
        assert name == "normal" or any(s in doc for s in ["2010", "2015", "1998", "2014"]), name


def test_bad_names_and_arguments_are_refused():
    with pytest.raises(ValueError, match="'glorot'.*allowed.*'standard'"):
        init.get("glorot")
    with pytest.raises(ValueError, match="'fan_avg'"):
        init.he(torch.empty(3, 3), mode="fan_avg")
    with pytest.raises(ValueError, match="std"):
        init.variance("normal", 3, 3)
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        init.standard(torch.empty(5))
