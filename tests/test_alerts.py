"""Alert rules and their start/ongoing/resolve transitions, without AWS."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from tasks.monitoring.alerts import (
    BACKLOG_GROWING,
    STALLED,
    THROUGHPUT_HIGH_INPUT,
    AlertThresholds,
    evaluate_backlog,
    evaluate_rules,
    evaluate_stalled,
    evaluate_throughput,
    load_alert_state,
    save_alert_state,
    state_variable_name,
    transition,
)
from tasks.monitoring.cloudwatch import INPUT_TOKENS_PER_MINUTE, PENDING_RECORDS

NOW = datetime(2025, 1, 1, 12, 0, tzinfo=timezone.utc)


def _series(values: list[float], minutes_apart: float = 1.0) -> list[tuple[datetime, float]]:
    """Points ending at NOW, one every `minutes_apart`."""
    n = len(values)
    return [
        (NOW - timedelta(minutes=(n - 1 - i) * minutes_apart), value)
        for i, value in enumerate(values)
    ]


def test_stalled_when_pending_and_no_tokens_for_the_whole_window():
    series = {PENDING_RECORDS: _series([100] * 31), INPUT_TOKENS_PER_MINUTE: _series([0] * 31)}
    condition = evaluate_stalled(series, NOW, 30)
    assert condition.active
    assert condition.since == NOW - timedelta(minutes=30)
    assert condition.detail["pending_records"] == 100


def test_stalled_not_yet_when_shorter_than_the_stall_minutes():
    series = {PENDING_RECORDS: _series([100] * 20), INPUT_TOKENS_PER_MINUTE: _series([0] * 20)}
    assert not evaluate_stalled(series, NOW, 30).active


def test_stalled_counts_missing_token_points_as_zero():
    series = {PENDING_RECORDS: _series([5] * 31), INPUT_TOKENS_PER_MINUTE: []}
    assert evaluate_stalled(series, NOW, 30).active


def test_stalled_clears_when_tokens_flow_again():
    tokens = [0] * 30 + [500]
    series = {PENDING_RECORDS: _series([100] * 31), INPUT_TOKENS_PER_MINUTE: _series(tokens)}
    assert not evaluate_stalled(series, NOW, 30).active


def test_stalled_clears_when_nothing_is_pending():
    pending = [100] * 30 + [0]
    series = {PENDING_RECORDS: _series(pending), INPUT_TOKENS_PER_MINUTE: _series([0] * 31)}
    assert not evaluate_stalled(series, NOW, 30).active


def test_stalled_clears_when_bedrock_stopped_publishing_pending():
    # The last job ended 40 minutes ago with a non-zero average left in its last bucket.
    old = [(t - timedelta(minutes=40), v) for t, v in _series([100] * 31)]
    series = {PENDING_RECORDS: old, INPUT_TOKENS_PER_MINUTE: []}
    condition = evaluate_stalled(series, NOW, 30, period_seconds=60)
    assert not condition.active and condition.detail["pending_records"] == 0.0


def test_throughput_above_threshold_uses_the_window_average():
    points = _series([2_000_000] * 10 + [0] * 10)
    condition = evaluate_throughput(THROUGHPUT_HIGH_INPUT, points, NOW, 360, 900_000)
    assert condition.active
    assert condition.value == 1_000_000


def test_throughput_ignores_points_outside_the_window():
    points = _series([5_000_000] * 5 + [10] * 5, minutes_apart=60)
    condition = evaluate_throughput(THROUGHPUT_HIGH_INPUT, points, NOW, 60, 1_000)
    assert not condition.active
    assert condition.value == 10


def test_backlog_growing_when_pending_rises_beyond_the_fraction():
    condition = evaluate_backlog(_series([100, 120, 150]), NOW, 2, 0.1, 3)
    assert condition.active
    assert condition.detail["growth_fraction"] == 0.5


def test_backlog_not_judged_with_too_few_points():
    assert not evaluate_backlog(_series([100, 200]), NOW, 1, 0.1, 3).active


def test_backlog_not_growing_when_draining():
    assert not evaluate_backlog(_series([150, 120, 100]), NOW, 2, 0.1, 3).active


def test_backlog_not_judged_while_a_run_fills_it():
    # A run started four minutes ago: each submitted job adds its records (as on the local
    # stack, where this fired 4.7 s into a run: 98 → 181 pending against a 30 s window).
    assert not evaluate_backlog(_series([0, 98, 181, 270, 350]), NOW, 60, 0.1, 3).active
    assert not evaluate_backlog(_series([98, 181, 270, 350]), NOW, 60, 0.1, 3).active


def test_backlog_not_judged_when_the_window_began_with_nothing_pending():
    pending = [0] * 40 + [100] * 10 + [300] * 11
    assert not evaluate_backlog(_series(pending), NOW, 60, 0.1, 3).active


def test_backlog_not_judged_once_bedrock_stopped_publishing():
    # Pending rose for an hour, then the series stopped ten minutes ago: nothing is pending.
    rising = [(t - timedelta(minutes=10), v) for t, v in _series(list(range(100, 161)))]
    assert not evaluate_backlog(rising, NOW, 60, 0.1, 3).active


def test_backlog_growing_over_a_window_full_of_backlog():
    condition = evaluate_backlog(_series(list(range(100, 161))), NOW, 60, 0.1, 3)
    assert condition.active and condition.value == 0.6


def test_evaluate_rules_skips_disabled_rules():
    thresholds = AlertThresholds(disabled_rules=[BACKLOG_GROWING])
    rules = [c.rule for c in evaluate_rules({}, thresholds, NOW)]
    assert BACKLOG_GROWING not in rules
    assert STALLED in rules


def test_transition_starts_once_then_stays_quiet_then_resolves_once():
    stalled = {PENDING_RECORDS: _series([9] * 40), INPUT_TOKENS_PER_MINUTE: _series([0] * 40)}
    moving = {PENDING_RECORDS: _series([9] * 40), INPUT_TOKENS_PER_MINUTE: _series([0] * 39 + [7])}

    first, state = transition("m", evaluate_stalled(stalled, NOW, 30), None, NOW)
    assert first is not None and not first.resolved
    assert first.payload["started_at"] == (NOW - timedelta(minutes=39)).isoformat()

    later = NOW + timedelta(minutes=5)
    again, state_again = transition("m", evaluate_stalled(stalled, NOW, 30), state, later)
    assert again is None
    assert state_again == state

    resolved, final_state = transition("m", evaluate_stalled(moving, NOW, 30), state, later)
    assert resolved is not None and resolved.resolved
    assert resolved.payload["started_at"] == state["started_at"]
    assert final_state is None

    quiet, none_state = transition("m", evaluate_stalled(moving, NOW, 30), None, later)
    assert quiet is None and none_state is None


def test_stalled_alert_compares_minutes_with_minutes():
    series = {PENDING_RECORDS: _series([440] * 41), INPUT_TOKENS_PER_MINUTE: _series([0] * 41)}
    start, _ = transition("m", evaluate_stalled(series, NOW, 30), None, NOW)
    assert start is not None
    payload = start.payload
    assert (payload["value"], payload["threshold"], payload["unit"]) == (40.0, 30, "minutes")
    assert payload["window_minutes"] == 30
    assert payload["metrics"] == [
        "NumberOfRecordsPendingProcessing",
        "NumberOfInputTokensProcessedPerMinute",
    ]
    # What the stall notification prints stays in the payload.
    assert payload["pending_records"] == 440 and payload["stalled_minutes"] == 40.0


def test_backlog_alert_compares_a_fraction_with_a_fraction():
    points = _series([400] * 30 + [420] * 30 + [440])
    start, _ = transition("m", evaluate_backlog(points, NOW, 60, 0.05, 3), None, NOW)
    assert start is not None
    payload = start.payload
    assert (payload["value"], payload["threshold"], payload["unit"]) == (0.1, 0.05, "fraction")
    assert payload["window_minutes"] == 60
    assert payload["metrics"] == ["NumberOfRecordsPendingProcessing"]
    assert (payload["first_pending_records"], payload["last_pending_records"]) == (400, 440)


def test_throughput_alert_names_its_unit_metric_and_window():
    points = _series([2_000_000] * 10)
    condition = evaluate_throughput(THROUGHPUT_HIGH_INPUT, points, NOW, 360, 1_000_000)
    start, _ = transition("m", condition, None, NOW)
    assert start is not None
    payload = start.payload
    assert (payload["value"], payload["threshold"]) == (2_000_000, 1_000_000)
    assert payload["unit"] == "tokens/minute" and payload["window_minutes"] == 360
    assert payload["metrics"] == ["NumberOfInputTokensProcessedPerMinute"]


def test_state_variable_name_is_a_valid_variable_name_and_unique_per_model():
    a = state_variable_name("p", "anthropic.claude-3-haiku-20240307-v1:0", STALLED)
    b = state_variable_name("p", "anthropic.claude-3-haiku-20240307-v1_0", STALLED)
    assert a != b
    assert all(ch.isalnum() or ch in "-_" for ch in a)


def test_alert_state_round_trips_through_a_prefect_variable():
    prefix = "test-alerts-roundtrip"
    assert load_alert_state.fn(prefix, "model.x:0", STALLED) is None
    save_alert_state.fn(prefix, "model.x:0", STALLED, {"firing": True, "started_at": "t"})
    stored = load_alert_state.fn(prefix, "model.x:0", STALLED)
    assert stored["started_at"] == "t"
    save_alert_state.fn(prefix, "model.x:0", STALLED, None)
    assert load_alert_state.fn(prefix, "model.x:0", STALLED) is None
