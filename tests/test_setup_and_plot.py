import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import gradbook as gb  # noqa: E402


def test_setup_seeds_everything_from_the_environment(monkeypatch):
    monkeypatch.setenv("GRADBOOK_SEED", "17")
    assert gb.setup() == 17
    a = (torch.rand(3), np.random.rand(3))
    gb.setup()
    b = (torch.rand(3), np.random.rand(3))
    torch.testing.assert_close(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert torch.get_num_threads() == 1
    monkeypatch.delenv("GRADBOOK_SEED")
    assert gb.setup() == gb.DEFAULT_SEED
    monkeypatch.setenv("GRADBOOK_SEED", "seventeen")
    with pytest.raises(ValueError, match="'seventeen'"):
        gb.setup()


def test_setup_applies_the_colourblind_safe_palette():
    gb.setup(0)
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    assert colors[:3] == gb.plot.PALETTE[:3]


def test_gradient_flow_draws_one_log_line_per_record_with_labelled_axes():
    gb.setup(0)
    net = gb.mlp(depth=4, width=8, activation="sigmoid", init="standard", out_dim=2)
    rec = gb.gradients(net, torch.randn(6, 8), torch.randint(0, 2, (6,)))
    ax = gb.plot.gradient_flow(rec, rec, labels=["a", "b"], which="backprop")
    assert ax.get_yscale() == "log" and ax.get_xlabel() and ax.get_ylabel()
    assert len(ax.lines) == 2
    np.testing.assert_allclose(ax.lines[0].get_ydata(), rec.grad_norm)
    assert list(ax.lines[0].get_xdata()) == [1, 2, 3, 4, 5]
    plt.close("all")
    with pytest.raises(ValueError, match="'bias'"):
        gb.plot.gradient_flow(rec, which="bias")
    with pytest.raises(ValueError, match="labels"):
        gb.plot.gradient_flow(rec, labels=["a", "b"])


def test_glue_returns_its_value_outside_a_book():
    assert gb.glue("x", np.float64(0.5)) == 0.5


def test_glue_emits_exactly_what_myst_nb_reads(monkeypatch):
    """gb.glue writes myst-nb's glue output itself (sparing the import of myst_nb); same bytes as myst-nb."""
    import IPython
    import IPython.display
    import myst_nb.ext.glue as mg

    ours, theirs = [], []
    monkeypatch.setattr(IPython, "get_ipython", lambda: object())
    monkeypatch.setattr(IPython.display, "display", lambda *a, **k: ours.append((a, k)))
    monkeypatch.setattr(mg, "ipy_display", lambda *a, **k: theirs.append((a, k)))
    for value in (np.float64(0.125), 3, "layers.8.linear (Linear)"):
        gb.glue("name", value)
        mg.glue("name", int(value) if isinstance(value, int) else (float(value) if not isinstance(value, str) else value),
                display=False)
    assert ours and ours == theirs
