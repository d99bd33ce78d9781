from .base import Benchmark


class Caltech101(Benchmark):
    name = "caltech101"
    folders = ("caltech-101", "Caltech101")
    image_dir = "101_ObjectCategories"
    split_file = "split_zhou_Caltech101.json"
