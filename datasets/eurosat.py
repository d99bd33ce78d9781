from .base import Benchmark


class EuroSAT(Benchmark):
    """CoOp's split file already holds the long class names ("Annual Crop Land", ...)."""

    name = "eurosat"
    folders = ("eurosat",)
    image_dir = "2750"
    split_file = "split_zhou_EuroSAT.json"
    clip_template = "a centered satellite photo of {}."
