from .base import Benchmark


class StanfordCars(Benchmark):
    name = "stanford_cars"
    folders = ("stanford_cars", "StanfordCars")
    image_dir = "."  # split paths already start with cars_train/ or cars_test/
    split_file = "split_zhou_StanfordCars.json"
