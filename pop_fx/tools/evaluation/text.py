"""Text windows: evaluation and calibration windows cut from one text file, never overlapping."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch


def default_text_path() -> Path:
    """The World English Bible sample packaged with pop-fx (public domain; ``pop_fx/data/README.md``): the
    default text of ``pop-fx eval`` and ``pop-fx frontier``, present wherever the package is installed."""
    from importlib.resources import files

    return Path(str(files("pop_fx") / "data" / "web_bible_sample.txt"))


def shared_text_path() -> Path:
    """../shared/data/web_bible.txt relative to the repository root: the whole text (this project's CI only)."""
    return Path(__file__).resolve().parents[3] / ".." / "shared" / "data" / "web_bible.txt"


@dataclass(frozen=True)
class Window:
    index: int
    role: str
    """"eval" or "calibration\""""
    char_start: int
    char_end: int
    """end of the last token's characters (exclusive); an upper bound when the tokenizer gives no offsets"""
    token_ids: tuple[int, ...]

    def as_dict(self) -> dict[str, Any]:
        return {"index": self.index, "role": self.role, "char_start": self.char_start, "char_end": self.char_end, "n_tokens": len(self.token_ids)}


class ByteTokenizer:
    """One token per UTF-8 byte (ids 0-255), with character offsets: for tiny models that ship no tokenizer."""

    def __call__(self, text: str, add_special_tokens: bool = False, return_offsets_mapping: bool = False) -> dict[str, list]:
        ids: list[int] = []
        offsets: list[tuple[int, int]] = []
        for i, ch in enumerate(text):
            b = ch.encode("utf-8")
            ids.extend(b)
            offsets.extend([(i, i + 1)] * len(b))
        out: dict[str, list] = {"input_ids": ids}
        if return_offsets_mapping:
            out["offset_mapping"] = offsets
        return out

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def _encode(tokenizer: Any, text: str) -> tuple[list[int], list[tuple[int, int]] | None]:
    """Token ids of ``text`` (no special tokens) and each token's character span when the tokenizer has one."""
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc.get("offset_mapping") if hasattr(enc, "get") else enc["offset_mapping"]
    except (TypeError, NotImplementedError, ValueError, KeyError):
        enc = tokenizer(text, add_special_tokens=False)
        offsets = None
    ids = enc["input_ids"]
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    return [int(i) for i in ids], ([tuple(map(int, o)) for o in offsets] if offsets is not None else None)


def _line_start_at_or_after(text: str, pos: int, limit: int) -> int:
    """The first line start at or after ``pos`` (windows begin at a verse/line), or ``pos`` if none before ``limit``."""
    if pos == 0 or text[pos - 1] == "\n":
        return pos
    nl = text.find("\n", pos, limit)
    return nl + 1 if nl != -1 and nl + 1 < limit else pos


def _region_windows(tokenizer, text: str, lo: int, hi: int, n: int, length: int, role: str) -> list[Window]:
    windows: list[Window] = []
    stride = (hi - lo) // max(n, 1)
    for k in range(n):
        start = _line_start_at_or_after(text, lo + k * stride, hi)
        span = max(64, length * 8)
        while True:
            end = min(hi, start + span)
            ids, offsets = _encode(tokenizer, text[start:end])
            if len(ids) > length or end == hi:  # one spare token: the chunk end may cut the last one
                break
            span *= 2
        if len(ids) < length or (len(ids) == length and end == hi and offsets is None):
            raise ValueError(
                f"text is too short: window {k} of {n} ({role}) starting at character {start} has {len(ids)} tokens "
                f"before character {hi}, needs {length}; allowed a longer text or fewer/shorter windows"
            )
        char_end = start + offsets[length - 1][1] if offsets is not None else end
        windows.append(Window(k, role, start, char_end, tuple(ids[:length])))
    for a, b in zip(windows, windows[1:]):
        if a.char_end > b.char_start:
            raise ValueError(
                f"text is too short for {n} disjoint {role} windows of {length} tokens (window {a.index} ends at "
                f"character {a.char_end}, window {b.index} starts at {b.char_start}); allowed a longer text or fewer windows"
            )
    return windows


def make_windows(
    tokenizer: Any, text: str, *, n_windows: int, length: int, calib_windows: int = 0, calib_fraction: float = 0.1
) -> tuple[list[Window], list[Window], int]:
    """Evaluation and calibration windows, and the character where the calibration slice begins.

    The text is cut once: evaluation windows are spread evenly over characters
    [0, split), calibration windows over [split, len(text)), with split at the
    line start nearest (1 - calib_fraction) · len(text). The two never overlap.
    """
    if calib_windows > 0:
        split = _line_start_at_or_after(text, int(len(text) * (1 - calib_fraction)), len(text))
    else:
        split = len(text)
    evals = _region_windows(tokenizer, text, 0, split, n_windows, length, "eval")
    calib = _region_windows(tokenizer, text, split, len(text), calib_windows, length, "calibration") if calib_windows else []
    assert all(w.char_end <= split for w in evals) and all(w.char_start >= split for w in calib)
    return evals, calib, split


def read_text(text_or_path: str | Path | None) -> tuple[str, str | None]:
    if text_or_path is None:
        p = default_text_path()
        if not p.is_file():
            raise ValueError(f"no text given and the default {p} does not exist: allowed a text file path (--text)")
        return p.read_text(encoding="utf-8"), str(p)
    if isinstance(text_or_path, Path) or (isinstance(text_or_path, str) and "\n" not in text_or_path and len(text_or_path) < 4096 and Path(text_or_path).is_file()):
        p = Path(text_or_path)
        if not p.is_file():
            raise ValueError(f"text file {p} does not exist: allowed an existing text file")
        return p.read_text(encoding="utf-8"), str(p)
    if not isinstance(text_or_path, str):
        raise ValueError(f"text_or_path={type(text_or_path).__name__} is invalid: allowed a path or a string of text")
    return text_or_path, None
