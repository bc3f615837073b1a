"""Pythia: a GPT-NeoX transformer (transformers' GPTNeoX implementation)."""
