"""The student slot: which student answers, and swapping it with no failed or stalled request.

Ray Serve calls ``reconfigure()`` on the live replica when only ``user_config`` changes,
and blocks that replica while it runs. So a swap only *starts* there: the new version
loads, is validated (labels, output shape, a warm-up batch) and is calibrated in a
background thread; then one reference is replaced. Requests read the reference once per
batch, so in-flight work finishes on the old model. A version that fails to load or
validate is rejected and logged; the old one keeps serving.

The latest request wins: every request takes a new generation number, and a load installs
its version only if no later request came in while it loaded (a slow load of A finishing
after a fast load of B is discarded, so a promote quickly followed by a rollback ends on
the rollback). A request for the version already serving changes its threshold in place,
with no load. Asking again for exactly what is loading does nothing, since Serve may call
``reconfigure()`` twice on a new replica.
"""

from __future__ import annotations

import importlib
import logging
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from serving.contracts.manifest import ModelManifest
from serving.contracts.threshold import ThresholdRule, ThresholdSettings, resolve_threshold

logger = logging.getLogger("ray.serve")
DEFAULT_LOADER = "serving.classify.student:load_student"


class SlotCascade(ThresholdSettings, Protocol):
    """What the slot needs of a cascade's config, whatever its kind (a pydantic model such
    as :class:`serving.config.CascadeConfig` or the generative cascade's config): the
    threshold settings, and a copy with a threshold override."""

    def model_copy(
        self, *, update: Mapping[str, Any] | None = None, deep: bool = False
    ) -> SlotCascade: ...


class StudentModel(Protocol):
    """What the slot needs of a loaded student, whatever its kind."""

    @property
    def version(self) -> str: ...
    @property
    def manifest(self) -> ModelManifest | None: ...


@dataclass(frozen=True)
class ActiveStudent:
    model: Any  # a StudentModel of the cascade's kind (a Classifier, a LanguageModel...)
    rule: ThresholdRule

    @property
    def version(self) -> str:
        return self.model.version


@dataclass
class SwapStats:
    swaps: int = 0
    failures: int = 0
    superseded: int = 0  # loads discarded because a later request came in
    last_error: str | None = None
    last_swap_seconds: float | None = None
    loading: str | None = None
    history: list[str] = field(default_factory=list)


Loader = Callable[[Path, Any, str, "int | None", "list[str] | None"], ActiveStudent]
"""(folder, the cascade's config, device, max tokens, the labels served or None) to the
loaded, validated student; raises with the reason when it is unfit."""


def import_loader(path: str) -> Loader:
    """``module:function`` to the loader it names, with a clear error when it does not exist."""
    module, _, name = path.partition(":")
    try:
        loader = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ValueError(f"student_loader {path!r} cannot be imported: {exc}") from None
    if not callable(loader):
        raise ValueError(f"student_loader {path!r} is not callable")
    return loader


_PATH = re.compile(r"(?:[A-Za-z]:)?[/\\][^\s'\",:]+")


def without_paths(text: str, limit: int = 300) -> str:
    """An error for /v1/models: file-system paths replaced, length bounded."""
    return _PATH.sub("<path>", text)[:limit]


class StudentSlot:
    def __init__(
        self,
        initial: ActiveStudent,
        cascade: SlotCascade,
        device: str,
        max_tokens: int | None,
        loader: Loader | None = None,
        on_result: Callable[[str, float], None] | None = None,
    ):
        self.active = initial
        self._loader = loader or import_loader(DEFAULT_LOADER)
        self._on_result = on_result or (lambda result, seconds: None)
        self.stats = SwapStats(history=[initial.version])
        self._cascade, self._device, self._max_tokens = cascade, device, max_tokens
        self._lock = threading.Lock()
        self._generation = 0
        self._wanted: tuple[str, float | None] = (initial.version, None)

    def request(self, version: str, folder: Path, threshold: float | None = None) -> bool:
        """Make ``version`` (with an optional threshold override) the one that serves:
        in place for the serving version, else loaded in the background. False if this is
        exactly what is already serving or loading."""
        cascade = self._cascade_for(threshold)
        with self._lock:
            if (version, threshold) == self._wanted and (
                self.stats.loading == version or self.active.version == version
            ):
                return False
            rule = None
            if version == self.active.version:  # resolved before any state changes
                try:
                    rule = resolve_threshold(cascade, self.active.model.manifest)
                except ValueError as exc:
                    self.stats.failures += 1
                    self.stats.last_error = without_paths(f"{version}: {exc}")
                    logger.error("threshold update refused: %s", exc)
                    return False
            self._generation += 1
            generation, self._wanted = self._generation, (version, threshold)
            if rule is not None:  # a threshold change, or back to this one
                self.stats.loading = None
                self.active = ActiveStudent(self.active.model, rule)
                logger.info("student %s now at %s", version, self.active.rule.description)
                self._on_result("success", 0.0)
                return True
            self.stats.loading = version
        thread = threading.Thread(
            target=self._load,
            args=(version, folder, cascade, generation),
            daemon=True,
            name=f"swap-{version}",
        )
        thread.start()
        return True

    def wait(self, timeout_s: float) -> None:
        """Until no load is in progress (or ``timeout_s``): for a replica's first
        configuration, which must serve the version asked for from its first request."""
        deadline = time.monotonic() + timeout_s
        while self.stats.loading is not None and time.monotonic() < deadline:
            time.sleep(0.05)

    def _cascade_for(self, threshold: float | None) -> SlotCascade:
        if threshold is None:
            return self._cascade
        return self._cascade.model_copy(
            update={
                "threshold": threshold,
                "target_escalation_rate": None,
                "target_agreement": None,
            }
        )

    def _load(self, version: str, folder: Path, cascade: SlotCascade, generation: int) -> None:
        began = time.perf_counter()
        try:
            candidate = self._loader(
                folder,
                cascade,
                self._device,
                self._max_tokens,
                getattr(self.active.model, "labels", None),
            )
            if candidate.version != version:
                raise ValueError(f"its folder holds version {candidate.version}, not {version}")
        except Exception as exc:  # any failure: keep serving the old version
            with self._lock:
                self.stats.failures += 1
                self.stats.last_error = without_paths(f"{version}: {exc}")
                if generation == self._generation:
                    self.stats.loading = None
            logger.error(
                "hot swap to %s rejected, still serving %s: %s", version, self.active.version, exc
            )
            self._on_result("failure", time.perf_counter() - began)
            return
        with self._lock:
            if generation != self._generation:  # a later request won: never install this
                self.stats.superseded += 1
                logger.info("load of %s finished after a later request: discarded", version)
                return
            previous = self.active.version
            self.active = candidate  # the swap: one reference
            self.stats.swaps += 1
            self.stats.last_swap_seconds = time.perf_counter() - began
            self.stats.loading = None
            self.stats.history.append(version)
        logger.info("hot swap %s -> %s in %.2f s", previous, version, self.stats.last_swap_seconds)
        self._on_result("success", time.perf_counter() - began)
