"""Orchestration of mPLUG-2 runs on Ray: configs, CLI, storage, data plane, training, sweeps, tracking.

Importing the package turns on log redaction for the process (drivers, Ray Train workers, Ray Data
and Tune tasks all import it): no log record of any library carries a credential
(:func:`orchestrator.tracking.redact.install_log_redaction`).

It also turns MLflow's usage telemetry off unless the user set ``MLFLOW_DISABLE_TELEMETRY``
themselves: MLflow 3 fetches the telemetry config on a thread when it is imported and, when that
fails (a cluster without internet access), deletes an environment variable while other threads
may be iterating ``os.environ`` (``requests`` reads proxies from it on every call), which fails an
MLflow REST call with ``KeyError: '_MLFLOW_TELEMETRY_SESSION_ID'`` (seen in a full test run).
"""
import os as _os

from orchestrator.tracking.redact import install_log_redaction as _install_log_redaction

_os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
_install_log_redaction()
