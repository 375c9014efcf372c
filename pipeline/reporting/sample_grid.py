"""The sample rounds as one table: a row per held-out sample, a column per round, so captions can be read improving.

Images go into the page as base64 data URIs, so the report stays one file that opens from disk anywhere. An image
that cannot be decoded gets a text cell instead of a broken <img>.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from pipeline.reporting.run_files import SampleRound, SampleRow

# Formats every browser shows as they are; anything else, or anything larger, is re-encoded as a PNG thumbnail.
BROWSER_FORMATS = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "GIF": "image/gif"}
MAX_IMAGE_SIDE = 256


def image_data_uri(path: Path | None) -> str | None:
    """A data URI of the image at `path`, or None when it is missing or not an image."""
    if path is None or not path.is_file():
        return None
    data = path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            if image.format in BROWSER_FORMATS and max(image.size) <= MAX_IMAGE_SIDE:
                return f"data:{BROWSER_FORMATS[image.format]};base64,{base64.b64encode(data).decode('ascii')}"
            thumbnail = image.convert("RGBA" if "A" in image.getbands() else "RGB")
    except (UnidentifiedImageError, OSError, ValueError):
        return None
    thumbnail.thumbnail((MAX_IMAGE_SIDE, MAX_IMAGE_SIDE))
    return png_data_uri(_png_bytes(thumbnail))


def png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def choose_rounds(rounds: list[SampleRound], max_rounds: int) -> list[SampleRound]:
    """At most `max_rounds` rounds, evenly spaced over the run, always the first and the last."""
    if len(rounds) <= max_rounds:
        return rounds
    if max_rounds == 1:
        return rounds[-1:]
    picks = sorted({round(i * (len(rounds) - 1) / (max_rounds - 1)) for i in range(max_rounds)})
    return [rounds[i] for i in picks]


def sample_grid_html(rounds: list[SampleRound], max_rounds: int) -> str:
    shown = choose_rounds(rounds, max_rounds)
    samples: dict[str, SampleRow] = {}
    for sample_round in rounds:
        for row in sample_round.rows:
            samples[row.key] = row  # the newest round's image path, prompt and reference
    first_seen = list(dict.fromkeys(row.key for sample_round in rounds for row in sample_round.rows))
    generated = {(r.step, row.key): row.generated for r in shown for row in r.rows}
    with_prompt = any(row.prompt for row in samples.values())

    header = ["image", *(["prompt"] if with_prompt else []), "reference", *(f"step {r.step}" for r in shown)]
    lines = ["<table class='grid'><thead><tr>", *(f"<th>{html.escape(h)}</th>" for h in header), "</tr></thead><tbody>"]
    for key in first_seen:
        row = samples[key]
        uri = image_data_uri(row.image)
        image_cell = (
            f"<img src='{uri}' alt='{html.escape(key)}' width='112'>"
            if uri
            else f"<span class='note'>image unreadable: {html.escape(str(row.image or 'none named'))}</span>"
        )
        cells = [f"{image_cell}<div class='key'>{html.escape(key)}</div>"]
        if with_prompt:
            cells.append(html.escape(row.prompt))
        cells.append(html.escape(row.reference))
        for sample_round in shown:
            text = generated.get((sample_round.step, key))
            if text is None:
                cells.append("<span class='note'>not in this round</span>")
            else:
                matched = _normalise(text) == _normalise(row.reference)
                cells.append(f"<span class='{'match' if matched else 'gen'}'>{html.escape(text) or '(empty)'}</span>")
        lines.append("<tr>" + "".join(f"<td>{cell}</td>" for cell in cells) + "</tr>")
    lines.append("</tbody></table>")
    note = ""
    if len(shown) < len(rounds):
        note = (
            f"<p class='note'>{len(shown)} of {len(rounds)} rounds shown, evenly spaced, first and last included "
            f"(--max-rounds).</p>"
        )
    legend = "<p class='note'>Green: the generation equals the reference (case and spacing aside).</p>"
    return note + legend + "<div class='scroll'>" + "".join(lines) + "</div>"


def _normalise(text: str) -> str:
    return " ".join(text.lower().split())
