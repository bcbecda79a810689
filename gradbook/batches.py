"""How a batch goes into a model and comes out as a loss, checked at every step.

*Calling.* ``inputs`` may be one tensor (``model(inputs)``), a tuple or list of positional arguments
(``model(*inputs)``) or a dict of keyword arguments (``model(**inputs)``); :func:`call` does exactly that,
and the loss function receives exactly what the model returned (a tensor, a tuple, a dict...).

*Checking.* Before anything is measured, :func:`check_batch` refuses inputs and targets that would make
a verdict meaningless: a non-finite value, an empty batch, a NumPy array where a tensor is needed, batch
sizes that disagree. Every error names the argument, what was given and what was expected. A model that
fails on the inputs (a wrong width, say) is reported with the inputs' shapes and the first layer's
expected size (:func:`call`). :func:`check_loss` does the same for what the loss function returns.

*The default loss* (:func:`default_loss`) is cross-entropy for integer targets, with the class scores
on axis 1 (torch's convention) or on the last axis (a language model's ``(batch, time, vocabulary)``
logits against ``(batch, time)`` tokens), mean squared error for float targets and ``sum(y^2)/2`` without
targets.

*Where a value first turns non-finite.* :func:`first_nonfinite` runs the model once more with a forward
hook on every module and names the first module, in the order they ran, whose output holds a NaN or an
infinity.
"""
from __future__ import annotations

import cmath
import numbers
from typing import Callable

import numpy as np
import torch
from torch import nn

from .records import layers, output_tensors

__all__ = ["call", "check_batch", "check_lr", "check_loss", "default_loss", "loss_of", "first_nonfinite",
           "batch_size"]


def _arguments(inputs) -> tuple[tuple, dict]:
    if isinstance(inputs, dict):
        return (), dict(inputs)
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    return (inputs,), {}


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    if isinstance(value, np.ndarray):
        return f"a NumPy array of shape {value.shape}"
    return f"{type(value).__name__} {value!r}"[:120]


def _expected_width(model: nn.Module) -> str:
    named = layers(model)
    if not named:
        return ""
    m = named[0][1]
    for attr in ("in_features", "in_channels", "input_size", "embed_dim", "num_embeddings"):
        if hasattr(m, attr):
            return f"; its first layer {named[0][0]} ({type(m).__name__}) expects {attr}={getattr(m, attr)}"
    return ""


def call(model: nn.Module, inputs):
    """``model(inputs)``, ``model(*inputs)`` for a tuple or list, ``model(**inputs)`` for a dict.

    A shape or type error raised inside the model is raised again as a ``ValueError`` that names the
    inputs' shapes and what the model's first layer expects (the original error is chained)."""
    args, kwargs = _arguments(inputs)
    try:
        return model(*args, **kwargs)
    except (RuntimeError, IndexError, TypeError) as err:
        if not any(w in str(err) for w in ("shape", "size", "dimension", "mat1", "argument", "index", "Expected")):
            raise
        given = ", ".join(_describe(v) for v in [*args, *kwargs.values()])
        raise ValueError(f"the model cannot run on inputs ({given}){_expected_width(model)}: {err}") from err


def batch_size(inputs) -> int | None:
    """The batch size of ``inputs``: the first axis of its first tensor (None if it holds no tensor)."""
    args, kwargs = _arguments(inputs)
    for v in [*args, *kwargs.values()]:
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return v.shape[0]
    return None


def _check_tensor(what: str, value) -> None:
    if isinstance(value, np.ndarray):
        raise TypeError(f"{what} must be a torch.Tensor, got {_describe(value)}: "
                        f"convert it with torch.as_tensor({what.split('[')[0]})")
    if not isinstance(value, torch.Tensor):
        return
    if value.dim() > 0 and value.shape[0] == 0:
        raise ValueError(f"{what} is an empty batch ({_describe(value)}); at least one example is needed")
    # the sum is a cheap first test (a NaN or inf makes it non-finite; so may an overflow, then the exact count
    # below finds nothing); it is summed in at least float32, where float16's range is soon exceeded
    if (value.is_floating_point() or value.is_complex()) and value.numel() and \
            not cmath.isfinite(value.sum(dtype=torch.float32 if value.element_size() < 4 and value.is_floating_point()
                                         else None).item()):
        bad = ~torch.isfinite(value)
        if bad.any():
            raise ValueError(f"{what} holds {int(bad.sum())} non-finite value(s) (NaN or inf) in {_describe(value)}; "
                             "a gradient measured on them means nothing: clean the batch first")


def check_batch(inputs, targets=None, *, default_loss: bool = True) -> None:
    """Refuse inputs and targets that would make a measurement meaningless, with an error naming which.

    ``inputs``: a tensor, a tuple/list of positional arguments or a dict of keyword arguments; every
    tensor in it must be finite and hold at least one example. ``targets``: checked the same way; with
    ``default_loss`` (no ``loss_fn`` given) it must be a tensor or None (its shape is checked against the output by
    :func:`default_loss`)."""
    if inputs is None:
        raise TypeError("inputs must be a tensor, a tuple of positional arguments or a dict of keyword "
                        "arguments, got None")
    args, kwargs = _arguments(inputs)
    if not args and not kwargs:
        raise ValueError(f"inputs is empty ({_describe(inputs)}); the model needs at least one argument")
    for i, v in enumerate(args):
        _check_tensor("inputs" if not isinstance(inputs, (tuple, list)) else f"inputs[{i}]", v)
    for k, v in kwargs.items():
        _check_tensor(f"inputs[{k!r}]", v)
    if targets is None:
        return
    _check_tensor("targets", targets)
    if default_loss:
        if not isinstance(targets, torch.Tensor):
            raise TypeError(f"targets must be a torch.Tensor or None with the default loss, got "
                            f"{_describe(targets)}; pass loss_fn for targets of another kind")


def check_lr(lr) -> float | None:
    """``lr`` as a float if it is None or a finite positive number, else a ``ValueError`` naming it."""
    if lr is None:
        return None
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not (np.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    return float(lr)


def default_loss(output, target: torch.Tensor | None) -> torch.Tensor:
    """Cross-entropy for integer targets, mean squared error for float targets, ``sum(output^2)/2`` without.

    For cross-entropy the class scores are on axis 1 (``(batch, classes, ...)``, torch's convention) or,
    when that does not fit, on the last axis (``(batch, time, vocabulary)`` logits against ``(batch,
    time)`` tokens). The output must be a tensor: for a model that returns a tuple or a dict, pass
    ``loss_fn``."""
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"the default loss needs the model to return a tensor, but it returned "
                        f"{type(output).__name__}; pass loss_fn=lambda output, targets: ... to score it")
    if target is None:
        return output.pow(2).sum() / 2
    if not target.is_floating_point():
        if output.dim() == target.dim() + 1 and output.shape[:-1] == target.shape and (
                output.dim() < 3 or output.shape[2:] != target.shape[1:]):
            return nn.functional.cross_entropy(output.reshape(-1, output.shape[-1]), target.reshape(-1))
        if output.dim() == target.dim() + 1 and output.shape[0] == target.shape[0] \
                and output.shape[2:] == target.shape[1:]:
            return nn.functional.cross_entropy(output, target)
        raise ValueError(f"integer targets of shape {tuple(target.shape)} do not fit outputs of shape "
                         f"{tuple(output.shape)}: cross-entropy needs the class scores on axis 1 or on the "
                         "last axis, with one more axis than the targets")
    if output.shape != target.shape:
        raise ValueError(f"float targets of shape {tuple(target.shape)} do not match outputs of shape "
                         f"{tuple(output.shape)} for the mean squared error")
    return nn.functional.mse_loss(output, target)


def check_loss(loss) -> torch.Tensor:
    """``loss`` if it is a one-element tensor that carries a gradient, else a ``TypeError`` naming it."""
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise TypeError(f"loss_fn must return a scalar tensor, got {_describe(loss)}")
    if not loss.requires_grad:
        raise ValueError("the loss does not depend on any trainable parameter (it carries no gradient): "
                         "are all parameters frozen, or is the output detached?")
    return loss.reshape(())


def loss_of(output, targets, loss_fn: Callable | None = None) -> torch.Tensor:
    """``loss_fn(output, targets)`` (default :func:`default_loss`) on exactly what the model returned, checked."""
    return check_loss((loss_fn or default_loss)(output, targets))


def first_nonfinite(model: nn.Module, inputs) -> str | None:
    """'name (Type)' of the first module, in the order they ran, whose output holds a NaN or inf on
    ``inputs`` (the model itself if only its own code makes one); None if every output is finite.
    Runs without gradients; the caller keeps the buffers (:class:`gradbook.onepass.kept_buffers`)."""
    found: list[str] = []

    def hook(name):
        def check(mod, args, out):
            if not found and any(t.is_floating_point() and not torch.isfinite(t).all() for t in output_tensors(out)):
                found.append(f"{name or 'the model'} ({type(mod).__name__})")
        return check

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()]
    try:
        with torch.no_grad():
            call(model, inputs)
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else None
