"""Line charts drawn with PIL (no plotting library in the requirements), shared by the curriculum benchmarks."""
import numpy as np
from PIL import Image, ImageDraw, ImageFont

COLOURS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (127, 127, 127))


def line_chart(title: str, curves: dict, y_range: tuple, hline: float | None = None, size=(640, 300)) -> Image:
    """A white PIL chart of {label: (xs, ys)} with a labelled y axis, a legend and an optional dashed line."""
    width, height, margin = *size, 40
    image = Image.new("RGB", size, "white")
    draw, font = ImageDraw.Draw(image), ImageFont.load_default()
    x_max = max(max(xs) for xs, _ in curves.values()) or 1
    low, high = y_range
    at = lambda x, y: (margin + (width - 2 * margin) * x / x_max,
                       height - margin - (height - 2 * margin) * (y - low) / (high - low))
    draw.rectangle([at(0, high), at(x_max, low)], outline="black")
    for y in np.linspace(low, high, 5):
        draw.text((2, at(0, y)[1] - 5), f"{y:.3g}", fill="black", font=font)
    draw.text((width / 2 - 20, height - margin + 4), f"step (0-{x_max})", fill="black", font=font)
    draw.text((margin, 4), title, fill="black", font=font)
    if hline is not None:
        for x in np.linspace(0, x_max, 60)[::2]:
            draw.line([at(x, hline), at(x + x_max / 60, hline)], fill="grey")
    for k, (label, (xs, ys)) in enumerate(curves.items()):
        colour = COLOURS[k % len(COLOURS)]
        draw.line([at(x, np.clip(y, low, high)) for x, y in zip(xs, ys)], fill=colour, width=2)
        draw.text((width - 190, 18 + 12 * k), label, fill=colour, font=font)
    return image
