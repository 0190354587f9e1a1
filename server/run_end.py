"""The end of a run (``server.coordinator``): the final model's validation, its
recalibration, the decision threshold and each hour's, the one test release (with the
monitor's onset histogram, ``common.onset``), and the run's results.

Every number chosen here post-processes what the hospitals released (``server.results``
reads them); the only releases asked for are the final validation and the test.
Functions of the coordinator (``co``), as ``server.secure_evaluation`` is.
"""

from __future__ import annotations

import logging

from flwr.app import ArrayRecord, MessageType, RecordDict

from common import messages as M
from common.data.preprocess import num_steps
from common.messages import Split
from common.metrics import ScoreGrid, ScoreSummary, pooled
from common.model import model_spec, output_layer_keys

from .calibration import fit_logistic_calibration, fold_into_output_layer
from .records import Calibration, TrainPhase
from .results import every_hour, exact_metrics_of, flag_level_intervals, pooled_noise, risk_interval
from .validation import Evaluations, evaluation_grids

log = logging.getLogger("fedgru.server")


def final_evaluation(co, server_round: int, splits: list[Split], threshold: float | None = None,
                     hour_thresholds: list[float] | None = None) -> dict[str, Evaluations]:
    """Every hospital scores the global model on the given splits (the test split with
    the run's threshold and, for the monitor's onset histogram, each hour's); returns
    what each released (under secure aggregation, what they released together:
    ``server.secure_evaluation``)."""
    if co.secure is not None:
        return co.secure.evaluate(server_round, splits, threshold=threshold, hour_thresholds=hour_thresholds)
    co._phase = TrainPhase()

    def content() -> RecordDict:
        config = co._config(server_round, splits)
        if threshold is not None:
            config[M.THRESHOLD] = float(threshold)
        if hour_thresholds is not None:
            config[M.HOUR_THRESHOLDS] = [float(t) for t in hour_thresholds]
        return RecordDict({M.ARRAYS: co.arrays, M.CONFIG: config})

    replies = co._send(sorted(co.hospitals), MessageType.EVALUATE, content)
    evaluations: dict[str, Evaluations] = {}
    for nid, reply in replies:
        accepted = co._accept(nid, reply, f"final evaluation ({', '.join(s.value for s in splits)})")
        if accepted is not None:
            view, ledger = accepted
            co._evaluations(view, nid, reply, ledger, server_round, splits, evaluations, threshold, final=True)
    co._lines.flush()
    co.final_dropped += co._phase.dropped
    return evaluations


def recalibrate(co, val: ScoreSummary | None) -> Calibration | None:
    """Platt scaling fitted on the pooled validation histograms, folded into the
    global model's output layer (server.calibration); kept in ``co.calibration``.
    None when off or not possible."""
    if not co.cfg.evaluation.calibrate or co.cfg.num_classes != 2:
        return None
    fit = fit_logistic_calibration(val) if val is not None else None
    if fit is None:
        log.warning("no usable pooled validation histogram: the risks are left uncalibrated")
        return None
    scale, shift = fit
    weight_key, bias_key = output_layer_keys(model_spec(co.cfg))
    state = fold_into_output_layer(co.arrays.to_torch_state_dict(), weight_key, bias_key, scale, shift)
    co.arrays = ArrayRecord(torch_state_dict=state)
    log.info("risk recalibrated on pooled validation: logit -> %.3f x logit %+.3f", scale, shift)
    co.calibration = Calibration(scale, shift)
    return co.calibration


def finish_run(co, last_round: int) -> None:
    """Validate the final model, recalibrate it and choose the threshold from what the
    hospitals release about their validation patients; then the calibrated model and
    the threshold go out for the one test release; write the run's results. A run in
    which no hospital trained asks for no release at all: nothing would be learnt of a
    model no one trained, and each release costs its patients' budget."""
    if not co.trained_rounds:
        # said once on each stream: the run's summary (stdout, "No evaluation: ...") and the command's error (stderr)
        why = co.not_started or "no hospital trained in this run, so no validation or test release was asked for"
        co.recorder.finish(None, None, [h.status() for h in co.hospitals.values()],
                             co.aggregator.hospital_privacy(), not_evaluated=why)
        return
    # said before the run's longest silence: the final releases, then their reading, whose intervals redraw the
    # noise and refit each draw (server thread, about a minute of a default run's end on 2 cores)
    log.info("final releases: the hospitals validate and test the released model; then the releases are read, "
             "with intervals (about a minute on 2 cores)")
    # the model the run releases: the average of the rounds' global models (server.averaging), which every
    # final release, the bundle and the exact metrics read from here on
    final_model = co.average.final(co.arrays)
    averaged, co.arrays = final_model is not co.arrays, final_model
    ev = co.cfg.evaluation
    grid = ScoreGrid(ev.logit_range[0], ev.logit_range[1], ev.score_bins)
    validated = final_evaluation(co, last_round, [Split.VAL])
    val_parts = {n: e.summaries[Split.VAL] for n, e in validated.items() if Split.VAL in e.summaries}
    val_noise = {n: e.histogram_noise.get(Split.VAL, 0.0) for n, e in validated.items()}
    raw, val_sd = pooled(list(val_parts.values())), pooled_noise(val_parts, val_noise)
    val = co.reader.read(raw, noise_sd=val_sd)  # pooled first: the fit reads the sum of the releases
    if not averaged:  # the last round's own model: its validation goes into that round's record, as every
        co._validated(last_round, validated)  # progress validation does (an average is no round's model)
    uncalibrated = recalibrate(co, val)
    readable = raw is not None and co.reader.readable(raw.n, val_sd, raw.histogram.size)
    threshold, threshold_source = co.reader.threshold_and_source(val, grid, uncalibrated, readable)
    rate = co.reader.flag_rate(val, threshold) if readable else None  # before the threshold is calibrated
    own_scale_threshold, threshold = threshold, co.reader.calibrated_threshold(threshold, uncalibrated)
    # each hour's threshold, from the validation releases: the monitor's, sent with the test release so
    # the hospitals can count their validation stays' highest excess over them (common.onset)
    checkpoints = co.reader.hour_thresholds(validated, rate, grid, uncalibrated)
    hours = every_hour(checkpoints, threshold, num_steps(co.cfg.features)) if co.cfg.is_binary else []
    released = final_evaluation(co, last_round, [Split.TEST], threshold if co.cfg.is_binary else None,
                                     hours if co.cfg.monitors_onset else None)
    test_grid, _ = evaluation_grids(co.cfg, threshold if co.cfg.is_binary else None)
    result = co.reader.test_result(released, threshold, test_grid, co.calibration, co.final_dropped)
    result.threshold_source = threshold_source
    result.averaged_rounds = list(co.average.rounds) if averaged and co.average.rounds else []
    readings = {}
    if checkpoints:
        result.hour_thresholds = hours
        result.checkpoint_thresholds = {str(h): t for h, t in checkpoints.items()}
        readings = co.reader.hour_threshold_intervals(validated, checkpoints, rate, raw, val_sd, own_scale_threshold,
                                                      grid)
        result.checkpoint_intervals = {str(h): risk_interval(r, uncalibrated) for h, r in readings.items()}
    result.onset_margin = co.reader.onset_margin(released, grid)
    margin = co.reader.margin_interval(released, grid, result.onset_margin)
    result.onset_margin_interval = [margin.low, margin.high] if margin is not None else None
    if result.onset_margin is not None:
        result.hour_thresholds = hours  # the margin is over these, whether or not the hours have their own
        result.monitor_rate = co.cfg.evaluation.monitor_rate
        result.flag_level_intervals = flag_level_intervals(hours, sorted(checkpoints), readings, margin,
                                                           threshold_source != "read", uncalibrated)
    # the threshold and the monitor are results: the run's summary prints them (server.report.bedside.decision_lines)
    arrays = {k: v.numpy() for k, v in co.arrays.items()}
    if co.simulated:  # the simulation holds every patient: the exact metrics beside the estimates
        exact = exact_metrics_of(co.cfg, arrays, threshold)
        if exact is not None:
            result.exact, result.exact_hospitals = exact.pooled, exact.hospitals
            result.exact_calibration_ratio, result.exact_calibration_curve = exact.calibration_ratio, exact.calibration_curve
    co.recorder.finish(result, arrays, [h.status() for h in co.hospitals.values()],
                         co.aggregator.hospital_privacy())
