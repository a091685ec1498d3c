"""What ``headwise inspect`` looks at: a :class:`headwise.analysis.report.Subject` made from an arena task.

* :func:`demo_subject`: the built-in demo. A 2-layer, 4-head ``mha`` language model (width 32, learned positions,
  no MLP, no short convolution) trained with :func:`headwise.arena.train.train` on the arena's ``induction`` task
  at length 32 for ``steps`` steps (default 800: about a minute on two CPU cores; the loss falls once the model
  finds the previous-token / induction-head circuit). Nothing is downloaded.
* :func:`checkpoint_subject`: a model of an arena task (``task.build(spec)``) with the weights of a checkpoint:
  a :func:`headwise.arena.train.train` checkpoint (``{"model": state_dict, ...}``), a file written by the demo
  (which also records the task, its config and the spec) or a bare ``state_dict``.

Both inspect held-out batches (seed :data:`INSPECT_SEED`) of the task, with the task's loss; the divergence
segment is the first half of the context (``--segment`` in the CLI changes it), the query the last token.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from headwise.analysis.report import Subject

__all__ = ["DEMO_TASK", "DEMO_OVERRIDES", "INSPECT_SEED", "demo_subject", "checkpoint_subject", "task_subject"]

DEMO_TASK = "induction"
DEMO_SPEC = "mha"
# a small LM that learns induction quickly: learned positions so attention alone carries order (no short conv)
DEMO_OVERRIDES = dict(seq_len=32, test_lengths=(32,), conv=0, positions="learned", dim=32, batch=32,
                      eval_examples=200)
INSPECT_SEED = 424242  # the inspected batches come from this seed (not a training seed)


def task_subject(task, model: nn.Module, spec: str, *, batches: int = 2, batch_size: int = 8,
                 segment: slice | None = None, training: dict | None = None) -> Subject:
    """A :class:`Subject` for ``model`` on ``task``: ``batches`` batches of ``batch_size`` examples, the task's
    loss, and (for token inputs) the head divergence when ``segment`` (default: the first half) is removed."""
    data = []
    for i in range(batches):
        batch = task.batch(i, INSPECT_SEED)
        data.append(tuple(t[:batch_size] if isinstance(t, torch.Tensor) else t for t in batch))
    inputs = data[0][0]
    divergence = None
    if inputs.dim() >= 2 and inputs.shape[1] >= 4:
        seg = segment if segment is not None else slice(1, inputs.shape[1] // 2)
        divergence = (model, inputs[: min(4, len(inputs))], seg)
    grid = getattr(model, "grid", None)
    return Subject(
        model=model,
        batches=data,
        forward=lambda b: model(b[0]),
        loss=lambda b: task.loss(model, b),
        name=f"{spec} on {task.name}",
        task=task.describe(),
        training=dict(training or {}),
        grid=tuple(grid) if grid is not None else None,
        prefix=0,
        special_tokens=(0,),
        divergence=divergence,
        icl_dim=task.config.d if task.name == "icl_regression" else None,
    )


def demo_subject(steps: int = 800, *, seed: int = 0, progress: bool = False, save: str | Path | None = None
                 ) -> Subject:
    """Train the demo model (module docstring) and return its :class:`Subject`; ``save`` writes a checkpoint
    that :func:`checkpoint_subject` reloads."""
    from headwise.arena.tasks import get_task
    from headwise.arena.train import train

    task = get_task(DEMO_TASK, quick=True, steps=steps, **DEMO_OVERRIDES)
    torch.manual_seed(seed)
    model = task.build(DEMO_SPEC)
    t0 = time.perf_counter()
    result = train(model, lambda s: task.batch(s, seed), task.loss, steps=steps, lr=task.config.lr,
                   weight_decay=task.config.weight_decay, warmup=task.warmup, seed=seed,
                   progress="demo: training" if progress else False)
    value, details = task.evaluate(model)
    training = {"steps": steps, "seed": seed, "train_s": round(time.perf_counter() - t0, 2),
                "first_loss": round(result.losses[0], 4), "final_loss": round(result.losses[-1], 4),
                task.metric: round(value, 4), **{k: round(v, 4) for k, v in details.items()}}
    if save is not None:
        Path(save).parent.mkdir(parents=True, exist_ok=True)
        torch.save({"model": model.state_dict(), "task": DEMO_TASK, "spec": DEMO_SPEC,
                    "task_config": {**DEMO_OVERRIDES, "steps": steps}, "quick": True}, save)
    return task_subject(task, model.eval(), DEMO_SPEC, training=training)


def checkpoint_subject(path: str | Path, *, task: str | None = None, spec: str | None = None, quick: bool = False,
                       segment: slice | None = None) -> Subject:
    """A :class:`Subject` from a checkpoint (module docstring). ``task`` / ``spec`` are required unless the file
    records them (demo checkpoints); given, they override what it records."""
    from headwise.arena.tasks import get_task

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint {str(path)!r} is not a file")
    state: Any = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {str(path)!r} holds a {type(state).__name__}, not a dict or state_dict")
    weights = state.get("model", state)
    name = task or state.get("task")
    spec = spec or state.get("spec")
    if name is None or spec is None:
        raise ValueError(f"checkpoint {str(path)!r} does not record its task and variant: pass --task and --spec")
    overrides = dict(state.get("task_config", {})) if name == state.get("task") else {}
    t = get_task(name, quick=quick or bool(state.get("quick", False)), **overrides)
    model = t.build(spec)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {str(path)!r} does not fit task {name!r} with spec {spec!r}: missing "
                         f"{list(missing)[:5]}, unexpected {list(unexpected)[:5]}")
    return task_subject(t, model.eval(), spec, segment=segment, training={"checkpoint": str(path)})
