"""CLIP and BLIP scores of a sweep's images, with the user's own weights from local folders.

Nothing is downloaded and nothing is unpickled: models load with transformers'
``from_pretrained(folder, local_files_only=True, use_safetensors=True)``. The papers' models:
CLIP ViT-B/16 (Hugging Face ``openai/clip-vit-base-patch16``) and BLIP base captioning trained
on COCO (``Salesforce/blip-image-captioning-base``, the LAVIS ``blip_caption base_coco`` A&E used),
captioning after the text "a picture of" as LAVIS does (the prefix is removed from the caption).

Writes OUT/scores.jsonl, one line per image; a rerun scores only the images not yet in it."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image

from . import metrics, store
from .prompts import halves

CAPTION_PREFIX = "a picture of"
FILES = {
    "CLIP": {"config.json": "the model's configuration", "model.safetensors": "the weights (safetensors)",
             "preprocessor_config.json | processor_config.json": "the image processor's settings",
             "tokenizer.json | vocab.json + merges.txt": "the BPE tokenizer"},
    "BLIP": {"config.json": "the model's configuration", "model.safetensors": "the weights (safetensors)",
             "preprocessor_config.json | processor_config.json": "the image processor's settings",
             "tokenizer.json | vocab.txt": "the WordPiece tokenizer"},
}
HF_NAMES = {"CLIP": "openai/clip-vit-base-patch16", "BLIP": "Salesforce/blip-image-captioning-base"}


class MissingWeights(FileNotFoundError):
    """A model folder lacks files; the message lists which and where they go."""


def _has(folder: Path, spec: str) -> bool:
    return any(all((folder / f.strip()).is_file() for f in alt.split("+")) for alt in spec.split("|"))


def check_folder(kind: str, folder: str | Path) -> Path:
    folder = Path(folder).expanduser()
    missing = [f"{spec} ({what})" for spec, what in FILES[kind].items()
               if not (folder.is_dir() and _has(folder, spec))]
    if missing:
        raise MissingWeights(
            f"{kind} weights: {folder} lacks " + "; ".join(missing) + f". Put the files of {HF_NAMES[kind]} "
            f"(as `huggingface-cli download {HF_NAMES[kind]} --local-dir {folder}` fetches them on a machine "
            "with internet) into that folder. Weights must be safetensors: this runner never loads pickles "
            "(pytorch_model.bin).")
    return folder


class Scorer:
    def __init__(self, clip_dir, blip_dir, device: str = "cpu", max_caption_tokens: int = 30):
        from transformers import BlipForConditionalGeneration, BlipProcessor, CLIPModel, CLIPProcessor
        clip_dir, blip_dir = check_folder("CLIP", clip_dir), check_folder("BLIP", blip_dir)
        local = {"local_files_only": True}
        self.device = device
        self.clip = CLIPModel.from_pretrained(clip_dir, use_safetensors=True, **local).to(device).eval()
        self.clip_proc = CLIPProcessor.from_pretrained(clip_dir, **local)
        self.blip = BlipForConditionalGeneration.from_pretrained(blip_dir, use_safetensors=True, **local).to(device).eval()
        self.blip_proc = BlipProcessor.from_pretrained(blip_dir, **local)
        self.max_caption_tokens = max_caption_tokens
        self._prompt_cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def text_embeddings(self, texts: list[str]) -> torch.Tensor:
        tok = self.clip_proc.tokenizer(texts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        return _features(self.clip.get_text_features(**tok.to(self.device)))

    @torch.no_grad()
    def image_embeddings(self, images: list[Image.Image]) -> torch.Tensor:
        pix = self.clip_proc(images=images, return_tensors="pt")["pixel_values"].to(self.device)
        return _features(self.clip.get_image_features(pixel_values=pix))

    @torch.no_grad()
    def captions(self, images: list[Image.Image]) -> list[str]:
        inputs = self.blip_proc(images=images, text=[CAPTION_PREFIX] * len(images), return_tensors="pt")
        ids = self.blip.generate(**inputs.to(self.device), max_new_tokens=self.max_caption_tokens)
        texts = self.blip_proc.batch_decode(ids, skip_special_tokens=True)
        return [t.strip().removeprefix(CAPTION_PREFIX).strip() for t in texts]

    def prompt_embedding(self, prompt: str) -> torch.Tensor:
        if prompt not in self._prompt_cache:
            self._prompt_cache[prompt] = metrics.prompt_embedding(self.text_embeddings(metrics.templated(prompt)))
        return self._prompt_cache[prompt]

    def score(self, prompt: str, images: list[Image.Image]) -> list[dict]:
        """The three metrics (and the caption) of images of one prompt."""
        img = self.image_embeddings(images).cpu()
        full = metrics.similarity(img, self.prompt_embedding(prompt).cpu())
        low = metrics.min_object_similarity(img, [self.prompt_embedding(h).cpu() for h in halves(prompt)])
        caps = self.captions(images)
        text = metrics.similarity(self.text_embeddings(caps).cpu(), self.prompt_embedding(prompt).cpu())
        return [{"clip_full": float(f), "clip_min": float(m), "blip_text": float(t), "caption": c}
                for f, m, t, c in zip(full, low, text, caps)]


def _features(out) -> torch.Tensor:
    """get_*_features returns a tensor, or in some transformers versions an output with the pooled one."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def scored_keys(path: Path) -> set[str]:
    return {r["key"] for r in store.read_scores(path, repair=True)}


def score_folder(out: Path, scorer: Scorer, batch: int = 16) -> int:
    """Scores every image in OUT not yet in OUT/scores.jsonl; returns how many it scored."""
    path = Path(out) / "scores.jsonl"
    done = scored_keys(path)
    todo = [r for r in store.records(out) if store.job_key(r) not in done]
    by_prompt: dict[str, list[dict]] = {}
    for r in todo:
        by_prompt.setdefault(r["prompt"], []).append(r)
    count = 0
    with path.open("a") as f:
        for prompt, recs in by_prompt.items():
            for start in range(0, len(recs), batch):
                chunk = recs[start:start + batch]
                images = [Image.open(store.image_path(out, r)).convert("RGB") for r in chunk]
                for r, s in zip(chunk, scorer.score(prompt, images)):
                    f.write(json.dumps({"key": store.job_key(r), "method": r["method"], "category": r["category"],
                                        "prompt": prompt, "seed": r["seed"], **s}) + "\n")
                    count += 1
                f.flush()
    return count


def load_scores(out: Path) -> list[dict]:
    return store.read_scores(Path(out) / "scores.jsonl")
