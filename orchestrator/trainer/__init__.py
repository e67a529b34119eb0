"""A training run (pre-train and fine-tune): the driver, the plan it hands each worker, and the
worker's loop that composes the components of :mod:`orchestrator.train`.

- :mod:`.driver`: ``run_training(cfg)``: settles names and URIs under the run's lease, builds the
  data streams' datasets, opens the MLflow run, runs the ``TorchTrainer`` and records the outcome;
- :mod:`.plan`: ``WorkerPlan``, the frozen plan every worker receives;
- :mod:`.loop`: the worker: setup (model, engine, components, resume), ``TrainLoop.run`` (the step
  loop), ``TrainLoop.finish`` (last checkpoint, export).
"""
