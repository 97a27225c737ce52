"""The model vocabulary that samplers, the learner, evaluation and the tasks share; it imports none of them.

- ``models.adapter``: the ``FlowModel`` protocol, ``PromptEmbeds`` and the SD3 / SD3.5 adapter;
- ``models.flux``: the FLUX.1 (dev, schnell) adapter: packed latents, embedded guidance, its own schedule shift;
- ``models.device``: dtype names and device choice;
- ``models.lora``: which parameters train (LoRA targets, LoRA or full weights) and the broadcast set;
- ``models.euler``: plain Euler sampling on a model's own schedule (inference, evaluation, pretraining);
- ``models.images``: decoded images to uint8 [B, H, W, 3] (what rewards take) and image grids;
- ``models.tiny``: the random-weight tiny SD3 and FLUX built offline (tests, the ``tiny-cpu`` and ``tiny-flux`` presets).
"""
