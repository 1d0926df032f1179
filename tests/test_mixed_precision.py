"""The CUDA path's bf16 autocast, exercised on the CPU (POLYREC_CPU_AUTOCAST=1): fusion,
a training step and scoring keep float32 outputs, stay finite and agree with float32."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from polyrec.device import CPU_AUTOCAST_ENV, autocast
from polyrec.plugins.fuse_attention import AttentionFuser, MeanFuser
from polyrec.plugins.rank_two_tower import TwoTowerRanker
from polyrec.training_data import TrainingData


@pytest.fixture
def bf16_cpu(monkeypatch):
    monkeypatch.setenv(CPU_AUTOCAST_ENV, "1")


def _tokens(n: int = 64, seed: int = 0) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    tokens = {"text": torch.randn(n, 32, generator=gen), "kg": torch.randn(n, 16, generator=gen)}
    present = torch.rand(n, 2, generator=gen) > 0.2
    return tokens, present


def test_autocast_is_bf16_on_the_cpu_only_when_asked(monkeypatch):
    cpu = torch.device("cpu")
    with autocast(cpu):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    monkeypatch.setenv(CPU_AUTOCAST_ENV, "1")
    with autocast(cpu):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16


@pytest.mark.parametrize("fuser", [AttentionFuser, MeanFuser])
def test_fusers_under_bf16_give_float32_close_to_float32(fuser, monkeypatch):
    torch.manual_seed(0)
    model = fuser({"text": 32, "kg": 16}, 24, dropout=0.0).eval()
    tokens, present = _tokens()
    with torch.no_grad():
        ref, ref_w = model(tokens, present)
        monkeypatch.setenv(CPU_AUTOCAST_ENV, "1")
        out, weights = model(tokens, present)
    assert out.dtype == torch.float32 and weights.dtype == torch.float32
    assert bool(torch.isfinite(out).all()) and bool(torch.isfinite(weights).all())
    rows = present.any(1)
    cos = F.cosine_similarity(out[rows], ref[rows], dim=-1)
    assert float(cos.min()) > 0.98, float(cos.min())
    assert torch.allclose(weights, ref_w, atol=0.05)


def _data(n_users: int = 60, n_items: int = 80, seed: int = 0) -> TrainingData:
    gen = torch.Generator().manual_seed(seed)
    users = torch.arange(n_users).repeat_interleave(6)
    items = torch.randint(0, n_items, (len(users),), generator=gen)
    tokens, present = _tokens(n_items, seed)
    return TrainingData(list(range(1, n_users + 1)), list(range(1, n_items + 1)), users, items,
                        torch.ones(len(users)), torch.arange(len(users)).double(),
                        {m: (v, present[:, j]) for j, (m, v) in enumerate(tokens.items())})


def test_a_two_tower_training_step_and_scoring_under_bf16(bf16_cpu):
    data = _data()
    ranker = TwoTowerRanker(dim=16, epochs=2, validation=False, batch_size=128, n_random=64,
                            device="cpu", seed=0)
    ranker.fit(data)  # forward and backward through the fuser under bf16 autocast
    params = torch.cat([p.detach().flatten() for p in ranker.model.parameters()])
    assert params.dtype == torch.float32 and bool(torch.isfinite(params).all())
    scores = ranker.score_users(torch.arange(data.n_users), data)
    assert scores.dtype == torch.float32 and scores.shape == (data.n_users, data.n_items)
    assert bool(torch.isfinite(scores).all())
    vectors = ranker.item_vectors(data)
    assert vectors.dtype == torch.float32 and bool(torch.isfinite(vectors).all())
