"""Follow-up questions without redoing the work: the image cache and KV reuse of a trimmed handler.

- :class:`ImageCache`: the rows libmtmd encoded for each picture (before selection), per handler,
  keyed by the mmproj file and the picture's bytes (sha256), bounded by bytes, least recently used
  out first. A hit skips ``mtmd_encode_chunk``.
- :class:`KvRecord`: the prompt this handler last left in a ``Llama``'s KV cache. The next call
  keeps the longest common prefix of the old and the new prompt (token ids, and for an image the
  digest ids of the rows that were decoded, :func:`.decode.row_ids`), whole images only, and always
  decodes at least the prompt's last token (fresh logits). A :class:`Reuse` does that during one
  call. The record is dropped when anything else touches the cache (another handler,
  ``Llama.reset``, ``load_state``: :func:`trimcpp.llamacpp.on_state_change`), when the Llama's
  token ids no longer start with it, and on any error after the cache was changed.
"""

from __future__ import annotations

import collections
import os
import threading
import weakref
from typing import Any, Optional

import numpy as np

from ..llamacpp import on_state_change, trim_kv

FOLLOW_UPS = ("keep-rows", "reselect")


class ImageCache:
    """Encoded rows per (mmproj, picture, chunk), at most `limit` bytes of them (0: off)."""

    def __init__(self, limit: int):
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise ValueError(f"image_cache_bytes must be an int >= 0, got {limit!r}")
        self.limit = limit
        self.bytes = 0
        self.hits = 0
        self._rows: collections.OrderedDict[tuple, np.ndarray] = collections.OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key(mmproj: str, picture: str, chunk: int) -> tuple:
        """The mmproj file as it is now (path, size, modification time), the picture's sha256, the chunk."""
        stat = os.stat(mmproj)
        return os.path.realpath(mmproj), stat.st_size, stat.st_mtime_ns, picture, chunk

    def get(self, key: tuple) -> Optional[np.ndarray]:
        with self._lock:
            rows = self._rows.get(key)
            if rows is not None:
                self._rows.move_to_end(key)
                self.hits += 1
            return rows

    def put(self, key: tuple, rows: np.ndarray) -> None:
        if rows.nbytes > self.limit:
            return
        with self._lock:
            if key in self._rows:
                self.bytes -= self._rows.pop(key).nbytes
            self._rows[key] = rows
            self.bytes += rows.nbytes
            while self.bytes > self.limit:
                _, old = self._rows.popitem(last=False)
                self.bytes -= old.nbytes

    def __len__(self) -> int:
        return len(self._rows)


class Restart(Exception):
    """The KV cache could not drop a tail: the call starts again from an empty cache."""


class Reuse:
    """One call's walk along the old prompt: positions below `limit` whose ids match are kept."""

    def __init__(self, llama: Any, old: np.ndarray, limit: int):
        self._llama = llama
        self._old = old
        self.limit = min(limit, len(old))
        self.matching = True
        self.kept = 0  # positions reused

    def text(self, start: int, tokens: list[int]) -> int:
        """How many of `tokens` (at positions start..) are already in the cache."""
        if not self.matching:
            return 0
        n = max(0, min(len(tokens), self.limit - start))
        same = np.asarray(tokens[:n], dtype=self._old.dtype) == self._old[start : start + n]
        n = int(np.argmin(same)) if not same.all() else n
        self.kept = start + n
        return n

    def image(self, start: int, ids: np.ndarray) -> bool:
        """Whether the whole image (its positions' digest ids) is already in the cache."""
        end = start + len(ids)
        if self.matching and end <= self.limit and np.array_equal(self._old[start:end], ids):
            self.kept = end
            return True
        return False

    def diverge(self, position: int) -> None:
        """From `position` on, everything is decoded anew: the cache drops its tail there."""
        if self.matching:
            self.matching = False
            if not trim_kv(self._llama, position):
                raise Restart()


class KvRecord:
    """The prompt a handler last left in one Llama's KV cache (token ids, image positions as digests)."""

    def __init__(self) -> None:
        self._llama: Optional[weakref.ref] = None
        self._prompt: Optional[np.ndarray] = None
        self._watched: weakref.WeakSet = weakref.WeakSet()

    def drop(self) -> None:
        self._llama, self._prompt = None, None

    def begin(self, llama: Any, length: int) -> Optional[Reuse]:
        """A Reuse for a new prompt of `length` positions, or None (no valid record: empty the cache)."""
        prompt, owner = self._prompt, self._llama() if self._llama else None
        self.drop()  # until the call succeeds
        if prompt is None or owner is not llama or llama.n_tokens < len(prompt):
            return None
        if not np.array_equal(llama.input_ids[: len(prompt)], prompt):
            return None
        return Reuse(llama, llama.input_ids[: llama.n_tokens].copy(), max(0, length - 1))

    def remember(self, llama: Any, length: int) -> None:
        """After a successful call whose prompt filled positions 0..length-1."""
        if llama not in self._watched:
            self._watched.add(llama)
            record, target = weakref.ref(self), weakref.ref(llama)
            on_state_change(llama, lambda: record() is not None and record()._forget(target()))
        self._llama = weakref.ref(llama)
        self._prompt = llama.input_ids[:length].copy()

    def _forget(self, llama: Any) -> None:
        if self._llama is not None and self._llama() is llama:
            self.drop()
