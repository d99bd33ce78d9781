from .base import Benchmark


class DTD(Benchmark):
    name = "dtd"
    folders = ("dtd", "DTD")
    image_dir = "images"
    split_file = "split_zhou_DescribableTextures.json"
    clip_template = "{} texture."
