"""One-off measurements of a model on one batch: gradients, activations, what flows between blocks,
through time, and the per-layer factors and Jacobians that :mod:`gradbook.theory` predicts.

Each function runs its own forward (and backward) pass and leaves the model as it found it: the
parameters' ``.grad`` and the buffers (BatchNorm running statistics) are restored. The always-on probe for
training loops is :class:`gradbook.watch.watch`; what is measured is listed in :data:`gradbook.records.FIELDS`.

Batches and losses. ``inputs`` may be a tensor, a tuple of positional arguments or a dict of keyword
arguments, and the loss function receives exactly what the model returned (:mod:`gradbook.batches`,
which also checks the batch). The default loss (:func:`gradbook.batches.default_loss`) is cross-entropy
for integer targets, mean squared error for float targets and ``sum(y^2)/2`` without targets. Mean-field theory instead assumes that the
gradient arriving at the output is independent of the weights: :func:`random_direction` is that loss,
``<r, y>`` for a fixed Gaussian direction r.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn

from ._checks import choice
from .batches import check_batch, default_loss
from .makeup import Makeup, observe
from .onepass import kept_buffers, run
from .records import Inventory, Snapshot, eager, output_tensor, weight_norms, weight_tensors

__all__ = ["gradients", "activations", "capture", "stream", "Stream", "through_time", "input_gradients",
           "measured_factors", "factor_per_layer", "jacobian_singular_values", "random_direction",
           "RandomDirection", "snapshot_weights", "update_ratios", "evidence", "Evidence"]


class RandomDirection:
    """The loss ``L(y) = <r, y>`` for a fixed direction r with standard normal entries: dL/dy = r.

    Mean-field theory (Poole et al. 2016; Schoenholz et al. 2017) assumes that the gradient arriving at
    the output is independent of the weights; a loss such as ``|y|^2 / 2`` would correlate the two. Call
    it as ``loss_fn(output, target)`` (the target is ignored); ``direction`` is r.
    """

    def __init__(self, direction: torch.Tensor):
        self.direction = direction

    def __call__(self, output: torch.Tensor, target=None) -> torch.Tensor:
        if output.shape != self.direction.shape:
            raise ValueError(f"the output has shape {tuple(output.shape)} but the random direction was drawn "
                             f"for shape {tuple(self.direction.shape)}")
        return (output * self.direction).sum()


def random_direction(like, dtype: torch.dtype | None = None, generator: torch.Generator | None = None) -> RandomDirection:
    """A :class:`RandomDirection` loss for outputs shaped like ``like``: a tensor (say ``net(x)``, whose
    dtype and device it takes) or a shape such as ``(batch, width)`` (``dtype`` default torch's). r is drawn
    with ``generator``, default torch's global one."""
    if isinstance(like, torch.Tensor):
        r = torch.randn(like.shape, generator=generator, dtype=dtype or like.dtype).to(like.device)
    else:
        r = torch.randn(tuple(like), generator=generator, dtype=dtype)
    return RandomDirection(r)


def gradients(model: nn.Module, inputs, targets=None, loss_fn: Callable | None = None,
              level: str = "full") -> Snapshot:
    """Measure one forward and backward pass of ``model`` on a batch.

    The loss is ``loss_fn(output, targets)``, by default :func:`gradbook.batches.default_loss`, on exactly what
    :func:`gradbook.batches.call` returned. The parameters' ``.grad`` and the model's buffers are left as
    they were. A model compiled with ``torch.compile`` is measured through the module it compiled, in eager mode.
    """
    check_batch(inputs, targets, default_loss=loss_fn is None)
    return run(eager(model), inputs, targets, loss_fn, level=level)[0]


@dataclass
class Evidence:
    """What :func:`evidence` gathers in one forward and backward pass."""
    snapshot: Snapshot
    makeup: Makeup
    loss: float
    time_grad: np.ndarray | None
    weight_norm: np.ndarray | None = None   # ||W|| of each layer (gradbook.records.weight_norms)


def _time_hook(model, inputs, time_dim):
    """Read ||dL/dx_t|| at a float sequence input, or at the first embedding's output of a token model:
    (inputs to use, list that receives it, hook handle or None)."""
    got: list[np.ndarray] = []

    def keep(g):
        other = [d for d in range(g.dim()) if d != time_dim]
        got.append(torch.linalg.vector_norm(g.detach().double(), dim=other).cpu().numpy())
    if isinstance(inputs, torch.Tensor) and inputs.is_floating_point():
        x = inputs.detach().clone().requires_grad_(True)
        x.register_hook(keep)
        return x, got, None
    emb = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    if emb is None:
        return inputs, got, None

    def hook(module, args, out):   # returns None: the output is not replaced
        if out.requires_grad:
            out.register_hook(keep)
    return inputs, got, emb.register_forward_hook(hook)


def evidence(model: nn.Module, inputs, targets=None, loss_fn: Callable | None = None, *,
             time_dim: int | None = None, autocast: torch.dtype | None = None,
             inventory: Inventory | None = None) -> Evidence:
    """What :func:`gradbook.diagnosis.diagnose` decides on, from one checked forward and backward pass: the
    :class:`Snapshot` of :func:`gradients`, the :class:`gradbook.makeup.Makeup` observed in the same pass,
    the loss (returned, not back-propagated, if it is not finite) and, with ``time_dim``, ||dL/dx_t||.
    ``inventory``: the model's :class:`gradbook.records.Inventory`, if the caller has it."""
    check_batch(inputs, targets, default_loss=loss_fn is None)
    handle, got = None, []
    if time_dim is not None:
        choice("time_dim", time_dim, [0, 1])
        inputs, got, handle = _time_hook(model, inputs, time_dim)
    inv = inventory or Inventory(model)
    seen = observe(model, weight_norm := weight_norms(inv), inv)   # one pass over the weights, shared
    try:
        snap, loss = run(model, inputs, targets, loss_fn, autocast=autocast, seen=seen, inventory=inv)
    finally:
        if handle is not None:
            handle.remove()
    return Evidence(snap, seen.makeup, loss, got[0] if got else None, weight_norm)


def activations(model: nn.Module, inputs) -> Snapshot:
    """Activation statistics of one forward pass, with no backward pass.

    Returns a :class:`Snapshot` whose ``act_mean``, ``act_std``, ``saturated`` and ``dead`` are filled
    (the gradient fields are None). Pass a whole data set to find units that are dead on every input.
    The model runs in its current mode (a batch-norm layer in training mode normalizes with this batch's
    statistics); its running statistics are left untouched.
    """
    return run(eager(model), inputs, backward=False)[0]


def capture(model: nn.Module, inputs, module: nn.Module, what: str = "input") -> torch.Tensor:
    """The tensor entering (``what="input"``) or leaving (``"output"``) ``module`` when ``model`` runs on
    ``inputs``, detached; for instance the pre-activations of one sigmoid layer. Runs without gradients,
    in the model's current mode, and leaves its buffers (BatchNorm running statistics) untouched.
    """
    choice("what", what, ["input", "output"])
    if not any(m is module for m in model.modules()):
        raise ValueError("module is not part of model")
    seen: list[torch.Tensor] = []

    def hook(mod, args, out):
        t = args[0] if what == "input" else output_tensor(out)
        if not seen:
            seen.append(t.detach().clone())
    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad(), kept_buffers(model):
            model(inputs)
    finally:
        handle.remove()
    if not seen:
        raise RuntimeError("module was not called in the forward pass")
    return seen[0]


@dataclass
class Stream:
    """What flows along a stack of blocks: per block output h_l, its size and the gradient it receives.

    ``names``: the blocks; ``rms``: the root mean square of the entries of h_l (whole batch);
    ``grad_norm``: ||dL/dh_l|| (whole batch). In a residual network h_l is the residual stream, the sum of
    the skip path and the branch: the quantity whose gradient the skip connections carry.
    """
    names: list[str]
    rms: np.ndarray
    grad_norm: np.ndarray


def _blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    if isinstance(model, nn.Sequential):
        return list(model.named_children())
    stack = getattr(model, "layers", None)
    if isinstance(stack, (nn.ModuleList, nn.Sequential)):
        return [(f"layers.{n}", m) for n, m in stack.named_children()]
    raise TypeError(f"stream() cannot tell which modules of a {type(model).__name__} are its blocks: pass "
                    "blocks=[...] (for instance a ResNet's residual blocks); by default it takes an "
                    "nn.Sequential's children or a model's `layers` ModuleList (gradbook.nets.mlp)")


def stream(model: nn.Module, inputs, targets=None, loss_fn: Callable | None = None,
           blocks: Iterable[nn.Module] | None = None) -> Stream:
    """Measure the output h_l of every block of ``model`` and the gradient dL/dh_l it receives.

    :func:`gradients` measures each layer's linear output a_l; in a residual network the gradient that the
    skip path carries is the one at the block's output h_l = h_{l-1} + F_l(h_{l-1}), which this measures
    (compare :func:`gradbook.theory.residual_profile`). ``blocks`` are modules of ``model``, each called
    once per forward pass; by default an ``nn.Sequential``'s children or the model's ``layers`` ModuleList.
    The loss is as in :func:`gradients`. Parameters' ``.grad`` and the model's buffers are left untouched.
    """
    if blocks is None:
        named = _blocks(model)
    else:
        names = {id(m): n for n, m in model.named_modules()}
        named = [(names.get(id(m)), m) for m in blocks]
        missing = [type(m).__name__ for n, m in named if n is None]
        if missing:
            raise ValueError(f"blocks must be modules of the model; not part of it: {missing}")
    if not named:
        raise ValueError("the model has no blocks to measure")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters: there is no gradient to measure")
    rms: list[list[torch.Tensor]] = [[] for _ in named]
    grads: list[torch.Tensor | None] = [None] * len(named)

    def hook(i):
        def record(mod, args, out):
            h = output_tensor(out)
            rms[i].append(h.detach().pow(2).mean().sqrt())
            if h.requires_grad:
                # a tensor hook sees dL/dh for this value even if a later operation changes h in place
                h.register_hook(lambda g: grads.__setitem__(i, g.detach().norm()))
        return record

    handles = [m.register_forward_hook(hook(i)) for i, (_, m) in enumerate(named)]
    try:
        with torch.enable_grad(), kept_buffers(model):
            out = output_tensor(model(inputs))
            calls = {named[i][0]: len(v) for i, v in enumerate(rms) if len(v) != 1}
            if calls:
                raise ValueError(f"each block must run once per forward pass; calls: {calls}")
            loss = (loss_fn or default_loss)(out, targets)
            torch.autograd.grad(loss, params, allow_unused=True)   # fills grads; no .grad is touched
    finally:
        for h in handles:
            h.remove()
    zero = torch.zeros((), dtype=rms[0][0].dtype, device=rms[0][0].device)
    return Stream([n for n, _ in named], torch.stack([r[0] for r in rms]).cpu().numpy(),
                  torch.stack([zero if g is None else g.to(zero) for g in grads]).cpu().numpy())


def through_time(model, inputs: torch.Tensor, h0: torch.Tensor | None = None, **states_kwargs) -> np.ndarray:
    """||dh_T / dh_{T-k}|| for k = 0, ..., T-1: how much the last hidden state depends on earlier ones.

    ``model`` is a :class:`gradbook.nets.ElmanRNN` or :class:`gradbook.nets.LSTM` (anything with a
    ``states(inputs, h0)`` method that returns the list of states; for the LSTM, its cell states). Entry k is the spectral norm of the Jacobian of h_T with respect
    to h_{T-k}, averaged over the batch: Pascanu, Mikolov & Bengio's (2013) measure of how a gradient
    grows or vanishes through time. Computed exactly, by one batched backward pass per hidden unit.
    Extra keyword arguments go to ``states``: ``which="hidden"`` measures an LSTM's h_t instead of c_t.
    """
    if not hasattr(model, "states"):
        raise TypeError("through_time needs a gradbook.nets.ElmanRNN or LSTM (a model with a states() method); "
                        f"got {type(model).__name__}")
    with torch.enable_grad():
        hs = model.states(inputs, h0, **states_kwargs)
        last = hs[-1]
        batch, width = last.shape
        eye = torch.eye(width, dtype=last.dtype, device=last.device)
        basis = eye[:, None, :].expand(width, batch, width)   # one unit vector of h_T per backward pass
        rows = torch.autograd.grad(last, hs, grad_outputs=basis, is_grads_batched=True, allow_unused=True)
    out = []
    for t in reversed(range(len(hs))):               # k = 0 is h_T itself
        r = rows[t]
        if r is None:
            out.append(torch.zeros((), dtype=last.dtype))
            continue
        jac = r.permute(1, 0, 2)                      # (batch, unit of h_T, unit of h_t)
        out.append(torch.linalg.matrix_norm(jac, ord=2).mean())
    return torch.stack(out).detach().cpu().numpy().astype(float)


def input_gradients(model: nn.Module, inputs: torch.Tensor, targets=None, loss_fn: Callable | None = None,
                    time_dim: int = 1) -> np.ndarray:
    """||dL/dx_t|| for each step t of a sequence input (the norm over the batch and the features).

    How much the loss depends on each input step: for a recurrent model, the gradient that reaches step t
    has travelled back through T - t steps. Only the gradient with respect to ``inputs`` is taken: no
    parameter's ``.grad`` changes, and buffers are kept.
    """
    choice("time_dim", time_dim, [0, 1])
    x = inputs.detach().clone().requires_grad_(True)
    with torch.enable_grad(), kept_buffers(model):
        out = output_tensor(model(x))
        (g,) = torch.autograd.grad((loss_fn or default_loss)(out, targets), x)
    other = [d for d in range(g.dim()) if d != time_dim]
    return torch.linalg.vector_norm(g.double(), dim=other).cpu().numpy()


def measured_factors(net, x) -> np.ndarray:
    """The measured per-layer factors ||delta_l||^2 / ||delta_{l+1}||^2 of ``net`` on the batch ``x``.

    delta_l is the gradient at layer l's pre-activation (``grad_norm`` of :func:`gradients`),
    back-propagated from a :func:`random_direction` loss, as the mean-field theory assumes; entry l - 1 is
    the measured counterpart of :func:`gradbook.theory.gradient_factors` ``(...)[l - 1]`` (one entry fewer
    than the network has layers). Take the geometric mean over layers (and seeds) to compare with theory:
    single factors fluctuate, more so in narrow networks (Hanin 2018).
    """
    with torch.no_grad():
        loss = random_direction(net(x))
    g = gradients(net, x, None, loss_fn=loss).grad_norm.astype(float) ** 2
    return g[:-1] / g[1:]


def factor_per_layer(profile, layers: int | None = None) -> float:
    """The geometric-mean factor from one layer to the next: (g[0] / g[k-1]) ** (1 / (k - 1)).

    ``profile`` is a record (its back-propagated ``grad_norm``, from the input side) or a 1-D array of
    norms; ``layers`` keeps its first k entries (the hidden layers, say, without the readout). It is how
    much each layer multiplies the gradient on its way down: below 1 it vanishes, above 1 it explodes.
    """
    norms = np.asarray(getattr(profile, "grad_norm", profile), dtype=float)
    if layers is not None:
        norms = norms[:layers]
    if norms.ndim != 1 or len(norms) < 2:
        raise ValueError(f"factor_per_layer needs a 1-D profile of at least 2 values, got shape {norms.shape}")
    return float((norms[0] / norms[-1]) ** (1 / (len(norms) - 1)))


def jacobian_singular_values(net, x) -> np.ndarray:
    """The singular values, largest first, of the Jacobian d net(x) / d x at one input ``x`` (a 1-D tensor).

    Computed with ``torch.func.jacrev`` (one backward pass per output, vectorized) and an SVD in float64.
    Compare their squares with :func:`gradbook.theory.jacobian_spectrum`.
    """
    if x.dim() != 1:
        raise ValueError(f"x must be one input, a 1-D tensor; got shape {tuple(x.shape)}")
    jac = torch.func.jacrev(net)(x)
    return torch.linalg.svdvals(jac.detach().double()).cpu().numpy()


def update_ratios(before: list[torch.Tensor], model_layers: Iterable[nn.Module]) -> np.ndarray:
    """||W_after - W_before|| / ||W_before|| per layer, from copies taken with :func:`snapshot_weights`."""
    out = []
    for old, m in zip(before, model_layers):
        new = torch.cat([p.detach().reshape(-1) for p in weight_tensors(m)])
        out.append(torch.linalg.vector_norm(new - old) / torch.linalg.vector_norm(old).clamp_min(1e-300))
    return torch.stack(out).cpu().numpy().astype(float) if out else np.zeros(0)


def snapshot_weights(model_layers: Iterable[nn.Module]) -> list[torch.Tensor]:
    """Flat copies of each layer's weights, for :func:`update_ratios`."""
    return [torch.cat([p.detach().reshape(-1) for p in weight_tensors(m)]).clone() for m in model_layers]
