"""The student slot without Ray: background load, one-reference swap, refusals."""

import threading

import pytest
from polling import wait_for
from tiny_models import build_tiny

from serving.classify.student import load_student
from serving.config import CascadeConfig
from serving.contracts.manifest import weights_digest
from serving.hot_swap import StudentSlot, import_loader

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


def held(gates: dict[str, threading.Event]):
    """A loader that waits on the gate of the folder's name before loading."""

    def loader(folder, *args):
        gates[folder.name].wait(30)
        return load_student(folder, *args)

    return loader


def test_a_slow_load_finishing_last_never_lands_over_the_latest_request(slot, tmp_path):
    a = build_tiny(tmp_path / "a", seed=31, mean_pool=True)
    b = build_tiny(tmp_path / "b", seed=32, mean_pool=True)
    gates = {"a": threading.Event(), "b": threading.Event()}
    slot._loader = held(gates)
    assert slot.request(weights_digest(a), a)  # slow A
    assert slot.request(weights_digest(b), b)  # then B, asked for last
    gates["b"].set()  # B loads first and swaps in
    wait_for(lambda: slot.active.version == weights_digest(b))
    gates["a"].set()  # A finishes after it: discarded, B keeps serving
    wait_for(lambda: slot.stats.superseded == 1)
    assert slot.active.version == weights_digest(b)
    assert slot.stats.swaps == 1 and slot.stats.loading is None


def test_a_promote_then_a_rollback_to_the_serving_version_ends_on_the_rollback(slot, tmp_path):
    serving = slot.active.version
    a = build_tiny(tmp_path / "a", seed=33, mean_pool=True)
    gates = {"a": threading.Event()}
    slot._loader = held(gates)
    assert slot.request(weights_digest(a), a)  # promote A (slow)
    assert slot.request(serving, slot.active.model.folder)  # roll back: in place, at once
    assert slot.stats.loading is None and slot.active.version == serving
    gates["a"].set()
    wait_for(lambda: slot.stats.superseded == 1)
    assert slot.active.version == serving and slot.stats.swaps == 0


def test_a_threshold_only_update_applies_in_place_without_a_load(slot):
    model = slot.active.model
    slot._loader = lambda *args: pytest.fail("a threshold change must not load anything")
    assert slot.request(slot.active.version, model.folder, threshold=0.2)
    assert slot.active.model is model and slot.active.rule.value == 0.2
    assert not slot.request(slot.active.version, model.folder, threshold=0.2)  # twice: no-op
    assert slot.request(slot.active.version, model.folder)  # back to the configured rule
    assert slot.active.rule.value == 0.5


def test_errors_shown_by_the_api_carry_no_file_system_path(slot, tmp_path):
    broken = build_tiny(tmp_path / "broken", seed=34, mean_pool=True)
    (broken / "model.safetensors").write_bytes(b"garbage")
    slot.request("student-broken", broken)
    wait_for(lambda: slot.stats.failures == 1)
    assert str(tmp_path) not in (slot.stats.last_error or "")


def test_loader_import_errors_are_clear():
    with pytest.raises(ValueError, match="cannot be imported"):
        import_loader("nowhere.module:load")
    assert import_loader("serving.classify.student:load_student") is load_student


def test_a_refused_threshold_update_changes_nothing(slot, monkeypatch):
    import serving.hot_swap

    model, rule = slot.active.model, slot.active.rule

    def no_rule(*_):
        raise ValueError("no calibration for this target")

    monkeypatch.setattr(serving.hot_swap, "resolve_threshold", no_rule)
    assert not slot.request(slot.active.version, model.folder, threshold=0.3)
    assert slot.active.rule is rule and slot.stats.failures == 1
    assert "no calibration" in (slot.stats.last_error or "")
    monkeypatch.undo()
    assert slot.request(slot.active.version, model.folder, threshold=0.3)  # retry applies
    assert slot.active.rule.value == 0.3
