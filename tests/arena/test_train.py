import math

import pytest
import torch

from headwise.arena.tasks import get_task
from headwise.arena.train import cosine_lr, train


def test_cosine_lr_warmup_then_cosine_to_zero():
    assert cosine_lr(0, steps=10, lr=1.0, warmup=2) == 0.5
    assert cosine_lr(1, steps=10, lr=1.0, warmup=2) == 1.0
    assert cosine_lr(2, steps=10, lr=1.0, warmup=2) == 1.0
    assert math.isclose(cosine_lr(6, steps=10, lr=1.0, warmup=2), 0.5)
    assert cosine_lr(10, steps=10, lr=1.0, warmup=2) == 0.0


def _task():
    return get_task("mqar", steps=12, batch=6, dim=16, heads=2, seq_len=32, pairs=(2, 4, 8), eval_examples=30)


def _run(task, seed, **kw):
    torch.manual_seed(seed)
    model = task.build("mha")
    result = train(model, lambda s: task.batch(s, seed), task.loss, steps=12, lr=3e-3, warmup=2, seed=seed,
                   items_fn=task.items, **kw)
    return model, result


class Interrupt(Exception):
    pass


def test_resume_is_bit_identical(tmp_path):
    task = _task()
    ref_model, ref = _run(task, 3)
    ckpt = tmp_path / "run.pt"

    calls = []

    def interrupting(step):
        calls.append(step)
        if step == 7 and len(calls) == 8:
            raise KeyboardInterrupt  # the user presses Ctrl-C before step 7
        return task.batch(step, 3)

    torch.manual_seed(3)
    model = task.build("mha")
    with pytest.raises(KeyboardInterrupt):
        train(model, interrupting, task.loss, steps=12, lr=3e-3, warmup=2, seed=3, checkpoint=ckpt,
              checkpoint_every=5, items_fn=task.items)
    assert torch.load(ckpt, weights_only=False)["step"] == 7
    torch.manual_seed(3)
    fresh = task.build("mha")  # a new process: the same init, then the checkpoint replaces it
    result = train(fresh, interrupting, task.loss, steps=12, lr=3e-3, warmup=2, seed=3, checkpoint=ckpt,
                   checkpoint_every=5, items_fn=task.items)
    assert result.resumed_from == 7 and result.steps == 12
    assert result.losses == ref.losses
    assert result.items == ref.items
    for (name, a), b in zip(ref_model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name


def test_error_in_a_step_keeps_the_last_finished_step(tmp_path):
    task = _task()

    def failing(step):
        if step == 4:
            raise Interrupt("data source failed")
        return task.batch(step, 0)

    torch.manual_seed(0)
    with pytest.raises(Interrupt):
        train(task.build("mha"), failing, task.loss, steps=12, lr=3e-3, seed=0, checkpoint=tmp_path / "c.pt")
    assert torch.load(tmp_path / "c.pt", weights_only=False)["step"] == 4


def test_checkpoint_of_another_run_is_refused(tmp_path):
    task = _task()
    _run(task, 0, checkpoint=tmp_path / "c.pt")
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="written with"):
        train(task.build("mha"), lambda s: task.batch(s, 0), task.loss, steps=12, lr=1e-2, seed=0,
              checkpoint=tmp_path / "c.pt")


def test_finished_checkpoint_returns_without_training(tmp_path):
    task = _task()
    _, first = _run(task, 1, checkpoint=tmp_path / "c.pt")
    torch.manual_seed(1)
    model = task.build("mha")
    again = train(model, lambda s: 1 / 0, task.loss, steps=12, lr=3e-3, warmup=2, seed=1, checkpoint=tmp_path / "c.pt")
    assert again.losses == first.losses and again.resumed_from == 12


def test_loss_decreases_and_bad_arguments():
    task = _task()
    _, result = _run(task, 0)
    assert len(result.losses) == 12 and result.items == 12 * 6 * 32 and result.train_s > 0
    with pytest.raises(ValueError, match="warmup"):
        train(torch.nn.Linear(2, 2), lambda s: None, lambda m, b: None, steps=5, lr=1e-3, warmup=5)
    with pytest.raises(ValueError, match="lr"):
        train(torch.nn.Linear(2, 2), lambda s: None, lambda m, b: None, steps=5, lr=0)


def test_time_budget_stops_and_resumes(tmp_path):
    task = _task()
    torch.manual_seed(0)
    with pytest.raises(TimeoutError, match="budget"):
        train(task.build("mha"), lambda s: task.batch(s, 0), task.loss, steps=12, lr=3e-3, seed=0,
              checkpoint=tmp_path / "c.pt", max_seconds=1e-9)
    assert torch.load(tmp_path / "c.pt", weights_only=False)["step"] == 1
    torch.manual_seed(0)
    done = train(task.build("mha"), lambda s: task.batch(s, 0), task.loss, steps=12, lr=3e-3, seed=0,
                 checkpoint=tmp_path / "c.pt")
    assert done.steps == 12 and done.resumed_from == 1
