"""Metric writers (TensorBoard + console), progress with steps/s and ETA, and image summaries as PNG files."""
import io
import json

import jax
import numpy as np
from etils import epy
from PIL import Image, ImageDraw, ImageFont

from clmae_jax.runtime import paths

with epy.lazy_imports():  # clu's writers import TensorFlow: loaded with the first writer, not with the library.
    from clu import metric_writers, periodic_actions


def create_writer(workdir: str):
    """TensorBoard + log writer on process 0; the others only log."""
    return metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0, asynchronous=True)


def progress(total_steps: int, writer, every_steps: int):
    """clu ReportProgress: logs steps/s, percentage and ETA, and writes steps_per_sec to the writer."""
    return periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer, every_steps=every_steps)


def to_host(tree) -> dict:
    """Scalars of a (possibly sharded, replicated) pytree as python floats."""
    return {k: float(v) for k, v in jax.device_get(tree).items()}


def image_grid(columns: list, titles=(), pad: int = 2, min_size: int = 96) -> np.ndarray:
    """Tiles equally shaped [N,H,W,C] float images in [0,1]: one row per sample, one column per list entry, with
    `titles` (one per column, if given) in a band above.

    Images smaller than `min_size` pixels are enlarged by an integer factor (nearest neighbour), so 28 px
    Fashion-MNIST stays readable with its patch and cell boundaries sharp.
    """
    scale = max(1, min_size // np.shape(columns[0])[1])
    columns = [np.clip(np.asarray(c, np.float32), 0, 1).repeat(scale, axis=1).repeat(scale, axis=2) for c in columns]
    n, h, w, c = columns[0].shape
    grid = np.ones((n * (h + pad) + pad, len(columns) * (w + pad) + pad, c), np.float32)
    for j, col in enumerate(columns):
        for i in range(n):
            top, left = pad + i * (h + pad), pad + j * (w + pad)
            grid[top:top + h, left:left + w] = col[i]
    if titles:
        grid = np.concatenate([title_band(titles, w, pad, c), grid])
    return grid


def wrap(text: str, font, width: int) -> list:
    """`text` broken at spaces into lines at most `width` pixels wide (a longer word keeps a line of its own)."""
    lines = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines


def title_band(titles, width: int, pad: int, channels: int) -> np.ndarray:
    """White [h, W, channels] band with each title in black, centred over its `width`-pixel column of image_grid."""
    font = ImageFont.load_default()
    lines = [wrap(title, font, width) for title in titles]
    line_height = font.getbbox("Ag")[3] + pad
    band = Image.new("L", (len(titles) * (width + pad) + pad, pad + line_height * max(map(len, lines))), 255)
    draw = ImageDraw.Draw(band)
    for j, column_lines in enumerate(lines):
        for k, line in enumerate(column_lines):
            left = pad + j * (width + pad) + (width - font.getlength(line)) / 2
            draw.text((left, pad + k * line_height), line, fill=0, font=font)
    return np.repeat(np.asarray(band, np.float32)[..., None] / 255.0, channels, axis=-1)


def write_images(writer, workdir: str, step: int, grids: dict):
    """Writes each named grid to TensorBoard and to workdir/images/<name>_<step>.png."""
    if jax.process_index() > 0:
        return
    writer.write_images(step, {k: v[None] for k, v in grids.items()})
    paths.makedirs(paths.join(workdir, "images"))
    for name, grid in grids.items():
        pixels = (grid * 255).round().astype(np.uint8)
        png = io.BytesIO()
        Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(png, format="PNG")
        paths.write_bytes(paths.join(workdir, "images", f"{name}_{step:07d}.png"), png.getvalue())


def write_json(workdir: str, name: str, tree: dict):
    """Writes workdir/name as indented JSON (process 0), through a temporary file so readers never see half of it."""
    if jax.process_index() > 0:
        return
    paths.write_text(paths.join(workdir, name), json.dumps(tree, indent=2))


def heat_map(values, size: int, channels: int) -> np.ndarray:
    """Per-cell values in [0, 1] ([B, g*g]) as [B, size, size, channels] pictures, white where a value is high."""
    return np.repeat(upsample_cells(values, size), channels, axis=-1)


def upsample_cells(values, size: int) -> np.ndarray:
    """Per-cell values [B, g*g] (row-major grid cells or patches) -> [B, size, size, 1] pixels, each cell a block."""
    values = np.asarray(values, np.float32)
    grid = int(round(values.shape[1] ** 0.5))
    cells = values.reshape(-1, grid, grid)
    return np.kron(cells, np.ones((size // grid, size // grid), np.float32))[..., None]


def read_scalars(workdir: str, tag: str) -> dict:
    """{step: value} of a scalar that the TensorBoard writer wrote in `workdir`."""
    return read_tags(workdir, (tag,))[tag]


def read_tags(workdir: str, tags) -> dict:
    """{tag: {step: value}} of several scalars, in one pass over the run's TensorBoard event files."""
    import tensorflow as tf  # Only readers of finished runs need it.
    values = {tag: {} for tag in tags}
    for name in paths.listdir(workdir):
        if name.startswith("events.out.tfevents"):
            for event in tf.compat.v1.train.summary_iterator(paths.join(workdir, name)):
                for v in event.summary.value:
                    if v.tag in values:
                        values[v.tag][event.step] = float(tf.make_ndarray(v.tensor))
    return values
