"""The models `mpp annotate` runs, each from a local transformers folder: a zero-shot object detector (OWLv2,
OWL-ViT, Grounding DINO), SAM prompted with each box, and an optional image captioner (BLIP, BLIP-2, GIT, a
VisionEncoderDecoder). The depth model is `depth_rule.DepthModel`.

Every folder is checked before anything loads: a folder, a config.json of a model type this step can run, weights in
safetensors (a pickled .bin is never loaded: `use_safetensors=True`), no download (`local_files_only=True`). Each
refusal is one line naming the flag and the path. Models run in fp32 in eval mode under `torch.inference_mode`.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from moviepostproduction.errors import MppError, one_line, shown_path

DETECTORS = ("owlv2", "owlvit", "grounding-dino", "mm-grounding-dino")  # their processors take text=[[labels]]
SEGMENTERS = ("sam",)
CAPTIONERS = ("blip", "blip-2", "git", "vision-encoder-decoder")  # caption an image with no text prompt
CAPTION_TOKENS = 40  # new tokens per caption (BLIP's captions are ~10)


@dataclass(frozen=True)
class Detection:
    """One box the detector found: its query label, score in [0, 1] and pixel corners (x0, y0, x1, y1)."""

    label: str
    score: float
    box: tuple[float, float, float, float]


@contextmanager
def quiet_loading() -> Iterator[None]:
    """transformers' per-file "Loading weights" bars off while the models load (annotate shows one bar, of images)."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _refuse(flag: str, folder: Path, message: str) -> MppError:
    return MppError(f"{flag} {shown_path(folder)}: {one_line(message, 300)}")


def _model_type(flag: str, folder: Path, kinds: tuple[str, ...], what: str) -> str:
    """The folder's config model type, once the folder, its config.json and safetensors weights are there."""
    from transformers import AutoConfig

    if not folder.is_dir():
        raise _refuse(flag, folder, f"not a folder (expected a local {what} model folder)")
    if not (folder / "config.json").is_file():
        raise _refuse(flag, folder, f"no config.json (expected a local transformers {what} model folder)")
    if not any(folder.glob("*.safetensors")):
        raise _refuse(flag, folder, "no .safetensors weights (pickled .bin weights are never loaded)")
    try:
        model_type = AutoConfig.from_pretrained(folder, local_files_only=True).model_type
    except (OSError, ValueError, KeyError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise _refuse(flag, folder, f"cannot read config.json ({reason})") from None
    if model_type.replace("_", "-") not in kinds:
        raise _refuse(flag, folder, f"is a {model_type!r} model; {flag} takes {what} models ({', '.join(kinds)})")
    return model_type.replace("_", "-")


def _load(flag: str, folder: Path, model_class, device: str):
    """(model on `device` in eval mode, its processor) or one line naming the flag and the folder."""
    from transformers import AutoProcessor

    try:
        model = model_class.from_pretrained(folder, local_files_only=True, use_safetensors=True)
        processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise _refuse(flag, folder, f"cannot load the model ({reason})") from None
    return model.to(device).eval(), processor


class LocalModel:
    """A transformers model + processor from a local folder, checked first (`_model_type`): the base of each step."""

    KINDS: tuple[str, ...] = ()
    WHAT = ""

    def __init__(self, folder: str | Path, device: str, flag: str, model_class):
        folder = Path(folder)
        self.kind = _model_type(flag, folder, self.KINDS, self.WHAT)
        self.model, self.processor = _load(flag, folder, model_class, device)
        self.device, self.name = device, folder.name


class Detector(LocalModel):
    """Zero-shot object detection: one forward pass per image for all the text queries."""

    KINDS, WHAT = DETECTORS, "zero-shot object detection"

    def __init__(self, folder: str | Path, device: str = "cpu", flag: str = "--detector"):
        from transformers import AutoModelForZeroShotObjectDetection

        super().__init__(folder, device, flag, AutoModelForZeroShotObjectDetection)
        # Grounding DINO's post-processing matches boxes to phrases through the token ids; OWL's does not take them.
        post = inspect.signature(self.processor.post_process_grounded_object_detection)
        self._wants_ids = "input_ids" in post.parameters

    def detect(self, image: Image.Image, labels: list[str], threshold: float) -> list[Detection]:
        """Boxes scoring above `threshold`, clipped to the image (empty ones dropped), best first."""
        import torch

        inputs = self.processor(images=image, text=[labels], return_tensors="pt").to(self.device)
        with torch.inference_mode():
            outputs = self.model(**inputs)
        extra = {"input_ids": inputs["input_ids"], "text_threshold": threshold} if self._wants_ids else {}
        result = self.processor.post_process_grounded_object_detection(
            outputs, threshold=threshold, target_sizes=[(image.height, image.width)], text_labels=[labels], **extra
        )[0]
        names = result.get("text_labels") or [labels[int(i)] for i in result["labels"]]
        found = []
        for name, score, box in zip(names, result["scores"].tolist(), result["boxes"].tolist(), strict=True):
            x0, y0 = min(max(box[0], 0.0), image.width), min(max(box[1], 0.0), image.height)
            x1, y1 = min(max(box[2], 0.0), image.width), min(max(box[3], 0.0), image.height)
            if x1 - x0 >= 1 and y1 - y0 >= 1 and str(name).strip():
                found.append(Detection(str(name).strip(), float(score), (x0, y0, x1, y1)))
        return sorted(found, key=lambda d: -d.score)


class Segmenter(LocalModel):
    """SAM prompted with boxes: one image embedding per image, one mask per box (`multimask_output=False`)."""

    KINDS, WHAT = SEGMENTERS, "SAM mask generation"

    def __init__(self, folder: str | Path, device: str = "cpu", flag: str = "--segmenter"):
        from transformers import SamModel

        super().__init__(folder, device, flag, SamModel)

    def masks(self, image: Image.Image, boxes: list[tuple[float, float, float, float]]) -> np.ndarray:
        """(K, H, W) bool: the mask of each of the K pixel boxes, at the image's size."""
        import torch

        if not boxes:
            return np.zeros((0, image.height, image.width), dtype=bool)
        inputs = self.processor(images=image, input_boxes=[[list(b) for b in boxes]], return_tensors="pt")
        inputs = inputs.to(self.device)
        with torch.inference_mode():
            outputs = self.model(**inputs, multimask_output=False)  # pred_masks (1, K, 1, h, w) logits
        masks = self.processor.post_process_masks(
            outputs.pred_masks.cpu(), inputs["original_sizes"].cpu(), inputs["reshaped_input_sizes"].cpu()
        )[0]  # (K, 1, H, W) bool
        return masks[:, 0].numpy().astype(bool)


class Captioner(LocalModel):
    """An image captioner run with no text prompt (greedy decoding, at most CAPTION_TOKENS new tokens)."""

    KINDS, WHAT = CAPTIONERS, "image captioning"

    def __init__(self, folder: str | Path, device: str = "cpu", flag: str = "--captioner"):
        from transformers import AutoModelForImageTextToText

        super().__init__(folder, device, flag, AutoModelForImageTextToText)

    def caption(self, image: Image.Image) -> str:
        """The caption, stripped ("" when the model said nothing)."""
        import torch

        inputs = self.processor(images=image, return_tensors="pt").to(self.device)
        with torch.inference_mode():
            ids = self.model.generate(**inputs, max_new_tokens=CAPTION_TOKENS, do_sample=False)
        return " ".join(self.processor.batch_decode(ids, skip_special_tokens=True)[0].split())
