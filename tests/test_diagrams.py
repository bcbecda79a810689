"""gradbook.diagrams: every conceptual drawing renders at a phone's width with readable text, and draws
what its docstring says (the clipped arrows of `clipping` are the clipped vectors)."""
import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from gradbook import diagrams  # noqa: E402

DRAWINGS = [lambda: diagrams.jacobian_chain("depth"), lambda: diagrams.jacobian_chain("time"),
            diagrams.saturation, diagrams.fan_in, diagrams.clipping, diagrams.residual]


@pytest.mark.parametrize("draw", DRAWINGS)
def test_each_drawing_fits_a_phone_and_has_readable_text(draw):
    fig = draw()
    width, height = fig.get_size_inches()
    assert width <= 6.5 and height <= 3.5
    texts = [t for ax in fig.axes for t in ax.texts + [ax.title] if t.get_text()]
    assert texts and min(t.get_fontsize() for t in texts) >= 10
    fig.canvas.draw()                                         # renders (mathtext included) without error
    plt.close(fig)


def test_clipping_draws_the_clipped_vectors():
    fig = diagrams.clipping(g=(2.4, 0.6), c=1.0)
    ends = [np.array(a.xy) for a in fig.axes[0].texts if hasattr(a, "arrow_patch") and a.arrow_patch]
    g = np.array([2.4, 0.6])
    assert any(np.allclose(e, g / np.linalg.norm(g)) for e in ends)        # by norm: same direction, length 1
    assert any(np.allclose(e, [1.0, 0.6]) for e in ends)                    # by value: clamped entry by entry
    plt.close(fig)


def test_jacobian_chain_refuses_an_unknown_direction():
    with pytest.raises(ValueError, match="through"):
        diagrams.jacobian_chain("sideways")
