"""The edge server: runs the tail blocks of many UEs' sessions, each with its own KV cache."""
