"""The main job: torchrun training of a small tensor-parallel GPT with dist_ortho (``python -m dist_ortho.train``)."""
