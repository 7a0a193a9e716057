"""ulvideo: Unified Latents for video (Heek, Hoogeboom, Mensink, Salimans, arXiv 2602.17270)."""

__version__ = "0.1.0"
