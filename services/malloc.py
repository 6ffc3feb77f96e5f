"""The glibc heap settings dkv's processes run with (the CLI re-executes itself with them).

glibc returns large blocks to the OS on free and maps fresh zeroed pages for the next one, so
every 4 MiB frame pays its page faults again. Keeping the heap (see docs/benchmarks.md) makes
large copies several times faster on this kind of machine. A module of its own: the light client
(``dkv generate``) reads it too, without the server stack.
"""

MALLOC_TUNING = {
    "MALLOC_MMAP_THRESHOLD_": str(1 << 30),
    "MALLOC_TRIM_THRESHOLD_": str(1 << 30),
    "MALLOC_TOP_PAD_": str(256 << 20),
}
