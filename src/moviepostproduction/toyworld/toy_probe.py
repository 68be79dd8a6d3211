"""How much of the toy world the frozen encoders' features carry: closed-form linear probes (ridge regression to
one-hot labels, fit on training-split features, scored on held-out-split features), so no head trained with
the encoders is involved and the number is deterministic.
"""

from __future__ import annotations

import torch

from moviepostproduction.encoders import ImageEmbeddings, ImageEncoder, TextEncoder
from moviepostproduction.toyworld.synthetic import HELDOUT_COMBOS
from moviepostproduction.toyworld.toy_data import ATTRIBUTES, IGNORE, CaptionPool, SpritePool

__all__ = ["caption_features", "image_features", "probe_accuracy", "probe_report"]

RIDGE = 1e-2  # relative to the mean feature energy


def probe_accuracy(
    x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor, classes: int
) -> float:
    """Accuracy of a ridge classifier: x (N, D) features, y (N,) labels in [0, classes)."""
    x_train, x_test = x_train.double(), x_test.double()
    mean, std = x_train.mean(0), x_train.std(0).clamp_min(1e-6)
    a = torch.cat([(x_train - mean) / std, torch.ones(len(x_train), 1, dtype=torch.float64)], 1)  # (N, D + 1)
    b = torch.cat([(x_test - mean) / std, torch.ones(len(x_test), 1, dtype=torch.float64)], 1)
    targets = torch.nn.functional.one_hot(y_train, classes).double()  # (N, K)
    gram = a.T @ a
    ridge = RIDGE * gram.diagonal().mean() * torch.eye(len(gram), dtype=gram.dtype)
    w = torch.linalg.solve(gram + ridge, a.T @ targets)  # (D + 1, K)
    return float(((b @ w).argmax(1) == y_test).double().mean())


@torch.no_grad()
def image_features(encoder: ImageEncoder, pool: SpritePool, batch: int = 256) -> ImageEmbeddings:
    """ImageEncoder's features of a pool's preprocessed pixels (the same modules and calls as `encode`)."""
    parts = []
    for c, d in zip(pool.clip_pixels.split(batch), pool.dino_pixels.split(batch), strict=True):
        out = encoder.dino(pixel_values=d.to(encoder.device, encoder.dtype))
        clip = encoder.clip(pixel_values=c.to(encoder.device, encoder.dtype)).image_embeds
        parts.append((clip.float().cpu(), out.pooler_output.float().cpu(), out.last_hidden_state[:, 1:].float().cpu()))
    return ImageEmbeddings(*(torch.cat(p) for p in zip(*parts, strict=True)))


@torch.no_grad()
def caption_features(encoder: TextEncoder, pool: CaptionPool, batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(CLIP pooled (N, D), T5 tokens (N, T, d)) of a caption pool, encoded by TextEncoder.encode."""
    pooled, tokens = [], []
    for start in range(0, len(pool), batch):
        emb = encoder.encode(pool.captions[start : start + batch], max_t5_tokens=pool.t5_ids.shape[1])
        pooled.append(emb.pooled.float().cpu())
        tokens.append(emb.t5.float().cpu())
    return torch.cat(pooled), torch.cat(tokens)


def _sprite_probes(train: SpritePool, test: SpritePool, f_train: ImageEmbeddings, f_test: ImageEmbeddings) -> dict:
    combos = torch.tensor(
        [(ATTRIBUTES["shape"][s], ATTRIBUTES["colour"][c]) in HELDOUT_COMBOS
         for s, c in zip(test.labels["shape"].tolist(), test.labels["colour"].tolist(), strict=True)]
    )  # fmt: skip
    out: dict[str, float] = {}
    for name, tr, te in (("clip", f_train.clip, f_test.clip), ("dino_cls", f_train.dino_cls, f_test.dino_cls)):
        for attr in ("colour", "shape", "pattern"):
            k = len(ATTRIBUTES[attr])
            out[f"{name}/{attr}"] = probe_accuracy(tr, train.labels[attr], te, test.labels[attr], k)
            if combos.any():  # unseen (shape, colour) pairs: compositional generalisation
                out[f"{name}/{attr}/unseen_combos"] = probe_accuracy(
                    tr, train.labels[attr], te[combos], test.labels[attr][combos], k
                )
    for attr in ("colour", "shape"):  # per patch, "none" included; scored on patches that show the sprite
        y_tr, y_te = train.patch_labels[attr].flatten(), test.patch_labels[attr].flatten()
        x_tr, x_te = f_train.dino_patches.flatten(0, 1), f_test.dino_patches.flatten(0, 1)
        shows = y_te < len(ATTRIBUTES[attr])
        out[f"dino_patch/{attr}"] = probe_accuracy(x_tr, y_tr, x_te[shows], y_te[shows], len(ATTRIBUTES[attr]) + 1)
    return out


def _caption_probes(train: CaptionPool, test: CaptionPool, f_train: tuple, f_test: tuple) -> dict:
    out = {"clip_text/background": probe_accuracy(
        f_train[0], train.labels["background"], f_test[0], test.labels["background"], len(ATTRIBUTES["background"])
    )}  # fmt: skip
    for attr in ("colour", "shape", "pattern", "depth"):  # T5 tokens inside sprite phrases
        y_tr, y_te = train.token_labels[attr].flatten(), test.token_labels[attr].flatten()
        keep_tr, keep_te = y_tr != IGNORE, (y_te != IGNORE) & (y_te < len(ATTRIBUTES[attr]))
        out[f"t5_token/{attr}"] = probe_accuracy(
            f_train[1].flatten(0, 1)[keep_tr], y_tr[keep_tr], f_test[1].flatten(0, 1)[keep_te], y_te[keep_te],
            len(ATTRIBUTES[attr]) + 1,
        )  # fmt: skip
    return out


def probe_report(
    image_encoder: ImageEncoder,
    text_encoder: TextEncoder,
    sprites: tuple[SpritePool, SpritePool],
    captions: tuple[CaptionPool, CaptionPool],
) -> dict[str, float]:
    """Held-out probe accuracies, keyed "<features>/<attribute>[/unseen_combos]"; pools are (train, held-out)."""
    f_sprites = [image_features(image_encoder, p) for p in sprites]
    f_captions = [caption_features(text_encoder, p) for p in captions]
    return {**_sprite_probes(*sprites, *f_sprites), **_caption_probes(*captions, *f_captions)}
