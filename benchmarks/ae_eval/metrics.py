"""The papers' similarities, on embeddings (Attend-and-Excite's protocol, used by A-STAR).

- A prompt's text embedding: the prompt put in each of the 80 ImageNet templates of CLIP's
  zero-shot evaluation (doubled articles removed, as A&E does: "a a " -> "a ", "the a " -> "a "),
  each embedding normalised, averaged, normalised again.
- Full-prompt similarity: cosine of the normalised image embedding and the whole prompt's.
- Minimum-object similarity: the smaller of the image's similarities to the prompt's two halves
  (split at " and ", else " with "), each embedded with the templates.
- Text-text similarity: the BLIP caption's CLIP text embedding (normalised, no templates) against
  the prompt's templated embedding.
"""
from __future__ import annotations

import torch

IMAGENET_TEMPLATES = (
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.", "a photo of the hard to see {}.",
    "a low resolution photo of the {}.", "a rendering of a {}.", "graffiti of a {}.", "a bad photo of the {}.",
    "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.", "a photo of a hard to see {}.",
    "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.",
    "a drawing of a {}.", "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.",
    "a close-up photo of a {}.", "a black and white photo of the {}.", "a painting of the {}.",
    "a painting of a {}.", "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.",
    "a cropped photo of a {}.", "a plastic {}.", "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.", "a rendering of the {}.",
    "a {} in a video game.", "a photo of one {}.", "a doodle of a {}.", "a close-up photo of the {}.",
    "a photo of a {}.", "the origami {}.", "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.",
    "a origami {}.", "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.",
    "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.", "a photo of a nice {}.",
    "a photo of a weird {}.", "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.", "a sketch of the {}.",
    "a embroidered {}.", "a pixelated photo of a {}.", "itap of the {}.", "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.", "a plushie {}.", "a photo of the nice {}.", "a photo of the small {}.",
    "a photo of the weird {}.", "the cartoon {}.", "art of the {}.", "a drawing of the {}.",
    "a photo of the large {}.", "a black and white photo of a {}.", "the plushie {}.", "a dark photo of a {}.",
    "itap of a {}.", "graffiti of the {}.", "a toy {}.", "itap of my {}.", "a photo of a cool {}.",
    "a photo of a small {}.", "a tattoo of the {}.",
)


def templated(prompt: str) -> list[str]:
    """The prompt in every template, doubled articles removed as A&E does."""
    return [t.format(prompt).replace("a a", "a").replace("the a", "a") for t in IMAGENET_TEMPLATES]


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def prompt_embedding(template_embeddings: torch.Tensor) -> torch.Tensor:
    """[templates, d] text embeddings of one prompt -> its unit embedding [d]."""
    return unit(unit(template_embeddings.float()).mean(dim=0))


def similarity(embeddings: torch.Tensor, prompt_emb: torch.Tensor) -> torch.Tensor:
    """[n, d] image (full-prompt similarity) or caption (text-text similarity) embeddings and a
    prompt's [d] templated embedding -> [n] cosines."""
    return unit(embeddings.float()) @ prompt_emb


def min_object_similarity(image_embeddings: torch.Tensor, half_embs: list[torch.Tensor]) -> torch.Tensor:
    """[n] minimum over the prompt's halves of the image-half cosine."""
    return torch.stack([similarity(image_embeddings, h) for h in half_embs]).min(dim=0).values
