"""Caption metrics: BLEU-1..4, METEOR, ROUGE-L and CIDEr from the COCO caption evaluation code.

The scorers are pycocoevalcap's (``Bleu``, ``Rouge``, ``Cider`` in Python; METEOR is its bundled
``meteor-1.5.jar``, run with the same arguments pycocoevalcap uses, under a watchdog so that a
stuck Java process becomes a clear error rather than a hung evaluation).

Tokenisation is done here in Python instead of the Java PTB tokenizer: lower-case, punctuation
removed, split on whitespace (contractions stay whole, e.g. ``don't``, where PTB would give
``do n't``).  Chinese captions (``chinese=True``) are scored character by character, as
Youku-mPLUG does: whitespace and punctuation dropped, every remaining character is one token.

Scale: the scorers' own (BLEU/METEOR/ROUGE-L in 0-1, CIDEr in 0-10).
An empty prediction is legal and scores 0 on every metric for its item (pycocoevalcap's ROUGE-L
divides by the prediction length, so that item's ROUGE-L is set to 0 here).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
import unicodedata
from typing import Hashable, Mapping, Sequence

METRIC_NAMES = ("BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "METEOR", "ROUGE_L", "CIDEr")


# ---------------------------------------------------------------- tokenisation

def _is_punct(ch: str) -> bool:
    return unicodedata.category(ch)[0] in "PSC"         # punctuation, symbols, control chars; any script


def tokenize_caption(text: str, chinese: bool = False) -> str:
    """One caption as space-separated tokens (what the scorers split on)."""
    if not isinstance(text, str):
        raise TypeError(f"a caption must be a str, got {type(text).__name__}: {text!r}")
    text = text.lower()
    if chinese:
        return " ".join(ch for ch in text if not ch.isspace() and not _is_punct(ch))
    words = "".join(" " if (_is_punct(ch) and ch != "'") else ch for ch in text).split()
    return " ".join(w for w in (w.strip("'") for w in words) if w)


# ---------------------------------------------------------------- METEOR (the real jar, guarded)

def _meteor_jar() -> str:
    from pycocoevalcap.meteor import meteor as meteor_mod
    return os.path.join(os.path.dirname(os.path.abspath(meteor_mod.__file__)), meteor_mod.METEOR_JAR)


def meteor_score(gts: Mapping[Hashable, Sequence[str]], res: Mapping[Hashable, Sequence[str]],
                 timeout_s: float = 600.0) -> float:
    """Corpus METEOR 1.5 (``-l en -norm``) over tokenised captions, as pycocoevalcap computes it:
    one ``SCORE`` line per item gives its statistics, one ``EVAL`` line aggregates them.
    Raises RuntimeError when Java is missing, the jar fails, or it takes over ``timeout_s``."""
    java = shutil.which("java")
    if java is None:
        raise RuntimeError("METEOR needs a Java runtime and `java` is not on PATH; install one "
                           "(Debian: apt-get install default-jre-headless, as `make install` does)")
    jar = _meteor_jar()
    cmd = [java, "-jar", "-Xmx2G", os.path.basename(jar), "-", "-", "-stdio", "-l", "en", "-norm"]
    with tempfile.TemporaryFile() as stderr:             # a file, so a chatty JVM can never block on it
        proc = subprocess.Popen(cmd, cwd=os.path.dirname(jar), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=stderr)
        fired = threading.Event()
        watchdog = threading.Timer(timeout_s, lambda: (fired.set(), proc.kill()))
        watchdog.daemon = True
        watchdog.start()

        def read() -> str:
            line = proc.stdout.readline().decode("utf-8").strip()
            if line:
                return line
            if fired.is_set():
                raise RuntimeError(f"METEOR (java -jar {jar}) gave no answer within {timeout_s:.0f} s and was "
                                   "killed; raise meteor_timeout_s for large evaluations or check the Java runtime")
            proc.kill()
            stderr.seek(0)
            err = stderr.read().decode("utf-8", "replace")[-2000:]
            raise RuntimeError(f"METEOR (java -jar {jar}) stopped without an answer (exit code {proc.wait()}): {err}")

        def ask(line: str) -> str:
            try:
                proc.stdin.write((line + "\n").encode("utf-8"))
                proc.stdin.flush()
            except OSError:                               # a dead process: read() says why
                pass
            return read()

        def clean(s):
            return " ".join(s.replace("|||", "").split())  # "|||" is the protocol's separator
        try:
            stats = [ask(" ||| ".join(("SCORE", " ||| ".join(clean(r) for r in gts[i]), clean(res[i][0]))))
                     for i in gts]
            ask("EVAL ||| " + " ||| ".join(stats))      # answers: one score per item, then the corpus score
            for _ in range(len(stats) - 1):
                read()
            return float(read())
        finally:
            watchdog.cancel()
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            for f in (proc.stdin, proc.stdout):
                try:
                    f.close()
                except OSError:
                    pass


# ---------------------------------------------------------------- ROUGE-L with empty predictions

def _rouge_l(gts: Mapping, res: Mapping) -> float:
    from pycocoevalcap.rouge.rouge import Rouge
    rouge = Rouge()
    scores = [0.0 if not res[i][0].split() else rouge.calc_score(res[i], gts[i]) for i in gts]
    return float(sum(scores) / len(scores))


# ---------------------------------------------------------------- the entry point

def caption_metrics(predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]],
                    chinese: bool = False, with_meteor: bool = True,
                    meteor_timeout_s: float = 600.0) -> dict[str, float]:
    """BLEU_1..4, METEOR, ROUGE_L, CIDEr over the items in ``references``.

    predictions: item id -> generated caption (may be empty).
    references: item id -> one or more ground-truth captions (each non-empty after tokenisation).
    Both must have the same ids.  ``with_meteor=False`` skips the Java scorer (its key is absent).
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    if not references:
        raise ValueError("caption_metrics needs at least one item; references is empty")
    missing = [i for i in references if i not in predictions]
    extra = [i for i in predictions if i not in references]
    if missing or extra:
        raise ValueError(f"predictions and references must cover the same ids: {len(missing)} ids without a "
                         f"prediction (e.g. {missing[:3]}), {len(extra)} predictions without references "
                         f"(e.g. {extra[:3]})")
    res = {i: [tokenize_caption(predictions[i], chinese)] for i in references}
    gts = {}
    for i, refs in references.items():
        if isinstance(refs, str) or not refs:
            raise ValueError(f"references[{i!r}] must be a non-empty list of captions, got {refs!r}")
        gts[i] = [tokenize_caption(r, chinese) for r in refs]
        if not all(gts[i]):
            raise ValueError(f"references[{i!r}] has a caption with no words after tokenisation: {list(refs)!r}; "
                             "drop empty ground-truth captions from the annotations")

    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out = {f"BLEU_{n}": float(b) for n, b in enumerate(bleu, start=1)}
    if with_meteor:
        out["METEOR"] = meteor_score(gts, res, timeout_s=meteor_timeout_s)
    out["ROUGE_L"] = _rouge_l(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    out["CIDEr"] = float(cider)
    return out


def exact_match_rate(predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]],
                     chinese: bool = False) -> float:
    """% of items whose prediction equals one of their references once both are tokenised as the
    scorers see them (:func:`tokenize_caption`: case and punctuation do not count)."""
    if not predictions:
        raise ValueError("exact_match_rate needs at least one prediction")
    hits = sum(tokenize_caption(p, chinese) in {tokenize_caption(r, chinese) for r in references[k]}
               for k, p in predictions.items())
    return 100.0 * hits / len(predictions)
