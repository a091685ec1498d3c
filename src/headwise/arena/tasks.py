"""Arena tasks: the data generators of :mod:`headwise.arena.data` wrapped with a model, a loss, a metric and an
evaluation, behind a name registry (``get_task("mqar")``).

A :class:`Task` has a ``Config`` dataclass (data, model and training preset; ``get_task(name, quick=True,
**overrides)``) and:

* ``build(spec)`` -> the task's model with every layer's mixer from ``spec`` (one spec or one per layer; raises
  :class:`headwise.arena.models.Unsupported` naming why a variant cannot serve), ``check(spec)`` -> that reason
  or None;
* ``batch(step, seed)``: the training batch of a step, a pure function of ``(seed, step)``; ``loss(model,
  batch)`` (plus the mixers' ``aux_loss`` times ``AUX_WEIGHT``); ``items(batch)``: tokens in it;
* ``evaluate(model)`` -> ``(value, details)`` on a held-out set that is the same for every variant and seed.

Registered: ``mqar``, ``icl_regression``, ``induction``, ``passkey``, ``fashion_mnist``, ``text``, ``listops``.
``TASKS`` maps names to classes; :func:`register_task` adds one.

>>> task = get_task("mqar", quick=True)
>>> model = task.build("mha")
>>> value, details = task.evaluate(model)          # accuracy, {"acc@4": ..., "acc@8": ..., "acc@16": ...}
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from headwise.arena import data
from headwise.arena.models import (Block, Unsupported, plan_layers, aux_loss, build_lm, build_regression, build_vit)

__all__ = ["Task", "TASKS", "register_task", "get_task", "available_tasks", "AUX_WEIGHT", "EVAL_SEED"]

TASKS: dict[str, type["Task"]] = {}
AUX_WEIGHT = 0.01  # weight of a mixer's aux_loss (MoH's beta = 0.01)
EVAL_SEED = 1_000_003  # the held-out data of every task comes from this seed (same for all variants and seeds)


def register_task(name: str):
    """Class decorator: register a :class:`Task` subclass under ``name``."""

    def deco(cls):
        if name in TASKS and TASKS[name] is not cls:
            raise ValueError(f"task {name=} is already registered to {TASKS[name].__qualname__}")
        cls.name = name
        TASKS[name] = cls
        return cls

    return deco


def available_tasks() -> list[str]:
    return sorted(TASKS)


def get_task(name: str, *, quick: bool = False, **overrides: Any) -> "Task":
    """The task ``name`` with its quick or full preset and ``overrides`` of its ``Config`` fields."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name=}; available: {', '.join(available_tasks())}")
    return TASKS[name](quick=quick, **overrides)


def _generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed((int(seed) << 32) + int(step) + 1)


class Task:
    """Base class (module docstring). Subclasses set ``metric``, ``higher_is_better``, ``Config``, ``QUICK``
    (overrides for ``quick=True``) and implement ``build``, ``batch``, ``loss`` and ``evaluate``."""

    name: ClassVar[str] = ""
    metric: ClassVar[str] = ""
    higher_is_better: ClassVar[bool] = True
    QUICK: ClassVar[dict] = {}

    @dataclass
    class Config:
        steps: int = 1000  # training steps
        batch: int = 64  # examples per step
        lr: float = 1e-3  # peak AdamW learning rate
        weight_decay: float = 0.1  # AdamW weight decay (matrices only)
        warmup: int = 100  # linear warm-up steps (clipped to steps // 10)

    def __init__(self, *, quick: bool = False, **overrides: Any):
        names = {f.name for f in dataclasses.fields(self.Config)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ValueError(f"unknown config key(s) {unknown} for task {self.name!r}; valid keys: {sorted(names)}")
        self.quick = quick
        self.config = self.Config(**{**(self.QUICK if quick else {}), **overrides})

    @property
    def warmup(self) -> int:
        return min(self.config.warmup, self.config.steps // 10)

    def check(self, spec) -> str | None:
        """Why ``spec`` cannot serve this task, or None."""
        try:
            self.plan(spec)
        except Unsupported as e:
            return str(e)
        return None

    def plan(self, spec) -> None:  # cheap default: build once
        self.build(spec)

    def build(self, spec) -> nn.Module:
        raise NotImplementedError

    def batch(self, step: int, seed: int):
        raise NotImplementedError

    def loss(self, model: nn.Module, batch) -> Tensor:
        raise NotImplementedError

    def items(self, batch) -> int:
        return batch[0].shape[0] * batch[0].shape[1]

    def evaluate(self, model: nn.Module) -> tuple[float, dict]:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"task": self.name, "quick": self.quick, **dataclasses.asdict(self.config)}


def _with_aux(model: nn.Module, loss: Tensor) -> Tensor:
    extra = aux_loss(model)
    return loss if extra is None else loss + AUX_WEIGHT * extra


def _token_loss(model: nn.Module, inputs: Tensor, targets: Tensor) -> Tensor:
    logits = model(inputs)  # (B, N, V)
    return _with_aux(model, F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=data.IGNORE_INDEX))


@torch.no_grad()
def _token_accuracy(model: nn.Module, inputs: Tensor, targets: Tensor, *, chunk: int = 256,
                    whole_row: bool = False) -> Tensor:
    """Per example: fraction (or, ``whole_row``, all) of labelled positions predicted right, ``[B]``."""
    out = []
    for i in range(0, len(inputs), chunk):
        x, t = inputs[i:i + chunk], targets[i:i + chunk]
        pred = model(x).argmax(-1)  # (b, N)
        labelled = t != data.IGNORE_INDEX
        right = (pred == t) & labelled
        if whole_row:
            out.append((right.sum(1) == labelled.sum(1)).double())
        else:
            out.append(right.sum(1).double() / labelled.sum(1).clamp_min(1))
    return torch.cat(out)


class LMTask(Task):
    """A token task on the decoder-only LM (:func:`headwise.arena.models.build_lm`)."""

    vocab: ClassVar[int] = 256

    @dataclass
    class Config(Task.Config):
        seq_len: int = 64  # tokens per training example
        dim: int = 64  # model width
        depth: int = 2  # layers
        heads: int = 4  # heads (variants that take heads=)
        mlp: bool = False  # MLP after each mixer
        conv: int = 3  # short causal depthwise conv kernel before each mixer (0: none)
        positions: str = "learned"  # "learned" (up to the longest length used), "sinusoidal" or "none"

    def lengths(self) -> tuple[int, ...]:
        """Every sequence length the model sees (training and evaluation)."""
        return (self.config.seq_len,)

    def plan(self, spec) -> None:
        c = self.config
        for n in sorted(set(self.lengths())):  # a mixer tied to one length must fail here, not mid-evaluation
            plan_layers(spec, c.depth, dim=c.dim, heads=c.heads, seq_len=n, causal=True)

    def build(self, spec) -> nn.Module:
        c = self.config
        return build_lm(spec, vocab=self.vocab, dim=c.dim, depth=c.depth, heads=c.heads, max_len=max(self.lengths()),
                        mlp=c.mlp, conv=c.conv, positions=c.positions)

    def loss(self, model, batch) -> Tensor:
        return _token_loss(model, batch[0], batch[1])


@register_task("mqar")
class MQAR(LMTask):
    """Multi-query associative recall (Zoology): accuracy over the query positions of a held-out set mixing
    4, 8 and 16 key-value pairs (details: ``acc@P`` per pair count). Quick preset as in the issue: vocab 256,
    length 64, 2 layers, d 64, short conv (kernel 3), fresh samples every step, 2000 steps; no MLP (Zoology's MQAR
    models use no state mixer)."""

    metric = "accuracy"
    QUICK = dict(steps=2000)

    @dataclass
    class Config(LMTask.Config):
        steps: int = 6000  # training steps (fresh samples every step)
        batch: int = 64  # examples per step, split evenly over the pair counts
        lr: float = 3e-3  # peak AdamW learning rate
        vocab: int = 256  # vocabulary (keys from the lower half, values from the upper)
        pairs: tuple = (4, 8, 16)  # key-value pair counts mixed in each batch
        eval_examples: int = 1500  # held-out examples (split over the pair counts)

    def __init__(self, **kw):
        super().__init__(**kw)
        self.vocab = self.config.vocab

    def batch(self, step, seed):
        c = self.config
        x, y, _ = data.mqar_mixed_batch(c.batch, pairs=tuple(c.pairs), vocab=c.vocab, seq_len=c.seq_len,
                                        generator=_generator(seed, step))
        return x, y

    def evaluate(self, model):
        c = self.config
        x, y, counts = data.mqar_mixed_batch(c.eval_examples, pairs=tuple(c.pairs), vocab=c.vocab,
                                             seq_len=c.seq_len, generator=_generator(EVAL_SEED, 0))
        model.eval()
        acc = _token_accuracy(model, x, y)  # (B,) every row has P labels, so the mean over rows is per query
        details = {f"acc@{p}": acc[counts == p].mean().item() for p in c.pairs}
        return acc.mean().item(), details


@register_task("icl_regression")
class ICLRegression(Task):
    """In-context linear regression (He et al., "In-Context Linear Regression Demystified", 2025): d = 5, 40
    context pairs, noise variance 0.1, the one-layer ``heads``-head regression transformer
    (:class:`headwise.arena.models.RegressionTransformer`), squared loss on the query's noisy label. Metric: test
    MSE at 40 pairs; details: the ridge (Bayes-optimal), one-step-GD and zero baselines on the same test set, and
    ``mse@n`` for n = 10 .. 100 context pairs (length generalisation)."""

    metric = "mse"
    higher_is_better = False
    QUICK = dict(steps=2000)

    @dataclass
    class Config(Task.Config):
        steps: int = 6000  # training steps (fresh tasks every step)
        batch: int = 256  # regression tasks per step
        lr: float = 3e-3  # peak AdamW learning rate
        weight_decay: float = 0.0  # AdamW weight decay
        d: int = 5  # covariate dimension
        num_context: int = 40  # context pairs in training
        noise_var: float = 0.1  # label noise variance
        heads: int = 4  # heads H (variants that take heads=)
        dim: int = 8  # token width after zero-padding d + 1
        eval_tasks: int = 4000  # held-out tasks per context length
        eval_lengths: tuple = (10, 20, 40, 60, 80, 100)  # context lengths of the length-generalisation sweep

    def plan(self, spec):
        self.build(spec)

    def build(self, spec):
        c = self.config
        return build_regression(spec, d=c.d, heads=c.heads, num_context=c.num_context, dim=c.dim)

    def _data(self, n, generator, batch):
        c = self.config
        x, y, _ = data.icl_regression_batch(batch, dim=c.d, num_context=n, noise_var=c.noise_var, generator=generator)
        return data.icl_tokens(x, y), y[:, -1], x, y

    def batch(self, step, seed):
        tokens, target, _, _ = self._data(self.config.num_context, _generator(seed, step), self.config.batch)
        return tokens, target

    def loss(self, model, batch):
        return _with_aux(model, F.mse_loss(model(batch[0]), batch[1]))

    @torch.no_grad()
    def evaluate(self, model):
        c = self.config
        model.eval()
        details = {"ridge": None, "gd_one_step": None, "zero": None}
        value = None
        for n in sorted({*c.eval_lengths, c.num_context}):
            tokens, target, x, y = self._data(n, _generator(EVAL_SEED, n), c.eval_tasks)
            try:
                mse = F.mse_loss(model(tokens), target).item()
            except Exception:  # a mixer tied to the training length (e.g. a token MLP) cannot run here
                if n == c.num_context:
                    raise
                mse = None
            details[f"mse@{n}"] = mse
            if n == c.num_context:
                value = mse
                for name, fn in (("ridge", data.ridge_predict), ("gd_one_step", data.gd_one_step_predict)):
                    details[name] = F.mse_loss(fn(x, y, noise_var=c.noise_var), target).item()
                details["zero"] = F.mse_loss(data.zero_predict(x, y), target).item()
        return value, details


@register_task("induction")
class Induction(LMTask):
    """Induction-head copying trained at length 64 and tested at 128 and 256 (value: mean accuracy at the test
    lengths; details ``acc@L`` incl. the training length). Default positions ``"none"`` with a short conv, so
    nothing ties the model to the training length (learned positions cannot extend past it; pass
    ``positions="sinusoidal"`` to compare schemes)."""

    metric = "accuracy"
    vocab = 16
    QUICK = dict(steps=600)

    @dataclass
    class Config(LMTask.Config):
        steps: int = 2000  # training steps
        batch: int = 64  # sequences per step
        lr: float = 3e-3  # peak AdamW learning rate
        test_lengths: tuple = (128, 256)  # longer test lengths
        positions: str = "none"  # "learned" (untrained past seq_len), "sinusoidal" or "none"
        eval_examples: int = 500  # held-out sequences per length

    def lengths(self):
        return (self.config.seq_len, *self.config.test_lengths)

    def batch(self, step, seed):
        return data.induction_batch(self.config.batch, seq_len=self.config.seq_len, vocab=self.vocab,
                                    generator=_generator(seed, step))

    def evaluate(self, model):
        c = self.config
        model.eval()
        details = {}
        for n in (c.seq_len, *c.test_lengths):
            x, y = data.induction_batch(c.eval_examples, seq_len=n, vocab=self.vocab,
                                        generator=_generator(EVAL_SEED, n))
            details[f"acc@{n}"] = _token_accuracy(model, x, y).mean().item()
        return sum(details[f"acc@{n}"] for n in c.test_lengths) / len(c.test_lengths), details


@register_task("passkey")
class Passkey(LMTask):
    """Passkey retrieval: trained at ``seq_len`` with the key at a uniform depth; value: fraction of examples
    whose whole key is right, averaged over the grid ``lengths x depths`` (details ``acc@L/depth``)."""

    metric = "accuracy"
    vocab = data.PASSKEY_VOCAB
    QUICK = dict(steps=600)

    @dataclass
    class Config(LMTask.Config):
        steps: int = 2000  # training steps
        batch: int = 32  # sequences per step
        lr: float = 3e-3  # peak AdamW learning rate
        seq_len: int = 128  # training length
        key_len: int = 4  # digits in the key
        lengths: tuple = (64, 128, 256)  # evaluation context lengths
        depths: tuple = (0.0, 0.25, 0.5, 0.75, 1.0)  # evaluation needle depths
        positions: str = "none"  # "learned" (untrained past seq_len), "sinusoidal" or "none"
        eval_examples: int = 100  # held-out sequences per grid cell

    def lengths(self):
        return (self.config.seq_len, *self.config.lengths)

    def batch(self, step, seed):
        c = self.config
        return data.passkey_batch(c.batch, seq_len=c.seq_len, key_len=c.key_len, generator=_generator(seed, step))

    def evaluate(self, model):
        c = self.config
        model.eval()
        details = {}
        for n in c.lengths:
            for i, f in enumerate(c.depths):
                x, y = data.passkey_batch(c.eval_examples, seq_len=n, depth=f, key_len=c.key_len,
                                          generator=_generator(EVAL_SEED, n * 100 + i))
                details[f"acc@{n}/{f:g}"] = _token_accuracy(model, x, y, whole_row=True).mean().item()
        return sum(details.values()) / len(details), details


@register_task("text")
class Text(LMTask):
    """Byte-level language modelling on CPython's ``pydoc_data`` topics (offline English text); value: bits per
    byte on the held-out split (its first ``eval_windows`` non-overlapping windows)."""

    metric = "bits_per_byte"
    higher_is_better = False
    vocab = data.TEXT_VOCAB
    QUICK = dict(steps=500, eval_windows=64)

    @dataclass
    class Config(LMTask.Config):
        steps: int = 3000  # training steps
        batch: int = 32  # windows per step
        lr: float = 2e-3  # peak AdamW learning rate
        seq_len: int = 128  # bytes per window
        mlp: bool = True  # MLP after each mixer
        eval_windows: int = 256  # held-out windows

    def __init__(self, **kw):
        super().__init__(**kw)
        self._train = self._val = None

    def batch(self, step, seed):
        if self._train is None:
            self._train = data.text_corpus("train")
        return data.text_batch(self._train, self.config.batch, seq_len=self.config.seq_len,
                               generator=_generator(seed, step))

    @torch.no_grad()
    def evaluate(self, model):
        if self._val is None:
            self._val = data.text_corpus("val")
        x, y = data.text_windows(self._val, seq_len=self.config.seq_len)
        x, y = x[: self.config.eval_windows], y[: self.config.eval_windows]
        model.eval()
        nats = sum(F.cross_entropy(model(x[i:i + 64]).flatten(0, 1), y[i:i + 64].flatten(), reduction="sum").item()
                   for i in range(0, len(x), 64))
        bpb = nats / y.numel() / torch.log(torch.tensor(2.0)).item()
        return bpb, {"bytes": y.numel()}


class SequenceClassifier(nn.Module):
    """Token embedding + learned positions, non-causal pre-norm blocks, mean over non-padding tokens, linear
    head: ``tokens [B, N]`` (0 = padding) -> logits ``[B, classes]``. Padding tokens are seen by the mixers (no
    key mask: not every variant takes one) but excluded from the pooling."""

    def __init__(self, plans, *, vocab: int, dim: int, max_len: int, classes: int, mlp: bool = True):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(max_len, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(p, dim, layer=i, depth=len(plans), mlp=mlp) for i, p in enumerate(plans))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]  # (B, N, C)
        for block in self.blocks:
            x = block(x)
        keep = (tokens != 0).unsqueeze(-1).to(x.dtype)  # (B, N, 1)
        pooled = (self.norm(x) * keep).sum(1) / keep.sum(1).clamp_min(1)  # (B, C)
        return self.head(pooled)  # (B, classes)


def _class_loss(model, batch):
    return _with_aux(model, F.cross_entropy(model(batch[0]), batch[1]))


@torch.no_grad()
def _class_accuracy(model, x, y, chunk=500):
    model.eval()
    right = sum((model(x[i:i + chunk]).argmax(-1) == y[i:i + chunk]).sum().item() for i in range(0, len(x), chunk))
    return right / len(x)


@register_task("listops")
class ListOps(Task):
    """LRA ListOps (generated offline) as sequence classification into 10 values; value: held-out accuracy. The
    quick preset uses the short expressions of ``LISTOPS_QUICK`` (length < 128)."""

    metric = "accuracy"
    QUICK = dict(steps=500, **data.LISTOPS_QUICK)

    @dataclass
    class Config(Task.Config):
        steps: int = 5000  # training steps
        batch: int = 32  # expressions per step
        lr: float = 1e-3  # peak AdamW learning rate
        max_depth: int = 10  # expression depth (LRA: 10)
        max_args: int = 10  # operator arguments (LRA: 10)
        min_len: int = 500  # shortest expression (exclusive; LRA: 500)
        max_len: int = 2000  # longest expression (exclusive) and padded length (LRA: 2000)
        dim: int = 64  # model width
        depth: int = 2  # layers
        heads: int = 4  # heads
        mlp: bool = True  # MLP after each mixer
        eval_examples: int = 500  # held-out expressions

    def _gen(self):
        c = self.config
        return dict(max_depth=c.max_depth, max_args=c.max_args, min_len=c.min_len, max_len=c.max_len)

    def plan(self, spec):
        c = self.config
        plan_layers(spec, c.depth, dim=c.dim, heads=c.heads, seq_len=c.max_len)

    def build(self, spec):
        c = self.config
        plans = plan_layers(spec, c.depth, dim=c.dim, heads=c.heads, seq_len=c.max_len)
        return SequenceClassifier(plans, vocab=data.LISTOPS_VOCAB, dim=c.dim, max_len=c.max_len, classes=10,
                                  mlp=c.mlp)

    def batch(self, step, seed):
        return data.listops_batch(self.config.batch, **self._gen(), generator=_generator(seed, step))

    loss = staticmethod(_class_loss)

    def evaluate(self, model):
        x, y = data.listops_batch(self.config.eval_examples, **self._gen(), generator=_generator(EVAL_SEED, 0))
        return _class_accuracy(model, x, y), {}


_FASHION: dict[str, tuple[Tensor, Tensor]] = {}


@register_task("fashion_mnist")
class FashionMNIST(Task):
    """Fashion-MNIST (Debian's ``dataset-fashion-mnist``) on the ViT-style encoder: 4x4 patches (a 7x7 grid), d 64,
    2 layers, 4 heads; images normalised with the training set's mean 0.286 and std 0.353; batches are a
    seeded permutation per epoch. Value: test accuracy on the 10,000 test images."""

    metric = "accuracy"
    QUICK = dict(epochs=1.0)

    @dataclass
    class Config(Task.Config):
        steps: int = 0  # training steps (0: epochs * train_size / batch)
        epochs: float = 5.0  # epochs when steps = 0
        batch: int = 128  # images per step
        lr: float = 2e-3  # peak AdamW learning rate
        weight_decay: float = 0.05  # AdamW weight decay
        warmup: int = 50  # linear warm-up steps
        patch: int = 4  # patch side
        dim: int = 64  # model width
        depth: int = 2  # layers
        heads: int = 4  # heads
        mlp: bool = True  # MLP after each mixer
        train_split: str = "train"  # file of the training images ("test": the small file, for smoke tests only)
        train_size: int = 60000  # training images used (the first ones)
        eval_size: int = 10000  # test images used (the first ones)

    MEAN, STD = 0.2860, 0.3530

    def __init__(self, **kw):
        super().__init__(**kw)
        c = self.config
        if c.steps == 0:
            c.steps = max(1, round(c.epochs * c.train_size / c.batch))
        self._train = self._test = None

    def _load(self, split, n):
        if split not in _FASHION:
            _FASHION[split] = data.fashion_mnist(split)  # read once per process
        x, y = _FASHION[split]
        return (x[:n] - self.MEAN) / self.STD, y[:n]

    def plan(self, spec):
        c = self.config
        side = 28 // c.patch
        plan_layers(spec, c.depth, dim=c.dim, heads=c.heads, seq_len=side * side, grid=(side, side))

    def build(self, spec):
        c = self.config
        return build_vit(spec, image_size=28, patch=c.patch, channels=1, classes=10, dim=c.dim, depth=c.depth,
                         heads=c.heads, mlp=c.mlp)

    def batch(self, step, seed):
        if self._train is None:
            self._train = self._load(self.config.train_split, self.config.train_size)
        x, y = self._train
        per_epoch = len(x) // self.config.batch
        epoch, i = divmod(step, per_epoch)
        order = torch.randperm(len(x), generator=_generator(seed, 10**6 + epoch))
        idx = order[i * self.config.batch:(i + 1) * self.config.batch]
        return x[idx], y[idx]

    def items(self, batch):
        return batch[0].shape[0] * (28 // self.config.patch) ** 2

    loss = staticmethod(_class_loss)

    def evaluate(self, model):
        if self._test is None:
            self._test = self._load("test", self.config.eval_size)
        return _class_accuracy(model, *self._test), {}
