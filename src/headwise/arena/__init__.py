"""headwise arena: train and compare attention variants on small tasks.

* :mod:`headwise.arena.models`: LM / ViT / in-context-regression builders whose mixers are registry specs, and
  :func:`plan_mixer`, which reads a variant's declared capabilities to say how -- or why not -- it serves a model;
* :mod:`headwise.arena.tasks`: the task registry (``get_task("mqar")``);
* :mod:`headwise.arena.train`: the deterministic, resumable AdamW + cosine training loop, and its data-parallel
  form (:func:`data_parallel_train`, under ``torchrun``);
* :mod:`headwise.arena.runner`: ``headwise arena`` (results.json, leaderboard.md, plots);
* :mod:`headwise.arena.data`: the data generators and offline loaders.

Training takes minutes, so the example is not run as a doctest:

>>> from headwise.arena import run
>>> rows = run(["mqar"], "mha,linear", seeds=1, quick=True, out="runs/arena")  # doctest: +SKIP
"""

from headwise.arena.models import Unsupported, build_lm, build_regression, build_vit, plan_mixer, split_specs
from headwise.arena.runner import run
from headwise.arena.tasks import available_tasks, get_task, register_task
from headwise.arena.train import data_parallel_train, train

__all__ = ["run", "train", "data_parallel_train", "get_task", "available_tasks", "register_task", "build_lm", "build_vit",
           "build_regression", "plan_mixer", "split_specs", "Unsupported"]
