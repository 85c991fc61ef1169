import numpy as np
import pytest
from transformers import AutoModelForSequenceClassification

from serving.classify.classifier import Classifier, pick_device


def test_loads_any_hf_classifier_folder_with_its_labels(tiny_pair):
    for folder in tiny_pair:
        model = Classifier(folder, device="cpu")
        assert model.labels == ["business", "entertainment", "politics", "sport", "tech"]
        prediction = model.predict(["one text", "another, different text"])
        assert prediction.probs.shape == (2, 5)
        np.testing.assert_allclose(prediction.probs.sum(axis=1), 1, atol=1e-5)


def test_mean_pooled_student_is_an_auto_class(tiny_pair):
    from serving.classify import meanpool

    meanpool.register()
    model = AutoModelForSequenceClassification.from_pretrained(tiny_pair[0])
    assert type(model).__name__ == "BertMeanPoolForSequenceClassification"


def test_version_is_a_content_address(tiny_pair):
    a, b = Classifier(tiny_pair[0], "cpu"), Classifier(tiny_pair[0], "cpu")
    assert a.version == b.version != Classifier(tiny_pair[1], "cpu").version


def test_truncation_is_reported(tiny_pair):
    model = Classifier(tiny_pair[0], "cpu")  # 64-token window
    flags = model.predict(["short", "word " * 100, "x" * 10]).truncated
    assert flags == [False, True, False]


def test_missing_folder_and_unavailable_cuda_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a model folder"):
        Classifier(tmp_path)
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            pick_device("cuda")


def test_a_student_with_other_labels_is_refused_for_serving(tmp_path, tiny_pair):
    from tiny_models import LABELS, build_tiny
    from transformers import AutoConfig

    from serving.classify.student import load_student
    from serving.config import CascadeConfig

    other = build_tiny(tmp_path / "other", seed=4, mean_pool=True)
    config = AutoConfig.from_pretrained(other)
    config.id2label = {i: f"topic{i}" for i in range(5)}
    config.save_pretrained(other)
    with pytest.raises(ValueError, match="differ from the serving labels"):
        load_student(other, CascadeConfig(threshold=0.5), "cpu", None, LABELS)
    assert (
        load_student(tiny_pair[0], CascadeConfig(threshold=0.5), "cpu", None, LABELS).rule.value
        == 0.5
    )


class CountingTokenizer:
    """Wraps a tokenizer and counts how many texts go through it (the seam of the test)."""

    def __init__(self, inner):
        self.inner, self.texts = inner, 0

    def __call__(self, texts, *args, **kwargs):
        self.texts += 1 if isinstance(texts, str) else len(texts)
        return self.inner(texts, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


MIXED = ["short", "word " * 100, "a headline of middling length here", "x" * 10, "tok " * 15]


def test_each_input_is_tokenized_once_long_ones_included(tiny_pair):
    model = Classifier(tiny_pair[0], "cpu")  # 64-token window: two of MIXED overflow it
    counting = CountingTokenizer(model.tokenizer)
    model.tokenizer = counting
    prediction = model.predict(MIXED)
    assert counting.texts == len(MIXED)
    assert prediction.truncated == [False, True, False, False, False]
    assert prediction.truncated == model._truncated(MIXED)  # the slow tokenizers' path agrees


def test_length_groups_answer_in_the_callers_order(tiny_pair):
    model = Classifier(tiny_pair[0], "cpu")
    together = model.predict(MIXED).probs
    alone = np.concatenate([model.predict([t]).probs for t in MIXED])
    np.testing.assert_allclose(together, alone, atol=1e-5)
