"""The one image codec: numpy arrays <-> PNG bytes, and decoding of input images of any PIL format.

Arrays are uint8 or uint16, H×W (one channel) or H×W×C with C in 1..4 (H×W×1 comes back as H×W).
Pillow cannot write or read 16-bit PNGs with 2..4 channels without truncating them to 8 bits, so that
case goes through a small PNG writer/reader here (color types 4/2/6, bit depth 16, no interlace).

Every decode checks the pixel count against a limit before any pixel is decompressed
(decompression bombs), and every failure is an ``ImageDecodeError`` with a reason.

Examples:
    >>> import numpy as np
    >>> data = encode_png(np.zeros((4, 5), np.uint16))
    >>> decode_png(data).shape
    (4, 5)
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib

import numpy as np
from PIL import Image

from acol_core.errors import UserError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "ImageDecodeError",
    "decode_image",
    "decode_png",
    "encode_png",
    "png_size",
]

DEFAULT_MAX_PIXELS = 8192 * 8192
# Pillow warns above this many pixels and refuses above twice as many; align it with ours.
Image.MAX_IMAGE_PIXELS = DEFAULT_MAX_PIXELS

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_COLOR_TYPE_BY_CHANNELS = {1: 0, 2: 4, 3: 2, 4: 6}
_CHANNELS_BY_COLOR_TYPE = {v: k for k, v in _COLOR_TYPE_BY_CHANNELS.items()}


class ImageDecodeError(UserError, ValueError):
    """Image bytes that cannot be decoded: empty, corrupt, truncated, unsupported or too large."""


# --------------------------------------------------------------------------- encoding


def _check_array(array: np.ndarray) -> np.ndarray:
    if array.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"PNG arrays must be uint8 or uint16, got {array.dtype}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] > 4):
        raise ValueError(f"PNG arrays must be H×W or H×W×C with C in 1..4, got shape {array.shape}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"PNG arrays must not be empty, got shape {array.shape}")
    return np.ascontiguousarray(array)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _encode_png16(array: np.ndarray) -> bytes:
    height, width, channels = array.shape
    raw = array.astype(">u2").view(np.uint8).reshape(height, width * channels * 2)
    # Filter "Up" (2) on every row: vectorised, and MRI rows resemble their neighbours.
    filtered = raw.copy()
    filtered[1:] -= raw[:-1]
    rows = np.concatenate([np.full((height, 1), 2, np.uint8), filtered], axis=1)
    header = struct.pack(">IIBBBBB", width, height, 16, _COLOR_TYPE_BY_CHANNELS[channels], 0, 0, 0)
    return (
        _PNG_SIGNATURE
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(rows.tobytes(), 6))
        + _chunk(b"IEND", b"")
    )


def encode_png(array: np.ndarray) -> bytes:
    """Encode a uint8/uint16 H×W or H×W×C (C in 1..4) array as lossless PNG bytes."""
    array = _check_array(np.asarray(array))
    if array.dtype == np.uint16 and array.ndim == 3:
        return _encode_png16(array)
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


# --------------------------------------------------------------------------- decoding


def png_size(data: bytes) -> tuple[int, int, int, int]:
    """(width, height, bit depth, color type) from a PNG's IHDR, without decoding pixels."""
    if len(data) < 33 or data[:8] != _PNG_SIGNATURE or data[12:16] != b"IHDR":
        raise ImageDecodeError("not a PNG (bad signature or header)")
    width, height, depth, color = struct.unpack(">IIBB", data[16:26])
    return width, height, depth, color


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise ImageDecodeError(f"image has no pixels ({width}×{height})")
    if width * height > max_pixels:
        raise ImageDecodeError(f"image of {width}×{height} pixels exceeds the limit of {max_pixels} pixels")


def _iter_chunks(data: bytes):
    pos = 8
    while True:
        if pos + 8 > len(data):
            raise ImageDecodeError("truncated PNG (no IEND chunk)")
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        crc = data[pos + 8 + length : pos + 12 + length]
        if len(body) != length or len(crc) != 4:
            raise ImageDecodeError("truncated PNG chunk")
        if struct.unpack(">I", crc)[0] != zlib.crc32(kind + body):
            raise ImageDecodeError(f"corrupt PNG: bad CRC in {kind!r} chunk")
        yield kind, body
        if kind == b"IEND":
            return
        pos += 12 + length


def _paeth(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    a16, b16, c16 = a.astype(np.int16), b.astype(np.int16), c.astype(np.int16)
    p = a16 + b16 - c16
    pa, pb, pc = np.abs(p - a16), np.abs(p - b16), np.abs(p - c16)
    return np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))


def _unfilter_row(kind: int, line: np.ndarray, prev: np.ndarray, bpp: int) -> np.ndarray:
    if kind == 0:
        return line.copy()
    if kind == 1:
        cols = line.reshape(-1, bpp).astype(np.uint32)
        return (np.cumsum(cols, axis=0) % 256).astype(np.uint8).reshape(-1)
    if kind == 2:
        return line + prev
    if kind not in (3, 4):
        raise ImageDecodeError(f"corrupt PNG: unknown filter type {kind}")
    # Average and Paeth depend on the reconstructed left pixel: one pixel at a time (rare: foreign files).
    out = np.zeros_like(line)
    zero = np.zeros(bpp, np.uint8)
    for x in range(0, line.size, bpp):
        left = out[x - bpp : x] if x else zero
        up = prev[x : x + bpp]
        if kind == 3:
            pred = ((left.astype(np.uint16) + up) // 2).astype(np.uint8)
        else:
            pred = _paeth(left, up, prev[x - bpp : x] if x else zero)
        out[x : x + bpp] = line[x : x + bpp] + pred
    return out


def _decode_png16(data: bytes, max_pixels: int) -> np.ndarray:
    width, height, depth, color = png_size(data)
    _check_pixels(width, height, max_pixels)
    channels = _CHANNELS_BY_COLOR_TYPE[color]
    header = None
    idat = []
    for kind, body in _iter_chunks(data):
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            idat.append(body)
    assert header is not None
    if header[12] != 0:
        raise ImageDecodeError("interlaced 16-bit multi-channel PNGs are not supported")
    stride = width * channels * 2
    expected = height * (stride + 1)
    try:
        raw = zlib.decompressobj().decompress(b"".join(idat), expected + 1)
    except zlib.error as exc:
        raise ImageDecodeError(f"corrupt PNG data: {exc}") from None
    if len(raw) != expected:
        raise ImageDecodeError("truncated or oversized PNG pixel data")
    rows = np.frombuffer(raw, np.uint8).reshape(height, stride + 1)
    out = np.empty((height, stride), np.uint8)
    prev = np.zeros(stride, np.uint8)
    for y in range(height):
        prev = out[y] = _unfilter_row(int(rows[y, 0]), rows[y, 1:], prev, channels * 2)
    return out.view(">u2").reshape(height, width, channels).astype(np.uint16)


def _pil_to_array(image: Image.Image, keep_palette: bool) -> np.ndarray:
    mode = image.mode
    if mode == "1":
        image = image.convert("L")
    elif mode in ("P", "PA"):
        if keep_palette and mode == "P":
            return np.asarray(image, dtype=np.uint8)
        has_alpha = mode == "PA" or "transparency" in image.info
        image = image.convert("RGBA" if has_alpha else "RGB")
    elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        image = image.convert("RGB")
    elif mode == "F":
        raise ImageDecodeError("floating-point images are not supported")
    array = np.asarray(image)
    if array.dtype == np.uint8:
        return array
    if array.dtype.kind in "iu" and array.size and (array.min() < 0 or array.max() > 65535):
        raise ImageDecodeError(f"integer image values outside 0..65535 (mode {mode})")
    return array.astype(np.uint16)


def decode_image(
    data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, *, keep_palette: bool = False
) -> np.ndarray:
    """Decode image bytes of any format Pillow reads (PNG, JPEG, BMP, TIFF, ...) to uint8/uint16.

    Args:
        data: the file's bytes.
        max_pixels: refuse images with more pixels than this (checked before decompression).
        keep_palette: return palette indices for "P" images (label masks) instead of colours.
    """
    if not data:
        raise ImageDecodeError("empty image data (0 bytes)")
    data = bytes(data)
    if data[:8] == _PNG_SIGNATURE:
        width, height, depth, color = png_size(data)
        _check_pixels(width, height, max_pixels)
        if depth == 16 and color in (2, 4, 6):
            return _decode_png16(data, max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            _check_pixels(image.width, image.height, max_pixels)
            image.load()
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(f"image exceeds the pixel limit: {exc}") from None
    except Exception as exc:  # Pillow signals corrupt data with many exception types
        raise ImageDecodeError(f"corrupt or truncated image: {type(exc).__name__}: {exc}") from None
    return _pil_to_array(image, keep_palette)


def decode_png(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode PNG bytes written by ``encode_png`` (or any PNG) to uint8/uint16 H×W or H×W×C."""
    if not data:
        raise ImageDecodeError("empty image data (0 bytes)")
    data = bytes(data)
    if data[:8] != _PNG_SIGNATURE:
        raise ImageDecodeError("not a PNG (bad signature)")
    return decode_image(data, max_pixels)
