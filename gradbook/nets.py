"""The networks the book studies: a plain MLP and a vanilla (Elman) RNN, both small and inspectable.

>>> import gradbook as gb
>>> net = gb.mlp(depth=20, width=64, activation="sigmoid", init="standard")
>>> len(net.layers), net.layers[0].linear       # hidden layers, addressed in order
(20, Linear(in_features=64, out_features=64, bias=True))
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from . import activations as _acts
from . import init as _init
from ._checks import choice, non_negative, positive_int

__all__ = ["MLP", "Block", "ElmanRNN", "LSTM", "mlp", "mean_field_mlp", "rnn", "lstm", "set_largest_singular_value",
           "set_spectral_radius", "BIASES"]

NORMS = [None, "batch", "layer"]
#: How :func:`mlp` starts its biases: at zero, or as ``torch.nn.Linear`` draws them (:func:`gradbook.init.torch_default_bias`).
BIASES = ["zero", "torch"]


def _initializer(init: str | Callable, init_kwargs: dict | None) -> Callable:
    """A function weight -> weight from an init name (see :mod:`gradbook.init`) or a callable."""
    kwargs = dict(init_kwargs or {})
    if callable(init):
        return lambda w: init(w, **kwargs)
    fn = _init.get(init)
    if init == "normal" and "std" not in kwargs:
        raise ValueError("init 'normal' needs init_kwargs={'std': ...}, the standard deviation of the weights")
    return lambda w: fn(w, **kwargs)


class Block(nn.Module):
    """One hidden layer: ``linear`` -> optional ``norm`` -> ``act``, with an optional identity skip."""

    def __init__(self, linear: nn.Linear, norm: nn.Module, act: nn.Module, residual: bool):
        super().__init__()
        self.linear, self.norm, self.act, self.residual = linear, norm, act, residual

    def forward(self, x):
        h = self.act(self.norm(self.linear(x)))
        return x + h if self.residual else h


class MLP(nn.Module):
    """A multilayer perceptron: ``layers`` (a ModuleList of :class:`Block`) then an optional ``readout``."""

    def __init__(self, layers: list[Block], readout: nn.Linear | None):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.readout = readout

    def hidden(self, x) -> list[torch.Tensor]:
        """Every hidden layer's output, in order."""
        outs = []
        for block in self.layers:
            x = block(x)
            outs.append(x)
        return outs

    def forward(self, x):
        for block in self.layers:
            x = block(x)
        return self.readout(x) if self.readout is not None else x


def mlp(depth: int, width: int, activation: str = "relu", init: str | Callable = "he", *,
        in_dim: int | None = None, out_dim: int | None = None, norm: str | None = None,
        residual: bool = False, branch_scale: float = 1.0, bias: bool = True, bias_init: str = "zero",
        init_kwargs: dict | None = None) -> MLP:
    """A ``depth``-layer MLP of ``width`` units per hidden layer.

    Parameters
    ----------
    depth, width : int
        Number of hidden layers (each Linear -> [norm] -> activation) and units in each.
    activation : str
        One of :func:`gradbook.activations.names`.
    init : str or callable
        One of :func:`gradbook.init.names`, applied to every weight (readout included), or a function
        ``weight -> weight``; ``init_kwargs`` are passed on (e.g. ``{"std": 0.1}`` for ``"normal"``).
    bias, bias_init
        Whether the Linear layers have biases, and how they start: ``"zero"`` (default) or ``"torch"``,
        as a plain ``nn.Linear`` draws them, U[-1/sqrt(fan_in), 1/sqrt(fan_in)] (the bias a model built
        from ``nn.Linear`` layers has; with saturating activations it matters, see the book's chapter on
        initialization).
    in_dim, out_dim : int, optional
        Input size (default ``width``) and the size of a final Linear readout (default: no readout).
    norm : None, "batch" or "layer"
        Normalization after each hidden Linear (Ioffe & Szegedy 2015; Ba et al. 2016). With batch
        norm the Linear has no bias, which the norm's shift makes redundant.
    residual : bool
        Add the block's input to its output wherever the sizes match (He et al. 2016).
    branch_scale : float
        With ``residual``, multiply the weights of every block that has a skip by this number, so the
        branch adds less than its input: ``depth ** -0.5`` keeps the signal O(1) through the whole
        stack, the idea behind Fixup (Zhang, Dauphin & Ma 2019); 0 starts every such block as the
        identity.
    """
    positive_int("depth", depth)
    positive_int("width", width)
    act = _acts.get(activation)
    choice("norm", norm, NORMS)
    in_dim = width if in_dim is None else positive_int("in_dim", in_dim)
    init_fn = _initializer(init, init_kwargs)
    choice("bias_init", bias_init, BIASES)

    def linear(n_in, n_out, with_bias):
        layer = nn.Linear(n_in, n_out, bias=with_bias)
        init_fn(layer.weight)
        if layer.bias is not None:
            if bias_init == "torch":
                _init.torch_default_bias(layer.bias, n_in)
            else:
                nn.init.zeros_(layer.bias)
        return layer

    blocks = []
    for i in range(depth):
        n_in = in_dim if i == 0 else width
        norm_mod = {None: nn.Identity, "batch": nn.BatchNorm1d, "layer": nn.LayerNorm}[norm]
        blocks.append(Block(linear(n_in, width, bias and norm != "batch"),
                            norm_mod(width) if norm else nn.Identity(),
                            act.module(), residual and n_in == width))
    if not (branch_scale >= 0 and math.isfinite(branch_scale)):
        raise ValueError(f"branch_scale must be a finite number >= 0, got {branch_scale!r}")
    if branch_scale != 1.0:
        if not residual:
            raise ValueError("branch_scale scales residual branches: pass residual=True too")
        with torch.no_grad():
            for block in blocks:
                if block.residual:
                    block.linear.weight.mul_(branch_scale)
    readout = linear(width, positive_int("out_dim", out_dim), bias) if out_dim is not None else None
    return MLP(blocks, readout)


def mean_field_mlp(depth: int, width: int, activation: str, sigma_w: float, sigma_b: float = 0.0, *,
                   weights: str = "gaussian", in_dim: int | None = None, out_dim: int | None = None):
    """A :func:`gradbook.nets.mlp` drawn exactly as the mean-field theory assumes: no readout,
    W ~ N(0, sigma_w^2 / fan_in) (or ``weights="orthogonal"``: a scaled orthogonal matrix with every
    singular value sigma_w) and b ~ N(0, sigma_b^2) (``sigma_b = 0``: no biases at all).

    ``in_dim`` and ``out_dim`` are as for :func:`gradbook.nets.mlp` (the readout, if any, gets weights of
    variance sigma_w^2 / width and a zero bias). It uses torch's global random generator, so
    ``torch.manual_seed`` (or :func:`gradbook.setup`) fixes it.
    """
    choice("weights", weights, _init.ENSEMBLES)
    non_negative("sigma_w", sigma_w)
    non_negative("sigma_b", sigma_b)
    n_in = width if in_dim is None else positive_int("in_dim", in_dim)
    init, kwargs = (("normal", {"std": sigma_w / math.sqrt(n_in)}) if weights == "gaussian"
                    else ("orthogonal", {"gain": sigma_w}))
    if weights == "gaussian" and n_in != width:   # "normal" has one std for all layers: fix the others
        net = mlp(depth, width, activation, "normal", in_dim=n_in, out_dim=out_dim, bias=sigma_b > 0,
                  init_kwargs=kwargs)
        with torch.no_grad():
            for layer in [b.linear for b in list(net.layers)[1:]] + ([net.readout] if out_dim else []):
                layer.weight.normal_(0.0, sigma_w / math.sqrt(width))
    else:
        net = mlp(depth, width, activation, init, in_dim=n_in, out_dim=out_dim, bias=sigma_b > 0,
                  init_kwargs=kwargs)
    if sigma_b > 0:
        with torch.no_grad():
            for block in net.layers:
                block.linear.bias.normal_(0.0, sigma_b)
    return net


class ElmanRNN(nn.Module):
    """A vanilla RNN, h_t = phi(W_in x_t + W_rec h_{t-1} + b), with an optional readout of h_T.

    ``input`` and ``recurrent`` are the two Linear maps (``recurrent.weight`` is W_rec);
    :meth:`states` returns every h_t, so gradients through time can be measured.
    """

    def __init__(self, input_size: int, hidden_size: int, output_size: int | None, activation: str):
        super().__init__()
        self.input = nn.Linear(input_size, hidden_size)
        self.recurrent = nn.Linear(hidden_size, hidden_size, bias=False)
        self.act = _acts.get(activation).module()
        self.readout = nn.Linear(hidden_size, output_size) if output_size is not None else None

    def states(self, x: torch.Tensor, h0: torch.Tensor | None = None) -> list[torch.Tensor]:
        """[h_1, ..., h_T] for an input of shape (batch, T, input_size)."""
        if x.dim() != 3:
            raise ValueError(f"an RNN input must have shape (batch, time, features), got {tuple(x.shape)}")
        h = h0 if h0 is not None else x.new_zeros(x.shape[0], self.recurrent.in_features)
        drive = self.input(x)  # all time steps at once
        out = []
        for t in range(x.shape[1]):
            h = self.act(drive[:, t] + self.recurrent(h))
            out.append(h)
        return out

    def forward(self, x, h0=None):
        h_last = self.states(x, h0)[-1]
        return self.readout(h_last) if self.readout is not None else h_last


def set_largest_singular_value(weight: torch.Tensor, value: float) -> torch.Tensor:
    """Rescale ``weight`` in place so that its largest singular value is ``value``."""
    with torch.no_grad():
        return weight.mul_(value / torch.linalg.matrix_norm(weight.double(), ord=2).item())


def set_spectral_radius(weight: torch.Tensor, value: float) -> torch.Tensor:
    """Rescale a square ``weight`` in place so that its largest eigenvalue modulus is ``value``."""
    with torch.no_grad():
        radius = torch.linalg.eigvals(weight.double()).abs().max().item()
        return weight.mul_(value / radius)


RECURRENT_INITS = _init.names() + ["identity"]


def _init_readout(readout: nn.Linear | None) -> None:
    """A recurrent net's readout of h_T: Xavier-uniform weights, zero bias."""
    if readout is not None:
        _init.xavier_uniform(readout.weight)
        nn.init.zeros_(readout.bias)


def rnn(input_size: int, hidden_size: int, output_size: int | None = None, activation: str = "tanh", *,
        recurrent_init: str = "orthogonal", recurrent_gain: float = 1.0, input_init: str = "xavier_uniform",
        init_kwargs: dict | None = None) -> ElmanRNN:
    """A vanilla (Elman) RNN with a chosen recurrent initialization.

    Parameters
    ----------
    recurrent_init : str
        Any name in :func:`gradbook.init.names`, or ``"identity"`` (Le, Jaitly & Hinton 2015).
    recurrent_gain : float
        Multiplies W_rec after initialization: for ``"orthogonal"`` and ``"identity"`` it is every
        singular value of W_rec, the dial of Pascanu et al. (2013). See also
        :func:`set_largest_singular_value` and :func:`set_spectral_radius`.
    input_init : str
        Initializer of the input weights; biases start at zero.
    """
    positive_int("input_size", input_size)
    positive_int("hidden_size", hidden_size)
    choice("recurrent_init", recurrent_init, RECURRENT_INITS)
    net = ElmanRNN(input_size, hidden_size, output_size, activation)
    _initializer(input_init, None)(net.input.weight)
    nn.init.zeros_(net.input.bias)
    w = net.recurrent.weight
    if recurrent_init == "identity":
        with torch.no_grad():
            w.copy_(torch.eye(hidden_size))
    else:
        _initializer(recurrent_init, init_kwargs)(w)
    with torch.no_grad():
        w.mul_(recurrent_gain)
    _init_readout(net.readout)
    return net


class LSTM(nn.Module):
    """A one-layer LSTM (Hochreiter & Schmidhuber 1997) built on ``nn.LSTMCell``, with a readout of h_T.

    :meth:`states` returns every cell state c_t (or hidden state h_t), so that gradients through time
    can be measured with :func:`gradbook.measure.through_time` exactly as for :class:`ElmanRNN`. The
    cell state's update c_t = f_t * c_{t-1} + i_t * g_t is the "constant error carousel": with the forget
    gate f_t near 1, dc_T/dc_t stays near 1 however far apart T and t are.
    """

    def __init__(self, input_size: int, hidden_size: int, output_size: int | None):
        super().__init__()
        self.cell = nn.LSTMCell(input_size, hidden_size)
        self.readout = nn.Linear(hidden_size, output_size) if output_size is not None else None

    def states(self, x: torch.Tensor, h0: torch.Tensor | None = None, which: str = "cell") -> list[torch.Tensor]:
        """[c_1, ..., c_T] (``which="cell"``) or [h_1, ..., h_T] (``which="hidden"``) for (batch, T, features)."""
        choice("which", which, ["cell", "hidden"])
        if x.dim() != 3:
            raise ValueError(f"an LSTM input must have shape (batch, time, features), got {tuple(x.shape)}")
        h = h0 if h0 is not None else x.new_zeros(x.shape[0], self.cell.hidden_size)
        c = x.new_zeros(x.shape[0], self.cell.hidden_size)
        out = []
        for t in range(x.shape[1]):
            h, c = self.cell(x[:, t], (h, c))
            out.append(c if which == "cell" else h)
        return out

    def forward(self, x, h0=None):
        h_last = self.states(x, h0, which="hidden")[-1]
        return self.readout(h_last) if self.readout is not None else h_last


def lstm(input_size: int, hidden_size: int, output_size: int | None = None, *, forget_bias: float = 1.0) -> LSTM:
    """An LSTM with PyTorch's default weights and the forget gate's bias set to ``forget_bias``.

    A forget-gate bias of 1 (Jozefowicz, Zaremba & Sutskever 2015) starts the gate near sigmoid(1) = 0.73
    rather than 0.5, so the cell state remembers longer from the first step.
    """
    positive_int("input_size", input_size)
    positive_int("hidden_size", hidden_size)
    net = LSTM(input_size, hidden_size, output_size)
    with torch.no_grad():
        for bias in (net.cell.bias_ih, net.cell.bias_hh):   # gate order in PyTorch: input, forget, cell, output
            bias[hidden_size:2 * hidden_size].fill_(forget_bias / 2)
    _init_readout(net.readout)
    return net
