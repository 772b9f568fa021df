"""Images in OpenAI chat messages: `{"type": "image_url", "image_url": {"url":
..., "detail": ...}}` content parts become the model's image placeholder in
the prompt, and their URLs the request's image_data (in order). `detail` is
accepted; Qwen's processor sizes images by its own pixel limits."""

from __future__ import annotations

import re
from typing import List, Optional, Sequence

from radixserve.entrypoints.openai.protocol import ChatMessage, TextPart
from radixserve.managers.validation import FieldError

_IMAGE_FIELD = re.compile(r"^image_data\[(\d+)\]$")


def image_fields(messages: Sequence[ChatMessage]) -> List[str]:
    """The field name of every image part, in order (for errors about them)."""
    return [f"messages[{i}].content[{j}].image_url" for i, m in enumerate(messages)
            if isinstance(m.content, list) for j, part in enumerate(m.content) if part.type == "image_url"]


def take_images(messages: Sequence[ChatMessage], placeholder: Optional[str]) -> List[str]:
    """Replace each image part by the placeholder text (None: the model takes
    no images); returns the image URLs in order."""
    urls = []
    for i, m in enumerate(messages):
        if not isinstance(m.content, list):
            continue
        for j, part in enumerate(m.content):
            if part.type != "image_url":
                continue
            field = f"messages[{i}].content[{j}].image_url"
            if not placeholder:
                raise FieldError(field, f"'{field}': this model takes no images")
            value = (part.model_extra or {}).get("image_url")
            url = value.get("url") if isinstance(value, dict) else value
            if not isinstance(url, str) or not url:
                raise FieldError(field, f"'{field}' must be {{\"url\": a data URL or a file path}}")
            urls.append(url)
            m.content[j] = TextPart(type="text", text=placeholder)
    return urls


def renamed_image_error(e: FieldError, fields: List[str]) -> FieldError:
    """An image_data error from the front end under the chat part it came from."""
    match = _IMAGE_FIELD.match(e.field)
    if match and int(match[1]) < len(fields):
        field = fields[int(match[1])]
        return FieldError(field, str(e).replace(e.field, field))
    if e.field == "image_data":
        return FieldError("messages", str(e).replace("'image_data'", "the messages' images"))
    return e
