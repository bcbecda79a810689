"""What a model is made of, as far as its gradients are concerned: :func:`describe` and :class:`observe`.

:func:`describe` reads the modules: embeddings, attention, recurrent and gated layers, normalization,
the activation modules gradbook knows and those it does not, and each layer's initial scale ``fan_in *
Var(W)`` (2 for He, 1 for Xavier/LeCun, 1/3 for PyTorch's default ``U(+-1/sqrt(fan_in))``).

What the modules do not say, a forward pass shows: :class:`observe` watches one pass (through
``torch.overrides.TorchFunctionMode``, which sees every torch function the model's code calls) and adds

* **functional nonlinearities**: ``torch.sigmoid``, ``F.relu``, ``x.tanh()``, ... called in a ``forward``
  outside any activation module (``nn.TransformerEncoderLayer``'s ReLU is one);
* **residual additions**: ``x + f(x)``, an addition of two tensors of one shape, one of which entered a
  module of the model in the same pass (a skip path around that module);
* **attention logits and entropy**: the largest ``|q . k| / sqrt(d_head)`` of every ``nn.MultiheadAttention``,
  from its own projection weights, and of every attention written by hand, seen as a softmax over the last
  axis of a (batch, heads, queries, keys) tensor or as a call of ``F.scaled_dot_product_attention``; and the
  smallest mean entropy of a head's attention weights (Wortsman et al. 2023: logits that grow during
  training make the softmax one-hot, its entropy collapses, and the training becomes unstable);
* **post-LN blocks**: residual additions whose skip path carries the output of a normalization, as in the
  original transformer, ``x' = LN(x + f(x))`` (Xiong et al. 2020: such blocks need learning-rate warm-up),
  against pre-LN blocks, ``x' = x + f(LN(x))``, whose skip path carries the un-normalized sum.

The diagnosis and the remedies read a :class:`Makeup` so that a remedy is never one the model already
applies, and so that a report can say what it could not measure: activations that are functions or
unknown modules have no forward statistics (``act_std``), and say so.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .attention import entropy
from .records import LAYER_TYPES, Inventory, norms, output_tensors, weight_norms

__all__ = ["Makeup", "describe", "observe", "attention_logit", "attention_extremes", "FUNCTIONAL", "INIT_GAINS"]

#: Names of the torch functions counted as nonlinearities when called outside an activation module.
FUNCTIONAL = {"sigmoid", "sigmoid_", "tanh", "tanh_", "relu", "relu_", "relu6", "gelu", "silu", "elu", "elu_",
              "leaky_relu", "leaky_relu_", "softplus", "mish", "hardtanh", "hardtanh_", "selu", "celu",
              "hardswish", "hardsigmoid", "logsigmoid", "softsign", "tanhshrink"}
#: fan_in * Var(W) of the named initializations, and how far (a factor) a measured value may stray.
INIT_GAINS = {"he": 2.0, "xavier": 1.0, "pytorch-default": 1 / 3}
_TOLERANCE = 1.3
_ADDS = {"add", "add_", "__add__", "__iadd__", "__radd__"}
_NORM_FUNCTIONS = {"layer_norm", "rms_norm", "group_norm", "batch_norm", "instance_norm"}
_SOFTMAX = {"softmax", "_softmax"}
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm,
          nn.modules.instancenorm._InstanceNorm)
_NOT_HIDDEN = (nn.MultiheadAttention, nn.Softmax, nn.LogSoftmax, nn.Softmin, nn.Softmax2d)


#: What :class:`observe` does with a module of the model, and what :func:`describe` lists it under (bit
#: flags, from its class alone).
_OVER, _SOFTMAX_MODULE, _ATTENTION, _NORM, _EMBEDDING, _RECURRENT, _GATED, _ACTIVATION = (1 << k for k in range(8))


@functools.lru_cache(maxsize=None)
def _kind(kind: type) -> int:
    """What a module of class ``kind`` is to :class:`observe` and :func:`describe`. ``_OVER``: the mode is
    left while the module runs: torch's own layers, normalizations, dropout and activation modules, inside
    which nothing it looks for happens (a subclass defined elsewhere may add calls to its forward: it is
    watched). ``_SOFTMAX_MODULE``, ``_ATTENTION``, ``_NORM``, ``_EMBEDDING``, ``_RECURRENT``, ``_GATED``: an
    ``nn.Softmax``, an ``nn.MultiheadAttention``, a normalization, an embedding, a recurrent module
    (:func:`gradbook.records.is_recurrent`), an LSTM or GRU; ``_ACTIVATION``: one of torch's activation
    modules (the softmaxes and attention aside)."""
    torch_own = kind.__module__.startswith("torch.nn.modules.")
    over = torch_own and (issubclass(kind, LAYER_TYPES + _NORMS + (nn.modules.dropout._DropoutNd,))
                          or kind.__module__ == "torch.nn.modules.activation")
    return (_OVER * over | _SOFTMAX_MODULE * issubclass(kind, nn.Softmax)
            | _ATTENTION * issubclass(kind, nn.MultiheadAttention) | _NORM * issubclass(kind, _NORMS)
            | _EMBEDDING * issubclass(kind, (nn.Embedding, nn.EmbeddingBag))
            | _RECURRENT * (issubclass(kind, nn.RNNBase) or callable(getattr(kind, "states", None)))
            | _GATED * issubclass(kind, (nn.LSTM, nn.GRU, nn.LSTMCell, nn.GRUCell))
            | _ACTIVATION * (kind.__module__ == "torch.nn.modules.activation" and not issubclass(kind, _NOT_HIDDEN)))


@dataclass
class Makeup:
    """A model's make-up; the fields filled by a forward pass (:class:`observe`) are empty without one."""

    embeddings: list[str]                 # nn.Embedding / nn.EmbeddingBag layers
    attention: list[str]                  # nn.MultiheadAttention modules
    recurrent: bool                       # an RNN/LSTM/GRU or a module with a ``states`` method
    gated: bool                           # an LSTM or GRU
    norms: list[str]                      # batch, layer, group, instance or RMS normalization
    activation_types: set[str]            # class names of the activation modules gradbook knows
    unknown_activations: list[str]        # activation modules gradbook has no derivative for ("SiLU")
    init_gain: dict[str, float]           # fan_in * Var(W) of each Linear/Conv layer
    functional: dict[str, int] = field(default_factory=dict)   # nonlinearity -> calls outside modules
    residual: int = 0                     # residual additions in one forward pass
    attention_logit: float | None = None  # largest |q.k|/sqrt(d_head) over the attention modules
    attention_entropy: float | None = None   # smallest mean entropy (nats) of one head's attention weights
    post_norm: int = 0                    # residual additions whose skip path is a normalization's output
    low_precision: list[str] = field(default_factory=list)   # trainable parameters stored in 16 bits or fewer

    @property
    def post_ln(self) -> bool:
        """Most residual additions add to a normalized stream: post-LN blocks (in a pre-LN model at most the
        first block's input, after an embedding norm, is normalized)."""
        return self.residual > 0 and self.post_norm > self.residual / 2

    @property
    def normed(self) -> bool:
        return bool(self.norms)

    @property
    def nonlinearities(self) -> set[str]:
        """Lower-case names of every nonlinearity used: modules known or not, and functions."""
        names = {t.lower() for t in self.activation_types}
        names |= {n.split(" ")[0].lower() for n in self.unknown_activations}
        return names | {n.rstrip("_") for n in self.functional}

    @property
    def init(self) -> str | None:
        """The named initialization (:data:`INIT_GAINS`) the layers' median gain matches, or None."""
        gains = sorted(self.init_gain.values())
        if not gains:
            return None
        mid = gains[len(gains) // 2]
        for name, g in INIT_GAINS.items():
            if g / _TOLERANCE <= mid <= g * _TOLERANCE:
                return name
        return None

    @property
    def unmeasured(self) -> str | None:
        """Why some activations have no forward statistics, or None when every one is measured."""
        parts = []
        if self.unknown_activations:
            parts.append(f"activation modules gradbook has no derivative for ({', '.join(self.unknown_activations[:3])}"
                         + (" ..." if len(self.unknown_activations) > 3 else "") + ")")
        if self.functional:
            parts.append("functional activations called inside forward ("
                         + ", ".join(f"{k} x{v}" for k, v in sorted(self.functional.items())) + ")")
        return " and ".join(parts) or None


def _init_gains(inv: Inventory, weight_norm) -> dict[str, float]:
    """fan_in * E[W^2] of each Linear/Conv layer (its variance for a zero-mean init), from ``weight_norm``,
    each layer's ``||W||`` (:func:`gradbook.records.weight_norms`) of the layers of ``inv``."""
    out = {}
    for (n, m), own, wn in zip(inv.layers, inv.weights, weight_norm):
        if not isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)):
            continue
        w = m.weight   # read once: a parameter is found by nn.Module.__getattr__, microseconds each time
        if w.dim() < 2 or w.numel() == 0:
            continue
        # ||W|| counts the weight alone unless it is frozen (then the layer's trainable tensors): recompute
        s = float(wn) ** 2 if len(own) == 1 and own[0] is w else float(norms([w.detach()])[0]) ** 2
        fan_in = w.numel() // w.shape[0] if isinstance(m, nn.Linear) or not m.transposed \
            else w.numel() // w.shape[1]
        out[n] = float(fan_in * s / w.numel())
    return out


def describe(model: nn.Module, weight_norm=None, inventory: Inventory | None = None) -> Makeup:
    """The :class:`Makeup` that the modules of ``model`` show, without running it. ``weight_norm``: each
    layer's ||W|| (:func:`gradbook.records.weight_norms` of :func:`gradbook.records.layers`), and
    ``inventory``: the model's :class:`gradbook.records.Inventory`, if the caller has them (one pass over
    the weights and one walk over the modules less)."""
    inv = inventory or Inventory(model)
    if weight_norm is None:
        weight_norm = weight_norms(inv)
    known = {id(m) for _, m, _ in inv.acts}
    lists: dict[int, list[str]] = {_EMBEDDING: [], _ATTENTION: [], _NORM: [], _ACTIVATION: []}
    flags = 0
    for n, m in inv.modules:
        kind = _kind(type(m))
        if kind:
            flags |= kind
            for bit, names in lists.items():
                if kind & bit and not (bit == _ACTIVATION and id(m) in known):
                    names.append(f"{type(m).__name__} ({n})" if bit == _ACTIVATION else n)
    return Makeup(
        embeddings=lists[_EMBEDDING], attention=lists[_ATTENTION],
        recurrent=bool(flags & _RECURRENT), gated=bool(flags & _GATED), norms=lists[_NORM],
        activation_types={type(m).__name__ for _, m, _ in inv.acts},
        unknown_activations=lists[_ACTIVATION],
        init_gain=_init_gains(inv, weight_norm),
        low_precision=[n for n, p in inv.named_params if p.dtype.itemsize <= 2 and p.requires_grad
                       and p.is_floating_point()])


def attention_logit(module: nn.MultiheadAttention, query: torch.Tensor, key: torch.Tensor) -> float | None:
    """The largest ``|q . k| / sqrt(d_head)`` of ``module`` on these query and key inputs (None if its
    projections are not the packed ``in_proj_weight``)."""
    if module.in_proj_weight is None or query.dim() != 3:
        return None
    e, h = module.embed_dim, module.num_heads
    w, b = module.in_proj_weight.detach(), module.in_proj_bias
    b = b.detach() if b is not None else torch.zeros(3 * e, dtype=w.dtype, device=w.device)
    if not module.batch_first:
        query, key = query.transpose(0, 1), key.transpose(0, 1)
    with torch.no_grad():
        q = nn.functional.linear(query.detach().to(w.dtype), w[:e], b[:e]).unflatten(-1, (h, e // h))
        k = nn.functional.linear(key.detach().to(w.dtype), w[e:2 * e], b[e:2 * e]).unflatten(-1, (h, e // h))
        low, high = torch.aminmax(q.transpose(1, 2) @ k.permute(0, 2, 3, 1))   # (batch, heads, queries, keys)
    return max(-float(low), float(high)) / math.sqrt(e // h)


def attention_extremes(logits: torch.Tensor) -> tuple[float, float]:
    """The largest finite ``|logit|`` of attention ``logits`` (batch, heads, queries, keys), and the smallest
    mean entropy (nats) over heads of the attention weights softmax(``logits``), from
    :func:`gradbook.attention.entropy` (a masked key, logit ``-inf``, adds nothing)."""
    finite = logits.detach().abs().nan_to_num(0.0, posinf=0.0, neginf=0.0)
    return float(finite.max()), float(entropy(logits).mean(dim=(0, 2)).min())


class observe(TorchFunctionMode):
    """Watch one forward pass of ``model`` (with gradients enabled: computations without them, such as a
    probe's statistics, are not looked at) and complete its :class:`Makeup` (``.makeup`` after the block)::

        with observe(model) as seen:
            model(x)
        seen.makeup.functional, seen.makeup.residual
    """

    def __init__(self, model: nn.Module, weight_norm=None, inventory: Inventory | None = None):
        super().__init__()
        self.inventory = inventory or Inventory(model)
        self.makeup = describe(model, weight_norm, self.inventory)
        self._inputs: dict[int, torch.Tensor] = {}   # tensors that entered a module (kept alive: ids stay unique)
        self._normed: dict[int, torch.Tensor] = {}   # outputs of normalizations (kept alive, likewise)
        self._inside = 0                            # depth inside activation modules and our own computations
        self._handles: list = []
        self._kinds: dict[int, int] = {}             # id of each module of the model: its _kind
        self._running: list[tuple] = []              # passed-over modules running: (id, whether the mode was left, _kind)
        self._depth = 0                              # the length of torch's function-mode stack with it on top

    def __enter__(self):
        # two global module hooks that pass over other models' modules, rather than one hook per module:
        # registering and removing a hook on each module costs more than the whole observation
        self._kinds = {id(m): _kind(type(m)) for _, m in self.inventory.modules}
        self._handles = [nn.modules.module.register_module_forward_pre_hook(self._pre),
                         nn.modules.module.register_module_forward_hook(self._post)]
        entered = super().__enter__()
        self._depth = torch._C._len_torch_function_stack()   # read once: a check per module costs 0.1 us, not 2
        return entered

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._inputs.clear()
        self._normed.clear()
        left = any(popped for _, popped, _ in self._running)   # an exception inside a passed-over module
        self._running.clear()
        self._inside = 0
        return None if left else super().__exit__(*exc)

    def _pre(self, mod, args):
        kind = self._kinds.get(id(mod))
        if kind is None or self._running or self._inside:   # another model's module, or inside one passed over
            return None
        if len(args) == 1 and type(args[0]) is torch.Tensor:   # the common case, without a walk
            self._inputs[id(args[0])] = args[0]
        else:
            for t in output_tensors(list(args)):
                self._inputs[id(t)] = t
        if kind & _SOFTMAX_MODULE and args and isinstance(args[0], torch.Tensor) and args[0].dim() == 4 \
                and mod.dim in (-1, 3) and torch.is_grad_enabled():
            self._attention(args[0])   # an nn.Softmax over the keys of (batch, heads, queries, keys) logits
        if kind & _OVER:   # nothing inside it is looked for: leave the mode while it runs (its calls cost nothing then)
            top = torch._C._len_torch_function_stack() == self._depth   # no other mode entered above it
            if top:
                TorchFunctionMode.__exit__(self, None, None, None)
            else:   # another mode above ours: stay, and let __torch_function__ pass the calls through
                self._inside += 1
            self._running.append((id(mod), top, kind))
        if kind & _ATTENTION and len(args) >= 2:   # its logits, the mode left or passing
            logit = attention_logit(mod, args[0], args[1])
            if logit is not None:
                self.makeup.attention_logit = max(logit, self.makeup.attention_logit or 0.0)
        return None

    def _post(self, mod, args, out):
        if not self._running or self._running[-1][0] != id(mod):
            return
        _, left, kind = self._running.pop()
        if left:
            TorchFunctionMode.__enter__(self)
        else:
            self._inside -= 1
        if kind & _NORM and isinstance(out, torch.Tensor):   # can be a post-LN block's skip path
            self._normed[id(out)] = out

    def _attention(self, logits: torch.Tensor) -> None:
        """Fold one attention's logits (batch, heads, queries, keys) into the make-up."""
        self._inside += 1
        try:
            logit, least = attention_extremes(logits)
        finally:
            self._inside -= 1
        m = self.makeup
        m.attention_logit = max(logit, m.attention_logit or 0.0)
        m.attention_entropy = least if m.attention_entropy is None else min(least, m.attention_entropy)

    def _sdpa_logits(self, q, k, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
        """The logits F.scaled_dot_product_attention computes inside: q k^T scale, masked."""
        logits = (q @ k.transpose(-2, -1)) * (scale if scale is not None else q.shape[-1] ** -0.5)
        if is_causal:
            logits = logits.masked_fill(torch.ones(logits.shape[-2:], dtype=torch.bool, device=q.device).triu(1),
                                        float("-inf"))
        if attn_mask is not None:
            logits = logits.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool \
                else logits + attn_mask
        return logits

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._inside or not torch.is_grad_enabled():   # our own, or a probe's, computations
            return func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if name in FUNCTIONAL:
            self.makeup.functional[name] = self.makeup.functional.get(name, 0) + 1
        elif name in _SOFTMAX and args and isinstance(args[0], torch.Tensor) and args[0].dim() == 4 \
                and kwargs.get("dim", args[1] if len(args) > 1 else None) in (-1, 3):
            self._attention(args[0])   # a softmax over the keys of (batch, heads, queries, keys) logits
        elif name == "scaled_dot_product_attention" and len(args) >= 3 and args[0].dim() == 4:
            self._inside += 1
            try:
                logits = self._sdpa_logits(*args[:2], **{k: v for k, v in kwargs.items() if k != "enable_gqa"},
                                           **dict(zip(["attn_mask", "dropout_p", "is_causal", "scale"], args[3:])))
            finally:
                self._inside -= 1
            self._attention(logits)
        elif name in _NORM_FUNCTIONS:   # its input, like a module's, can be the skip path of a residual
            if args and isinstance(args[0], torch.Tensor):
                self._inputs[id(args[0])] = args[0]
            out = func(*args, **kwargs)
            self._normed[id(out)] = out
            return out
        elif name in _ADDS and len(args) >= 2 and all(isinstance(a, torch.Tensor) for a in args[:2]) \
                and args[0].shape == args[1].shape:
            skips = [id(a) for a in args[:2] if id(a) in self._inputs]
            if skips:
                self.makeup.residual += 1
                self.makeup.post_norm += any(i in self._normed for i in skips)
        return func(*args, **kwargs)
