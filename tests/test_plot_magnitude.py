"""gb.plot.magnitude_over_time: one histogram column of log10|v| per recorded step."""
import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import gradbook as gb  # noqa: E402


def test_each_column_is_the_histogram_of_its_steps_magnitudes():
    values = [np.full(100, 10.0 ** k) for k in (-3, -2, -1)]     # one magnitude per step
    ax = gb.plot.magnitude_over_time([0, 10, 20], values, bins=4, lim=(-3.5, 0.5))
    image = ax.get_images()[0].get_array()
    assert image.shape == (4, 3)
    np.testing.assert_allclose(image[:3, :3], np.eye(3))           # the mass moves up one bin per step
    plt.close("all")


def test_zeros_are_left_out_and_bad_input_refused():
    ax = gb.plot.magnitude_over_time([0, 1], [np.array([0.0, 1.0]), np.array([0.0, 0.1])], bins=2)
    assert ax.get_images()[0].get_array().sum() == pytest.approx(2)
    with pytest.raises(ValueError, match="one array of values per step"):
        gb.plot.magnitude_over_time([0, 1, 2], [np.ones(3)])
    plt.close("all")
