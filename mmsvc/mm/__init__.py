"""The emulated kernel: one module per kernel file (mmap, memory, mlock, swap, rmap, vmstat...).

Per-page work runs next to the data as Redis Functions (``lua/*.lua``, one file per kernel
counterpart); the Python modules here orchestrate syscalls, VMAs, locks and batches.
"""
