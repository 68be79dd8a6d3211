"""ComfyUI node pack over the Python API (docs/comfyui.md).

ComfyUI reads `NODE_CLASS_MAPPINGS` and `NODE_DISPLAY_NAME_MAPPINGS` from a custom-node folder; the folder
`comfyui_node/` at the repository root re-exports these two. Importing this package does not import ComfyUI,
diffusers or transformers: the pipelines load when a node first runs.
"""

from __future__ import annotations

from moviepostproduction.comfyui.compose_node import MppCompose
from moviepostproduction.comfyui.fill_node import MppFill, MppLoadFillModel
from moviepostproduction.comfyui.flux_files import MppLoadFluxFiles
from moviepostproduction.comfyui.model import MppLoadModel, MppModel
from moviepostproduction.comfyui.panorama_node import MppPanorama
from moviepostproduction.comfyui.scene_nodes import MppAddReference, MppLoadScene, MppScene
from moviepostproduction.comfyui.vary_node import MppVary

NODES = {
    "MPPLoadModel": (MppLoadModel, "MPP Load Model"),
    "MPPLoadFluxFiles": (MppLoadFluxFiles, "MPP Load FLUX Files"),
    "MPPScene": (MppScene, "MPP Scene"),
    "MPPAddReference": (MppAddReference, "MPP Add Reference"),
    "MPPLoadScene": (MppLoadScene, "MPP Load Scene File"),
    "MPPCompose": (MppCompose, "MPP Compose"),
    "MPPPanorama": (MppPanorama, "MPP Panorama"),
    "MPPVary": (MppVary, "MPP Vary"),
    "MPPLoadFillModel": (MppLoadFillModel, "MPP Load Fill Model"),
    "MPPFill": (MppFill, "MPP Fill"),
}

NODE_CLASS_MAPPINGS = {key: cls for key, (cls, _) in NODES.items()}
NODE_DISPLAY_NAME_MAPPINGS = {key: name for key, (_, name) in NODES.items()}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "MppModel"]
