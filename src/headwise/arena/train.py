"""The arena's training loop: AdamW with linear warm-up and a cosine schedule, deterministic and resumable.

:func:`train` takes a model, a batch function and a loss function, so it knows nothing of tasks and can be
wrapped for data parallelism (pass a ``DistributedDataParallel`` model and a ``batch_fn`` that returns the rank's
shard; only the process with ``is_main=True`` writes checkpoints and shows progress):

* ``batch_fn(step) -> batch`` must be a pure function of the step (the tasks seed a generator from
  ``(seed, step)``), so a resumed run sees exactly the batches it would have seen.
* ``loss_fn(model, batch) -> scalar`` (the tasks add their mixers' ``aux_loss``).
* the learning rate of step ``t`` (0-based) is :func:`cosine_lr`: linear warm-up over ``warmup`` steps to ``lr``,
  then a cosine decay to 0 at ``steps``; it is computed from ``t``, so there is no scheduler state.
* ``checkpoint``: a path; the model, the optimizer, the step, the losses, the elapsed time and the global torch
  RNG state are saved every ``checkpoint_every`` steps, when training ends, and when it is interrupted
  (``KeyboardInterrupt``, or any exception from a step: the state saved is the one after the last finished
  step). A later call with the same arguments loads it and continues; the result is bit-identical to an
  uninterrupted run (tested). A checkpoint written with other ``steps``/``lr``/``weight_decay``/``warmup``/
  ``seed`` is refused with a clear error.

>>> import torch
>>> model = torch.nn.Linear(3, 1)                                    # fit y = x . (1, 2, 3)
>>> def batch(step):
...     x = torch.randn(16, 3, generator=torch.Generator().manual_seed(step))
...     return x, x @ torch.tensor([[1.0], [2.0], [3.0]])
>>> mse = lambda model, b: (model(b[0]) - b[1]).pow(2).mean()
>>> result = train(model, batch, mse, steps=200, lr=0.1, seed=0)
>>> result.steps, result.losses[-1] < 0.01 * result.losses[0]
(200, True)
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from headwise.checks import check_positive_int
from headwise.distributed.sharding import collective, world_and_rank
from headwise.parallel.data import DataParallel, shard_batch

__all__ = ["cosine_lr", "train", "TrainResult", "progress_bar", "data_parallel_train"]


def cosine_lr(step: int, *, steps: int, lr: float, warmup: int = 0) -> float:
    """Learning rate of 0-based ``step``: ``lr * (step + 1) / warmup`` during warm-up, then
    ``lr * (1 + cos(pi * p)) / 2`` with ``p = (step - warmup) / (steps - warmup)``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    p = (step - warmup) / max(1, steps - warmup)
    return lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, p)))


@dataclass
class TrainResult:
    """What :func:`train` measured."""

    steps: int  # steps trained in total (over resumed calls)
    losses: list[float] = field(default_factory=list)  # training loss of every step
    train_s: float = 0.0  # wall-clock seconds of the steps (summed over resumed calls)
    items: int = 0  # tokens (or whatever ``items_fn`` counts) processed
    resumed_from: int = 0  # the step this call started from (0: fresh)

    @property
    def items_per_s(self) -> float | None:
        return self.items / self.train_s if self.train_s > 0 else None


def progress_bar():
    """A transient rich progress bar with a live ``loss`` field (``bar.update(job, advance=1, loss=...)``)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                    transient=True)


def _save(path: Path, state: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: an interruption while saving leaves the previous checkpoint


def train(
    model: nn.Module,
    batch_fn: Callable[[int], Any],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    *,
    steps: int,
    lr: float,
    weight_decay: float = 0.0,
    warmup: int = 0,
    seed: int = 0,
    clip: float | None = 1.0,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    items_fn: Callable[[Any], int] | None = None,
    progress: bool | str = False,
    is_main: bool = True,
    max_seconds: float | None = None,
) -> TrainResult:
    """Train ``model`` for ``steps`` AdamW steps on ``batch_fn(step)`` (module docstring); returns a
    :class:`TrainResult`. ``clip``: global gradient-norm clipping (None: off). ``items_fn(batch)``: tokens in a
    batch, for throughput. ``progress``: show a progress bar with the live loss (a string: its label).
    ``max_seconds``: raise :class:`TimeoutError` (after checkpointing) once the steps have taken that long in
    total; a later call with a larger budget resumes."""
    check_positive_int("steps", steps)
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr=}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or not 0 <= warmup < steps:
        raise ValueError(f"warmup must be an int in [0, steps), got {warmup=} for {steps=}")
    if checkpoint_every is not None:
        check_positive_int("checkpoint_every", checkpoint_every)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]  # matrices decay; biases, norms and scalars do not
    rest = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98))
    fingerprint = dict(steps=steps, lr=lr, weight_decay=weight_decay, warmup=warmup, seed=seed)
    result = TrainResult(steps=0)
    path = Path(checkpoint) if checkpoint is not None else None
    torch.manual_seed(seed)
    if path is not None and path.exists():
        state = torch.load(path, weights_only=False)
        if state["fingerprint"] != fingerprint:
            raise ValueError(f"checkpoint {str(path)!r} was written with {state['fingerprint']}, not {fingerprint}; "
                             f"delete it or use another output folder")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        result = TrainResult(steps=state["step"], losses=list(state["losses"]), train_s=state["train_s"],
                             items=state["items"], resumed_from=state["step"])

    def save(rng: torch.Tensor | None = None) -> None:
        if path is not None and is_main:
            path.parent.mkdir(parents=True, exist_ok=True)
            _save(path, {"fingerprint": fingerprint, "model": model.state_dict(), "optimizer": opt.state_dict(),
                         "rng": torch.get_rng_state() if rng is None else rng, "step": result.steps,
                         "losses": result.losses,
                         "train_s": result.train_s, "items": result.items})

    bar = progress_bar() if progress and is_main else None
    model.train()
    last_saved = result.steps
    rng_before, updating = torch.get_rng_state(), False
    try:
        if bar is not None:
            bar.start()
            job = bar.add_task(progress if isinstance(progress, str) else "train", total=steps,
                               completed=result.steps, loss="-")
        for step in range(result.steps, steps):
            t0 = time.perf_counter()
            rng_before = torch.get_rng_state()
            batch = batch_fn(step)
            for group in opt.param_groups:
                group["lr"] = cosine_lr(step, steps=steps, lr=lr, warmup=warmup)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model, batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {loss.item()} at {step=}")
            loss.backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(params, clip)
            updating = True  # from here until the step is booked, model and optimizer are mid-update
            opt.step()
            result.train_s += time.perf_counter() - t0
            result.losses.append(loss.item())
            result.items += items_fn(batch) if items_fn is not None else 0
            result.steps = step + 1
            updating, rng_before = False, torch.get_rng_state()
            if bar is not None:
                bar.update(job, advance=1, loss=f"{result.losses[-1]:.4f}")
            if checkpoint_every is not None and result.steps % checkpoint_every == 0:
                save()
                last_saved = result.steps
            if max_seconds is not None and result.train_s > max_seconds and result.steps < steps:
                raise TimeoutError(f"training used its {max_seconds:g} s budget at step {result.steps} of {steps}")
    except BaseException:
        if result.steps != last_saved and not updating:
            save(rng_before)  # the state after the last finished step: a rerun resumes from here
        raise
    finally:
        if bar is not None:
            bar.stop()
    if result.steps != last_saved or path is not None and not path.exists():
        save()
    return result


def data_parallel_train(model: nn.Module, batch_fn: Callable[[int], Any], loss_fn: Callable, *, group=None,
                        **train_kwargs):
    """:func:`train` with data parallelism over ``group`` when torch.distributed runs with more
    than one rank (otherwise exactly ``train``).

    ``batch_fn(step)`` returns the global batch (the same on every rank: a pure function of the step); each rank
    trains on its slice (:func:`headwise.parallel.shard_batch`) of a :class:`~headwise.parallel.DataParallel` (DDP) model, whose gradients are averaged
    over the ranks: with a loss that is a mean over equally weighted examples, the parameters after each step
    equal single-process training on the whole batch (tested). Only rank 0 writes the checkpoint; every rank
    reads it when resuming (a shared filesystem path). The model's parameters are broadcast from rank 0 when
    wrapped. Returns the :class:`TrainResult` (losses: this rank's slice).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return train(model, batch_fn, loss_fn, **train_kwargs)
    _, rank = world_and_rank(group)
    ddp = DataParallel(model, process_group=group)
    if train_kwargs.get("checkpoint") is not None:  # rank 0 has finished writing (also after an interruption)
        collective("data_parallel_train", "barrier", group, dist.barrier)
    result = train(ddp, lambda step: shard_batch(batch_fn(step), group), loss_fn, is_main=rank == 0,
                   **train_kwargs)
    if train_kwargs.get("checkpoint") is not None:  # the final checkpoint exists before anyone reads it
        collective("data_parallel_train", "barrier", group, dist.barrier)
    return result
