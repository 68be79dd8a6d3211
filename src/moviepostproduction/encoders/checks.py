"""The values of a model dir's JSON files, checked before anything is built from them.

A key's value is checked by its name, in every file of a kind (the tables below), so that a string, null, NaN or an
absurd size is one line naming the file, the key and the value (`model dir D: vae/config.json block_out_channels
must be a list of 1 to 8 integers in [1, 65536] (got 'x')`) rather than a library traceback, a silent accept or a
hang. The maxima are far above every released model; they keep a typo (10^9 layers, 10^9 text tokens) from
building 10^9 modules. Beyond them the weights bound the rest: `meta_parameters` builds a component on the meta
device (no memory) so that a config needing more than twice the parameters its weight files hold is refused before
anything is allocated (transformers would random-initialise the difference, and allocate it first).
"""

from __future__ import annotations

import contextlib
import math
import stat
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

from moviepostproduction.errors import Problem, WeightsError, shown
from moviepostproduction.sampling import is_finite_number

MAX_LAYERS = 512  # blocks of one kind (FLUX.1-dev: 19 + 38; T5-XXL: 24)
MAX_WIDTH = 65_536  # hidden sizes, heads, channels (FLUX.1-dev: 3072; T5-XXL d_ff: 10240)
MAX_LEVELS = 8  # entries of a per-level list (VAE block_out_channels: 4; RoPE axes: 3)
MAX_VOCAB = 1 << 20  # T5: 32128, CLIP: 49408
MAX_POSITIONS = 1 << 20  # position tables, schedule lengths
MAX_TEXT_TOKENS = 4096  # T5 tokens a prompt is padded to (FLUX.1-dev: 512)
MAX_IMAGE_SIDE = 4096  # an image encoder's input side (CLIP: 224, DINOv2: 224 / 518)
MAX_JSON_BYTES = 64 << 20  # any JSON file of a model dir (a T5 tokenizer.json: 2.4 MB)

Check = Callable[[object], "str | None"]  # the message for a bad value, None for a good one


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def count(low: int, high: int | None = None) -> Check:
    message = f"must be an integer in [{low}, {high}]" if high is not None else f"must be an integer >= {low}"
    return lambda v: None if _is_int(v) and low <= v and (high is None or v <= high) else message


def optional(check: Check) -> Check:
    return lambda v: None if v is None or check(v) is None else f"{check(v)} or null"


def finite(value: object) -> str | None:
    return None if is_finite_number(value) else "must be a finite number"


def positive(value: object) -> str | None:
    return None if is_finite_number(value) and value > 0 else "must be a finite number > 0"


def boolean(value: object) -> str | None:
    return None if isinstance(value, bool) else "must be true or false"


def text(value: object) -> str | None:
    return None if isinstance(value, str) else "must be a string"


def listing(each: Check, what: str, longest: int | None = MAX_LEVELS, shortest: int = 1) -> Check:
    """A list of `shortest` to `longest` (None: any number of) entries, each passing `each`."""
    size = f"{shortest} to {longest} " if longest is not None else ""
    message = f"must be a list of {size}{what}"

    def check(value: object) -> str | None:
        sized = isinstance(value, list) and shortest <= len(value) <= (longest if longest is not None else len(value))
        return None if sized and all(each(e) is None for e in value) else message

    return check


def _image_size(value: object) -> str | None:
    """A preprocessor size as encoders/preprocess.py reads it: n, {"height": h, "width": w} or {"shortest_edge": n}
    (other keys ignored), each side in [1, MAX_IMAGE_SIDE]; null when that step is off."""
    sides = [value]
    if isinstance(value, dict):
        sides = [value.get(k) for k in (("height", "width") if "height" in value else ("shortest_edge",))]
    if value is None or all(count(1, MAX_IMAGE_SIDE)(side) is None for side in sides):
        return None
    sizes = '{"height": side, "width": side}, {"shortest_edge": side}'
    return f"must be a side in [1, {MAX_IMAGE_SIDE}], {sizes} or null"


LAYERS, WIDTH = count(0, MAX_LAYERS), count(1, MAX_WIDTH)
POSITIONS = count(1, MAX_POSITIONS)

# config.json of a diffusers or transformers component, and a tokenizer_config.json (nested *_config dicts too).
MODEL_KEYS: dict[str, Check] = {
    **dict.fromkeys(
        ("num_layers", "num_single_layers", "num_hidden_layers", "num_decoder_layers", "layers_per_block"), LAYERS
    ),
    **dict.fromkeys(
        (
            "hidden_size",
            "intermediate_size",
            "d_model",
            "d_ff",
            "d_kv",
            "projection_dim",
            "attention_head_dim",
            "num_attention_heads",
            "num_heads",
            "joint_attention_dim",
            "pooled_projection_dim",
            "in_channels",
            "latent_channels",
            "num_channels",
            "norm_num_groups",
            "patch_size",
        ),
        WIDTH,
    ),  # fmt: skip
    "out_channels": optional(WIDTH),  # FLUX: null (= in_channels)
    "vocab_size": count(1, MAX_VOCAB),
    **dict.fromkeys(
        ("max_position_embeddings", "relative_attention_num_buckets", "relative_attention_max_distance"), POSITIONS
    ),
    "image_size": count(1, MAX_IMAGE_SIDE),
    "mlp_ratio": positive,
    "block_out_channels": listing(WIDTH, f"integers in [1, {MAX_WIDTH}]"),
    "axes_dims_rope": listing(WIDTH, f"integers in [1, {MAX_WIDTH}]"),
    "down_block_types": listing(text, "strings"),
    "up_block_types": listing(text, "strings"),
    "scaling_factor": positive,
    "shift_factor": optional(finite),
    "layer_norm_eps": positive,
    "layer_norm_epsilon": positive,
    **dict.fromkeys(("guidance_embeds", "use_quant_conv", "use_post_quant_conv"), boolean),
    "model_max_length": count(1),  # tokenizer_config.json; "unset" is a huge integer
}

# preprocessor_config.json of an image encoder (encoders/preprocess.py reads it).
PREPROCESSOR_KEYS: dict[str, Check] = {
    "size": _image_size,
    "crop_size": _image_size,
    "resample": count(0, 5),  # PIL's resampling filters
    "rescale_factor": positive,
    "image_mean": listing(finite, "finite numbers", 4),
    "image_std": listing(positive, "finite numbers > 0", 4),
    **dict.fromkeys(("do_resize", "do_center_crop", "do_rescale", "do_normalize", "do_convert_rgb"), boolean),
}

# scheduler/scheduler_config.json (sampling uses FLUX.1-dev's shifted schedule; exports and diffusers read it).
SCHEDULER_KEYS: dict[str, Check] = {
    "_class_name": text,
    "shift": positive,
    "base_shift": finite,
    "max_shift": finite,
    "base_image_seq_len": POSITIONS,
    "max_image_seq_len": POSITIONS,
    "num_train_timesteps": POSITIONS,
    "shift_terminal": optional(positive),
    "use_dynamic_shifting": boolean,
}

# model_index.json, less its sampling defaults (model_dir.SAMPLING_CHECKS).
INDEX_KEYS: dict[str, Check] = {
    "tiny_random": boolean,
    "label": text,
    "trained_steps": count(0),
}


def config_problems(data: dict, keys: dict[str, Check], prefix: str = "") -> list[Problem]:
    """A Problem per key of `keys` whose value in `data` fails its check; nested `*_config` mappings (a full CLIP
    config's vision_config) are checked too, their keys named `vision_config.hidden_size`."""
    problems = []
    for key, value in data.items():
        if key in keys and (message := keys[key](value)):
            problems.append(Problem(prefix + key, value, message))
        elif isinstance(value, dict) and str(key).endswith("_config") and not prefix:
            problems += config_problems(value, keys, f"{key}.")
    return problems


# ---------------------------------------------------------------------------------------------- files
def regular_file(path: Path, what: str, root: Path, max_bytes: int | None = MAX_JSON_BYTES) -> None:
    """Refuse, naming `path`, a file that is missing, not a regular file (a FIFO would block the read) or over
    `max_bytes`."""
    try:
        info = path.stat()
    except FileNotFoundError:
        raise WeightsError(f"model dir {root}: missing {path} (expected {what})") from None
    except OSError as exc:  # a symlink loop, a name too long, no permission
        raise WeightsError(f"model dir {root}: cannot read {path} ({exc.strerror}; expected {what})") from None
    if not stat.S_ISREG(info.st_mode):
        raise WeightsError(f"model dir {root}: {path} is not a regular file (expected {what})")
    if max_bytes is not None and info.st_size > max_bytes:
        raise WeightsError(
            f"model dir {root}: {path} has {info.st_size} bytes, more than the {max_bytes >> 20} MiB a JSON file of a "
            f"model dir may have (expected {what})"
        )


def config_error(root: Path, path: Path, problem: Problem) -> WeightsError:
    """`model dir D: vae/config.json scaling_factor must be a finite number > 0 (got nan)`."""
    file = path.relative_to(root) if path.is_relative_to(root) else path
    return WeightsError(f"model dir {root}: {file} {problem.field} {problem.message} (got {shown(problem.value)})")


def check_safetensors(file: Path, root: Path) -> None:
    """Read the header only: catches truncated and corrupt files without touching the tensor data."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt"):
            pass
    except (SafetensorError, OSError) as exc:
        raise WeightsError(f"model dir {root}: {file} is truncated or corrupt ({exc})") from None


# ----------------------------------------------------------------------------------- config against weights
def stored_values(files: Sequence[Path]) -> int:
    """Values in the tensors of safetensors files, from their headers (no tensor is read)."""
    from safetensors import safe_open

    total = 0
    for file in files:
        with safe_open(str(file), framework="pt") as fh:
            total += sum(math.prod(fh.get_slice(key).get_shape()) for key in fh.keys())  # noqa: SIM118
    return total


def meta_parameters(build: Callable[[], torch.nn.Module]) -> int:
    """Parameters of the module `build` makes, built on the meta device: no memory, whatever the config says."""
    with torch.device("meta"), quiet_progress():
        module = build()
    return sum(p.numel() for p in module.parameters())


_BUILT: dict[tuple, int] = {}  # (kind, class, config.json bytes) -> parameters


def component_parameters(kind: str, class_name: str, folder: Path) -> int:
    """Parameters the config.json in `folder` builds a diffusers / transformers `class_name` with, counted on the meta
    device (remembered per config); the library's own exception when it cannot build one."""
    key = (kind, class_name, (folder / "config.json").read_bytes())
    if key not in _BUILT:
        if kind == "diffusers":
            import diffusers

            cls = getattr(diffusers, class_name)
            build = lambda: cls.from_config(cls.load_config(folder, local_files_only=True))  # noqa: E731
        else:
            import transformers

            cls = getattr(transformers, class_name)
            build = lambda: cls(cls.config_class.from_pretrained(folder, local_files_only=True))  # noqa: E731
        if len(_BUILT) > 64:
            _BUILT.clear()
        _BUILT[key] = meta_parameters(build)
    return _BUILT[key]


def require_fit(build: Callable[[], torch.nn.Module], weights: Path, config: Path, what: str) -> None:
    """Refuse, before anything is allocated, a config whose module (`build`, made on the meta device) needs far more
    parameters than the safetensors file `weights` holds (`fit_problem`); a missing, pickled or corrupt file is
    named first."""
    from moviepostproduction.files import load_safetensors

    try:
        held = stored_values([weights])
    except Exception:  # safetensors' and the OS's errors alike: load_safetensors names the file in its own words
        load_safetensors(weights, what)
        raise
    if problem := fit_problem(meta_parameters(build), held):
        raise WeightsError(f"{config}: describes {what} {problem}")


def fit_problem(needed: int, held: int) -> str | None:
    """Why a config needing `needed` parameters cannot be built for weights holding `held` values, or None. Only more
    than twice as many is refused up front (tied weights, and a few missing tensors, which the loaders then name,
    stay below that): building the module would allocate memory in proportion to the config, not to the files."""
    if needed <= 2 * held:
        return None
    return f"of {needed:,} parameters, more than twice the {held:,} values its weights hold (config and weights differ)"


_TOKENIZERS: dict[tuple, str | None] = {}  # a file's (device, inode, size, time) -> why it is no tokenizer


def tokenizer_problem(path: Path) -> str | None:
    """Why `tokenizer.json` is not a file the `tokenizers` library loads, or None (remembered per unchanged file)."""
    from tokenizers import Tokenizer

    info = path.stat()
    key = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)
    if key not in _TOKENIZERS:
        try:
            Tokenizer.from_file(str(path))
            _TOKENIZERS[key] = None
        except Exception as exc:  # the Rust parser's errors have no common Python type
            _TOKENIZERS[key] = first_line(exc)
    return _TOKENIZERS[key]


def load_error(root: Path, folder: Path, what: str, exc: BaseException) -> WeightsError:
    """What the libraries raise when they refuse a component (OSError, ValueError, KeyError, their Rust errors alike)
    as one line: `model dir D: cannot load D/vae as AutoencoderKL: <the first line of their message>`."""
    return WeightsError(f"model dir {root}: cannot load {folder} as {what}: {first_line(exc)}")


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@contextlib.contextmanager
def quiet_progress() -> Iterator[None]:
    """Hide what transformers and diffusers print while loading or saving: per-file progress bars, and their
    multi-line warnings (missing weights, unused keys, deprecations), which would precede the one line that reports
    a failed load; our own checks report what matters."""
    from diffusers.utils import logging as d_logging
    from transformers.utils import logging as t_logging

    states = (t_logging.is_progress_bar_enabled(), d_logging.is_progress_bar_enabled())
    levels = (t_logging.get_verbosity(), d_logging.get_verbosity())
    t_logging.disable_progress_bar()
    d_logging.disable_progress_bar()
    t_logging.set_verbosity_error()
    d_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        t_logging.set_verbosity(levels[0])
        d_logging.set_verbosity(levels[1])
        if states[0]:
            t_logging.enable_progress_bar()
        if states[1]:
            d_logging.enable_progress_bar()
