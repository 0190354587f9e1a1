"""A hospital's training rounds under secure aggregation (``privacy.aggregation: secure``).

A round is the four stages of ``common.secagg``; only the third reads patient data. What
the hospital releases then is one step of DP gradient descent, distributed: the sum over
its training patients (a Poisson sample at ``training.sample_rate``, 0 meaning all of
them) of each one's gradient, clipped to ``privacy.max_grad_norm``, scaled to integers and
rounded at random, plus its share of Skellam noise (``common.skellam``); masked, so the
coordinator can read only the sum over hospitals. The coordinator takes the step.

How much noise: at setup each hospital says the least variance ``mu_h`` it accepts
(:func:`required_variance`, from the run's settings, its policy, declared count and
ledger: never its data); the coordinator asks everyone for the largest; each hospital
refuses less than its own. Its ledger counts ``min_honest`` hospitals' noise (its
policy) and records, beside it, the epsilon of its own noise alone, which must stay
within ``max_epsilon_alone`` even if the coordinator and every other hospital collude.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import secrets
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from opacus import GradSampleModule

from common import messages as M
from common import secagg as S
from common.ledger import Ledger, LedgerEntry
from common.messages import Item, Mechanism, NodeMode, ReplyState
from common.model import GRUClassifier, batch_loss, model_spec, trainable_layout
from common.skellam import SkellamSensitivity, randomized_round, skellam_noise
from common.training import resolve_device, training_for_round

from .policy import PolicyRefusal
from .replies import AfterReading, answer
from .request import Request
from .secagg import Participant, SecAggRefusal

if TYPE_CHECKING:
    from .canary import CanaryAudit

log = logging.getLogger("fedgru.client")

STATE_KEY = "fedgru-secagg"  # this round's protocol secrets, in the node's own state
SCALE_RANGE = (2.0 ** 4, 2.0 ** 24)  # integers per clipping norm a hospital accepts (rounding cost to wrap-around)
NOMINAL_UNITS = 2.0 ** 16  # integers per clipping norm the preflight plans with (the coordinator's, up to wrap-around)


@dataclass(frozen=True)
class SecureAsk:
    """Who asks what: the run's settings, the hospital's policy and declared training
    count, the run and round (never the data)."""

    cfg: object  # ExperimentConfig
    policy: object  # client.policy.Policy
    hospital: str
    declared_train: int
    run_id: str
    server_round: int

    @classmethod
    def of(cls, req: Request) -> SecureAsk:
        return cls(req.cfg, req.policy, req.node.name, req.declared.train, req.run_id, req.server_round)

    @property
    def budget(self) -> float:
        return self.policy.training_budget(self.cfg, self.hospital)


@dataclass(frozen=True)
class SecureSettings:
    """One round's release, as the run's settings and the hospital's policy fix it."""

    sample_rate: float
    clip: float
    scale: float  # integers per unit of gradient
    sensitivity: SkellamSensitivity
    min_honest: int


def settings_of(ask: SecureAsk, scale: float) -> SecureSettings:
    cfg, policy = ask.cfg, ask.policy
    clip = cfg.privacy.max_grad_norm
    policy.check_clipping(clip)
    if not (math.isfinite(scale) and SCALE_RANGE[0] <= scale * clip <= SCALE_RANGE[1]):
        raise PolicyRefusal(S.SCALE, f"must put between 2^4 and 2^24 integers on the clipping norm (it puts {scale * clip:.3g})")
    if cfg.privacy.target_epsilon <= 0:
        raise PolicyRefusal("privacy.target_epsilon", "must be set: secure aggregation's noise is calibrated to it")
    rate = cfg.training.sample_rate or 1.0
    dim = sum(math.prod(shape) for _, shape in trainable_layout(cfg))
    return SecureSettings(rate, clip, scale, SkellamSensitivity.of(clip, scale, dim), policy.min_honest)


def release_entry(ask: SecureAsk, s: SecureSettings, mu: float, steps: int) -> LedgerEntry:
    """The ledger entry of ``steps`` rounds' releases at variance ``mu``."""
    l2 = s.sensitivity.l2
    return LedgerEntry(ask.run_id, ask.server_round, Mechanism.SKELLAM,
                       f"a masked sum of clipped training gradients with a share of Skellam noise (secure aggregation; "
                       f"counted with {s.min_honest} hospitals' noise)", item=Item.WEIGHTS,
                       noise_multiplier=math.sqrt(s.min_honest * mu) / l2, alone_noise_multiplier=math.sqrt(mu) / l2,
                       sample_rate=s.sample_rate, steps=steps, max_grad_norm=l2, l1_sensitivity=s.sensitivity.l1,
                       examples=ask.declared_train)


def _fits(ask: SecureAsk, ledger: Ledger, s: SecureSettings, mu: float, steps: int, whole_run: bool) -> bool:
    """``steps`` more releases at ``mu`` stay within the budget, the alone limit, the
    policy's noise floor and per-round ceiling (as for DP-SGD: on the noise the ledger
    counts), and (for the rest of the run) the run's own target."""
    planned = [release_entry(ask, s, mu, steps)]
    if planned[0].noise_multiplier < ask.policy.min_noise_multiplier:
        return False
    if ledger.epsilon_with(planned) > ask.budget or ledger.epsilon_with(planned, alone=True) > ask.policy.max_epsilon_alone:
        return False
    fresh = Ledger(ledger.hospital, ledger.delta, ledger.accountant)
    if fresh.epsilon_with([release_entry(ask, s, mu, 1)]) > ask.policy.max_epsilon_per_round:
        return False
    if whole_run:
        return fresh.epsilon_with([release_entry(ask, s, mu, ask.cfg.run.rounds)]) <= ask.cfg.privacy.target_epsilon
    return True


def required_variance(ask: SecureAsk, ledger: Ledger, s: SecureSettings) -> float:
    """The least Skellam variance per coordinate this hospital adds for the rest of the
    run: its epsilon with ``min_honest`` hospitals' noise within the run's target and its
    budget, and with its own noise alone within ``max_epsilon_alone``; and the policy's noise
    floor and per-round ceiling, which a message can only tighten. Raises
    :class:`PolicyRefusal` when no noise fits (the budget is spent)."""
    remaining = max(1, ask.cfg.run.rounds - ask.server_round + 1)
    low, high = math.log(s.sensitivity.l2 ** 2 * 1e-3), math.log(s.sensitivity.l2 ** 2 * 1e8)
    if not _fits(ask, ledger, s, math.exp(high), remaining, False):
        raise PolicyRefusal("privacy", "the rest of this run would pass this hospital's training budget, its "
                            "max_epsilon_alone or its max_epsilon_per_round at any noise")
    if not _fits(ask, ledger, s, math.exp(high), remaining, True):
        # RDP's conversion at its largest order puts a floor under epsilon (about 0.1 at delta 1e-5)
        least = Ledger(ledger.hospital, ledger.delta, ledger.accountant).epsilon_with(
            [release_entry(ask, s, math.exp(high), ask.cfg.run.rounds)])
        raise PolicyRefusal("privacy.target_epsilon", f"is {ask.cfg.privacy.target_epsilon:g}; at this hospital's "
                            f"delta {ledger.delta:g} no noise reaches less than {least:.3f}: raise it")
    while high - low > 1e-4:
        mid = (low + high) / 2
        low, high = (low, mid) if _fits(ask, ledger, s, math.exp(mid), remaining, True) else (mid, high)
    return math.exp(high)


def integer_gradient_sum(model: GRUClassifier, X: torch.Tensor, S_: torch.Tensor, y: torch.Tensor, req: Request,
                         s: SecureSettings, rng: np.random.Generator, sample: torch.Generator) -> np.ndarray:
    """Sum over the sampled patients of each one's gradient, clipped to ``s.clip``, times
    ``s.scale``, rounded at random (int64, trainable weights in ``trainable_layout``'s
    order). Pieces of a fixed size, the last padded, so memory never depends on the data."""
    training = training_for_round(req.cfg, req.server_round)
    params = [p for p in model.parameters() if p.requires_grad]
    dim = sum(p.numel() for p in params)
    n = int(y.shape[0])
    chosen = torch.arange(n) if s.sample_rate >= 1 else (torch.rand(n, generator=sample) < s.sample_rate).nonzero().squeeze(1)
    piece_rows = req.policy.max_micro_batch
    total = np.zeros(dim, dtype=np.int64)
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    model.train()
    try:
        for piece in chosen.split(piece_rows):
            rows = torch.cat([piece, piece[:1].expand(piece_rows - piece.numel())])
            real = torch.arange(piece_rows) < piece.numel()
            rows_on = rows.to(X.device)
            loss = batch_loss(model, X[rows_on], S_[rows_on], y[rows_on], training.positive_weight,
                              training.hourly_loss) * piece_rows
            loss.backward()
            grads = torch.cat([p.grad_sample.reshape(piece_rows, -1) for p in params], dim=1).detach().double().cpu()
            grads[~real] = 0.0
            # as DP-SGD's path does (common.dp_optimizer.zero_non_finite_grad_samples): a model that overflows
            # on one patient gives that patient's row NaN or infinity, which must add 0 to the clipped sum by
            # rule, not by how a platform casts NaN to an integer (numpy warns and x86 and ARM differ)
            torch.nan_to_num_(grads, nan=0.0, posinf=0.0, neginf=0.0)
            norms = grads.norm(dim=1, keepdim=True)
            clipped = grads * (s.clip / norms.clamp(min=1e-12)).clamp(max=1.0)
            total += randomized_round(clipped.numpy() * s.scale, rng).sum(axis=0)
            for p in params:
                p.grad_sample, p.grad = None, None
    finally:
        gsm._close()
    return total


@dataclass
class AuditedNoise:
    """The noise a round adds, where a privacy audit's planted bug (``audit.tamper``) may change it."""

    variance: float


def audit_canaries(audit: CanaryAudit, req: Request, s: SecureSettings, variance: float,
                   rng: np.random.Generator) -> float:
    """A one-run privacy audit (``simulations.audit``) of this hospital's own release: each
    included Dirac canary adds one clipped gradient (``clip x scale`` integers) along an
    audit coordinate of its own, which gets the same Skellam noise as every coordinate;
    the coordinates are written for the auditor. They stay out of the masked sum, so the
    audit reads the hospital's noise alone: its claim is the ledger's alone epsilon.
    Returns the noise variance the round adds (a planted bug may have changed it)."""
    noise = AuditedNoise(variance)
    if audit.tamper is not None:
        audit.tamper(noise)
    one = round(s.clip * s.scale)
    released = audit.included.astype(np.int64) * one + skellam_noise(noise.variance, len(audit.included), rng)
    # the auditor scores minus the released coordinate (DP-SGD's canaries pull theirs down)
    np.save(Path(audit.out_dir) / f"round-{req.server_round:04d}.npy", -released / one)
    return noise.variance


# A deployment test sets this in a hospital's environment to learn the vector the hospital
# masks, then searches the coordinator's memory for it (tests/test_deployment.py). The file
# goes to a folder the hospital's own operator names, beside its data; nothing leaves.
PLAIN_VECTORS_ENV = "FEDGRU_TEST_PLAIN_VECTORS"


def keep_plain_for_tests(req: Request, kind: str, vector: np.ndarray) -> None:
    folder = os.environ.get(PLAIN_VECTORS_ENV)
    if folder:
        log.warning("%s keeps the vector it masks in %s (%s is set: a test setting, never a hospital's)",
                    req.node.name, folder, PLAIN_VECTORS_ENV)
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / f"{req.node.name}-{kind}-{req.server_round}.npy").write_bytes(vector.astype(np.int64).tobytes())


# -- the stages ------------------------------------------------------------------------
def load_state(context: Context, req: Request, key: str = STATE_KEY) -> tuple[Participant, ConfigRecord]:
    """This run and round's protocol state under ``key``, or a refusal: a stage with no round under way."""
    record = context.state.get(key)
    if record is None or str(record["run"]) != req.run_id or int(record["round"]) != req.server_round:
        raise SecAggRefusal("no secure aggregation round of this run and round is under way here")
    return Participant.from_bytes(bytes(record["participant"])), record


def save_state(context: Context, req: Request, me: Participant, key: str = STATE_KEY, **fields) -> None:
    context.state[key] = ConfigRecord({"run": req.run_id, "round": me.server_round, "participant": me.to_bytes(),
                                       **fields})


def _load(context: Context, req: Request) -> tuple[Participant, float]:
    me, record = load_state(context, req)
    return me, float(record["variance"])


def _save(context: Context, req: Request, me: Participant, variance: float = 0.0, pinned: str = "") -> None:
    save_state(context, req, me, variance=float(variance), pinned=pinned)


def pinned_settings(config: ConfigRecord) -> str:
    """What the release is made under (the experiment and the scale), as share-keys agreed
    it with every hospital: the collect message must ask for the same, or a coordinator
    could agree one scale with all and then ask one hospital for a larger one (less noise
    per unit of gradient) at collect."""
    try:
        text = json.dumps([str(config[M.EXPERIMENT_JSON]), repr(float(config[S.SCALE]))])
    except (KeyError, TypeError, ValueError):
        raise SecAggRefusal("the message must carry the experiment and a numeric scale") from None
    return hashlib.sha256(text.encode()).hexdigest()


def _reply(req: Request, state: ReplyState, ledger: Ledger | None, content: dict | None = None, **extra) -> Message:
    """A stage's reply. The ledger copy travels with the release (collect) and with a stop
    at the budget; the key and unmask stages release nothing new, and a copy with each of
    them was most of a round's bytes (it grows about 0.9 KB a round)."""
    return answer(req.msg, req.node.name, state, ledger, content, **extra)


def ints_of(config: ConfigRecord, key: str) -> list[int]:
    try:
        return [int(v) for v in config[key]]
    except (KeyError, TypeError, ValueError):
        raise SecAggRefusal(f"'{key}' must be a list of node ids") from None


def start_round(req: Request, context: Context, config: ConfigRecord, server_round: int, min_honest: int,
                session: str = S.TRAINING_SESSION) -> Participant:
    """This hospital's setup for ``server_round``: fresh keys, signed with its own key for
    this run, round and ``session`` when it is a deployed hospital, checked later against
    its policy's ``peer_keys``."""
    try:
        signing_key = req.node.signing_key()
    except (OSError, ValueError) as exc:  # FolderError too: the key file missing or not a key
        raise SecAggRefusal(f"this hospital cannot sign its round keys: {exc}") from None
    return Participant.setup(int(context.node_id), server_round, ints_of(config, S.PARTICIPANTS),
                             int(config.get(S.THRESHOLD, 0)), min_honest, run_id=req.run_id, name=req.node.name,
                             signing_key=signing_key, peer_keys=req.policy.peer_keys, session=session,
                             max_colluding=req.policy.max_colluding)


def public_keys_of(config: ConfigRecord) -> dict[int, tuple[str, ...]]:
    """The share-keys stage's keys: node -> (pk1, pk2) or (pk1, pk2, name, signature)."""
    try:
        rows = [line.split(":") for line in str(config[S.PUBLIC_KEYS]).splitlines() if line]
        keys = {int(row[0]): tuple(row[1:]) for row in rows if len(row) in (3, 5)}
    except KeyError:
        raise SecAggRefusal(f"'{S.PUBLIC_KEYS}' is missing") from None
    except ValueError:
        raise SecAggRefusal(f"'{S.PUBLIC_KEYS}' must name a node id on each line") from None
    if len(keys) != len(rows):
        raise SecAggRefusal(f"'{S.PUBLIC_KEYS}' must have node:pk1:pk2 or node:pk1:pk2:name:signature a line, "
                            "each node once")
    return keys


def lines_of(config: ConfigRecord, key: str, parts: int) -> list[list[str]]:
    try:
        rows = [line.split(":", parts - 1) for line in str(config[key]).splitlines() if line]
    except KeyError:
        raise SecAggRefusal(f"'{key}' is missing") from None
    if any(len(r) != parts for r in rows):
        raise SecAggRefusal(f"'{key}' must have {parts} fields a line")
    return rows


def stage_request(msg: Message, context: Context, simulation=None) -> tuple[S.Stage, Request, ConfigRecord]:
    """The stage a message names, the request (the model read only for ``collect``) and its config."""
    config = msg.content[M.CONFIG]
    try:
        stage = S.Stage(str(config[S.STAGE]))
    except (KeyError, ValueError):
        raise PolicyRefusal(S.STAGE, "names no stage of secure aggregation") from None
    return stage, Request(msg, context, simulation, needs_model=stage == S.Stage.COLLECT), config


def answer_secure(msg: Message, context: Context, simulation=None, audit: CanaryAudit | None = None) -> Message:
    """One stage of a secure aggregation round (``common.secagg``); ``audit``: a privacy
    audit's canaries at one simulated hospital (:func:`audit_canaries`)."""
    stage, req, config = stage_request(msg, context, simulation)
    try:
        scale = float(config[S.SCALE])
    except (KeyError, TypeError, ValueError):
        raise PolicyRefusal(S.SCALE, "must be a number") from None
    settings = settings_of(SecureAsk.of(req), scale)
    try:
        if stage == S.Stage.SETUP:
            return _setup(req, context, config, settings)
        if stage == S.Stage.SHARE_KEYS:
            return _share_keys(req, context, config, settings)
        if stage == S.Stage.COLLECT:
            return _collect(req, context, config, settings, audit)
        return _unmask(req, context, config, settings)
    except SecAggRefusal as exc:
        raise PolicyRefusal(f"secure aggregation ({stage.value})", str(exc)) from None


def _setup(req: Request, context: Context, config: ConfigRecord, s: SecureSettings) -> Message:
    ledger = req.store.read()
    try:
        required = required_variance(SecureAsk.of(req), ledger, s)
    except PolicyRefusal as exc:
        budget = req.policy.training_budget(req.cfg, req.node.name)
        log.warning("%s stops before round %d: %s", req.node.name, req.server_round, exc)
        return _reply(req, ReplyState.BUDGET_EXHAUSTED, ledger,
                      **{M.EPSILON: ledger.epsilon(), M.BUDGET: budget, M.DELTA: ledger.delta})
    me = start_round(req, context, config, req.server_round, s.min_honest)
    _save(context, req, me)
    return _reply(req, ReplyState.READY, None, **{S.MY_KEYS: me.my_keys(), S.REQUIRED_VARIANCE: required})


def _share_keys(req: Request, context: Context, config: ConfigRecord, s: SecureSettings) -> Message:
    me, _ = _load(context, req)
    ledger = req.store.read()
    try:
        variance = float(config[S.NOISE_VARIANCE])
    except (KeyError, TypeError, ValueError):
        raise SecAggRefusal(f"'{S.NOISE_VARIANCE}' must be a number") from None
    required = required_variance(SecureAsk.of(req), ledger, s)
    if not (math.isfinite(variance) and variance >= required * (1 - 1e-9)):
        raise SecAggRefusal(f"the noise variance {variance:.6g} is below the {required:.6g} this hospital requires")
    shares = me.share_keys(public_keys_of(config), S.agreed_settings(config))
    _save(context, req, me, variance, pinned=pinned_settings(config))
    return _reply(req, ReplyState.READY, None,
                  **{S.SHARES_OUT: "\n".join(f"{dst}:{text}" for dst, text in sorted(shares.items()))})


def _collect(req: Request, context: Context, config: ConfigRecord, s: SecureSettings,
             audit: CanaryAudit | None = None) -> Message:
    me, record = load_state(context, req)
    variance = float(record["variance"])
    if str(record.get("pinned", "")) != pinned_settings(config):
        raise SecAggRefusal("the collect asks for another experiment or scale than the share-keys stage agreed "
                            "with every hospital")
    me.receive({int(src): text for src, text in lines_of(config, S.CIPHERTEXTS, 2)})
    budget = req.policy.training_budget(req.cfg, req.node.name)
    with req.store.transaction() as ledger:
        # decided before any patient data is read
        entry = release_entry(SecureAsk.of(req), s, variance, 1)
        if not _fits(SecureAsk.of(req), ledger, s, variance, 1, False):
            _save(context, req, me, variance)
            log.warning("%s stops before round %d: its training budget or max_epsilon_alone would be passed",
                        req.node.name, req.server_round)
            return _reply(req, ReplyState.BUDGET_EXHAUSTED, ledger,
                          **{M.EPSILON: ledger.epsilon(), M.BUDGET: budget, M.DELTA: ledger.delta})
        size = LedgerEntry(req.run_id, req.server_round, Mechanism.NONE, "the training split's size (declared)",
                           item=Item.SPLIT_SIZE, examples=req.declared.train)
        for e in (entry, size):
            e.check(f"{req.node.name}'s planned ledger entry")
        log.info("%s round %d: training", req.node.name, req.server_round)
        data = req.node.data()
        try:
            device = resolve_device(req.node.device)
            model = GRUClassifier(model_spec(req.cfg), gru_impl=req.cfg.model.gru_impl).to(device)
            model.load_state_dict({k: torch.as_tensor(v) for k, v in req.weights.items()}, strict=True)
            idx = data.train
            X = torch.as_tensor(data.dataset.X[idx], dtype=torch.float32, device=device)
            St = torch.as_tensor(data.dataset.S[idx], dtype=torch.float32, device=device)
            y = torch.as_tensor(data.dataset.y[idx], dtype=torch.long, device=device)
            rng = np.random.default_rng(secrets.randbits(128))  # noise and rounding: the OS's entropy
            sample = torch.Generator().manual_seed(secrets.randbits(63))
            vector = integer_gradient_sum(model, X, St, y, req, s, rng, sample)
            noise_variance = variance
            if audit is not None and audit.hospital == req.node.name and req.node.mode == NodeMode.SIMULATION:
                noise_variance = audit_canaries(audit, req, s, variance, rng)
            vector = vector + skellam_noise(noise_variance, vector.size, rng)
            keep_plain_for_tests(req, "train", vector)
            masked = me.masked(vector)
        except Exception as exc:  # noqa: BLE001 - nothing is recorded, nothing leaves
            raise AfterReading() from exc
        for e in (entry, size):
            ledger.record(replace(e, data=data.export))
    _save(context, req, me, variance)
    eps = ledger.epsilon()
    log.info("%s round %d: secure aggregation share sent, epsilon %.3f (its own noise alone %.3f)",
             req.node.name, req.server_round, eps, ledger.epsilon_alone())
    content = {
        S.MASKED: ArrayRecord({"vector": Array(masked.astype(np.int64))}),
        M.METRICS: MetricRecord({M.NUM_EXAMPLES: req.declared.train, M.UNIT_WEIGHT: 1.0, M.EPSILON: float(eps),
                                 M.DELTA: float(ledger.delta), M.BUDGET: float(budget), M.STEPS: 1}),
    }
    return _reply(req, ReplyState.TRAINED, ledger, content)


def _unmask(req: Request, context: Context, config: ConfigRecord, s: SecureSettings) -> Message:
    me, variance = _load(context, req)
    answer = me.unmask(ints_of(config, S.SURVIVORS))
    fields = {S.REVEALED: "\n".join(f"{kind}:{owner}:{share}" for kind, owner, share in answer)}
    _save(context, req, me, variance)
    if S.NEXT_ROUND in config:
        fields.update(_early_setup(req, context, config, s))
    return _reply(req, ReplyState.READY, None, **fields)


def _early_setup(req: Request, context: Context, config: ConfigRecord, s: SecureSettings) -> dict:
    """The next round's setup, answered with this round's unmask (one exchange fewer a
    round). Nothing when it does not fit (the budget, the policy, a malformed field): the
    coordinator then runs the whole setup next round, where a refusal says why."""
    try:
        upcoming = int(config[S.NEXT_ROUND])
        if upcoming != req.server_round + 1 or upcoming > req.cfg.run.rounds:
            return {}
        required = required_variance(replace(SecureAsk.of(req), server_round=upcoming), req.store.read(), s)
        me = start_round(req, context, config, upcoming, s.min_honest)
    except (PolicyRefusal, SecAggRefusal, TypeError, ValueError):
        return {}
    _save(context, req, me)
    return {S.NEXT_ROUND: upcoming, S.MY_KEYS: me.my_keys(), S.REQUIRED_VARIANCE: required}
