"""``protege optimize``: a version served through a faster runtime, as a version of its own.

The candidate is the same weights with ``runtime`` set in its manifest (its id says so:
``<version>-onnx``), recalibrated on the task's traffic sample for the version's target.
It is promoted only where, on those inputs (thousands), its escalate-or-not decisions at
its own threshold match the float version's at its threshold on at least
``AGREEMENT_BOUND`` of them and it is faster at batch 1 and batch 32; otherwise nothing
is published. The teacher gets the same treatment with its labels as the decisions, and
its folder's manifest is switched in place.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from distill.eval_sets import cached_probs
from distill.evaluate import predict_all
from distill.gate import make_calibration
from serving.classify.classifier import Classifier
from serving.classify.onnx_runtime import Runtime
from serving.classify.scorers import get_scorer
from serving.contracts.manifest import DefaultTarget, ModelManifest, read_manifest, write_manifest
from serving.contracts.registry import PointerMoved, Registry
from serving.contracts.threshold import FixedTarget, resolve_threshold, should_escalate

AGREEMENT_BOUND = 0.995
MIN_SPEEDUP = 1.05  # at batch 1; at batch 32 it must not be slower
SPEED_SECONDS = 4.0


@dataclass(frozen=True)
class Trial:
    version: str
    runtime: str
    inputs: int
    agreement: float
    speedup: dict[int, float]
    accepted: bool
    reason: str


def rate(model: Classifier, texts: list[str], batch: int, seconds: float) -> float:
    """Inputs per second through ``model.predict`` in batches of ``batch`` (warmed up)."""
    model.predict(texts[:batch])
    done, began = 0, time.perf_counter()
    while done < 2 * batch or time.perf_counter() - began < seconds:
        start = done % max(1, len(texts) - batch)
        model.predict(texts[start : start + batch])
        done += batch
    return done / (time.perf_counter() - began)


def judge(
    base: Classifier,
    candidate: Classifier,
    texts: list[str],
    base_decisions: np.ndarray,
    decisions: np.ndarray,
    bound: float,
    seconds: float = SPEED_SECONDS,
) -> Trial:
    """Accept ``candidate`` only if its decisions match ``base``'s on at least ``bound`` of
    the inputs and it is measurably faster."""
    agreement = float(np.mean(base_decisions == decisions))
    speedup = {
        b: round(rate(candidate, texts, b, seconds) / rate(base, texts, b, seconds), 3)
        for b in (1, 32)
    }
    accepted, reason = verdict(agreement, speedup, bound)
    return Trial(
        candidate.version, candidate.runtime, len(texts), agreement, speedup, accepted, reason
    )


def verdict(agreement: float, speedup: dict[int, float], bound: float) -> tuple[bool, str]:
    """Accepted only with decisions matching on ``bound`` of the inputs, and faster."""
    if agreement < bound:
        return False, f"decisions agree on {agreement:.2%}, below the bound of {bound:.2%}"
    if speedup[1] < MIN_SPEEDUP or speedup[32] < 1.0:
        return False, f"not faster: {speedup[1]}x at batch 1, {speedup[32]}x at batch 32"
    return (
        True,
        f"decisions agree on {agreement:.2%}; {speedup[1]}x at batch 1, {speedup[32]}x at 32",
    )


def refuse_generative(name: str, manifest: ModelManifest) -> None:
    """Generative versions serve on PyTorch only: the ONNX runtimes here export a
    classifier's single forward pass, not a decode loop with its cache."""
    if manifest.kind != "classify":
        raise ValueError(
            f"{name} is a generative ({manifest.kind}) version; `protege optimize` exports "
            "classifiers to ONNX only, and generative versions are served on PyTorch"
        )


def optimize_student(
    registry: Registry,
    version: str,
    runtime: Runtime,
    texts: list[str],
    teacher: Classifier,
    scorer: str,
    cache: Path,
    bound: float = AGREEMENT_BOUND,
) -> Trial:
    """Stage ``version`` served through ``runtime``, recalibrate, judge; publish and promote
    it (if ``version`` is still current) only when accepted."""
    source = registry.path(version)
    manifest = read_manifest(source)
    if manifest is None or manifest.calibration is None:
        raise ValueError(f"{version} has no calibration to compare decisions against")
    refuse_generative(version, manifest)
    if manifest.runtime != "torch":
        raise ValueError(f"{version} already runs on {manifest.runtime}; optimize its parent")
    if manifest.calibration.kind != "traffic_sample":
        # its threshold rests on weighted live records this command cannot rescore: a
        # candidate recalibrated on the traffic sample would not be judged like for like
        raise ValueError(
            f"{version} is calibrated on live traffic ({manifest.calibration.source}); "
            "optimize recalibrates on the task's traffic sample, so it takes versions "
            "calibrated there (the seed)"
        )
    target = manifest.default_target or DefaultTarget(target_agreement=0.97)
    staged = registry.staging_dir() / f"{version}-{runtime}.staging"
    shutil.rmtree(staged, ignore_errors=True)
    shutil.copytree(source, staged, ignore=shutil.ignore_patterns("_complete.json"))
    candidate_version = f"{version}-{runtime}"
    draft = manifest.model_copy(
        update={"version": candidate_version, "parent": version, "runtime": runtime}
    )
    write_manifest(staged, draft)  # the score cache is keyed by the version id
    try:
        base = Classifier(source, device="cpu")
        candidate = Classifier(staged, device="cpu")
        teacher_labels = cached_probs(teacher, texts, cache, "traffic").argmax(1)
        probs = cached_probs(candidate, texts, cache, "traffic")
        calibration = make_calibration(
            probs, teacher_labels, f"traffic sample: {len(texts)} inputs"
        )
        rule = FixedTarget(scorer=scorer, **target.model_dump())
        served = resolve_threshold(rule, draft.model_copy(update={"calibration": calibration}))
        base_threshold = resolve_threshold(rule, manifest).value
        scores = get_scorer(scorer)
        base_decisions = should_escalate(
            scores(cached_probs(base, texts, cache, "traffic")), base_threshold
        )
        decisions = should_escalate(scores(probs), served.value)
        trial = judge(base, candidate, texts, base_decisions, decisions, bound)
        if not trial.accepted:
            return trial
        figures = {**manifest.eval, "runtime_decision_agreement": trial.agreement}
        write_manifest(
            staged,
            draft.model_copy(
                update={"calibration": calibration, "eval": figures, "created_at": time.time()}
            ),
        )
        if not registry.exists(candidate_version):  # or unfinished: a retry finishes it
            registry.publish(staged)
        try:
            registry.promote(candidate_version, expected=version)
        except PointerMoved:  # a promotion or rollback while this ran stands
            reason = f"published, not promoted: current is {registry.current()}, not {version}"
            return replace(trial, accepted=False, reason=reason)
        return trial
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def optimize_teacher(
    folder: Path,
    runtime: Runtime,
    texts: list[str],
    bound: float = AGREEMENT_BOUND,
    cache: Path | None = None,
) -> Trial:
    """Judge the teacher folder on ``runtime`` (its labels are its decisions); when
    accepted, its manifest switches in place (a new version id, so its answers are
    told apart in the log). With ``cache``, the float answers come from the score cache."""
    manifest: ModelManifest | None = read_manifest(folder)
    if manifest is None or manifest.runtime != "torch":
        raise ValueError(f"{folder}: needs a manifest on the torch runtime (run `protege init`)")
    refuse_generative(str(folder), manifest)
    base = Classifier(folder, device="cpu")
    candidate = Classifier(folder, device="cpu", runtime=runtime)
    base_probs = cached_probs(base, texts, cache, "traffic") if cache else predict_all(base, texts)
    base_labels = base_probs.argmax(1)
    labels = predict_all(candidate, texts).argmax(1)
    trial = judge(base, candidate, texts, base_labels, labels, bound)
    trial = Trial(**{**asdict(trial), "version": f"{manifest.version}-{runtime}"})
    if trial.accepted:
        write_manifest(
            folder,
            manifest.model_copy(
                update={"version": trial.version, "parent": manifest.version, "runtime": runtime}
            ),
        )
    return trial
