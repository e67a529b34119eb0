"""data.group_pattern: rows carry their group, and each worker re-deals its batches into whole groups."""
from __future__ import annotations

import random
import re

import numpy as np
import pytest
import torch

from orchestrator.data.decode import DecodeSpec
from orchestrator.data.grouping import GROUP_KEY, NO_GROUP, group_batches, group_id
from orchestrator.data.process import EMPTY_ROW, ProcessParams, process_batch

PATTERN = r"^a (\w+ \w+) moves"


def test_group_id_is_the_patterns_match():
    p = re.compile(PATTERN)
    assert group_id("a red square moves left", p) == group_id("a red square moves up", p) >= 0
    assert group_id("a red circle moves up", p) != group_id("a red square moves up", p)
    assert group_id("the film is dull", p) == NO_GROUP and group_id("a red square moves", None) == NO_GROUP
    assert group_id("a red square moves", re.compile("square")) == group_id("x square", re.compile("square"))


def test_the_data_plane_writes_each_rows_group():
    texts = ["a red square moves left", "a red square moves up", "the film is dull"]
    rows = [{**EMPTY_ROW, "text": t, "modality": "text", "id": str(i), "label": i} for i, t in enumerate(texts)]
    params = ProcessParams(columns=("label", GROUP_KEY), decode=DecodeSpec(num_frames=1, sampling="middle"),
                           frames_out=1, image_size=16, training=True, scale_min=1.0, hflip=False, tokenizer="unused",
                           max_text_len=8, max_answer_len=4, seed=0, run_name=None, max_bad_fraction=1.0,
                           bad_check_min_seen=1, group_pattern=PATTERN)
    out = process_batch({k: np.array([r[k] for r in rows], dtype=object) for k in EMPTY_ROW}, params)
    g = out[GROUP_KEY].tolist()
    assert g[0] == g[1] == group_id(texts[0], re.compile(PATTERN)) and g[2] == NO_GROUP


def _stream(n_batches=12, batch=8, seed=0):
    """Batches of rows from 6 groups x 4 texts (four copies of each text), in random order, plus a few
    rows without a group."""
    rng = random.Random(seed)
    rows = [(g, t) for g in range(6) for t in range(4) for _ in range(4)] + [(NO_GROUP, 100 + i) for i in range(16)]
    rng.shuffle(rows)
    rows = rows[:n_batches * batch]
    for s in range(0, len(rows), batch):
        part = rows[s:s + batch]
        yield {GROUP_KEY: torch.tensor([g for g, _ in part]),
               "text_ids": torch.tensor([[2, 10 + g, 50 + t, 3] for g, t in part]),
               "text_mask": torch.ones(len(part), 4, dtype=torch.long),
               "sample_key": torch.arange(s, s + len(part))}


def test_batches_hold_whole_groups_of_different_texts_and_no_row_is_lost():
    ins = list(_stream(n_batches=14))
    outs = list(group_batches(iter(ins), 8, 4, 48, seed=1))
    assert len(outs) == len(ins)                                       # every rank keeps its number of steps
    assert all(GROUP_KEY not in b and len(b["sample_key"]) == 8 for b in outs)
    keys = sorted(torch.cat([b["sample_key"] for b in outs]).tolist())
    assert keys == sorted(torch.cat([b["sample_key"] for b in ins]).tolist())
    whole = 0
    for b in outs:
        head = b["text_ids"][:4]                                       # the first group of the batch
        if len(set(head[:, 1].tolist())) == 1 and head[0, 1] != 10 + NO_GROUP:
            assert len(set(head[:, 2].tolist())) == 4                  # four different texts
            whole += 1
    assert whole >= len(outs) // 2
    again = list(group_batches(iter(list(_stream(n_batches=14))), 8, 4, 48, seed=1))
    assert all(torch.equal(a["sample_key"], b["sample_key"]) for a, b in zip(outs, again))  # seeded


def test_a_stream_without_groups_passes_through():
    ins = [{"sample_key": torch.arange(4)}, {"sample_key": torch.arange(4, 8)}]
    assert list(group_batches(iter(ins), 4, 2, 16, seed=0)) == ins


def test_cached_clips_draw_their_frames_afresh_each_pass():
    """data.cache_frames: a cached row keeps every frame; each pass draws num_frames of them in order,
    seeded by (seed, pass, row), and images (one frame) stay as they are."""
    from orchestrator.config import RunSpec
    from orchestrator.data.process import redraw_frames
    frames = np.arange(4 * 24, dtype=np.uint8).reshape(4, 24, 1, 1, 1).repeat(2, 2).repeat(2, 3).repeat(3, 4)
    batch = {"frames": frames, "sample_key": np.arange(4) + 10, "epoch": np.zeros(4, np.int64)}
    first = redraw_frames(batch, 4, "rand", seed=0)
    assert first["frames"].shape == (4, 4, 2, 2, 3) and "epoch" not in first
    picked = first["frames"][:, :, 0, 0, 0] % 24
    assert (np.diff(picked.astype(int), axis=1) > 0).all()             # in order, one per segment
    assert np.array_equal(redraw_frames(batch, 4, "rand", seed=0)["frames"], first["frames"])
    later = redraw_frames({**batch, "epoch": np.ones(4, np.int64)}, 4, "rand", seed=0)
    assert not np.array_equal(later["frames"], first["frames"])          # another pass, other frames
    image = {"frames": frames[:, :1], "sample_key": batch["sample_key"], "epoch": batch["epoch"]}
    assert redraw_frames(image, 4, "rand", seed=0)["frames"].shape[1] == 1
    with pytest.raises(ValueError, match="set cache=true"):
        RunSpec.model_validate({"data": {"cache_frames": 24}})
    with pytest.raises(ValueError, match="at least num_frames"):
        RunSpec.model_validate({"data": {"cache": True, "cache_frames": 2, "num_frames": 4}})


def test_a_cached_pass_filters_and_draws_in_one_batch_function(monkeypatch):
    """data.cache_frames: each pass's one task per block leaves out the rows already trained and
    draws this pass's frames of the rest (the pass the progress registry says)."""
    from orchestrator.data import pipeline, progress

    frames = np.arange(4 * 24, dtype=np.uint8).reshape(4, 24, 1, 1, 1).repeat(2, 2).repeat(2, 3).repeat(3, 4)
    batch = {"frames": frames, "sample_key": np.arange(4) + 10}
    draws = {}
    for epoch in (0, 1):
        monkeypatch.setattr(progress, "_current", lambda run, stream, e=epoch: (e, np.array([11])))
        out = pipeline._skip_and_redraw(dict(batch), "run", "train", num_frames=4, sampling="rand", seed=0)
        assert out["sample_key"].tolist() == [10, 12, 13] and "epoch" not in out   # 11 was trained this pass
        assert out["frames"].shape == (3, 4, 2, 2, 3)
        draws[epoch] = out["frames"]
    assert not np.array_equal(draws[0], draws[1])                                # each pass draws afresh
