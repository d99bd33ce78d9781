"""The pretrained sandbox: the tiny CLIP contrastively pretrained on the synthetic world
(datasets/synthetic.py), so methods can be compared offline with real zero-shot transfer.
`python -m so.sandbox.pretrain` builds the checkpoint; model=tiny_pretrained builds it on first use."""

CHECKPOINT = "so-sandbox.bin"  # so.model.build_clip pretrains a missing file of this name first
