"""The frozen encoders of a feature-cache build: one copy each, in the building process, on `cache_device`.

`mpp train --cache-device auto|cpu|cuda[:N]` (recipe `cache_device`): auto is the first CUDA device when torch sees
one. On CUDA the encoders run in bf16 (T5-XXL 9.5 GB, not the 19 GB of fp32 on the CPU), and the features are stored
in bf16 as computed; on the CPU they run in fp32 and are stored in fp16 (`feature_cache.storage_dtype`).
"""

from __future__ import annotations

import torch

from moviepostproduction.devices import DTYPES, resolve_dtype
from moviepostproduction.training.feature_cache import storage_dtype


class CacheEncoders:
    """One copy of each frozen encoder for the cache build, each loaded on first use on `device` in bf16 on CUDA
    (fp32 on the CPU, where bf16 matmuls are slow), so a run whose caches exist loads none of them."""

    def __init__(self, model_dir, device: str):
        self.model_dir, self.device = model_dir, device
        self.dtype = resolve_dtype("auto", device)
        self.loaded: dict[str, torch.nn.Module] = {}

    @classmethod
    def wrap(cls, text_encoder, image_encoder, vae) -> CacheEncoders:
        """Encoders already loaded (they share one device and dtype)."""
        encoders = cls("", str(vae.device))
        encoders.dtype = vae.dtype
        encoders.loaded = {"text": text_encoder, "image": image_encoder, "vae": vae}
        return encoders

    @property
    def info(self) -> dict[str, str]:
        return {"device": self.device, "dtype": str(self.dtype).removeprefix("torch.")}

    def _get(self, name: str) -> torch.nn.Module:
        if name not in self.loaded:
            from moviepostproduction.encoders import ImageEncoder, TextEncoder, Vae

            cls = {"text": TextEncoder, "image": ImageEncoder, "vae": Vae}[name]
            self.loaded[name] = cls.load(self.model_dir, dtype=self.dtype, device=self.device)
        return self.loaded[name]

    @property
    def text(self):
        return self._get("text")

    @property
    def image(self):
        return self._get("image")

    @property
    def vae(self):
        return self._get("vae")


@torch.no_grad()
def empty_caption_features(encoders: CacheEncoders, max_text_tokens: int, cache) -> tuple[torch.Tensor, torch.Tensor]:
    """True CFG's negative prompt "" as ComposePipeline.prepare encodes it: (T5 (1, T, d), pooled (1, d)) float32 on
    the CPU, T5 rounded through the dtype `cache` stores it in, as the cached captions are."""
    empty = encoders.text.encode([""], max_text_tokens)
    stored = storage_dtype(DTYPES.get(cache.info.get("dtype", "fp32"), torch.float32))
    return empty.t5.to(stored).float().cpu(), empty.pooled.float().cpu()
