"""fill: FLUX-Fill masked repainting with a semantic map and refs (seed 004): 384-channel inputs, semantic
cross-attention, pipeline."""
