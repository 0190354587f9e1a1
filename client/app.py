"""The hospital side: a Flower ClientApp.

- ``query``: says which hospital this node is (nothing about patients).
- ``train``: checks the request against the hospital's policy (``client.policy``), then,
  in one ledger transaction, the privacy budget of every group of patients the reply
  will be about, and records the releases *before* making them (a crash can only
  over-count). It then scores the model it received on the validation split when the
  server asks (a noisy score histogram: one message per round carries both), runs
  DP-SGD on the training split, and replies with the new weights, the training split's
  size and the training patients' epsilon over everything in the ledger. A round that
  would pass the budget is not trained: the reply says ``budget-exhausted``.
- ``evaluate``: the final model's noisy score histograms of the requested splits.

Every refusal is a reply, never an exception: a request outside the policy gets
``refused-policy`` and the name of the setting; a missing ledger or unreadable data gets
``refused`` and the kind of problem. The details (file, line) stay in the hospital's own
log, because file names can be stay ids and nothing about a patient leaves.

The experiment config arrives with every message; what the hospital allows comes from
its own folder. Cross-round state (the calibrated noise multiplier, the optimizer state)
lives in ``context.state`` and never leaves the hospital.
"""

from __future__ import annotations

import io
import logging
import math
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache, wraps
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from common import messages as M
from common.config import ConfigError, ExperimentConfig
from common.data.records import DataError
from common.explain import contribution_sizes
from common.ledger import Ledger, LedgerEntry, LedgerError
from common.logs import attach_to_flower
from common.messages import Item, Mechanism, NodeMode, ReplyState, Split
from common.metrics import ScoreGrid, ScoreSummary
from common.model import GRUClassifier, model_spec
from common.privacy import (
    NoisyRelease,
    calibrate_evaluation_noise,
    calibrate_noise,
    calibrate_shares,
    epsilon,
    steps_per_round,
)
from common.subgroups import SubgroupSummary
from common.training import (
    Canaries,
    DPSettings,
    TensorData,
    predict_proba,
    resolve_device,
    secret_generator,
    train_local,
    training_for_round,
)

from .folder import FolderError
from .hospital import UNASSIGNED, HospitalData, Node, NodeConfigError
from .policy import Policy, PolicyRefusal

log = logging.getLogger("fedgru.client")

STATE_KEY = "fedgru-local-state"


class Refused(Exception):
    """Reply ``state`` with ``reason`` (a setting or a kind of problem, no patient value)."""

    def __init__(self, state: ReplyState, reason: str):
        super().__init__(reason)
        self.state, self.reason = state, reason


def _status(hospital: str, state: ReplyState, **extra) -> ConfigRecord:
    return ConfigRecord({M.HOSPITAL: hospital, M.STATE: state.value, **extra})


# An absolute, relative (./, ../), home (~/, ~user/) or network (\\\\server) path, not a slash inside a word
# ("train/validation") or a number ("1/(10 n)"); a sentence's full stop is not part of it.
_PATH = re.compile(r"(?<![\w.)])(?:~\w*/|/|\.{1,2}/|[A-Za-z]:\\|\\\\)[^\s'\",;]*[^\s'\",;.:)]")


def without_paths(reason: str, known: tuple[str, ...] = ()) -> str:
    """A refusal reason as the coordinator may read it: file paths of the hospital's
    machine (its folder, user names, mount points) become ``<path>``; the hospital's own
    log keeps the full text. ``known``: paths to take out first, whole (a folder name
    with spaces in it, say, which the pattern alone would cut at the space)."""
    for prefix in sorted({k for k in known if k and k not in ("/", ".")}, key=len, reverse=True):
        reason = reason.replace(prefix, "<path>")
    return re.sub(r"(?:<path>)+", "<path>", _PATH.sub("<path>", reason))


def _local_paths(context: Context) -> tuple[str, ...]:
    """The hospital folder as configured and resolved, and the home folder."""
    paths = [str(Path.home())]
    folder = context.node_config.get("hospital-dir")
    if folder:
        paths += [str(folder), str(Path(str(folder)).expanduser().resolve())]
    return tuple(paths)


def _refusing(handler: Callable[..., Message]) -> Callable[..., Message]:
    """Turn every failure into a reply the coordinator may read: what went wrong in
    words it may see; the details only in this hospital's log."""

    @wraps(handler)
    def wrapped(msg: Message, context: Context, *more) -> Message:
        attach_to_flower()
        name = "hospital"
        try:
            return handler(msg, context, *more)
        except Refused as exc:
            state, reason = exc.state, exc.reason
        except PolicyRefusal as exc:
            state, reason = ReplyState.REFUSED_POLICY, str(exc)
        except (LedgerError, FolderError, NodeConfigError, ConfigError) as exc:
            state, reason = ReplyState.REFUSED, str(exc)
        except DataError as exc:  # names a file and a line: local only (file names can be stay ids)
            log.error("%s", exc)
            state, reason = ReplyState.REFUSED, "the hospital's data could not be read; the hospital's log says where"
        except Exception as exc:  # noqa: BLE001 - never let an exception's text travel to the server
            log.exception("%s failed", handler.__name__)
            state, reason = ReplyState.REFUSED, f"the hospital's app failed ({exc.__class__.__name__}); its log says why"
        try:
            name = Node(_experiment(msg), context).name
        except Exception:  # noqa: BLE001 - an unreadable request or node: the reply still goes out
            pass
        log.error("%s refuses to %s: %s", name, handler.__name__, reason)
        sent = without_paths(reason, _local_paths(context))
        return Message(RecordDict({M.STATUS: _status(name, state, **{M.REASON: sent})}), reply_to=msg)

    return wrapped


def _experiment(msg: Message) -> ExperimentConfig:
    return ExperimentConfig.from_json(str(msg.content[M.CONFIG][M.EXPERIMENT_JSON]))


def _requested_splits(msg: Message) -> list[Split]:
    text = str(msg.content[M.CONFIG].get(M.EVALUATE, "")).split()
    try:
        return [Split(s) for s in text]
    except ValueError:
        raise PolicyRefusal("evaluate", "names a split this hospital does not know (only val and test exist)") from None


@dataclass
class LocalState:
    """Cross-round state a hospital keeps for one run (in Flower's context.state)."""

    run_id: str = ""
    noise_multiplier: float = 0.0  # DP-SGD sigma, fixed before the run's first round
    optimizer: bytes = b""

    @classmethod
    def load(cls, context: Context, run_id: str) -> LocalState:
        record = context.state.get(STATE_KEY)
        if record is None or str(record.get("run-id", "")) != run_id:
            return cls(run_id)
        return cls(run_id, float(record["sigma"]), bytes(record.get("optimizer", b"")))

    def save(self, context: Context) -> None:
        context.state[STATE_KEY] = ConfigRecord({"run-id": self.run_id, "sigma": self.noise_multiplier, "optimizer": self.optimizer})


def _finite_in_float32(arrays) -> bool:
    with np.errstate(over="ignore", invalid="ignore"):
        return all(np.isfinite(np.asarray(a.numpy(), dtype=np.float32)).all() for a in arrays.values())


class Request:
    """One message at one hospital: the experiment, the round, the node, its policy."""

    def __init__(self, msg: Message, context: Context):
        self.msg, self.context = msg, context
        self.cfg = _experiment(msg)
        self.run_id = str(msg.content[M.CONFIG][M.RUN_ID])
        self.server_round = int(msg.content[M.CONFIG][M.SERVER_ROUND])
        self.node = Node(self.cfg, context)
        if self.node.name == UNASSIGNED:
            raise Refused(ReplyState.REFUSED, "this simulation node has no hospital")
        self.splits = _requested_splits(msg)
        self.final = msg.metadata.message_type == MessageType.EVALUATE
        self.threshold = float(msg.content[M.CONFIG].get(M.THRESHOLD, 0.0))  # a risk; 0: none given
        if not 0 <= self.threshold < 1:
            raise PolicyRefusal("threshold", "must be a risk between 0 and 1")
        if M.ARRAYS in msg.content.array_records and not _finite_in_float32(msg.content[M.ARRAYS]):
            # Refused before anything is read or charged: such a model only serves to make
            # the scores or gradients of some patients NaN.
            raise PolicyRefusal("arrays", "hold NaN, infinite or (in float32) overflowing weights")
        self._data: HospitalData | None = None
        self.policy: Policy | None = None
        self.store = None
        if self.node.mode == NodeMode.DEPLOYMENT:
            # Everything the message names is checked before any patient file is read.
            self._enter(self.node.folder.policy)

    def _enter(self, policy: Policy) -> None:
        self.policy = policy
        self.store = self.node.store(policy)
        if not self.final:
            policy.check_training(self.cfg)
        released = self.store.read()
        planned = self.cfg.planned_evaluations()
        for split in self.splits:
            policy.check_evaluation(self.cfg, split, planned.get(split.value, 0), released.releases_in_run(self.run_id, split))

    @property
    def data(self) -> HospitalData:
        if self._data is None:
            self._data = self.node.data()
            if self.policy is None:  # a simulated hospital: its policy depends on its size
                self._enter(self.node.policy(len(self._data.train)))
        return self._data

    def reply(self, state: ReplyState, ledger: Ledger, content: dict | None = None, **status) -> Message:
        records = dict(content or {})
        records[M.STATUS] = _status(self.node.name, state, **{M.LEDGER: ledger.to_json(), **status})
        return Message(RecordDict(records), reply_to=self.msg)


def query(msg: Message, context: Context) -> Message:
    node = Node(_experiment(msg), context)
    state = ReplyState.READY if node.name != UNASSIGNED else ReplyState.UNASSIGNED
    return Message(RecordDict({M.STATUS: _status(node.name, state, **{M.MODE: node.mode.value})}), reply_to=msg)


# ----------------------------------------------------------------------------------------
# Evaluation: noisy score histograms (the Gaussian mechanism), budgeted per split
# ----------------------------------------------------------------------------------------


IMPORTANCE_CLIP = 1.0  # each test patient's vector of contribution sizes is clipped to this L2 norm


@dataclass(frozen=True)
class PlannedRelease:
    split: Split
    item: Item
    noise_multiplier: float  # 0: exact (a comparison simulation)


def _test_items(cfg: ExperimentConfig) -> list[Item]:
    binary = cfg.is_binary
    ev = cfg.evaluation
    return [Item.HISTOGRAM] + ([Item.SUBGROUP_HISTOGRAMS] if binary and ev.subgroups and ev.subgroup_share > 0 else []) + (
        [Item.IMPORTANCE] if binary and ev.importance and ev.importance_share > 0 else [])


@lru_cache(maxsize=64)
def _evaluation_noise(cfg_json: str, delta: float) -> dict[tuple[Split, bool, Item], float]:
    """The noise multiplier of each kind of evaluation release of one run, calibrated
    once: validation (during the run, and of the final model) within val_epsilon; the
    test release's parts within test_epsilon (evaluation.subgroup_share and importance_share;
    the pooled histogram gets the rest)."""
    cfg = ExperimentConfig.from_json(cfg_json)
    ev = cfg.evaluation
    progress, final = calibrate_evaluation_noise(ev.val_epsilon, delta, len(cfg.validation_rounds()), ev.final_share,
                                                 cfg.privacy.accountant)
    items = _test_items(cfg)
    shares = {Item.HISTOGRAM: 1 - ev.subgroup_share - ev.importance_share, Item.SUBGROUP_HISTOGRAMS: ev.subgroup_share,
              Item.IMPORTANCE: ev.importance_share}
    test = calibrate_shares(ev.test_epsilon, delta, [(shares[i], 1) for i in items], cfg.privacy.accountant)
    noise = {(Split.VAL, False, Item.HISTOGRAM): progress, (Split.VAL, True, Item.HISTOGRAM): final}
    noise.update({(Split.TEST, True, item): sigma for item, sigma in zip(items, test)})
    return noise


def _plan_evaluations(req: Request, ledger: Ledger) -> tuple[list[PlannedRelease], list[str]]:
    """Record the requested evaluations that fit their group's budget (write-ahead);
    returns them with their noise multipliers, and why any others were declined."""
    cfg, policy, data = req.cfg, req.policy, req.data
    ev = cfg.evaluation
    noise = _evaluation_noise(cfg.to_json(), policy.delta)
    planned, declined = [], []
    for split in req.splits:
        items = [item for (s_, final, item) in noise if s_ == split and final == req.final]
        if not items:
            raise PolicyRefusal("evaluate", f"asks for the {split.value} split during training; test is scored once, at the end")
        if ev.dp and not all(math.isfinite(noise[(split, req.final, item)]) for item in items):
            # the run's own settings planned no such release (validate_every 0, one round):
            # its noise is calibrated for none, so none is made
            raise PolicyRefusal("evaluate", f"asks for a {split.value} release during training that this run's "
                                            "settings (evaluation.validate_every, run.rounds) do not plan")
        n = len(data.split(split))
        if n == 0:
            declined.append(f"{split.value}: the split is empty")
            continue
        entries = []
        for item in items:
            sigma = noise[(split, req.final, item)] if ev.dp else 0.0
            entries.append(LedgerEntry(
                req.run_id, req.server_round, Mechanism.GAUSSIAN if ev.dp else Mechanism.NONE,
                f"{item.value.replace('-', ' ')} of the {split.value} split" + (" (Gaussian noise)" if ev.dp else " (exact)"),
                split=split, item=item, noise_multiplier=sigma, sample_rate=1.0 if ev.dp else 0.0,
                steps=1 if ev.dp else 0, max_grad_norm=1.0 if ev.dp else 0.0, examples=n, data=data.export,
            ))
        if ev.dp:
            spent = ledger.epsilon_with(entries)
            if spent > policy.eval_max_epsilon:
                declined.append(f"{split.value}: the budget of its patients would be passed "
                                f"(epsilon {spent:.3f} of {policy.eval_max_epsilon:g})")
                continue
        for entry in entries:
            ledger.record(entry)
            planned.append(PlannedRelease(split, entry.item, entry.noise_multiplier))
    return planned, declined


def _record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def _score(req: Request, model: GRUClassifier, planned: list[PlannedRelease]) -> dict[str, ArrayRecord]:
    ev, data, cfg = req.cfg.evaluation, req.data, req.cfg
    grid, coarse = ScoreGrid(*ev.logit_range, ev.score_bins), ScoreGrid(*ev.logit_range, ev.subgroup_bins)
    if req.threshold > 0:  # the run's threshold is an edge of every bin grid: decisions at it are exact
        grid, coarse = grid.anchored(req.threshold), coarse.anchored(req.threshold)
    rng = np.random.default_rng(secrets.randbits(128))  # seeded from the OS: the server must not know it
    records, probs = {}, {}
    for release in planned:
        idx = data.split(release.split)
        if release.split not in probs:
            probs[release.split] = predict_proba(model, data.dataset.X[idx], data.dataset.S[idx])
        p, y, sigma = probs[release.split], data.dataset.y[idx], release.noise_multiplier
        if release.item == Item.HISTOGRAM:
            summary = ScoreSummary.from_predictions(y, p, grid)
            records[M.evaluation_key(release.split)] = _record((summary.noised(sigma, rng) if sigma else summary).to_arrays())
        elif release.item == Item.SUBGROUP_HISTOGRAMS:
            raw = {k: v[idx] for k, v in data.dataset.groups.items()}
            groups = SubgroupSummary.from_predictions(cfg, y, p, raw, coarse)
            records[M.SUBGROUPS] = _record({"subgroup-histograms": (groups.noised(sigma, rng) if sigma else groups).histogram})
        else:
            sizes = contribution_sizes(model, data.dataset.X[idx], data.dataset.S[idx], cfg.features, IMPORTANCE_CLIP)
            total = sizes.sum(axis=0)
            if sigma:
                total = total + rng.normal(0.0, sigma * IMPORTANCE_CLIP, total.shape)
            records[M.IMPORTANCE] = _record({"importance": total, "clip": np.array([IMPORTANCE_CLIP])})
    return records


# ----------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------


def _global_model(req: Request, device: torch.device) -> GRUClassifier:
    cfg = req.cfg
    model = GRUClassifier(model_spec(cfg), gru_impl=cfg.model.gru_impl if cfg.privacy.enabled else "torch")
    model.load_state_dict(req.msg.content[M.ARRAYS].to_torch_state_dict(), strict=True)
    return model.to(device)


def _noise_multiplier(cfg: ExperimentConfig, state: LocalState, q: float, steps: int, delta: float) -> float:
    """Fixed sigma, or sigma calibrated once (before the run's first round) for all
    ``run.rounds`` planned rounds."""
    if state.noise_multiplier <= 0:
        state.noise_multiplier = cfg.privacy.noise_multiplier if cfg.privacy.noise_multiplier > 0 else calibrate_noise(
            cfg.privacy.target_epsilon, delta, q, steps * cfg.run.rounds, cfg.privacy.accountant
        )
    return state.noise_multiplier


@dataclass
class CanaryAudit:
    """A privacy audit of one simulated hospital (``simulations.audit`` sets it; a real
    hospital never has one): its canaries train beside the model, and the audit
    coordinates each round releases are written to ``out_dir`` for the auditor."""

    hospital: str
    included: np.ndarray  # (m,) bool: which canaries are in the hospital's data
    out_dir: str
    tamper: Callable | None = None  # tests only: a planted bug in the DP optimizer


@_refusing
def train(msg: Message, context: Context, audit: CanaryAudit | None = None) -> Message:
    req = Request(msg, context)
    cfg, data = req.cfg, req.data
    # The same round with the same global model again (a resumed server): resend the
    # release already made instead of making, and paying for, a new one.
    reply_key = f"{req.run_id}/{req.server_round}/train/{msg.content[M.ARRAYS].object_id}/{' '.join(s.value for s in req.splits)}"
    cached = req.store.load_reply(req.run_id, reply_key)
    if cached is not None:
        log.info("%s round %d: resending the reply already released", req.node.name, req.server_round)
        return Message(_unpack(cached), reply_to=msg)

    state = LocalState.load(context, req.run_id)
    q, steps = steps_per_round(len(data.train), cfg.training.batch_size, cfg.training.local_epochs, cfg.training.sample_rate)
    budget = req.policy.training_budget(cfg, req.node.name)
    dp = None
    with req.store.transaction() as ledger:
        evaluations, declined = _plan_evaluations(req, ledger)
        if req.policy.require_dp(cfg) is not None:
            sigma = _noise_multiplier(cfg, state, q, steps, req.policy.delta)
            req.policy.check_noise(sigma)
            # one round's cost by the hospital's own ledger (its accountant and delta), not the
            # message's choice of accountant (PRV reads about 20% lower than RDP)
            req.policy.check_round_cost(epsilon([NoisyRelease(req.server_round, sigma, q, steps, 1.0)], ledger.delta,
                                                ledger.accountant))
            dp = DPSettings(sigma, cfg.privacy.max_grad_norm, q, cfg.privacy.clipping == "per_layer")
            planned = LedgerEntry(
                req.run_id, req.server_round, Mechanism.DP_SGD, "model weights after DP-SGD on the training split",
                item=Item.WEIGHTS,
                noise_multiplier=sigma, sample_rate=q, steps=steps, max_grad_norm=dp.max_grad_norm,
                examples=len(data.train), data=data.export,
            )
            would_be = ledger.epsilon_with([planned])
            if would_be > budget:
                spent = ledger.epsilon()
                log.warning("%s stops before round %d: epsilon would reach %.3f, budget %.3f (spent %.3f)",
                            req.node.name, req.server_round, would_be, budget, spent)
                exhausted = (spent, would_be)
            else:
                exhausted = None
                ledger.record(planned)
        else:
            exhausted = None
            # outside the DP guarantee, but never unrecorded: the ledger lists it
            ledger.record(LedgerEntry(req.run_id, req.server_round, Mechanism.NONE,
                                      "model weights trained WITHOUT DP on the training split",
                                      item=Item.WEIGHTS, examples=len(data.train), data=data.export))
        if exhausted is None:
            ledger.record(LedgerEntry(req.run_id, req.server_round, Mechanism.NONE, "the training split's size",
                                      item=Item.SPLIT_SIZE, examples=len(data.train), data=data.export))
    device = resolve_device(req.node.device)
    model = _global_model(req, device)
    content: dict = _score(req, model, evaluations)
    not_evaluated = {M.NOT_EVALUATED: "\n".join(declined)} if declined else {}
    if exhausted is not None:
        status = {M.EPSILON: exhausted[0], M.BUDGET: budget, M.DELTA: ledger.delta, **not_evaluated}
        return req.reply(ReplyState.BUDGET_EXHAUSTED, ledger, content, **status)

    if cfg.training.threads > 0:
        torch.set_num_threads(cfg.training.threads)
    canaries = None
    if audit is not None and audit.hospital == req.node.name and req.node.mode == NodeMode.SIMULATION:
        canaries = Canaries(torch.as_tensor(audit.included, dtype=torch.bool), audit.tamper)
    result = train_local(
        model, TensorData.from_numpy(data.dataset.X[data.train], data.dataset.S[data.train], data.dataset.y[data.train], device),
        training_for_round(cfg, req.server_round), steps, dp,
        sample_generator=secret_generator(),
        noise_generator=secret_generator(device) if dp else None,
        optimizer_state=state.optimizer if cfg.training.keep_optimizer_state else None,
        proximal_mu=float(msg.content[M.CONFIG].get(M.PROXIMAL_MU, 0.0)),
        canaries=canaries,
    )
    if canaries is not None:
        np.save(Path(audit.out_dir) / f"round-{req.server_round:04d}.npy", result.canary_coordinates)
    state.optimizer = result.optimizer_state if cfg.training.keep_optimizer_state else b""
    state.save(context)
    eps = ledger.epsilon() if dp else -1.0
    log.info("%s round %d: %d steps, loss %.4f (kept here), epsilon %.3f",
             req.node.name, req.server_round, result.steps, result.mean_loss, eps)
    content[M.ARRAYS] = ArrayRecord(torch_state_dict={k: v.detach().cpu() for k, v in model.state_dict().items()})
    content[M.METRICS] = MetricRecord({
        M.NUM_EXAMPLES: len(data.train), M.UNIT_WEIGHT: 1.0, M.EPSILON: float(eps),
        M.DELTA: float(ledger.delta), M.BUDGET: float(budget), M.STEPS: int(result.steps),
    })
    reply = req.reply(ReplyState.TRAINED, ledger, content, **not_evaluated)
    req.store.save_reply(req.run_id, reply_key, _pack(reply.content))
    return reply


@_refusing
def evaluate(msg: Message, context: Context) -> Message:
    req = Request(msg, context)
    req.data  # noqa: B018 - a simulated hospital's policy needs its split sizes
    with req.store.transaction() as ledger:
        evaluations, declined = _plan_evaluations(req, ledger)
    model = _global_model(req, resolve_device(req.node.device))
    content = _score(req, model, evaluations)
    not_evaluated = {M.NOT_EVALUATED: "\n".join(declined)} if declined else {}
    return req.reply(ReplyState.EVALUATED, ledger, content, **not_evaluated)


def _pack(content: RecordDict) -> bytes:
    buffer = io.BytesIO()
    torch.save(
        {
            "arrays": {name: {k: torch.as_tensor(v.numpy()) for k, v in rec.items()} for name, rec in content.array_records.items()},
            "metrics": {name: dict(rec) for name, rec in content.metric_records.items()},
            "configs": {name: dict(rec) for name, rec in content.config_records.items()},
        },
        buffer,
    )
    return buffer.getvalue()


def _unpack(blob: bytes) -> RecordDict:
    data = torch.load(io.BytesIO(blob), weights_only=True)
    records: dict = {name: ArrayRecord({k: Array(v.numpy()) for k, v in rec.items()}) for name, rec in data["arrays"].items()}
    records.update({name: MetricRecord(rec) for name, rec in data["metrics"].items()})
    records.update({name: ConfigRecord(rec) for name, rec in data["configs"].items()})
    return RecordDict(records)


def build_client_app(mods: list | None = None, audit: CanaryAudit | None = None) -> ClientApp:
    """The hospital ClientApp; ``mods`` wrap every handler (simulations inject faults
    so); ``audit`` puts a privacy audit's canaries into one simulated hospital."""
    client_app = ClientApp(mods=mods or [])
    client_app.query()(_refusing(query))
    if audit is None:
        client_app.train()(train)
    else:
        @wraps(train)
        def audited(msg: Message, context: Context) -> Message:
            return train(msg, context, audit)

        client_app.train()(audited)
    client_app.evaluate()(evaluate)
    return client_app


app = build_client_app()
