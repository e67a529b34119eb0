"""MLflow tracking: one run per pre-train / fine-tune / sweep trial, written by the driver and rank 0.

See :mod:`orchestrator.tracking.mlflow_run`.
"""
