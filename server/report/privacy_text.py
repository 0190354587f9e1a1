"""The report's privacy parts: the Privacy section (each hospital's epsilons, the
accountants, the releases not covered by DP), each hospital's officer statement, the
preflight's answers and the one-run audit."""

from __future__ import annotations

import math

from common.document import Bullets, Image, Section, Statement, Table
from common.metrics import BUDGET_SPENT, format_budget_left, format_number

from ..records import AuditResult, HospitalPrivacy, RunPrivacy
from .plots import plot_epsilon
from .run_folder import RunFolder

GROUP_WORDS = {
    "train": ("training", "the model updates of every round"),
    "val": ("validation", "noisy score histograms: overall, per hour and of the monitor's onset"),
    "test": ("test", "the noisy score histogram, the per-group histograms and the inputs' importance"),
}


def officer_statement(name: str, h: HospitalPrivacy, privacy: RunPrivacy, budgets: dict[str, float] | None = None
                      ) -> str:
    """The plain-language paragraph a hospital's privacy officer can sign. ``budgets``:
    each group's budget, from the hospital's preflight answer (None: only the training
    patients' is known)."""
    if not privacy.dp_enabled:
        return (
            f"For the patients of hospital {name}: this run trained without differential privacy, so the "
            "model weights it released carry no formal privacy guarantee."
        )
    if h.delta is None or h.accountant is None or not h.groups:
        why = f"; {h.reason}" if h.reason else ""
        return (
            f"For the patients of hospital {name}: this run holds no record of any release about them (its state at "
            f"the end: {h.state.words}{why}). What it released in other runs is in its own ledger (`fedgru hospital show`)."
        )
    delta, other = h.delta, "PRV" if h.accountant == "rdp" else "RDP"
    scope = "this run" + (f" and the {len(h.earlier_runs)} earlier run(s)" if h.earlier_runs else "")
    groups = []
    for split, g in h.groups.items():
        label, what = GROUP_WORDS[split]
        other_eps = g.epsilon_prv if other == "PRV" else g.epsilon_rdp
        second = (f"with its own share of secure aggregation's noise alone, if every other hospital colluded with "
                  f"the coordinator: epsilon {format_number(g.epsilon_alone)}" if g.epsilon_alone is not None
                  else f"{other} accounting: epsilon {format_number(other_eps)}")
        groups.append(
            f"its {label} stays ({what}; {g.releases} {'release' if g.releases == 1 else 'releases'}): "
            f"({format_number(g.epsilon)}, {delta:.2g})-DP "
            f"({second})"
        )
    worst_split, worst = max(((split, g.epsilon) for split, g in h.groups.items()), key=lambda item: item[1])
    exact = "" if privacy.evaluation_dp else (
        " In this run the score histograms were exact (a comparison simulation): they carry no DP guarantee."
    )
    return (
        f"For every ICU stay of hospital {name} (the unit of this guarantee is one stay, one example of the data "
        f"set; patients with several stays are below), everything {name} released about that stay, over its whole "
        f"ledger ({scope}), satisfies differential privacy ({h.accountant.upper()} accounting), group by group: "
        + "; ".join(groups) + ". "
        + ("A release counts once per item sent: one evaluation of the model sends several (policy "
           "max_evaluations_per_run counts evaluations, not releases). " if len(groups) > 1 else "")
        + ("Each stay is in one of these groups only (its split is fixed by a keyed hash of its id), so a stay's "
           "epsilon is that of its group and the groups' epsilons do not add up for it, as long as the hospital's "
           "split settings (policy.split) stay as they were. " if len(groups) > 1 else "")
        + "A patient with several stays is protected as a group of stays: k stays in one group at up to k times "
          "that group's epsilon (with delta growing to k e^((k-1) epsilon) times delta: group privacy: Dwork & Roth "
          "2014, Theorem 2.2, in its standard (epsilon, delta) form), and stays in different groups at the sum of those groups' epsilons. "
        + f"In plain words, for the {GROUP_WORDS[worst_split][0]} stays (epsilon {format_number(worst)}, the largest "
        f"here; each group's factor is e to its own epsilon): whether or not any one stay's record was used, the "
        f"probability of any outcome an outsider can observe is at most {math.exp(worst):.2f} times (e to the power "
        f"epsilon) what it would be otherwise, plus {delta:.2g} (delta). Not covered by this guarantee, "
        "and released without DP: the hospital's name; its declared number of stays in each split (counted exactly "
        "once, when its export was registered: they depend on every stay, so one stay more or less can show in "
        "them); its policy settings answered at each run's preflight (budgets, delta, min_honest, max_colluding); and the "
        "settings and list of its releases (its ledger). The report lists every such release above."
        + exact + budget_words(h, budgets)
    )


def budget_words(h: HospitalPrivacy, budgets: dict[str, float] | None) -> str:
    """Each group's budget and what remains after this run; a spent validation or test
    budget means a later run that scores those stays will be refused."""
    # the hospital's own budgets where its preflight answer gave them (a run may cap the training one lower)
    known = {"train": h.budget, **(budgets or {})}
    parts, spent = [], []
    for split, budget in known.items():
        g = h.groups.get(split)
        if not budget or g is None:
            continue
        left = budget - g.epsilon
        words = f"{format_number(left)} remains" if left >= BUDGET_SPENT else "spent (less than 0.001 remains)"
        parts.append(f"{GROUP_WORDS[split][0]} epsilon = {format_number(budget)}, {words}")
        if left < BUDGET_SPENT and split != "train":
            spent.append(GROUP_WORDS[split][0])
    if not parts:
        return ""
    text = " Budgets: " + "; ".join(parts) + "."
    if spent:
        text += (f" With the {' and '.join(spent)} budget spent, the hospital refuses any later run that scores those "
                 "stays, until its privacy officer raises its policy's eval_max_epsilon.")
    return text


# What the training table's columns mean, for a privacy officer who has not met DP-SGD
SETTINGS_WORDS = (
    "Noise multiplier: the sd of the Gaussian noise added to each step's summed gradient, in units of the clipping "
    "norm; clipping norm: the largest L2 norm one stay's gradient may add to a step; sample rate: each training "
    "stay's chance of being in a step (Poisson sampling, Abadi et al. 2016); steps: the noisy steps of the whole run. "
    "Larger noise, fewer steps and a lower sample rate each give a smaller epsilon."
)
SETTINGS_WORDS_SECURE = (
    "Noise multiplier: the sd of the summed Skellam noise on each round's gradient sum, in units of the clipping "
    "norm, counting the min_honest hospitals' shares; clipping norm: the largest L2 norm one stay's gradient may add; "
    "sample rate 1: every training stay in every round; steps: one per round."
)


# What "RDP" and "PRV" in the tables mean, for a reader who has not met the accountants.
ACCOUNTANTS_WORDS = (
    "Two accountants read the same ledger: RDP (Renyi differential privacy; Mironov, CSF 2017; Mironov, Talwar & "
    "Zhang 2019 for the subsampled Gaussian), the familiar, more conservative bound, and PRV (privacy loss random "
    "variables; Gopi, Lee & Wutschitz, NeurIPS 2021), a tighter numerical bound. They are two readings of one set of "
    "releases, not two releases; `privacy.accountant` names the one that budgets are checked against. RDP also "
    "reads the discrete Laplace release of the monitor's onset histogram (in closed form: common/laplace.py); "
    "Opacus's PRV accountant has no analysis of it, so where a group holds one its PRV column repeats the RDP epsilon."
)


def privacy_sections(run: RunFolder) -> list[Section]:
    privacy = run.privacy
    if privacy is None:
        return []
    sec = Section("Privacy", [f"Guarantee: {privacy.guarantee}."])
    if privacy.dp_enabled:
        secure = any(h.epsilon_alone is not None for h in privacy.hospitals.values())
        # secure aggregation: the second epsilon is the hospital's own noise alone (PRV has no Skellam analysis)
        header = ["hospital", "epsilon (RDP)", "epsilon, own noise alone" if secure else "epsilon (PRV)", "delta",
                  "budget", "remaining", "rounds", "steps", "noise multiplier", "clipping norm", "sample rate", "state"]
        rows = [
            [name, h.epsilon_rdp, h.epsilon_alone if secure else h.epsilon_prv, format_number(h.delta), h.budget, format_budget_left(h.remaining), h.rounds_trained,
             sum(e.steps for e in h.history), h.noise_multiplier, h.max_grad_norm,
             h.history[-1].sample_rate if h.history else None, h.state.words]
            for name, h in sorted(privacy.hospitals.items())
        ]
        sec.blocks.append("Training patients (secure aggregation with distributed Skellam noise; the noise multiplier "
                          "counts the min_honest hospitals each hospital's policy counts on):" if secure
                          else "Training patients (DP-SGD):")
        sec.blocks.append(Table(header, rows))
        sec.blocks.append(SETTINGS_WORDS_SECURE if secure else SETTINGS_WORDS)
        sec.blocks.append(ACCOUNTANTS_WORDS)
        group_rows = [
            [name, GROUP_WORDS[split][0], g.epsilon_rdp, g.epsilon_alone if secure else g.epsilon_prv,
             format_number(h.delta), g.releases, g.this_run]
            for name, h in sorted(privacy.hospitals.items()) for split, g in h.groups.items()
        ]
        sec.blocks.append("Every group of patients, over each hospital's whole ledger:")
        sec.blocks.append(Table(["hospital", "patients", "epsilon (RDP)",
                                 "epsilon, own noise alone" if secure else "epsilon (PRV)", "delta", "releases",
                                 "in this run"], group_rows))
        if plot_epsilon(run.metrics, privacy, run.path / "epsilon.png"):
            sec.blocks.append(Image(run.path / "epsilon.png", "The training patients' cumulative epsilon per round "
                                                              "(dotted: budgets; hospitals that spent alike draw one "
                                                              "line over another; validation and test patients: the "
                                                              "table above)"))
    sections = [sec]
    level = privacy.hospital_level
    if level is not None:
        sections.append(Section("Second guarantee: hospital-level DP", [
            f"Each hospital's update was clipped to L2 norm {level.clipping_norm} and the aggregate noised "
            f"(noise multiplier {level.noise_multiplier}); over {level.releases} releases this gives "
            f"epsilon = {format_number(level.epsilon)} at delta = {format_number(level.delta)} ({level.accountant}).",
            level.guarantee,
        ]))
    sections.append(Section("Releases not covered by DP", [
        Bullets([f"{r.field} ({r.when}): {r.reveals}" for r in privacy.non_dp_releases])
    ]))
    statements = Section("Statements for each hospital's privacy officer")
    for name, h in sorted(privacy.hospitals.items()):
        answer = next((a for a in (run.metrics.preflight or []) if a.hospital == name), None)
        statements.blocks.append(Statement(officer_statement(name, h, privacy, answer.budgets if answer else None)))
    statements.blocks.append(RNG_NOTE)
    sections.append(statements)
    return sections


RNG_NOTE = (
    "DP-SGD's noise and Poisson sampling use torch's generator, the evaluation releases' noise numpy's (PCG64), "
    "both seeded from the operating system's entropy at each hospital. Neither is a cryptographically secure "
    "generator: Opacus's secure mode needs torchcsprng, which does not install with current torch. Floating-point "
    "Gaussian sampling is also known to leak slightly more than the idealised mechanism through the low bits of "
    "what it releases (Jin et al., IEEE S&P 2022): each evaluation release's Gaussian noise is therefore snapped to "
    "a grid of at most 1/256 of its sd (after Mironov 2012; common/gaussian_noise.py), so every released value lies "
    "on the same grid whatever the count: this narrows the gap, it does not prove it closed (the sampler is not "
    "exact). The DP-SGD updates are Opacus's floating-point noise, not snapped. The monitor's onset "
    "histogram carries discrete Laplace noise: whole numbers, which leave no low bits to read, drawn exactly "
    "(Canonne, Kamath & Steinke 2020: rational arithmetic on the operating system's entropy, at a scale at or "
    "above the accounted one). The epsilons above are those of the idealised mechanisms."
)


def audit_section(audit: AuditResult | None) -> Section | None:
    if audit is None:
        return None
    claimed = audit.epsilon_claimed
    verdict = ("no claim to check (DP off)" if not math.isfinite(claimed) else
               "consistent" if audit.epsilon_lower_bound <= claimed else "ABOVE the claim: a leak")
    return Section("Privacy audit (one training run)", [
        Table(["hospital", "canaries", "guesses", "right", "epsilon lower bound (95%)", "claimed epsilon", "verdict"],
              [[audit.hospital, audit.canaries, audit.guesses, audit.correct, audit.epsilon_lower_bound, claimed, verdict]]),
        f"An empirical check of the DP mechanism (Steinke, Nasr & Jagielski, NeurIPS 2023): {audit.canaries} "
        f"{audit.canary_kind} were each put into {audit.hospital}'s training with probability 1/2; from what "
        f"{audit.hospital} released, the auditor guessed which; this many right guesses rule out, at "
        f"{audit.confidence:.0%} confidence, any epsilon below the bound. A bound above the claimed epsilon would "
        "mean the implementation leaks more than its accounting says.",
    ])


def preflight_section(run: RunFolder) -> Section | None:
    """Each hospital's answer to the run's plan: the noise it accepted to train with and
    why, each group's epsilon after the planned releases and its budget left before;
    or why it refused and the change that would fit."""
    answers = run.metrics.preflight
    if not answers:
        return None
    rows = []
    for a in sorted(answers, key=lambda a: a.hospital):
        left = " / ".join(format_budget_left(a.remaining.get(g)) for g in ("train", "val", "test")) if a.remaining else ""
        if a.accepted:
            after = " / ".join(format_number(a.planned.get(g), 3) for g in ("train", "val", "test"))
            rows.append([a.hospital, "accepts", f"{format_number(a.noise_multiplier, 3)} ({a.noise_set_by})", after, left])
        else:
            rows.append([a.hospital, f"refuses: {a.reason}", "", "", left])
    accepted = sum(a.accepted for a in answers)
    return Section("Preflight: the plan each hospital agreed to", [
        Table(["hospital", "answer", "noise multiplier (set by)", "epsilon after the run: train / val / test",
               "budget left before: train / val / test"], rows),
        f"{accepted} of {len(answers)} hospitals accepted the run's whole plan before anything was spent; a hospital "
        "that refused was asked nothing further. Each fits its own noise: the run's target or setting, raised where "
        "its per-round ceiling, its remaining budget or its noise floor needs more.",
    ])
