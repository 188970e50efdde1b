#!/usr/bin/env python3
"""How fast this machine hands a process fresh memory: first and second touch of an anonymous mapping, with and
without MADV_HUGEPAGE (the engine's arena is advised for huge pages).

On some virtual machines (free page reporting to the host, e.g. Firecracker with a balloon device) memory the guest
has not used recently is backed by the host only on first touch, and huge-page-sized blocks are exactly what gets
reported: then an offloaded model's first pass pays for its arena at this rate. generation.py's M2 (time to first
token) includes it.

    python3 benchmarks/first_touch.py --gib 1.5
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import time

MADV_HUGEPAGE = 14
MADV_POPULATE_WRITE = 23  # Linux 5.14: faults every page in, writable, without a user-space loop


def populate_rate(nbytes: int, huge: bool) -> float:
    """Maps `nbytes`, faults them all in (MADV_POPULATE_WRITE, the kernel's own loop), unmaps; returns GB/s."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    anchor = ctypes.c_char.from_buffer(region)
    try:
        if huge:
            region.madvise(MADV_HUGEPAGE)
        start = time.perf_counter()
        if libc.madvise(ctypes.addressof(anchor), nbytes, MADV_POPULATE_WRITE) != 0:
            raise OSError(ctypes.get_errno(), "madvise(MADV_POPULATE_WRITE) failed (Linux >= 5.14 needed)")
        return nbytes / (time.perf_counter() - start) / 1e9
    finally:
        del anchor
        region.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gib", type=float, default=1.5, help="size of each mapping")
    args = p.parse_args()
    nbytes = int(args.gib * (1 << 30)) // (2 << 20) * (2 << 20)
    for huge in (True, False):
        # The second mapping right after the first gets the pages the first one just freed (already backed).
        first, again = populate_rate(nbytes, huge), populate_rate(nbytes, huge)
        print(f"{'huge pages' if huge else '4 KiB pages'}: fresh memory {first:.2f} GB/s, the same memory again "
              f"right after {again:.2f} GB/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
