"""Lossless JPEG-LS for patches stores: a Zarr v3 array-to-bytes codec, `stmdit.jpegls`.

A chunk of patches (n, H, W, 3) uint8 is stored as n JPEG-LS images (ISO 14495-1, lossless, CharLS
through imagecodecs), one per patch, after a header of little-endian uint32: n, then each image's
length. JPEG-LS predicts every pixel from its left, upper and upper-left neighbours with a context
model, which suits H&E texture: on the demo's real patches it stores 68 KB a patch (max 94 KB)
where the vertical differences + zstd 5 of `spots.patch_codecs` stored 97 KB (max 127 KB), and it
encodes 5x faster (2.5 ms a patch on this 2-core machine). Decoding returns the same bytes.

The codec is registered with zarr when this module is imported (`stmdit.image_stores` imports it),
so every stmdit command reads these stores; other tools need `import stmdit.patch_codec` first.
Stores written with the earlier codecs (delta + zstd, lz4) keep reading as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from zarr.abc.codec import ArrayBytesCodec
from zarr.core.buffer import Buffer, NDBuffer
from zarr.core.common import JSON, parse_named_configuration
from zarr.registry import register_codec

if TYPE_CHECKING:
    from typing import Self

    from zarr.core.array_spec import ArraySpec

CODEC_NAME = "stmdit.jpegls"


def encode_patches(patches: np.ndarray) -> bytes:
    """(n, H, W, 3) uint8 -> header (n, lengths) + n JPEG-LS images."""
    import imagecodecs

    patches = np.asarray(patches)
    if patches.dtype != np.uint8 or patches.ndim != 4 or patches.shape[-1] != 3:
        raise ValueError(f"{CODEC_NAME} stores (n, H, W, 3) uint8 patches, got {patches.dtype} {patches.shape}")
    images = [imagecodecs.jpegls_encode(np.ascontiguousarray(p)) for p in patches]
    header = np.array([len(images), *(len(i) for i in images)], dtype="<u4").tobytes()
    return header + b"".join(images)


def decode_patches(data: bytes | memoryview, shape: tuple[int, ...]) -> np.ndarray:
    """The inverse of `encode_patches`, checked against the chunk's shape."""
    import imagecodecs

    data = memoryview(data).cast("B")
    n = int(np.frombuffer(data[:4], dtype="<u4")[0])
    if n != shape[0]:
        raise ValueError(f"{CODEC_NAME}: the chunk holds {n} patches, its shape says {shape[0]}")
    lengths = np.frombuffer(data[4:4 + 4 * n], dtype="<u4").astype(np.int64)
    out = np.empty(shape, dtype=np.uint8)
    start = 4 + 4 * n
    for i, length in enumerate(lengths):
        out[i] = imagecodecs.jpegls_decode(bytes(data[start:start + length]))
        start += length
    return out


@dataclass(frozen=True)
class JpegLsPatchCodec(ArrayBytesCodec):
    """Zarr v3 codec of (n, H, W, 3) uint8 patch chunks: one lossless JPEG-LS image per patch."""

    is_fixed_size = False

    @classmethod
    def from_dict(cls, data: dict[str, JSON]) -> Self:
        parse_named_configuration(data, CODEC_NAME, require_configuration=False)
        return cls()

    def to_dict(self) -> dict[str, JSON]:
        return {"name": CODEC_NAME}

    def validate(self, *, shape, dtype, chunk_grid) -> None:
        if len(shape) != 4 or shape[-1] != 3 or np.dtype(dtype.to_native_dtype()) != np.uint8:
            raise ValueError(f"{CODEC_NAME} stores (n, H, W, 3) uint8 patches, not {dtype} {shape}")

    async def _decode_single(self, chunk_bytes: Buffer, chunk_spec: ArraySpec) -> NDBuffer:
        patches = decode_patches(chunk_bytes.as_numpy_array().tobytes(), tuple(chunk_spec.shape))
        return chunk_spec.prototype.nd_buffer.from_ndarray_like(patches)

    async def _encode_single(self, chunk_array: NDBuffer, chunk_spec: ArraySpec) -> Buffer | None:
        encoded = encode_patches(chunk_array.as_numpy_array())
        return chunk_spec.prototype.buffer.from_bytes(encoded)

    def compute_encoded_size(self, input_byte_length: int, _chunk_spec: ArraySpec) -> int:
        raise NotImplementedError  # variable size


register_codec(CODEC_NAME, JpegLsPatchCodec)
