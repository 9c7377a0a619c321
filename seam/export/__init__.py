"""Cutting a Hugging Face decoder LLM into ONNX blocks: model sources, family adapters, export and validation.

Imports torch and transformers, as fine-tuning (``seam.finetune``) and the profiler's training do; the UE and
the edge never import this package.
"""
