"""zsadx's PNG writer: plain PNG that Pillow and libspng read back to the same pixels."""
from __future__ import annotations

import io
import zlib

import numpy as np
import pytest
from PIL import Image

from zsadx.data.png import encode_png


def pillow_pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "PNG"
        return np.asarray(im)


@pytest.mark.parametrize("shape", [(1, 1, 3), (1, 7, 3), (9, 1, 3), (31, 17, 3), (64, 64), (5, 3), (1, 1)])
def test_round_trip_through_pillow_and_libspng(shape):
    rng = np.random.default_rng(sum(shape))
    # Random bytes exercise the modulo-256 differences; a smooth ramp the long runs.
    noisy = rng.integers(0, 256, shape, dtype=np.uint8)
    ramp = (np.arange(np.prod(shape)).reshape(shape) % 256).astype(np.uint8)
    for pixels in (noisy, ramp, np.zeros(shape, np.uint8), np.full(shape, 255, np.uint8)):
        data = encode_png(pixels)
        assert np.array_equal(pillow_pixels(data), pixels)
        spng = pytest.importorskip("pyspng")
        back = spng.load(data)
        assert np.array_equal(back.reshape(pixels.shape), pixels)


def test_rows_are_filtered_up_and_deflated_as_run_lengths():
    pixels = np.tile(np.arange(24, dtype=np.uint8), (6, 1))  # every row equals the one above
    data = encode_png(pixels)
    start = data.index(b"IDAT") + 4
    length = int.from_bytes(data[start - 8:start - 4], "big")
    raw = zlib.decompress(data[start:start + length])
    rows = np.frombuffer(raw, np.uint8).reshape(6, 25)
    assert (rows[:, 0] == 2).all()                  # filter type Up on every row
    assert np.array_equal(rows[0, 1:], pixels[0])   # the first row against zeros
    assert not rows[1:, 1:].any()                   # the others: nothing but zeros left


@pytest.mark.parametrize("bad", [np.zeros((4, 4, 4), np.uint8), np.zeros((4, 4), np.uint16),
                                 np.zeros((0, 4, 3), np.uint8), np.zeros(4, np.uint8)])
def test_anything_else_is_refused(bad):
    with pytest.raises(ValueError, match="encode_png takes uint8"):
        encode_png(bad)


def test_a_long_deflate_stream_is_split_over_several_idat_chunks(monkeypatch):
    from zsadx.data import png

    monkeypatch.setattr(png, "IDAT_BYTES", 97)
    pixels = np.random.default_rng(3).integers(0, 256, (40, 30, 3), dtype=np.uint8)
    data = encode_png(pixels)
    assert data.count(b"IDAT") > 10
    assert np.array_equal(pillow_pixels(data), pixels)
    spng = pytest.importorskip("pyspng")
    assert np.array_equal(spng.load(data), pixels)
