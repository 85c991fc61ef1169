import hashlib
import random
import string

import pytest

from distill.splits import bucket, normalise, role_of

SHARE = 0.2


def random_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    alphabet = string.ascii_letters + string.digits + " .,!?éüß"
    return [
        "".join(rng.choice(alphabet) for _ in range(rng.randint(5, 60))) + f" {i}" for i in range(n)
    ]


def test_the_bucket_is_the_sha256_of_the_normalised_text():
    """Pinned to a content hash, never Python's salted hash(): the same on every machine."""
    digest = hashlib.sha256(b"hello world").digest()
    assert bucket("Hello  World") == int.from_bytes(digest[:8], "big") / 2**64


def test_role_is_stable_across_calls():
    texts = random_texts(200, seed=1)
    first = [role_of(t, SHARE) for t in texts]
    assert [role_of(t, SHARE) for t in texts] == first
    assert [role_of(t, SHARE) for t in reversed(texts)] == first[::-1]


@pytest.mark.parametrize(
    "variant",
    [
        "hello world",
        "Hello  World",
        "  HELLO\tworld\n",
        "ｈｅｌｌｏ　ｗｏｒｌｄ",  # full-width letters and space: NFKC-equivalent
        "HELLO WORLD",
    ],
)
def test_case_whitespace_and_compatibility_forms_do_not_change_the_role(variant):
    assert normalise(variant) == "hello world"
    assert bucket(variant) == bucket("hello world")
    assert role_of(variant, SHARE) == role_of("hello world", SHARE)


def test_composed_and_decomposed_accents_share_a_role():
    composed, decomposed = "Caf\u00e9 ﬁle", "cafe\u0301 file"  # é vs e + accent, ligature
    assert normalise(composed) == normalise(decomposed)
    assert bucket(composed) == bucket(decomposed)


def test_different_texts_get_different_buckets():
    texts = random_texts(2000, seed=2)
    assert len({bucket(t) for t in texts}) == len(texts)
    assert all(0.0 <= bucket(t) < 1.0 for t in texts)


def test_shares_follow_eval_share():
    texts = random_texts(20_000, seed=3)
    roles = [role_of(t, SHARE) for t in texts]
    n = len(texts)
    # binomial sd at n=20k is below 0.003: these tolerances are about 4 sd
    assert roles.count("train") / n == pytest.approx(1 - SHARE, abs=0.012)
    assert roles.count("calibration") / n == pytest.approx(SHARE / 2, abs=0.01)
    assert roles.count("gate") / n == pytest.approx(SHARE / 2, abs=0.01)


def test_zero_share_trains_on_everything():
    assert {role_of(t, 0.0) for t in random_texts(500)} == {"train"}


@pytest.mark.parametrize("share", [-0.1, 1.0, 1.5, float("nan")])
def test_invalid_share_raises(share):
    with pytest.raises(ValueError, match="eval_share"):
        role_of("hello", share)


def test_the_eval_share_is_pinned_to_a_registry(tmp_path):
    from distill.splits import check_share
    from serving.contracts.storage import LocalStore

    check_share(LocalStore(tmp_path), 0.2)
    check_share(LocalStore(tmp_path), 0.2)  # the same share: fine
    with pytest.raises(ValueError, match="evaluate on texts already trained on"):
        check_share(LocalStore(tmp_path), 0.5)
