"""Hugging Face interop: `lmtrain import` and `lmtrain export`, with the per-family tensor maps in one place."""
