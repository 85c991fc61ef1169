import numpy as np
import pytest

from serving.generate.agreement import (
    DEFAULT_AGREEMENT_CUT,
    UnicodeWordTokenizer,
    agreements,
    agrees,
    rouge_l,
    rouge_l_many,
)


def test_tokens_are_casefolded_unicode_words():
    tokenize = UnicodeWordTokenizer().tokenize
    assert tokenize("Hello, World!") == ["hello", "world"]
    assert tokenize("Привет, МИР.") == ["привет", "мир"]
    assert tokenize("Straße") == ["strasse"]
    assert tokenize("猫坐在垫子上。") == ["猫", "坐", "在", "垫", "子", "上"]
    assert tokenize("カタカナ and 한국어 문장") == ["カ", "タ", "カ", "ナ", "and", "한국어", "문장"]
    assert tokenize("Cafe\u0301 2024") == ["café", "2024"]


def test_latin():
    assert rouge_l("The cat sat on the mat.", "the cat sat on the mat") == 1.0
    # LCS "the cat the mat": 4 of 6 tokens on each side
    assert rouge_l("The cat sat on the mat", "the cat lay upon the mat") == pytest.approx(4 / 6)
    assert rouge_l("markets rose", "football results") == 0.0


def test_non_latin_answers_score_like_latin_ones():
    assert rouge_l("Кошка сидит на ковре.", "кошка сидит на ковре") == 1.0
    assert rouge_l("Кошка сидит на ковре", "Кошка лежит на ковре") == pytest.approx(3 / 4)
    assert rouge_l("猫坐在垫子上", "猫坐在椅子上") == pytest.approx(5 / 6)
    assert rouge_l("Ελληνικά κείμενα", "ελληνικα") == 0.0  # accents are kept: different words


def test_case_and_punctuation_never_count():
    assert rouge_l("HELLO... World?!", "hello world") == 1.0
    assert rouge_l("«Да!»", "да") == 1.0


def test_empty_texts():
    assert rouge_l("", "") == 1.0  # two answers without a word agree
    assert rouge_l("...", "!") == 1.0
    assert rouge_l("", "something") == 0.0
    assert rouge_l("something", "") == 0.0


def test_symmetric():
    a, b = "the cat sat on the mat today", "a cat was on a mat"
    assert rouge_l(a, b) == pytest.approx(rouge_l(b, a))


def test_agrees_at_the_cut():
    assert DEFAULT_AGREEMENT_CUT == 0.5
    assert agrees("the cat sat", "the cat lay")  # 2/3
    assert not agrees("the cat sat", "a dog lay")
    assert agrees("a b", "a c", cut=0.5)  # exactly 0.5 agrees
    assert not agrees("a b", "a c", cut=0.51)


def test_lists():
    students = ["the cat sat", "Кошка сидит", "", "x"]
    teachers = ["the cat sat", "кошка лежит", "", "y"]
    np.testing.assert_allclose(rouge_l_many(students, teachers), [1.0, 0.5, 1.0, 0.0])
    assert agreements(students, teachers).tolist() == [True, True, True, False]
    with pytest.raises(ValueError, match="equal length"):
        rouge_l_many(["a"], [])
