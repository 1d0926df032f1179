"""Rules between readings of a query (issue 13), on tiny catalogues built here: a phrase
naming a department and a wider value of a later slot means the wider value; the encoder
may not narrow a word inside value names of the same slot to one of them; a word inside
value names reaches the coarser group the catalogue files its values under."""
from __future__ import annotations

import torch

from polyrec.retrieve.query_understanding import Facet, SemanticMatcher, Vocabulary


def facet(slot: str, value: str, field: str, items) -> Facet:
    return Facet(slot, value, {field}, {"attribute"}, set(items))


def test_a_department_gives_way_to_the_wider_value_the_phrase_names():
    # the department "Shoes" holds 3 of the 10 items of the product group "Shoes"
    vocab = Vocabulary([facet("department", "Shoes", "department_name", {1, 2, 3}),
                        facet("category", "Shoes", "product_group_name", range(1, 11)),
                        facet("type", "Sneakers", "product_type_name", {1, 4, 5})])
    und = vocab.understand("running shoes")
    assert und.summary() == {"category": "Shoes"}
    assert und.slot_items == {"category": set(range(1, 11))}
    # a department value not held by the group (under 90% of its items) stays
    vocab = Vocabulary([facet("department", "Shoes", "department_name", {1, 2, 3, 20}),
                        facet("category", "Shoes", "product_group_name", range(1, 11))])
    assert vocab.understand("shoes").summary() == {"department": "Shoes"}
    # a type keeps coming first (it is no unit of the shop)
    vocab = Vocabulary([facet("type", "Dress", "product_type_name", {1, 2}),
                        facet("category", "Dress", "garment_group_name", range(1, 11))])
    assert vocab.understand("dress").summary() == {"type": "Dress"}


def test_the_encoder_does_not_narrow_a_word_inside_value_names_of_its_slot():
    facets = [facet("type", "Hat/brim", "product_type_name", {1, 2}),
              facet("type", "Hat/beanie", "product_type_name", {3, 4}),
              facet("type", "Vest top", "product_type_name", {5, 6}),
              facet("type", "Top", "product_type_name", {7, 8}),
              facet("type", "Bag", "product_type_name", {9, 10}),
              facet("type", "Suit jacket", "product_type_name", {11, 12}),
              facet("type", "Swimwear", "product_type_name", {13, 14})]
    vocab = Vocabulary(facets)
    basis = {"Bag": 0, "Hat/beanie": 1, "Hat/brim": 2, "Top": 3, "Vest top": 4,
             "Suit jacket": 5, "Swimwear": 6}

    def embed(texts):
        # "woolly hat" and "tank top" sit on Hat/brim and Vest top
        near = {"woolly hat": "Hat/brim", "tank top": "Vest top", "bathing suit": "Swimwear"}
        return [torch.nn.functional.one_hot(torch.tensor(basis[near.get(t, t)] if near.get(t, t) in basis
                                                         else 0), 7).float() for t in texts]
    items = list(range(1, 15))
    vectors = torch.stack([torch.nn.functional.one_hot(torch.tensor(basis[f.value]), 7).float()
                           for f in sorted(facets, key=lambda f: min(f.items)) for _ in f.items])
    m = SemanticMatcher(vocab, embed, items, vectors, slots=("type",))
    und = m.apply(vocab.understand("woolly hat"), embed, threshold=1.0)
    got = {(e["text"], e["value"], e["source"]) for e in und.as_dict()["entities"]}
    assert got == {("hat", "Hat/beanie", "partial")}  # both hats (the second an alternative)
    assert und.full_matches() == {1, 2, 3, 4}
    # an exact word with its neighbour may still mean another value: "tank top" is a Vest top
    und = m.apply(vocab.understand("tank top"), embed, threshold=1.0)
    assert und.summary() == {"type": "Vest top"}
    # words meaning another value together keep that reading: a bathing suit is no suit
    und = m.apply(vocab.understand("bathing suit"), embed, threshold=1.0)
    assert und.summary() == {"type": "Swimwear"}


def test_a_partial_word_reaches_the_coarser_group_of_another_slot():
    # "bikini" is a word of the type "Bikini top" (items 1-3); every bikini top is in the
    # product group Swimwear (a category), which also holds swimwear bottoms (4-6)
    vocab = Vocabulary([facet("type", "Bikini top", "product_type_name", {1, 2, 3}),
                        facet("type", "Swimwear bottom", "product_type_name", {4, 5, 6}),
                        facet("type", "Bra", "product_type_name", {7, 8}),
                        facet("category", "Swimwear", "product_group_name", range(1, 7)),
                        facet("category", "Underwear", "product_group_name", {7, 8})])
    m = SemanticMatcher(vocab, lambda ts: [None] * len(ts), list(range(1, 9)), torch.randn(8, 4))
    und = m.apply(vocab.understand("bikini"), lambda ts: [None] * len(ts), threshold=3.0)
    assert und.summary() == {"type": "Bikini top"}
    (member,) = und.soft.values()
    assert {i: member.get(i, 0.0) for i in range(1, 9)} == {
        1: 1.0, 2: 1.0, 3: 1.0, 4: 0.5, 5: 0.5, 6: 0.5, 7: 0.0, 8: 0.0}
