"""Follow-up questions without redoing the work: the image cache and KV reuse of a trimmed handler.

- :class:`ImageCache`: the rows libmtmd encoded for each picture (before selection), per handler,
  keyed by the mmproj file, the encoder settings that change rows and the picture's bytes (sha256),
  bounded by bytes, least recently used out first. A hit skips ``mtmd_encode_chunk``. It also knows
  the encodes in flight (``handler.preload``), so that a request for that picture waits for one
  instead of encoding it again.
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
import concurrent.futures
import os
import threading
import weakref
from typing import Any, Optional

import numpy as np

from ..llamacpp import on_state_change, trim_kv

FOLLOW_UPS = ("keep-rows", "reselect")


class ImageCache:
    """Encoded rows per picture key (a list, one array per chunk), at most `limit` bytes of them
    (0: off), and the encodes in flight per picture key."""

    def __init__(self, limit: int):
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise ValueError(f"image_cache_bytes must be an int >= 0, got {limit!r}")
        self.limit = limit
        self.bytes = 0
        self.hits = 0
        self._rows: collections.OrderedDict[tuple, np.ndarray] = collections.OrderedDict()
        self._pending: dict[tuple, concurrent.futures.Future] = {}
        self._lock = threading.Lock()

    @staticmethod
    def picture_key(mmproj: str, encoder: tuple, picture: str) -> tuple:
        """The mmproj file as it is now (path, size, modification time), the encoder settings that
        change rows, the picture's sha256."""
        stat = os.stat(mmproj)
        return os.path.realpath(mmproj), stat.st_size, stat.st_mtime_ns, encoder, picture

    def in_flight(self, picture: tuple) -> tuple[concurrent.futures.Future, bool]:
        """The future of the encode of `picture` in flight, and False; or a new one, and True: the
        caller then encodes, and calls :meth:`landed` before the future is done. The new future is
        already running: nobody can cancel an encode that others may be waiting for."""
        with self._lock:
            future = self._pending.get(picture)
            if future is not None:
                return future, False
            future = self._pending[picture] = concurrent.futures.Future()
            future.set_running_or_notify_cancel()
            return future, True

    def pending(self, picture: tuple) -> Optional[concurrent.futures.Future]:
        """The future of an encode of `picture` in flight, if there is one."""
        with self._lock:
            return self._pending.get(picture)

    def landed(self, picture: tuple, future: concurrent.futures.Future) -> None:
        """The encode of `future` is over: `picture` is no longer in flight (unless another encode's is)."""
        with self._lock:
            if self._pending.get(picture) is future:
                del self._pending[picture]

    def clear(self) -> None:
        """Forgets every picture (encodes in flight go on)."""
        with self._lock:
            self._rows.clear()
            self.bytes = 0

    def get(self, picture: tuple, *, hit: bool = True) -> Optional[list[np.ndarray]]:
        """The rows of each chunk of a picture, or None; a find counts in ``hits`` if `hit` (requests
        that found rows cached; not those that waited for an encode in flight, nor preloads)."""
        with self._lock:
            chunks = self._rows.get(picture)
            if chunks is not None:
                self._rows.move_to_end(picture)
                self.hits += hit
            return chunks

    def put(self, picture: tuple, chunks: list[np.ndarray]) -> None:
        size = sum(rows.nbytes for rows in chunks)
        if size > self.limit:
            return
        with self._lock:
            if picture in self._rows:
                self.bytes -= sum(rows.nbytes for rows in self._rows.pop(picture))
            self._rows[picture] = chunks
            self.bytes += size
            while self.bytes > self.limit:
                _, old = self._rows.popitem(last=False)
                self.bytes -= sum(rows.nbytes for rows in old)

    def __len__(self) -> int:
        return len(self._rows)


class Restart(Exception):
    """The KV cache could not drop a tail: the call starts again from an empty cache."""


class Reuse:
    """One call's walk along the old prompt: positions below `limit` whose ids match are kept."""

    def __init__(self, llama: Any, old: np.ndarray, limit: int):
        self._llama = llama
        self.old = old  # the recorded prompt's ids
        self.limit = min(limit, len(old))
        self.matching = True
        self.kept = 0  # positions reused

    def text(self, start: int, tokens: list[int]) -> int:
        """How many of `tokens` (at positions start..) are already in the cache."""
        if not self.matching:
            return 0
        n = max(0, min(len(tokens), self.limit - start))
        same = np.asarray(tokens[:n], dtype=self.old.dtype) == self.old[start : start + n]
        n = int(np.argmin(same)) if not same.all() else n
        self.kept = start + n
        return n

    def image(self, start: int, ids: np.ndarray) -> bool:
        """Whether the whole image (its positions' digest ids) is already in the cache."""
        end = start + len(ids)
        if self.matching and end <= self.limit and np.array_equal(self.old[start:end], ids):
            self.kept = end
            return True
        return False

    def holds(self, start: int, ids: np.ndarray) -> bool:
        """Whether the cache, matching so far, holds these ids from `start` on (beyond the new prompt's
        limit too: a picture the new prompt keeps whole where it counted it pruned)."""
        end = start + len(ids)
        return self.matching and end <= len(self.old) and np.array_equal(self.old[start:end], ids)

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
        self._whole: frozenset = frozenset()
        self._watched: weakref.WeakSet = weakref.WeakSet()

    def drop(self) -> None:
        self._llama, self._prompt, self._whole = None, None, frozenset()

    def whole(self, llama: Any) -> frozenset:
        """The pictures (sha256) whose every row the recorded prompt in `llama`'s cache holds: the
        conversation answered with all of them (a prefill on attach), so its next call keeps them whole."""
        return self._whole if self._llama is not None and self._llama() is llama else frozenset()

    def begin(self, llama: Any, length: int) -> Optional[Reuse]:
        """A Reuse for a new prompt of `length` positions, or None (no valid record: empty the cache)."""
        prompt, owner = self._prompt, self._llama() if self._llama else None
        self.drop()  # until the call succeeds
        if prompt is None or owner is not llama or llama.n_tokens < len(prompt):
            return None
        if not np.array_equal(llama.input_ids[: len(prompt)], prompt):
            return None
        return Reuse(llama, llama.input_ids[: llama.n_tokens].copy(), max(0, length - 1))

    def remember(self, llama: Any, length: int, whole: frozenset = frozenset()) -> None:
        """After a successful call whose prompt filled positions 0..length-1, with the pictures
        `whole` decoded with every row."""
        if llama not in self._watched:
            self._watched.add(llama)
            record, target = weakref.ref(self), weakref.ref(llama)
            on_state_change(llama, lambda: record() is not None and record()._forget(target()))
        self._llama = weakref.ref(llama)
        self._prompt = llama.input_ids[:length].copy()
        self._whole = frozenset(whole)

    def _forget(self, llama: Any) -> None:
        if self._llama is not None and self._llama() is llama:
            self.drop()
