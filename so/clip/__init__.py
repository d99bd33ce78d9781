"""The CLIP harness (the `clip` extra: open_clip, peft, pytorch-optimizer): what the programs main.py,
train.py and trial.py are built from, usable without them.

    model, weights, lora     CLIP through open_clip, its weights files, LoRA/DoRA layers
    methods, relora          what trains (method=): weight subsets, adapters, ReLoRA's restarts
    optimizers, galore       how it steps (optimizer=): SO, Adam, AdamW, GaLore
    config, runtime, step    config checks, device/precision/compile, one training iteration
    runs, tracking, updates  a trial's identity, W&B, SO's update counts
    pretrain                 contrastive pretraining (the sandbox model)
"""
