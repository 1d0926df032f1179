"""Fusers: masks for missing modalities, weights, gradients, registration."""
from __future__ import annotations

import pytest
import torch

from polyrec.plugins.fuse_attention import AttentionFuser, MeanFuser

DIMS = {"text": 12, "image": 8, "kg": 6}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


PRESENT = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0], [0, 1, 1], [1, 0, 1]], dtype=torch.bool)


def _tokens(n: int = 5, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {m: torch.randn(n, d, generator=gen) for m, d in DIMS.items()}


@pytest.fixture(params=[AttentionFuser, MeanFuser], ids=["attention", "mean"])
def fuser(request):
    torch.manual_seed(0)
    f = request.param(DIMS, 16)
    f.eval()
    return f


def test_weights_sum_to_one_over_present_and_zero_elsewhere(fuser):
    fused, weights = fuser(_tokens(), PRESENT)
    assert fused.shape == (5, 16) and weights.shape == (5, 3)
    assert torch.isfinite(fused).all() and torch.isfinite(weights).all()
    some = PRESENT.any(1)
    assert torch.allclose(weights[some].sum(1), torch.ones(int(some.sum())), atol=1e-5)
    assert (weights[~PRESENT] == 0).all()
    assert (weights[PRESENT] > 0).all()


def test_item_with_no_modality_gives_zero_not_nan(fuser):
    fused, weights = fuser(_tokens(), PRESENT)
    assert not torch.isnan(fused).any()
    assert (fused[2] == 0).all() and (weights[2] == 0).all()


def test_absent_token_values_do_not_matter(fuser):
    tokens = _tokens()
    noisy = {m: t.clone() for m, t in tokens.items()}
    for j, m in enumerate(DIMS):
        noisy[m][~PRESENT[:, j]] = 1e3  # garbage where the modality is missing
    a, wa = fuser(tokens, PRESENT)
    b, wb = fuser(noisy, PRESENT)
    assert torch.allclose(a, b, atol=1e-5) and torch.allclose(wa, wb, atol=1e-6)


def test_single_modality_item_gets_its_projection(fuser):
    fused, _ = fuser(_tokens(), PRESENT)
    other = _tokens(seed=1)
    other["text"] = _tokens()["text"]  # row 1 has text only: other modalities change freely
    fused2, _ = fuser(other, PRESENT)
    assert torch.allclose(fused[1], fused2[1], atol=1e-5)
    assert not torch.allclose(fused[0], fused2[0], atol=1e-3)


def test_gradients_reach_every_present_modality(fuser):
    fuser.train()
    tokens = _tokens()
    target = torch.randn(5, 16, generator=torch.Generator().manual_seed(3))
    fused, _ = fuser(tokens, PRESENT)
    ((fused - target) ** 2).sum().backward()
    for m in DIMS:
        grad = fuser.project.proj[m][1].weight.grad
        assert grad is not None and grad.abs().sum() > 0, m
    if isinstance(fuser, AttentionFuser):
        assert fuser.query.grad is not None and fuser.query.grad.abs().sum() > 0
        assert fuser.modality_embedding.grad.abs().sum() > 0


def test_attention_weights_depend_on_content():
    torch.manual_seed(0)
    f = AttentionFuser(DIMS, 16)
    f.eval()
    full = torch.ones(5, 3, dtype=torch.bool)
    _, weights = f(_tokens(), full)
    assert weights.std(0).sum() > 0  # not one fixed weighting for every item


def test_attention_learns_to_prefer_the_informative_modality():
    """Only 'text' carries the target: training moves attention weight onto it."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    n = 256
    tokens = {m: torch.randn(n, d, generator=gen) for m, d in DIMS.items()}
    target_proj = torch.randn(DIMS["text"], 16, generator=gen)
    target = tokens["text"] @ target_proj
    f = AttentionFuser(DIMS, 16, heads=2, dropout=0.0)
    present = torch.ones(n, 3, dtype=torch.bool)
    opt = torch.optim.Adam(f.parameters(), lr=1e-2)
    _, before = f(tokens, present)
    for _ in range(100):
        fused, _ = f(tokens, present)
        loss = 1 - torch.nn.functional.cosine_similarity(fused, target).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    _, after = f(tokens, present)
    assert after[:, 0].mean() > before[:, 0].mean() + 0.2
    assert after[:, 0].mean() > 0.6


def test_missing_tokens_or_bad_mask_are_errors(fuser):
    tokens = _tokens()
    del tokens["kg"]
    with pytest.raises(ValueError, match="kg"):
        fuser(tokens, PRESENT)
    with pytest.raises(ValueError, match="columns"):
        fuser(_tokens(), PRESENT[:, :2])


def test_heads_must_divide_width():
    with pytest.raises(ValueError, match="divisible"):
        AttentionFuser(DIMS, 10, heads=4)


def test_fusers_are_registered(engine):
    names = engine.registry("fusers").names()
    assert "attention" in names and "mean" in names
    assert engine.registry("fusers").owner("attention") == "polyrec.plugins.fuse_attention"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_attention_runs_under_bf16_autocast_on_cuda():
    f = AttentionFuser(DIMS, 16).cuda()
    tokens = {m: t.cuda() for m, t in _tokens().items()}
    fused, weights = f(tokens, PRESENT.cuda())
    assert fused.dtype == torch.float32 and torch.isfinite(fused).all()
    assert torch.allclose(weights[PRESENT.any(1).cuda()].sum(1),
                          torch.ones(4, device="cuda"), atol=1e-2)


def test_a_batch_with_everything_present_fuses_as_inside_a_masked_batch(fuser):
    """Rows are fused independently: a row with every modality gets the same vector and
    weights in a batch that needs no mask as in one where other rows miss modalities."""
    tokens = _tokens()
    fused, weights = fuser(tokens, PRESENT)
    alone_fused, alone_weights = fuser({m: t[:1] for m, t in tokens.items()}, PRESENT[:1])
    assert torch.allclose(alone_fused, fused[:1], atol=1e-6)
    assert torch.allclose(alone_weights, weights[:1], atol=1e-6)
