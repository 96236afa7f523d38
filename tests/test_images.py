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


def test_transparency_is_composited_onto_white_as_the_siglip_processor_does():
    """The Hugging Face SigLIP processor (do_convert_rgb) blends transparent pixels onto white;
    ours must give the same pixels, else a model sees other pictures in training than in use."""
    transformers = pytest.importorskip("transformers")
    # the Pillow backend (the only one before transformers 5; the torchvision one resizes otherwise)
    processor_class = getattr(transformers, "SiglipImageProcessorPil", transformers.SiglipImageProcessor)
    processor = processor_class(size={"height": 16, "width": 16}, do_rescale=False, do_normalize=False)
    rng = np.random.default_rng(0)
    alpha = rng.integers(0, 256, (24, 40), dtype=np.uint8)
    alpha[:, :10] = 0  # fully transparent, over black
    colour = rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)
    colour[:, :10] = 0
    pictures = {"RGBA": Image.fromarray(np.dstack([colour, alpha]), mode="RGBA"),
                "LA": Image.fromarray(np.dstack([colour[..., 0], alpha]), mode="LA")}
    for mode, picture in pictures.items():
        theirs = processor(picture, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
        ours = load_image(picture, 16)
        assert np.array_equal(ours, theirs), mode
        assert ours[:, :3].min() > 200, mode  # the transparent band is white, not black
