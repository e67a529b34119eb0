"""The Ray Data pipeline end to end on a local Ray: local folders and the S3 server over HTTP,
per-worker shards, bad clips removed and counted, the job stopped past the threshold."""
from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pytest

from orchestrator import storage
from orchestrator.data import quality
from orchestrator.data.config import DataConfig, SourceConfig
from orchestrator.data.pipeline import _actor_pool, build_dataset, iter_worker_batches
from orchestrator.data.sources import read_rows
from orchestrator.data.tokenize import load_tokenizer
from tests.data.conftest import frame_index, numbered_clip

pytestmark = pytest.mark.slow

QA = SourceConfig(format="msrvtt_qa", train=["annotations/msrvtt_qa_train.jsonl"],
                  val=["annotations/msrvtt_qa_val.jsonl"])
QA_COLUMNS = ("frames", "text_ids", "text_mask", "answer_ids", "answer_mask", "clip_index")


def run_name() -> str:
    return f"t-{uuid.uuid4().hex[:8]}"


def collect(ds, batch_size=4, **kw):
    return list(iter_worker_batches(ds, batch_size, "cpu", 1, **kw))


def test_videoqa_batches_from_local_folder(ray_local, synth_data):
    cfg = DataConfig(root=synth_data, sources=[QA], num_frames=4, image_size=32, max_text_len=16)
    name = run_name()
    batches = collect(build_dataset(cfg, "val", training=False, columns=QA_COLUMNS, run_name=name))
    assert set(batches[0]) == set(QA_COLUMNS)
    b = batches[0]
    assert b["frames"].dtype.is_floating_point is False and tuple(b["frames"].shape[1:]) == (4, 32, 32, 3)
    assert b["text_ids"].shape[1] == 16 and b["answer_ids"].shape[1] == cfg.max_answer_len
    n = sum(len(x["clip_index"]) for x in batches)
    assert n == len(read_rows(QA, synth_data, "val")) == 5  # 5 val clips, one question each
    tok = load_tokenizer(storage.join(synth_data, "tokenizer"))
    questions = {tok.decode(x, skip_special_tokens=True) for bb in batches for x in bb["text_ids"].tolist()}
    assert all(q.endswith("?") for q in questions)
    stats = quality.get_bad_clip_stats(name)
    counts = {k: stats[k] for k in ("total_seen", "bad", "by_reason", "examples")}  # beside the tracker's incarnation
    assert counts == {"total_seen": 5, "bad": 0, "by_reason": {}, "examples": {}}


def test_reads_through_s3_server(ray_local, s3_bucket, synth_data):
    root = f"{s3_bucket}/synth"
    storage.upload_dir(synth_data, root)
    src = SourceConfig(format="youku_classification", train=["annotations/youku_classification_train.csv"],
                       val=["annotations/youku_classification_val.csv"], labels="train")
    cfg = DataConfig(root=root, sources=[src], num_frames=2, image_size=32)  # tokenizer from s3://.../tokenizer
    name = run_name()
    ds = build_dataset(cfg, "train", training=True, columns=("frames", "text_ids", "label"), run_name=name)
    batches = collect(ds, batch_size=8)
    labels = np.concatenate([b["label"].numpy() for b in batches])
    assert len(labels) == 19 and set(labels.tolist()) == {0, 1, 2, 3}
    assert quality.get_bad_clip_stats(name)["total_seen"] == 19


def test_worker_shards_split_the_data(ray_local, synth_data):
    """What ray.train.get_dataset_shard hands each worker: a streaming split of the dataset."""
    src = SourceConfig(format="youku_retrieval", train=["annotations/youku_retrieval_train.csv"],
                       val=["annotations/youku_retrieval_val.csv"])
    cfg = DataConfig(root=synth_data, sources=[src], num_frames=2, image_size=16)
    ds = build_dataset(cfg, "train", training=True, columns=("frames", "clip_index"), run_name=run_name())
    a, b = ds.streaming_split(2, equal=False)
    import threading

    out = {}
    threads = [threading.Thread(target=lambda k, s: out.__setitem__(k, collect(s, 3)), args=(k, s))
               for k, s in (("a", a), ("b", b))]
    [t.start() for t in threads]
    [t.join(timeout=300) for t in threads]
    idx = [int(i) for k in out for bb in out[k] for i in bb["clip_index"]]
    # clip ids are hashes now (computed where the annotation rows are parsed, see data/ids.py): the
    # two splits together hold the 19 clips of the whole dataset, each once
    whole = [int(i) for bb in collect(build_dataset(cfg, "train", True, ("clip_index",))) for i in bb["clip_index"]]
    assert len(set(whole)) == 19 and sorted(idx) == sorted(whole)


def test_text_only_glue_pairs(ray_local, fixture_root, tiny_hf):
    src = SourceConfig(format="glue_rte", train=["ann/rte.tsv"], val=["ann/rte.tsv"], media="")
    cfg = DataConfig(root=str(fixture_root), sources=[src], tokenizer=str(tiny_hf.tokenizer), max_text_len=16)
    (b,) = collect(build_dataset(cfg, "val", False, ("text_ids", "text_mask", "text_type_ids", "label")))
    assert b["label"].tolist() == [0, 1]
    assert b["text_type_ids"].max() == 1 and "frames" not in b


def test_images_and_segments(ray_local, fixture_root, tiny_hf):
    coco = SourceConfig(format="coco_captions", train=["ann/coco.json"], val=["ann/coco.json"], media="images")
    cfg = DataConfig(root=str(fixture_root), sources=[coco], tokenizer=str(tiny_hf.tokenizer), image_size=16)
    (b,) = collect(build_dataset(cfg, "val", False, ("frames", "text_ids")))
    assert tuple(b["frames"].shape) == (2, 1, 16, 16, 3)  # images: one frame
    iv = SourceConfig(format="internvid", train=["ann/internvid.jsonl"], val=["ann/internvid.jsonl"])
    cfg = DataConfig(root=str(fixture_root), sources=[iv], tokenizer=str(tiny_hf.tokenizer), image_size=64,
                     num_frames=4, eval_sampling="uniform")
    (b,) = collect(build_dataset(cfg, "val", False, ("frames",)))
    # the segment [1 s, 2 s] at 8 fps is frames 8..15 (the grey level says which frame it is)
    assert frame_index(b["frames"][0].numpy()) == [8, 10, 13, 15]


def _bad_dataset(root, clip):
    videos = root / "videos"
    videos.mkdir(parents=True)
    good = [f"good{i}.mp4" for i in range(6)]
    for g in good:
        (videos / g).write_bytes(clip)
    (videos / "empty.mp4").write_bytes(b"")
    (videos / "trunc.mp4").write_bytes(clip[: len(clip) // 3])
    (videos / "text.mp4").write_bytes(b"hello, I am not a video\n" * 50)
    (videos / "one.mp4").write_bytes(numbered_clip(n=1, gop=1))
    (videos / "huge.mp4").write_bytes(numbered_clip(n=4, h=16, w=256, gop=4))
    names = good + ["empty.mp4", "trunc.mp4", "text.mp4", "one.mp4", "huge.mp4", "absent.mp4"]
    (root / "ann.jsonl").write_text("".join(json.dumps({"video": n, "caption": "a clip"}) + "\n" for n in names))
    return SourceConfig(format="msrvtt", train=["ann.jsonl"], val=["ann.jsonl"])


def test_bad_clips_skipped_counted_and_stop_the_job(ray_local, tmp_path, clip_bytes, tiny_hf):
    src = _bad_dataset(tmp_path / "bad", clip_bytes)
    cfg = DataConfig(root=str(tmp_path / "bad"), sources=[src], tokenizer=str(tiny_hf.tokenizer), num_frames=2,
                     image_size=16, max_bad_fraction=1.0, min_resolution=20, decode_batch_size=4)
    name = run_name()
    batches = collect(build_dataset(cfg, "val", False, ("frames", "text_ids"), run_name=name))
    assert sum(len(b["frames"]) for b in batches) == 6
    stats = quality.get_bad_clip_stats(name)
    assert stats["total_seen"] == 12 and stats["bad"] == 6
    assert stats["by_reason"] == {"empty": 1, "truncated": 1, "not_video": 1, "too_few_frames": 1,
                                  "bad_resolution": 1, "missing": 1}
    assert stats["examples"]["missing"][0].endswith("absent.mp4")
    report = quality.end_epoch_report(name)
    assert report["this_epoch"]["bad"] == 6

    strict = cfg.model_copy(update={"max_bad_fraction": 0.2, "bad_check_min_seen": 4})
    with pytest.raises(Exception, match=r"too many bad clips.*by reason") as e:
        collect(build_dataset(strict, "val", False, ("frames",), run_name=run_name()))
    assert "mp4" in str(e.value)
    # the end-of-pass check in iter_worker_batches also stops it when tasks could not
    name = run_name()
    collect(build_dataset(cfg, "val", False, ("frames",), run_name=name))
    with pytest.raises(quality.TooManyBadClips):
        quality.check_bad_clips(name, 0.2)


def test_missing_object_on_s3_is_counted(ray_local, s3_bucket, synth_data):
    root = f"{s3_bucket}/m"
    storage.upload_dir(storage.join(synth_data, "tokenizer"), f"{root}/tokenizer")
    storage.write_bytes(f"{root}/videos/ok.mp4", (open(f"{synth_data}/videos/clip_00000.mp4", "rb").read()))
    storage.write_text(f"{root}/ann.jsonl", '{"video": "ok.mp4", "caption": "a red square moves left"}\n'
                                            '{"video": "gone.mp4", "caption": "a red square moves up"}\n')
    src = SourceConfig(format="msrvtt", train=["ann.jsonl"], val=["ann.jsonl"])
    cfg = DataConfig(root=root, sources=[src], num_frames=2, image_size=16, max_bad_fraction=1.0)
    name = run_name()
    (b,) = collect(build_dataset(cfg, "val", False, ("frames", "text_ids"), run_name=name))
    assert len(b["frames"]) == 1
    stats = quality.get_bad_clip_stats(name)
    assert stats["by_reason"] == {"missing": 1} and stats["examples"]["missing"] == [f"{root}/videos/gone.mp4"]


def test_ray_train_workers_get_their_shards(ray_local, synth_data):
    """The real thing: TorchTrainer workers read ``get_dataset_shard`` through iter_worker_batches."""
    import ray.train
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    src = SourceConfig(format="youku_retrieval", train=["annotations/youku_retrieval_train.csv"],
                       val=["annotations/youku_retrieval_val.csv"])
    cfg = DataConfig(root=synth_data, sources=[src], num_frames=2, image_size=16)
    name = run_name()
    ds = build_dataset(cfg, "train", training=True, columns=("frames", "clip_index"), run_name=name)

    def loop(config):
        import ray.train as rt

        from orchestrator.data.pipeline import iter_worker_batches as it

        seen = []
        for batch in it(rt.get_dataset_shard("train"), 4, None, 1, run_name=config["run"], max_bad_fraction=0.0):
            assert batch["frames"].dtype.__str__() == "torch.uint8"
            seen += batch["clip_index"].tolist()
        # Ray Train splits "train" equally between the 2 workers: 19 clips -> 9 each (+1 dropped)
        assert 9 <= len(seen) <= 10 and len(set(seen)) == len(seen), seen
        rt.report({"n": len(seen)})

    trainer = TorchTrainer(loop, train_loop_config={"run": name}, datasets={"train": ds},
                           scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 1}),
                           run_config=ray.train.RunConfig(storage_path=str(Path(synth_data).parent / "train_runs")))
    result = trainer.fit()
    assert result.error is None
    assert quality.get_bad_clip_stats(name)["total_seen"] == 19


@pytest.mark.parametrize("decode_actors,decoder", [(True, "decord"), (False, "pyav")])
def test_decode_actors_and_pyav_count_bad_clips_like_the_task_path(ray_local, tmp_path, clip_bytes, tiny_hf,
                                                                   decode_actors, decoder):
    src = _bad_dataset(tmp_path / "bad", clip_bytes)
    cfg = DataConfig(root=str(tmp_path / "bad"), sources=[src], tokenizer=str(tiny_hf.tokenizer), num_frames=2,
                     image_size=16, max_bad_fraction=1.0, min_resolution=20, decode_batch_size=4,
                     decode_actors=decode_actors, decoder=decoder, eval_sampling="uniform")
    name = run_name()
    ds = build_dataset(cfg, "val", False, ("frames", "text_ids"), run_name=name)
    if decode_actors:
        assert "MapBatches(DecodeActor)" in str(ds)
    batches = collect(ds)
    assert sum(len(b["frames"]) for b in batches) == 6
    for b in batches:  # the good clips (24 numbered frames): uniform 2 frames = the first and the last
        assert all(frame_index(f.numpy()) == [0, 23] for f in b["frames"])
    stats = quality.get_bad_clip_stats(name)
    assert stats["total_seen"] == 12 and stats["by_reason"] == {
        "empty": 1, "truncated": 1, "not_video": 1, "too_few_frames": 1, "bad_resolution": 1, "missing": 1}
    strict = cfg.model_copy(update={"max_bad_fraction": 0.2, "bad_check_min_seen": 4})
    with pytest.raises(Exception, match=r"too many bad clips.*by reason"):
        collect(build_dataset(strict, "val", False, ("frames",), run_name=run_name()))


@pytest.mark.parametrize("cpus,decode_cpus,concurrency,expect", [
    (1.0, 1.0, None, None),        # the pool would hold the only CPU: the read task never runs
    (2.0, 1.0, None, (1, 1)),      # one actor beside the read
    (8.0, 0.5, None, (1, 15)),
    (4.0, 1.0, 4, None),           # an explicit pool that leaves nothing for the read
    (4.0, 1.0, 3, 3),
])
def test_an_actor_pool_leaves_room_for_the_read_that_feeds_it(monkeypatch, cpus, decode_cpus, concurrency, expect):
    import ray

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": cpus})
    cfg = DataConfig(root="/x", sources=[SourceConfig(format="msrvtt", train=["a.jsonl"])], decode_actors=True,
                     decode_cpus=decode_cpus, decode_concurrency=concurrency)
    kwargs = {"num_cpus": decode_cpus, **({"concurrency": concurrency} if concurrency else {})}
    if expect is None:
        with pytest.raises(ValueError, match="leave no CPU"):
            _actor_pool(cfg, kwargs)
    else:
        assert _actor_pool(cfg, kwargs)["concurrency"] == expect
