"""Where an image comes from: a base64 data URL, a local path or a file:// URL.
No network fetches: an http(s) URL is refused with the field named."""

from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path
from urllib.parse import unquote, urlparse

from radixserve.managers.validation import FieldError

# Decoded images larger than this many pixels are refused before any resize
# (Pillow's own bomb guard is a warning below 2x this).
MAX_IMAGE_PIXELS = 64 * 1024 * 1024


def load_image_bytes(source: str, field: str) -> bytes:
    """The encoded image `source` names; FieldError(field) when it cannot be read."""
    if not isinstance(source, str) or not source:
        raise FieldError(field, f"'{field}' must be a non-empty string: a data URL, a local path or a file:// URL")
    if source.startswith("data:"):
        header, sep, payload = source.partition(",")
        if not sep or ";base64" not in header:
            raise FieldError(field, f"'{field}': a data URL must be data:<mime>;base64,<data>")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise FieldError(field, f"'{field}': the data URL's base64 payload does not decode") from None
    if source.startswith(("http://", "https://")):
        raise FieldError(field, f"'{field}': fetching images over the network is off; send a base64 data URL "
                                "or a local file path")
    path = Path(unquote(urlparse(source).path)) if source.startswith("file://") else Path(source)
    try:
        return path.expanduser().read_bytes()
    except OSError as e:
        raise FieldError(field, f"'{field}': cannot read image file {str(path)!r}: {e.strerror}") from None


def decode_image(data: bytes, field: str):
    """A PIL RGB image; FieldError(field) for bytes that are not an image Pillow reads."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data))
        if image.width * image.height > MAX_IMAGE_PIXELS:
            raise FieldError(field, f"'{field}': the image has {image.width}x{image.height} pixels, more than "
                                    f"{MAX_IMAGE_PIXELS} allowed")
        return image.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        if isinstance(e, FieldError):
            raise
        raise FieldError(field, f"'{field}': the image cannot be decoded ({type(e).__name__})") from None
