"""Bad-clip accounting without Ray (counts, examples, threshold, epoch reports) and tokenization."""
from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.data import quality
from orchestrator.data.tokenize import encode, load_tokenizer


def test_stats_count_by_reason_and_keep_examples():
    s = quality.BadClipStats()
    s.add(10, [("empty", "s3://b/a.mp4"), ("missing", "s3://b/m.mp4")])
    out = s.add(10, [("empty", f"s3://b/e{i}.mp4") for i in range(10)])
    assert out["total_seen"] == 20 and out["bad"] == 12
    assert out["by_reason"] == {"empty": 11, "missing": 1}
    assert len(out["examples"]["empty"]) == quality.MAX_EXAMPLES


def test_threshold_names_reasons_and_uris():
    stats = {"total_seen": 10, "bad": 2, "by_reason": {"truncated": 2}, "examples": {"truncated": ["s3://b/t.mp4"]}}
    quality.check(stats, 0.25)
    with pytest.raises(quality.TooManyBadClips, match=r"truncated=2.*s3://b/t\.mp4.*max_bad_fraction=0\.1"):
        quality.check(stats, 0.1)
    quality.check(stats, 0.1, min_seen=11)  # too few clips seen to judge yet


def test_epoch_report_and_local_tracker():
    quality.reset_local()
    t = quality.BadClipTracker("unit")
    t.record(5, [("empty", "a")])
    first = t.end_epoch()
    t.record(5, [])
    second = t.end_epoch()
    assert first["this_epoch"]["bad"] == 1 and second["this_epoch"] == {"total_seen": 5, "by_reason": {}, "bad": 0}
    assert second["total"]["total_seen"] == 10
    assert quality.get_bad_clip_stats("unit")["bad"] == 1
    with pytest.raises(quality.TooManyBadClips):
        quality.check_bad_clips("unit", 0.05)
    quality.reset_local()


def test_unknown_reason_rejected():
    with pytest.raises(ValueError, match="unknown bad-clip reason"):
        quality.BadClip("weird", "u")


def test_tokenizer_english_and_chinese(tiny_hf, tmp_path):
    tok = load_tokenizer(str(tiny_hf.tokenizer))
    enc = encode(tok, ["a red square moves left", ""], 12)
    assert enc["ids"].shape == (2, 12) and enc["ids"].dtype.name == "int64"
    assert enc["mask"][0].sum() == 7  # [CLS] + 5 words + [SEP]
    assert tok.decode(enc["ids"][0], skip_special_tokens=True) == "a red square moves left"
    pair = encode(tok, ["the film is dull"], 16, ["a lovely movie"])
    assert set(pair["type_ids"][0][pair["mask"][0] == 1].tolist()) == {0, 1}
    from orchestrator.devtools.hf_assets import build_wordpiece_tokenizer

    zh = load_tokenizer(build_wordpiece_tokenizer(["一只猫在玩", "风景很美"], tmp_path / "zh", vocab_size=100))
    ids = encode(zh, ["猫在玩"], 8)["ids"][0]
    assert zh.convert_ids_to_tokens(ids[1:4].tolist()) == ["猫", "在", "玩"]  # character level


def test_missing_tokenizer_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.tokenizer"):
        load_tokenizer(str(tmp_path / "nothing"))


def test_a_hanging_decode_is_a_bad_clip_not_a_hang():
    import time

    from orchestrator.data.process import with_timeout

    t0 = time.perf_counter()
    with pytest.raises(quality.BadClip) as e:
        with_timeout(0.2, "s3://b/slow.mp4", time.sleep, 5)
    assert e.value.reason == "undecodable" and "decode_timeout_s" in str(e.value)
    assert time.perf_counter() - t0 < 2
    assert with_timeout(1.0, "u", lambda x: x + 1, 1) == 2
    with pytest.raises(quality.BadClip, match="empty"):
        with_timeout(1.0, "u", lambda: (_ for _ in ()).throw(quality.BadClip("empty", "u")))


def test_calls_share_one_runner_thread_until_one_overruns():
    """Clip after clip runs on one long-lived thread (no thread per call); the thread stuck in an
    overrun call is left behind, ends once that call returns, and the next call gets a fresh one."""
    import threading

    from orchestrator.data.process import with_timeout

    def me():
        return threading.current_thread()

    first = with_timeout(1.0, "u", me)
    assert first is not threading.current_thread() and with_timeout(1.0, "u", me) is first
    release = threading.Event()
    with pytest.raises(quality.BadClip):
        with_timeout(0.1, "u", release.wait, 10)
    fresh = with_timeout(1.0, "u", me)
    assert fresh is not first and with_timeout(1.0, "u", me) is fresh
    release.set()
    first.join(5)
    assert not first.is_alive()


def test_tokenizer_build_is_a_function_of_the_texts(tmp_path):
    """Two builds from the same texts give the same vocabulary, ids and files (the demo repeats its
    figures only if its synthetic dataset's tokenizer does); every character of the texts is known."""
    from orchestrator.devtools import synth
    from orchestrator.devtools.hf_assets import build_wordpiece_tokenizer

    texts = synth.all_texts(synth.make_clips(24, 0))
    a, b = (build_wordpiece_tokenizer(texts, tmp_path / name) for name in ("a", "b"))
    for name in ("vocab.txt", "tokenizer.json"):
        assert (Path(a) / name).read_bytes() == (Path(b) / name).read_bytes(), name
    tok = load_tokenizer(a)
    for text in texts[:50]:
        ids = encode(tok, [text], 64)["ids"][0].tolist()
        assert tok.unk_token_id not in ids, text
