"""Tokenization on the data plane with Hugging Face tokenizers.

``load_tokenizer`` accepts a local directory (``save_pretrained`` layout), an ``s3://`` directory
(downloaded once per process into a local cache), or a hub name (through
``transformers.AutoTokenizer``; offline runs need it in the HF cache).  English WordPiece (BERT)
and Chinese character-level vocabularies (BERT's CJK pre-tokenizer splits every Han character)
both load this way.  Outputs are padded to a fixed length so rows batch without a collate step.
"""
from __future__ import annotations

import functools
import hashlib
import os
import tempfile

import numpy as np

from orchestrator import storage
from orchestrator.errors import UserError

CACHE_DIR = os.environ.get("MPLUG2_CACHE", os.path.join(tempfile.gettempdir(), "mplug2-cache"))


def default_tokenizer(root: str) -> str:
    return storage.join(root, "tokenizer")


class TokenizerNotFound(FileNotFoundError, UserError):
    """``data.tokenizer`` (or ``<data.root>/tokenizer``) names no tokenizer."""


def _local_copy(uri: str) -> str:
    """Download an s3:// tokenizer directory once into the cache; returns the local directory."""
    digest = hashlib.sha1(uri.encode()).hexdigest()[:16]
    dst = os.path.join(CACHE_DIR, "tokenizers", digest)
    done = os.path.join(dst, ".complete")
    if not os.path.exists(done):
        tmp = tempfile.mkdtemp(dir=os.path.dirname(dst) if os.path.isdir(os.path.dirname(dst)) else None)
        n = storage.download_dir(uri, tmp)
        if n == 0:
            raise TokenizerNotFound(f"tokenizer {uri!r}: no files under that prefix; set data.tokenizer "
                                    "to a directory written by save_pretrained")
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        open(os.path.join(tmp, ".complete"), "w").close()
        try:
            os.replace(tmp, dst)
        except OSError:  # another process won the race
            pass
    return dst


@functools.lru_cache(maxsize=4)
def load_tokenizer(name_or_uri: str):
    """A transformers tokenizer from a local dir, an s3:// dir or a hub name (cached per process)."""
    from transformers import AutoTokenizer

    path = name_or_uri
    if storage.is_s3(name_or_uri):
        path = _local_copy(name_or_uri)
    elif name_or_uri.startswith("file://"):
        path = storage.local_path(name_or_uri)
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise TokenizerNotFound(f"cannot load tokenizer {name_or_uri!r} (data.tokenizer; unset, it is "
                                f"<data.root>/tokenizer): {str(e).splitlines()[0][:200]}. Set data.tokenizer to a "
                                "directory written by save_pretrained (local or s3://) or a cached hub name") from None


def encode(tokenizer, texts: list[str], max_len: int, texts_b: list[str] | None = None) -> dict[str, np.ndarray]:
    """Pad/truncate to ``max_len``: ids, mask and type ids, each int64 [N, max_len]."""
    if texts_b is not None and any(b for b in texts_b):
        enc = tokenizer([t or "" for t in texts], [b or "" for b in texts_b], padding="max_length",
                        truncation=True, max_length=max_len, return_token_type_ids=True)
    else:
        enc = tokenizer([t or "" for t in texts], padding="max_length", truncation=True, max_length=max_len,
                        return_token_type_ids=True)
    out = {
        "ids": np.asarray(enc["input_ids"], dtype=np.int64),
        "mask": np.asarray(enc["attention_mask"], dtype=np.int64),
    }
    out["type_ids"] = np.asarray(enc.get("token_type_ids", np.zeros_like(out["ids"])), dtype=np.int64)
    return out
