import math

import numpy as np
import pytest
import torch

from gradbook import activations

ALL = ["sigmoid", "tanh", "relu", "leaky_relu", "elu", "gelu", "linear"]


def test_names_are_the_book_s_seven():
    assert activations.names() == ALL


def test_unknown_name_is_refused_with_the_allowed_names():
    with pytest.raises(ValueError) as e:
        activations.get("swish")
    assert "'swish'" in str(e.value) and all(repr(n) in str(e.value) for n in ALL)


@pytest.mark.parametrize("name", ALL)
def test_function_matches_its_torch_module(name):
    act = activations.get(name)
    x = torch.linspace(-6, 6, 1001, dtype=torch.float64)
    torch.testing.assert_close(act(x), act.module().double()(x))


@pytest.mark.parametrize("name", ALL)
def test_derivative_matches_autograd(name):
    act = activations.get(name)
    x = torch.linspace(-6, 6, 1000, dtype=torch.float64)  # even count: avoids x == 0 exactly
    x.requires_grad_(True)
    (g,) = torch.autograd.grad(act(x).sum(), x)
    torch.testing.assert_close(act.derivative(x.detach()), g)


@pytest.mark.parametrize("name", ALL)
def test_numpy_and_torch_agree(name):
    act = activations.get(name)
    x = np.linspace(-5, 5, 101)
    assert isinstance(act(x), np.ndarray) and isinstance(act.derivative(x), np.ndarray)
    np.testing.assert_allclose(act(x), act(torch.from_numpy(x)).numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(act.derivative(x), act.derivative(torch.from_numpy(x)).numpy(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ALL)
def test_gamma_is_the_supremum_of_the_derivative(name):
    act = activations.get(name)
    x = np.linspace(-20, 20, 400001)
    assert act.derivative(x).max() == pytest.approx(act.gamma, rel=1e-6)


def test_the_bounds_of_the_book():
    assert activations.get("sigmoid").gamma == 0.25
    assert activations.get("tanh").gamma == 1.0


@pytest.mark.parametrize("name,edge", [("sigmoid", math.log((1 + math.sqrt(0.9)) / (1 - math.sqrt(0.9)))),  # s(1-s) = 0.025
                                       ("tanh", math.atanh(math.sqrt(0.9)))])        # 1 - t^2 = 0.1
def test_saturation_is_where_the_derivative_drops_below_a_tenth_of_its_bound(name, edge):
    act = activations.get(name)
    assert not act.saturated(np.array([0.0, edge - 1e-6, -(edge - 1e-6)])).any()
    assert act.saturated(np.array([edge + 1e-6, -(edge + 1e-6), 50.0])).all()


def test_relu_saturates_on_its_negative_side_only_and_linear_never():
    relu, lin = activations.get("relu"), activations.get("linear")
    x = np.array([-3.0, -1e-9, 1e-9, 3.0])
    assert relu.saturated(x).tolist() == [True, True, False, False]
    assert not lin.saturated(np.linspace(-100, 100, 11)).any()


def test_from_module_knows_torch_activations_and_their_parameters():
    assert activations.from_module(torch.nn.Tanh()).name == "tanh"
    assert activations.from_module(torch.nn.ReLU(inplace=True)).name == "relu"
    assert activations.from_module(torch.nn.Identity()) is None
    assert activations.from_module(torch.nn.GELU(approximate="tanh")) is None
    leaky = activations.from_module(torch.nn.LeakyReLU(0.2))
    x = torch.linspace(-3, 3, 11)
    torch.testing.assert_close(leaky.fn(x), torch.nn.functional.leaky_relu(x, 0.2))
    elu = activations.from_module(torch.nn.ELU(alpha=2.0))
    assert elu.gamma == 2.0
    torch.testing.assert_close(elu.fn(x), torch.nn.functional.elu(x, 2.0))
