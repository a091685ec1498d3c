"""``headwise moa-plan``: profile a causal LM on a calibration task, search MoA's per-head elastic windows
under a density budget at several lengths, and write the chosen plan as JSON.

Steps (MoA, Fu et al., 2024, Sec. 4): (1) the model: the arena's decoder-only LM with ``mha`` layers
(:func:`headwise.arena.models.build_lm`, the task's model settings), trained here for ``--steps`` on the
task at the profiled lengths in turn (or loaded with ``--checkpoint``); (2) profile: the attention influence of
every head at each of ``--lengths`` on ``--calib-batches`` calibration batches; (3) the multi-objective MILP
over the candidate rules gives the Pareto front; (4) each Pareto plan runs on validation batches at every length
and the one with the lowest mean validation loss is written. The table compares it with dense attention and two
uniform baselines within the same budget: a StreamingLLM window (one fixed span for every head, ``beta = 0``, the
widest within the budget at every length) and the best single candidate rule shared by all heads (least
estimated loss).
"""

from __future__ import annotations

import math
import sys
import time

import torch
from torch import nn

from headwise.patterns.moa_plan import MoAPlan, causal_density, span_at
from headwise.moa.profile import InfluenceProfiler
from headwise.moa.search import default_rules, pareto_front, rule_table, select_plan, solution_plan
from headwise.patterns import SinkWindow

__all__ = ["add_arguments", "main", "lm_tasks"]

CALIB_SEED, VAL_SEED = 1_000_003, 2_000_003  # calibration and validation batches never meet training ones


def lm_tasks() -> list[str]:
    """Arena tasks on the decoder-only LM with a ``seq_len`` (the ones MoA can profile at several lengths)."""
    from headwise.arena.tasks import LMTask, available_tasks, get_task

    return [n for n in available_tasks() if isinstance(get_task(n, quick=True), LMTask)]


def _floats(text: str, option: str) -> list[float]:
    try:
        values = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"{option} must be comma-separated numbers, got {text!r}") from None
    if not values or not all(math.isfinite(v) for v in values):
        raise ValueError(f"{option} must be comma-separated finite numbers, got {text!r}")
    return values


def add_arguments(p) -> None:
    p.add_argument("--task", default="mqar", help="arena LM task (mqar, induction, passkey, text; default mqar)")
    p.add_argument("--out", required=True, help="write the plan JSON here")
    p.add_argument("--density", type=float, default=0.25,
                   help="budget: mean attended / causal pairs over all heads, at every length (default 0.25)")
    p.add_argument("--lengths", default="64,128,256", help="profiled lengths, comma-separated (default 64,128,256)")
    p.add_argument("--checkpoint", help="load the model weights from this file (--save-model's, or an arena "
                   "training checkpoint of the same model) instead of training")
    p.add_argument("--save-model", help="save the trained model's weights here (reload with --checkpoint)")
    p.add_argument("--steps", type=int, default=300, help="training steps when no --checkpoint (default 300)")
    p.add_argument("--batch", type=int, help="sequences per training batch (default: the task's)")
    p.add_argument("--calib-batches", type=int, default=2, help="calibration batches per length (default 2)")
    p.add_argument("--eval-examples", type=int, default=240, help="held-out examples per length for the task "
                   "metric (default 240)")
    p.add_argument("--sinks", type=int, default=4, help="attention-sink tokens of every head (default 4)")
    p.add_argument("--alphas", help="candidate alphas in tokens, comma-separated (default {0,1/8,1/4,1/2} x shortest)")
    p.add_argument("--betas", help="candidate betas, comma-separated (default 0,0.125,0.25,0.5,0.75,1)")
    p.add_argument("--points", type=int, default=3, help="epsilon-constraint grid points per objective (default 3)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


def _log(msg: str) -> None:
    print(f"  {msg}", file=sys.stderr)


def _model(args, tasks: dict, lengths: list[int]) -> nn.Module:
    from headwise.arena.train import train

    longest = tasks[lengths[-1]]
    model = longest.build("mha")
    if args.checkpoint:
        state = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
        state = state.get("model", state) if isinstance(state, dict) else state
        try:
            model.load_state_dict(state)
        except (RuntimeError, TypeError, AttributeError) as e:
            raise ValueError(f"--checkpoint {args.checkpoint!r} does not fit the {args.task} model with max_len "
                             f"{lengths[-1]}: {str(e).splitlines()[0]}") from None
        return model.eval()
    if args.steps > 0:
        c = longest.config
        t0 = time.perf_counter()
        result = train(model, lambda step: tasks[lengths[step % len(lengths)]].batch(step, args.seed), longest.loss,
                       steps=args.steps, lr=c.lr, weight_decay=c.weight_decay, warmup=longest.warmup, seed=args.seed)
        _log(f"trained {args.steps} steps in {time.perf_counter() - t0:.0f} s, final loss {result.losses[-1]:.3f}")
    if args.save_model:
        torch.save(model.state_dict(), args.save_model)
        _log(f"saved the model weights to {args.save_model}")
    return model.eval()


def main(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from headwise.arena.tasks import get_task
    from headwise.moa.profile import attention_layers
    from headwise.moa.apply import apply_plan

    if args.task not in lm_tasks():
        raise ValueError(f"unknown or unsupported task={args.task!r}; valid: {lm_tasks()}")
    lengths = sorted({int(v) for v in _floats(args.lengths, "--lengths")})
    if not 0 < args.density <= 1:
        raise ValueError(f"--density must be in (0, 1], got {args.density}")
    for name, low in (("steps", 0), ("calib_batches", 1), ("eval_examples", 1), ("sinks", 0), ("points", 2)):
        if getattr(args, name) < low:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    overrides = dict(steps=max(args.steps, 1), eval_examples=args.eval_examples)
    if args.batch is not None:
        overrides["batch"] = args.batch
    tasks = {n: get_task(args.task, quick=True, seq_len=n, **overrides) for n in lengths}  # raises on a bad length
    if args.alphas or args.betas:
        grid = default_rules(lengths[0])
        alphas = _floats(args.alphas, "--alphas") if args.alphas else sorted({a for a, _ in grid})
        betas = _floats(args.betas, "--betas") if args.betas else sorted({b for _, b in grid})
        rules = [(a, b) for a in alphas for b in betas]
    else:
        rules = default_rules(lengths[0])

    for n in lengths:  # fail before training when even the sparsest rule is over budget
        sparsest = min(causal_density(SinkWindow(span_at(a, b, n), args.sinks), n) for a, b in rules)
        if sparsest > args.density:
            raise ValueError(f"density budget={args.density} is below the sparsest rule's density {sparsest:.4f} at "
                             f"N={n}; add sparser rules (--alphas, --betas), fewer --sinks, or raise --density")

    model = _model(args, tasks, lengths)
    layers = len(attention_layers(model))
    heads = attention_layers(model)[0].heads

    t0 = time.perf_counter()
    influence = {}
    with InfluenceProfiler(model) as prof:
        for n in lengths:
            prof.reset()
            for i in range(args.calib_batches):
                prof.backward(tasks[n].loss(model, tasks[n].batch(i, CALIB_SEED + args.seed)))
            influence[n] = prof.influence
    _log(f"profiled {len(lengths)} lengths in {time.perf_counter() - t0:.1f} s")

    t0 = time.perf_counter()
    losses, densities = rule_table(influence, rules, args.sinks)
    front = pareto_front(losses, densities, args.density, points=args.points)
    _log(f"MILP Pareto front: {len(front)} plans from {len(rules)} rules x {losses.shape[1]} heads in "
         f"{time.perf_counter() - t0:.1f} s")

    val = {n: [tasks[n].batch(i, VAL_SEED + args.seed) for i in range(2)] for n in lengths}

    @torch.no_grad()
    def validate(m: nn.Module) -> tuple[float, list[float]]:
        """Mean validation loss over lengths, and the task metric at each length."""
        m.eval()
        loss = sum(float(tasks[n].loss(m, b)) for n in lengths for b in val[n]) / (2 * len(lengths))
        return loss, [tasks[n].evaluate(m)[0] for n in lengths]

    def to_plan(sol, meta=None) -> MoAPlan:
        return solution_plan(sol, rules, layers, heads, args.sinks, meta)

    results = {id(s): validate(apply_plan(model, to_plan(s))) for s in front}
    best = select_plan(front, validate=lambda s: results[id(s)][0])
    dense = validate(model)
    # uniform StreamingLLM baseline: the widest fixed span within the budget at every length
    within = [s for s in range(1, lengths[0] + 1)
              if all(MoAPlan.uniform(1, 1, s, 0.0, args.sinks).density(n) <= args.density for n in lengths)]
    span = max(within, default=None)
    uniform = None if span is None else MoAPlan.uniform(layers, heads, span, 0.0, args.sinks)
    uniform_score = None if uniform is None else validate(apply_plan(model, uniform))
    # uniform elastic baseline: the one candidate rule for all heads with the least estimated loss within budget
    shared = [c for c in range(len(rules)) if (densities[:, c] <= args.density).all()]
    shared = min(shared, key=lambda c: losses[:, :, c].sum(), default=None)
    same = None if shared is None else MoAPlan.uniform(layers, heads, *rules[shared], args.sinks)
    same_score = None if same is None else validate(apply_plan(model, same))

    metric = tasks[lengths[0]].metric
    plan = to_plan(best, meta={
        "task": args.task, "budget": args.density, "lengths": lengths, "rules": [list(r) for r in rules],
        "estimated_loss_increase": best.losses.tolist(), "density": best.densities.tolist(),
        "validation_loss": results[id(best)][0], f"validation_{metric}": results[id(best)][1],
        "dense_validation_loss": dense[0], f"dense_validation_{metric}": dense[1],
        "uniform_span": span, "uniform_validation_loss": None if uniform_score is None else uniform_score[0],
        f"uniform_validation_{metric}": None if uniform_score is None else uniform_score[1],
        "shared_rule": None if same is None else list(rules[shared]),
        "shared_rule_validation_loss": None if same_score is None else same_score[0],
        f"shared_rule_validation_{metric}": None if same_score is None else same_score[1],
        "model": {"checkpoint": args.checkpoint, "steps": 0 if args.checkpoint else args.steps, "seed": args.seed,
                  "heads": heads, "layers": layers}})
    plan.save(args.out)

    table = Table(title=f"MoA plans on {args.task}, density budget {args.density} at N = {lengths}, {args.sinks} sinks")
    for col in ("plan", "est. loss increase per N", "density per N", "val loss", f"{metric} per N"):
        table.add_column(col)
    fmt = lambda xs: " ".join(f"{x:.3g}" for x in xs)  # noqa: E731
    table.add_row("dense causal", "0", fmt([1.0] * len(lengths)), f"{dense[0]:.4f}", fmt(dense[1]))
    if uniform is not None:
        table.add_row(f"uniform span {span} (StreamingLLM)", "-", fmt([uniform.density(n) for n in lengths]),
                      f"{uniform_score[0]:.4f}", fmt(uniform_score[1]))
    if same is not None:
        a, b = rules[shared]
        table.add_row(f"shared rule {a:g} + {b:g} N", fmt(losses[:, :, shared].sum(1)),
                      fmt(densities[:, shared]), f"{same_score[0]:.4f}", fmt(same_score[1]))
    for i, s in enumerate(front):
        mark = " (chosen)" if s is best else ""
        table.add_row(f"MoA pareto {i}{mark}", fmt(s.losses), fmt(s.densities), f"{results[id(s)][0]:.4f}",
                      fmt(results[id(s)][1]))
    Console().print(table)
    for layer in range(layers):
        spans = " | ".join(f"N={n}: {plan.spans(layer, n)}" for n in lengths)
        print(f"layer {layer} spans per head: {spans}")
    print(f"wrote {args.out}")
    return 0
