"""``edge_server --log-messages FILE``: one JSON line per received message, its fields and its tensors' dtypes
and shapes (never their contents), so that what crossed the link can be audited afterwards."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from seam.runtime.protocol import Message


class MessageLog:
    def __init__(self, path: Path | None):
        self.file = open(path, "a") if path else None

    def record(self, message: Message) -> None:
        if self.file is None:
            return
        record = {"kind": message.kind}
        for name, value in vars(message).items():
            if isinstance(value, np.ndarray):
                record[name] = {"dtype": value.dtype.name, "shape": list(value.shape)}
            elif value is not None:
                record[name] = value
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
