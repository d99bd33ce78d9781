from .base import Benchmark


class OxfordFlowers(Benchmark):
    name = "oxford_flowers"
    folders = ("oxford_flowers", "Flower102")
    image_dir = "jpg"
    split_file = "split_zhou_OxfordFlowers.json"
    clip_template = "a photo of a {}, a type of flower."
