"""Orchestration of mPLUG-2 runs on Ray: configs, CLI, storage, data plane, training, sweeps, tracking.

Importing the package turns on log redaction for the process (drivers, Ray Train workers, Ray Data
and Tune tasks all import it): no log record of any library carries a credential
(:func:`orchestrator.tracking.redact.install_log_redaction`).
"""
from orchestrator.tracking.redact import install_log_redaction as _install_log_redaction

_install_log_redaction()
