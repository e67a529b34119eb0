"""The Ray Train + DeepSpeed loop shared by every workload.

- :mod:`.driver`: ``run_training(cfg)`` settles names and URIs, builds datasets, the MLflow run and
  a ``TorchTrainer``; each worker gets a frozen :class:`.plan.WorkerPlan`.
- :mod:`.loop`: the per-worker function: setup (one DeepSpeed engine, resume from
  ``ray.train.get_checkpoint()``), the step loop (the workload's loss dict), finish (export).
- :mod:`.schedule`: what each optimizer step does (log, validate, checkpoint, preemption check)
  and which batches a resumed epoch skips; pure Python.
- :mod:`.deepspeed_config`, :mod:`.optim`, :mod:`.checkpoint`, :mod:`.progress`,
  :mod:`.momentum_sync`, :mod:`.failures`, :mod:`.model_setup`: small pieces of the above.
"""
