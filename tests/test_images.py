import numpy as np
import pytest
from PIL import Image

from data.errors import MissingFileError, UserError
from data.images import load_image


def test_path_bytes_and_pil_give_the_same_pixels(tmp_path):
    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 256, (30, 50, 3), dtype=np.uint8))
    path = tmp_path / "p.png"
    picture.save(path)
    from_path = load_image(str(path), 16)
    from_bytes = load_image(path.read_bytes(), 16)
    from_pil = load_image(picture, 16)
    assert from_path.shape == (16, 16, 3) and from_path.dtype == np.uint8
    assert np.array_equal(from_path, from_bytes) and np.array_equal(from_path, from_pil)
    # the whole picture is squeezed to the square (no crop): the bicubic resize of all of it
    expected = np.asarray(picture.resize((16, 16), Image.Resampling.BICUBIC))
    assert np.array_equal(from_path, expected)


def test_greyscale_and_alpha_become_rgb():
    grey = Image.fromarray(np.full((8, 8), 200, dtype=np.uint8), mode="L")
    assert np.all(load_image(grey, 8) == 200)
    rgba = Image.fromarray(np.full((8, 8, 4), 100, dtype=np.uint8), mode="RGBA")
    assert load_image(rgba, 8).shape == (8, 8, 3)


def test_unreadable_image_names_the_file(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(UserError, match="broken.jpg"):  # a user error: one "error:" line, no traceback
        load_image(str(bad), 8)
    with pytest.raises(UserError, match="not a readable image"):
        load_image(b"\xff\xd8garbage", 8)
    with pytest.raises(MissingFileError, match="missing.png: no such image file"):
        load_image(str(tmp_path / "missing.png"), 8)
