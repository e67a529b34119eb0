"""GLUE TSVs (the layout of the official GLUE download): SST-2, RTE, MRPC, QQP, MNLI, QNLI.

Columns are found by header name; a test file without labels gives ``label = None``.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from typing import Iterator

from orchestrator.data.sources.base import (
    MalformedRow,
    ParseReport,
    csv_records,
    make_row,
    parse_records,
)


@dataclass(frozen=True)
class GlueTask:
    text: str
    text_b: str | None
    label: str
    labels: tuple[str, ...]  # names in id order (as in the Hugging Face GLUE datasets)


GLUE = {
    "sst2": GlueTask("sentence", None, "label", ("0", "1")),
    "rte": GlueTask("sentence1", "sentence2", "label", ("entailment", "not_entailment")),
    "mrpc": GlueTask("#1 String", "#2 String", "Quality", ("0", "1")),
    "qqp": GlueTask("question1", "question2", "is_duplicate", ("0", "1")),
    "mnli": GlueTask("sentence1", "sentence2", "gold_label", ("entailment", "neutral", "contradiction")),
    "qnli": GlueTask("question", "sentence", "label", ("entailment", "not_entailment")),
}


def make_parser(task: str):
    spec = GLUE[task]

    def parse(uri: str, text: str, ctx, report: ParseReport) -> Iterator[dict]:
        required = (spec.text,) + ((spec.text_b,) if spec.text_b else ())
        def row(r, line):
            a = r[spec.text].strip()
            if not a:
                raise MalformedRow(f"empty {spec.text!r}")
            b = r[spec.text_b].strip() if spec.text_b else None
            raw = r.get(spec.label)
            label = None
            if raw is not None and raw.strip() != "":
                if raw.strip() not in spec.labels:
                    raise MalformedRow(f"label {raw!r} not one of {spec.labels}")
                label = spec.labels.index(raw.strip())
            return make_row(text=a, text_b=b, label=label, label_name=raw, id=r.get("index") or r.get("id") or str(line),
                            modality="text")
        records = csv_records(uri, text, required, delimiter="\t", quoting=csv.QUOTE_NONE)
        return parse_records(uri, records, row, report)
    parse.__doc__ = f"GLUE {task.upper()} TSV: text {spec.text!r}" + (f", pair {spec.text_b!r}" if spec.text_b else "")
    return parse
