"""What both ends of a split share: artifact loading, block execution with KV caches, the wire protocol and
its transport, activation codecs, cache moves, link traces and the commands' common shell.

Nothing in this package imports torch or transformers, so a UE or an edge server needs only onnxruntime,
numpy and tokenizers to run.
"""
