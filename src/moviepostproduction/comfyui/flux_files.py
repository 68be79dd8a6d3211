"""MPP Load FLUX Files: the compose model from the single files ComfyUI users keep (docs/comfyui.md).

    models/diffusion_models/  flux1-dev.safetensors, flux1-schnell.safetensors or a GGUF (models/unet: the same)
    models/text_encoders/     t5xxl_fp16.safetensors, clip_l.safetensors (models/clip: the same)
    models/vae/               ae.safetensors

The files hold weights only: the variant (dev, schnell; Fill-dev is refused) is read from the transformer's tensor
names and its configs come from the package (encoders/single_file.py). Single-file text encoders carry no
tokenizer, so the CLIP-L and T5 vocabularies are ComfyUI's own (comfy/sd1_tokenizer/ and
comfy/text_encoders/t5_tokenizer/, found through the `comfy` package). The adapter folder (`mpp init-adapter`) is
required: it names the CLIP / DINOv2 image encoders and the sampling defaults it was tuned for.
"""

from __future__ import annotations

import importlib.util
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from moviepostproduction.comfyui.inputs import checked
from moviepostproduction.comfyui.loras import NO_LORA, lora_inputs, lora_path
from moviepostproduction.comfyui.model import DTYPES, MppModel, resolve_device
from moviepostproduction.comfyui.model_folders import (
    DIFFUSION_MODELS,
    TEXT_ENCODERS,
    VAES,
    ModelFolder,
    likely_first,
)
from moviepostproduction.comfyui.types import CATEGORY, MODEL
from moviepostproduction.errors import Problem, ValidationError, WeightsError
from moviepostproduction.model_dir import IMAGE_COMPONENTS, ModelDir
from moviepostproduction.resources import ModelDims, Request, preflight
from moviepostproduction.sampling_defaults import FlowShift

if TYPE_CHECKING:
    from moviepostproduction.compose.pipeline import ComposePipeline

# Where ComfyUI keeps the tokenizers of its FLUX text encoders, relative to its `comfy` package
# (comfy/sd1_clip.py: SDTokenizer; comfy/text_encoders/flux.py: T5XXLTokenizer).
CLIP_TOKENIZER = "sd1_tokenizer"
T5_TOKENIZER = "text_encoders/t5_tokenizer"
# scheduler/scheduler_config.json of the hub folders: FLUX.1-dev's dynamic shift, FLUX.1-schnell's linear schedule
FLOW_SHIFTS = {"flux1-dev": FlowShift(), "flux1-schnell": FlowShift(dynamic=False, shift=1.0)}
INIT_ADAPTER = "mpp init-adapter --model FLUX_DIR --clip CLIP_DIR --dino DINO_DIR -o DIR"


# ------------------------------------------------------------------------------------------------ tokenizers
def comfy_package() -> Path | None:
    """The folder of the importable `comfy` package (ComfyUI's), without importing it; None outside ComfyUI."""
    try:
        spec = importlib.util.find_spec("comfy")
    except (ImportError, ValueError):  # ValueError: a `comfy` module in sys.modules without a spec
        return None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    return Path(locations[0]) if locations else None


def load_tokenizers(tokenizers: str | Path | None = None) -> tuple[object, object]:
    """(CLIP-L, T5) tokenizers from `tokenizers` (a folder laid out as ComfyUI's `comfy` package), else from the
    importable `comfy` package; one line when neither has them."""
    from transformers import AutoTokenizer

    from moviepostproduction.encoders.checks import first_line, quiet_progress

    root = Path(tokenizers).expanduser() if tokenizers is not None else comfy_package()
    if root is None:
        raise WeightsError(
            "tokenizers: single-file text encoders hold none and ComfyUI's `comfy` package is not importable; pass "
            f"tokenizers=FOLDER holding {CLIP_TOKENIZER}/ and {T5_TOKENIZER}/ as ComfyUI's comfy/ does"
        )
    folders = {"CLIP-L": root / CLIP_TOKENIZER, "T5": root / T5_TOKENIZER}
    for what, folder in folders.items():  # both looked for before either loads
        if not folder.is_dir():
            sub = folder.relative_to(root).as_posix()
            raise WeightsError(f"tokenizers: no {what} tokenizer folder {folder} (ComfyUI ships comfy/{sub}/)")
    loaded = []
    for what, folder in folders.items():
        try:
            with quiet_progress():
                loaded.append(AutoTokenizer.from_pretrained(folder, local_files_only=True))
        except Exception as exc:  # a vocabulary the library cannot read
            raise WeightsError(f"tokenizers: cannot load {folder} as the {what} tokenizer: {first_line(exc)}") from exc
    return loaded[0], loaded[1]


# -------------------------------------------------------------------------------------------------- adapter
def adapter_dir(adapter: str | Path) -> ModelDir:
    """The adapter folder as a ModelDir rooted at it: its image encoders (as its index names them, else its own
    image_encoders/ copies) and its sampling defaults; there is no FLUX folder beside single files."""
    root = Path(adapter).expanduser()
    if not str(adapter).strip() or not root.is_dir():
        raise WeightsError(f"adapter {str(adapter)[:200]!r}: not a directory (an adapter folder: {INIT_ADAPTER})")
    md = ModelDir.at(root, adapter=root)
    if not md.adapter.config.is_file():
        raise WeightsError(f"missing {md.adapter.config} (expected a composition adapter: {INIT_ADAPTER})")
    md.check(IMAGE_COMPONENTS)
    return md


def _weights_bytes(files: list[Path], dtype: torch.dtype) -> int:
    """What the files hold once loaded at `dtype` (GGUF stays quantized: its size on disk), from headers only."""
    from moviepostproduction.encoders.single_file import _tensor_shapes

    per_value = torch.empty((), dtype=dtype).element_size()
    total = 0
    for file in files:
        if file.suffix == ".gguf":
            total += file.stat().st_size
        else:
            total += per_value * sum(int(torch.Size(s).numel()) for s in _tensor_shapes(file).values())
    return total


# ------------------------------------------------------------------------------------------------ Python API
def load_flux_files(
    diffusion_model: str | Path,
    t5: str | Path,
    clip_l: str | Path,
    vae: str | Path,
    adapter: str | Path,
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    tokenizers: str | Path | None = None,
    config: str | Path | None = None,
) -> ComposePipeline:
    """A ComposePipeline from single files: a FLUX.1-dev / schnell transformer (BFL, ComfyUI, diffusers keys or
    GGUF), T5-XXL and CLIP-L text encoders, the VAE, and an adapter folder. `tokenizers`: a folder laid out as
    ComfyUI's `comfy` package (None: the importable one); `config`: a FLUX folder whose component configs describe
    the files (None: the package's configs of the variant read from the transformer file). Sampling defaults are
    the adapter's, the schedule's bend the variant's."""
    from moviepostproduction.compose.flux import ConditionedFlux
    from moviepostproduction.compose.lora import load_adapter_lora
    from moviepostproduction.compose.modules import CompositionAdapter
    from moviepostproduction.compose.pipeline import ComposePipeline  # noqa: F811 - at run time
    from moviepostproduction.encoders import ImageEncoder, TextEncoder, Vae
    from moviepostproduction.encoders.single_file import (
        load_text_encoder_file,
        load_transformer_file,
        load_vae_file,
        transformer_variant,
    )

    files = [Path(p).expanduser() for p in (diffusion_model, t5, clip_l, vae)]
    for file, what in zip(files, ("transformer", "T5", "CLIP-L", "VAE"), strict=True):
        if not file.is_file():
            raise WeightsError(f"{file}: no such {what} file")
    variant = transformer_variant(files[0])
    if variant not in FLOW_SHIFTS:
        raise WeightsError(
            f"{files[0]}: a {variant} transformer; composing takes FLUX.1-dev or FLUX.1-schnell (Fill-dev: MPP Fill)"
        )
    md = adapter_dir(adapter)
    defaults = replace(md.sampling_defaults(), flow_shift=FLOW_SHIFTS[variant])  # a bad value fails before loading
    clip_tokenizer, t5_tokenizer = load_tokenizers(tokenizers)
    preflight(Request("compose", 0, 0, device=str(device)), ModelDims(weights_bytes=_weights_bytes(files, dtype)))

    transformer = load_transformer_file(files[0], config=config, dtype=dtype).to(device)
    if md.adapter.lora is not None:  # trained with the adapter: part of the model, always on
        load_adapter_lora(transformer, md.adapter.lora)
    composition = CompositionAdapter.from_pretrained(md.adapter.root).to(device=device, dtype=dtype)
    text = TextEncoder(
        load_text_encoder_file(files[2], "clip", config=config, dtype=dtype),
        clip_tokenizer,
        load_text_encoder_file(files[1], "t5", config=config, dtype=dtype),
        t5_tokenizer,
    ).to(device)
    pipe = ComposePipeline(
        ConditionedFlux(transformer, composition),
        text,
        ImageEncoder.load(md, dtype=dtype, device=device),
        Vae(load_vae_file(files[3], config=config, dtype=dtype)).to(device),
        defaults=defaults,
    )
    resident = (pipe.model, pipe.text_encoder, pipe.image_encoder, pipe.vae)
    pipe.memory_dims = ModelDims.of_modules(transformer, pipe.vae.model.config, *resident)
    return pipe


# ----------------------------------------------------------------------------------------------------- node
def listed(folder: ModelFolder) -> list[str]:
    """A combo's entries: the folder's files, or one entry saying it has none (an empty combo has no value)."""
    return folder.files() or [f"(no {' / '.join(folder.suffixes)} file in {folder.names[0]})"]


class MppLoadFluxFiles:
    """Load FLUX from ComfyUI's model folders (diffusion model, T5, CLIP-L, VAE) with a moviepostproduction adapter
    into the MPP_MODEL every sampler node takes, as MPP Load Model loads a FLUX folder."""

    FILES = {"diffusion_model": DIFFUSION_MODELS, "t5": TEXT_ENCODERS, "clip_l": TEXT_ENCODERS, "vae": VAES}

    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802 - ComfyUI's name
        encoders = listed(TEXT_ENCODERS)
        return {
            "required": {
                "diffusion_model": (listed(DIFFUSION_MODELS), {"tooltip": "models/diffusion_models (or unet)."}),
                "t5": (likely_first(encoders, "t5"), {"tooltip": "T5-XXL from models/text_encoders (or clip)."}),
                "clip_l": (likely_first(encoders, "clip"), {"tooltip": "CLIP-L from models/text_encoders."}),
                "vae": (listed(VAES), {"tooltip": "ae.safetensors from models/vae."}),
                "adapter": ("STRING", {"default": "", "tooltip": "Adapter folder (mpp init-adapter)."}),
                "device": (["auto", "cpu", "cuda"], {"default": "auto"}),
                "dtype": (["auto", *DTYPES], {"default": "auto", "tooltip": "auto: bf16 on CUDA, fp32 on CPU."}),
            },
            "optional": {
                **lora_inputs(),
            },
        }

    RETURN_TYPES = (MODEL,)
    RETURN_NAMES = ("model",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    @classmethod
    def VALIDATE_INPUTS(cls, diffusion_model: str, t5: str, clip_l: str, vae: str) -> bool | str:  # noqa: N802
        """ComfyUI's hook: a file added since the list was drawn passes when it resolves inside its folder."""
        try:
            cls.paths(diffusion_model=diffusion_model, t5=t5, clip_l=clip_l, vae=vae)
        except ValidationError as err:
            return str(err)
        return True

    @classmethod
    def paths(cls, **names: object) -> dict[str, Path]:
        """Each named file inside its folders; every refusal at once, one line each."""
        found, problems = {}, []
        for field, name in names.items():
            try:
                found[field] = cls.FILES[field].path(field, name)
            except ValidationError as err:
                problems += err.problems
        if problems:
            raise ValidationError(problems)
        return found

    @checked
    def load(
        self,
        diffusion_model: str,
        t5: str,
        clip_l: str,
        vae: str,
        adapter: str,
        device: str,
        dtype: str,
        lora: str = NO_LORA,
        lora_strength: float = 1.0,
    ) -> tuple[MppModel]:
        from moviepostproduction.devices import resolve_dtype

        files = self.paths(diffusion_model=diffusion_model, t5=t5, clip_l=clip_l, vae=vae)
        if not adapter.strip():
            raise ValidationError([Problem("adapter", adapter, f"must name an adapter folder ({INIT_ADAPTER})")])
        lora_file = lora_path(lora) if lora != NO_LORA else None
        device = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, device, "dtype")
        pipe = load_flux_files(**files, adapter=adapter.strip(), device=device, dtype=torch_dtype)
        if lora_file is not None:  # on the transformer every sampler node shares, as MPP Load Model does
            pipe.load_loras([(lora_file, lora_strength)])
        return (MppModel(root=files["diffusion_model"], compose=pipe, device=device),)
