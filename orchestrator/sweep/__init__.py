"""Ray Tune sweeps over fine-tuning hyper-parameters: each trial a Ray Train run, one MLflow
parent run per sweep with a nested child run per trial (see ``runner.run_sweep``)."""
from orchestrator.sweep.runner import SweepOutcome, run_sweep
from orchestrator.sweep.spec import SweepSpec, load_sweep

__all__ = ["SweepOutcome", "SweepSpec", "load_sweep", "run_sweep"]
