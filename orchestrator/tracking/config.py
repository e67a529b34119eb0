"""Typed configuration of MLflow tracking."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class TrackingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    uri: str | None = Field(
        None, description="MLflow tracking URI; None = $MLFLOW_TRACKING_URI or sqlite:///demo_output/mlflow.db"
    )
    parent_run_id: str | None = Field(None, description="nest this run under an existing MLflow run")
    system_metrics: bool = Field(True, description="log CPU/memory/disk/network/GPU of the rank-0 training node "
                                                   "as system/* metrics")
