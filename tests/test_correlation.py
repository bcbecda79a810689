"""gradbook.correlation: the correlation map of mean-field theory and its depth scale xi_c."""
import math

import pytest

import gradbook as gb
from gradbook import correlation, theory

SB = math.sqrt(0.05)   # Schoenholz et al.'s sigma_b^2 = 0.05


def test_in_the_ordered_phase_inputs_align_and_xi_c_is_the_gradients_depth_scale():
    for sw in [0.8, 1.0, 1.2]:
        assert correlation.fixed_correlation("tanh", sw, SB) == pytest.approx(1.0, abs=1e-9)
        q = theory.fixed_point("tanh", sw, SB)
        assert correlation.chi_c("tanh", sw, SB) == pytest.approx(theory.chi("tanh", q, sw), rel=1e-9)
        assert correlation.correlation_depth("tanh", sw, SB) == pytest.approx(theory.depth_scale("tanh", sw, SB), rel=1e-9)


def test_in_the_chaotic_phase_inputs_decorrelate_and_xi_c_diverges_at_the_boundary():
    critical = theory.critical_sigma_w("tanh", SB)   # sigma_w^2 = 1.761 (Schoenholz et al. 2017)
    assert correlation.fixed_correlation("tanh", 2.0, SB) < 0.5
    assert correlation.chi_c("tanh", 2.0, SB) < 1
    near, off = (correlation.correlation_depth("tanh", critical * f, SB) for f in (1.0, 1.05))
    assert near > 1000 > 10 * off
    c = correlation.fixed_correlation("tanh", 2.0, SB)   # the map's stable point is its fixed point
    assert correlation.correlation_map("tanh", c, 2.0, SB) == pytest.approx(c, abs=1e-10)


def test_the_replications_stored_curve_is_six_xi_c():
    stored = gb.book.results("schoenholz2017")["results"]
    for s in ["1.0", "1.5", "2.5", "4.0"]:
        six = theory.TRAINABLE_DEPTH_SCALES * correlation.correlation_depth("tanh", math.sqrt(float(s)), SB)
        assert six == pytest.approx(stored[f"xi_c/{s}"], rel=1e-9)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="sigma_w"):
        correlation.chi_c("tanh", -1.0)
    with pytest.raises(ValueError, match="nodes"):
        correlation.correlation_depth("tanh", 1.0, nodes=0)
    with pytest.raises(ValueError, match="c must be a correlation"):
        correlation.correlation_map("tanh", 1.5, 1.0)
    with pytest.raises(ValueError, match="swish"):
        correlation.fixed_correlation("swish", 1.0)
