"""The data plane: annotations and clips from object storage -> decoded, tokenized tensor batches.

Public API (what the train loop, the evaluators and the CLI call)::

    from orchestrator.data.config import DataConfig, SourceConfig

    # rows of one dataset split, in the project's row shape (sources/base.py):
    # media_uri (None for text-only), start, end, text, text_b, answer, label, label_name,
    # clip_index, id, modality ("video" | "image" | "text"), references
    orchestrator.data.sources.SOURCES                       # adapters by name (see sources/__init__.py)
    orchestrator.data.sources.read_rows(source: SourceConfig, root: str, split: "train" | "val") -> list[dict]
    orchestrator.data.sources.label_vocabulary(source, root) -> list[str]   # class names in id order

    # a Ray Dataset of contract rows (workloads/base.py): only ``columns``, fixed shapes, bad clips
    # removed and counted under ``run_name``
    orchestrator.data.pipeline.build_dataset(data_cfg, split, training, columns, seed=0, run_name=None)
    # inside a Ray Train worker: dict[str, torch.Tensor] batches, frames uint8 [B, T, H, W, 3]
    orchestrator.data.pipeline.iter_worker_batches(ray.train.get_dataset_shard("train"), batch_size,
                                                   device, prefetch_batches, run_name=..., max_bad_fraction=...)

    # bad clips: counted by reason in one named Ray actor per run, readable from any process
    orchestrator.data.quality.get_bad_clip_stats(run_name) -> {"total_seen", "bad", "by_reason", "examples"}
    orchestrator.data.quality.end_epoch_report(run_name)    # once per epoch: this epoch's and total counts
    orchestrator.data.quality.check_bad_clips(run_name, max_fraction)  # raises TooManyBadClips
    orchestrator.data.quality.TooManyBadClips                # also raised by decode tasks mid-epoch

    orchestrator.data.tokenize.load_tokenizer(name_or_uri)  # local dir, s3:// dir or hub name
    orchestrator.data.tokenize.default_tokenizer(root)      # <root>/tokenizer (data.tokenizer = None)

    orchestrator.data.shards.write_shards(rows, out_uri, max_clips=..., max_bytes=...)  # tar shards

Modules: ``config`` (typed config), ``sources`` (annotation adapters), ``sampling`` (frame index
strategies), ``decode`` (bytes -> frames with decord / Pillow), ``augment`` (crop + resize),
``tokenize``, ``process`` (the Ray Data batch function), ``pipeline`` (Ray Data + Ray Train glue), ``annotations`` (streamed annotation reads), ``ids``,
``quality`` (bad-clip accounting), ``shards`` (webdataset writer), ``progress`` (rows a resumed
epoch leaves out).

Annotations are parsed by Ray tasks and streamed (``annotations``): the driver holds the file list
and one count per file, never the rows, so its memory is flat in the corpus size.

Ids (``ids``): ``clip_index`` is unique across a run's sources: a 63-bit hash of the source and the
row's media + segment (rows of one source showing the same clip share it), or of the shard source
and stored id for webdataset rows; the train loop's datasets carry a per-row ``sample_key`` hashed
from the source, file (or shard), position in it and weight copy.
"""
