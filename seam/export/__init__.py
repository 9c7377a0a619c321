"""Cutting a Hugging Face decoder LLM into ONNX blocks: model sources, family adapters, export and validation.

The only package that imports torch and transformers.
"""
