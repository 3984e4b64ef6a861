"""Writes golden.png: a 96x80 crop of scikit-image's `coffee` photo, the golden test's input.

python tests/data/make_golden.py
"""

from pathlib import Path

from PIL import Image
from skimage import data

if __name__ == "__main__":
    crop = data.coffee()[100:260, 150:342]  # a cup rim and saucer: a real photo, not a flat colour
    Image.fromarray(crop).resize((96, 80), Image.Resampling.LANCZOS).save(
        Path(__file__).with_name("golden.png")
    )
