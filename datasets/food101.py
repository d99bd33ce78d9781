from .base import Benchmark


class Food101(Benchmark):
    name = "food101"
    folders = ("food-101", "Food101")
    image_dir = "images"
    split_file = "split_zhou_Food101.json"
    clip_template = "a photo of {}, a type of food."
