"""MoA profiler: the influence formula, dL/dA against finite differences, masking check, bookkeeping."""

import pytest
import torch
from torch import nn

import headwise
from headwise.moa import InfluenceProfiler, attention_influence
from headwise.moa import profile as moa_profile
from headwise.patterns import Causal, Pattern, PerHead


class TinyLM(nn.Module):
    """Embedding, pre-norm blocks of causal mha + MLP, tied-free output head (float64 for exact checks)."""

    def __init__(self, vocab=11, dim=16, heads=2, layers=2):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.attn = nn.ModuleList(headwise.create("mha", dim=dim, heads=heads, pattern="causal", backend="reference")
                                  for _ in range(layers))
        self.mlp = nn.ModuleList(nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
                                 for _ in range(layers))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(layers))
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens):
        x = self.emb(tokens)
        for norm, attn, mlp in zip(self.norms, self.attn, self.mlp):
            x = x + attn(norm(x))
            x = x + mlp(x)
        return self.head(x)


def lm_loss(model, tokens):
    logits = model(tokens[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


@pytest.fixture
def model():
    torch.manual_seed(0)
    return TinyLM().double()


@pytest.fixture
def tokens():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 11, (3, 13), generator=g)


def test_influence_formula_is_the_gradient_times_the_masking_change():
    torch.manual_seed(0)
    A = torch.softmax(torch.randn(5, 7, dtype=torch.float64), -1).tril()
    A = A / A.sum(-1, keepdim=True)  # causal rows: row 0 has one key (A = 1)
    G = torch.randn(5, 7, dtype=torch.float64)
    E = attention_influence(A, G)
    for i in range(5):
        for j in range(7):
            if A[i, j] == 0:
                assert E[i, j] == 0
                continue
            masked = A[i].clone()
            masked[j] = 0
            masked = masked / masked.sum() if masked.sum() > 0 else masked  # renormalised row (empty: stays 0)
            assert E[i, j].item() == pytest.approx((G[i] * (masked - A[i])).sum().item(), abs=1e-12)


def test_profiling_forward_equals_the_model(model, tokens):
    with torch.no_grad():
        before = lm_loss(model, tokens)
        with InfluenceProfiler(model):
            inside = lm_loss(model, tokens)
        after = lm_loss(model, tokens)
    assert torch.allclose(inside, before, atol=1e-12) and torch.equal(after, before)
    assert all("forward" not in vars(m) for m in model.attn)  # restored


def test_gradient_matches_finite_differences(model, tokens, monkeypatch):
    with InfluenceProfiler(model) as prof:
        _, grad = prof.backward(lm_loss(model, tokens))[0]  # layer 0: (A, dL/dA)
    assert all(p.grad is None for p in model.parameters())  # parameter gradients untouched
    original = moa_profile.dense_probabilities
    for b, h, i, j in [(0, 1, 9, 4), (2, 0, 11, 0), (1, 0, 5, 5)]:  # (batch, head, query, key) in layer 0
        def loss_at(eps):
            calls = []

            def perturbed(q, k, pattern):
                p = original(q, k, pattern)
                if len(calls) == 0:  # layer 0
                    bump = torch.zeros_like(p)
                    bump[b, h, i, j] = eps
                    p = p + bump
                calls.append(1)
                return p

            monkeypatch.setattr(moa_profile, "dense_probabilities", perturbed)
            with torch.no_grad(), InfluenceProfiler(model):
                return lm_loss(model, tokens).item()

        eps = 1e-5
        fd = (loss_at(eps) - loss_at(-eps)) / (2 * eps)
        assert grad[b, h, i, j].item() == pytest.approx(fd, rel=1e-6, abs=1e-10)
    monkeypatch.setattr(moa_profile, "dense_probabilities", original)


class DropPair(Pattern):
    """Causal minus one (query, key) pair."""

    def __init__(self, i, j):
        self.i, self.j = i, j

    def mask(self, q_idx, kv_idx, head=None):
        return (kv_idx <= q_idx) & ~((q_idx == self.i) & (kv_idx == self.j))


def test_influence_predicts_the_loss_change_of_masking(model, tokens):
    tokens = tokens[:1]  # one sequence: E is that sequence's estimate
    with InfluenceProfiler(model, absolute=False) as prof:
        prof.backward(lm_loss(model, tokens))
    base = lm_loss(model, tokens).item()
    layer, errors, sizes = 1, [], []
    for h, i, j in [(0, 11, 3), (1, 10, 0), (0, 8, 8), (1, 6, 2), (0, 11, 10)]:
        pats = [DropPair(i, j) if hh == h else Causal() for hh in range(2)]
        model.attn[layer].pattern = PerHead(pats)
        true = lm_loss(model, tokens).item() - base
        model.attn[layer].pattern = Causal()
        est = prof.influence[layer, h, i, j].item()
        errors.append(abs(true - est))
        sizes.append(abs(true))
    # first order: the error is a small fraction of the change itself
    assert max(e / s for e, s in zip(errors, sizes) if s > 1e-8) < 0.05


def test_influence_is_the_mean_over_batches_of_absolute_effects(model, tokens):
    per_batch = []
    for part in (tokens[:2], tokens[2:]):
        with InfluenceProfiler(model) as prof:
            out = prof.backward(lm_loss(model, part))
        per_batch.append(prof.influence)
        # the batch-summed |E| of a batch-mean loss
        expected = torch.stack([attention_influence(p, g).abs().sum(0) for p, g in out])
        assert torch.allclose(prof.influence, expected, atol=1e-15)
    with InfluenceProfiler(model) as prof:
        for part in (tokens[:2], tokens[2:]):
            prof.backward(lm_loss(model, part))
    assert prof.steps == 2 and prof.influence.shape == (2, 2, 12, 12)
    assert torch.allclose(prof.influence, (per_batch[0] + per_batch[1]) / 2, atol=1e-15)
    assert (prof.influence[:, :, ~Causal().dense_mask(12, 12)[0]] == 0).all()  # nothing above the diagonal


def test_errors(model, tokens):
    with pytest.raises(ValueError, match="has no headwise multi-head attention"):
        InfluenceProfiler(nn.Linear(2, 2))
    model.attn[1].pattern = None
    with pytest.raises(ValueError, match=r"attention layer 1 has pattern=None, expected Causal\(\)"):
        InfluenceProfiler(model)
    model.attn[1].pattern = Causal()
    with InfluenceProfiler(model) as prof:
        with pytest.raises(ValueError, match="did not run"):
            prof.backward(torch.tensor(1.0))
        with pytest.raises(ValueError, match="causal self-attention only"):
            model.attn[0](torch.randn(1, 3, 16, dtype=torch.float64), torch.randn(1, 3, 16, dtype=torch.float64))
        prof.backward(lm_loss(model, tokens))
        lm_loss(model, tokens[:, :5])
        with pytest.raises(ValueError, match="share one length"):
            prof.backward(lm_loss(model, tokens[:, :5]))
    with pytest.raises(ValueError, match="cannot profile attention layer"):
        InfluenceProfiler(nn.Sequential(headwise.create("glca", dim=8, heads=2)))


def test_reset_profiles_another_length(model, tokens):
    with InfluenceProfiler(model) as prof:
        prof.backward(lm_loss(model, tokens))
        prof.reset()
        assert prof.influence is None and prof.steps == 0
        prof.backward(lm_loss(model, tokens[:, :6]))
    assert prof.influence.shape == (2, 2, 5, 5) and prof.steps == 1
