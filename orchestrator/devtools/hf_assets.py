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
    """Train a BERT-style WordPiece tokenizer on ``texts`` and save it (``BertTokenizer``, fast).

    Chinese text works too: BERT pre-tokenization splits CJK characters one by one, so the
    vocabulary learns the characters (Youku-mPLUG scores Chinese character by character).
    """
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertTokenizer

    texts = list(texts)
    wp = BertWordPieceTokenizer(lowercase=lowercase, strip_accents=lowercase, handle_chinese_chars=True)
    wp.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=1, special_tokens=SPECIAL_TOKENS,
                           limit_alphabet=20000)
    os.makedirs(out_dir, exist_ok=True)
    vocab_file = os.path.join(out_dir, "vocab.txt")
    wp.save_model(str(out_dir))
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
