"""Tasks to train on, made in code or shipped inside a PyPI package: nothing is downloaded.

* :func:`digits`: scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes), which ship inside
  scikit-learn itself.
* :func:`teacher`: a regression task whose targets come from a random "teacher" network.
* :func:`adding_problem`: the long-memory sequence task of Hochreiter & Schmidhuber (1997).
* :func:`sequences`: next-token prediction on token sequences (a repeated pattern, copying, sorting,
  characters of text that ships with Python) for the transformers of Part IV.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import activations as _acts
from ._checks import choice, positive_int

__all__ = ["Task", "digits", "teacher", "adding_problem", "sequences", "SEQUENCES"]


@dataclass
class Task:
    """A supervised task: train and test tensors and the kind of loss it calls for."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    kind: str  # "classification" (integer labels, cross-entropy), "regression" (float targets, MSE) or
    #            "language" (tokens (n, T) -> next tokens (n, T), :func:`gradbook.transformers.lm_loss`)
    vocab: int = 0  # tokens of a "language" task

    @property
    def in_dim(self) -> int:
        """Features per example (per time step, for sequence tasks)."""
        return self.x_train.shape[-1]

    @property
    def out_dim(self) -> int:
        if self.kind == "language":
            return self.vocab
        if self.kind == "classification":
            return int(max(self.y_train.max(), self.y_test.max())) + 1
        return self.y_train.shape[1]

    def batch(self, size: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """A random training batch of ``size`` examples (with replacement across batches)."""
        idx = torch.randint(len(self.x_train), (positive_int("batch size", size),), generator=generator)
        return self.x_train[idx], self.y_train[idx]

    def to(self, device=None, dtype: torch.dtype | None = None) -> "Task":
        """A copy on ``device`` with floating inputs (and regression targets) cast to ``dtype``."""
        def move(t, is_input):
            t = t.to(device) if device is not None else t
            if dtype is not None and t.is_floating_point() and (is_input or self.kind == "regression"):
                t = t.to(dtype)
            return t
        return Task(self.name, move(self.x_train, True), move(self.y_train, False),
                    move(self.x_test, True), move(self.y_test, False), self.kind, self.vocab)


def _split(n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be between 0 and 1, got {test_fraction!r}")
    order = np.random.default_rng(seed).permutation(n)
    n_test = int(round(n * test_fraction))
    return order[n_test:], order[:n_test]


def digits(scale: str = "standardize", test_fraction: float = 0.25, split_seed: int = 0) -> Task:
    """scikit-learn's 8x8 digits as a 64-input, 10-class task.

    ``scale="standardize"`` gives each pixel zero mean and unit variance on the training set (constant
    pixels are left at 0); ``scale="unit"`` divides by 16 into [0, 1], as Glorot & Bengio's inputs.
    The train/test split is fixed by ``split_seed``, not by the book's seed, so that every run is
    scored on the same test images.
    """
    from sklearn.datasets import load_digits

    choice("scale", scale, ["standardize", "unit"])
    x, y = load_digits(return_X_y=True)
    x = x.astype(np.float32)
    train, test = _split(len(x), test_fraction, split_seed)
    if scale == "unit":
        x = x / 16.0
    else:
        mu, sd = x[train].mean(0), x[train].std(0)
        x = (x - mu) / np.where(sd > 0, sd, 1.0)
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    return Task("digits", t(x[train]), t(y[train]).long(), t(x[test]), t(y[test]).long(), "classification")


def teacher(n_train: int = 2048, n_test: int = 512, in_dim: int = 16, out_dim: int = 1, width: int = 32,
            depth: int = 2, activation: str = "tanh", noise: float = 0.0, seed: int = 0) -> Task:
    """Regression on targets y = f(x) + noise, where f is a random ``depth``-layer teacher MLP.

    Inputs are x ~ N(0, I). The teacher has LeCun-normal weights (Var W = 1/fan_in) and the given
    activation, so its outputs have order-one variance; it is drawn from ``seed`` alone.
    """
    for name, v in [("n_train", n_train), ("n_test", n_test), ("in_dim", in_dim), ("out_dim", out_dim),
                    ("width", width), ("depth", depth)]:
        positive_int(name, v)
    act = _acts.get(activation)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_train + n_test, in_dim, generator=g)
    h, n_in = x, in_dim
    for _ in range(depth):
        w = torch.randn(n_in, width, generator=g) / n_in**0.5
        h, n_in = act(h @ w), width
    y = h @ (torch.randn(n_in, out_dim, generator=g) / n_in**0.5)
    y = y + noise * torch.randn(y.shape, generator=g)
    return Task(f"teacher-{activation}", x[:n_train], y[:n_train], x[n_train:], y[n_train:], "regression")


def adding_problem(length: int = 20, n_train: int = 4096, n_test: int = 512, seed: int = 0) -> Task:
    """The adding problem (Hochreiter & Schmidhuber 1997, experiment 4), as in Pascanu et al. (2013).

    Each input is a sequence of ``length`` steps with two features: a value drawn from U[0, 1] and a
    marker that is 1 at exactly two steps, one in each half of the sequence, and 0 elsewhere. The target
    is the sum of the two marked values. Predicting the mean, 1, always gives a mean squared error of
    Var(u1 + u2) = 1/6 = 0.167: a model must beat that to have learned anything.
    """
    positive_int("length", length)
    if length < 2:
        raise ValueError(f"the adding problem needs length >= 2, got {length!r}")
    g = torch.Generator().manual_seed(seed)
    n = n_train + n_test
    values = torch.rand(n, length, generator=g)
    half = length // 2
    first = torch.randint(0, half, (n,), generator=g)
    second = torch.randint(half, length, (n,), generator=g)
    marks = torch.zeros(n, length)
    rows = torch.arange(n)
    marks[rows, first] = 1.0
    marks[rows, second] = 1.0
    x = torch.stack([values, marks], dim=-1)
    y = (values * marks).sum(1, keepdim=True)
    return Task(f"adding-{length}", x[:n_train], y[:n_train], x[n_train:], y[n_train:], "regression")


#: The kinds of :func:`sequences`.
SEQUENCES = ["repeat", "copy", "sort", "chars"]


def _text() -> str:
    """The Zen of Python (the ``this`` module, ROT13-decoded without printing) and the docstrings of a few
    standard-library modules: about 9,000 characters that ship with every Python."""
    import argparse
    import codecs
    import contextlib
    import difflib
    import heapq
    import inspect
    import io
    import json
    import textwrap

    with contextlib.redirect_stdout(io.StringIO()):
        import this
    docs = [inspect.cleandoc(m.__doc__ or "") for m in (json, textwrap, heapq, difflib, argparse)]
    return "\n\n".join([codecs.decode(this.s, "rot13")] + docs)


def _symbols(kind: str, n: int, length: int, vocab: int, period: int, g: torch.Generator) -> tuple[torch.Tensor, int]:
    """``n`` sequences of ``length + 1`` tokens for one kind, and the vocabulary size."""
    if kind == "repeat":
        pattern = torch.randint(vocab, (n, period), generator=g)
        return pattern.repeat(1, length // period + 2)[:, :length + 1], vocab
    if kind in ("copy", "sort"):
        half = length // 2                          # half symbols, a separator (token 0), then the answer
        if half < 1 or vocab < 2:
            raise ValueError(f"{kind!r} needs length >= 2 and vocab >= 2, got {length!r} and {vocab!r}")
        source = torch.randint(1, vocab, (n, half), generator=g)
        answer = source if kind == "copy" else source.sort(dim=1).values
        seq = torch.cat([source, torch.zeros(n, 1, dtype=torch.long), answer], dim=1)
        pad = torch.zeros(n, max(0, length + 1 - seq.shape[1]), dtype=torch.long)
        return torch.cat([seq, pad], dim=1)[:, :length + 1], vocab
    text = _text()
    alphabet = sorted(set(text))
    ids = torch.tensor([alphabet.index(c) for c in text])
    starts = torch.randint(len(ids) - length - 1, (n,), generator=g)
    return ids[starts[:, None] + torch.arange(length + 1)], len(alphabet)


def sequences(kind: str = "repeat", length: int = 32, vocab: int = 64, period: int = 8, n_train: int = 4096,
              n_test: int = 512, seed: int = 0) -> Task:
    """Next-token prediction: tokens (n, ``length``) and targets, the same sequences one step later.

    * ``"repeat"``: a random pattern of ``period`` tokens (from ``vocab``) repeated; every target after
      the first period is predictable by looking back ``period`` positions, the first ``period - 1``
      are not, so the best mean loss is about (period - 1) / length * ln(vocab).
    * ``"copy"`` / ``"sort"``: ``length // 2`` random tokens from 1..vocab-1, a separator 0, then the
      same tokens copied or sorted.
    * ``"chars"``: windows of the Zen of Python and a few standard-library docstrings, one token per
      character (``vocab`` is the number of distinct characters; the argument is ignored).

    Returns a :class:`Task` of kind ``"language"`` with its ``vocab``; train on it with
    :func:`gradbook.transformers.lm_loss`.
    """
    choice("kind", kind, SEQUENCES)
    for name, v in [("length", length), ("vocab", vocab), ("period", period), ("n_train", n_train),
                    ("n_test", n_test)]:
        positive_int(name, v)
    g = torch.Generator().manual_seed(seed)
    seq, size = _symbols(kind, n_train + n_test, length, vocab, period, g)
    x, y = seq[:, :-1].contiguous(), seq[:, 1:].contiguous()
    return Task(f"{kind}-{length}", x[:n_train], y[:n_train], x[n_train:], y[n_train:], "language", size)
