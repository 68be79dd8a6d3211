"""Print the LoRA figures of docs/lora.md: ComposePipeline against diffusers' FluxPipeline with the same LoRA file.

    .venv/bin/python scripts/lora_parity.py [--cache DIR]

A tiny random FLUX dir (toyworld/tiny.py), LoRA files written the way tests/test_lora.py writes them (diffusers
keys on every linear layer, a kohya file over the blocks), 3 steps from the same packed latents, fp32, CPU.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))

from diffusers import FluxPipeline  # noqa: E402

import test_lora as t  # noqa: E402 - the tests' LoRA file writers
from moviepostproduction.compose.pipeline import ComposePipeline  # noqa: E402
from moviepostproduction.toyworld.tiny import tiny_random_model_dir  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=None, help="Where the tiny dir is built (default: the package cache).")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    tiny = tiny_random_model_dir(args.cache)
    folder = Path(tempfile.mkdtemp(prefix="lora-parity-"))
    transformer = ComposePipeline.from_model_dir(tiny).model.transformer
    linears = [n for n, m in transformer.named_modules() if isinstance(m, nn.Linear)]
    files = {
        "a": t.save(t.diffusers_lora(transformer, linears, seed=1), folder / "a.safetensors"),
        "b": t.save(t.diffusers_lora(transformer, linears[::2], seed=2), folder / "b.safetensors"),
        "kohya": t.save(t.kohya_lora(transformer, seed=3), folder / "kohya.safetensors"),
    }
    latents = torch.randn(1, 16, 64, generator=torch.Generator().manual_seed(0))

    def pair():
        return ComposePipeline.from_model_dir(tiny), FluxPipeline.from_pretrained(tiny, local_files_only=True)

    def gap(x, y) -> str:
        return f"{float((x - y).abs().max()):.1e}"

    for name in ("a", "kohya"):
        pipe, flux = pair()
        pipe.load_lora_weights(files[name])
        flux.load_lora_weights(str(files[name]))
        print(f"{name}: max abs diff to FluxPipeline {gap(t.ours(pipe, latents), t.theirs(flux, pipe, latents))}")
    pipe, flux = pair()
    for name in ("a", "b"):
        pipe.load_lora_weights(files[name], adapter_name=name)
        flux.load_lora_weights(str(files[name]), adapter_name=name)
    pipe.set_adapters(["a", "b"], [0.7, -0.4])
    flux.set_adapters(["a", "b"], [0.7, -0.4])
    print(f"set_adapters a 0.7, b -0.4: {gap(t.ours(pipe, latents), t.theirs(flux, pipe, latents))}")
    pipe = ComposePipeline.from_model_dir(tiny)
    base = t.ours(pipe, latents)
    pipe.load_lora_weights(files["a"], adapter_name="a")
    pipe.set_adapters("a", 0.8)
    unfused = t.ours(pipe, latents)
    pipe.fuse_lora()
    print(f"fused against unfused: {gap(t.ours(pipe, latents), unfused)}")
    pipe.unfuse_lora()
    print(f"unfused again against unfused: {gap(t.ours(pipe, latents), unfused)}")
    pipe.unload_lora_weights()
    print(f"unloaded (after fuse + unfuse) against base: {gap(t.ours(pipe, latents), base)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
