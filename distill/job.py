"""One distillation run: window -> train a candidate -> evaluate both -> gate -> publish.

    protege distill run --config deploy/distill.yaml

Nothing is half-published: the candidate is built in the registry's staging folder and
moved in whole; the current pointer moves last; a crash anywhere leaves the old current.
The run report (registry/runs/<run id>.json) says what happened and why.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import AutoModelForSequenceClassification, AutoTokenizer

from distill import gate, metrics, recalibrate
from distill.config import DistillConfig
from distill.dataset import Window, read_watermark, read_window, write_watermark
from distill.eval_sets import cached_probs
from distill.finetune import TrainSettings, fine_tune
from distill.generate_config import GenerateDistillConfig
from distill.judge import Judge
from distill.lock import Lease, run_lock
from distill.offline_labels import OfflineLabels
from distill.scorer_check import check_scorer
from distill.splits import check_share, normalise
from distill.tables import read_labelled
from serving.classify import meanpool
from serving.classify.classifier import Classifier, pick_device
from serving.contracts.log_shipping import fetch_shipped
from serving.contracts.manifest import (
    DefaultTarget,
    ModelManifest,
    weights_digest,
    write_manifest,
)
from serving.contracts.registry import PointerMoved, Registry, RegistryError
from serving.contracts.storage import is_remote, open_store

logger = logging.getLogger(__name__)


def run(config: DistillConfig) -> dict[str, Any]:
    """Run once; returns the run report (also written to the registry)."""
    return run_under_lease(
        config, lambda registry, run_id, lease: _run_locked(config, registry, run_id, lease)
    )


LockedRun = Callable[[Registry, str, Lease], dict[str, Any]]
"""(registry, run id, the held lease) -> the run's report (without its id and timing)."""


def run_under_lease(
    config: DistillConfig | GenerateDistillConfig, locked: LockedRun, kind: str | None = None
) -> dict[str, Any]:
    """Every kind's run envelope: the store checked, the lease held, a failure written as a
    ``failed`` report before it is raised, the report written to the registry and pushed.
    ``kind`` is recorded in the report (and groups the pushed metrics) when given."""
    registry = Registry(
        config.registry, cache_dir=config.work_dir / "registry", endpoint_url=config.s3_endpoint
    )
    registry.store.check()  # unreachable: a clear error naming it, before anything else
    registry.store.check_conditional_writes()  # the lease and the pointer need them
    run_id = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
    tag = {"kind": kind} if kind else {}
    began = time.time()
    with run_lock(registry.store) as lease:
        try:
            report = locked(registry, run_id, lease)
        except Exception as exc:
            failed = {
                "run_id": run_id,
                **tag,
                "result": "failed",
                "reason": f"{type(exc).__name__}: {exc}",
                "seconds": round(time.time() - began, 1),
                "finished_at": time.time(),
            }
            registry.write_run(run_id, failed)
            metrics.push(config.pushgateway, failed, registry.runs())
            raise
    seconds = round(time.time() - began, 1)
    report = {"run_id": run_id, **tag, **report, "seconds": seconds, "finished_at": time.time()}
    registry.write_run(run_id, report)
    metrics.push(config.pushgateway, report, registry.runs())
    return report


def open_window(
    config: DistillConfig | GenerateDistillConfig,
    registry: Registry,
    read: Callable[..., Window[Any]],
    replay: int,
    first_step: str,
) -> tuple[str, Window[Any]]:
    """The current version and the window after the watermark (``read`` is the kind's
    reader), the evaluation share and the scorer checked; ``first_step`` says how to get a
    current version when there is none."""
    current = registry.current()
    if current is None:
        raise RegistryError(f"registry {registry.uri} has no current student: {first_step}")
    check_share(registry.store, config.eval.share)
    watermark = read_watermark(registry.store)
    window = read(
        log_folder(config),
        watermark,
        eval_share=config.eval.share,
        replay=replay,
        seed=config.train.seed + len(watermark),
        max_eval=config.eval.max_records,
    )
    check_scorer(window.evaluation, config.scorer)  # one scorer, or the run stops here
    return current, window


def log_folder(config: DistillConfig | GenerateDistillConfig) -> Path:
    """The log as a local folder: shipped segments of an object store are downloaded into
    ``work_dir`` first (they never change, so only new ones are fetched)."""
    if not is_remote(config.log_dir):
        return Path(config.log_dir)
    store = open_store(config.log_dir, config.s3_endpoint)
    store.check()
    name = hashlib.sha256(config.log_dir.encode()).hexdigest()[:12]
    return fetch_shipped(store, config.work_dir / "log" / name)


def _run_locked(
    config: DistillConfig, registry: Registry, run_id: str, lease: Lease
) -> dict[str, Any]:
    current, window = open_window(
        config,
        registry,
        read_window,
        config.replay.earlier_records,
        "run `protege init TASK.yaml` (or `protege registry import FOLDER --promote`) first",
    )
    stop = window_stop(
        window,
        current,
        config.min_records,
        config.gate.min_sampled,
        "sampled confident records",
        "cascade.audit_fraction",
    )
    if stop is not None:
        return stop
    teacher = Classifier(config.teacher, device=config.device, max_tokens=config.train.max_tokens)
    labeller = OfflineLabels(teacher, config.scores_dir)
    texts, soft, labels = _training_set(config, window, labeller)
    audits = metrics.offline_audit_agreement(window.new, labeller)  # pushed for operations
    staged, losses, nodes = _train_candidate(config, registry, current, texts, soft, labels, run_id)
    try:
        if not lease.renew():
            return lease_lost(current)
        report = _judge_and_publish(
            config, registry, current, labeller, staged, window, losses, texts, lease
        )
        return {
            **report,
            "train_workers": config.train.workers,
            "train_nodes": nodes,
            "audit_agreement": audits,
        }
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def window_stop(
    window: Window[Any],
    current: str,
    min_records: int,
    min_sampled: int,
    sampled_what: str,
    audit_field: str,
) -> dict[str, Any] | None:
    """The run's report when its window cannot make a run (too few new records, or too
    few sampled records in the gate split: checked before any training), else None."""
    if len(window.new) < min_records:
        return {
            "result": "nothing-to-do",
            "reason": f"{len(window.new)} new records, fewer than min_records={min_records}",
            "current": current,
            "window": window.describe(),
        }
    sampled = sum(r.reason == "audit" for r in window.evaluation["gate"])
    if sampled < max(1, min_sampled):
        return {  # the records stay unconsumed: they train once the evidence is there
            "result": "not-enough-evidence",
            "reason": f"{sampled} {sampled_what} in the gate split, fewer than "
            f"min_sampled={min_sampled} (raise {audit_field} or serve more traffic; the new "
            "records wait for the next run)",
            "current": current,
            "window": window.describe(),
        }
    return None


def lease_lost(current: str) -> dict[str, Any]:
    """Another run took the lease over (this one stopped renewing in time): it publishes,
    promotes and consumes nothing, and leaves the registry to that run."""
    return {
        "result": "lease-lost",
        "reason": "this run's lease was taken over by another run: nothing published",
        "current": current,
    }


def _training_set(
    config: DistillConfig, window: Window, labeller: OfflineLabels
) -> tuple[list[str], list[list[float]], list[int]]:
    """Soft targets are the teacher's distributions (logged, or asked now for records whose
    teacher was skipped or failed); hard labels are gold where a record has one, else the
    teacher's. Labelled replay examples (the seed's training set) join every run."""
    held_out = _gold_texts(config, labeller.labels)
    records = [
        r for r in labeller.usable(window.new + window.replay) if normalise(r.text) not in held_out
    ]
    soft_probs = labeller.probs(records)
    labels = labeller.labels
    texts = [r.text for r in records]
    hard = [
        labels.index(r.gold_label) if r.gold_label in labels else int(p.argmax())
        for r, p in zip(records, soft_probs, strict=True)
    ]
    soft = soft_probs.tolist()
    if config.replay.examples is not None:
        examples = read_labelled(config.replay.examples, labels)
        kept = [(t, y) for t, y in zip(*examples, strict=True) if normalise(t) not in held_out]
        ex_texts, ex_labels = [t for t, _ in kept], [y for _, y in kept]
        texts += ex_texts
        soft += cached_probs(labeller.teacher, ex_texts, config.scores_dir, "replay").tolist()
        hard += ex_labels
    return texts, soft, hard


def _gold_texts(config: DistillConfig, labels: list[str]) -> set[str]:
    """The gold file's texts, normalised: never trained on, or gold accuracy would flatter
    the candidate (a gold file is often a labelled sample of the same traffic)."""
    if config.gold is None:
        return set()
    return {normalise(t) for t in read_labelled(config.gold, labels)[0]}


def _train_candidate(
    config: DistillConfig,
    registry: Registry,
    current: str,
    texts: list[str],
    soft: list[list[float]],
    labels: list[int],
    run_id: str,
) -> tuple[Path, list[float], int]:
    """Fine-tune a copy of the current student; returns its staging folder, its losses and
    how many Ray nodes trained it."""
    meanpool.register()
    source = registry.path(current)
    model = AutoModelForSequenceClassification.from_pretrained(source, use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(source)
    t = config.train
    settings = TrainSettings(
        **t.model_dump(exclude={"workers", "storage_path", "placement_strategy"}),
        **config.loss.model_dump(),
    )
    if t.workers > 1:
        from distill.ray_train import train_with_ray

        storage = t.storage_path or (
            f"{registry.uri}/train-runs"
            if registry.local is None
            else str((registry.local / "train-runs").resolve())
        )
        losses, nodes = train_with_ray(
            model,
            tokenizer,
            texts,
            labels,
            soft,
            settings,
            t.workers,
            storage,
            config.s3_endpoint,
            t.placement_strategy,
        )
        on_nodes = len(nodes)
    else:
        on_nodes = 1
        losses = fine_tune(
            model,
            tokenizer,
            texts,
            labels,
            settings,
            pick_device(config.device),
            desc=f"distil {current}",
            soft_targets=soft,
        )
    staged = registry.staging_dir() / run_id
    shutil.rmtree(staged, ignore_errors=True)
    model.save_pretrained(staged)
    tokenizer.save_pretrained(staged)
    return staged, losses, on_nodes


def _judge_and_publish(
    config: DistillConfig,
    registry: Registry,
    current: str,
    labeller: OfflineLabels,
    staged: Path,
    window: Window,
    losses: list[float],
    trained_texts: list[str],
    lease: Lease,
) -> dict[str, Any]:
    examples = len(trained_texts)
    suffix = "" if config.runtime == "torch" else f"-{config.runtime}"
    candidate = f"student-{weights_digest(staged)}{suffix}"
    training = {
        "window": window.describe(),
        "examples": examples,
        "epoch_losses": losses,
        "loss": config.loss.model_dump(),
        "train": config.train.model_dump(),
        "watermark": window.watermark,
    }
    manifest = ModelManifest(  # written before judging: the score cache is keyed by version
        version=candidate,
        role="student",
        parent=current,
        created_at=time.time(),
        labels=labeller.labels,
        max_tokens=config.train.max_tokens,
        runtime=config.runtime,
        default_target=DefaultTarget(target_agreement=config.gate.target_agreement),
        training=training,
    )
    write_manifest(staged, manifest)
    # the candidate learned this run's texts and, through its lineage, every consumed one
    trained_on = {normalise(t) for t in trained_texts} | window.consumed_texts
    judge = Judge(config, labeller, window, trained_on)
    current_judged, _ = judge(registry.path(current))
    candidate_judged, calibration = judge(staged)
    decision = gate.decide(
        current_judged, candidate_judged, judge.gate_set, config.gate, judge.teacher_gold_correct
    )
    figures = decision.as_dict()
    if decision.candidate is None:  # too few usable sampled records: nothing consumed
        return {
            "result": "not-enough-evidence",
            "reason": decision.reason,
            "current": current,
            "candidate": candidate,
            "window": window.describe(),
        }
    flat = {name: flat_figures(figures.get(name)) for name in ("current", "candidate")}
    if not lease.renew():  # checked again before anything is written
        return lease_lost(current)
    if decision.promote:
        write_manifest(
            staged,
            manifest.model_copy(
                update={
                    "calibration": calibration,
                    "eval": {k: v for k, v in flat["candidate"].items() if isinstance(v, float)},
                }
            ),
        )
        registry.publish(staged)
    result, reason = decision_result(registry, decision, candidate, current, lease, window)
    followed: dict[str, Any] = {}
    if result == "rejected":  # thresholds follow the traffic
        followed = _follow_traffic(config, registry, current, judge, labeller, lease)
        if followed.get("result") in ("recalibrated", "superseded"):
            result = followed["result"]
            reason += f"; {followed['reason']}"
    return {
        "result": result,
        "reason": reason,
        **({"recalibration": followed} if followed else {}),
        "current": current,
        "candidate": candidate,
        "window": window.describe(),
        "training_examples": examples,
        "epoch_losses": losses,
        "eval": {k: v for k, v in flat.items() if v},
        "decision": figures,
        "calibration": {
            "kind": calibration.kind,
            "source": calibration.source,
            "inputs": len(calibration.agrees_with_teacher),
            "trained_texts_dropped": judge.traffic_dropped,
        },
        "offline_labelled": labeller.asked,
    }


def _follow_traffic(
    config: DistillConfig,
    registry: Registry,
    current: str,
    judge: Judge,
    labeller: OfflineLabels,
    lease: Lease,
) -> dict[str, Any]:
    """When the current version's served agreement, on the calibration-split records it
    served at its own threshold for the gate's target, has drifted from the target, publish
    its weights recalibrated on those records. Never fails the run (it has consumed its
    window already): a store error is reported here."""
    target = config.gate.target_agreement
    manifest = registry.manifest(current)
    if manifest.calibration is None:
        return {"result": "kept", "reason": f"{current} has no calibration to follow"}
    try:
        threshold = manifest.calibration.threshold(config.scorer, target_agreement=target)
        records = recalibrate.served_records(judge.cal_records, current, threshold)
        sampled = sum(r.reason == "audit" for r in records)
        needed = config.eval.min_calibration_sampled
        if sampled < max(1, needed):
            return {
                "result": "kept",
                "reason": f"{sampled} sampled calibration records that {current} served at its "
                f"threshold for the {target:.1%} target, fewer than {needed}: no evidence of drift",
            }
        teacher = labeller.probs(records).argmax(1)
        drift = recalibrate.served_agreement(
            records,
            teacher,
            threshold,
            target,
            config.gate.agreement_margin,
            config.gate.bootstrap_draws,
            config.gate.seed,
        )
        evidence = {
            **drift.as_dict(),
            "reason": f"served agreement {drift.served} against the target {target:.1%} "
            f"(margin {config.gate.agreement_margin:.1%}) on the calibration split's records "
            f"that {current} served",
        }
        if not drift.drifted:
            return {"result": "kept", **evidence}
        if not lease.renew():
            return {"result": "lease-lost", **evidence}
        calibration = recalibrate.recalibration(drift, teacher)
        result, version = recalibrate.publish_recalibrated(
            registry, current, calibration, drift, still_held=lease.renew
        )
    except Exception as exc:  # the store, a lease check: reported, the run stands
        logger.warning("recalibrating %s failed: %r", current, exc)
        return {"result": "failed", "reason": f"recalibration failed: {type(exc).__name__}: {exc}"}
    return {
        **evidence,
        "result": result,
        "version": version,
        "reason": f"{evidence['reason']}: published {version}, recalibrated on "
        f"{calibration.source}" + ("" if result == "recalibrated" else f" ({result})"),
    }


def decision_result(
    registry: Registry,
    decision: Any,
    candidate: str,
    current: str,
    lease: Lease | None = None,
    window: Window | None = None,
) -> tuple[str, str]:
    """Promote a candidate the gate accepted, only while this run still holds the lease
    (asked just before) and only if the pointer still names the version the run started
    from: a rollback during the run is never undone by it. A promotion whose answer was
    lost is a promotion (the registry re-reads the pointer's move id). Then ``window`` is
    consumed, promoted or not, by compare-and-set on the watermark this run read."""
    if not decision.promote:
        result, reason = "rejected", decision.reason
    elif lease is not None and not lease.renew():  # nothing promoted, nothing consumed
        return "lease-lost", (
            f"this run's lease was taken over by another run before it promoted: {candidate} "
            "is published, not promoted; its records are left to that run"
        )
    else:
        try:
            registry.promote(candidate, expected=current)
            result, reason = "promoted", decision.reason
        except PointerMoved as exc:
            result, reason = "superseded", f"{decision.reason}; but {exc}"
    if window is not None and not write_watermark(registry.store, window.watermark, window.read):
        reason += (
            "; the watermark moved since this run read it (another run consumed records "
            "meanwhile): left as it is"
        )
    return result, reason


def flat_figures(figures: Any) -> dict[str, Any]:
    """{figure: value} from a StudentFigures dict (intervals stay in the decision)."""
    if not isinstance(figures, dict):
        return {}
    return {k: (v["value"] if isinstance(v, dict) else v) for k, v in figures.items()}
