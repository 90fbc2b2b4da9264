from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from acol_core.data import codec
from acol_core.data.codec import (
    DEFAULT_MAX_PIXELS,
    ImageDecodeError,
    decode_image,
    decode_png,
    encode_png,
    png_size,
)


def _png(width: int, height: int, depth: int, color: int, rows: bytes) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0)
    return (
        codec._PNG_SIGNATURE
        + codec._chunk(b"IHDR", header)
        + codec._chunk(b"IDAT", zlib.compress(rows))
        + codec._chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
@pytest.mark.parametrize("shape", [(5, 7), (5, 7, 1), (5, 7, 2), (5, 7, 3), (5, 7, 4)])
def test_roundtrip_is_lossless(dtype, shape):
    rng = np.random.default_rng(0)
    array = rng.integers(0, np.iinfo(dtype).max, size=shape, dtype=dtype, endpoint=True)
    out = decode_png(encode_png(array))
    assert out.dtype == dtype
    expected = array[:, :, 0] if len(shape) == 3 and shape[2] == 1 else array
    assert out.shape == expected.shape
    np.testing.assert_array_equal(out, expected)


def test_uint16_extremes_survive():
    array = np.array([[[0, 65535, 1], [256, 255, 65280]]], np.uint16)
    np.testing.assert_array_equal(decode_png(encode_png(array)), array)


def test_16bit_multichannel_png_is_a_valid_png_for_other_readers():
    data = encode_png(np.full((3, 4, 3), 40000, np.uint16))
    assert png_size(data) == (4, 3, 16, 2)
    with Image.open(io.BytesIO(data)) as im:
        im.load()  # Pillow reads it (as 8-bit), so the file is well-formed
        assert im.size == (4, 3)


@pytest.mark.parametrize("filter_type", [0, 1, 2, 3, 4])
def test_foreign_16bit_png_with_every_filter(filter_type):
    rng = np.random.default_rng(filter_type)
    array = rng.integers(0, 65535, size=(4, 3, 2), dtype=np.uint16)
    raw = array.astype(">u2").view(np.uint8).reshape(4, -1).astype(np.int32)
    bpp, rows, prev = 4, [], np.zeros(raw.shape[1], np.int32)
    for line in raw:
        left = np.concatenate([np.zeros(bpp, np.int32), line[:-bpp]])
        upleft = np.concatenate([np.zeros(bpp, np.int32), prev[:-bpp]])
        if filter_type == 0:
            pred = 0
        elif filter_type == 1:
            pred = left
        elif filter_type == 2:
            pred = prev
        elif filter_type == 3:
            pred = (left + prev) // 2
        else:
            p = left + prev - upleft
            pa, pb, pc = abs(p - left), abs(p - prev), abs(p - upleft)
            pred = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, prev, upleft))
        rows.append(np.concatenate([[filter_type], (line - pred) % 256]).astype(np.uint8))
        prev = line
    data = _png(3, 4, 16, 4, np.concatenate(rows).tobytes())
    np.testing.assert_array_equal(decode_png(data), array)


def _truncated_png() -> bytes:
    data = encode_png(np.random.default_rng(0).integers(0, 255, (32, 32), dtype=np.uint8))
    return data[: len(data) // 2]


def _bad_crc_png16() -> bytes:
    data = bytearray(encode_png(np.ones((4, 4, 3), np.uint16)))
    data[40] ^= 0xFF  # inside the IDAT chunk
    return bytes(data)


def _truncated_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()[:300]


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda: b"", "empty image data"),
        (_truncated_png, "truncated"),
        (lambda: b"definitely not an image", "corrupt"),
        (_bad_crc_png16, "CRC"),
        (lambda: encode_png(np.ones((4, 4, 3), np.uint16))[:-20], "truncated"),
        (_truncated_jpeg, "truncated"),
    ],
    ids=["zero-bytes", "truncated-png", "garbage", "bad-crc", "truncated-png16", "truncated-jpeg"],
)
def test_bad_data_raises_image_decode_error(make, reason):
    with pytest.raises(ImageDecodeError, match=reason):
        decode_image(make())


@pytest.mark.parametrize(("depth", "color"), [(8, 0), (16, 2)], ids=["pillow-path", "own-path"])
def test_decompression_bomb_is_refused_before_decoding(depth, color):
    # Claims 100000×100000 pixels with almost no data: must fail on the header, not allocate.
    bomb = _png(100_000, 100_000, depth, color, b"\x00" * 16)
    with pytest.raises(ImageDecodeError, match="exceeds the limit"):
        decode_png(bomb)


def test_pixel_limit_is_configurable():
    data = encode_png(np.zeros((20, 20), np.uint8))
    assert decode_png(data, max_pixels=400).shape == (20, 20)
    with pytest.raises(ImageDecodeError, match="20×20 pixels exceeds the limit of 399"):
        decode_png(data, max_pixels=399)


def test_pillow_limit_follows_ours():
    assert Image.MAX_IMAGE_PIXELS == DEFAULT_MAX_PIXELS


@pytest.mark.parametrize(
    "array",
    [
        np.zeros((4, 4), np.float32),
        np.zeros((4, 4), bool),
        np.zeros((4, 4, 5), np.uint8),
        np.zeros((0, 4), np.uint8),
    ],
    ids=["float", "bool", "5-channels", "empty"],
)
def test_encode_refuses_unsupported_arrays(array):
    with pytest.raises(ValueError, match="PNG arrays"):
        encode_png(array)


def test_decode_image_reads_jpeg_and_palette_indices():
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 6, 3), 200, np.uint8)).save(buf, "JPEG", quality=95)
    jpeg = decode_image(buf.getvalue())
    assert jpeg.shape == (8, 6, 3) and jpeg.dtype == np.uint8 and abs(int(jpeg.mean()) - 200) <= 2

    palette = Image.fromarray(np.array([[0, 1], [2, 1]], np.uint8), mode="P")
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
    buf = io.BytesIO()
    palette.save(buf, "PNG")
    np.testing.assert_array_equal(decode_image(buf.getvalue(), keep_palette=True), [[0, 1], [2, 1]])
    assert decode_image(buf.getvalue()).shape == (2, 2, 3)


def test_decode_png_refuses_other_formats():
    buf = io.BytesIO()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(buf, "BMP")
    with pytest.raises(ImageDecodeError, match="not a PNG"):
        decode_png(buf.getvalue())
