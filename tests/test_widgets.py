"""The explorers of gradbook.widgets, driven through their dials as a reader would drive them."""
import numpy as np
import pytest

pytest.importorskip("ipywidgets")

import gradbook as gb  # noqa: E402
from gradbook import widgets  # noqa: E402


def _line(explorer, axes, label):
    """The y data of the line called ``label`` on the explorer's figure (what the reader sees)."""
    ax = explorer.figure.axes[axes]
    lines = [ln for ln in ax.get_lines() if ln.get_label() == label]
    assert lines, f"no line {label!r} on axes {axes}: {[ln.get_label() for ln in ax.get_lines()]}"
    return np.asarray(lines[0].get_ydata(), dtype=float)


def _set(explorer, **values):
    """Set dials one at a time, as clicks would; returns the PNG on show afterwards."""
    for name, value in values.items():
        explorer.dials[name].value = value
    return explorer.image.value


def test_gradient_flow_deeper_sigmoid_nets_pass_smaller_gradients_to_the_first_layer():
    ex = gb.explorers.gradient_flow(activation="sigmoid", init="standard", width=32)
    ex.widget
    firsts = []
    for depth in (5, 15, 30):
        png = _set(ex, depth=depth)
        measured = _line(ex, 0, "measured")
        assert len(measured) == depth
        firsts.append(measured[0] / measured[-1])
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert firsts[0] > 30 * firsts[1] > 30 * 30 * firsts[2], firsts   # each layer costs a factor ~1/10 or less


def test_gradient_flow_follows_the_mean_field_prediction():
    ex = gb.explorers.gradient_flow(activation="tanh", depth=20, width=128)
    ex.widget
    for sigma_w, grows in [(0.7, False), (2.0, True)]:
        _set(ex, sigma_w=sigma_w)
        measured, predicted = _line(ex, 0, "measured"), _line(ex, 0, "mean-field prediction")
        assert (measured[-1] > measured[0]) == (not grows)    # vanishing toward the input vs exploding
        # within a factor 3 over 20 layers (finite width fluctuates, Hanin 2018)
        assert np.all(np.abs(np.log(measured / predicted)) < np.log(3)), (measured, predicted)
        assert "gradient norm" in ex.message.value


def test_gradient_flow_drops_the_prediction_where_it_does_not_apply_and_draws_histograms():
    ex = gb.explorers.gradient_flow(depth=12)
    ex.widget
    _set(ex, norm="batch")
    assert np.all(np.isnan(_line(ex, 0, "_hidden")))
    assert "no mean-field prediction" in ex.message.value
    _set(ex, norm="none", residual=True)
    assert "no mean-field prediction" in ex.message.value
    hists = [p for p in ex.figure.axes[1].patches if p.get_visible()]
    assert len(hists) == 4 and all(p.get_data().values.max() > 1 for p in hists)


def test_gradient_flow_refuses_bad_settings_with_a_message():
    ex = gb.explorers.gradient_flow()
    ex.widget
    before = ex.image.value
    _set(ex, init="sigma_w", sigma_w=0.0)
    assert "Cannot show this setting" in ex.message.value and "sigma_w" in ex.message.value
    assert ex.image.value == before                      # the last good figure stays
    _set(ex, sigma_w=1.5)
    assert "Cannot show" not in ex.message.value and ex.image.value != before
    with pytest.raises(widgets.Refused, match="depth"):
        ex.render(depth=0)
    with pytest.raises(TypeError, match="unknown dial"):
        gb.explorers.gradient_flow(deep=3)


def test_sigma_w_dial_is_disabled_unless_the_init_uses_it():
    ex = gb.explorers.gradient_flow(init="he")
    ex.widget
    assert ex.dials["sigma_w"].disabled
    _set(ex, init="sigma_w")
    assert not ex.dials["sigma_w"].disabled


def test_recurrent_larger_singular_value_means_slower_decay():
    ex = gb.explorers.recurrent(length=60)
    ex.widget
    far = {}
    for s in (0.7, 0.9, 1.0, 1.1):
        _set(ex, sigma_max=s)
        norms = _line(ex, 0, r"measured $\|\partial h_T/\partial h_{T-k}\|$")
        far[s] = norms[-1]
        bound = ex.result["bound"]
        assert np.all(ex.result["norms"] <= bound * (1 + 1e-9))     # Pascanu's bound is a theorem
    assert far[0.7] < far[0.9] < far[1.0] < far[1.1], far
    assert far[0.7] < 1e-6 and far[1.1] > 1, far


def test_recurrent_refuses_bad_settings():
    ex = gb.explorers.recurrent()
    ex.widget
    _set(ex, sigma_max=0.0)
    assert "Cannot show this setting" in ex.message.value and "sigma_max" in ex.message.value


def test_clipping_bounds_the_step_and_helps_on_the_cliff():
    ex = gb.explorers.clipping(lr=1.0, steps=300)
    ex.widget
    _set(ex, mode="none")
    plain = ex.result
    assert plain["norm_before"].max() > 10 * np.median(plain["norm_before"])   # it hits the wall
    np.testing.assert_array_equal(_line(ex, 1, "before clipping"), _line(ex, 1, "after clipping"))
    _set(ex, mode="norm", threshold=1.0)
    clipped = ex.result
    assert clipped["norm_after"].max() <= 1.0 + 1e-12         # clipping bounds the step
    assert np.all(clipped["norm_after"] <= clipped["norm_before"] + 1e-12)
    assert clipped["loss"][-1] < plain["loss"][-1] / 10, (clipped["loss"][-1], plain["loss"][-1])
    _set(ex, mode="value", threshold=0.5)
    assert np.abs(np.diff(ex.result["path"], axis=0)).max() <= 0.5 + 1e-12   # each coordinate moves <= lr * c


def test_clipping_refuses_bad_settings_and_reports_divergence():
    ex = gb.explorers.clipping()
    ex.widget
    with pytest.raises(widgets.Refused, match="threshold"):
        ex.render(threshold=-1.0)
    with pytest.raises(widgets.Refused, match="clipping mode"):
        ex.render(mode="sideways")
    with pytest.raises(widgets.Refused, match="steps"):
        ex.render(steps=0)


def test_static_links_controls_to_precomputed_figures():
    import ipywidgets as w

    ex = gb.explorers.recurrent(length=30)
    box = gb.widgets.static(ex, slider=("sigma_max", [0.8, 1.0, 1.2]), buttons=("activation", ["tanh", "relu"]))
    (_, buttons), (_, slider), outer = box.children[1].children, box.children[2].children, box.children[3]
    assert isinstance(buttons, w.ToggleButtons) and isinstance(slider, w.SelectionSlider)
    assert isinstance(outer, w.Stack) and len(outer.children) == 2
    assert all(isinstance(s, w.Stack) and len(s.children) == 3 for s in outer.children)
    pictures = [p.value for s in outer.children for p in s.children]
    assert len(set(pictures)) == 6 and all('<img src="data:image/png;base64,' in p and 'alt="' in p for p in pictures)
    assert all("largest singular value 0.8" in p for p in (outer.children[0].children[0].value,
                                                            outer.children[1].children[0].value))
    links = box.links
    assert {(wd.source[0] is slider, wd.target[0].model_id) for wd in links} == \
        {(True, s.model_id) for s in outer.children} | {(False, outer.model_id)}
    assert all(wd.source[1] == "index" and wd.target[1] == "selected_index" for wd in links)


def test_one_figure_updated_in_place_and_results_cached():
    """Fast dial changes never stack up figures: the same Figure, axes and lines are updated in place."""
    ex = gb.explorers.gradient_flow(depth=8, width=16)
    ex.widget
    figure, axes, line = ex.figure, list(ex.figure.axes), ex.artists["measured"]
    for depth in (9, 10, 11, 9, 10):
        ex.dials["depth"].value = depth
    assert ex.figure is figure and ex.figure.axes == axes and ex.artists["measured"] is line
    assert len(line.get_ydata()) == 10
    seen = ex.data(depth=9)
    assert ex.data(depth=9) is seen       # seen before: taken from the cache, not computed again


def test_an_unexpected_error_becomes_a_message_not_a_traceback(monkeypatch):
    ex = gb.explorers.recurrent(length=20)
    ex.widget

    def broken(*args):
        raise KeyError("boom")
    monkeypatch.setattr(ex.spec, "draw", broken)
    ex.dials["sigma_max"].value = 0.75
    assert "Cannot show this setting" in ex.message.value and "KeyError" in ex.message.value


def test_latency_benchmark_runs_and_reports_every_explorer():
    import pathlib
    import subprocess
    import sys

    script = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "widgets.py"
    out = subprocess.run([sys.executable, str(script), "--repeats", "2"], capture_output=True, text=True,
                         timeout=300, check=True).stdout
    for name in ("gradient_flow", "recurrent", "clipping", "transformer"):
        assert name in out and "median" in out


def test_transformer_pre_ln_stream_grows_with_depth_unless_the_projections_start_small():
    ex = gb.explorers.transformer()
    ex.widget
    _set(ex, depth=24)
    pre, post = _line(ex, 1, "pre-LN"), _line(ex, 1, "post-LN")
    assert len(pre) == 25 and pre[-1] > 4 * pre[0]          # 0.25 -> about 2 (seeds 0-19: 1.5-2.4)
    assert np.allclose(post[1:], 1.0, atol=1e-3)            # LayerNorm after every addition
    grads = _line(ex, 0, "pre-LN")
    assert grads[0] > 1.5 * grads[-1]                       # seeds 0-19: 2.3-4.4
    _set(ex, residual="gpt2")
    assert _line(ex, 1, "pre-LN")[-1] < 0.5 * pre[-1]       # GPT-2's scaling keeps it level
    assert "first / last block" in ex.message.value


def test_transformer_refuses_bad_settings():
    ex = gb.explorers.transformer()
    with pytest.raises(widgets.Refused, match="depth"):
        ex.data(depth=0)
    with pytest.raises(widgets.Refused, match="residual"):
        ex.data(residual="tiny")
