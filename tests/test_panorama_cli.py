"""`mpp panorama` and `mpp view` end to end: a composed panorama with a ref wrapping the seam, the offline 360
viewer rendered in headless Chromium, and one-line errors for bad input (before any weights load)."""

from __future__ import annotations

import contextlib
import http.server
import json
import re
import shutil
import socketserver
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from moviepostproduction.cli import app
from moviepostproduction.compose.modules import CompositionAdapter
from moviepostproduction.toyworld.tiny import write_tiny_model_dir

from helpers import randomize_zero_inits

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
WRAP = [0.8, 0.2, 0.2, 0.8]  # x0 > x1: columns [0.8, 1) and [0, 0.2)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny random dir whose adapter branches are randomised (zero-init branches would ignore the refs)."""
    root = write_tiny_model_dir(tmp_path_factory.mktemp("model") / "tiny", seed=0)
    adapter = CompositionAdapter.from_pretrained(root / "adapter")
    randomize_zero_inits(adapter, std=0.3)
    adapter.save_pretrained(root / "adapter")
    return root


def write_scene(folder: Path, refs: list[dict], name: str = "pano.json", **extra) -> Path:
    shutil.copytree(EXAMPLES / "refs", folder / "refs", dirs_exist_ok=True)
    data = {"caption": "a red circle", "width": 256, "height": 128, "panorama": True, "seed": 1, "refs": refs}
    path = folder / name
    path.write_text(json.dumps({**data, **extra}))
    return path


def column_change(a: Path, b: Path) -> np.ndarray:
    """(W,) mean absolute difference per column of two PNGs, in 0-255 units."""
    x, y = (np.asarray(Image.open(p).convert("RGB"), dtype=np.float64) for p in (a, b))
    return np.abs(x - y).mean(axis=(0, 2))


# ----------------------------------------------------------------------------------- compose on a panorama
def test_cli_panorama_scene_with_a_ref_wrapping_the_seam_acts_on_both_edges(model_dir, tmp_path):
    ref = {"image": "refs/red_circle.png", "bbox": WRAP, "depth": "fg", "caption": "a red circle"}
    with_ref, empty = write_scene(tmp_path, [ref]), write_scene(tmp_path, [], name="empty.json")
    outs = [tmp_path / "with.png", tmp_path / "empty.png"]
    for scene, out in zip((with_ref, empty), outs, strict=True):
        args = ["panorama", "--scene", str(scene), "-o", str(out), "--model", str(model_dir), "--steps", "1"]
        result = CliRunner().invoke(app, [*args, "--html"])
        assert result.exit_code == 0, result.output
        seams = r"\(256x128\), seam ratio \d+\.\d{3} \(tokens \d+\.\d{3}\), rotated view \d+\.\d{3}"
        assert re.search(seams, result.output), result.output
    image = Image.open(outs[0])
    assert image.size == (256, 128) and image.text["mpp:projection"] == "equirect"
    assert image.text["mpp:caption"] == "a red circle"
    assert outs[0].with_suffix(".html").read_text().startswith("<!DOCTYPE html>")

    change = column_change(*outs)  # what the ref did, per column
    left, right, middle = change[: int(0.2 * 256)], change[int(0.8 * 256) :], change[int(0.3 * 256) : int(0.7 * 256)]
    assert left.mean() > 2 * middle.mean() and right.mean() > 2 * middle.mean(), (left.mean(), right.mean())
    assert left.mean() > 0.5  # in 0-255 units: the ref visibly changes both edges


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "args, field",
    [
        (["--caption", "x", "--height", "72"], "height: must be a positive multiple of 16"),
        (["--caption", "x", "--scene", "{scene}"], "--caption: give exactly one of --caption or --scene"),
        ([], "--caption: give exactly one of --caption or --scene"),
        (["--caption", "x", "--roll", "sideways"], "roll: must be one of off, fixed, random (got 'sideways')"),
        (["--caption", "x", "--pad-ids", "diagonal"], "pad_ids: must be one of opposite, continuous"),
        (["--caption", "x", "--pad", "-1"], "pad: must be an integer >= 0 (got -1)"),
        (["--scene", "{scene}", "--height", "128"], "--height: the scene sets the size"),
        (["--scene", "{flat}"], "is not a panorama scene (got False)"),
    ],
)
def test_cli_panorama_bad_input_exits_2_with_one_line_before_loading_weights(tmp_path, args, field):
    scene, flat = write_scene(tmp_path, []), write_scene(tmp_path, [], name="flat.json", panorama=False)
    args = [a.format(scene=scene, flat=flat) for a in args]
    out = tmp_path / "out.png"
    result = CliRunner().invoke(app, ["panorama", *args, "-o", str(out), "--model", str(tmp_path / "no-model")])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and field in lines[0], result.output
    assert not out.exists()


# ------------------------------------------------------------------------------------------------ the viewer
def quadrant_panorama(path: Path, height: int = 64) -> Path:
    """Longitude quadrants red | green | blue | yellow (u = 0 at the left edge), a white polar cap on top."""
    img = np.zeros((height, 2 * height, 3), dtype=np.uint8)
    for i, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]):
        img[:, i * height // 2 : (i + 1) * height // 2] = colour
    img[: height // 8] = 255
    Image.fromarray(img).save(path)
    return path


class _Recorder(http.server.BaseHTTPRequestHandler):
    """A proxy that answers every request with 404 and records it: nothing leaves the machine."""

    seen: list[str]

    def _record(self) -> None:
        self.seen.append(f"{self.command} {self.path}")
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_POST = do_HEAD = do_CONNECT = _record

    def log_message(self, *args) -> None:  # quiet
        pass


@contextlib.contextmanager
def recording_proxy() -> Iterator[tuple[int, list[str]]]:
    seen: list[str] = []
    handler = type("Recorder", (_Recorder,), {"seen": seen})
    with socketserver.ThreadingTCPServer(("127.0.0.1", 0), handler) as server:
        server.daemon_threads = True
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield server.server_address[1], seen
        finally:
            server.shutdown()


# Hosts Chromium itself contacts at start-up (time sync, sign-in, component updates), not the page.
BROWSER_SERVICES = re.compile(
    r"^(?:(?:GET|POST|HEAD) http://|CONNECT )"
    r"(?:(?:www|accounts|clients\d*)\.google\.com|(?:update|optimizationguide-pa)\.googleapis\.com|redirector\.gvt1\.com)"
    r"[:/]"
)


def page_requests(seen: list[str]) -> list[str]:
    return [r for r in seen if not BROWSER_SERVICES.search(r)]


def screenshot(page: Path, out: Path, port: int, profile: Path, fragment: str = "") -> np.ndarray:
    """Render `page` (file URL + #fragment) in headless Chromium through the recording proxy: (H, W, 3) uint8."""
    cmd = [
        CHROMIUM, "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run", "--disable-extensions",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--proxy-server=http://127.0.0.1:{port}", "--proxy-bypass-list=<-loopback>",
        "--host-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1", f"--user-data-dir={profile}",
        "--force-device-scale-factor=1", "--window-size=320,240", "--virtual-time-budget=4000",
        f"--screenshot={out}", page.resolve().as_uri() + fragment,
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert done.returncode == 0 and out.is_file(), done.stderr[-2000:]
    return np.asarray(Image.open(out).convert("RGB"))


def dominant(pixels: np.ndarray) -> tuple[str, float]:
    """The palette colour most pixels are nearest to, and the fraction of pixels that are."""
    palette = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0)}
    names = list(palette)
    dist = np.stack([np.abs(pixels.astype(int) - c).sum(-1) for c in palette.values()])  # (4, H, W)
    nearest = dist.argmin(0)
    counts = np.bincount(nearest.ravel(), minlength=len(names))
    return names[int(counts.argmax())], float(counts.max() / nearest.size)


@pytest.mark.skipif(CHROMIUM is None, reason="needs a chromium binary on PATH for the headless render")
def test_view_writes_an_offline_viewer_that_renders_the_panorama_in_headless_chromium(tmp_path):
    pano = quadrant_panorama(tmp_path / "pano.png")
    result = CliRunner().invoke(app, ["view", str(pano), "-o", str(tmp_path / "out" / "pano.html")])
    assert result.exit_code == 0, result.output
    alone = tmp_path / "alone"  # the page alone in an empty folder: nothing beside it to load
    alone.mkdir()
    page = Path(shutil.move(tmp_path / "out" / "pano.html", alone / "pano.html"))
    html = page.read_text()
    assert "default-src 'none'" in html and not re.search(r"(?i)\b(?:https?|wss?|ftp)://", html)

    leaky = alone / "leaky.html"  # control: the proxy does see a page's own request
    leaky.write_text('<!DOCTYPE html><img src="http://mpp-viewer-test.invalid/x.png">')
    with recording_proxy() as (port, seen):
        screenshot(leaky, tmp_path / "leaky.png", port, tmp_path / "profile-leak")
        assert any("mpp-viewer-test.invalid" in r for r in page_requests(seen)), seen
        seen.clear()
        # yaw 0 looks at the image centre (u = 0.5): green on the left, blue on the right. yaw 180 looks at the
        # seam (u = 0): yellow (the right edge) continues into red (the left edge).
        views = {
            "": ("green", "blue"),
            "#yaw=180": ("yellow", "red"),
            "#yaw=180&renderer=2d": ("yellow", "red"),
        }
        for i, (fragment, (left, right)) in enumerate(views.items()):
            shot = screenshot(page, tmp_path / f"shot{i}.png", port, tmp_path / f"profile{i}", fragment)
            assert shot.shape == (240, 320, 3) and shot.reshape(-1, 3).std(0).max() > 40  # not one flat colour
            band = shot[60:180]  # clear of the polar cap and the help line
            for part, want in ((band[:, :100], left), (band[:, 220:], right)):
                colour, share = dominant(part)
                assert colour == want and share > 0.9, (fragment, want, colour, share)
        assert page_requests(seen) == [], seen


def test_view_missing_or_unreadable_image_exits_2_with_one_line(tmp_path):
    garbage = tmp_path / "garbage.png"
    garbage.write_text("not an image")
    for image, message in ((tmp_path / "none.png", "no such file"), (garbage, "cannot be read as an image")):
        result = CliRunner().invoke(app, ["view", str(image), "-o", str(tmp_path / "view.html")])
        lines = result.output.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1 and f"image: {message}" in lines[0], result.output
    assert not (tmp_path / "view.html").exists()
