"""A replica follows the registry's pointer, or a pin; a failed load never ends it."""

from pathlib import Path
from types import SimpleNamespace

import pytest

from serving.contracts.registry import RegistryError
from serving.follow import PointerFollower


def active(version: str) -> SimpleNamespace:
    return SimpleNamespace(version=version, model=SimpleNamespace(folder=Path("/x") / version))


class Slot:
    """Stands in for StudentSlot: records requests; the test decides how loads end."""

    def __init__(self, version: str) -> None:
        self.active = active(version)
        self.stats = SimpleNamespace(loading=None)
        self.requests: list[tuple[str, float | None]] = []

    def request(self, version: str, folder: Path, threshold: float | None = None) -> bool:
        self.requests.append((version, threshold))
        self.stats.loading = None if version == self.active.version else version
        return True

    def finish(self, ok: bool = True) -> None:
        if ok and self.stats.loading:
            self.active = active(self.stats.loading)
        self.stats.loading = None


class Registry:
    def __init__(self, current: str | None, known: set[str]) -> None:
        self.current, self.known = current, known

    def read(self) -> str | None:
        return self.current

    def path(self, version: str) -> Path:
        if version not in self.known:
            raise RegistryError(f"version {version!r} is not in the registry")
        return Path("/registry") / version


def follower(pointer="v1", known=("v1", "v2", "v3"), active="v1"):
    registry, slot, now = Registry(pointer, set(known)), Slot(active), [0.0]
    follow = PointerFollower(registry.read, registry.path, slot, 60.0, lambda: now[0])
    return follow, registry, slot, now


def test_a_moved_pointer_is_followed_once():
    follow, registry, slot, _ = follower()
    follow.poll()
    assert slot.requests == []  # already serving what the pointer names
    registry.current = "v2"
    follow.poll()
    follow.poll()  # still loading: not asked again
    assert slot.requests == [("v2", None)] and follow.pointer == "v2"
    slot.finish()
    follow.poll()
    assert slot.requests == [("v2", None)]


def test_a_pin_holds_against_the_pointer_and_unpinning_follows_it_again():
    follow, registry, slot, _ = follower()
    follow.configure("v3", None)  # a held rollback
    slot.finish()
    registry.current = "v2"
    follow.poll()
    assert slot.active.version == "v3" and follow.following == "pinned to v3"
    assert follow.pointer == "v2"  # seen, not followed
    follow.configure(None, None)
    assert slot.requests[-1] == ("v2", None)
    assert follow.following == "the registry's current pointer"


def test_a_threshold_change_is_asked_for_the_version_that_serves():
    follow, _, slot, _ = follower()
    follow.configure(None, 0.3)
    assert slot.requests == [("v1", 0.3)]


def test_pinning_an_unknown_version_changes_nothing():
    follow, _, slot, _ = follower()
    with pytest.raises(RegistryError, match="v9"):
        follow.configure("v9", None)
    assert follow.pin is None and slot.requests == []


def test_a_version_that_fails_to_load_is_retried_only_after_a_while():
    follow, registry, slot, now = follower()
    registry.current = "v2"
    follow.poll()
    slot.finish(ok=False)  # the load failed: v1 still serves
    for _ in range(5):
        follow.poll()
    assert slot.requests == [("v2", None)]  # no reload loop
    now[0] += 61
    follow.poll()
    assert slot.requests == [("v2", None), ("v2", None)]  # and the following never ends
    slot.finish()
    assert slot.active.version == "v2"


def test_a_pointer_to_a_version_not_yet_visible_is_tried_again_next_poll():
    follow, registry, slot, _ = follower(known=("v1",))
    registry.current = "v2"
    with pytest.raises(RegistryError):
        follow.poll()
    registry.known.add("v2")
    follow.poll()
    assert slot.requests == [("v2", None)]


def test_a_threshold_change_works_for_a_student_that_is_not_in_the_registry():
    follow, _, slot, _ = follower(pointer=None, known=(), active="seed-from-student-path")
    follow.configure(None, 0.4)  # an empty registry: the serving student stays, in place
    assert slot.requests == [("seed-from-student-path", 0.4)]


def test_a_pin_takes_effect_even_when_the_pointer_cannot_be_read():
    registry, slot = Registry("v1", {"v1", "v2"}), Slot("v1")

    def unreadable() -> str | None:
        raise OSError("the registry's volume is gone")

    follow = PointerFollower(unreadable, registry.path, slot)
    follow.configure("v2", None)
    assert slot.requests == [("v2", None)]
    with pytest.raises(OSError):
        PointerFollower(unreadable, registry.path, Slot("v1")).poll()  # unpinned: retried


def test_the_retry_wait_counts_from_when_the_failure_was_seen():
    follow, registry, slot, now = follower()
    registry.current = "v2"
    follow.poll()
    now[0] += 100  # a load that took longer than the retry interval ...
    slot.finish(ok=False)  # ... and then failed
    follow.poll()
    assert slot.requests == [("v2", None)]  # not retried at once
    now[0] += 61
    follow.poll()
    assert slot.requests == [("v2", None), ("v2", None)]
