"""Input enumeration and per-item loading for build_shards.

Three kinds of input, each enumerated in a deterministic order (sorted paths, file/row/member order):

* a directory of images with sidecar captions (``x.jpg`` + ``x.txt`` or ``x.json``), walked recursively;
* a manifest file of (image path, caption) rows: ``.jsonl``, ``.csv`` or ``.parquet`` (pyarrow, optional);
  relative image paths are resolved against the manifest's directory;
* WebDataset tars in img2dataset layout (``key.jpg|png|webp|...`` + ``key.txt`` or ``key.json``).

Enumeration only lists (plus a tar header scan); every :class:`Item` gets a global index, the position in that
order, which fixes its shard and key. Problems found while listing (an unreadable manifest row, a tar group with
no image) become items that are already rejected, so every input is accounted for in exactly one shard.
:func:`load_item` runs in DataLoader workers: it reads the caption, decodes, checks and crops the image.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import tarfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from lmfusion.data.preprocess import square_pixels

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
CAPTION_EXTS = ("txt", "json")
MANIFEST_EXTS = (".jsonl", ".csv", ".parquet")
_WDS_KEY = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # WebDataset: key = path up to the first dot of the basename

#: Reject reasons (the manifest counts by these).
REASONS = ("bad_row", "missing_image", "not_an_image", "corrupt_image", "too_small", "missing_caption",
           "empty_caption", "bad_caption", "bad_tar")


@dataclass(slots=True)
class Item:
    """One input: where its image and caption are, or why it is already rejected."""

    index: int
    source: str                       # human-readable id: relative path, "file.tar:member", "rows.csv:12"
    image_path: str = ""
    image_span: tuple[int, int] | None = None    # (offset, size) inside the tar at image_path
    caption_text: str | None = None              # inline caption (manifests)
    caption_path: str = ""                       # sidecar file or tar holding the caption
    caption_span: tuple[int, int] | None = None
    caption_ext: str = ""                        # "txt" | "json"
    reject: str = ""                             # reason, when rejected while listing
    detail: str = ""
    target_path: str = ""                        # editing triples: the target image


@dataclass
class Loaded:
    """A decoded, cropped sample ready for the encoder."""

    index: int
    source: str
    caption: str
    pixels: np.ndarray                # (res, res, 3) uint8
    original_size: tuple[int, int]    # (w, h) after EXIF orientation
    crop_box: tuple[int, int, int, int]
    target_pixels: np.ndarray | None = None   # editing triples: the target image, (res, res, 3) uint8


@dataclass
class Rejected:
    index: int
    source: str
    reason: str
    detail: str

    def record(self, shard: int) -> dict[str, Any]:
        return {"index": self.index, "source": self.source, "reason": self.reason, "detail": self.detail,
                "shard": shard}


# -------------------------------------------------------------------------------------------------- listing
def _ext(name: str) -> str:
    return name.rsplit(".", 1)[-1].lower() if "." in name else ""


def _iter_folder(root: Path) -> Iterator[dict[str, Any]]:
    """Images under ``root`` (sorted, recursive) with their sidecar caption; other files are ``not_an_image``."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        names = sorted(f for f in filenames if not f.startswith("."))
        present = set(names)
        stems_with_image = {os.path.splitext(n)[0] for n in names if _ext(n) in IMAGE_EXTS}
        for name in names:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            stem, ext = os.path.splitext(name)[0], _ext(name)
            if ext in CAPTION_EXTS:
                if stem not in stems_with_image:
                    yield {"source": rel, "reject": "missing_image", "detail": f"{rel}: caption file with no image"}
                continue
            if ext not in IMAGE_EXTS:
                yield {"source": rel, "reject": "not_an_image", "detail": f"{rel}: extension '.{ext}' is not an image"}
                continue
            item: dict[str, Any] = {"source": rel, "image_path": str(path)}
            for cext in CAPTION_EXTS:  # .txt wins over .json
                if f"{stem}.{cext}" in present:
                    item.update(caption_path=str(Path(dirpath) / f"{stem}.{cext}"), caption_ext=cext)
                    break
            else:
                item.update(reject="missing_caption", detail=f"{rel}: no {stem}.txt or {stem}.json next to it")
            yield item


def _row_item(manifest: Path, where: str, row: Any, image_field: str, caption_field: str,
              target_field: str = "") -> dict[str, Any]:
    source = f"{manifest.name}:{where}"
    if not isinstance(row, dict):
        return {"source": source, "reject": "bad_row", "detail": f"{source}: row is not an object"}
    image = row.get(image_field)
    if not isinstance(image, str) or not image.strip():
        return {"source": source, "reject": "bad_row", "detail": f"{source}: field '{image_field}' missing or empty"}
    caption = row.get(caption_field)
    if caption is None:
        return {"source": source, "reject": "missing_caption", "detail": f"{source}: field '{caption_field}' missing"}
    if not isinstance(caption, str):
        return {"source": source, "reject": "bad_row", "detail": f"{source}: field '{caption_field}' is not a string"}
    path = Path(image) if os.path.isabs(image) else manifest.parent / image
    out = {"source": f"{source}:{image}", "image_path": str(path), "caption_text": caption}
    if target_field:  # an editing triple: (source image, instruction, target image)
        target = row.get(target_field)
        if not isinstance(target, str) or not target.strip():
            return {"source": source, "reject": "bad_row",
                    "detail": f"{source}: field '{target_field}' (the target image) missing or empty"}
        out["target_path"] = str(Path(target) if os.path.isabs(target) else manifest.parent / target)
    return out


def _iter_manifest(path: Path, image_field: str, caption_field: str, target_field: str = ""
                   ) -> Iterator[dict[str, Any]]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    row = json.loads(raw.decode("utf-8"))
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    yield {"source": f"{path.name}:{lineno}", "reject": "bad_row",
                           "detail": f"{path.name}:{lineno}: invalid JSON ({e})"}
                    continue
                yield _row_item(path, str(lineno), row, image_field, caption_field, target_field)
    elif suffix == ".csv":
        with open(path, newline="", encoding="utf-8", errors="replace") as f:
            reader = csv.DictReader(f)
            wanted = [f for f in (image_field, caption_field, target_field) if f]
            if reader.fieldnames is None or any(f not in reader.fieldnames for f in wanted):
                raise ValueError(f"{path}: header {reader.fieldnames} lacks one of the columns {wanted} "
                                 f"(set --image-field/--caption-field/--target-field)")
            while True:
                try:
                    row = next(reader)
                except StopIteration:
                    break
                except csv.Error as e:
                    yield {"source": f"{path.name}:{reader.line_num}", "reject": "bad_row",
                           "detail": f"{path.name}:{reader.line_num}: {e}"}
                    continue
                if None in row:  # more cells than header columns
                    yield {"source": f"{path.name}:{reader.line_num}", "reject": "bad_row",
                           "detail": f"{path.name}:{reader.line_num}: more cells than header columns"}
                    continue
                yield _row_item(path, str(reader.line_num), row, image_field, caption_field, target_field)
    elif suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise ImportError(f"{path}: reading Parquet manifests needs pyarrow: pip install pyarrow") from e
        table = pq.read_table(path)
        wanted = [f for f in (image_field, caption_field, target_field) if f]
        for field in wanted:
            if field not in table.column_names:
                raise ValueError(f"{path}: no column '{field}' (columns: {table.column_names})")
        for rowno, row in enumerate(table.select(wanted).to_pylist()):
            yield _row_item(path, f"row{rowno}", row, image_field, caption_field, target_field)
    else:
        raise ValueError(f"{path}: manifest must be one of {MANIFEST_EXTS}")


def _iter_tar(path: Path) -> Iterator[dict[str, Any]]:
    """Group consecutive members by WebDataset key; spans let workers read members by seek, without tarfile."""
    groups: list[tuple[str, dict[str, tarfile.TarInfo]]] = []
    error = ""
    try:
        with tarfile.open(path, "r:") as tar:
            for m in tar:
                match = _WDS_KEY.match(m.name) if m.isfile() else None
                if match is None:
                    continue
                key, ext = match.group(1), match.group(2).lower()
                if not groups or groups[-1][0] != key:
                    groups.append((key, {}))
                groups[-1][1].setdefault(ext, m)
    except (tarfile.TarError, OSError, EOFError) as e:
        error = f"{path.name}: unreadable after {len(groups)} samples ({e})"
    for key, members in groups:
        source = f"{path.name}:{key}"
        image_ext = next((e for e in IMAGE_EXTS if e in members), None)
        if image_ext is None:
            other = sorted(set(members) - set(CAPTION_EXTS))
            reason = "not_an_image" if other else "missing_image"
            yield {"source": source, "reject": reason, "detail": f"{source}: no image member (has {sorted(members)})"}
            continue
        img = members[image_ext]
        item: dict[str, Any] = {"source": f"{source}.{image_ext}", "image_path": str(path),
                                "image_span": (img.offset_data, img.size)}
        cap_ext = next((e for e in CAPTION_EXTS if e in members), None)
        if cap_ext is None:
            item.update(reject="missing_caption", detail=f"{source}: no .txt or .json member")
        else:
            cap = members[cap_ext]
            item.update(caption_path=str(path), caption_span=(cap.offset_data, cap.size), caption_ext=cap_ext)
        yield item
    if error:
        yield {"source": path.name, "reject": "bad_tar", "detail": error}


def enumerate_inputs(inputs: list[str], image_field: str = "image", caption_field: str = "caption",
                     target_field: str = "") -> list[Item]:
    """All items of ``inputs`` (directories, manifests, tars) in order, indexed 0..N-1. ``target_field``: editing
    triples (manifests only)."""
    items: list[Item] = []
    for spec in inputs:
        path = Path(spec).expanduser().resolve()
        if target_field and (path.is_dir() or path.suffix.lower() not in MANIFEST_EXTS):
            raise ValueError(f"input {spec}: editing triples come from a manifest ({', '.join(MANIFEST_EXTS)}) with "
                             f"columns '{image_field}', '{caption_field}', '{target_field}'")
        if path.is_dir():
            rows = _iter_folder(path)
        elif not path.is_file():
            raise FileNotFoundError(f"input {spec}: no such file or directory")
        elif path.suffix.lower() == ".tar":
            rows = _iter_tar(path)
        elif path.suffix.lower() in MANIFEST_EXTS:
            rows = _iter_manifest(path, image_field, caption_field, target_field)
        else:
            raise ValueError(f"input {spec}: expected a directory, a .tar, or a manifest ({', '.join(MANIFEST_EXTS)})")
        for row in rows:
            items.append(Item(index=len(items), **row))
    return items


# -------------------------------------------------------------------------------------------------- loading
def _read(path: str, span: tuple[int, int] | None) -> bytes:
    with open(path, "rb") as f:
        if span is None:
            return f.read()
        f.seek(span[0])
        data = f.read(span[1])
    if len(data) != span[1]:
        raise EOFError(f"truncated: {len(data)} of {span[1]} bytes")
    return data


def read_caption(item: Item, caption_key: str) -> tuple[str | None, str, str]:
    """(caption, reason, detail): caption is None when rejected."""
    if item.caption_text is not None:
        text = item.caption_text
    else:
        try:
            raw = _read(item.caption_path, item.caption_span)
        except (OSError, EOFError) as e:
            return None, "missing_caption", f"{item.source}: caption unreadable ({e})"
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            return None, "bad_caption", f"{item.source}: caption is not UTF-8 ({e})"
        if item.caption_ext == "json":
            try:
                meta = json.loads(text)
            except json.JSONDecodeError as e:
                return None, "bad_caption", f"{item.source}: caption JSON invalid ({e})"
            text = meta.get(caption_key) if isinstance(meta, dict) else None
            if text is None:
                return None, "missing_caption", f"{item.source}: caption JSON has no field '{caption_key}'"
            if not isinstance(text, str):
                return None, "bad_caption", f"{item.source}: caption JSON field '{caption_key}' is not a string"
    text = text.strip()
    if not text:
        return None, "empty_caption", f"{item.source}: caption is empty"
    return text, "", ""


def load_item(item: Item, resolution: int, min_size: int, caption_key: str = "caption") -> Loaded | Rejected:
    """Caption + decoded, RGB, centre-cropped, resized image; or why not. Never raises on bad data."""
    if item.reject:
        return Rejected(item.index, item.source, item.reject, item.detail)
    caption, reason, detail = read_caption(item, caption_key)
    if caption is None:
        return Rejected(item.index, item.source, reason, detail)
    loaded = _load_image(item, item.image_path, item.image_span, resolution, min_size, "")
    if isinstance(loaded, Rejected):
        return loaded
    pixels, size, box = loaded
    target = None
    if item.target_path:
        loaded = _load_image(item, item.target_path, None, resolution, min_size, "target ")
        if isinstance(loaded, Rejected):
            return loaded
        target = loaded[0]
    return Loaded(item.index, item.source, caption, pixels, size, box, target)


def _load_image(item: Item, path: str, span: tuple[int, int] | None, resolution: int, min_size: int, what: str
                ) -> tuple[np.ndarray, tuple[int, int], tuple[int, int, int, int]] | Rejected:
    """(pixels, original size, crop box) of one image of ``item``, or why not; ``what`` names it in details."""
    try:
        data = _read(path, span)
    except FileNotFoundError:
        return Rejected(item.index, item.source, "missing_image", f"{item.source}: {what}{path} not found")
    except (OSError, EOFError) as e:
        return Rejected(item.index, item.source, "corrupt_image", f"{item.source}: {what + path + ' ' if what else ''}unreadable ({e})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # EXIF/palette chatter from odd files; errors still raise
            img = Image.open(io.BytesIO(data))
            img.load()
            img = ImageOps.exif_transpose(img)
            width, height = img.size
            if min(width, height) < min_size:
                return Rejected(item.index, item.source, "too_small",
                                f"{item.source}: {what}{width}x{height} is below --min-size {min_size}")
            pixels, box = square_pixels(img, resolution)
    except UnidentifiedImageError:
        return Rejected(item.index, item.source, "not_an_image",
                        f"{item.source}: {what}not an image Pillow can identify")
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        return Rejected(item.index, item.source, "corrupt_image", f"{item.source}: {what}{type(e).__name__}: {e}")
    return pixels, (width, height), box
