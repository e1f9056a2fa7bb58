"""How the front-end process asks glibc to hand freed memory back.

glibc serves an allocation above its mmap threshold with its own mapping, unmapped when freed;
but each time such a block is freed it raises the threshold to that block's size (up to 32 MiB).
After one 14 MB prompt the threshold is 14 MB, and every 1 MiB upload chunk after it comes from
the heap arenas of the threads that touch it (gRPC's, the event loop's, the workers'), where
freed memory mostly stays: three 300 MB uploads after a 14 MB prompt left the front end 553 MB
larger at their peak (bench abuse). A fixed threshold keeps large buffers in their own mappings,
which go back to the system the moment they are freed.

What gRPC's core receives arrives in many small pieces, from the heap; after a large message
they are free but resident. `trim` (glibc's malloc_trim) gives such free pages back; the server
calls it shortly after a large message (`CallGuard.large_message_seen`), at most once a second.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter numbers (malloc.h)
MMAP_THRESHOLD_BYTES = 256 * 1024
"""Blocks from 256 KiB up get their own mapping: request buffers, upload chunks, prompts."""


def pin_mmap_threshold() -> bool:
    """Fix glibc's mmap threshold (setting it turns its dynamic raising off); False where the C
    library is not glibc (nothing to do there)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError):
        log.info("not glibc: the mmap threshold is left as it is")
        return False


def trim() -> None:
    """Give free heap pages back to the system (glibc's malloc_trim; a no-op elsewhere)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
