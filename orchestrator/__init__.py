"""Orchestration of mPLUG-2 runs on Ray: configs, CLI, storage, data plane, training, sweeps, tracking."""
