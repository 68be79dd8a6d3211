"""panorama: seamless 360 plates (DESIGN 7): token wrap, periodic RoPE, circular VAE, pipeline, viewer."""
