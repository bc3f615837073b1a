"""Qwen2.5: a GQA transformer (transformers' Qwen2 implementation)."""
