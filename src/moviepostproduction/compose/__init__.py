"""compose (the main job): a caption + placed references -> one shot (DESIGN 1-4).

conditioning.py (regions, packing), modules/ (one file per seed concept), assemble.py / assemble_rows.py
(Assemble-Attn), flux.py (injection into diffusers' FluxTransformer2DModel), prepare.py (what a scene needs at every
step, built once), pipeline.py (ComposePipeline).
"""
