"""Deep Compression (Han et al. 2016) stages and the pipeline that orders them.

The `.esq` archive they produce is written through :mod:`edgesqueeze.format` (container,
Huffman coding, codec), which is numpy-only, so the torch-free runtime can read it.
"""
