"""The mmsvc command line (console script ``mmsvc``)."""
