"""The contract between the train loop, the data plane and a workload.

Batch (a plain dict of tensors, produced by ``orchestrator.data``; absent keys are simply absent):

=================  ===========================  =================================================
key                dtype / shape                meaning
=================  ===========================  =================================================
``frames``         uint8 ``[B, T, H, W, 3]``    decoded frames (T = 1 for images); normalised on
                                                the worker with ``model.preprocess``
``text_ids``       int64 ``[B, L]``             the text: caption / title / question / sentence(s)
``text_mask``      int64 ``[B, L]``             1 for real tokens
``text_type_ids``  int64 ``[B, L]``             segment ids for sentence pairs (GLUE)
``answer_ids``     int64 ``[B, La]``            generation target (answer, caption)
``answer_mask``    int64 ``[B, La]``
``label``          int64 ``[B]``                class id (classification, GLUE)
``clip_index``     int64 ``[B]``                which clip a row shows (retrieval: several
                                                captions can share one clip)
``epoch_progress`` Python float                optimizer steps so far / ``train.steps_per_epoch``;
                                                set by the train loop on training batches when
                                                that is configured (absent otherwise)
=================  ===========================  =================================================

A workload module ``workloads/<name>.py`` exposes::

    TASK: str                      # the model's task key (paper Table 2 module selection)
    COLUMNS: tuple[str, ...]       # the batch keys it needs
    class Config(pydantic.BaseModel)  # schema of the run config's ``task:`` section
    def build_model(model_cfg, task_cfg) -> torch.nn.Module
    def loss(model, batch, task_cfg) -> dict[str, torch.Tensor]   # total under "loss"
    def evaluate(model, batches, task_cfg, tokenizer=None) -> dict[str, float]
        # or (metrics, predictions: list[dict]) — predictions become an MLflow table
    def batch_constants(tokenizer, task_cfg) -> dict[str, Tensor]   # optional: tensors added to
        # every batch on the worker, computed once (e.g. the tokenised instruction prompt)

The train loop only knows this interface, never the model's insides.
"""
from __future__ import annotations

from typing import Iterable, Protocol

BATCH_KEYS = ("frames", "text_ids", "text_mask", "text_type_ids", "answer_ids", "answer_mask", "label", "clip_index")


class WorkloadModule(Protocol):  # pragma: no cover - typing only
    TASK: str
    COLUMNS: tuple[str, ...]

    def build_model(self, model_cfg, task_cfg): ...

    def loss(self, model, batch: dict, task_cfg) -> dict: ...

    def evaluate(self, model, batches: Iterable[dict], task_cfg, tokenizer=None) -> dict[str, float]: ...
