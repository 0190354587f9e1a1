"""A fast screen of DP-SGD settings for the default model, many runs at once.

    python -m simulations.head_screen --runs 6 [--folds 0,1,2,3,4] [--set key=value ...]
                                      [--lr 0.3] [--server-momentum 0.9 --server-lr 0.1] ...

With ``model.init: carry_forward`` and ``model.train_gru: false`` the network is a fixed
feature map (each variable's GRU state after 48 h) followed by a linear head, so
federated DP-SGD on it is DP-SGD logistic regression on those features. This screen
computes the features once and runs ``--runs`` independent federations side by side as
one batched tensor program: per hospital and step a Poisson sample at the rate
``common.privacy.steps_per_round`` gives, each example's gradient (head weights and
bias) clipped to ``privacy.max_grad_norm``, Gaussian noise with the multiplier
``common.privacy.calibrate_noise`` gives for the whole planned run, the mean over the
expected batch, SGD; then FedAvg weighted by training examples. So one configuration
on 5 folds x 6 runs takes seconds instead of half an hour, and the differences the
real protocol (``simulations.utility``, one run per fold) cannot resolve become visible.

It is a screen, not the protocol: no Flower, no dropout, no DP evaluation releases
(calibration, threshold) and exact test AUROC of the last (or averaged) model; confirm a
choice with ``simulations.utility``. Options that are not a DP guarantee per hospital
are marked so (``--ideal-secure-aggregation``, ``--noise-scale``, ``--oracle-init``).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import sys
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from common.config import load_config
from common.data.dataset import load_dataset
from common.data.partition import HospitalSplit, make_partition
from common.model import GRUClassifier, model_spec
from common.privacy import calibrate_noise, steps_per_round
from server.averaging import decay_at

_calibrate = functools.lru_cache(maxsize=256)(calibrate_noise)  # the same hospitals, fold after fold


@dataclass
class Screen:
    runs: int = 6
    lr: float | None = None  # None: training.lr
    server_lr: float = 1.0
    server_momentum: float = 0.0
    ema: float = 0.0  # > 0: also score an exponential average of the global models (strategy.average_decay)
    tail: int = 0  # > 0: also score the mean of the last `tail` global models
    noise_weighted: bool = False  # weight hospitals by the inverse variance of their update's noise
    units: list[int] | None = None  # keep only these GRU units of every variable (all descriptors kept)
    central: bool = False  # one curator holding every hospital's training split (the central-DP baseline)
    ideal_secure_aggregation: bool = False  # NOT per-hospital DP: each hospital adds sigma / sqrt(K)
    noise_scale: float = 1.0  # NOT DP unless 1: multiplies every noise multiplier (0: no noise, a reference)
    seed: int = 0
    oracle_init: float = 0.0  # NOT DP: start the head at this fraction of a converged non-private fit
    public_fraction: float = 0.0  # > 0: this share of all stays is a public data set, out of every hospital
    public_start: bool = True  # ... and the head starts at a non-private fit of it (False: at zero)
    lr_final: float | None = None  # cosine decay of the learning rate to this by the last round (None: constant)
    level: float | None = None  # also the share of test stays each model flags at this risk (a clinical level)


def head_features(cfg) -> tuple[np.ndarray, np.ndarray, list[HospitalSplit]]:
    """What the head reads for every stay (fixed GRU), the labels, and the hospitals."""
    if not (cfg.model.architecture == "per_variable" and not cfg.model.train_gru and cfg.model.head_hidden == 0):
        raise ValueError("the screen needs a fixed per-variable GRU (model.train_gru: false) and a linear head")
    ds = load_dataset(cfg)
    torch.manual_seed(cfg.run.seed)
    model = GRUClassifier(model_spec(cfg), gru_impl="torch").eval()
    with torch.no_grad():
        features = model.head_inputs(torch.as_tensor(ds.X, dtype=torch.float32),
                                     torch.as_tensor(ds.S, dtype=torch.float32)).double().numpy()
    return features, ds.y, make_partition(ds, cfg)


def cosine_lr(first: float, last: float, r: int, rounds: int) -> float:
    """The learning rate of round ``r`` (0-based) decaying from ``first`` to ``last`` along a
    half cosine (Loshchilov & Hutter, SGDR, ICLR 2017, without restarts)."""
    return last + 0.5 * (first - last) * (1 + math.cos(math.pi * r / max(1, rounds - 1)))


def split_off_public(hospitals: list[HospitalSplit], n: int, fraction: float,
                     seed: int) -> tuple[np.ndarray, list[HospitalSplit]]:
    """A public data set of the same kind (a random ``fraction`` of all ``n`` stays), and
    the hospitals without those stays in any split."""
    public = np.sort(np.random.default_rng(1000 + seed).permutation(n)[: round(fraction * n)])
    rest = [HospitalSplit(h.name, *(np.setdiff1d(getattr(h, part), public) for part in ("train", "val", "test")))
            for h in hospitals]
    return public, rest


def _converged_head(X: np.ndarray, y: np.ndarray) -> torch.Tensor:
    """A non-private logistic fit (weights, then bias), as a starting head."""
    from sklearn.linear_model import LogisticRegression

    fit = LogisticRegression(C=1.0, max_iter=2000).fit(X, y)
    return torch.as_tensor(np.concatenate([fit.coef_[0], fit.intercept_]))


def screen(cfg, s: Screen) -> dict[str, list[float]]:
    """Test AUROC (pooled over hospitals) of ``s.runs`` independent federations."""
    features, y, hospitals = head_features(cfg)
    if s.units is not None:
        H, V = cfg.model.gru_hidden[0], len(cfg.features.variables)
        keep = [v * H + u for v in range(V) for u in s.units] + list(range(V * H, features.shape[1]))
        features = features[:, keep]
    public = np.zeros(0, dtype=np.int64)
    if s.public_fraction:
        public, hospitals = split_off_public(hospitals, len(y), s.public_fraction, s.seed)
    if s.central:
        hospitals = [HospitalSplit("all", *(np.concatenate([getattr(h, part) for h in hospitals])
                                            for part in ("train", "val", "test")))]
    gen = torch.Generator().manual_seed(s.seed)
    R, d = s.runs, features.shape[1] + 1  # + bias
    tr, pr = cfg.training, cfg.privacy
    lr = tr.lr if s.lr is None else s.lr
    C = pr.max_grad_norm
    parts = []
    for h in hospitals:
        n = len(h.train)
        q, steps = steps_per_round(n, tr.batch_size, tr.local_epochs, tr.sample_rate)
        sigma = _calibrate(pr.target_epsilon, pr.delta_for(n), q, steps * cfg.run.rounds, pr.accountant)
        if s.ideal_secure_aggregation:
            sigma /= math.sqrt(len(hospitals))
        X = torch.as_tensor(np.concatenate([features[h.train], np.ones((n, 1))], 1))
        parts.append((n, q, steps, sigma * s.noise_scale, X, torch.as_tensor(y[h.train], dtype=torch.float64)))
    W = torch.zeros(R, d, dtype=torch.float64)  # zero-initialised head (model.zero_init_head)
    if s.public_fraction and s.public_start:
        W[:] = _converged_head(features[public], y[public])
    if s.oracle_init:
        train = np.concatenate([h.train for h in hospitals])
        W[:] = s.oracle_init * _converged_head(features[train], y[train])
    W0 = W.clone()
    momentum, ema, tail = torch.zeros_like(W), None, []
    base_lr = lr
    for r in range(cfg.run.rounds):
        lr = base_lr if s.lr_final is None else cosine_lr(base_lr, s.lr_final, r, cfg.run.rounds)
        updates, weights = [], []
        for n, q, steps, sigma, X, yy in parts:
            w = W.clone()
            for _ in range(steps):
                chosen = (torch.rand(R, n, generator=gen) < q).double()
                grads = (torch.sigmoid(w @ X.T) - yy).unsqueeze(-1) * X.unsqueeze(0)  # (R, n, d)
                grads = grads * torch.clamp(C / (grads.norm(dim=-1, keepdim=True) + 1e-12), max=1.0)
                noisy = (grads * chosen.unsqueeze(-1)).sum(1) + torch.randn(R, d, generator=gen, dtype=torch.float64) * sigma * C
                w = w - lr * noisy / max(1, round(q * n))  # Opacus divides by the expected batch size
            updates.append(w - W)
            weights.append(1 / (steps * (sigma * C / (q * n)) ** 2) if s.noise_weighted and sigma > 0 else n)
        step = sum(wt * u for wt, u in zip(weights, updates)) / sum(weights)
        momentum = s.server_momentum * momentum + step
        W = W + s.server_lr * momentum
        if s.ema:
            kept = decay_at(s.ema, r + 1)  # as the coordinator averages (server.averaging), warm-up included
            ema = W.clone() if ema is None else kept * ema + (1 - kept) * W
        if s.tail and r >= cfg.run.rounds - s.tail:
            tail.append(W.clone())
    models = {"last": W, **({"start": W0} if s.public_fraction else {}), **({"ema": ema} if ema is not None else {}),
              **({"tail": sum(tail) / len(tail)} if tail else {})}
    test = np.concatenate([h.test for h in hospitals])
    Xt = torch.as_tensor(np.concatenate([features[test], np.ones((len(test), 1))], 1))
    scores = {name: (M @ Xt.T).numpy() for name, M in models.items()}
    found = {name: [float(roc_auc_score(y[test], row)) for row in rows] for name, rows in scores.items()}
    if s.level is not None:  # a risk >= level is a logit >= logit(level)
        cut = math.log(s.level / (1 - s.level))
        found.update({f"{name} flagged at {s.level:g}": [float((row >= cut).mean()) for row in rows]
                      for name, rows in scores.items()})
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--folds", default="0,1,2,3,4", help="held-out folds of 5 (split.folds=5)")
    parser.add_argument("--runs", type=int, default=6, help="independent federations per fold")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--server-lr", type=float, default=1.0)
    parser.add_argument("--server-momentum", type=float, default=0.0)
    parser.add_argument("--ema", type=float, default=0.0)
    parser.add_argument("--tail", type=int, default=0)
    parser.add_argument("--noise-weighted", action="store_true")
    parser.add_argument("--units", default="", help="comma-separated GRU units to keep, e.g. 1,2,3")
    parser.add_argument("--central", action="store_true")
    parser.add_argument("--ideal-secure-aggregation", action="store_true")
    parser.add_argument("--noise-scale", type=float, default=1.0)
    parser.add_argument("--oracle-init", type=float, default=0.0,
                        help="NOT DP: start every head at this fraction of a converged non-private logistic fit")
    parser.add_argument("--public-fraction", type=float, default=0.0,
                        help="this share of all stays plays a public data set: out of every hospital, the head starts "
                             "at a non-private fit of it (scored as 'start')")
    parser.add_argument("--zero-start", action="store_true", help="with --public-fraction: start at zero all the same")
    parser.add_argument("--lr-final", type=float, default=None, help="cosine decay of the learning rate to this")
    parser.add_argument("--level", type=float, default=None,
                        help="also the share of test stays each model flags at this risk, with its sd within a fold "
                             "(the training noise's part of the spread) beside the sd over all runs")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    s = Screen(args.runs, args.lr, args.server_lr, args.server_momentum, args.ema, args.tail, args.noise_weighted,
               [int(u) for u in args.units.split(",")] if args.units else None, args.central,
               args.ideal_secure_aggregation, args.noise_scale, oracle_init=args.oracle_init, lr_final=args.lr_final,
               public_fraction=args.public_fraction, public_start=not args.zero_start, level=args.level)
    results: dict[str, list[float]] = {}
    within: dict[str, list[float]] = {}  # each fold's variance over its runs: the training noise's part
    for fold in (int(f) for f in args.folds.split(",")):
        cfg = load_config(args.config, args.overrides + ["split.folds=5", f"split.fold={fold}"])
        for name, values in screen(cfg, s).items():
            results.setdefault(name, []).extend(values)
            if len(values) > 1:
                within.setdefault(name, []).append(statistics.variance(values))
    summary = {name: {"mean": statistics.fmean(v), "sd": statistics.stdev(v) if len(v) > 1 else float("nan"), "n": len(v),
                      **({"sd within a fold": math.sqrt(statistics.fmean(within[name]))} if name in within else {})}
               for name, v in results.items()}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
