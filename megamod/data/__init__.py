"""Data: tokenizers, conversation templates, CLIP preprocessing, data sets, sampling, batching, synthetic data.

Modules are imported where used (`from megamod.data.templates import ...`), so importing the package is free.
"""
