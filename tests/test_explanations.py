"""Explanations say only what is true: "popular with other users" only for a user
without history, "because you liked X" only when X is like the item."""
from __future__ import annotations

import torch

from polyrec import Engine, Ranker
from polyrec.rank.explain import Explainer


def test_a_model_without_item_vectors_explains_by_the_history_not_popularity(tmp_path):
    with Engine(tmp_path / "e.db", device="cpu", entrypoints=False, progress=False) as eng:
        eng.add_items([{"external_id": f"i{k}", "title": f"Item {k}"} for k in range(8)])
        eng.add_interactions([{"user": f"u{n}", "item": f"i{(n + k) % 8}", "kind": "click",
                               "ts": n * 10 + k} for n in range(1, 12) for k in range(3)])
        eng.add_users([{"external_id": "nobody"}])
        eng.train("ease", options={"l2": 10.0}, force=True)
        recs = eng.recommend("u1", 3, explain=True)
        assert recs and all(r.explanation["text"] == "ranked for your history by ease"
                            for r in recs)
        assert eng.recommend("nobody", 1, explain=True)[0].explanation["text"].startswith(
            "popular with other users")


class _Vectors(Ranker):
    """A ranker with fixed item vectors (the Ranker.item_vectors contract)."""

    name = "toy"

    def fit(self, data):  # type: ignore[no-untyped-def]
        pass

    def score_users(self, users, data):  # type: ignore[no-untyped-def]
        return torch.zeros(len(users), data.n_items)

    def item_vectors(self, data):  # type: ignore[no-untyped-def]
        return torch.tensor([[1.0, 0.0], [0.9, 0.1], [-1.0, 0.0], [0.0, 1.0]])


def test_only_history_items_like_the_item_are_reasons():
    from polyrec.training_data import TrainingData
    data = TrainingData(user_ids=[1], item_ids=[10, 11, 12, 13], users=torch.tensor([0, 0]),
                        items=torch.tensor([1, 2]), weights=torch.ones(2),
                        ts=torch.zeros(2, dtype=torch.float64))
    explainer = Explainer(_Vectors(), data, {10: "A", 11: "B", 12: "C", 13: "D"},
                          {10: "a", 11: "b", 12: "c", 13: "d"})
    out = explainer.explain(0, [1, 2])  # B is like A, C points away from it
    assert [b["item"] for b in out["because"]] == ["b"] and out["text"].startswith(
        "because you liked B")
    out = explainer.explain(0, [2])  # only C: no reason to name
    assert "because" not in out and out["text"] == "ranked for your history by toy"
