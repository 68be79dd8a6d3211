"""Scene files (DESIGN.md section 1): loading, validation problems named by field path, and `mpp validate`."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from moviepostproduction.cli import app
from moviepostproduction.errors import MppError, ValidationError
from moviepostproduction.scene import Reference, Scene, load_scene, scene_from_dict

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture
def scene_dir(tmp_path: Path) -> Path:
    """A folder with two small sprites in refs/, as a scene file next to it would reference them."""
    (tmp_path / "refs").mkdir()
    Image.new("RGBA", (16, 16), (255, 0, 0, 255)).save(tmp_path / "refs" / "a.png")
    Image.new("RGB", (16, 16), (0, 0, 255)).save(tmp_path / "refs" / "b.png")
    return tmp_path


def _valid() -> dict:
    return {
        "caption": "two sprites",
        "width": 512,
        "height": 256,
        "seed": 3,
        "refs": [
            {"image": "refs/a.png", "bbox": [0.1, 0.2, 0.5, 0.9], "depth": "fg", "caption": "red"},
            {"image": "refs/b.png", "bbox": [0.5, 0.0, 1.0, 0.5], "depth": "bg"},
        ],
    }


def _write(folder: Path, data: object, name: str = "scene.json") -> Path:
    path = folder / name
    text = yaml.safe_dump(data) if name.endswith((".yaml", ".yml")) else json.dumps(data)
    path.write_text(text)
    return path


def _problems(path: Path, **kwargs) -> list[str]:
    with pytest.raises(ValidationError) as info:
        load_scene(path, **kwargs)
    assert all(line.startswith(f"{path}: ") for line in str(info.value).splitlines())
    return [str(p) for p in info.value.problems]


def test_json_and_yaml_examples_load_identically():
    from_json = load_scene(EXAMPLES / "scene.json")
    from_yaml = load_scene(EXAMPLES / "scene.yaml")
    assert from_json == from_yaml
    assert (from_json.width, from_json.height, from_json.seed) == (128, 128, 7)
    assert [r.depth for r in from_json.refs] == ["fg", "mg", "bg"]
    assert all(r.image.is_absolute() and r.image.parent == EXAMPLES / "refs" for r in from_json.refs)


def test_example_refs_are_small_pngs():
    for ref in load_scene(EXAMPLES / "scene.json").refs:
        assert ref.image.stat().st_size < 10_000
        assert Image.open(ref.image).size in {(64, 64), (128, 128)}


def test_defaults(scene_dir: Path):
    scene = scene_from_dict({"caption": "  empty stage  "}, base_dir=scene_dir)
    assert (scene.caption, scene.width, scene.height, scene.seed, scene.panorama, scene.refs) == (
        "empty stage",
        1024,
        1024,
        None,
        False,
        [],
    )


def test_relative_paths_resolve_against_scene_file_folder(scene_dir: Path, tmp_path_factory, monkeypatch):
    path = _write(scene_dir, _valid())
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    scene = load_scene(path)
    assert scene.refs[0].image == (scene_dir / "refs" / "a.png").resolve()
    assert scene.base_dir == scene_dir.resolve()


def test_round_trip_keeps_relative_paths(scene_dir: Path):
    scene = load_scene(_write(scene_dir, _valid(), "scene.yaml"))
    data = scene.to_dict()
    assert [r["image"] for r in data["refs"]] == ["refs/a.png", "refs/b.png"]
    assert scene_from_dict(data, base_dir=scene_dir) == scene
    assert load_scene(_write(scene_dir, data, "copy.json")) == scene
    assert data == {**_valid(), "panorama": False}


def test_area_and_wrapping_box(scene_dir: Path):
    data = {**_valid(), "panorama": True, "width": 512, "height": 256}
    data["refs"][1]["bbox"] = [0.9, 0.0, 0.2, 0.5]
    scene = scene_from_dict(data, base_dir=scene_dir)
    assert scene.refs[0].area == pytest.approx(0.4 * 0.7)
    assert scene.refs[1].wraps and scene.refs[1].area == pytest.approx((1 - 0.9 + 0.2) * 0.5)


def test_wrapping_box_needs_panorama(scene_dir: Path):
    data = _valid()
    data["refs"][1]["bbox"] = [0.9, 0.0, 0.2, 0.5]
    problems = _problems(_write(scene_dir, data))
    hint = "(wrapping boxes need panorama: true)"
    assert problems == [f"refs[1].bbox: needs x0 < x1, got x0=0.9 > x1=0.2 {hint} (got [0.9, 0.0, 0.2, 0.5])"]
    with pytest.raises(ValueError, match=r"refs\[0\]\.bbox wraps the seam"):  # direct construction too
        Scene(caption="x", refs=[Reference(image=scene_dir / "refs/a.png", bbox=(0.9, 0.0, 0.2, 0.5))])


def test_panorama_needs_two_to_one(scene_dir: Path):
    problems = _problems(_write(scene_dir, {**_valid(), "panorama": True, "width": 512, "height": 512}))
    assert problems == ["width: a panorama needs width == 2 * height, got 512x512 (got 512)"]


def test_load_ref_images_are_rgb_with_white_behind_transparency(scene_dir: Path):
    Image.new("RGBA", (8, 4), (0, 0, 0, 0)).save(scene_dir / "refs" / "a.png")
    images = load_scene(_write(scene_dir, _valid())).load_ref_images()
    assert [(im.mode, im.size) for im in images] == [("RGB", (8, 4)), ("RGB", (16, 16))]
    assert images[0].getpixel((0, 0)) == (255, 255, 255)
    assert images[1].getpixel((0, 0)) == (0, 0, 255)


def _mutate(path: str, value: object) -> dict:
    """A valid scene with one key (dotted path, integer parts index lists) replaced or, for ..., deleted."""
    data = copy.deepcopy(_valid())
    *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
    target = data
    for part in parents:
        target = target[part]
    if value is ...:
        del target[last]
    else:
        target[last] = value
    return data


BAD = [  # (key to change, new value, field reported, words in the message)
    ("refs.0.bbox", [0.1, 0.2, 1.5, 0.9], "refs[0].bbox", "[0, 1]"),
    ("refs.0.bbox", [-0.1, 0.2, 0.5, 0.9], "refs[0].bbox", "[0, 1]"),
    ("refs.1.bbox", [0.5, 0.6, 0.7, 0.6], "refs[1].bbox", "y0 < y1"),
    ("refs.1.bbox", [0.5, 0.1, 0.5, 0.6], "refs[1].bbox", "x0 < x1"),
    ("refs.1.bbox", [0.6, 0.1, 0.5, 0.6], "refs[1].bbox", "x0 < x1"),
    ("refs.0.bbox", [0.1, 0.2, 0.5], "refs[0].bbox", "4 numbers"),
    ("refs.0.bbox", [0.1, 0.2, 0.5, 0.6, 0.7], "refs[0].bbox", "4 numbers"),
    ("refs.0.bbox", [0.1, "a", 0.5, 0.9], "refs[0].bbox", "entry 1 ('a') is not a number"),
    ("refs.0.bbox", [0.1, True, 0.5, 0.9], "refs[0].bbox", "not a number"),
    ("refs.0.bbox", "0.1 0.2 0.5 0.9", "refs[0].bbox", "list of 4 numbers"),
    ("refs.0.bbox", [0.1, 0.2, float("nan"), 0.9], "refs[0].bbox", "finite"),
    ("refs.0.bbox", [0.1, 0.2, float("inf"), 0.9], "refs[0].bbox", "finite"),
    ("refs.0.bbox", ..., "refs[0].bbox", "required key is missing"),
    ("refs.0.depth", "front", "refs[0].depth", "'fg', 'mg' or 'bg'"),
    ("refs.0.image", "refs/missing.png", "refs[0].image", "image file not found"),
    ("refs.0.image", "", "refs[0].image", "non-empty path"),
    ("refs.0.caption", "  ", "refs[0].caption", "non-empty"),
    ("refs.0.bboxx", [0.1, 0.2, 0.5, 0.9], "refs[0].bboxx", "unknown key (did you mean 'bbox'?"),
    ("refs.1", 3, "refs[1]", "mapping"),
    ("refs", "a.png", "refs", "must be a list"),
    ("caption", "   ", "caption", "non-empty"),
    ("caption", ..., "caption", "required key is missing"),
    ("caption", 5, "caption", "must be a string"),
    ("width", "big", "width", "must be an integer"),
    ("width", 500, "width", "multiple of 16"),
    ("height", 0, "height", "positive multiple of 16"),
    ("width", 512.0, "width", "must be an integer"),
    ("seed", -1, "seed", "[0, 2**64)"),
    ("seed", "7", "seed", "must be an integer"),
    ("panorama", "yes", "panorama", "true or false"),
    ("wdith", 512, "wdith", "unknown key (did you mean 'width'?"),
]


@pytest.mark.parametrize(("key", "value", "field", "words"), BAD, ids=[f"{b[0]}={b[1]!r}" for b in BAD])
def test_each_bad_input_names_field_and_value(scene_dir: Path, key, value, field, words):
    problems = _problems(_write(scene_dir, _mutate(key, value)))
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{field}: ") and words in problems[0]
    if "unknown key" in words:  # the key is named, its value never shown (it may be a password)
        assert "(got" not in problems[0]
        return
    shown = "nothing" if value is ... else repr(value)
    assert problems[0].endswith(f"(got {shown})")


def test_all_problems_are_collected(scene_dir: Path):
    data = _mutate("refs.1.depth", "far")
    data["refs"][0]["bbox"] = [0, 0, 2, 1]
    data["width"] = "big"
    fields = [p.split(":")[0] for p in _problems(_write(scene_dir, data))]
    assert sorted(fields) == ["refs[0].bbox", "refs[1].depth", "width"]


def test_corrupt_image(scene_dir: Path):
    (scene_dir / "refs" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    problems = _problems(_write(scene_dir, _valid()))
    assert len(problems) == 1 and problems[0].startswith("refs[0].image: cannot decode image file")
    assert problems[0].endswith("(got 'refs/a.png')")
    unchecked = load_scene(scene_dir / "scene.json", check_images=False)
    assert unchecked.refs[0].image.name == "a.png"
    with pytest.raises(ValidationError, match=r"^refs\[0\]\.image: cannot decode image file"):
        unchecked.load_ref_images()


def test_truncated_image(scene_dir: Path):
    Image.effect_noise((64, 64), 50).save(scene_dir / "refs" / "b.png")
    full = (scene_dir / "refs" / "b.png").read_bytes()
    (scene_dir / "refs" / "b.png").write_bytes(full[: len(full) // 2])
    assert _problems(_write(scene_dir, _valid()))[0].startswith("refs[1].image: cannot decode image file")


def test_too_many_refs(scene_dir: Path):
    path = _write(scene_dir, _valid())
    assert _problems(path, max_refs=1) == ["refs: too many refs: at most 1 allowed (max_refs) (got 2)"]
    assert len(load_scene(path, max_refs=2).refs) == 2
    data = {**_valid(), "refs": _valid()["refs"] * 26}  # 52 > the default of 50
    assert _problems(_write(scene_dir, data))[0].startswith("refs: too many refs: at most 50")


def test_malformed_json_names_line_and_column(tmp_path: Path):
    path = tmp_path / "s.json"
    path.write_text('{"caption": "x",\n "width": 512 "height": 512}')
    assert _problems(path) == [
        "line 2, column 15: invalid JSON: Expecting ',' delimiter (got '\"width\": 512 \"height\": 512}')"
    ]


def test_malformed_yaml_names_line_and_column(tmp_path: Path):
    path = tmp_path / "s.yaml"
    path.write_text("caption: x\nrefs: [a, b\nwidth: 512\n")
    (problem,) = _problems(path)
    assert problem.startswith("line 3, column 6: invalid YAML:") and problem.endswith("(got 'width: 512')")


@pytest.mark.parametrize(("name", "text", "kind"), [("s.json", "[1, 2]", "a list"), ("s.yml", "", "nothing")])
def test_top_level_must_be_a_mapping(tmp_path: Path, name, text, kind):
    (tmp_path / name).write_text(text)
    (problem,) = _problems(tmp_path / name)
    assert problem.startswith("(top level): must be a mapping") and kind in problem


def test_missing_file_and_unknown_suffix(tmp_path: Path):
    with pytest.raises(MppError, match=r"scene file not found") as info:
        load_scene(tmp_path / "nope.json")
    assert str(tmp_path / "nope.json") in str(info.value)
    (tmp_path / "s.toml").write_text("caption = 'x'")
    with pytest.raises(MppError, match=r"s\.toml: unsupported scene file suffix '\.toml'"):
        load_scene(tmp_path / "s.toml")


def test_python_api_validates_the_same(scene_dir: Path):
    with pytest.raises(ValidationError) as info:
        scene_from_dict(_mutate("refs.0.depth", "near"), base_dir=scene_dir)
    assert str(info.value) == "refs[0].depth: must be one of 'fg', 'mg' or 'bg' (got 'near')"
    with pytest.raises(ValidationError, match=r"max_refs: must be an integer >= 0 \(got -1\)"):
        scene_from_dict(_valid(), base_dir=scene_dir, max_refs=-1)


def test_cli_validate_example_lists_three_refs():
    result = CliRunner().invoke(app, ["validate", str(EXAMPLES / "scene.json")], env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    for name in ("red_circle.png", "blue_square.png", "green_triangle.png"):
        assert name in result.stdout
    assert "valid scene, 128x128, seed 7, 3 refs (fg 1, mg 1, bg 1)" in result.stdout


def test_cli_validate_bad_scene_exits_2_without_traceback(scene_dir: Path):
    data = _mutate("refs.1.depth", "far")
    data["refs"][0]["bbox"] = [0.1, 0.2, 0.5]
    data["width"] = "big"
    path = _write(scene_dir, data)
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 3 and all(line.startswith(f"error: {path}: ") for line in lines)
    assert "width: must be an integer (got 'big')" in lines[0]
    assert "refs[0].bbox" in result.stderr and "refs[1].depth" in result.stderr and "'far'" in result.stderr
    assert "Traceback" not in result.output and result.stdout == ""


def test_cli_validate_missing_file_and_max_refs(tmp_path: Path):
    missing = CliRunner().invoke(app, ["validate", str(tmp_path / "nope.yaml")])
    assert missing.exit_code == 2 and missing.stderr.startswith("error: ") and "nope.yaml" in missing.stderr
    limited = CliRunner().invoke(app, ["validate", str(EXAMPLES / "scene.yaml"), "--max-refs", "2"])
    assert limited.exit_code == 2
    assert limited.stderr.strip().endswith("refs: too many refs: at most 2 allowed (max_refs) (got 3)")
