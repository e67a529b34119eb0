"""Evaluation metrics for the downstream workloads: pure functions, no Ray, no torch.distributed.

The workloads gather predictions (from all workers) and call these.  Scales: recalls, accuracies
and F1 are percentages (0-100); caption metrics keep the COCO caption evaluation's own scale
(BLEU/METEOR/ROUGE-L in 0-1, CIDEr in 0-10), so they compare with numbers that code prints.
Ties are pessimistic wherever a rank is computed: an equal score never counts in one's favour.
"""
from workloads.metrics.retrieval import rerank_topk, retrieval_metrics, score_all_pairs

__all__ = ["rerank_topk", "retrieval_metrics", "score_all_pairs"]
