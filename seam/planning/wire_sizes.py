"""What each message of a split costs on the link, in bytes: a Step from the UE and the StepResult back.

Sizes follow the wire protocol, with header sizes measured by encoding real messages, so the cost model charges
exactly the bytes the UE and the edge exchange (transport framing aside).
"""

from __future__ import annotations

import uuid

import numpy as np

from seam.runtime.codecs import encoded_bytes
from seam.runtime.protocol import Step, StepResult, encode

ID_BYTES = 8  # token ids, attention mask and position ids travel as int64


# --- message sizes ------------------------------------------------------------------------------------------


def _header_bytes(tokens: bool) -> tuple[int, int]:
    """Header frames of a realistic decode Step (hidden states, or token ids at split 0) and its StepResult.

    The header lists shapes and the step number as decimal text, so other shapes differ by a few bytes only.
    """
    session_id = uuid.uuid4().hex  # what the UE uses: always 32 characters
    batch, past, hidden = 1, 511, 4096
    mask = np.ones((batch, 1), np.int64)  # the new position's column: the edge holds the rest
    positions = np.full((batch, 1), past, np.int64)
    if tokens:
        step = Step(session_id, 128, mask, positions, input_ids=np.zeros((batch, 1), np.int64))
    else:
        step = Step(session_id, 128, mask, positions, hidden_states=np.zeros((batch, 1, hidden), np.float16))
    result = StepResult(session_id, 128, 1 / 81, np.zeros(batch, np.int64))  # 1/81 s: a full-length float repr
    return len(encode(step)[0]), len(encode(result)[0])


STEP_HEADER_BYTES, RESULT_HEADER_BYTES = _header_bytes(tokens=False)
TOKEN_STEP_HEADER_BYTES, _ = _header_bytes(tokens=True)
# A private output's result: the last layer's hidden states in place of the tokens.
HIDDEN_RESULT_HEADER_BYTES = len(encode(StepResult(uuid.uuid4().hex, 128, 1 / 81,
                                                   hidden_states=np.zeros((1, 1, 4096), np.float32)))[0])


def uplink_bytes(split: int, batch: int, new: int, hidden_size: int, dtype_bytes: int, codec: str | None = None) -> int:
    """Bytes of one Step from the UE: its boundary output for ``new`` positions (coded with ``codec`` if given),
    their mask columns and positions (the edge holds the mask of the earlier ones)."""
    if split == 0:
        first = batch * new * ID_BYTES + TOKEN_STEP_HEADER_BYTES
    elif codec is not None:
        first = encoded_bytes(codec, (batch, new, hidden_size)) + STEP_HEADER_BYTES
    else:
        first = batch * new * hidden_size * dtype_bytes + STEP_HEADER_BYTES
    return first + 2 * batch * new * ID_BYTES


def downlink_bytes(batch: int, hidden_bytes: int | None = None) -> int:
    """Bytes of one StepResult: one sampled token per sequence, or with private output each sequence's last
    hidden state of ``hidden_bytes``."""
    if hidden_bytes is not None:
        return batch * hidden_bytes + HIDDEN_RESULT_HEADER_BYTES
    return batch * ID_BYTES + RESULT_HEADER_BYTES
