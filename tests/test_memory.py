"""Memory (issue 41, item 4): CPU offload with our block loop, quantized base weights, VAE tiling, the pre-flight
count of what is loaded. On a CPU the execution device is the CPU: offload is checked by where accelerate keeps
the weights (sequential: the meta device between their forwards), by which components the model-offload hooks hold
resident at each step, and by outputs equal to the pipeline without offload."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from moviepostproduction.compose.flux import ConditionedFlux
from moviepostproduction.compose.pipeline import ComposePipeline
from moviepostproduction.encoders import TextEncoder, load_transformer
from moviepostproduction.encoders.offload import compute_dtype, enable_offload, execution_device
from moviepostproduction.encoders.quantize import quantization_config
from moviepostproduction.errors import ValidationError
from moviepostproduction.resources import ModelDims
from moviepostproduction.toyworld.tiny import write_tiny_model_dir

from helpers import example_scene, randomize_zero_inits

REFS = [
    ("refs/red_circle.png", (0.1, 0.2, 0.6, 0.9), "fg", "a red circle"),
    ("refs/blue_square.png", (0.4, 0.1, 0.9, 0.6), "bg", "a blue square"),
]
CAPTION = "a red circle and a blue square"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return write_tiny_model_dir(tmp_path_factory.mktemp("memory") / "tiny", seed=0)


def fresh_pipe(model_dir: Path) -> ComposePipeline:
    """A pipeline whose adapter acts (zero-init branches randomised, the same way every time)."""
    pipe = ComposePipeline.from_model_dir(model_dir)
    randomize_zero_inits(pipe.model.adapter)
    return pipe


def generate(pipe: ComposePipeline, refs=REFS) -> torch.Tensor:
    scene = example_scene(CAPTION, (64, 48), refs)
    return pipe(scene, num_inference_steps=2, output_type="pt", seed=0).images


@pytest.fixture(scope="module")
def resident_outputs(model_dir) -> dict[str, torch.Tensor]:
    pipe = fresh_pipe(model_dir)
    return {"refs": generate(pipe), "plain": generate(pipe, refs=[])}


def watch_transformer(pipe: ComposePipeline, record) -> None:
    """Call `record()` whenever the first double block's attention runs (ConditionedFlux calls the block's own
    submodules, never the block's forward)."""
    pipe.model.transformer.transformer_blocks[0].attn.register_forward_pre_hook(lambda module, args: record())


# ------------------------------------------------------------------------------------------------ offload
def test_model_offload_equals_resident_with_one_component_at_a_time(model_dir, resident_outputs):
    pipe = fresh_pipe(model_dir)
    offload = enable_offload(pipe, "model", "cpu")
    during = []
    watch_transformer(pipe, lambda: during.append(offload.resident()))
    assert offload.resident() == []  # every component starts on the offload device
    out = generate(pipe)
    assert torch.equal(out, resident_outputs["refs"])
    # the hook on ConditionedFlux fired (its block loop never calls transformer.forward) and sent the text and image
    # encoders back first; the VAE decoded last and stays until released
    assert during and all(seen == ["transformer"] for seen in during)
    assert offload.resident() == ["vae"]
    offload.release()
    assert offload.resident() == []
    assert torch.equal(generate(pipe), resident_outputs["refs"])  # the second call reloads what it needs


def test_sequential_offload_keeps_weights_on_meta_outside_their_forward(model_dir, resident_outputs):
    pipe = fresh_pipe(model_dir)
    enable_offload(pipe, "sequential", "cpu")
    t5 = pipe.text_encoder.t5
    block = pipe.model.transformer.transformer_blocks[0]
    during = []
    watch_transformer(pipe, lambda: during.append((t5.shared.weight.device.type, block.attn.to_q.weight.device.type)))

    def devices() -> set[str]:
        parts = (pipe.model.transformer, t5, pipe.text_encoder.clip, pipe.image_encoder.clip, pipe.vae.model)
        return {p.device.type for part in parts for p in part.parameters()}

    assert devices() == {"meta"}
    assert execution_device(pipe) == torch.device("cpu") == pipe.text_encoder.device  # inputs go where it computes
    assert torch.equal(generate(pipe, refs=[]), resident_outputs["plain"])
    # with refs, Assemble-Attn's two output projections run one after the other on hooked linears (fused when the
    # weights are plain tensors): rounding only
    assert (generate(pipe) - resident_outputs["refs"]).abs().max() <= 1e-5
    assert during and set(during) == {("meta", "meta")}  # T5 off while the transformer runs; weights in per leaf
    assert devices() == {"meta"}  # back after the calls
    assert next(pipe.model.adapter.parameters()).device.type == "cpu"  # the adapter stays on the execution device


@pytest.mark.parametrize("mode", ["model", "sequential"])
def test_fill_with_refs_offloads_too(model_dir, tmp_path, mode):
    """FillPipeline: FillFlux's hook moves the shared transformer; the VAE encodes the plate before the text."""
    import numpy as np

    from moviepostproduction.fill.pipeline import FillPipeline
    from moviepostproduction.fill.weights import write_fill_model_dir

    fill_dir = write_fill_model_dir(model_dir, tmp_path / "fill", seed=0)
    plate = np.random.default_rng(1).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    shutil.copytree(Path(__file__).resolve().parents[1] / "examples" / "refs", tmp_path / "refs")
    ref = {"image": "refs/red_circle.png", "bbox": [0.25, 0.25, 0.75, 0.75], "depth": "fg"}
    (tmp_path / "scene.json").write_text(
        json.dumps({"caption": "a red circle", "width": 48, "height": 32, "refs": [ref]})
    )

    def run(pipe: FillPipeline) -> torch.Tensor:
        out = pipe(plate, scene=tmp_path / "scene.json", num_inference_steps=2, max_text_tokens=8, output_type="pt")
        return out.images

    want = run(FillPipeline.from_model_dir(fill_dir, refs=True))
    pipe = FillPipeline.from_model_dir(fill_dir, refs=True)
    enable_offload(pipe, mode, "cpu")
    assert (run(pipe) - want).abs().max() <= (0 if mode == "model" else 1e-5)


@pytest.mark.parametrize("mode", ["model", "sequential"])
def test_panorama_offloads_its_plain_transformer_and_circular_vae(model_dir, mode):
    from moviepostproduction.panorama.pipeline import PanoramaPipeline

    def run(pipe: PanoramaPipeline) -> torch.Tensor:
        cfg = pipe.transformer.config
        gen = torch.Generator().manual_seed(0)
        text = torch.randn(1, 4, cfg.joint_attention_dim, generator=gen)
        pooled = torch.randn(1, cfg.pooled_projection_dim, generator=gen)
        return pipe(prompt_embeds=text, pooled_prompt_embeds=pooled, height=32, seed=0, num_inference_steps=2).images

    want = run(PanoramaPipeline.from_model_dir(model_dir))
    pipe = PanoramaPipeline.from_model_dir(model_dir)
    enable_offload(pipe, mode, "cpu")
    assert torch.equal(run(pipe), want)


@pytest.mark.parametrize("mode", ["model", "sequential"])
def test_everything_a_pipeline_reads_names_the_execution_device(model_dir, tmp_path, mode):
    """With "meta" as the execution device (nothing runs), every device a pipeline and prepare_scene read is it:
    the pipeline's, each encoder wrapper's, and the ConditionedFlux inside FillFlux (the hook is on FillFlux)."""
    from moviepostproduction.fill.pipeline import FillPipeline
    from moviepostproduction.fill.weights import write_fill_model_dir

    compose = fresh_pipe(model_dir)
    fill = FillPipeline.from_model_dir(write_fill_model_dir(model_dir, tmp_path / "fill", seed=0), refs=True)
    meta = torch.device("meta")
    for pipe in (compose, fill):
        enable_offload(pipe, mode, meta)
        assert pipe.device == meta == pipe.vae.device == pipe.text_encoder.device == pipe.image_encoder.device
    assert execution_device(fill.model.conditioned) == meta == execution_device(compose.model)
    assert compute_dtype(fill.model.conditioned) == torch.float32 == fill.dtype


def test_offload_mode_is_checked(model_dir):
    with pytest.raises(ValidationError, match=r"^offload: must be one of model, sequential \(got 'layer'\)$"):
        enable_offload(fresh_pipe(model_dir), "layer", "cpu")


# ---------------------------------------------------------------------------------------------- quantized
def int8_pipe(model_dir: Path) -> ComposePipeline:
    """The tiny pipeline with its transformer and T5 quantized int8 weight-only (torchao)."""
    config = quantization_config("int8", device="cpu", compute_dtype=torch.float32)
    transformer = load_transformer(model_dir, torch.float32, quantization_config=config)
    text = TextEncoder.load(model_dir, t5_quantization_config=quantization_config("int8", target="t5", device="cpu"))
    reference = fresh_pipe(model_dir)
    return ComposePipeline(
        ConditionedFlux(transformer, reference.model.adapter), text, reference.image_encoder, reference.vae
    )


def test_int8_weight_only_runs_with_refs_close_to_fp32(model_dir, resident_outputs):
    pytest.importorskip("torchao")
    config = quantization_config("int8", device="cpu", compute_dtype=torch.float32)
    transformer = load_transformer(model_dir, torch.float32, quantization_config=config)
    linear = transformer.transformer_blocks[0].attn.to_out[0]
    assert type(linear.weight).__name__ == "Int8Tensor"  # Assemble-Attn's output projection is quantized too
    t5_config = quantization_config("int8", target="t5", device="cpu")
    text = TextEncoder.load(model_dir, t5_quantization_config=t5_config)
    assert type(text.t5.encoder.block[0].layer[0].SelfAttention.q.weight).__name__ == "Int8Tensor"
    reference = fresh_pipe(model_dir)
    pipe = ComposePipeline(
        ConditionedFlux(transformer, reference.model.adapter), text, reference.image_encoder, reference.vae
    )
    assert compute_dtype(pipe.model) == torch.float32 == pipe.dtype
    out = generate(pipe)
    assert torch.isfinite(out).all()
    assert (out - resident_outputs["refs"]).abs().max() <= 0.05  # measured 0.0071 (pixels in [0, 1])


@pytest.mark.parametrize("mode", ["model", "sequential"])
def test_offload_of_int8_weights_equals_resident(model_dir, mode):
    pytest.importorskip("torchao")
    resident = generate(int8_pipe(model_dir))
    pipe = int8_pipe(model_dir)
    enable_offload(pipe, mode, "cpu")
    assert torch.equal(generate(pipe), resident)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("nf4", r"^quantize: needs a CUDA device \(bitsandbytes through diffusers\), not cpu; use int8 on cpu"),
        ("fp8", r"^quantize: needs a CUDA device of compute capability >= 8.9, not cpu; use int8"),
        ("int4", r"^quantize: must be one of nf4, int8, fp8 \(got 'int4'\)$"),
    ],
)
def test_quantization_refusals_are_one_line(spec, message):
    if spec != "int4":
        pytest.importorskip({"nf4": "bitsandbytes", "fp8": "torchao"}[spec])
    with pytest.raises(ValidationError, match=message):
        quantization_config(spec, device="cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="nf4 loads through bitsandbytes, which diffusers runs on GPU")
def test_nf4_transformer_runs_with_refs(model_dir, resident_outputs):
    config = quantization_config("nf4", device="cuda", compute_dtype=torch.float32)
    transformer = load_transformer(model_dir, torch.float32, quantization_config=config)
    assert compute_dtype(transformer) == torch.float32  # the 4-bit weights are uint8
    reference = fresh_pipe(model_dir)
    pipe = ComposePipeline(
        ConditionedFlux(transformer, reference.model.adapter.cuda()),
        reference.text_encoder.cuda(),
        reference.image_encoder.cuda(),
        reference.vae.cuda(),
    )
    out = generate(pipe).cpu()
    assert torch.isfinite(out).all() and (out - resident_outputs["refs"]).abs().max() <= 0.1


# ------------------------------------------------------------------------------------------------- tiling
def test_vae_tiling_exact_up_to_the_tile_and_close_above(model_dir):
    pipe = fresh_pipe(model_dir)
    vae = pipe.vae
    tile = vae.model.config.sample_size // vae.downsample  # latent side of one tile
    gen = torch.Generator().manual_seed(0)
    small, large = (torch.randn(1, vae.latent_channels, s, s, generator=gen) for s in (tile, 2 * tile))
    plain = vae.decode(small), vae.decode(large)
    assert vae.enable_tiling() is vae and vae.model.use_tiling
    tiled = vae.decode(small), vae.decode(large)
    assert torch.equal(tiled[0], plain[0])
    assert tiled[1].shape == plain[1].shape and not torch.equal(tiled[1], plain[1])  # blended tiles
    vae.enable_tiling(False)
    assert torch.equal(vae.decode(large), plain[1])


# ---------------------------------------------------------------------------------------------- pre-flight
COMPOSE = ("transformer", "vae", "text_encoder", "text_encoder_2", "image_encoders", "adapter")


@pytest.fixture(scope="module")
def hub_copy(model_dir, tmp_path_factory) -> Path:
    """The tiny dir as a hub download: the transformer in bf16, sharded with an index; root single-file copies."""
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("hub") / "flux"
    shutil.copytree(model_dir, root)
    folder = root / "transformer"
    state = {k: v.to(torch.bfloat16) for k, v in load_file(folder / "diffusion_pytorch_model.safetensors").items()}
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    keys = sorted(state)
    shards = {f"diffusion_pytorch_model-0000{i + 1}-of-00002.safetensors": keys[i::2] for i in range(2)}
    for name, part in shards.items():
        save_file({k: state[k] for k in part}, folder / name)
    weight_map = {k: name for name, part in shards.items() for k in part}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    save_file(state, root / "flux1-dev.safetensors")  # the root single-file duplicates the loaders never read
    shutil.copy(root / "vae" / "diffusion_pytorch_model.safetensors", root / "ae.safetensors")
    return root


def weights(root: Path, dtype: torch.dtype = torch.float32, **kwargs) -> int:
    return ModelDims.from_model_dir(root, dtype, **{"components": COMPOSE, **kwargs}).weights_bytes


def test_preflight_counts_each_loaded_tensor_once_at_the_loaded_dtype(model_dir, hub_copy):
    from moviepostproduction.encoders.weight_files import component_bytes

    transformer = load_transformer(model_dir)
    values = sum(p.numel() for p in transformer.parameters())
    # bf16 shards loaded in fp32 count 4 bytes a value, the index's files once, the root duplicates not at all
    assert component_bytes(hub_copy, ["transformer"], 4) == {"transformer": 4 * values}
    assert weights(hub_copy) == weights(model_dir)  # the same tensors in fp32 files, one file, no duplicates
    assert weights(hub_copy, torch.bfloat16) == weights(model_dir, torch.bfloat16) == weights(model_dir) // 2
    assert weights(hub_copy, components=None) == weights(model_dir, components=None)  # every folder, root skipped


def test_preflight_counts_quantized_weights_and_what_offload_keeps(model_dir):
    from moviepostproduction.encoders.weight_files import component_bytes

    transformer = load_transformer(model_dir)
    matrices = sum(p.numel() for n, p in transformer.named_parameters() if p.ndim == 2 and n.endswith("weight"))
    rest = sum(p.numel() for p in transformer.parameters()) - matrices
    sizes = component_bytes(model_dir, COMPOSE, 2, {"transformer": 0.5 + 4 / 64})
    assert sizes["transformer"] == int(matrices * (0.5 + 4 / 64) + rest * 2)  # nf4: 4 bits + an fp32 absmax per 64
    assert set(sizes) == {"transformer", "vae", "text_encoder", "text_encoder_2", "image_encoders/clip",
                          "image_encoders/dino", "adapter"}  # fmt: skip
    quantized = weights(model_dir, torch.bfloat16, quantize={"transformer": "nf4"})
    assert quantized == sum(sizes.values())
    moving = max(v for k, v in sizes.items() if k != "adapter")
    assert (
        weights(model_dir, torch.bfloat16, quantize={"transformer": "nf4"}, offload="model")
        == moving + sizes["adapter"]
    )
    assert weights(model_dir, torch.bfloat16, offload="sequential") == sizes["adapter"]  # a layer at a time besides
    with pytest.raises(ValidationError, match=r"^quantize.transformer: must be one of nf4, int8, fp8 \(got 'q4'\)$"):
        weights(model_dir, quantize={"transformer": "q4"})
