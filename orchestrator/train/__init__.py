"""The components of a training worker, each with its typed config or state and a short surface;
they know no run config (:class:`~orchestrator.config.RunSpec` composes :mod:`.config` with the
others), and the trainer (:mod:`orchestrator.trainer`) composes them.

- :mod:`.config`: ``TrainConfig``, the run config's ``train:`` section;
- :mod:`.schedule`: what each optimizer step does (log, validate, checkpoint, preemption check)
  and which batches a resumed epoch skips; pure Python;
- :mod:`.streams`: ``DataStreams`` (a pass's batches and what they consumed, :mod:`.progress`)
  and ``BadClipCounts``;
- :mod:`.checkpoint`: ``Checkpointer`` (save, resume from the newest checkpoint that verifies,
  export, behind the lease fence), with :mod:`.manifest` (completion markers, export pointers);
- :mod:`.metrics`: ``MetricDelivery`` (Ray Train reports, rank 0's MLflow points), the loss window
  and the step timer;
- :mod:`.momentum_sync`: ``MomentumSync``, the momentum encoders' EMA once per optimizer step;
- :mod:`.weights`: weights from elsewhere (``--init-from``, an evaluated checkpoint), read safely;
- :mod:`.optim`, :mod:`.deepspeed_config`, :mod:`.extensions`: the optimizer, DeepSpeed's config,
  its CPU op's build;
- :mod:`.lease` (one run per name), :mod:`.failures` (what is never retried), :mod:`.journal`
  (every computed step, for fault tests).
"""
