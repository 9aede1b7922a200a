"""The few helpers every layer shares: atomic file writes, "did you mean" suggestions, JSON-safe
values and the package logger. Standard library only, so the schema can use it and stay instant.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

log = logging.getLogger("lcl_tune")
"""The package's logger: library code reports through it; ``lcl-tune`` sets up its handler
(``-v`` / ``-q``). Without a handler, Python prints warnings and errors only. Every message is
passed through :func:`redact` first."""

_URI_CREDENTIALS = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^\s/@:]+(?::[^\s/@]*)?@")
_SECRET_QUERY = re.compile(r"(?P<key>[?&;](?:[^\s=&;]*(?:token|password|passwd|secret|key|signature|credential)"
                           r"[^\s=&;]*)=)[^\s&;#]+", re.IGNORECASE)


def redact(text: str) -> str:
    """``text`` with the credentials of every URI in it replaced by ``***``: the user info
    (``https://user:pass@host`` -> ``https://***@host``) and secret-looking query values
    (``?token=...``, ``&X-Amz-Signature=...``). Applied to every log line, every command line
    the project records and every exported file, so a tracking URI with credentials in it never
    reaches an artifact."""
    text = _URI_CREDENTIALS.sub(lambda m: m.group("scheme") + "***@", text)
    return _SECRET_QUERY.sub(lambda m: m.group("key") + "***", text)


class RedactFilter(logging.Filter):
    """:func:`redact` on every record a logger or handler passes on."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


log.addFilter(RedactFilter())


def atomic_write(path: str | os.PathLike, data: str | bytes | Callable[[Path], Any], durable: bool = True) -> Path:
    """Write ``path`` through a temporary file in the same folder, fsync it, then ``os.replace``: a
    reader, a crash or a full disk (``ENOSPC`` raised, the temporary file removed) never leaves half a
    file where the old one was. ``data``: text, bytes,
    or a function that writes the temporary path it is given (``df.to_parquet``, ``torch.save``).
    ``durable=False`` skips the fsync, for files a power loss may lose (a live snapshot): a reader
    or a killed process still never meets half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if callable(data):
            os.close(fd)
            data(Path(tmp))
            fd = os.open(tmp, os.O_RDONLY)
            try:
                if durable:
                    os.fsync(fd)  # on disk before it replaces the old file: a power cut leaves one or the other
            finally:
                os.close(fd)
        else:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data.encode("utf-8") if isinstance(data, str) else data)
                fh.flush()
                if durable:
                    os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def drop_torn_tail(path: str | os.PathLike) -> None:
    """Cut an append-only journal back to its last whole line. A process killed mid-write leaves a
    line without its newline; the append it was making never returned, so the fragment goes (else
    the next record would be glued to it). Only a file's one writer may call it, before it appends."""
    path = Path(path)
    if not path.exists():
        return
    with open(path, "r+b") as fh:
        size = fh.seek(0, os.SEEK_END)
        if size == 0:
            return
        fh.seek(size - 1)
        if fh.read(1) == b"\n":
            return
        data = path.read_bytes()
        fh.truncate(data.rfind(b"\n") + 1)


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> Path:
    """``obj`` as JSON (numpy scalars and arrays made plain), written atomically."""
    return atomic_write(path, json.dumps(json_safe(obj), indent=indent))


def json_safe(obj: Any) -> Any:
    """Plain Python for JSON and YAML: numpy / torch scalars and arrays become numbers and lists,
    tuples lists, mapping keys strings, non-finite floats ``None`` (JSON has no NaN)."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "tolist"):  # numpy / torch arrays and scalars
        return json_safe(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def did_you_mean(word: str, choices: Iterable[str], cutoff: float = 0.6) -> str | None:
    """The closest of ``choices`` to a mistyped ``word`` (``None`` when nothing is close). A dotted
    word is also matched by its last part, so ``temperature`` finds ``loss.temperature``."""
    choices = [str(c) for c in choices]
    close = difflib.get_close_matches(str(word), choices, n=1, cutoff=cutoff)
    if close:
        return close[0]
    tails = {c.rsplit(".", 1)[-1]: c for c in choices if "." in c}
    hit = difflib.get_close_matches(str(word).rsplit(".", 1)[-1], list(tails), n=1, cutoff=max(cutoff, 0.75))
    return tails[hit[0]] if hit else None
