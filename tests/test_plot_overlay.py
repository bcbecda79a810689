"""The predicted-profile overlay of gb.plot.gradient_flow: drawn dashed, labelled, and optional."""
import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import gradbook as gb  # noqa: E402
from gradbook import theory as th  # noqa: E402


@pytest.fixture
def record():
    torch.manual_seed(0)
    net = gb.mlp(6, 32, "tanh", "xavier_normal")
    return gb.gradients(net, torch.randn(16, 32), None, loss_fn=lambda out, _t: out.sum())


def test_without_prediction_nothing_changes(record):
    ax = gb.plot.gradient_flow(record, which="backprop")
    assert len(ax.get_lines()) == 1 and ax.get_legend() is None
    plt.close("all")


def test_one_predicted_profile_is_a_dashed_labelled_line(record):
    pred = th.gradient_profile("tanh", 6, 1.0, top=record.grad_norm[-1])
    ax = gb.plot.gradient_flow(record, which="backprop", labels=["measured"], predicted=pred)
    measured, dashed = ax.get_lines()
    assert dashed.get_linestyle() == "--" and measured.get_linestyle() == "-"
    np.testing.assert_allclose(dashed.get_xdata(), np.arange(1, 7))
    np.testing.assert_allclose(dashed.get_ydata(), pred)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["measured", "mean-field prediction"]
    plt.close("all")


def test_one_profile_per_record_takes_the_records_colours(record):
    pred = [np.ones(6), None]
    ax = gb.plot.gradient_flow(record, record, which="backprop", predicted=pred, predicted_label="theory")
    lines = ax.get_lines()
    assert len(lines) == 3 and lines[2].get_color() == lines[0].get_color()
    lines = gb.plot.gradient_flow(record, record, which="backprop", predicted=[None, np.ones(6)]).get_lines()
    assert len(lines) == 3 and lines[2].get_color() == lines[1].get_color() != lines[0].get_color()
    assert ax.get_legend() is not None and [t.get_text() for t in ax.get_legend().get_texts()] == ["theory"]
    with pytest.raises(ValueError, match="2 records"):
        gb.plot.gradient_flow(record, record, which="backprop", predicted=[np.ones(6)] * 3)
    plt.close("all")
