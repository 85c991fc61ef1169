from protege import bbc


def test_splits_are_deterministic_disjoint_and_deduplicated():
    first, second = bbc.build_splits(), bbc.build_splits()
    assert first == second
    headlines = {name: {e.text.lower() for e in first[name]} for name in bbc.SPLITS}
    total = sum(len(h) for h in headlines.values())
    assert total == len(set().union(*headlines.values())) == 2096  # unique headlines
    assert 180 <= len(first["seed"]) <= 260  # a couple of hundred: a weak seed student
    assert {e.label for e in first["seed"]} == set(bbc.LABELS)


def test_sentences_follow_their_articles_split():
    splits = bbc.build_splits()
    articles = {name: {e.article for e in splits[name]} for name in bbc.SPLITS}
    for name in bbc.SPLITS:
        sentences = splits[f"{name}_sentences"]
        assert len(sentences) > 1000
        assert {e.article for e in sentences} <= articles[name]
        assert all(e.kind == "sentence" for e in sentences)


def test_written_splits_read_back(tmp_path):
    splits = bbc.build_splits()
    bbc.write_splits(splits, tmp_path)
    assert bbc.read_split(tmp_path, "holdout") == splits["holdout"]
