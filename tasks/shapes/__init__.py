"""The shapes task, the embedded default: everything about it lives here.

- ``world``: the prompt grammar, the fixed train / held-out split, the renderer and the programmatic judge;
- ``model``: the shipped base model (a tiny latent SD3 + VAE conditioned through MiniLM), files in ``weights/``;
- ``pretrain_vae`` / ``pretrain``: the scripts that rebuild those weights.

The reward plugin (``rewards/shapes.py``) and the model builder (``cluster/build.py``) reach it from here.
"""
