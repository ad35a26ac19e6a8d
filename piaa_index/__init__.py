"""piaa-index: tag and search photo collections by what is in them.

Importing this package is cheap: torch, open_clip and faiss are imported only where used.
"""

__version__ = "0.1.0"
