"""Send what :class:`gradbook.watch.watch` records to where practitioners already look.

Each exporter is a callable that :class:`~gradbook.watch.watch` calls, on rank 0 only, with a
:class:`gradbook.probe.StepRecord` each time a recorded step closes::

    writer = SummaryWriter("runs/exp1")
    with gb.watch(model, optimizer=opt, export=gb.export.TensorBoard(writer)) as w:
        ...

* :class:`TensorBoard`: scalars per layer (and histograms of each layer's gradient, when asked) to a
  ``torch.utils.tensorboard.SummaryWriter`` (the ``tensorboard`` extra: ``pip install "gradbook[tensorboard]"``);
* :class:`Scalars`: the same scalars, as one flat dict per step, to any ``log(scalars, step=step)``
  (``wandb.log``, ``mlflow.log_metrics``, a list's ``append`` through a lambda);
* :func:`lightning_callback`: a PyTorch Lightning callback that watches the module a ``Trainer`` fits and
  logs to the trainer's logger (the ``lightning`` extra: ``pip install "gradbook[lightning]"``).

The scalars' names: ``gradbook/grad_norm/<layer>``, ``gradbook/update_ratio/<layer>``,
``gradbook/total_grad_norm``, ``gradbook/loss``, ``gradbook/skipped`` and ``gradbook/spike`` (1 at a step
where a spike was flagged, else 0).
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from .probe import StepRecord
from .watch import watch

__all__ = ["scalars", "TensorBoard", "Scalars", "lightning_callback", "PREFIX"]

#: The first part of every name gradbook writes.
PREFIX = "gradbook"


def scalars(record: StepRecord, prefix: str = PREFIX) -> dict[str, float]:
    """One recorded step as a flat {name: number} dict (NaN values, a loss never logged, left out)."""
    out = {f"{prefix}/grad_norm/{n}": float(v) for n, v in zip(record.layers, record.weight_grad_norm)}
    if record.update_ratio is not None:
        out.update({f"{prefix}/update_ratio/{n}": float(v) for n, v in zip(record.layers, record.update_ratio)})
    out[f"{prefix}/total_grad_norm"] = record.total_grad_norm
    out[f"{prefix}/loss"] = record.loss
    out[f"{prefix}/skipped"] = float(record.skipped)
    out[f"{prefix}/spike"] = float(bool(record.spikes))
    return {k: v for k, v in out.items() if not math.isnan(v)}


class Scalars:
    """An exporter that calls ``log(scalars, step=step)`` with :func:`scalars` of each recorded step."""

    def __init__(self, log: Callable, prefix: str = PREFIX):
        if not callable(log):
            raise TypeError(f"Scalars needs a callable log(scalars, step=...), got {type(log).__name__}")
        self.log, self.prefix = log, prefix

    def __call__(self, record: StepRecord) -> None:
        self.log(scalars(record, self.prefix), step=record.step)


def _summary_writer():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:   # torch's module needs the tensorboard package
        raise ImportError('exporting to TensorBoard needs the tensorboard package: '
                          'pip install "gradbook[tensorboard]"') from e
    return SummaryWriter


class TensorBoard:
    """An exporter writing each recorded step's scalars (and, with ``histograms=True``, a histogram of
    each layer's weight gradient) to a ``SummaryWriter``, or to a new one in ``log_dir`` given as a path.
    Writing to a writer that was closed raises ``RuntimeError`` (torch would silently open a new event
    file); ``close()`` flushes and closes a writer this exporter opened."""

    def __init__(self, writer, histograms: bool = False, prefix: str = PREFIX):
        SummaryWriter = _summary_writer()
        self.owns = not isinstance(writer, SummaryWriter)
        self.writer = SummaryWriter(str(writer)) if self.owns else writer
        self.histograms, self.prefix = bool(histograms), prefix
        from tensorboard.compat.proto.summary_pb2 import Summary
        self._summary = Summary

    def __call__(self, record: StepRecord) -> None:
        if getattr(self.writer, "all_writers", True) is None:
            raise RuntimeError(f"the SummaryWriter of {self.writer.log_dir!r} is closed: gradbook cannot export "
                               "to it; open a new writer, or leave the watch before closing it")
        values = [self._summary.Value(tag=k, simple_value=v) for k, v in scalars(record, self.prefix).items()]
        # one event holding every scalar of the step (TensorBoard reads each tag as add_scalar's would be)
        self.writer._get_file_writer().add_summary(self._summary(value=values), record.step)
        if self.histograms:
            for name, module in zip(record.layers, record.modules):
                grads = [p.grad.detach().reshape(-1) for p in module.parameters() if p.grad is not None]
                if grads:
                    values = torch.cat([g.to_local() if hasattr(g, "to_local") else g for g in grads])
                    self.writer.add_histogram(f"{self.prefix}/grad/{name}", values.float().cpu(), record.step)

    def close(self) -> None:
        if self.owns:
            self.writer.close()


def _lightning_callback_class():
    try:
        from lightning.pytorch import Callback
    except ImportError:
        try:
            from pytorch_lightning import Callback
        except ImportError as e:
            raise ImportError('the Lightning callback needs PyTorch Lightning: pip install "gradbook[lightning]"') from e

    class GradbookCallback(Callback):
        """Watch the LightningModule a Trainer fits (its first optimizer's steps; the loss of each
        training step), and log the scalars to the trainer's logger. ``callback.trace`` after fitting.
        ``level="full"`` needs ``training_step`` to call the module itself (``self(x)``), whose forward
        pass gradbook hooks; the default, ``"norms"``, works whatever it calls."""

        def __init__(self, **watch_kwargs):
            self.watch_kwargs = {"level": "norms", **watch_kwargs}
            self.watch = self.trace = None

        def _log(self, trainer, record: StepRecord) -> None:
            if trainer.logger is not None:
                trainer.logger.log_metrics(scalars(record), step=record.step)

        def on_fit_start(self, trainer, pl_module) -> None:
            extra = list(self.watch_kwargs.pop("export", []))
            self.watch = watch(pl_module, optimizer=trainer.optimizers[0],
                               export=[*extra, lambda r: self._log(trainer, r)], **self.watch_kwargs).attach()

        def on_before_backward(self, trainer, pl_module, loss) -> None:
            if self.watch is not None:
                self.watch.log_loss(loss)

        def _stop(self) -> None:
            if self.watch is not None:
                self.watch.detach()
                self.trace, self.watch = self.watch.trace, None

        def on_fit_end(self, trainer, pl_module) -> None:
            self._stop()

        def on_exception(self, trainer, pl_module, exception) -> None:
            self._stop()

    return GradbookCallback


def lightning_callback(**watch_kwargs):
    """A ``lightning.pytorch.Callback`` (or ``pytorch_lightning``'s) that runs :class:`gradbook.watch.watch`
    (with ``watch_kwargs``: ``every``, ``level``, ``spikes``, ``export``, ...) while a Trainer fits, and
    logs :func:`scalars` to the trainer's logger; after fitting, ``callback.trace`` is the record.
    ``ImportError`` naming the extra when Lightning is not installed."""
    return _lightning_callback_class()(**watch_kwargs)
