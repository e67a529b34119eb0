"""Evaluation metrics for the downstream workloads: pure functions, no Ray, no torch.distributed.

The workloads gather predictions (from all workers) and call these.  Scales: recalls, accuracies
and F1 are percentages (0-100); caption metrics keep the COCO caption evaluation's own scale
(BLEU/METEOR/ROUGE-L in 0-1, CIDEr in 0-10), so they compare with numbers that code prints.
Ties are pessimistic wherever a rank is computed: an equal score never counts in one's favour.

========================  ==========================================================
module                    entry points
========================  ==========================================================
``retrieval``             ``rerank_topk`` (= ``plan_rerank`` + ``assemble_scores``),
                          ``retrieval_metrics``, ``score_all_pairs``
``captioning``            ``caption_metrics``, ``tokenize_caption``, ``meteor_score``
``classification``        ``topk_accuracy``, ``accuracy``, ``f1_binary``, ``glue_metrics``
``qa``                    ``normalize_answer``, ``exact_match_accuracy``, ``rank_answers``
========================  ==========================================================

``captioning`` imports pycocoevalcap lazily (inside the functions), so importing this package
stays cheap.
"""
from workloads.metrics.captioning import caption_metrics, meteor_score, tokenize_caption
from workloads.metrics.classification import (
                                         GLUE_TASKS,
                                         accuracy,
                                         f1_binary,
                                         glue_metrics,
                                         topk_accuracy,
)
from workloads.metrics.qa import exact_match_accuracy, normalize_answer, rank_answers
from workloads.metrics.retrieval import (
                                         RerankPlan,
                                         assemble_scores,
                                         plan_rerank,
                                         rerank_topk,
                                         retrieval_metrics,
                                         score_all_pairs,
)

__all__ = ["GLUE_TASKS", "RerankPlan", "accuracy", "assemble_scores", "caption_metrics", "exact_match_accuracy",
           "f1_binary", "glue_metrics", "meteor_score", "normalize_answer", "plan_rerank", "rank_answers",
           "rerank_topk", "retrieval_metrics", "score_all_pairs", "tokenize_caption", "topk_accuracy"]
