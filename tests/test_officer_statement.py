"""The paragraph a hospital's privacy officer signs (server.report.privacy_text): every
sentence true of what the hospital released, read from privacy.json's records alone."""

from __future__ import annotations

from server.records import GroupPrivacy, HospitalPrivacy, HospitalState, RunPrivacy
from server.report.privacy_text import officer_statement


def _hospital(**groups: float) -> HospitalPrivacy:
    return HospitalPrivacy(
        state=HospitalState.ACTIVE, rounds_trained=3, budget=1.0, epsilon=groups["train"], epsilon_rdp=groups["train"],
        epsilon_prv=groups["train"] * 0.9, delta=1.4e-5, accountant="rdp", remaining=1.0 - groups["train"],
        groups={g: GroupPrivacy(eps, eps, eps * 0.9, 3, 3) for g, eps in groups.items()},
    )


def _privacy(h: HospitalPrivacy) -> RunPrivacy:
    return RunPrivacy("r", True, True, "g", {"a": h}, None, [])


def test_the_statement_names_its_unit_the_group_its_factor_belongs_to_and_the_exact_delta():
    """A new user's officer read "every patient" for a per-stay guarantee, a factor of 2.72
    without the group it belongs to, and delta 1.4e-05 printed as 1e-05."""
    h = _hospital(train=0.832, val=1.0, test=0.7)
    text = officer_statement("a", h, _privacy(h))
    assert "For every ICU stay of hospital a (the unit of this guarantee is one stay" in text
    assert "k stays in one group at up to k times that group's epsilon" in text
    assert "for the validation stays (epsilon 1.000, the largest here" in text and "at most 2.72 times" in text
    assert "(0.832, 1.4e-05)-DP" in text and "plus 1.4e-05 (delta)" in text and "1e-05" not in text
    assert "Not covered by this guarantee, and released without DP" in text and "about no single" not in text


def test_the_statement_lists_each_groups_own_budget_and_says_what_a_spent_one_means():
    """With the budgets of the hospital's preflight answer: its own training budget (8, where
    the run capped it at 1), and a spent validation budget refuses later runs."""
    h = _hospital(train=0.832, val=0.99995, test=0.7)
    text = officer_statement("a", h, _privacy(h), {"train": 8.0, "val": 1.0, "test": 3.0})
    assert "Budgets: training epsilon = 8.000, 7.168 remains; validation epsilon = 1.000, spent" in text
    assert "test epsilon = 3.000, 2.300 remains" in text
    assert "With the validation budget spent, the hospital refuses any later run that scores those stays" in text
    without = officer_statement("a", h, _privacy(h))  # a run folder without the answers: the training budget only
    assert "Budgets: training epsilon = 1.000, 0.168 remains." in without and "validation epsilon =" not in without


def test_a_hospital_with_no_release_gets_a_whole_sentence_with_its_state_and_reason():
    h = HospitalPrivacy(state=HospitalState.ACTIVE, rounds_trained=0, budget=1.0,
                        reason="left out of secure aggregation: its policy's least threshold would leave ...")
    text = officer_statement("e", h, _privacy(h))
    assert "no record of any release about them (its state at the end: in the run to its end; left out of secure" in text


def test_the_privacy_tables_print_a_remaining_budget_at_the_precision_of_every_epsilon():
    """A new user's report printed "remaining 6.65e-05" in a column of epsilons at three
    decimals, where the officer's statement beside it says "less than 0.001 remains"."""
    from common.metrics import format_budget_left

    assert format_budget_left(6.65e-05) == "under 0.001"
    assert format_budget_left(0.168) == "0.168" and format_budget_left(None) == "n/a"
    assert format_budget_left(0.0) == format_budget_left(-1e-06) == "under 0.001"  # spent, as the statement says, never "-1e-06"
