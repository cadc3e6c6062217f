"""streamprune: prune and cache visual tokens so Video-LLMs and VLAs keep up with live streams."""

__version__ = "0.1.0"
