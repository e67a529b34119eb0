"""The MLflow server down when a run closes: ``close_run`` waits for it.  (The outage in the middle
of a run, with rank 0 killed during it, rides on ``test_worker_and_tracker_faults.py``.)"""
from __future__ import annotations

import threading
import time

import pytest

from orchestrator.devtools.faults.report import Injected, Measured, record
from tests.conftest import free_port
from tests.reliability.helpers import MlflowServer

pytestmark = pytest.mark.slow


def test_close_run_waits_for_a_tracker_that_is_down_at_the_end(tmp_path, mlflow_db_template):
    from mlflow.tracking import MlflowClient

    from orchestrator.tracking.mlflow_run import close_run, open_run

    server = MlflowServer(tmp_path, free_port(), mlflow_db_template)
    server.start()
    try:
        run_id = open_run(server.uri, "close-test", "r1", {"a": 1}, {})
        server.stop()
        threading.Timer(5.0, server.start).start()
        t0 = time.time()
        outages = [t0]  # the server went down before the close
        close_run(server.uri, run_id, tags={"mplug2.export_uri": "x"}, retry_s=120)
        assert time.time() - t0 >= 4
        run = MlflowClient(server.uri).get_run(run_id)
        assert run.info.status == "FINISHED" and run.data.tags["mplug2.export_uri"] == "x"
        record("MLflow down when the run closes", Injected.of(outages, "server outages"),
               run.info.status == "FINISHED", Measured.not_a_run("close_run against a stopped server"),
               "close_run retried until it came back")
    finally:
        time.sleep(0.5)
        server.stop()
