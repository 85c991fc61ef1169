"""How often the promotion gate is right: the real gate code on simulated logs.

The population model (one line per input):

- a request of ``request_size`` inputs shares part of their difficulty: an input's
  difficulty is ``d = sqrt(rho) * r + sqrt(1 - rho) * e`` with ``r`` the request's and ``e``
  the input's own standard normal draw (``rho = within_request``);
- a student of skill ``s`` has, per input, a margin ``x = s - d + noise * z`` (``z`` its own
  standard normal draw), answers as the teacher with probability ``sigmoid(sharpness * x)``
  and reports the confidence ``sigmoid(x)``: more skill, fewer inputs it must escalate for
  the same agreement. The current student has ``skill``; the candidate ``skill + gain``
  (``gain = 0``: equal quality, different mistakes).

One simulated run logs as the gateway does, with the current student serving at its
threshold (calibrated once, beforehand, on the population): every escalation with
probability 1 and a uniform sample of the confident inputs with the audit fraction. The
run calibrates both students on a calibration split of that log (weighted, kept apart) and
hands the gate split to :func:`distill.gate.decide`. The truth it is scored against (the
escalation each student needs for the target agreement) is computed on a population of
200,000 inputs.

    protege gate-curve            # the promotion rate against the true gain (minutes)
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from functools import cache
from pathlib import Path

import numpy as np

from distill import gate
from distill.config import GateConfig
from distill.needed import escalation_needed
from serving.contracts.threshold import should_escalate, threshold_for_agreement


@dataclass(frozen=True)
class Population:
    skill: float = 1.0
    gain: float = 0.0
    noise: float = 0.6
    sharpness: float = 3.0
    request_size: int = 4
    within_request: float = 0.5
    target: float = 0.97

    def draw(self, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """``n`` inputs (whole requests): both students' confidence and agreement, and the
        request each input came from."""
        requests = -(-n // self.request_size)
        groups = np.repeat(np.arange(requests), self.request_size)[:n]
        shared = rng.standard_normal(requests)[groups]
        rho = self.within_request
        difficulty = np.sqrt(rho) * shared + np.sqrt(1 - rho) * rng.standard_normal(n)
        out: dict[str, np.ndarray] = {"groups": groups}
        for side, skill in (("current", self.skill), ("candidate", self.skill + self.gain)):
            margin = skill - difficulty + self.noise * rng.standard_normal(n)
            p_agree = 1 / (1 + np.exp(-self.sharpness * margin))
            out[f"{side}_agrees"] = rng.random(n) < p_agree
            out[f"{side}_confidence"] = 1 / (1 + np.exp(-margin))
        return out


TRUTH_INPUTS = 200_000


@cache
def truth(population: Population) -> dict[str, float]:
    """Each student's escalation needed for the target on a large population, the gain,
    and the current student's threshold for the target (what it serves with)."""
    data = population.draw(TRUTH_INPUTS, np.random.default_rng(12345))
    ones = np.ones(TRUTH_INPUTS)
    needed = {
        side: float(
            escalation_needed(
                data[f"{side}_confidence"], data[f"{side}_agrees"], ones, population.target
            )[0]
        )
        for side in ("current", "candidate")
    }
    threshold = threshold_for_agreement(
        data["current_confidence"], data["current_agrees"], population.target
    )
    return {**needed, "gain": needed["current"] - needed["candidate"], "threshold": threshold}


@dataclass(frozen=True)
class Log:
    """What the gateway logged of a stretch of traffic served by the current student."""

    data: dict[str, np.ndarray]  # the logged inputs only
    weights: np.ndarray
    sampled: np.ndarray

    def eval_set(self) -> gate.EvalSet:
        return gate.EvalSet(self.weights, self.sampled, self.data["groups"])


def log_traffic(
    population: Population, inputs: int, audit_fraction: float, rng: np.random.Generator
) -> Log:
    data = population.draw(inputs, rng)
    escalated = should_escalate(data["current_confidence"], truth(population)["threshold"])
    audited = ~escalated & (rng.random(inputs) < audit_fraction)
    logged = escalated | audited
    p = np.where(escalated, 1.0, audit_fraction)[logged]
    return Log({k: v[logged] for k, v in data.items()}, 1 / p, p < 1)


def inputs_for(population: Population, sampled: int, audit_fraction: float) -> int:
    """Served inputs that give about ``sampled`` audited records."""
    return round(sampled / (audit_fraction * (1 - _escalated_share(population))))


@cache
def _escalated_share(population: Population) -> float:
    data = population.draw(50_000, np.random.default_rng(7))
    return float(should_escalate(data["current_confidence"], truth(population)["threshold"]).mean())


def run_once(
    population: Population,
    sampled: int,
    audit_fraction: float,
    seed: int,
    config: GateConfig,
) -> gate.Decision:
    """One simulated distillation run: a calibration split and a gate split of the log,
    both students calibrated on the former, the real gate on the latter."""
    rng = np.random.default_rng(seed)
    inputs = inputs_for(population, sampled, audit_fraction)
    calibration = log_traffic(population, inputs, audit_fraction, rng)
    gate_log = log_traffic(population, inputs, audit_fraction, rng)
    judged = []
    for side in ("current", "candidate"):
        threshold = threshold_for_agreement(
            calibration.data[f"{side}_confidence"],
            calibration.data[f"{side}_agrees"],
            population.target,
            calibration.weights,
        )
        judged.append(
            gate.Judged(
                side,
                threshold,
                gate_log.data[f"{side}_confidence"],
                gate_log.data[f"{side}_agrees"],
            )
        )
    return gate.decide(judged[0], judged[1], gate_log.eval_set(), config)


def promotion_rate(
    population: Population,
    sampled: int,
    audit_fraction: float,
    seeds: range,
    config: GateConfig,
) -> float:
    promoted = sum(
        run_once(population, sampled, audit_fraction, seed, config).promote for seed in seeds
    )
    return promoted / len(seeds)


GAINS = (0.0, 0.08, 0.15, 0.3, 0.67)  # candidate skill - current skill: 0 to ~19 points
SAMPLED = (150, 500, 1500)


def curve(
    audit_fraction: float, seeds: int, draws: int = 400, base: Population = Population()
) -> list[dict[str, float]]:
    """The promotion rate per true gain and amount of evidence."""
    config = GateConfig(bootstrap_draws=draws, min_sampled=0, target_agreement=base.target)
    rows = []
    for gain in GAINS:
        population = replace(base, gain=gain)
        true = truth(population)
        row: dict[str, float] = {"skill_gain": gain, "true_gain": true["gain"]}
        for sampled in SAMPLED:
            rate = promotion_rate(population, sampled, audit_fraction, range(seeds), config)
            row[f"promoted_at_{sampled}"] = rate
        rows.append(row)
    return rows


def markdown(rows: list[dict[str, float]], audit_fraction: float, seeds: int) -> str:
    head = "| true gain in escalation needed | " + " | ".join(
        f"promoted, {s} sampled gate records" for s in SAMPLED
    )
    lines = [head + " |", "|---" * (len(SAMPLED) + 1) + "|"]
    for row in rows:
        cells = [f"{row[f'promoted_at_{s}']:.0%}" for s in SAMPLED]
        gain = "none (equal quality)" if row["skill_gain"] == 0 else f"{row['true_gain']:.1%}"
        lines.append(f"| {gain} | " + " | ".join(cells) + " |")
    return (
        "\n".join(lines)
        + f"\n\nAudit fraction {audit_fraction:g}, {seeds} seeds a cell, target agreement "
        f"{Population().target:.0%}, 400 bootstrap draws, no min_sampled, the gate's defaults "
        "otherwise; generated by "
        "`protege gate-curve`."
    )


def main(audit_fraction: float, seeds: int, out: Path | None, docs: Path | None) -> str:
    rows = curve(audit_fraction, seeds)
    text = markdown(rows, audit_fraction, seeds)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "audit_fraction": audit_fraction,
            "seeds": seeds,
            "population": asdict(Population()),
            "rows": rows,
        }
        out.write_text(json.dumps(payload, indent=2))
    if docs is not None:
        from protege.docs_block import replace_block

        replace_block(docs, "gate-curve", text)
    return text
