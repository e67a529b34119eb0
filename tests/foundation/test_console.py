"""The console: progress lines, durations, the end summary, and Ray's logging options."""
from __future__ import annotations

import logging

from orchestrator import console


def test_progress_line_has_step_losses_throughput_wait_and_eta():
    line = console.format_progress({"step": 40, "loss": 5.12341, "itc": 1.9, "itm": 0.61, "mlm": 2.1, "lm": 0.52,
                                    "lr": 1e-4, "samples_per_s": 35.24, "data_wait_frac": 0.123,
                                    "eval/t2v_r1": 12.5}, 200, 130.0)
    assert line == ("step  40/200  loss 5.1234 (itc 1.900 itm 0.610 mlm 2.100 lm 0.520)  35.2 samples/s  "
                    "data wait 12%  eval/t2v_r1 12.500  ETA 2m10s")
    assert console.format_progress({"step": 1}, 5, None) == "step 1/5"


def test_durations_read_naturally():
    assert [console.format_duration(s) for s in (0, 59.6, 61, 3600 * 2 + 120)] == ["0s", "1m00s", "1m01s", "2h02m"]


def test_eta_is_measured_from_the_reports_not_assumed():
    clock = iter([100.0, 110.0])
    p = console.Progress.__new__(console.Progress)
    p.max_steps, p._first = 100, None
    import time as _time
    real = _time.time
    try:
        console.time.time = lambda: next(clock)
        assert p.eta(10) is None              # one report: no rate yet
        assert p.eta(20) == 10.0 / 10 * 80    # 1 s per step measured, 80 steps left
    finally:
        console.time.time = real


def test_summary_names_the_outcome():
    text = console.summary("pt", {"step": 200, "loss": 1.5, "itc": 0.3, "lr": 1e-5}, 200, 95, "/s/ckpt", "/s/export", "abc")
    assert text.splitlines() == ["pt: finished step 200/200 in 1m35s", "  last losses: loss 1.5000 itc 0.3000",
                                 "  checkpoint: /s/ckpt", "  export: /s/export", "  MLflow run: abc"]


def test_ray_is_quiet_unless_verbose(monkeypatch):
    monkeypatch.delenv(console.VERBOSE_ENV, raising=False)
    opts = console.ray_init_options()
    assert console.train_logging_config().log_level == "WARNING"
    assert opts["runtime_env"]["worker_process_setup_hook"] == "orchestrator.console.quiet_ray_internals"
    assert opts["runtime_env"]["env_vars"]["RAY_DATA_LOGGING_CONFIG"].endswith("ray_data_logging.yaml")
    assert opts["runtime_env"]["env_vars"]["MLFLOW_LOGGING_LEVEL"] == "WARNING"
    noisy = logging.getLogger(console.NOISY_RAY_LOGGERS[0])
    noisy.setLevel(logging.NOTSET)
    console.quiet_ray_internals()
    assert noisy.level == logging.ERROR
    monkeypatch.setenv(console.VERBOSE_ENV, "1")
    noisy.setLevel(logging.NOTSET)
    console.quiet_ray_internals()
    assert noisy.level == logging.NOTSET and console.train_logging_config().log_level == "INFO"
    assert "RAY_DATA_LOGGING_CONFIG" not in console.ray_init_options()["runtime_env"]["env_vars"]
    assert "MLFLOW_LOGGING_LEVEL" not in console.ray_init_options()["runtime_env"]["env_vars"]


def test_ray_train_per_report_lines_are_quiet_unless_verbose(monkeypatch):
    """Ray Train's worker context logs "Reporting training result ..." at INFO under a logger named by
    its file path; the setup hook quiets that logger, and Ray Train's later dictConfig of the worker
    (root at INFO, existing loggers kept) does not bring it back."""
    import logging.config

    import ray.train.v2._internal.execution.context as train_context

    name = train_context.logger.name
    assert name in console.ray_file_logger_names()  # the installed ray still logs there
    logger = logging.getLogger(name)
    before, root = logger.level, logging.getLogger()
    root_level, root_handlers = root.level, list(root.handlers)
    try:
        monkeypatch.delenv(console.VERBOSE_ENV, raising=False)
        logger.setLevel(logging.NOTSET)
        console.quiet_ray_internals()
        logging.config.dictConfig({"version": 1, "disable_existing_loggers": False, "root": {"level": "INFO"}})
        assert not logger.isEnabledFor(logging.INFO) and logger.isEnabledFor(logging.WARNING)
        monkeypatch.setenv(console.VERBOSE_ENV, "1")
        logger.setLevel(logging.NOTSET)
        console.quiet_ray_internals()
        assert logger.isEnabledFor(logging.INFO)
    finally:
        logger.setLevel(before)
        root.setLevel(root_level)
        root.handlers[:] = root_handlers


def test_collapse_is_warned_once_per_modality_after_the_warm_up():
    warned = []
    watch = console.CollapseWatch(warmup_steps=20, warn=warned.append)
    assert watch.check({"step": 20, "text_cos": 0.99, "video_cos": 0.99}) == []       # still warming up
    assert watch.check({"step": 30, "text_cos": 0.5, "video_cos": 0.2, "loss": 3.0}) == []
    assert len(watch.check({"step": 40, "text_cos": 0.97, "video_cos": 0.3}, "pt")) == 1
    assert "pt: the text embeddings have collapsed at step 40" in warned[0] and "0.970 > 0.9" in warned[0]
    assert watch.check({"step": 50, "text_cos": 0.99, "video_cos": 0.95}) == [warned[1]]  # video: once too
    assert "video embeddings" in warned[1]
    assert watch.check({"step": 60, "text_cos": 0.99, "video_cos": 0.99}) == [] and len(warned) == 2
    assert console.CollapseWatch(0).check({"step": 5}) == []           # runs without the diagnostics
