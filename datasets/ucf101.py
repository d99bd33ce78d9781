from .base import Benchmark


class UCF101(Benchmark):
    name = "ucf101"
    folders = ("ucf101", "UCF101")
    image_dir = "UCF-101-midframes"
    split_file = "split_zhou_UCF101.json"
    clip_template = "a photo of a person doing {}."
