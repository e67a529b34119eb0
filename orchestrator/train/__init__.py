"""The Ray Train + DeepSpeed loop shared by every workload.

- :mod:`.driver`: ``run_training(cfg)`` builds datasets, the MLflow run and a ``TorchTrainer``.
- :mod:`.loop`: the per-worker function: one DeepSpeed engine, the workload's loss dict,
  checkpoints through ``ray.train.report``, resume from ``ray.train.get_checkpoint()``.
- :mod:`.deepspeed_config`, :mod:`.optim`, :mod:`.checkpoint`: small pieces of the above.
"""
