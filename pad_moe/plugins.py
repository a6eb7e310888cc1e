"""The built-in plugin modules: importing one registers what it provides (``pad_moe.train.registry.register_job``).

A new training job adds its module here; the trainer (``pad_moe.train``) never names a track.
"""

JOB_MODULES: tuple[str, ...] = (
    "pad_moe.toy",          # model.arch=toy: the tiny encoder on the synthetic task
    "pad_moe.models.job",   # model.arch=hf: an upcycled Hugging Face encoder on a GLUE / VADER task
    "pad_moe.vision.job",   # model.arch=vision: PAD-DyConv CNNs on images
    "pad_moe.switch.job",   # model.arch=switch: Switch span-corruption pre-training
    "pad_moe.lm.job",       # model.arch=causal_lm: a Hugging Face decoder LM on a text corpus
)
