"""What both ends of a split share: artifact loading, block execution with KV caches, generation helpers.

Nothing in this package imports torch or transformers, so a UE or an edge server needs only onnxruntime,
numpy and tokenizers to run.
"""
