"""Small shared helpers: atomic writes, the values a ``Literal`` annotation allows."""

from __future__ import annotations

import os
import tempfile
import types
import typing
from pathlib import Path
from typing import Any, Optional

__all__ = ["atomic_write_text", "atomic_write_bytes", "literal_choices", "check_choices"]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same directory and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates 0600; give the file the mode a plain open() would (0666 minus the umask)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def literal_choices(tp: Any) -> Optional[tuple]:
    """The values a ``Literal[...]`` or ``Optional[Literal[...]]`` annotation allows (None first when optional), or
    None when ``tp`` is not such an annotation. Config checks and the YAML reader both ask here."""
    if typing.get_origin(tp) is typing.Literal:
        return typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and typing.get_origin(rest[0]) is typing.Literal:
            return ((None,) if len(rest) < len(args) else ()) + typing.get_args(rest[0])
    return None


def check_choices(section: str, obj: Any, **annotations: Any) -> None:
    """Each named field of ``obj`` holds a value its ``Literal`` annotation allows; otherwise a one-line
    :class:`~lmfusion.errors.UserError` naming ``section.field``, the allowed values and the value found."""
    from lmfusion.errors import UserError

    for name, tp in annotations.items():
        allowed, value = literal_choices(tp), getattr(obj, name)
        if value not in allowed:
            raise UserError(f"{section}.{name} must be one of {allowed}, got {value!r}")
