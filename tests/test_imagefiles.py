"""ddpm.imagefiles: the image files of a folder, decoded, resized on the short side and centre-cropped."""

import io

import numpy as np
import pytest
from PIL import Image

from ddpm.errors import DataError
from ddpm.imagefiles import decode_image, image_array, image_files


def test_image_files_are_every_image_below_the_folder_sorted(tmp_path):
    (tmp_path / "b").mkdir()
    for name in ("b/2.PNG", "a.jpg", "b/1.png"):
        Image.new("L", (4, 4)).save(tmp_path / name, format="PNG" if name.lower().endswith("png") else "JPEG")
    (tmp_path / "notes.txt").write_text("not an image")
    assert [p.relative_to(tmp_path).as_posix() for p in image_files(str(tmp_path))] == [
        "a.jpg",
        "b/1.png",
        "b/2.PNG",
    ]
    with pytest.raises(DataError, match="needs a data directory"):
        image_files(None, "shards")
    with pytest.raises(DataError, match="does not exist"):
        image_files(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        image_files(str(tmp_path / "empty"))


def test_decoding_keeps_grayscale_and_scales_sixteen_bits():
    buffer = io.BytesIO()
    Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.uint16)).save(buffer, format="PNG")
    img, is_gray = decode_image(io.BytesIO(buffer.getvalue()), "a.png")
    assert is_gray and img.mode == "L" and np.asarray(img).tolist() == [[0, 128, 255]]
    buffer = io.BytesIO()
    Image.new("RGBA", (2, 2), (10, 20, 30, 255)).save(buffer, format="PNG")
    img, is_gray = decode_image(io.BytesIO(buffer.getvalue()), "b.png")
    assert not is_gray and img.mode == "RGB"


def test_an_unreadable_image_is_one_line_naming_it():
    with pytest.raises(DataError, match=r"cannot read image 'bad\\n.png'") as e:
        decode_image(io.BytesIO(b"not an image"), "bad\n.png")
    assert "\n" not in str(e.value)


def test_image_array_crops_the_centre_of_the_short_side():
    img = np.zeros((20, 60), dtype=np.uint8)
    img[:, 20:40] = 255  # the centre square
    array = image_array(Image.fromarray(img), 10, 1)
    assert array.shape == (1, 10, 10) and array.dtype == np.uint8 and array.mean() > 250
    assert image_array(Image.fromarray(img), 10, 3).shape == (3, 10, 10)
