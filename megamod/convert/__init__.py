"""Hugging Face <-> megamod checkpoint conversion (the tools/convert_hf.py command drives it)."""
