"""mmsvc: an emulator of Linux mlock/munlock memory management (the 2022 mm/munlock rework)."""

__version__ = "0.1.0"
