"""The image in a request: the body read under a size limit, taken raw or from a multipart form,
its header checked for the pixel count before anything is decoded, then decoded in full.

Problems are :class:`ServeError` s carrying the status and the one-line message. The decoding
messages are the command line's for the same problem in a file (``"<name>: not an image file
(cannot identify format)"``), with the upload's file name, or ``request body``, as the name.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import AsyncIterator

from PIL import Image, UnidentifiedImageError
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request

from ..data.images import DECODE_ERRORS, first_frame

RAW_NAME = "request body"


class ServeError(Exception):
    """An answer other than 200: the HTTP status, the message for ``{"error": ...}``, extra headers."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def _megabytes(n: int) -> str:
    return f"{n / 2**20:.3g} MB"


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refused with 413 as soon as it is known to exceed ``limit`` bytes (by its
    Content-Length, else while it streams in)."""
    declared = request.headers.get("content-length", "")
    too_large = f"request body is larger than the server's limit of {_megabytes(limit)} (--max-body-mb)"
    if declared.isdigit() and int(declared) > limit:
        raise ServeError(413, too_large, {"Connection": "close"})
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ServeError(413, too_large, {"Connection": "close"})
            chunks.append(chunk)
    except ClientDisconnect:
        raise ServeError(400, "the client closed the connection before the body was complete") from None
    return b"".join(chunks)


async def _once(body: bytes) -> AsyncIterator[bytes]:
    yield body
    yield b""


async def image_bytes(request: Request, body: bytes) -> tuple[bytes, str]:
    """(the image's bytes, its name for messages): a multipart form's file part (the one named
    ``file``, else the only one), or the body itself."""
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        return body, RAW_NAME
    try:
        form = await MultiPartParser(request.headers, _once(body), max_files=1, max_fields=16).parse()
    except MultiPartException as exc:
        raise ServeError(400, f"malformed multipart request: {exc.message}") from None
    files = [(key, value) for key, value in form.multi_items() if isinstance(value, UploadFile)]
    if not files:
        raise ServeError(400, "the multipart request has no file part: send the image as a file field named 'file'")
    upload = dict(files).get("file", files[0][1])
    try:
        data = await upload.read()
    finally:
        await form.close()
    return data, upload.filename or "upload"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def allow_decoding(max_pixels: int) -> None:
    """Let Pillow decode images of up to ``max_pixels`` in this process: its own decompression-bomb cap
    (about 179 M pixels) would otherwise answer for ``--max-pixels`` above it. Only raised, never lowered;
    the server's own check (413 from the header) stays the limit."""
    Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS or 0, int(max_pixels))


def decode_image(data: bytes, name: str, max_pixels: int) -> Image.Image:
    """Decode the first frame of ``data`` with its EXIF orientation applied, exactly as the command line
    reads a file (:func:`defectscope.data.images.first_frame`: the declared bit depth and the frame
    count travel with the image, so the API scales and notes it as for a file); the pixel count is
    checked from the header before the pixels are decoded.

    Raises ServeError: 400 empty or corrupt, 415 not an image, 413 too many pixels.
    """
    if not data:
        raise ServeError(400, f"{name}: file is empty (0 bytes)")
    too_many = f"{name}: image has more pixels than the server's limit of {max_pixels:,} (--max-pixels)"
    try:
        with warnings.catch_warnings():  # our own limit decides; Pillow's warning would only repeat it
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ServeError(415, f"{name}: not an image file (cannot identify format)") from None
    except Image.DecompressionBombError:
        raise ServeError(413, too_many) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ServeError(400, f"{name}: image data is truncated or corrupt: {_first_line(exc)}") from None
    width, height = img.size
    if width * height > max_pixels:
        raise ServeError(
            413,
            f"{name}: {width} x {height} = {width * height:,} pixels, more than the server's "
            f"limit of {max_pixels:,} (--max-pixels)",
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return first_frame(img)  # as the command line decodes a file: bit depth and frames kept for the rules
    except Image.DecompressionBombError:
        raise ServeError(413, too_many) from None
    except DECODE_ERRORS as exc:
        raise ServeError(400, f"{name}: image data is truncated or corrupt: {_first_line(exc)}") from None
