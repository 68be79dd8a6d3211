"""Scene files, the structured-file reader and `mpp view` under hostile input (issue 40; docs/robustness.md, "Scene
files and structured files").

Every case is a file written here: generated documents (JSON and YAML) with a hostile fragment in one field, hostile
image paths (FIFOs, devices, symlink loops, paths too long, an unknown `~user`, a decompression bomb ...), hostile
scene files (a FIFO named `.json`, /dev/zero behind a link, 2 MiB, not UTF-8, truncated at every few bytes), and
hypothesis documents (derandomized: the same examples in CI every run; MPP_FUZZ_RANDOM=1 explores new ones) mixing
them all, duplicate keys and nesting included. Properties:
- only an `MppError` escapes, and its message is one printable line per problem starting with the file's name;
- the words of each case's refusal are there (the field or line and column, and the reason);
- nothing hangs: a FIFO is never opened, /dev/zero never read, an alias bomb stops at the value bound (every test
  has a timeout);
- `mpp validate`, `mpp compose` and `mpp view` exit with code 2, `error: ` lines and no traceback.
"""

from __future__ import annotations

import json
import os
import pwd
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

from moviepostproduction.cli import app
from moviepostproduction.errors import MAX_DEPTH, MAX_VALUES, MppError, ValidationError, shown_path
from moviepostproduction.files import read_structured
from moviepostproduction.panorama.viewer import write_viewer
from moviepostproduction.scene import Scene, load_scene, scene_from_dict

from helpers import fuzz

pytestmark = pytest.mark.timeout(30)  # a hang (a FIFO opened, /dev/zero read, an alias bomb expanded) fails fast

FUZZ = fuzz(150)
NO_USER = "mpp_no_such_user_40"  # `~mpp_no_such_user_40/...` must name nobody on this machine


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims `width` x `height` pixels, with no pixel data: a decompression bomb's shape."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """Images of every hostile kind beside the scene files: a FIFO, links to a device and in a loop, bombs ..."""
    with pytest.raises(KeyError):
        pwd.getpwnam(NO_USER)
    folder = tmp_path_factory.mktemp("hostile")
    Image.new("RGB", (8, 8), (200, 30, 30)).save(folder / "good.png")
    Image.new("RGB", (32, 16), (30, 30, 200)).save(folder / "pano.png")
    (folder / "truncated.png").write_bytes((folder / "good.png").read_bytes()[:40])
    (folder / "bomb.png").write_bytes(png_header(100_000, 100_000))  # past twice PIL's limit: PIL refuses it
    (folder / "big.png").write_bytes(png_header(12_000, 12_000))  # past PIL's warning limit only
    (folder / "dir.png").mkdir()
    os.mkfifo(folder / "fifo.png")
    os.symlink("/dev/zero", folder / "zero.png")
    os.symlink("loop-b.png", folder / "loop-a.png")
    os.symlink("loop-a.png", folder / "loop-b.png")
    return folder


def check_lines(err: MppError, path: Path | str) -> list[str]:
    """One printable line per problem, each starting with the file's name; returns the lines."""
    lines = str(err).splitlines()
    assert lines, repr(err)
    assert len(lines) == (len(err.problems) if isinstance(err, ValidationError) else 1)
    for line in lines:
        assert line.startswith(f"{shown_path(path)}: ") and line.isprintable() and len(line) < 700, line
    return lines


def check_scene(path: Path) -> Scene | None:
    """Load `path`: a Scene, or None after checking the refusal's lines; nothing but an MppError may escape."""
    try:
        return load_scene(path)
    except MppError as err:
        check_lines(err, path)
        return None


# ------------------------------------------------------------------------------- generated documents
@dataclass(frozen=True)
class Case:
    id: str
    suffix: str
    text: str
    words: str  # in the refusal


VALID_REF = {"image": "good.png", "bbox": [0.1, 0.1, 0.5, 0.5], "caption": "r"}
VALID = {"caption": "c", "width": 64, "height": 64, "seed": 1, "refs": [VALID_REF]}
JSON_TEMPLATE = (
    '{"caption": @caption@, "width": 64, "height": 64, "seed": @seed@, "refs": [{"image": @image@, '
    '"bbox": [0.1, 0.1, @bbox@, 0.5], "caption": @refcap@}], "extra": @extra@}'
)  # `"extra": ...` (an unknown key) is left out unless the case puts its fragment there
YAML_TEMPLATE = """caption: @caption@
width: 64
height: 64
seed: @seed@
refs:
  - image: @image@
    bbox: [0.1, 0.1, @bbox@, 0.5]
    caption: @refcap@
extra: @extra@
"""
DEFAULTS = {"caption": '"c"', "seed": "1", "image": '"good.png"', "bbox": "0.5", "refcap": '"r"', "extra": ""}


def fill(template: str, **slots: str) -> str:
    text = template
    if "extra" not in slots:
        text = text.replace(', "extra": @extra@', "").replace("extra: @extra@\n", "")
    for name, default in DEFAULTS.items():
        text = text.replace(f"@{name}@", slots.get(name, default))
    return text


def value_cases() -> list[Case]:
    """A hostile value in each field of a JSON and a YAML scene."""
    nested = {f"deep {n}": ("[" * n + "1" + "]" * n, "nested more than") for n in (65, 100, 1000, 5000, 100_000)}
    nested |= {f"deep object {n}": ('{"a": ' * n + "1" + "}" * n, "nested more than") for n in (65, 1000, 20_000)}
    numbers = {f"int {d} digits": ("9" * d, "digits") for d in (4301, 5000, 100_000)}
    numbers |= {f"int -{d} digits": ("-" + "9" * d, "digits") for d in (4301, 50_000)}
    numbers |= {"float 10^400": ("1" + "0" * 400 + ".0", "too large for a float")}
    texts = {f"surrogate {t}": (f'"{t}"', "lone UTF-16 surrogate") for t in (r"\ud800", r"a\udfffb", r"\udc80")}
    hostile = nested | numbers | texts
    json_only = {f"json float {t}": (t, "too large for a float") for t in ("1e309", "-1e999", "2.5E+400")}
    yaml_only = {  # YAML spellings: tags, hex, a float that overflows (YAML 1.1 floats need a dot)
        "tag python": ('!!python/object/apply:os.system ["echo pwned"]', "tags are not allowed"),
        "tag binary": ("!!binary aGVsbG8=", "tags are not allowed"),
        "tag set": ("!!set {a, b}", "tags are not allowed"),
        "tag str": ("!!str 5", "tags are not allowed"),
        "tag custom": ("!custom x", "tags are not allowed"),
        "tag timestamp": ("!!timestamp 2020-01-01", "tags are not allowed"),
        "hex int": ("0x" + "f" * 4000, "digits"),
        "yaml float": ("1.0e+999", "too large for a float"),
        "yaml -float": ("-1.5e+400", "too large for a float"),
    }
    spellings = [(".json", JSON_TEMPLATE, hostile | json_only), (".yaml", YAML_TEMPLATE, hostile)]
    spellings.append((".yml", YAML_TEMPLATE, yaml_only))
    return [
        Case(f"{suffix[1:]} {slot} {name}", suffix, fill(template, **{slot: fragment}), words)
        for slot in DEFAULTS
        for suffix, template, fragments in spellings
        for name, (fragment, words) in fragments.items()
    ]


def structure_cases() -> list[Case]:
    """Duplicate keys, alias bombs, cycles, a block-style nesting 1000 deep."""
    dup_json = {
        "top caption": '{"caption": "a", "caption": "b"}',
        "ref bbox": '{"caption": "a", "refs": [{"image": "good.png", "bbox": [0, 0, 1, 1], "bbox": [0, 0, 1, 1]}]}',
        "nested extra": '{"caption": "a", "extra": {"k": 1, "k": 2}}',
        "deep inside": '{"caption": "a", "extra": [[{"x": {"y": 1, "y": 1}}]]}',
    }
    dup_yaml = {
        "top caption": "caption: a\ncaption: b\n",
        "ref bbox": "caption: a\nrefs:\n  - image: good.png\n    bbox: [0, 0, 1, 1]\n    bbox: [0, 0, 1, 1]\n",
        "flow": "caption: a\nextra: {k: 1, k: 2}\n",
        "int keys": "caption: a\nextra: {1: a, 0x1: b}\n",
        "anchor key": "caption: a\nextra: {&k x: 1, *k : 2}\n",
    }
    cases = [Case(f"json dup {k}", ".json", t, "duplicate key") for k, t in dup_json.items()]
    cases += [Case(f"yaml dup {k}", ".yaml", t, "duplicate key") for k, t in dup_yaml.items()]
    for levels, width in ((6, 9), (7, 9), (9, 9), (12, 10), (30, 2)):
        for target in ("caption", "refs", "extra", "width"):
            lines = [f"l0: &l0 [{', '.join(['lol'] * width)}]"]
            lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, levels)]
            text = "\n".join(lines) + f"\ncaption: c\n{target}: *l{levels - 1}\n"
            if target == "caption":
                text = text.replace("\ncaption: c\n", "\n")
            words = "values" if width**levels > MAX_VALUES else "unknown key"
            cases.append(Case(f"yaml alias bomb {levels}x{width} in {target}", ".yaml", text, words))
    merge = "m0: &m0 {k: 1}\n" + "".join(f"m{i}: &m{i}\n  <<: [{', '.join([f'*m{i - 1}'] * 9)}]\n" for i in range(1, 9))
    cases.append(Case("yaml merge-key bomb", ".yaml", merge + "caption: c\n", "values"))
    cases.append(Case("yaml cycle", ".yaml", "caption: c\nrefs: &r [*r]\n", "inside the value it names"))
    cases.append(Case("yaml cycle map", ".yaml", "caption: c\nextra: &m {a: *m}\n", "inside the value it names"))
    block = "".join("  " * (i + 1) + f"k{i}:\n" for i in range(1000)) + "  " * 1001 + "v: 1\n"
    cases.append(Case("yaml block nesting 1000", ".yaml", "caption: c\nextra:\n" + block, "nested"))
    flow = "caption: c\nextra: " + "{a: " * 3000 + "1" + "}" * 3000 + "\n"
    cases.append(Case("yaml flow mapping 3000", ".yaml", flow, "nested"))
    cases.append(Case("json nesting in a string is fine", ".json", '{"caption": "[[[[' + "[" * 500 + '"}', ""))
    deepest = '{"caption": "c", "extra": ' + "[" * 63 + "]" * 63 + "}"  # 64 levels with the top mapping
    cases.append(Case("json depth 64 is fine", ".json", deepest, "unknown key"))
    return cases


def image_cases() -> list[Case]:
    """Hostile image paths: never opened when they are not regular files, never decoded past the pixel bound."""
    images = {
        "fifo.png": "is a FIFO, not a regular file",
        "zero.png": "is a device, not a regular file",
        "/dev/zero": "is a device, not a regular file",
        "/dev/null": "is a device, not a regular file",
        "loop-a.png": "symlink loop",
        "x" * 300 + ".png": "too long",
        "/".join(["d" * 100] * 45) + "/a.png": "too long",
        f"~{NO_USER}/a.png": "unknown user",
        "bomb.png": "decompression bomb",
        "big.png": "decompression bomb",
        "dir.png": "is a folder",
        "truncated.png": "cannot decode image file",
        "missing.png": "image file not found",
        "a\\u0000b.png": "not a valid file name",
        "\\ud800.png": "lone UTF-16 surrogate",
    }
    cases = []
    for image, words in images.items():
        quoted = json.dumps(image).replace("\\\\u", "\\u")
        cases.append(Case(f"json image {image[:24]}", ".json", fill(JSON_TEMPLATE, image=quoted), words))
        cases.append(Case(f"yaml image {image[:24]}", ".yaml", fill(YAML_TEMPLATE, image=quoted), words))
    return cases


def truncated_cases() -> list[Case]:
    """A valid scene cut short every few characters: refused in one line, or (a YAML prefix) a valid scene."""
    texts = {".json": json.dumps(VALID), ".yaml": fill(YAML_TEMPLATE).replace("extra: 0\n", "")}
    return [
        Case(f"truncated {suffix} at {cut}", suffix, text[:cut], "")
        for suffix, text in texts.items()
        for cut in range(0, len(text), 5)
    ]


CASES = value_cases() + structure_cases() + image_cases() + truncated_cases()


def test_hundreds_of_generated_cases():
    assert len(CASES) >= 300, len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_generated_scene_files_are_refused_in_one_line_each(world, case):
    path = world / f"case-{CASES.index(case)}{case.suffix}"
    path.write_text(case.text, encoding="utf-8")
    try:
        load_scene(path)
    except MppError as err:
        assert case.words in "\n".join(check_lines(err, path)), str(err)
    else:
        assert case.words == "", case.id  # accepted: a YAML prefix of a valid scene, a nesting within the bound


def test_yaml_tags_never_run_code(world, tmp_path):
    marker = tmp_path / "pwned"
    path = world / "tag.yaml"
    path.write_text(f'caption: !!python/object/apply:os.system ["touch {marker}"]\n')
    with pytest.raises(MppError, match="tags are not allowed"):
        load_scene(path)
    assert not marker.exists()


def test_field_and_line_are_named(world):
    json_path, yaml_path = world / "named.json", world / "named.yaml"
    json_path.write_text(fill(JSON_TEMPLATE, refcap=r'"\ud800"', seed="9" * 5000))
    with pytest.raises(ValidationError) as info:
        load_scene(json_path)
    assert str(info.value).startswith(f"{json_path}: seed: integer of more than 4300 digits (got '9999")
    json_path.write_text(fill(JSON_TEMPLATE, refcap=r'"\ud800"'))
    with pytest.raises(ValidationError, match=r"refs\[0\]\.caption: has a lone UTF-16 surrogate at character 0"):
        load_scene(json_path)
    yaml_path.write_text("caption: a\nwidth: 64\ncaption: b\n")
    with pytest.raises(ValidationError) as info:
        load_scene(yaml_path)
    expected = "line 3, column 1: duplicate key 'caption' (first on line 1) (got 'caption: b')"
    assert str(info.value) == f"{yaml_path}: {expected}"


# ------------------------------------------------------------------------------------ scene files themselves
def hostile_scene_files(folder: Path) -> dict[str, tuple[Path, str]]:
    """Scene files that are not regular files, or are too big, not UTF-8, unreachable."""
    made: dict[str, tuple[Path, str]] = {}
    for suffix in (".json", ".yaml"):
        os.mkfifo(fifo := folder / f"fifo{suffix}")
        os.symlink("/dev/zero", zero := folder / f"zero{suffix}")
        os.symlink(f"loop2{suffix}", loop := folder / f"loop1{suffix}")
        os.symlink(f"loop1{suffix}", folder / f"loop2{suffix}")
        (directory := folder / f"dir{suffix}").mkdir()
        (big := folder / f"big{suffix}").write_text(json.dumps({"caption": "x" * (2 << 20)}))
        (latin := folder / f"latin{suffix}").write_bytes(b'{"caption": "caf\xe9"}')
        made |= {
            f"fifo{suffix}": (fifo, "scene file is a FIFO, not a regular file"),
            f"dev-zero{suffix}": (zero, "scene file is a device, not a regular file"),
            f"loop{suffix}": (loop, "scene file path has a symlink loop"),
            f"dir{suffix}": (directory, "scene file is a folder"),
            f"2 MiB{suffix}": (big, "more than the 1048576 allowed"),
            f"latin-1{suffix}": (latin, "line 1, column 17: scene file is not UTF-8 text"),
            f"missing{suffix}": (folder / f"missing{suffix}", "scene file not found"),
            f"unknown user{suffix}": (Path(f"~{NO_USER}/s{suffix}"), "unknown user"),
            f"long name{suffix}": (folder / ("s" * 300 + suffix), "too long"),
            f"long path{suffix}": (folder.joinpath(*["d" * 200] * 25, f"s{suffix}"), "too long"),
            f"suffix only{suffix}": (folder / f"weird{suffix}.txt", "unsupported scene file suffix"),
        }
    (empty := folder / "empty.yaml").write_text("")
    (bom := folder / "bom.json").write_bytes(b"\xef\xbb\xbf")
    made |= {"empty yaml": (empty, "(top level)"), "bom only": (bom, "invalid JSON")}
    return made


def test_hostile_scene_files_are_refused_unread(tmp_path):
    for name, (path, words) in hostile_scene_files(tmp_path).items():
        with pytest.raises(MppError) as info:
            load_scene(path)
        assert words in check_lines(info.value, path)[0], (name, str(info.value))


def test_read_structured_for_other_files(tmp_path):
    """The reader recipes and model-dir configs use: `what` names the file kind, `fmt` overrides the suffix."""
    recipe = tmp_path / "recipe.cfg"
    recipe.write_text("model: m\nmodel: n\n")
    with pytest.raises(MppError, match=r"recipe\.cfg: line 2, column 1: duplicate key 'model'"):
        read_structured(recipe, "recipe", fmt="yaml")
    with pytest.raises(MppError, match=r"recipe\.cfg: recipe suffix is not \.json, \.yaml or \.yml"):
        read_structured(recipe, "recipe")
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"layers": list(range(100))}))
    assert read_structured(config, "model config")["layers"][-1] == 99
    with pytest.raises(MppError, match=r"config\.json: model config is \d+ bytes, more than the 100 allowed"):
        read_structured(config, "model config", max_bytes=100)
    (tmp_path / "dates.yaml").write_text("day: 2024-01-01\neq: =\nnum: 1.5\n")
    assert read_structured(tmp_path / "dates.yaml") == {"day": "2024-01-01", "eq": "=", "num": 1.5}


# ------------------------------------------------------------------------------------------------ hypothesis
@dataclass(frozen=True)
class Raw:
    """A fragment written as it is (a huge literal, deep brackets)."""

    text: str


@dataclass(frozen=True)
class Pairs:
    """A mapping written pair by pair, so that a key may repeat."""

    items: tuple


def render(value: object) -> str:
    """JSON text (YAML reads it too, as flow style), with Raw fragments and repeated keys as written."""
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, Pairs):
        return "{" + ", ".join(f"{json.dumps(k)}: {render(v)}" for k, v in value.items) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(render(v) for v in value) + "]"
    return json.dumps(value)  # lone surrogates come out as \ud800 escapes


HOSTILE = st.one_of(
    st.sampled_from(["\ud800", "a\udfffb", "\udc80", "caf\u00e9", "\x00", "\n"]),
    st.integers(4290, 4400).map(lambda d: Raw("9" * d)),
    st.sampled_from(["1e309", "-1e999", "1" + "0" * 400 + ".0", "NaN", "Infinity"]).map(Raw),
    st.integers(0, 300).map(lambda n: Raw("[" * n + "]" * n)),
    st.sampled_from(["good.png", "fifo.png", "zero.png", "loop-a.png", "bomb.png", "dir.png", f"~{NO_USER}/a"]),
)
LEAF = st.one_of(st.integers(-10, 2**70), st.floats(), st.booleans(), st.none(), st.text(max_size=6), HOSTILE)
KEYS = st.sampled_from(["caption", "width", "height", "seed", "panorama", "refs", "extra", "x"])
REF_KEYS = st.sampled_from(["image", "bbox", "depth", "caption", "image"])
VALUES = st.recursive(
    LEAF,
    lambda inner: st.lists(inner, max_size=4) | st.lists(st.tuples(KEYS, inner), max_size=4).map(tuple).map(Pairs),
    max_leaves=8,
)
REF = st.lists(st.tuples(REF_KEYS, VALUES | st.just([0.1, 0.1, 0.6, 0.6])), max_size=5).map(tuple).map(Pairs)
SCENE = st.lists(st.tuples(KEYS, VALUES | st.lists(REF, max_size=3)), min_size=1, max_size=7).map(tuple).map(Pairs)


@FUZZ
@given(scene=SCENE, suffix=st.sampled_from([".json", ".yaml"]), cut=st.none() | st.integers(0, 200))
def test_fuzzed_hostile_documents(world, scene, suffix, cut):
    path = world / f"fuzz{suffix}"
    text = render(scene)
    path.write_text(text if cut is None else text[:cut], encoding="utf-8", errors="surrogatepass")
    check_scene(path)


DEEP = st.recursive(st.integers(-(10**5000), 10**5000) | st.text(max_size=3) | HOSTILE, st.lists, max_leaves=4)


@FUZZ
@given(depth=st.integers(0, 3000), leaf=DEEP, key=KEYS)
def test_fuzzed_python_data_never_recurses(world, depth, leaf, key):
    """`scene_from_dict` (the Python API, ComfyUI) walks its data without recursion first: deep lists, huge ints."""
    data: object = "leaf" if isinstance(leaf, Raw) else leaf
    for _ in range(depth):
        data = [data]
    try:
        scene_from_dict({"caption": "c", key: data}, base_dir=world)
    except ValidationError as err:
        lines = str(err).splitlines()
        assert all(line.isprintable() and len(line) < 700 for line in lines)
        if depth >= MAX_DEPTH:  # the field (key[0][0]...) is cut at 80 characters
            assert len(lines) == 1 and lines[0].startswith(f"{key}[0][0]")
            assert lines[0].endswith(": nested more than 64 levels deep")
    else:
        assert depth == 0


def test_a_cycle_in_python_data_is_refused(world):
    cycle: list = []
    cycle.append(cycle)
    with pytest.raises(ValidationError, match="nested more than 64 levels deep"):
        scene_from_dict({"caption": "c", "refs": cycle}, base_dir=world)


# ------------------------------------------------------------------------------------------------------ CLI
runner = CliRunner()


def cli_refuses(args: list[str]) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, (args, result.output)
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
    lines = result.stderr.splitlines()
    assert lines and all(line.startswith("error: ") for line in lines), result.stderr
    return result.stderr


SAMPLE = [c for c in CASES if c.words not in ("", "unknown key")][::9]


@pytest.mark.parametrize("case", SAMPLE, ids=[c.id for c in SAMPLE])
def test_mpp_validate_exits_2_in_one_line(world, case):
    path = world / f"cli-{SAMPLE.index(case)}{case.suffix}"
    path.write_text(case.text, encoding="utf-8")
    assert case.words in cli_refuses(["validate", str(path)])


def test_mpp_validate_and_compose_refuse_hostile_scene_files(tmp_path):
    for name, (path, words) in hostile_scene_files(tmp_path).items():
        assert words in cli_refuses(["validate", str(path)]), name
    for name in ("fifo.yaml", "zero.json", "loop1.json"):
        out = tmp_path / "out.png"
        assert "scene file" in cli_refuses(["compose", str(tmp_path / name), "-o", str(out)])
        assert not out.exists() and not list(tmp_path.glob(".out.png*"))


VIEW = {
    "fifo.png": "is a FIFO, not a regular file",
    "zero.png": "is a device, not a regular file",
    "/dev/zero": "is a device, not a regular file",
    "bomb.png": "decompression bomb",
    "loop-a.png": "symlink loop",
    "dir.png": "is a folder",
    "missing.png": "no such file",
    f"~{NO_USER}/p.png": "unknown user",
    "x" * 300 + ".png": "too long",
}


@pytest.mark.parametrize("image", VIEW, ids=[k[:20] for k in VIEW])
def test_mpp_view_refuses_fifos_devices_and_bombs(world, tmp_path, image):
    source = image if image.startswith(("/", "~")) else str(world / image)
    out = tmp_path / "view.html"
    assert VIEW[image] in cli_refuses(["view", source, "-o", str(out)])
    assert list(tmp_path.iterdir()) == []  # no page, no temporary file


def test_mpp_view_still_writes_a_page(world, tmp_path):
    page = write_viewer(world / "pano.png", tmp_path / "pano.html")
    assert "data:image/png;base64," in page.read_text()
    result = runner.invoke(app, ["view", str(world / "big.png"), "-o", str(tmp_path / "big.html")])
    assert result.exit_code == 0, result.output  # 144 Mpx: within the viewer's bound (twice PIL's), never decoded


@pytest.mark.parametrize("image", ["fifo.png", "zero.png", "bomb.png", "loop-a.png"])
def test_fill_inputs_refuse_fifos_devices_and_bombs(world, image):
    """`mpp fill` / the fill node read their plate, mask and semantic map through the same image check."""
    from moviepostproduction.fill.inputs import read_fill_inputs

    with pytest.raises(ValidationError) as info:
        read_fill_inputs(str(world / image), str(world / "good.png"))
    assert str(info.value).startswith("image: ") and VIEW[image] in str(info.value)
