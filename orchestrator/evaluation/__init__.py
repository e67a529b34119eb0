"""Evaluation on the Ray Train workers: of a checkpoint (the ``evaluate`` verb), and of the model
in training (validation, and so a sweep trial's dev score).  The driver plans and collects; every
model forward runs on a worker, each evaluating a shard of the split.

- :mod:`.driver`: ``run_evaluation(cfg, checkpoint)``: the dataset, the ``TorchTrainer``, the
  metrics and predictions in MLflow;
- :mod:`.plan`: ``EvalPlan``, the frozen plan every evaluating worker receives;
- :mod:`.worker`: the ``evaluate`` verb's worker function;
- :mod:`.validator`: ``Validator``, validation during training (when the step schedule says);
- :mod:`.shard`: one evaluation pass over a worker's shard (sharded retrieval, gathered records
  or rows), the same metrics for any number of workers;
- :mod:`.data`: the evaluated split as a Ray dataset.
"""
