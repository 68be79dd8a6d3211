"""Train the toy world's frozen parts once and write the toy model dir (scripts/train_toy_encoders.py).

1. A random-init toy dir is written and loaded with the real loaders, so training sees exactly the inference
   tokenizers and image preprocessing.
2. The VAE trains (toy_vae.py); its latent shift / scale are measured on training scenes.
3. The image and text encoders train together (toy_encoders.py).
4. The toy dir is written (toy_model.py), re-loaded with the real loaders and measured: VAE PSNR on held-out
   scenes, linear-probe accuracy of the frozen features on held-out sprites and captions (toy_probe.py), and one
   ComposePipeline image. Numbers go to REPORT/metrics.json and metrics.md, reconstructions to a PNG.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from moviepostproduction.encoders import ImageEncoder, TextEncoder, Vae
from moviepostproduction.errors import Problem, ValidationError
from moviepostproduction.files import write_json_atomic
from moviepostproduction.toyworld.tiny import write_tiny_model_dir
from moviepostproduction.toyworld.toy_data import build_caption_pool, build_sprite_pool, generate_scenes, scene_pixels
from moviepostproduction.toyworld.toy_encoders import EncoderTask, EncoderTrainConfig
from moviepostproduction.toyworld.toy_model import TOY_SPEC, write_toy_model_dir
from moviepostproduction.toyworld.toy_probe import probe_report
from moviepostproduction.toyworld.toy_vae import (
    VaeTask,
    VaeTrainConfig,
    latent_stats,
    psnr,
    reconstruct_uint8,
    reconstruction_grid,
)
from moviepostproduction.visualize import save_png

__all__ = ["ToyEncodersConfig", "train_toy_encoders"]

logger = logging.getLogger(__name__)


@dataclass
class ToyEncodersConfig:
    out: str  # the model dir to write (absent or empty, unless overwrite)
    report: str | None = None  # metrics, PNGs and trainer runs; default "<out>-report"
    seed: int = 0
    vae_steps: int = 600
    decoder_steps: int = 0  # then the decoder alone on the frozen encoder (0: none); LR cools down over its 2nd half
    encoder_steps: int = 800
    encoder_decay_steps: int = 0  # linear LR cooldown to 0 over the encoders' last n steps (0: constant LR)
    train_scenes: int = 2000  # training pool (scene indices 0 .. n-1 of the train split)
    heldout_scenes: int = 200  # evaluation (held-out split)
    probe_scenes: int = 500  # probe fit: the first n training scenes
    stats_scenes: int = 64  # latent statistics: the first n training scenes, full size
    overwrite: bool = False
    progress: bool = True
    vae: VaeTrainConfig = field(default_factory=VaeTrainConfig)
    encoders: EncoderTrainConfig = field(default_factory=EncoderTrainConfig)

    def __post_init__(self) -> None:
        counts = ("vae_steps", "encoder_steps", "train_scenes", "heldout_scenes", "probe_scenes", "stats_scenes")
        problems = [Problem(n, getattr(self, n), "must be >= 1") for n in counts if getattr(self, n) < 1]
        if self.decoder_steps < 0:
            problems.append(Problem("decoder_steps", self.decoder_steps, "must be >= 0"))
        if not 0 <= self.encoder_decay_steps <= self.encoder_steps:
            problems.append(Problem("encoder_decay_steps", self.encoder_decay_steps, "must be in [0, encoder_steps]"))
        if self.probe_scenes > self.train_scenes or self.stats_scenes > self.train_scenes:
            problems.append(Problem("probe_scenes", self.probe_scenes, f"must be <= train_scenes {self.train_scenes}"))
        if problems:
            raise ValidationError(problems, source="ToyEncodersConfig")

    @property
    def report_dir(self) -> Path:
        return Path(self.report) if self.report else Path(f"{self.out}-report")


def _train(task: Any, cfg: ToyEncodersConfig, stage: str, steps: int, decay_steps: int = 0) -> list[float]:
    from moviepostproduction.training.trainer import TrainConfig, Trainer

    run = TrainConfig(
        out_dir=str(cfg.report_dir / "runs" / task.name),
        stage=stage,
        max_steps=steps,
        decay_steps=decay_steps,
        seed=cfg.seed,
        log_every=max(1, steps // 50),
        checkpoint_every=max(1, steps // 4),  # a killed run resumes (exactly) from the last quarter
        keep_checkpoints=1,
        progress=cfg.progress,
    )
    return Trainer(task, run).run().losses


def _prepare_out(cfg: ToyEncodersConfig) -> Path:
    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise ValidationError([Problem("out", out, "is not empty (pass overwrite / --overwrite)")])
    return out


def _smoke_compose(model_dir: Path, scene: Any, folder: Path) -> Path:
    """One ComposePipeline image of a held-out scene (the transformer is untrained: proves loading only)."""
    from moviepostproduction.compose.pipeline import ComposePipeline
    from moviepostproduction.scene import scene_from_dict

    folder.mkdir(parents=True, exist_ok=True)
    refs = []
    for i, ref in enumerate(scene.refs):
        save_png(_pil(ref.image), folder / f"ref{i}.png")
        refs.append({"image": f"ref{i}.png", "bbox": list(ref.bbox), "depth": ref.depth, "caption": ref.caption})
    h, w = scene.labels.shape
    data = {"caption": scene.caption, "width": w, "height": h, "seed": 0, "refs": refs}
    pipe = ComposePipeline.from_model_dir(model_dir)
    image = pipe(scene_from_dict(data, base_dir=folder), num_inference_steps=4).images[0]
    return save_png(image, folder / "compose.png")


def _pil(array: Any) -> Any:
    from PIL import Image

    return Image.fromarray(array)


def roundtrip_scores(vae: Any, scenes: list) -> dict[str, float]:
    """`mpp eval`'s IoU and fg identity of the scenes themselves after a VAE round trip (encode, decode): the
    most any backbone that generates in this VAE's latent space can score on those scenes."""
    from moviepostproduction.toyworld.compose_eval import VariantScore, score_image

    score = VariantScore("vae round trip")
    images = reconstruct_uint8(vae, scene_pixels(scenes)).permute(0, 2, 3, 1).numpy()  # (N, H, W, 3)
    for image, toy in zip(images, scenes, strict=True):
        score_image(score, image, toy)
    row = score.row()
    return {"iou": row["IoU"], "fg_identity": row["fg identity"], "refs": row["refs"]}


def _markdown(metrics: dict[str, Any]) -> str:
    lines = ["# Toy encoders: measured numbers", "", f"Command: `{metrics['command']}`", ""]
    lines += [
        f"- wall time: {metrics['wall_s']:.0f} s",
        f"- VAE held-out PSNR: {metrics['vae']['psnr_heldout_db']:.2f} dB",
        f"- VAE round trip of the held-out scenes scored as `mpp eval` scores generations: IoU "
        f"{metrics['vae']['roundtrip']['iou']:.3f}, fg identity {metrics['vae']['roundtrip']['fg_identity']:.3f} "
        f"({metrics['vae']['roundtrip']['refs']} refs)",
    ]
    stats = metrics["vae"]
    lines += [
        f"- latent shift_factor {stats['shift_factor']:.4f}, scaling_factor {stats['scaling_factor']:.4f}; normalised"
        f" held-out latents: mean {stats['heldout_latent_mean']:.3f}, std {stats['heldout_latent_std']:.3f}"
    ]
    lines += ["", "| features / attribute | held-out probe accuracy |", "|---|---|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in metrics["probes"].items()]
    return "\n".join(lines) + "\n"


def train_toy_encoders(cfg: ToyEncodersConfig, command: str = "") -> dict[str, Any]:
    """Train, write cfg.out and the report; returns the metrics (also in REPORT/metrics.json)."""
    start = time.time()
    out, report = _prepare_out(cfg), cfg.report_dir
    report.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="toy-init-") as tmp:
        init = write_tiny_model_dir(Path(tmp) / "init", seed=cfg.seed, spec=TOY_SPEC)
        text, image, vae = TextEncoder.load(init), ImageEncoder.load(init), Vae.load(init)

    logger.info("generating %d training and %d held-out scenes", cfg.train_scenes, cfg.heldout_scenes)
    train = generate_scenes(cfg.seed, cfg.train_scenes, "train")
    heldout = generate_scenes(cfg.seed, cfg.heldout_scenes, "heldout")
    preview = scene_pixels(heldout[:6])

    vae_losses = _train(VaeTask(vae.model, scene_pixels(train), cfg.vae, preview), cfg, "vae", cfg.vae_steps)
    vae.model.eval()
    stats = latent_stats(vae.model, scene_pixels(train[: cfg.stats_scenes]))
    vae.model.register_to_config(scaling_factor=stats.scaling_factor, shift_factor=stats.shift_factor)
    if cfg.decoder_steps:  # the encoder is frozen from here: latents (and the stats above) stay as they are
        decoder_task = VaeTask(vae.model, scene_pixels(train), cfg.vae, preview, name="toy_vae_decoder")
        vae_losses += _train(decoder_task, cfg, "decoder", cfg.decoder_steps, decay_steps=cfg.decoder_steps // 2)
        vae.model.eval()

    t5_tokens = max(cfg.encoders.t5_lengths)
    sprites = build_sprite_pool(train, image.clip_pre, image.dino_pre, TOY_SPEC.patch_size)
    captions = build_caption_pool(train, text.clip_tokenizer, text.t5_tokenizer, t5_tokens)
    encoders = {"clip_vision": image.clip, "dino": image.dino, "clip_text": text.clip, "t5": text.t5}
    task = EncoderTask(encoders, text.clip_tokenizer, sprites, captions, cfg.encoders)
    enc_losses = _train(task, cfg, "encoders", cfg.encoder_steps, decay_steps=cfg.encoder_decay_steps)

    trained = {"vae": vae.model, "text_encoder": text.clip, "text_encoder_2": text.t5,
               "image_encoders/clip": image.clip, "image_encoders/dino": image.dino}  # fmt: skip
    for module in trained.values():
        module.requires_grad_(False).eval()
    staging = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    write_toy_model_dir(staging, trained, seed=cfg.seed)
    if out.exists():
        shutil.rmtree(out)
    os.replace(staging, out)
    logger.info("wrote toy model dir %s", out)

    # Everything below measures the dir as written, through the real loaders.
    vae_l = Vae.load(out)
    held_px = scene_pixels(heldout)
    held_stats = latent_stats(vae_l.model, held_px)
    save_png(reconstruction_grid(vae_l.model, held_px[:8]), report / "vae_reconstructions.png")
    image_l, text_l = ImageEncoder.load(out), TextEncoder.load(out)
    probe_train = train[: cfg.probe_scenes]
    probes = probe_report(
        image_l,
        text_l,
        (build_sprite_pool(probe_train, image_l.clip_pre, image_l.dino_pre, TOY_SPEC.patch_size),
         build_sprite_pool(heldout, image_l.clip_pre, image_l.dino_pre, TOY_SPEC.patch_size)),
        (build_caption_pool(probe_train, text_l.clip_tokenizer, text_l.t5_tokenizer, t5_tokens),
         build_caption_pool(heldout, text_l.clip_tokenizer, text_l.t5_tokenizer, t5_tokens)),
    )  # fmt: skip
    compose_png = _smoke_compose(out, heldout[0], report / "compose_smoke")
    metrics = {
        "command": command,
        "model_dir": str(out),
        "config": {k: v for k, v in asdict(cfg).items() if k not in ("out", "report")},
        "wall_s": time.time() - start,
        "vae": {
            "psnr_heldout_db": psnr(vae_l.model, held_px),
            "roundtrip": roundtrip_scores(vae_l.model, heldout),
            "shift_factor": stats.shift_factor,
            "scaling_factor": stats.scaling_factor,
            # (mode - shift) * scale over held-out scenes: ~ (0, 1) when the factors transfer
            "heldout_latent_mean": (held_stats.mean - stats.mean) / stats.std,
            "heldout_latent_std": held_stats.std / stats.std,
            "final_loss": vae_losses[-1],
        },
        "encoders": {"final_loss": enc_losses[-1]},
        "probes": probes,
        "compose_smoke": str(compose_png),
    }
    write_json_atomic(metrics, report / "metrics.json")
    (report / "metrics.md").write_text(_markdown(metrics))
    logger.info("metrics: %s", json.dumps(metrics["probes"]))
    return metrics
