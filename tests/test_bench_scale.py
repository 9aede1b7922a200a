"""The scale benchmark's figures from a driver's record, against values computed by hand: the
window detail (pace, busy slots, the sender's and each thread's CPU per trial) and py-spy's
profile summarised."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def bench(load_benchmark):
    return load_benchmark("bench_scale")


def test_a_windows_detail_is_computed_from_the_samples_around_it(bench):
    # (time, finished, driver CPU incl. helpers, helpers' CPU, wait, results, running): 10 trials/s
    samples = [(t, 10 * t, 0.05 * 10 * t, 0.01 * 10 * t, 0.0, 25 * t, 20 if t < 20 else 40) for t in range(0, 101)]
    threads = [(t, 10 * t, {"python": 0.03 * 10 * t, "worker.io": 0.002 * 10 * t}) for t in range(0, 101, 5)]
    record = {"samples": samples, "threads": threads}
    detail = bench.window_detail(record, 100, 400)  # t = 10..40 s
    assert detail["trials_per_s"] == pytest.approx(10.0)
    assert detail["helper_ms_per_trial"] == pytest.approx(10.0)
    assert detail["running_mean"] == pytest.approx((10 * 20 + 21 * 40) / 31)  # t = 10..19 at 20, t = 20..40 at 40
    assert detail["threads_ms_per_trial"] == {"python": pytest.approx(30.0), "worker.io": pytest.approx(2.0)}
    assert bench.per_trial_ms(samples, 100, 400) == pytest.approx(50.0)
    assert bench.window_detail(record, 100, 5000) is None  # the run never got there


def test_py_spys_stacks_are_counted_by_thread_by_innermost_frame_and_by_owner(bench, tmp_path):
    raw = tmp_path / "driver.raw.txt"
    raw.write_text(
        "thread (0x1): MainThread;run_study (lcl_tune/adapters/study_runner.py:99);run (ray/tune/execution/tune_controller.py:700);"
        "step (ray/tune/execution/tune_controller.py:689);"
        "wait (ray/_private/worker.py:3237) 30\n"
        "thread (0x1): MainThread;step (ray/tune/execution/tune_controller.py:689);on_step_end (lcl_tune/adapters/progress.py:192);"
        "dumps (json/__init__.py:231);_iterencode (json/encoder.py:303);<genexpr> (foo.py:1) 10\n"
        "thread (0x2): Thread-27 (entrypoint);copy_files (pyarrow/fs.py:256) 10\n"
        "a line py-spy did not write\n")
    summary = bench.profile_summary(raw)
    assert summary["samples"] == 50 and summary["cpu_s"] == pytest.approx(1.0) and summary["project_share"] == 0.2
    assert summary["by_thread"] == [["MainThread", 40, 0.8], ["Thread-27", 10, 0.2]]
    assert summary["innermost"][0] == ["wait (ray/_private/worker.py:3237)", 30, 0.6]
    assert ["_iterencode (json/encoder.py:303)", 10, 0.2] in summary["innermost"]  # not the frame of foo.py
    owners = dict((k, v) for k, v, _ in summary["nearest_project_or_tune_frame"])
    assert owners == {"step (ray/tune/execution/tune_controller.py:689)": 30,
                      "on_step_end (lcl_tune/adapters/progress.py:192)": 10, "other": 10}
