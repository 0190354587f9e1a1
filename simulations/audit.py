"""``fedgru audit``: an empirical lower bound on a hospital's epsilon, from one run.

The one-run audit of Steinke, Nasr and Jagielski ("Privacy Auditing with One (1)
Training Run", NeurIPS 2023). At one simulated hospital, M canaries are each included
independently with probability 1/2; the federation trains as configured; each canary is
scored from what the hospital released; the auditor guesses "included" for the canaries
with the highest scores (and abstains on the rest); and the number of right guesses
turns, by the paper's theorem, into an epsilon below which the hospital's releases
cannot be (epsilon, delta)-DP, at 95% confidence. A correct mechanism gives a bound
below its claimed epsilon; a bug that weakens it (noise on the wrong tensor, a sample
rate recorded wrong, a release left out of the ledger) shows as a bound above it.

Canaries: gradient canaries, a white-box audit of the released updates. Canary k is an
example whose per-example gradient is exactly the clipping norm along an audit
coordinate of its own, which no patient's gradient touches (Dirac canaries, the paper's
strongest setting): the hospital's DP optimizer samples, clips, sums and noises them
with its patients and releases the coordinates each round beside its model update
(``common.training.Canaries``). The score of canary k is minus the sum over rounds of
its released coordinate: an included canary pulls it down by the learning rate times
the clipping norm over the batch size whenever it is sampled. Input-space canaries
(crafted or mislabelled stays) only reach the released weights through a 269-weight
model trained by many patients, so their scores are far noisier and their bounds far
looser; the gradient canaries give the tighter bound, and this is what runs.

Under secure aggregation (``privacy.aggregation: secure``) the hospital releases its
noisy integer gradient sum inside a masked sum over hospitals; the canaries get its
clipping (one clipped gradient each, in integers) and its Skellam noise on coordinates
of their own, before the mask, so the audit reads the hospital's noise alone and checks
it against the epsilon the ledger gives that noise (``epsilon_alone``), the weaker of
the hospital's two guarantees.
"""

from __future__ import annotations

import math
import secrets
import tempfile
from pathlib import Path

import numpy as np
from scipy.stats import binom

from client.app import build_client_app
from client.canary import CanaryAudit
from common.config import ExperimentConfig
from common.data.dataset import load_dataset
from common.data.partition import make_partition
from common.files import write_json
from server.records import AuditGuess as Guess
from server.records import AuditResult, RunPrivacy, load_record
from server.report import write_report

CONFIDENCE = 0.95
SECURE_CANARIES = ("gradient (Dirac canaries on audit coordinates of the hospital's own noisy integer sum, before the "
                   "mask: secure aggregation, audited against its noise alone)")


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """Probability of ``v`` or more right guesses out of ``r`` (of ``m`` canaries) if
    the algorithm were (epsilon, delta)-DP: Steinke, Nasr & Jagielski 2023, Theorem 5.2,
    P[W >= v] <= P[Binom(r, p) >= v] + 2 m delta max_{1<=i<=v} P[v > Binom(r, p) >= v - i] / i,
    with p = e^epsilon / (1 + e^epsilon), the accuracy of randomized response."""
    if not 0 <= v <= r <= m:
        raise ValueError("need 0 <= right guesses <= guesses <= canaries")
    p = 1.0 / (1.0 + math.exp(-epsilon))
    beta = float(binom.sf(v - 1, r, p))
    if delta == 0 or v == 0:
        return min(1.0, beta)
    below = binom.pmf(np.arange(v - 1, -1, -1), r, p)  # P[Binom = v-1], P[Binom = v-2], ...
    alpha = float(np.max(np.cumsum(below) / np.arange(1, v + 1)))
    return min(1.0, beta + 2 * m * delta * alpha)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, significance: float = 1 - CONFIDENCE) -> float:
    """The largest epsilon that ``v`` right guesses out of ``r`` rule out at the given
    significance (0 when nothing is ruled out). Bisection: the p-value falls as epsilon falls."""
    if r == 0 or p_value(m, r, v, 0.0, delta) > significance:
        return 0.0
    low, high = 0.0, 1.0
    while p_value(m, r, v, high, delta) <= significance:
        low, high = high, high * 2
        if high > 100:
            return low
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if p_value(m, r, v, mid, delta) <= significance else (low, mid)
    return low


def score_and_bound(scores: np.ndarray, included: np.ndarray, delta: float) -> tuple[float, Guess, list[Guess]]:
    """Guess "included" for the k highest scores and "excluded" for the k lowest, for k
    in a few fixed fractions of the canaries, abstaining on the rest. The significance
    is split among those k (Bonferroni), so trying several costs no confidence."""
    m = len(scores)
    order = np.argsort(-scores, kind="stable")
    ks = sorted({max(1, int(m * f)) for f in (0.01, 0.025, 0.05, 0.1, 0.25, 0.5)})
    tried = []
    for k in ks:
        correct = int(included[order[:k]].sum()) + int((~included[order[m - k:]]).sum())
        tried.append(Guess(2 * k, correct, epsilon_lower_bound(m, 2 * k, correct, delta, (1 - CONFIDENCE) / len(ks))))
    best = max(tried, key=lambda g: g.bound)
    return best.bound, best, tried


def run_audit(
    cfg: ExperimentConfig, run_dir: Path, hospital: str | None = None, canaries: int = 1000, tamper=None,
) -> AuditResult:
    """Run the federation with canaries at ``hospital`` and bound its epsilon.
    ``tamper``: tests only (a planted bug in the hospital's DP optimizer)."""
    from simulations.simulate import simulate

    # Under secure aggregation the canaries ride in the hospital's own noisy integer sum
    # (client.secure.audit_canaries), before the mask and the others' noise: the audit
    # checks the hospital's noise alone against the epsilon its ledger gives it alone.
    secure = cfg.privacy.enabled and cfg.privacy.aggregation == "secure"
    ds = load_dataset(cfg)
    names = [h.name for h in make_partition(ds, cfg)]
    hospital = hospital or names[0]
    if hospital not in names:
        raise ValueError(f"no simulated hospital {hospital!r}; the partition has {', '.join(names)}")
    rng = np.random.default_rng(secrets.randbits(128))  # the auditor's secret coin flips
    included = rng.random(canaries) < 0.5
    with tempfile.TemporaryDirectory(prefix="fedgru-audit-") as tmp:
        audit = CanaryAudit(hospital, included, tmp, tamper)
        simulate(cfg, run_dir, client_app=build_client_app(audit=audit, simulation=cfg))
        rounds = sorted(Path(tmp).glob("round-*.npy"))
        released = np.sum([np.load(f) for f in rounds], axis=0) if rounds else np.zeros(canaries)
    privacy = load_record(run_dir / "privacy.json", RunPrivacy)
    entry = privacy.hospitals[hospital] if privacy else None
    own = entry.epsilon_alone if secure and entry else None
    claimed = own if own is not None else entry.epsilon if entry and entry.epsilon is not None else math.inf
    delta = entry.delta if entry and entry.delta is not None else cfg.privacy.delta_for(1)
    bound, best, tried = score_and_bound(-released, included, delta)
    result = AuditResult(bound, claimed, delta, canaries, best.guesses, best.correct, hospital,
                         rounds=len(rounds), tried=tried, **({"canary_kind": SECURE_CANARIES} if secure else {}))
    write_json(run_dir / "audit.json", result)
    write_report(run_dir)  # again, now with the audit's section
    return result


def format_result(r: AuditResult) -> str:
    verdict = ("no DP claim to check (DP was off)" if not math.isfinite(r.epsilon_claimed)
               else "consistent with the claim" if r.epsilon_lower_bound <= r.epsilon_claimed
               else "ABOVE the claimed epsilon: the implementation leaks more than its accounting says")
    return "\n".join([
        f"privacy audit of {r.hospital} (one run, {r.canaries} {r.canary_kind.split(' (')[0]} canaries, {r.rounds} rounds)",
        f"  {'claimed epsilon':32s} {r.epsilon_claimed:.3f}  (delta {r.delta:.0e}, the hospital's ledger)",
        f"  {'empirical lower bound (95%)':32s} {r.epsilon_lower_bound:.3f}  ({r.correct} of {r.guesses} guesses right)",
        f"  {verdict}",
    ])
