from .base import Benchmark


class SUN397(Benchmark):
    name = "sun397"
    folders = ("sun397", "SUN397")
    image_dir = "SUN397"
    split_file = "split_zhou_SUN397.json"
