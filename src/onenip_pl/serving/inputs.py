"""Read one `POST /predict` request: the image (raw body or one multipart file part) and its options.

Everything a client can get wrong is checked here, in the HTTP process and before the request is queued:
LitServe decodes and predicts a dynamic batch as one unit, so a request refused later would fail the other
clients' requests batched with it. Each refusal is an HTTPException whose one-line ``detail`` names the
problem and what to send instead; the server keeps serving.

The image is decoded by Pillow and converted by the detector's own rules (inference.images.pil_to_rgb), so
a PNG sent to the server is scored exactly as the same file read by `predict`. Its size is checked from the
header, before any pixel is decoded, so a huge image is refused without allocating it.
"""

import io
import warnings
from dataclasses import dataclass

import numpy as np
from fastapi import HTTPException, Request
from PIL import Image, UnidentifiedImageError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from onenip_pl.errors import DataError
from onenip_pl.inference.images import pil_to_rgb

OPTIONS = ("category", "map", "overlay")
MAP_FORMATS = ("png16",)
_TRUE = ("1", "true", "yes")
_FALSE = ("0", "false", "no", "")
_PIL_READ_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError)


@dataclass(frozen=True)
class RequestRules:
    """What the server accepts: the checkpoint's categories, the pixel limit, whether maps can be sent."""

    categories: tuple[str, ...]
    max_image_pixels: int
    max_request_bytes: int
    map_full_scale: float | None


@dataclass(frozen=True)
class PredictRequest:
    """A checked request, ready for a batch: the H×W×3 uint8 image and what the client asked for."""

    rgb: np.ndarray
    category: str | None
    want_map: bool
    want_overlay: bool


def refuse(status: int, message: str) -> HTTPException:
    """The 4xx answer to a client's mistake, its message folded onto one line."""
    return HTTPException(status_code=status, detail=" ".join(message.split()))


def decode_image(data: bytes, max_image_pixels: int) -> np.ndarray:
    """Image file bytes -> H×W×3 uint8, refusing empty, non-image, oversized and corrupt data."""
    if not data:
        raise refuse(400, "empty request body: send the image file's bytes (PNG, JPEG, BMP or TIFF).")
    try:
        with warnings.catch_warnings():
            # Pillow warns about large images while reading the header; the pixel limit below decides
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:
        raise refuse(413, f"image refused: {err}") from err
    except _PIL_READ_ERRORS as err:
        # Pillow's message names its BytesIO object, not the request: say what the client sent instead
        raise refuse(
            415,
            f"the request's {len(data)} bytes are not an image file of a known format (PNG, JPEG, BMP or "
            "TIFF); send the file's bytes unchanged.",
        ) from err
    width, height = image.size
    if width * height > max_image_pixels:
        raise refuse(
            413,
            f"image is {width}x{height} = {width * height:,} pixels, over this server's limit of "
            f"max_image_pixels={max_image_pixels:,}; send a smaller image or start serve with a larger "
            "max_image_pixels.",
        )
    try:
        image.load()
        return pil_to_rgb(image, "the request's image")
    except _PIL_READ_ERRORS as err:
        raise refuse(
            400,
            f"cannot decode the {image.format} image ({width}x{height}): {err}. The data is corrupt or "
            "truncated; send the whole file.",
        ) from err
    except DataError as err:
        raise refuse(400, str(err)) from err


def _too_large(rules: RequestRules) -> HTTPException:
    return refuse(
        413,
        f"request body over this server's limit of max_request_bytes={rules.max_request_bytes:,}; send a "
        "smaller file or start serve with a larger max_request_bytes.",
    )


async def _read_body(request: Request, rules: RequestRules) -> bytes:
    try:
        return await request.body()
    except StarletteHTTPException as err:  # LitServe's size guard stops reading at max_request_bytes
        if err.status_code == 413:
            raise _too_large(rules) from err
        raise


async def _read_multipart(request: Request, rules: RequestRules) -> tuple[bytes, dict[str, str]]:
    """The one file part's bytes and the text fields of a multipart/form-data request."""
    try:
        form = await request.form()
    except StarletteHTTPException as err:
        if err.status_code == 413:
            raise _too_large(rules) from err
        raise refuse(
            400,
            f"malformed multipart/form-data request: {str(err.detail).rstrip('.')}; send one file part, "
            "e.g. curl -F image=@part.png",
        ) from err
    try:
        files = [(name, value) for name, value in form.multi_items() if isinstance(value, UploadFile)]
        fields = {name: value for name, value in form.multi_items() if isinstance(value, str)}
        if len(files) != 1:
            names = ", ".join(name for name, _ in files) or "none"
            raise refuse(
                400,
                f"a multipart request needs exactly one file part (the image); it has {len(files)} "
                f"({names}). Send e.g. curl -F image=@part.png",
            )
        data = await files[0][1].read()
    finally:
        await form.close()
    return data, fields


def _options(request: Request, fields: dict[str, str]) -> dict[str, str]:
    """Query parameters and multipart text fields together; an unknown name or a contradiction is refused
    rather than ignored (a misspelt `categroy` would otherwise silently fall back to retrieval)."""
    options = dict(request.query_params)
    for name, value in fields.items():
        if name in options and options[name] != value:
            raise refuse(400, f"{name} is given twice with different values ({options[name]!r}, {value!r}).")
        options[name] = value
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise refuse(400, f"unknown request option(s) {unknown}; the options are {list(OPTIONS)}.")
    return options


def _flag(options: dict[str, str], name: str) -> bool:
    value = options.get(name, "").strip().lower()
    if value not in _TRUE + _FALSE:
        raise refuse(400, f"{name}={options[name]!r} is not a yes/no value; use {name}=1 or {name}=0.")
    return value in _TRUE


def _category(options: dict[str, str], rules: RequestRules) -> str | None:
    category = options.get("category")
    if category is not None and category not in rules.categories:
        raise refuse(
            422,
            f"category {category!r} is not in this model's prompt bank {list(rules.categories)}; pick one "
            "of them or leave category out to retrieve it.",
        )
    return category


def _want_map(options: dict[str, str], rules: RequestRules) -> bool:
    requested = options.get("map")
    if requested is None or requested == "":
        return False
    if requested not in MAP_FORMATS:
        raise refuse(400, f"map={requested!r} is unknown; use map=png16 (a 16-bit PNG, base64 in the JSON).")
    if rules.map_full_scale is None:
        raise refuse(
            422,
            "map=png16 needs a full scale, and this checkpoint has no calibrated pixel threshold: start "
            "serve with png16_max=VALUE.",
        )
    return True


async def read_predict_request(request: Request) -> PredictRequest:
    """FastAPI dependency of `POST /predict`: the checked request, or a 4xx naming what is wrong."""
    rules: RequestRules = request.app.state.request_rules
    content_type = request.headers.get("content-type", "")
    fields: dict[str, str] = {}
    if content_type.startswith("multipart/"):
        data, fields = await _read_multipart(request, rules)
    else:
        data = await _read_body(request, rules)
    options = _options(request, fields)
    category = _category(options, rules)
    want_map = _want_map(options, rules)
    want_overlay = _flag(options, "overlay")
    # decoding takes milliseconds to seconds of CPU: off the event loop, so /health and others stay answered
    rgb = await run_in_threadpool(decode_image, data, rules.max_image_pixels)
    return PredictRequest(rgb, category, want_map, want_overlay)
