"""The student slot without Ray: background load, one-reference swap, refusals."""

import threading

import pytest
from polling import wait_for
from tiny_models import build_tiny

from serving.config import CascadeConfig
from serving.hot_swap import StudentSlot, import_loader, load_student
from serving.manifest import weights_digest

CASCADE = CascadeConfig(threshold=0.5)


@pytest.fixture()
def slot(tiny_pair):
    return StudentSlot(load_student(tiny_pair[0], CASCADE, "cpu", None, None), CASCADE, "cpu", None)


def test_swap_happens_in_the_background_and_replaces_one_reference(slot, tmp_path):
    gate = threading.Event()
    other = build_tiny(tmp_path / "other", seed=21, mean_pool=True)
    version = weights_digest(other)

    def held_loader(*args):
        gate.wait(30)
        return load_student(*args)

    slot._loader = held_loader
    old = slot.active
    assert slot.request(version, other)
    assert slot.stats.loading == version and slot.active is old  # still serving the old one
    assert not slot.request(version, other)  # asked twice: nothing more happens
    gate.set()
    wait_for(lambda: slot.active.version == version)
    assert slot.stats.swaps == 1 and slot.stats.loading is None
    assert not slot.request(version, other)  # the serving version: no reload


def test_broken_version_is_refused_and_the_old_keeps_serving(slot, tmp_path):
    broken = build_tiny(tmp_path / "broken", seed=22, mean_pool=True)
    (broken / "model.safetensors").write_bytes(b"garbage")
    old = slot.active
    assert slot.request("student-broken", broken)
    wait_for(lambda: slot.stats.failures == 1)
    assert slot.active is old and "student-broken" in (slot.stats.last_error or "")
    assert slot.stats.loading is None


def test_a_folder_holding_another_version_is_refused(slot, tmp_path):
    other = build_tiny(tmp_path / "other", seed=23, mean_pool=True)
    slot.request("student-not-this-one", other)
    wait_for(lambda: slot.stats.failures == 1)
    assert "holds version" in (slot.stats.last_error or "")


def test_threshold_override_applies_to_the_new_version(slot, tmp_path):
    other = build_tiny(tmp_path / "other", seed=24, mean_pool=True)
    slot.request(weights_digest(other), other, threshold=0.25)
    wait_for(lambda: slot.stats.swaps == 1)
    assert slot.active.rule.value == 0.25


def test_loader_import_errors_are_clear():
    with pytest.raises(ValueError, match="cannot be imported"):
        import_loader("nowhere.module:load")
    assert import_loader("serving.hot_swap:load_student") is load_student
