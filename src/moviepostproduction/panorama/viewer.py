"""A self-contained HTML 360-degree viewer for equirectangular panoramas (`mpp view pano.png -o pano.html`).

One file: the image is embedded as a base64 data URL and a small renderer maps each screen pixel's view ray
to longitude / latitude and samples the panorama there (WebGL fragment shader, or the same maths on a 2D
canvas when WebGL is unavailable). Drag to look around, wheel or +/- to zoom, arrow keys to turn. The view
can be set from the URL hash, e.g. `pano.html#yaw=90&pitch=10&fov=75` (degrees; `renderer=2d` forces the
canvas path). A Content-Security-Policy forbids every network request, so the page works offline.
"""

from __future__ import annotations

import base64
import html
import io
import logging
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from moviepostproduction.errors import FileProblem, Problem, ValidationError
from moviepostproduction.files import resolve_input, write_text_atomic
from moviepostproduction.scene import open_image

logger = logging.getLogger(__name__)

__all__ = ["panorama_html", "write_viewer"]

_EMBED_AS_IS = {"PNG": "image/png", "JPEG": "image/jpeg"}

# Placeholders __TITLE__ and __DATA_URL__ are substituted; everything else is literal HTML / JS.
_TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy"
 content="default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>__TITLE__</title>
<style>
html, body { margin: 0; height: 100%; overflow: hidden; background: #000; }
canvas { display: block; width: 100vw; height: 100vh; cursor: grab; touch-action: none; }
#hud { position: fixed; left: 8px; bottom: 6px; color: #ddd; font: 12px sans-serif; opacity: .7; }
</style></head>
<body><canvas id="view"></canvas><div id="hud">drag to look around &middot; wheel to zoom</div>
<script>
"use strict";
const SRC = "__DATA_URL__";
const D2R = Math.PI / 180;
const view = { yaw: 0, pitch: 0, fov: 90 };  // degrees; yaw 0 looks at the image centre
for (const part of location.hash.slice(1).split("&")) {
  const [k, v] = part.split("=");
  if (k in view && isFinite(parseFloat(v))) view[k] = parseFloat(v);
}
const force2d = /renderer=2d/.test(location.hash);
const canvas = document.getElementById("view");

function clampView() {
  view.pitch = Math.max(-89.9, Math.min(89.9, view.pitch));
  view.fov = Math.max(20, Math.min(120, view.fov));
  view.yaw = ((view.yaw % 360) + 540) % 360 - 180;
}

// Ray of screen point (sx, sy) in [-1, 1] (y up) -> panorama (u, v) in [0, 1); same maths as the shader.
function rayToUv(sx, sy, aspect, t, cp, sp, cy, sy_) {
  let x = sx * t * aspect, y = sy * t, z = 1;
  const n = Math.hypot(x, y, z); x /= n; y /= n; z /= n;
  const y1 = y * cp + z * sp, z1 = -y * sp + z * cp;       // pitch about the x axis
  const x2 = x * cy + z1 * sy_, z2 = -x * sy_ + z1 * cy;   // yaw about the y axis
  const lon = Math.atan2(x2, z2), lat = Math.asin(Math.max(-1, Math.min(1, y1)));
  let u = lon / (2 * Math.PI) + 0.5; u -= Math.floor(u);
  return [u, 0.5 - lat / Math.PI];
}

function makeGl(img) {
  const gl = canvas.getContext("webgl", { preserveDrawingBuffer: true });
  if (!gl) return null;
  const vs = "attribute vec2 p; void main() { gl_Position = vec4(p, 0.0, 1.0); }";
  const fs = `precision highp float;
    uniform sampler2D pano; uniform vec2 res; uniform float t, yaw, pitch;
    void main() {
      vec2 s = gl_FragCoord.xy / res * 2.0 - 1.0;
      vec3 d = normalize(vec3(s.x * t * res.x / res.y, s.y * t, 1.0));
      float cp = cos(pitch), sp = sin(pitch), cy = cos(yaw), sy = sin(yaw);
      d = vec3(d.x, d.y * cp + d.z * sp, -d.y * sp + d.z * cp);
      d = vec3(d.x * cy + d.z * sy, d.y, -d.x * sy + d.z * cy);
      float u = fract(atan(d.x, d.z) / 6.283185307 + 0.5);
      float v = 0.5 - asin(clamp(d.y, -1.0, 1.0)) / 3.141592654;
      gl_FragColor = texture2D(pano, vec2(u, v));
    }`;
  const prog = gl.createProgram();
  for (const [type, src] of [[gl.VERTEX_SHADER, vs], [gl.FRAGMENT_SHADER, fs]]) {
    const sh = gl.createShader(type); gl.shaderSource(sh, src); gl.compileShader(sh);
    if (!gl.getShaderParameter(sh, gl.COMPILE_STATUS)) return null;
    gl.attachShader(prog, sh);
  }
  gl.linkProgram(prog);
  if (!gl.getProgramParameter(prog, gl.LINK_STATUS)) return null;
  gl.useProgram(prog);
  gl.bindBuffer(gl.ARRAY_BUFFER, gl.createBuffer());
  gl.bufferData(gl.ARRAY_BUFFER, new Float32Array([-1, -1, 1, -1, -1, 1, 1, 1]), gl.STATIC_DRAW);
  const loc = gl.getAttribLocation(prog, "p");
  gl.enableVertexAttribArray(loc); gl.vertexAttribPointer(loc, 2, gl.FLOAT, false, 0, 0);
  // Non-power-of-two textures in WebGL 1: no mipmaps, clamped edges (the shader wraps u itself).
  let src = img;
  const max = gl.getParameter(gl.MAX_TEXTURE_SIZE);
  if (img.width > max || img.height > max) {
    const k = max / Math.max(img.width, img.height);
    src = document.createElement("canvas");
    src.width = Math.floor(img.width * k); src.height = Math.floor(img.height * k);
    src.getContext("2d").drawImage(img, 0, 0, src.width, src.height);
  }
  gl.bindTexture(gl.TEXTURE_2D, gl.createTexture());
  gl.texImage2D(gl.TEXTURE_2D, 0, gl.RGBA, gl.RGBA, gl.UNSIGNED_BYTE, src);
  for (const [k, v] of [[gl.TEXTURE_MIN_FILTER, gl.LINEAR], [gl.TEXTURE_MAG_FILTER, gl.LINEAR],
                        [gl.TEXTURE_WRAP_S, gl.CLAMP_TO_EDGE], [gl.TEXTURE_WRAP_T, gl.CLAMP_TO_EDGE]]) {
    gl.texParameteri(gl.TEXTURE_2D, k, v);
  }
  const u = (n) => gl.getUniformLocation(prog, n);
  return () => {
    gl.viewport(0, 0, canvas.width, canvas.height);
    gl.uniform2f(u("res"), canvas.width, canvas.height);
    gl.uniform1f(u("t"), Math.tan(view.fov * D2R / 2));
    gl.uniform1f(u("yaw"), view.yaw * D2R);
    gl.uniform1f(u("pitch"), view.pitch * D2R);
    gl.drawArrays(gl.TRIANGLE_STRIP, 0, 4);
  };
}

function make2d(img) {
  const ctx = canvas.getContext("2d");
  const srcCanvas = document.createElement("canvas");
  srcCanvas.width = img.width; srcCanvas.height = img.height;
  const sctx = srcCanvas.getContext("2d"); sctx.drawImage(img, 0, 0);
  const src = sctx.getImageData(0, 0, img.width, img.height).data;
  return () => {
    const w = canvas.width, h = canvas.height, out = ctx.createImageData(w, h);
    const t = Math.tan(view.fov * D2R / 2), p = view.pitch * D2R, y = view.yaw * D2R;
    const cp = Math.cos(p), sp = Math.sin(p), cy = Math.cos(y), sy = Math.sin(y);
    for (let j = 0; j < h; j++) {
      for (let i = 0; i < w; i++) {
        const [u, v] = rayToUv((i + 0.5) / w * 2 - 1, 1 - (j + 0.5) / h * 2, w / h, t, cp, sp, cy, sy);
        const si = Math.min(img.width - 1, Math.floor(u * img.width));
        const sj = Math.min(img.height - 1, Math.floor(v * img.height));
        const a = (sj * img.width + si) * 4, b = (j * w + i) * 4;
        out.data[b] = src[a]; out.data[b + 1] = src[a + 1]; out.data[b + 2] = src[a + 2]; out.data[b + 3] = 255;
      }
    }
    ctx.putImageData(out, 0, 0);
  };
}

const img = new Image();
img.onload = () => {
  let draw = force2d ? null : makeGl(img);
  document.body.dataset.renderer = draw ? "webgl" : "2d";
  const pixelScale = draw ? (window.devicePixelRatio || 1) : 0.5;  // the 2D path renders at half size
  if (!draw) draw = make2d(img);
  let queued = false;
  const render = () => { queued = false; clampView(); draw(); document.body.dataset.ready = "1"; };
  const request = () => { if (!queued) { queued = true; requestAnimationFrame(render); } };
  const resize = () => {
    canvas.width = Math.max(1, Math.round(canvas.clientWidth * pixelScale));
    canvas.height = Math.max(1, Math.round(canvas.clientHeight * pixelScale));
    request();
  };
  window.addEventListener("resize", resize);
  let drag = null;
  canvas.addEventListener("pointerdown", (e) => {
    drag = [e.clientX, e.clientY]; canvas.setPointerCapture(e.pointerId); canvas.style.cursor = "grabbing";
  });
  canvas.addEventListener("pointerup", () => { drag = null; canvas.style.cursor = "grab"; });
  canvas.addEventListener("pointermove", (e) => {
    if (!drag) return;
    const k = view.fov / canvas.clientHeight;  // degrees per CSS pixel: the scene follows the pointer
    view.yaw -= (e.clientX - drag[0]) * k; view.pitch += (e.clientY - drag[1]) * k;
    drag = [e.clientX, e.clientY]; request();
  });
  canvas.addEventListener("wheel", (e) => {
    e.preventDefault(); view.fov *= Math.exp(e.deltaY * 0.001); request();
  }, { passive: false });
  window.addEventListener("keydown", (e) => {
    const step = { ArrowLeft: [-5, 0, 1], ArrowRight: [5, 0, 1], ArrowUp: [0, 5, 1], ArrowDown: [0, -5, 1],
                   "+": [0, 0, 0.9], "=": [0, 0, 0.9], "-": [0, 0, 1.1] }[e.key];
    if (!step) return;
    view.yaw += step[0]; view.pitch += step[1]; view.fov *= step[2]; request();
  });
  resize();
};
img.src = SRC;
</script></body></html>
"""


def _embedded(path: Path) -> tuple[str, tuple[int, int]]:
    """(data URL, (width, height)); PNG and JPEG bytes are embedded unchanged, other formats as PNG. A FIFO or a
    device is refused unopened, and an image of more than twice PIL's MAX_IMAGE_PIXELS (16384 x 8192 passes)
    before any pixel is decoded (a decompression bomb: the browser would decode it all)."""
    try:
        with open_image(resolve_input(path), 2 * (Image.MAX_IMAGE_PIXELS or 0) or None) as (fh, im):
            size, fmt = im.size, im.format
            if fmt in _EMBED_AS_IS:
                fh.seek(0)
                data, mime = fh.read(), _EMBED_AS_IS[fmt]
            else:
                buf = io.BytesIO()
                im.convert("RGB").save(buf, format="PNG")
                data, mime = buf.getvalue(), "image/png"
    except FileProblem as exc:
        raise ValidationError([Problem("image", str(path), "no such file" if exc.missing else exc.reason)]) from None
    except (UnidentifiedImageError, OSError) as exc:
        reason = "not a format Pillow knows" if isinstance(exc, UnidentifiedImageError) else exc
        raise ValidationError([Problem("image", str(path), f"cannot be read as an image ({reason})")]) from None
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}", size


def panorama_html(image: str | Path, *, title: str | None = None) -> str:
    """The viewer page for an equirectangular image file, as one self-contained HTML string."""
    path = Path(image)
    url, (width, height) = _embedded(path)
    if width != 2 * height:
        logger.warning(
            "%s is %dx%d, not 2:1: it will be shown stretched as an equirectangular panorama", path, width, height
        )
    return _TEMPLATE.replace("__TITLE__", html.escape(title or path.name)).replace("__DATA_URL__", url)


def write_viewer(image: str | Path, output: str | Path, *, title: str | None = None) -> Path:
    """Write `panorama_html(image)` to `output` (atomically: `files.write_text_atomic`) and return its path."""
    return write_text_atomic(panorama_html(image, title=title), output)
