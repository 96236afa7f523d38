"""
Images as the model sees them: RGB, uint8, resized straight to a square.

Every path that turns a picture into model input goes through load_image: the data preparers
(captions, conversations, benchmarks) and sample.py. Training and inference therefore see
pictures prepared by one rule:
  - decode with Pillow and convert to RGB (greyscale, palette, CMYK images too); a picture with
    transparency (RGBA, LA, a palette or greyscale with a transparent colour) is composited onto
    white first, as the Hugging Face SigLIP processor does (dropping alpha would turn transparent
    pixels into whatever colour they hold, often black);
  - resize the whole picture to size x size with bicubic interpolation, no crop and no
    padding, so wide pictures are squeezed. This is how SigLIP was trained and how its
    Hugging Face image processor prepares inputs (do_resize to 224 x 224, bicubic, no crop).
Scaling to [-1, 1] (SigLIP's mean 0.5, std 0.5) happens inside the model, on the GPU.
"""

import io

import numpy as np
from PIL import Image

from data.errors import MissingFileError, UserError


def load_image(source, size):
    """A picture (a file path, its encoded bytes, or a PIL image) as uint8 [size, size, 3].
    Raises a UserError naming the source when Pillow cannot read it (a user's picture or a
    dataset's row: the preparers skip and count such rows)."""
    name = source if isinstance(source, str) else f"<{type(source).__name__}>"
    try:
        if isinstance(source, Image.Image):
            image = source
        elif isinstance(source, (bytes, bytearray, memoryview)):
            image = Image.open(io.BytesIO(source))
        else:
            image = Image.open(source)
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            image = image.convert("RGBA")
            image = Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image)
        image = image.convert("RGB")
    except FileNotFoundError:
        raise MissingFileError(f"{name}: no such image file") from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"{name}: not a readable image ({e})") from None
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(image, dtype=np.uint8).copy()
