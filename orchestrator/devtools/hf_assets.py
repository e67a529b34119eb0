"""Hugging Face artefacts built locally: tokenizers and tiny checkpoints.

No model hub is reachable from tests, CI or the demo, so the tokenizer of the synthetic dataset
and the tiny BERT / CLIP-vision checkpoints that tests load are built here with the same
``save_pretrained`` layout the hub uses; the loading code paths are the real ones.
"""
from __future__ import annotations

import os
from typing import Iterable

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def build_wordpiece_tokenizer(texts: Iterable[str], out_dir: str | os.PathLike, vocab_size: int = 2000,
                              lowercase: bool = True) -> str:
    """Build a BERT-style WordPiece tokenizer for ``texts`` and save it (``BertTokenizer``, fast).

    The vocabulary is a function of the texts alone, so two builds give the same token ids (the
    demo's figures repeat): the special tokens, every character as a word start and as a ``##``
    continuation (so no word is ever ``[UNK]``), then whole words by count (ties by spelling) up
    to ``vocab_size``; a word left out is spelled in characters.  (The ``tokenizers`` WordPiece
    trainer breaks ties between equally frequent merges in hash order, which differs per process.)
    Text is normalised and split as BERT does; Chinese works too: BERT pre-tokenization splits CJK
    characters one by one, so the vocabulary holds the characters (Youku-mPLUG scores Chinese
    character by character).
    """
    from collections import Counter

    from tokenizers import BertWordPieceTokenizer
    from transformers import BertTokenizer

    bert = BertWordPieceTokenizer(lowercase=lowercase, strip_accents=lowercase, handle_chinese_chars=True)
    normalizer, pre = bert._tokenizer.normalizer, bert._tokenizer.pre_tokenizer
    words: Counter[str] = Counter()
    for text in texts:
        words.update(w for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(text)))
    chars = sorted({c for w in words for c in w})
    vocab = list(SPECIAL_TOKENS) + chars + ["##" + c for c in chars]
    known = set(vocab)
    for word, _ in sorted(words.items(), key=lambda wc: (-wc[1], wc[0])):
        if len(vocab) >= vocab_size:
            break
        if word not in known:
            vocab.append(word)
            known.add(word)
    os.makedirs(out_dir, exist_ok=True)
    vocab_file = os.path.join(out_dir, "vocab.txt")
    with open(vocab_file, "w", encoding="utf-8") as f:
        f.write("\n".join(vocab) + "\n")
    tok = BertTokenizer(vocab=vocab_file, do_lower_case=lowercase, tokenize_chinese_chars=True)  # transformers 5 API
    tok.save_pretrained(str(out_dir))
    return str(out_dir)


def build_tiny_bert(out_dir: str | os.PathLike, vocab_size: int, hidden: int = 64, layers: int = 4,
                    heads: int = 4, max_positions: int = 128, seed: int = 0) -> str:
    """A randomly initialised ``BertModel`` saved like a hub checkpoint."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                     num_attention_heads=heads, intermediate_size=hidden * 4,
                     max_position_embeddings=max_positions)
    BertModel(cfg, add_pooling_layer=False).save_pretrained(str(out_dir))
    return str(out_dir)


def build_tiny_clip_vision(out_dir: str | os.PathLike, image_size: int = 32, patch_size: int = 8,
                           hidden: int = 64, layers: int = 4, heads: int = 4, seed: int = 0) -> str:
    """A randomly initialised ``CLIPVisionModel`` saved like a hub checkpoint."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(image_size=image_size, patch_size=patch_size, hidden_size=hidden,
                           num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=hidden * 4)
    CLIPVisionModel(cfg).save_pretrained(str(out_dir))
    return str(out_dir)
