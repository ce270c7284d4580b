"""The load gauge: no pause while the loop has CPU to spare, a bounded one when it has not."""

from __future__ import annotations

from server.load import LoadGauge


def test_idle_loop_pauses_nothing() -> None:
    gauge = LoadGauge(low=0.5, high=0.9, max_pause_s=0.04)
    for _ in range(10):
        gauge.update(0.3)
    assert gauge.read_pause_s == 0.0


def test_saturated_loop_pauses_at_most_the_maximum() -> None:
    gauge = LoadGauge(low=0.5, high=0.9, max_pause_s=0.04)
    for _ in range(10):
        gauge.update(1.0)
    assert gauge.read_pause_s == 0.04


def test_pause_grows_with_load_and_one_busy_window_does_not_saturate_it() -> None:
    gauge = LoadGauge(low=0.5, high=0.9, max_pause_s=0.04)
    for _ in range(20):
        gauge.update(0.7)
    assert abs(gauge.read_pause_s - 0.02) < 0.001
    gauge.update(1.0)  # smoothed: one window moves the gauge half-way to it
    assert 0.03 < gauge.read_pause_s < 0.04
