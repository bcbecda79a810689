"""What to do about a verdict: rules that take the evidence and the model's make-up, and name a remedy.

:func:`prescribe` turns a :class:`gradbook.diagnosis.Diagnosis` (read by its fields: ``verdict``,
``activations``, ``saturated``, ``dead``, ``depth_scales``) and the model into an ordered list of
:class:`Remedy`, most promising first. Each rule of :data:`RULES` says for which verdict it applies, when
(a test on the :class:`Facts` of the case), what to do, why, and which chapter of the book explains it;
each remedy links to that chapter's page at its full address (:func:`gradbook.book.page_url`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from .book import page_url
from .records import recurrent_modules
from .theory import TRAINABLE_DEPTH_SCALES

__all__ = ["Remedy", "Facts", "Rule", "RULES", "prescribe", "facts", "SATURATED", "DEAD"]

#: Fraction of an activation's inputs in saturation (phi' < 0.1 gamma) above which a layer is "saturated".
SATURATED = 0.5
#: Fraction of units dead on the whole batch above which a layer is "dying".
DEAD = 0.5


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
    """What the rules look at: the model's make-up and the evidence of its diagnosis."""

    recurrent: bool          # an RNN/LSTM/GRU or a module with a ``states`` method
    gated: bool              # an LSTM or GRU
    normed: bool             # batch, layer or group normalization
    activation_types: set    # class names of the model's modules ("ReLU", "Sigmoid", ...)
    saturated: list          # activation layers with more than SATURATED of their inputs in saturation
    dead: list               # activation layers with more than DEAD of their units dead
    time_vanishing: bool     # the gradient through time fades beyond the trainability line

    @property
    def relu_like(self) -> bool:
        return bool({"ReLU", "LeakyReLU", "ELU", "GELU"} & self.activation_types)

    @property
    def sigmoid(self) -> bool:
        return "Sigmoid" in self.activation_types

    @property
    def tanh(self) -> bool:
        return "Tanh" in self.activation_types


def facts(diag, model: nn.Module) -> Facts:
    """The :class:`Facts` of a diagnosis of ``model``."""
    norms = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)
    over = lambda values, line: [a for a, v in zip(diag.activations, values) if v > line]   # noqa: E731
    return Facts(recurrent=bool(recurrent_modules(model)),
                 gated=any(isinstance(m, (nn.LSTM, nn.GRU, nn.LSTMCell, nn.GRUCell)) for m in model.modules()),
                 normed=any(isinstance(m, norms) for m in model.modules()),
                 activation_types={type(m).__name__ for m in model.modules()},
                 saturated=over(diag.saturated, SATURATED), dead=over(diag.dead, DEAD),
                 time_vanishing=diag.depth_scales.get("time", 0.0) < -TRAINABLE_DEPTH_SCALES)


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

#: The rules, in order of priority within each verdict.
RULES = [
    # exploding, recurrent
    Rule("exploding", lambda f: f.recurrent, "clip the gradient by its norm (torch.nn.utils.clip_grad_norm_)",
         "a recurrent layer multiplies the gradient by W_rec at every step", "clipping"),
    Rule("exploding", lambda f: f.recurrent, "initialize W_rec orthogonal, or scale its largest singular value to about 1",
         "growth through time needs gamma * sigma_max(W_rec) > 1", "recurrent-init"),
    Rule("exploding", lambda f: f.recurrent and not f.gated, "use an LSTM or GRU",
         "gates give the gradient a path that neither explodes nor vanishes", "architectures"),
    # exploding, feed-forward
    Rule("exploding", lambda f: not f.recurrent, "scale the initial weights down (He for ReLU, Xavier for tanh)",
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
    Rule("vanishing", lambda f: f.relu_like and not f.saturated, "use He initialization (weights with variance 2/fan_in)",
         "ReLU halves the signal's second moment; He's variance restores it per layer", "xavier-he"),
    Rule("vanishing", lambda f: f.sigmoid and not f.saturated,
         "replace sigmoid by tanh (with Xavier initialization) or ReLU (with He initialization)",
         "sigmoid's derivative is at most 1/4, so every sigmoid layer divides the gradient by 4 or more", "activations"),
    Rule("vanishing", lambda f: f.tanh and not f.sigmoid and not f.saturated, "use Xavier (Glorot) initialization",
         "with variance 1/fan_in per layer the tanh signal keeps its scale", "xavier-he"),
    Rule("vanishing", lambda f: not f.normed and not f.recurrent, "add batch or layer normalization",
         "it resets the scale at every layer", "batch-norm"),
    Rule("vanishing", ALWAYS, "add residual connections", "an identity path carries the gradient past every layer",
         "architectures"),
]


def prescribe(diag, model: nn.Module) -> list[Remedy]:
    """The remedies for a diagnosis of ``model``, most promising first (none for a healthy model)."""
    f = facts(diag, model)
    return [rule.remedy(f) for rule in RULES if rule.verdict == diag.verdict and rule.when(f)]
