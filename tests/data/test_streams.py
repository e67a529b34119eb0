"""Clip ids unique across mixed sources (issue 12 item 4) and images kept as T = 1 in a run that
mixes images and videos (item 5), through the real Ray Data pipeline."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch

from orchestrator.config import load_config
from orchestrator.data.config import DataConfig, SourceConfig
from orchestrator.data.pipeline import HASHED, build_dataset, iter_worker_batches
from orchestrator.devtools.synth import tar_bytes
from tests.data.conftest import jpeg

pytestmark = pytest.mark.slow


def _rows(ds, batch_size=16):
    return list(iter_worker_batches(ds, batch_size, "cpu", 1))


def _webvid_tar(root, clip_bytes, n=3):
    members = []
    for i in range(n):
        members += [(f"{i:08d}.mp4", clip_bytes),
                    (f"{i:08d}.json", json.dumps({"caption": f"clip number {i}", "key": f"{i:08d}"}).encode())]
    (root / "webvid3").mkdir(exist_ok=True)
    (root / "webvid3" / "00000.tar").write_bytes(tar_bytes(members))
    return SourceConfig(format="webvid_wds", train=["webvid3"], val=["webvid3"])


def test_clip_ids_unique_across_mixed_sources(ray_local, fixture_root, clip_bytes):
    """Sources numbering their clips from 0 and webdataset sources (no stored id) mixed in one
    training dataset: rows share an id exactly when they show the same clip."""
    sources = [SourceConfig(format="msrvtt", train=["ann/msrvtt.json"], val=["ann/msrvtt.json"]),   # a, a, b
               SourceConfig(format="coco_captions", train=["ann/coco.json"], val=["ann/coco.json"], media="images"),
               SourceConfig(format="msrvtt", train=["ann/msrvtt.jsonl"], val=["ann/msrvtt.jsonl"]),  # a, b
               _webvid_tar(fixture_root, clip_bytes),                                                 # 3 clips
               SourceConfig(format="cc3m_wds", train=["cc3m"], val=["cc3m"])]                         # 1 image
    cfg = DataConfig(root=str(fixture_root), sources=sources)
    batches = _rows(build_dataset(cfg, "train", True, ("clip_index", "sample_key"), seed=3, progress_stream="train"))
    ids = [int(i) for b in batches for i in b["clip_index"]]
    keys = [int(k) for b in batches for k in b["sample_key"]]
    assert len(ids) == 3 + 2 + 2 + 3 + 1
    # clips: msrvtt.json a (2 captions), b; coco image (2 captions); msrvtt.jsonl a, b (another
    # source's rows: not known to be the same clip, never a false positive); 3 webvid; 1 cc3m
    assert sorted(Counter(ids).values()) == [1, 1, 1, 1, 1, 1, 1, 2, 2]
    # every id is hashed where the row is read: webdataset rows, and (since annotations are parsed by
    # Ray tasks, not numbered in the driver) parsed rows too
    assert all(i >= 0 for i in ids) and sum(i >= HASHED for i in ids) == 11
    assert len(set(keys)) == len(keys)                                      # one key per row


def test_webdataset_source_trains_pretrain_losses(ray_local, fixture_root, clip_bytes, tiny_hf):
    """video2dataset shards carry no clip index: every row got -1, so matching_loss raised."""
    from model import MPlug2, MPlugConfig
    from orchestrator.data.tokenize import load_tokenizer
    from orchestrator.runtime.model_setup import tokenizer_overrides
    from workloads import pretrain

    src = _webvid_tar(fixture_root, clip_bytes)
    cfg = DataConfig(root=str(fixture_root), sources=[src], tokenizer=str(tiny_hf.tokenizer), image_size=32,
                     num_frames=2, max_text_len=12)
    (batch,) = _rows(build_dataset(cfg, "train", True, pretrain.COLUMNS, seed=0))
    assert len(set(batch["clip_index"].tolist())) == 3
    tok = load_tokenizer(str(tiny_hf.tokenizer))
    torch.manual_seed(0)
    model = MPlug2(MPlugConfig.from_preset("tiny", **tokenizer_overrides(tok), queue_size=16), task="pretrain")
    task = pretrain.Config()
    batch.update(pretrain.batch_constants(tok, task))
    losses = pretrain.loss(model, batch, task)
    assert torch.isfinite(losses["loss"].detach()) and float(losses["itm"].detach()) > 0


def _coco(root, n):
    (root / "imgs").mkdir(exist_ok=True)
    images, anns = [], []
    for i in range(n):
        (root / "imgs" / f"{i}.jpg").write_bytes(jpeg(h=40, w=60, value=20 + 20 * i))
        images.append({"file_name": f"{i}.jpg", "id": i})
        anns.append({"image_id": i, "id": i, "caption": f"image {i}"})
    (root / "ann" / "coco_n.json").write_text(json.dumps({"images": images, "annotations": anns}))
    return SourceConfig(format="coco_captions", train=["ann/coco_n.json"], val=["ann/coco_n.json"], media="imgs")


def test_images_in_a_mixed_run_stay_one_frame(ray_local, fixture_root, tiny_hf, monkeypatch):
    """A run mixing images and videos: images form their own stream of T = 1 batches whose vision
    features equal an image-only run's; the loop mixes them per step; the LM gets the image prompt."""
    from model import MPlug2, MPlugConfig
    from model.preprocess import normalize_frames
    from orchestrator.data.mix import stream_fractions
    from orchestrator.data.pipeline import build_stream_datasets
    from workloads import pretrain

    coco = _coco(fixture_root, 6)
    video = SourceConfig(format="msrvtt", train=["ann/msrvtt.json"], val=["ann/msrvtt.json"], weight=2.0)
    over = [f"data.root={fixture_root}", f"data.tokenizer={tiny_hf.tokenizer}", "data.image_size=32",
            "data.num_frames=4", "data.max_text_len=12", "seed=5"]

    def run_cfg(sources):
        cfg = load_config(None, over)
        return cfg.model_copy(update={"data": cfg.data.model_copy(update={"sources": sources})})

    mixed_cfg = run_cfg([video, coco])
    mixed = build_stream_datasets(mixed_cfg.data, mixed_cfg.seed, pretrain.COLUMNS, "mixed-run")
    assert set(mixed) == {"train", "train_image"}
    assert stream_fractions(mixed_cfg.data.sources, mixed) == {"train_image": pytest.approx(1 / 3)}
    video_batch = _rows(mixed["train"])[0]
    assert tuple(video_batch["frames"].shape[1:]) == (4, 32, 32, 3)
    image_cfg = run_cfg([coco])
    image_only = build_stream_datasets(image_cfg.data, image_cfg.seed, pretrain.COLUMNS, "image-run")
    by_key = {}
    for name, ds in (("mixed", mixed["train_image"]), ("image", image_only["train"])):
        for b in _rows(ds):
            assert tuple(b["frames"].shape[1:]) == (1, 32, 32, 3)  # T = 1, not an image repeated T times
            for k, f in zip(b["sample_key"].tolist(), b["frames"]):
                by_key.setdefault(k, {})[name] = f
    assert len(by_key) == 6 and all(len(v) == 2 for v in by_key.values())
    torch.manual_seed(0)
    model = MPlug2(MPlugConfig.from_preset("tiny", queue_size=16), task="pretrain").eval()
    with torch.no_grad():
        for v in by_key.values():
            a, b = (model.encode_vision(normalize_frames(v[n][None])).tokens for n in ("mixed", "image"))
            torch.testing.assert_close(a, b, rtol=0, atol=0)

    # the image instruction for T = 1 batches, the video one otherwise
    prompts = []
    monkeypatch.setattr(pretrain.objectives, "lm_loss",
                        lambda m, c, cm, pid, pm, *a: prompts.append(pid[0].tolist()) or torch.zeros(()))
    monkeypatch.setattr(pretrain.objectives, "contrastive_loss", lambda *a, **k: type(
        "C", (), {"loss": torch.zeros(()), "sim_i2t": None, "sim_t2i": None})())
    monkeypatch.setattr(pretrain.objectives, "matching_outputs", lambda *a, **k: pretrain.objectives.MatchingOutput(
        torch.zeros(()), torch.zeros(())))
    monkeypatch.setattr(pretrain.common, "diagnostics", lambda *a, **k: {})  # the prompts are under test, not these
    monkeypatch.setattr(pretrain.objectives, "mlm_loss", lambda *a, **k: torch.zeros(()))

    class Tok:
        def __call__(self, text, return_tensors):
            ids = torch.tensor([[len(text), 1]])
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    consts = pretrain.batch_constants(Tok(), pretrain.Config(modality="video"))
    for frames in (torch.zeros(2, 1, 32, 32, 3, dtype=torch.uint8), torch.zeros(2, 4, 32, 32, 3, dtype=torch.uint8)):
        pretrain.loss(model, {"frames": frames, "text_ids": torch.ones(2, 5, dtype=torch.long),
                              "text_mask": torch.ones(2, 5, dtype=torch.long), **consts}, pretrain.Config())
    assert prompts == [[len("what does the image describe?"), 1], [len("what does the video describe?"), 1]]


def test_stream_mix_draws_the_same_stream_on_every_rank():
    from orchestrator.data.mix import STREAM_KEY, StreamMix

    def draws(seed, step):
        mix = StreamMix({"train_image": None, "train_text": None}, {"train_image": 0.25, "train_text": 0.2}, 4, None,
                        seed)
        mix._next = lambda name: {STREAM_KEY: name}
        return [b[STREAM_KEY] if isinstance(b, dict) else b for b in mix.interleave(iter(["video"] * 4000), step)]

    a = draws(1, 3)
    assert a == draws(1, 3) and a != draws(1, 4)          # every rank: the same stream at the same step
    n = Counter(a)
    assert n["video"] == 4000
    total = len(a)
    assert abs(n["train_image"] / total - 0.25) < 0.03 and abs(n["train_text"] / total - 0.2) < 0.03
    assert np.isclose(sum(n.values()), total)
