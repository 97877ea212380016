"""Deep Compression (Han et al. 2016) stages and the `.esq` archive they produce.

``huffman``: canonical, length-limited Huffman coding with a vectorised batched decoder.
``container``: the checked, versioned `.esq` archive (specification: docs/FORMAT.md).
Both are numpy-only, so the torch-free runtime can read compressed models.
"""

__all__ = ["container", "huffman"]
