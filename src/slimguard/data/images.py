"""``imagefolder:DIR``: images in one folder per class (PNG or JPEG, read with Pillow).

Layouts:

* ``DIR/CLASS/*.png``: one set of images, split with a seed (stratified 60/20/20; ``meta.splits`` says so);
* ``DIR/train/CLASS/...`` and ``DIR/test/CLASS/...`` (and optionally ``DIR/val/CLASS/...``): the user's
  splits, kept as given (the class names of train fix the label ids, sorted).

Images become float32 arrays in [0, 1], ``(C, H, W)``: one channel when every image is greyscale, else
RGB. Every image is resized (bilinear) to ``size`` (``(H, W)``, default: the size of the first image).
Before anything is decoded, each file's header is read to check its size against :data:`MAX_PIXELS`
(one image) and the sum against :data:`MAX_TOTAL_PIXELS`.

Example:
    >>> data = load("imagefolder:photos")        # photos/cat/*.jpg, photos/dog/*.jpg
    >>> data.train.x.shape[1:]
    torch.Size([3, 64, 64])
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from slimguard.core.errors import DataError
from slimguard.data.core import SPLIT_NAMES, DataBundle, bundle_from_splits, register_prefix, stratified_split

EXTENSIONS = (".png", ".jpg", ".jpeg")
MAX_PIXELS = 64 * 1024 * 1024  # one image
MAX_TOTAL_PIXELS = 2 * 1024**3  # all images, at their stored size


def _class_files(root: Path, source: str) -> dict[str, list[Path]]:
    classes = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"{source}: {root} holds no class folders; put images in DIR/CLASS/*.png")
    out = {}
    for d in classes:
        files = sorted(f for f in d.iterdir() if f.is_file() and f.suffix.lower() in EXTENSIONS)
        if not files:
            raise DataError(f"{source}: class folder {d.name!r} holds no .png/.jpg images")
        out[d.name] = files
    return out


def _read(files: list[Path], size: tuple[int, int] | None, grey: bool, source: str) -> np.ndarray:
    from PIL import Image

    arrays = []
    for f in files:
        try:
            with Image.open(f) as opened:
                im = opened.convert("L" if grey else "RGB")
                if size is not None and im.size != (size[1], size[0]):
                    im = im.resize((size[1], size[0]), Image.Resampling.BILINEAR)
                a = np.asarray(im, dtype=np.float32) / 255.0
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise DataError(f"{source}: cannot read image {f} ({type(exc).__name__}); remove or replace it") from None
        arrays.append(a[None] if grey else a.transpose(2, 0, 1))
    return np.stack(arrays)


def _survey(files: list[Path], source: str) -> tuple[tuple[int, int], bool]:
    """(H, W) of the first image and whether all are greyscale, from headers only (nothing decoded)."""
    from PIL import Image

    total, grey, first = 0, True, None
    for f in files:
        try:
            with Image.open(f) as im:
                w, h = im.size
                mode = im.mode
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise DataError(f"{source}: cannot read image {f} ({type(exc).__name__}); remove or replace it") from None
        if w * h > MAX_PIXELS:
            raise DataError(f"{source}: image {f} has {w}x{h} pixels, over {MAX_PIXELS:,}; shrink it")
        total += w * h
        if total > MAX_TOTAL_PIXELS:
            raise DataError(f"{source}: the images hold over {MAX_TOTAL_PIXELS:,} pixels; use a smaller sample")
        grey = grey and mode in ("1", "L", "I;16", "I", "F")
        first = first or (h, w)
    assert first is not None  # _class_files refuses empty classes
    return first, grey


@register_prefix("imagefolder")
def load_imagefolder(path: str, seed: int = 0, size: tuple[int, int] | None = None) -> DataBundle:
    """Images in class folders (see the module docstring for layouts, sizes and limits)."""
    root = Path(path).expanduser()
    source = f"imagefolder:{path}"
    if not root.is_dir():
        raise DataError(f"image folder not found: {path}; give a folder with one subfolder per class")
    given = [s for s in SPLIT_NAMES if (root / s).is_dir()]
    if given:
        if "train" not in given or "test" not in given:
            raise DataError(f"{source}: split folders {given} found; give both train/ and test/ (val/ optional)")
        per_split = {s: _class_files(root / s, source) for s in given}
    else:
        per_split = {"all": _class_files(root, source)}
    classes = sorted(next(iter(per_split.values())))
    if given:
        classes = sorted(per_split["train"])
        for s, found in per_split.items():
            extra = sorted(set(found) - set(classes))
            if extra:
                raise DataError(f"{source}: {s}/ has class {extra[0]!r}, which train/ lacks")
    every = [f for split in per_split.values() for files in split.values() for f in files]
    first, grey = _survey(every, source)
    size = tuple(size) if size is not None else first  # type: ignore[assignment]
    parts = {}
    for s, found in per_split.items():
        files = [f for c in classes for f in found.get(c, [])]
        y = np.array([classes.index(c) for c in classes for _ in found.get(c, [])], dtype=np.int64)
        parts[s] = (_read(files, size, grey, source), y)
    meta = dict(name=source, task="classification", low=0.0, high=1.0, kind="image",
                description=f"images in class folders of {root.name}", class_names=classes)
    if "all" in parts:
        x, y = parts.pop("all")
        tr, va, te = stratified_split(y, seed)
        bundle = bundle_from_splits({"train": (x[tr], y[tr]), "val": (x[va], y[va]), "test": (x[te], y[te])},
                                    meta, seed)
        bundle.meta.splits = f"seeded stratified 60/20/20 (seed {seed})"
        return bundle
    return bundle_from_splits(parts, meta, seed)
