from .base import Benchmark


class OxfordPets(Benchmark):
    name = "oxford_pets"
    folders = ("oxford_pets", "OxfordPets")
    image_dir = "images"
    split_file = "split_zhou_OxfordPets.json"
    clip_template = "a photo of a {}, a type of pet."
