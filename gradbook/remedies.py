"""What to do about a verdict: rules that take the evidence and the model's make-up, and name a remedy.

:func:`prescribe` turns a :class:`gradbook.diagnosis.Diagnosis` (read by its fields: ``verdict``,
``activations``, ``saturated``, ``dead``, ``depth_scales``), the model and its make-up
(:mod:`gradbook.makeup`: normalization, residual additions, attention, the initialization's scale) into an ordered list of
:class:`Remedy`, most promising first. Each rule of :data:`RULES` says for which verdict it applies, when
(a test on the :class:`Facts` of the case), what to do, why, and which chapter of the book explains it;
each remedy links to that chapter's page at its full address (:func:`gradbook.book.page_url`).

Some risks do not show in a gradient profile at all: a post-LN transformer is healthy at initialization and
still diverges in its first steps without learning-rate warm-up (Xiong et al. 2020), attention logits
grow during training until the softmax is one-hot (Wortsman et al. 2023), and a mixed-precision run whose
gradients overflow for real keeps halving its loss scale and skipping steps (Micikevicius et al. 2018).
The rules for these have the verdict ``"caution"``: :func:`cautions` applies them whatever the verdict,
healthy included, and the diagnosis lists them apart from the remedies.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from .book import page_url
from .makeup import Makeup, describe
from .precision import Skips, skips
from .theory import TRAINABLE_DEPTH_SCALES

__all__ = ["Remedy", "Facts", "Rule", "RULES", "prescribe", "cautions", "facts", "SATURATED", "DEAD", "ATTENTION_LOGIT",
           "QK_NORM"]

#: Fraction of an activation's inputs in saturation (phi' < 0.1 gamma) above which a layer is "saturated".
SATURATED = 0.5
#: Fraction of units dead on the whole batch above which a layer is "dying".
DEAD = 0.5
#: Largest attention logit ``|q.k| / sqrt(d_head)`` above which the softmax is nearly one-hot (Wortsman et al.
#: 2023 saw training diverge once logits passed a few tens; they are of order 1 at a default init).
ATTENTION_LOGIT = 30.0


@dataclass
class Remedy:
    """One suggested fix: what to do, why it fits this model, and the book's page that explains it."""

    action: str
    reason: str
    topic: str

    @property
    def page(self) -> str:
        """The full address of the chapter that explains the remedy."""
        return page_url(self.topic)

    def __str__(self) -> str:
        return f"{self.action} ({self.reason}; see {self.page})"


@dataclass
class Facts:
    """What the rules look at: the model's make-up (:class:`gradbook.makeup.Makeup`) and the evidence of
    its diagnosis."""

    recurrent: bool          # an RNN/LSTM/GRU or a module with a ``states`` method
    gated: bool              # an LSTM or GRU
    normed: bool             # batch, layer, group, instance or RMS normalization
    activation_types: set    # lower-case names of the nonlinearities used, as modules or as functions
    saturated: list          # activation layers with more than SATURATED of their inputs in saturation
    dead: list               # activation layers with more than DEAD of their units dead
    time_vanishing: bool     # the gradient through time fades beyond the trainability line
    residual: bool = False   # residual additions x + f(x) seen in the forward pass
    attention: bool = False  # attention: nn.MultiheadAttention modules, or attention weights seen in the forward pass
    attention_logit: float = 0.0   # the largest |q.k|/sqrt(d_head) seen
    attention_entropy: float | None = None   # the smallest mean entropy (nats) of one head's attention weights
    init: str | None = None  # the named initialization the layers match ("he", "xavier", "pytorch-default")
    post_ln: bool = False    # normalizations on the residual stream itself, LN(x + f(x)): post-LN blocks
    skips: Skips | None = None   # the steps AMP's GradScaler skipped in a watched window, if known
    low_precision: tuple = ()    # trainable parameters stored in 16 bits or fewer

    @property
    def relu_like(self) -> bool:
        return bool({"relu", "leakyrelu", "leaky_relu", "elu", "gelu", "relu6", "silu"} & self.activation_types)

    @property
    def sigmoid(self) -> bool:
        return "sigmoid" in self.activation_types

    @property
    def tanh(self) -> bool:
        return "tanh" in self.activation_types

    @property
    def init_fits(self) -> bool:
        """The initialization already matches the nonlinearity (He for ReLU-like, Xavier for tanh)."""
        return (self.relu_like and self.init == "he") or (self.tanh and not self.relu_like and self.init == "xavier")


def facts(diag, model: nn.Module, makeup: Makeup | None = None, skipped=()) -> Facts:
    """The :class:`Facts` of a diagnosis of ``model`` (``makeup``: its observed make-up, if known;
    ``skipped``: which recorded steps AMP skipped, for a diagnosis of a watched window)."""
    m = makeup or describe(model)
    over = lambda values, line: [a for a, v in zip(diag.activations, values) if v > line]   # noqa: E731
    return Facts(recurrent=m.recurrent, gated=m.gated, normed=m.normed, activation_types=m.nonlinearities,
                 saturated=over(diag.saturated, SATURATED), dead=over(diag.dead, DEAD),
                 time_vanishing=diag.depth_scales.get("time", 0.0) < -TRAINABLE_DEPTH_SCALES,
                 residual=m.residual > 0, attention=bool(m.attention) or m.attention_logit is not None,
                 attention_logit=m.attention_logit or 0.0, attention_entropy=m.attention_entropy, init=m.init, post_ln=m.post_ln,
                 skips=skips(skipped) if len(skipped) else None, low_precision=tuple(m.low_precision))


def _span(names: list) -> str:
    return names[0] if len(names) == 1 else f"{names[0]} ... {names[-1]}"


@dataclass
class Rule:
    """A remedy for ``verdict`` when ``when(facts)`` holds; ``reason`` may be a function of the facts."""

    verdict: str
    when: Callable[[Facts], bool]
    action: str
    reason: str | Callable[[Facts], str]
    topic: str

    def remedy(self, f: Facts) -> Remedy:
        return Remedy(self.action, self.reason(f) if callable(self.reason) else self.reason, self.topic)


ALWAYS = lambda f: True   # noqa: E731
#: The remedy for attention logits large enough to make the softmax one-hot (Dehghani et al. 2023).
QK_NORM = "normalize queries and keys before the attention softmax (QK-norm), or lower the learning rate"

#: The rules, in order of priority within each verdict. A rule for "exploding" also serves a loss that is
#: already non-finite at initialization ("non-finite"). To add a symptom, append a Rule.
RULES = [
    # non-finite at initialization
    Rule("non-finite", ALWAYS, "find the overflow in the module named (a log of 0, a division, an exp, or weights far too large)",
         "the loss is not finite before any step, so no gradient can be read", "depth-init"),
    # exploding, recurrent
    Rule("exploding", lambda f: f.recurrent, "clip the gradient by its norm (torch.nn.utils.clip_grad_norm_)",
         "a recurrent layer multiplies the gradient by W_rec at every step", "clipping"),
    Rule("exploding", lambda f: f.recurrent, "initialize W_rec orthogonal, or scale its largest singular value to about 1",
         "growth through time needs gamma * sigma_max(W_rec) > 1", "recurrent-init"),
    Rule("exploding", lambda f: f.recurrent and not f.gated, "use an LSTM or GRU",
         "gates give the gradient a path that neither explodes nor vanishes", "architectures"),
    # exploding, residual or attention
    Rule("exploding", lambda f: f.residual and not f.normed,
         "scale each residual branch down (by 1/sqrt(depth), or zero-initialize its last layer: Fixup)",
         "unnormalized residual blocks add a branch as large as their input, so the stream grows with every block",
         "architectures"),
    Rule("exploding", lambda f: f.attention and f.attention_logit > ATTENTION_LOGIT, QK_NORM,
         lambda f: f"the largest attention logit is {f.attention_logit:.3g}: the softmax is nearly one-hot",
         "transformers"),
    # exploding, feed-forward
    Rule("exploding", lambda f: not f.recurrent and not f.init_fits,
         "scale the initial weights down (He for ReLU, Xavier for tanh)",
         "weights too large multiply the signal by more than one per layer", "depth-init"),
    Rule("exploding", lambda f: not f.recurrent, "clip the gradient by its norm",
         "it bounds every step while the cause is fixed", "clipping"),
    Rule("exploding", lambda f: not f.recurrent and not f.normed, "add batch or layer normalization",
         "it resets the scale at every layer", "batch-norm"),
    Rule("exploding", ALWAYS, "add weight decay",
         "it keeps the weights' norms, and with them the growth, in check", "regularization"),
    # vanishing through time
    Rule("vanishing", lambda f: f.time_vanishing and not f.gated, "use an LSTM or GRU with a positive forget-gate bias",
         "the gradient through time fades over the sequence", "architectures"),
    Rule("vanishing", lambda f: f.time_vanishing,
         "initialize W_rec orthogonal (or identity-scaled) with singular values near 1",
         "sigma_max(W_rec) < 1/gamma guarantees vanishing", "recurrent-init"),
    # vanishing through depth
    Rule("vanishing", lambda f: bool(f.saturated), "use ReLU (with He initialization) instead of sigmoid/tanh",
         lambda f: f"{len(f.saturated)} activation layer(s) saturate ({_span(f.saturated)})", "relu"),
    Rule("vanishing", lambda f: bool(f.saturated) and not f.normed, "add batch normalization before the activations",
         "it keeps the pre-activations out of saturation", "batch-norm"),
    Rule("vanishing", lambda f: bool(f.dead), "lower the learning rate, or use leaky ReLU / ELU",
         lambda f: f"{len(f.dead)} layer(s) have more than half their units dead ({f.dead[0]} ...)", "relu"),
    Rule("vanishing", lambda f: f.relu_like and not f.saturated and f.init != "he",
         "use He initialization (weights with variance 2/fan_in)",
         "ReLU halves the signal's second moment; He's variance restores it per layer", "xavier-he"),
    Rule("vanishing", lambda f: f.sigmoid and not f.saturated,
         "replace sigmoid by tanh (with Xavier initialization) or ReLU (with He initialization)",
         "sigmoid's derivative is at most 1/4, so every sigmoid layer divides the gradient by 4 or more", "activations"),
    Rule("vanishing", lambda f: f.tanh and not f.sigmoid and not f.saturated and f.init != "xavier",
         "use Xavier (Glorot) initialization",
         "with variance 1/fan_in per layer the tanh signal keeps its scale", "xavier-he"),
    Rule("vanishing", lambda f: not f.normed and not f.recurrent, "add batch or layer normalization",
         "it resets the scale at every layer", "batch-norm"),
    Rule("vanishing", lambda f: not f.residual, "add residual connections",
         "an identity path carries the gradient past every layer", "architectures"),
    # cautions: risks that a gradient profile does not show, whatever the verdict
    Rule("caution", lambda f: f.skips is not None and f.skips.collapsed,
         "find the layer whose gradient overflows float16 (gb.watch with level='full'), lower the learning rate, "
         "or train in bfloat16",
         lambda f: f"{f.skips}: the loss scale halved {f.skips.longest_run} times in a row, so the gradients "
                   "overflow at any scale", "precision"),
    Rule("caution", lambda f: bool(f.low_precision),
         "keep the weights in float32 (train under torch.autocast, or let the optimizer update a float32 copy)",
         lambda f: f"{len(f.low_precision)} trainable parameter(s) are stored in 16 bits ({_span(list(f.low_precision))}): "
                   "an update smaller than half a unit in the last place of a weight is rounded away", "precision"),
    Rule("caution", lambda f: f.post_ln,
         "warm the learning rate up over the first steps (gb.fit(..., warmup=...)), or normalize before each "
         "block (pre-LN)",
         "post-LN blocks: the gradients of the last layers are large at initialization, and the first full-size "
         "steps can throw the model off", "transformers"),
    Rule("caution", lambda f: f.attention and f.attention_logit > ATTENTION_LOGIT, QK_NORM,
         lambda f: f"the largest attention logit is {f.attention_logit:.3g}: the attention's softmax is nearly "
                   "one-hot" + ("" if f.attention_entropy is None else
                                f" (the lowest head's mean entropy is {f.attention_entropy:.2g} nats)")
                   + ", and its gradient vanishes", "transformers"),
]


def prescribe(diag, model: nn.Module, makeup: Makeup | None = None) -> list[Remedy]:
    """The remedies for a diagnosis of ``model``, most promising first (none for a healthy model, or one
    whose verdict is "cannot tell"). A non-finite loss gets its own rule, then those for "exploding".
    No remedy is one the model already applies (normalization, residual connections, a fitting init)."""
    f = facts(diag, model, makeup)
    wanted = {diag.verdict} | ({"exploding"} if diag.verdict == "non-finite" else set())
    return [rule.remedy(f) for rule in RULES if rule.verdict in wanted and rule.when(f)]


def cautions(diag, model: nn.Module, makeup: Makeup | None = None, skipped=()) -> list[Remedy]:
    """What to watch for whatever the verdict (the rules of :data:`RULES` whose verdict is ``"caution"``):
    post-LN blocks without warm-up, attention logits large enough to make the softmax one-hot, a collapsing
    loss scale (``skipped``: which recorded steps AMP skipped, as in :class:`gradbook.probe.WatchTrace`)."""
    f = facts(diag, model, makeup, skipped)
    given = {r.action for r in prescribe(diag, model, makeup)}   # said once, as a remedy, where it is one
    return [rule.remedy(f) for rule in RULES if rule.verdict == "caution" and rule.when(f) and rule.action not in given]
