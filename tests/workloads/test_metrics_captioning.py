"""Caption metrics through pycocoevalcap, checked against hand-worked values."""
from __future__ import annotations

import math

import pytest

from workloads.metrics import captioning
from workloads.metrics.captioning import caption_metrics, meteor_score, tokenize_caption


def test_tokenize_english_lowercases_and_drops_punctuation():
    assert tokenize_caption("A man, riding a HORSE... (fast)!") == "a man riding a horse fast"
    assert tokenize_caption("  don't  'quote' ") == "don't quote"
    assert tokenize_caption("?!.") == ""
    assert tokenize_caption("two\nlines\x00 here") == "two lines here"     # nothing can break METEOR's line protocol


def test_tokenize_chinese_is_character_by_character():
    assert tokenize_caption("一个 男人，骑马！", chinese=True) == "一 个 男 人 骑 马"
    assert tokenize_caption("NBA球赛", chinese=True) == "n b a 球 赛"


def test_identical_captions_score_perfectly():
    # four-word captions with no word shared between items: every n-gram (n <= 4) has idf log 2 > 0,
    # the TF-IDF vectors are identical, so CIDEr = 10 * mean_n cos = 10
    refs = {"a": ["a red ball rolls"], "b": ["two green dogs bark"]}
    m = caption_metrics({"a": "A red ball rolls.", "b": "two green dogs bark"}, refs, with_meteor=False)
    for n in range(1, 5):
        assert m[f"BLEU_{n}"] == pytest.approx(1.0, abs=1e-6)
    assert m["ROUGE_L"] == pytest.approx(1.0)
    assert m["CIDEr"] == pytest.approx(10.0)
    assert "METEOR" not in m


def test_bleu_and_rouge_hand_worked_with_brevity_penalty():
    # hyp "the cat sat on mat" (5 words), ref "the cat sat on the mat" (6 words)
    # clipped precisions: 1-gram 5/5, 2-gram 3/4, 3-gram 2/3, 4-gram 1/2; BP = exp(1 - 6/5)
    m = caption_metrics({0: "the cat sat on mat"}, {0: ["the cat sat on the mat"]}, with_meteor=False)
    bp = math.exp(1 - 6 / 5)
    assert m["BLEU_1"] == pytest.approx(bp * 1.0, rel=1e-6)                            # 0.8187
    assert m["BLEU_2"] == pytest.approx(bp * (1.0 * 3 / 4) ** (1 / 2), rel=1e-6)       # 0.7090
    assert m["BLEU_3"] == pytest.approx(bp * (1.0 * 3 / 4 * 2 / 3) ** (1 / 3), rel=1e-6)
    assert m["BLEU_4"] == pytest.approx(bp * (1.0 * 3 / 4 * 2 / 3 * 1 / 2) ** (1 / 4), rel=1e-6)
    # ROUGE-L: LCS = 5, P = 5/5, R = 5/6, F_beta with beta = 1.2
    p, r, b2 = 1.0, 5 / 6, 1.2 ** 2
    assert m["ROUGE_L"] == pytest.approx((1 + b2) * p * r / (r + b2 * p), rel=1e-6)   # 0.8944


def test_bleu_uses_the_closest_reference_length():
    # two references of 3 and 7 words; the 5-word hypothesis is closest to... both are 2 away:
    # pycocoevalcap's "closest" takes the shorter on a tie -> reflen 3 <= 5, no brevity penalty
    m = caption_metrics({0: "a b c d e"}, {0: ["a b c", "a b c d e f g"]}, with_meteor=False)
    assert m["BLEU_1"] == pytest.approx(1.0, abs=1e-6)


def test_chinese_captions_are_scored_by_character():
    # hyp 一个男人在骑马 (7 chars) vs ref 一个男人骑马 (6 chars): 6 of 7 unigrams match, no BP
    m = caption_metrics({0: "一个男人在骑马。"}, {0: ["一个男人骑马"]}, chinese=True, with_meteor=False)
    assert m["BLEU_1"] == pytest.approx(6 / 7, rel=1e-6)
    # 2-grams: 一个 个男 男人 人在 在骑 骑马 -> 一个 个男 男人 骑马 match: 4 of 6
    assert m["BLEU_2"] == pytest.approx((6 / 7 * 4 / 6) ** 0.5, rel=1e-6)


def test_an_empty_prediction_scores_zero_without_crashing():
    refs = {0: ["a dog runs in the park"], 1: ["a cat sleeps on a sofa"]}
    m = caption_metrics({0: "", 1: "a cat sleeps on a sofa"}, refs, with_meteor=False)
    assert m["ROUGE_L"] == pytest.approx(0.5)                   # mean of 0 (empty) and 1
    assert 0.0 < m["BLEU_1"] < 1.0 and 0.0 <= m["CIDEr"] < 10.0
    m = caption_metrics({0: "...", 1: ""}, refs, with_meteor=False)
    assert m["BLEU_1"] == pytest.approx(0.0, abs=1e-6) and m["ROUGE_L"] == 0.0 and m["CIDEr"] == 0.0


def test_bad_inputs_get_clear_errors():
    with pytest.raises(ValueError, match="same ids"):
        caption_metrics({0: "a"}, {0: ["a"], 1: ["b"]}, with_meteor=False)
    with pytest.raises(ValueError, match="same ids"):
        caption_metrics({0: "a", 2: "c"}, {0: ["a"]}, with_meteor=False)
    with pytest.raises(ValueError, match="non-empty list"):
        caption_metrics({0: "a"}, {0: []}, with_meteor=False)
    with pytest.raises(ValueError, match="non-empty list"):
        caption_metrics({0: "a"}, {0: "a"}, with_meteor=False)
    with pytest.raises(ValueError, match="no words after tokenisation"):
        caption_metrics({0: "a"}, {0: ["a b", " . "]}, with_meteor=False)
    with pytest.raises(ValueError, match="at least one item"):
        caption_metrics({}, {}, with_meteor=False)


def test_meteor_timeout_kills_the_java_process_with_a_clear_error():
    # the JVM needs seconds to load METEOR's tables, so 0.2 s always expires
    with pytest.raises(RuntimeError, match="no answer within"):
        meteor_score({0: ["a dog runs"]}, {0: ["a dog runs"]}, timeout_s=0.2)


def test_meteor_without_java_says_what_to_install(monkeypatch):
    monkeypatch.setattr(captioning.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="default-jre-headless"):
        meteor_score({0: ["a"]}, {0: ["a"]})


@pytest.mark.slow
def test_meteor_is_the_real_one_and_matches_pycocoevalcaps_wrapper():
    refs = {0: ["a man is riding a horse", "a person rides an animal"], 1: ["a dog runs"], 2: ["一个男人骑马"]}
    preds = {0: "A man rides a horse.", 1: "a dog runs", 2: ""}
    m = caption_metrics(preds, refs)
    assert set(m) == set(captioning.METRIC_NAMES)
    # the value pycocoevalcap's own wrapper gives on the same tokenised captions, recorded with
    #   Meteor().compute_score(gts, res) -> (0.2682514935516133, [0.41388921016683433, 1.0, 0.0])
    # (per item: the paraphrase match 0.414, identical 1.0, empty 0.0); one JVM start here, not two
    assert m["METEOR"] == pytest.approx(0.2682514935516133, rel=1e-9)


def test_exact_match_counts_a_caption_equal_to_any_reference():
    from workloads.metrics.captioning import exact_match_rate
    refs = {1: ["a red square moves left", "the square goes left"], 2: ["a blue circle moves up"], 3: ["x"]}
    preds = {1: "The square goes left.", 2: "a blue circle moves down", 3: "x"}
    assert exact_match_rate(preds, refs) == pytest.approx(200 / 3)
    assert exact_match_rate({1: "红色 方块"}, {1: ["红色方块。"]}, chinese=True) == 100.0
    with pytest.raises(ValueError):
        exact_match_rate({}, {})
