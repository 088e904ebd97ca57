"""Tiny random-weight CLIP and BLIP folders, in the layout transformers saves (safetensors), for the
evaluation tests: the mechanics of scoring, not its values.

- CLIP: CLIPModel from a small CLIPConfig; tokenizer: CLIP's own BPE vocabulary, which ComfyUI
  ships as comfy/sd1_tokenizer/vocab.json + merges.txt; image processor at 32 px.
- BLIP: BlipForConditionalGeneration from a small BlipConfig; tokenizer: a WordPiece vocabulary
  written here (BERT's special tokens, BLIP's "[DEC]" start token, the letters a-z with their
  "##" continuations so any lowercase word tokenizes, and the prompt set's words).
"""
from __future__ import annotations

from pathlib import Path

import torch

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
WORDS = ["a", "an", "and", "with", "picture", "of", "the", ".", ","]
SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}


def _vision(image_size: int) -> dict:
    return {**SMALL, "image_size": image_size, "patch_size": 16}


def build_tiny_clip(folder: Path, comfy_root: Path, seed: int = 0) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer
    tok_dir = comfy_root / "comfy" / "sd1_tokenizer"
    tokenizer = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"))
    config = CLIPConfig(text_config={**SMALL, "vocab_size": len(tokenizer), "max_position_embeddings": 77},
                        vision_config=_vision(32), projection_dim=16)
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(folder, safe_serialization=True)
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def blip_vocab(words) -> list[str]:
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    extra = sorted(set(words) - set(letters) - set(WORDS))
    return SPECIAL + WORDS + letters + ["##" + c for c in letters] + extra


def build_tiny_blip(folder: Path, words, seed: int = 0) -> Path:
    from transformers import (BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor,
                              BlipProcessor)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = blip_vocab(words)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizer(str(folder / "vocab.txt"), bos_token="[DEC]")
    ids = {t: vocab.index(t) for t in SPECIAL}
    text = {**SMALL, "vocab_size": len(vocab), "encoder_hidden_size": 32, "max_position_embeddings": 64,
            "pad_token_id": ids["[PAD]"], "bos_token_id": ids["[DEC]"], "eos_token_id": ids["[SEP]"],
            "sep_token_id": ids["[SEP]"]}
    config = BlipConfig(text_config=text, vision_config=_vision(32), projection_dim=16)
    torch.manual_seed(seed)
    BlipForConditionalGeneration(config).save_pretrained(folder, safe_serialization=True)
    images = BlipImageProcessor(size={"height": 32, "width": 32})
    BlipProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    return folder
