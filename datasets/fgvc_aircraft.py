from .base import Benchmark, datasets_md, make_record, path_inside


class FGVCAircraft(Benchmark):
    """No split JSON: the official annotation files. Class order is the line order of variants.txt;
    each line of images_variant_<split>.txt is "<image id> <variant name with spaces>"."""

    name = "fgvc_aircraft"
    folders = ("fgvc_aircraft", "fgvc-aircraft-2013b/data")  # CoOp/forks; the official archive's own tree
    image_dir = "images"
    split_file = "variants.txt"
    clip_template = "a photo of a {}, a type of aircraft."

    def read_splits(self):
        variants = [line.strip() for line in self.lines(self.source) if line.strip()]
        labels = {v: i for i, v in enumerate(variants)}
        splits = {}
        for split in ("train", "val", "test"):
            path = self.dir / f"images_variant_{split}.txt"
            records = []
            for n, line in enumerate(self.lines(path), 1):
                if not line.strip():
                    continue
                image_id, _, variant = line.strip().partition(" ")
                if variant not in labels:
                    raise ValueError(f"{self.name}: {path} line {n}: variant {variant!r} is not in {self.source} "
                                     f"({datasets_md(self.name)})")
                image = path_inside(self.dir, f"{image_id}.jpg", f"{self.name}: {path} line {n}", under=self.image_dir)
                records.append(make_record(image, labels[variant], variant))
            splits[split] = records
        return splits

    def lines(self, path):
        if not path.is_file():
            raise FileNotFoundError(f"{self.name}: annotation file {path} is missing ({datasets_md(self.name)})")
        return path.read_text(encoding="utf-8").splitlines()
