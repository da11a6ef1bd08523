"""Page images as the models read them. Without torch: the API teacher checks pages with it too."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageOps


def load_image(path: str | Path) -> Image.Image:
    """A page image as RGB, upright as its EXIF orientation says (phone photos), transparent parts white (a
    PNG page with a transparent background converted as is reads as black)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"page image not found: {path}")
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
                rgba = im.convert("RGBA")
                page = Image.new("RGB", rgba.size, "white")
                page.paste(rgba, mask=rgba.getchannel("A"))
                return page
            return im.convert("RGB")
    except Image.DecompressionBombError as e:  # not an OSError; Pillow refuses > 179 Mpixels unread
        raise ValueError(f"{path}: too large to read safely ({e}); scale it down (the model sees at most "
                         "1024 px a side)") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:  # 0 bytes, cut off, not an image (a broken PNG
        raise ValueError(f"{path}: not a readable image ({e})") from None  # chunk raises SyntaxError)
