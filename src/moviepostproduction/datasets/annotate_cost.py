"""The per-image cost of each `mpp annotate` step at the real models' architectures (random init: the cost, not the
output), one forward on inputs of their processors' sizes; docs/training-data.md quotes it.

    python -m moviepostproduction.datasets.annotate_cost [--threads 1] [--device cpu]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

LABELS = 10  # text queries
BOXES = 10  # SAM prompts per image
CAPTION_TOKENS = 20


def timed(fn: Callable[[], object], device: str, repeats: int) -> float:
    """Seconds per call, after one warm-up call."""
    import torch

    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def _owlv2(device: str):
    """google/owlv2-base-patch16-ensemble: ViT-B/16 at 960 px (3600 patches); 16 CLIP text tokens per query."""
    import torch
    from transformers import Owlv2Config, Owlv2ForObjectDetection

    model = Owlv2ForObjectDetection(Owlv2Config(vision_config={"image_size": 960, "patch_size": 16}))
    ids = torch.randint(0, 49000, (LABELS, 16), device=device)
    ids[:, 0] = 49406  # the start token: OWL masks queries that begin with 0
    pixels = torch.randn(1, 3, 960, 960, device=device)
    return model, {"input_ids": ids, "pixel_values": pixels}


def _sam(device: str):
    """facebook/sam-vit-base: ViT-B at 1024 px, one mask per box."""
    import torch
    from transformers import SamConfig, SamModel

    boxes = [[[100.0 + 10 * i, 100.0, 400.0 + 10 * i, 500.0] for i in range(BOXES)]]
    inputs = {"pixel_values": torch.randn(1, 3, 1024, 1024, device=device), "multimask_output": False}
    return SamModel(SamConfig()), inputs | {"input_boxes": torch.tensor(boxes, device=device)}


def _depth_anything(device: str):
    """depth-anything/Depth-Anything-V2-Small-hf: DINOv2-S/14 at 518 px."""
    import torch
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

    stages = ["stage3", "stage6", "stage9", "stage12"]
    backbone = Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, image_size=518,
                            patch_size=14, out_features=stages, reshape_hidden_states=False)  # fmt: skip
    config = DepthAnythingConfig(backbone_config=backbone, neck_hidden_sizes=[48, 96, 192, 384], fusion_hidden_size=64)
    return DepthAnythingForDepthEstimation(config), {"pixel_values": torch.randn(1, 3, 518, 518, device=device)}


def _blip(device: str):
    """Salesforce/blip-image-captioning-base: ViT-B/16 at 384 px and a BERT-base decoder, greedy."""
    import torch
    from transformers import BlipConfig, BlipForConditionalGeneration

    inputs = {"pixel_values": torch.randn(1, 3, 384, 384, device=device), "do_sample": False}
    return BlipForConditionalGeneration(BlipConfig()), inputs | {
        "max_new_tokens": CAPTION_TOKENS,
        "min_new_tokens": CAPTION_TOKENS,
    }


STEPS = (
    (f"detector OWLv2-B/16, 960 px, {LABELS} labels", _owlv2),
    (f"segmenter SAM ViT-B, 1024 px, {BOXES} boxes", _sam),
    ("depth Depth Anything V2 Small, 518 px", _depth_anything),
    (f"captioner BLIP base, 384 px, {CAPTION_TOKENS} tokens", _blip),
)


def measure(device: str = "cpu", repeats: int = 2) -> list[tuple[str, float, float]]:
    """(step, millions of parameters, seconds per image) of each step; one model in memory at a time."""
    import torch

    rows = []
    for name, build in STEPS:
        torch.manual_seed(0)
        model, inputs = build(device)
        model = model.eval().to(device)
        run = model.generate if build is _blip else model
        with torch.inference_mode():
            seconds = timed(lambda run=run, inputs=inputs: run(**inputs), device, 1 if build is _blip else repeats)
        rows.append((name, sum(p.numel() for p in model.parameters()) / 1e6, seconds))
    return rows


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = measure(args.device)
    for name, millions, seconds in rows:
        print(f"{name:44s} {millions:6.1f} M parameters {seconds:8.3f} s / image")
    total = sum(r[2] for r in rows)
    print(f"total {total:.2f} s / image on {args.device}, {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
