"""exportd: disk images and block devices as raw files through FUSE, driven by QMP."""

__version__ = "0.1.0"
