"""pyengine's benchmarks against native torch: `python -m pyengine bench --help`. Method and floors: NOTES.md."""
from .cli import main

__all__ = ["main"]
