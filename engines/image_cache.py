"""A bounded, thread-safe LRU cache of image encodings, keyed by the image bytes' hash and the settings.

    key = ImageKey(sha256(encoded image bytes [+ instance masks]), session.image_settings)
    get(key)          -> ImageEncoding | None     a hit moves the entry to the most recent end
    put(key, enc)     -> evicts least recently used entries until the bytes fit the bound

The bound counts the bytes the encodings' tensors hold, wherever they live (host arrays, or GPU memory
on the TensorRT chain: the same bound then limits device memory). One cache is shared by every model
instance of a server; an entry larger than the whole bound is not cached. Only encodings a session made
enter it, so bytes that fail to decode never do (the caller decodes before it encodes).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass

MIB = 2**20


@dataclass(frozen=True)
class ImageKey:
    image_sha256: str   # of the encoded bytes as sent (and of the instance masks, when any)
    settings: str       # ArtifactSession.image_settings: preprocessing, image stages, backend, device


def image_key(data: bytes, settings: str, instance_masks=None) -> ImageKey:
    """The cache key of encoded image bytes under `settings` (instance masks, if any, are part of the image)."""
    h = hashlib.sha256(data)
    if instance_masks is not None:
        import numpy as np

        masks = np.ascontiguousarray(instance_masks)
        h.update(f"|masks {masks.dtype} {masks.shape}|".encode())
        h.update(masks.tobytes())
    return ImageKey(h.hexdigest(), settings)


class ImageCache:
    """LRU cache of ImageEncoding under a byte bound.

    Args:
        max_bytes (int): the most bytes the cached encodings may hold together; 0 turns the cache off
            (`get` always misses, `put` keeps nothing, nothing is counted).
    """

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"max_bytes {max_bytes} < 0")
        self.max_bytes = int(max_bytes)
        self._entries: OrderedDict[ImageKey, tuple[object, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = self.misses = self.evictions = self.too_large = self.replaced = 0

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def get(self, key: ImageKey):
        """The encoding cached for `key` (now the most recently used), or None; counts a hit or a miss."""
        if not self.enabled:
            return None
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry[0]

    def put(self, key: ImageKey, encoding) -> bool:
        """Cache `encoding` (its `nbytes` counted), evicting the least recently used until it fits.

        Returns:
            bool: whether it was cached (False: the cache is off, or it alone is over the bound).
        """
        if not self.enabled:
            return False
        size = int(encoding.nbytes)
        with self._lock:
            if size > self.max_bytes:
                self.too_large += 1
                return False
            old = self._entries.pop(key, None)  # two instances missed the same image: keep the newer copy
            if old is not None:
                self.bytes -= old[1]
                self.replaced += 1
            while self.bytes + size > self.max_bytes:
                _, (_, freed) = self._entries.popitem(last=False)
                self.bytes -= freed
                self.evictions += 1
            self._entries[key] = (encoding, size)
            self.bytes += size
            return True

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def stats(self) -> dict:
        """Counters and occupancy, read under the lock (one consistent snapshot)."""
        with self._lock:
            return {"hits": self.hits, "misses": self.misses, "evictions": self.evictions,
                    "too_large": self.too_large, "replaced": self.replaced, "entries": len(self._entries), "bytes": self.bytes,
                    "max_bytes": self.max_bytes}

    def summary(self) -> str:
        s = self.stats()
        if not self.enabled:
            return "image cache off"
        return (f"image cache: {s['hits']} hits, {s['misses']} misses, {s['evictions']} evictions, "
                f"{s['entries']} entries, {s['bytes'] / MIB:.1f} of {s['max_bytes'] / MIB:.0f} MiB")
