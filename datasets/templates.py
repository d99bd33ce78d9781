"""The prompt templates of `dataset.templates`: a named set or a list of format strings with one {}.

    photo       "a photo of a {}." (the paper's, SO's and CLIP-LoRA's, for every dataset)
    clip        CoOp's per-dataset template (datasets/catalog.py), the usual zero-shot numbers
    ensemble7   the 7-template ensemble CoOp and Tip-Adapter use for ImageNet
    imagenet80  CLIP's 80 ImageNet templates

Several templates give each class the mean of their normalised text features, normalised
(so.clip.model.class_embeddings), in zero-shot evaluation and in training. The ensembles are
open_clip's own lists (open_clip.zero_shot_metadata); imported when asked for.
"""
PHOTO_TEMPLATE = "a photo of a {}."
NAMED = ("photo", "clip", "ensemble7", "imagenet80")


def check(spec):
    """A named set or a non-empty list of strings, each with exactly one {}; the config key named."""
    if isinstance(spec, str):
        if spec not in NAMED:
            raise ValueError(f"dataset.templates={spec!r}: expected one of {', '.join(NAMED)}, or a list of "
                             "templates such as ['a photo of a {{}}.', 'a sketch of a {{}}.'].")
        return
    if not (isinstance(spec, (list, tuple)) and spec and all(isinstance(t, str) and t.count("{}") == 1 for t in spec)):
        raise ValueError(f"dataset.templates={spec!r}: expected a named set ({', '.join(NAMED)}) or a non-empty "
                         "list of templates, each with exactly one {} for the class name.")


def resolve(spec, clip_template=PHOTO_TEMPLATE):
    """The list of templates of `spec`; `clip_template` is the dataset's own (CoOp's)."""
    check(spec)
    if not isinstance(spec, str):
        return list(spec)
    if spec in ("ensemble7", "imagenet80"):
        from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

        return [t("{}") for t in (SIMPLE_IMAGENET_TEMPLATES if spec == "ensemble7" else OPENAI_IMAGENET_TEMPLATES)]
    return [PHOTO_TEMPLATE] if spec == "photo" else [clip_template]
