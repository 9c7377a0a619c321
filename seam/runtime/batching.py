"""Several sessions' steps as one batch: in the shared-buffer layout over their rows of one arena, written in
place; otherwise (the concat layout, or caches of different arenas) stacked into a left-padded batch and sliced
back. And the memory accounting of batched caches between bursts.
"""

from __future__ import annotations

import numpy as np

from seam.runtime.executor import SpanRunner


def run_together(
    runners: list[SpanRunner],
    first_inputs: list[np.ndarray],
    attention_masks: list[np.ndarray],
    position_ids: list[np.ndarray],
) -> list[np.ndarray]:
    """One step for several runners of the same span as one batch; returns each runner's output.

    Sequences of different past lengths are aligned by left-padding their caches and masks, which the attention
    bias already treats as padding, so each sequence attends to exactly what it would alone. Afterwards each
    runner keeps its own rows of the grown cache, without the padding.
    """
    lead = runners[0]
    if lead.shared_buffers and first_inputs[0].shape[1] > 1:
        # Steps of several positions (prefill chunks) gain little from a batch; attention over rows of
        # different lengths is exact only for one new position each.
        return [runner.run(*inputs) for runner, *inputs in zip(runners, first_inputs, attention_masks, position_ids)]
    if lead.shared_buffers and all(runner.buffers.arena is lead.buffers.arena for runner in runners):
        return _run_in_rows(runners, first_inputs, attention_masks, position_ids)
    pasts = [runner.past_length for runner in runners]
    longest = max(pasts)
    rows = np.cumsum([0] + [len(first) for first in first_inputs])
    new = first_inputs[0].shape[1]
    mask = np.zeros((rows[-1], longest + new), dtype=np.int64)
    cache = {
        name: np.zeros((rows[-1], *lead.kv_shape[:1], longest, lead.kv_shape[1]), dtype=lead.kv_dtype)
        for name in lead.cache
    }
    for index, (runner, past) in enumerate(zip(runners, pasts)):
        span = slice(rows[index], rows[index + 1])
        mask[span, longest - past:] = attention_masks[index]
        for name, stacked in cache.items():
            stacked[span, :, longest - past:] = runner.cache[name]
    if lead.shared_buffers:
        buffers = lead.new_buffers(rows[-1], own=True)
        buffers.assign(cache)
        output = lead._forward_in_place(np.concatenate(first_inputs), mask, np.concatenate(position_ids), buffers)
        grown = buffers.views()
    else:
        output, grown = lead._forward(np.concatenate(first_inputs), mask, np.concatenate(position_ids), cache)
    for index, (runner, past) in enumerate(zip(runners, pasts)):
        span = slice(rows[index], rows[index + 1])
        runner.cache = {name: stacked[span, :, longest - past:] for name, stacked in grown.items()}
    return [output[rows[index]:rows[index + 1]] for index in range(len(runners))]


def _run_in_rows(runners: list[SpanRunner], first_inputs: list[np.ndarray], attention_masks: list[np.ndarray],
                 position_ids: list[np.ndarray]) -> list[np.ndarray]:
    """One decode step of runners whose caches are rows of one arena, in place, every row attending to its own
    positions (its mask left-aligned, the rest blocked). Rows step as one batch over a range of the arena; rows in
    the range that are not stepping (sessions between their turns, free rows) come along on a placeholder: each
    writes one position past its length, which its own next step writes again, and its output is dropped. A range
    grows while the rows along for the ride are no more than those stepping; beyond, a new range begins."""
    arena = runners[0].buffers.arena
    ranges: list[list] = []  # [start, stop, stepping rows, runner indices]
    for index in sorted(range(len(runners)), key=lambda index: runners[index].buffers.first_row):
        rows, batch = runners[index].buffers.rows, runners[index].buffers.batch
        if ranges and (rows.start - ranges[-1][0]) - ranges[-1][2] <= ranges[-1][2] + batch:  # idle <= stepping
            ranges[-1][1], ranges[-1][2] = rows.stop, ranges[-1][2] + batch
            ranges[-1][3].append(index)
        else:
            ranges.append([rows.start, rows.stop, batch, [index]])
    outputs: list[np.ndarray | None] = [None] * len(runners)
    for start, stop, _, members in ranges:
        first, mask, positions = _range_inputs(runners, members, first_inputs, attention_masks, position_ids,
                                               start, stop)
        shared = runners[members[0]].shared_inputs(mask, positions)
        output, _ = runners[members[0]].run_bound(first, shared, arena.values(start, stop), None)
        for index in members:
            rows = runners[index].buffers.rows
            outputs[index] = output[rows.start - start: rows.stop - start]
            runners[index].buffers.length += 1
    return outputs


def _range_inputs(runners, members, first_inputs, attention_masks, position_ids, start: int, stop: int):
    """The batch of rows [start, stop): each stepping runner's own inputs, a placeholder for every other row."""
    arena = runners[members[0]].buffers.arena
    lengths = [0] * (stop - start)
    for row in range(start, stop):
        owner = arena.owners[row]() if arena.owners[row] is not None else None
        lengths[row - start] = owner.length if owner is not None else 0
    arena.reserve(max(lengths) + 1)
    sample = first_inputs[members[0]]
    first = np.zeros((stop - start, 1, *sample.shape[2:]), dtype=sample.dtype)
    mask = np.zeros((stop - start, max(lengths) + 1), dtype=np.int64)
    positions = np.array(lengths, dtype=np.int64)[:, None]
    for row, length in enumerate(lengths):
        mask[row, : length + 1] = 1
    for index in members:
        rows = slice(runners[index].buffers.rows.start - start, runners[index].buffers.rows.stop - start)
        first[rows] = first_inputs[index]
        mask[rows] = 0
        mask[rows, : attention_masks[index].shape[1]] = attention_masks[index]
        positions[rows] = position_ids[index]
    return first, mask, positions


def _owner(array: np.ndarray) -> np.ndarray:
    """The array whose memory ``array`` views: itself when it owns its memory or onnxruntime does."""
    while isinstance(array.base, np.ndarray):
        array = array.base
    return array


def compact(runners: list[SpanRunner], extra_arenas=()) -> tuple[int, int]:
    """Gives every cache array that keeps a mostly dead array alive a copy of its own; returns the bytes the
    runners' caches cover and the bytes they hold, after.

    After ``run_together`` each runner's cache views the batch's arrays, and a view keeps its whole array
    alive: an idle session would hold its batch-mates' caches long after they moved on or closed. An array is
    copied out once less than half of it is still viewed, so the bytes held stay under twice those in use, and
    sessions that keep stepping together are never copied at all."""
    users: dict[int, tuple[np.ndarray, list[tuple[dict, str]]]] = {}
    live = held = 0
    arenas = {id(arena): arena for arena in extra_arenas}
    for runner in runners:
        if runner.buffers is not None:  # rows of an arena, which compacts itself
            live += runner.buffers.live_bytes
            arenas[id(runner.buffers.arena)] = runner.buffers.arena
            continue
        for name, array in runner.cache.items():
            owner = _owner(array)
            users.setdefault(id(owner), (owner, []))[1].append((runner.cache, name))
    for owner, views in users.values():
        used = sum(cache[name].nbytes for cache, name in views)
        if 2 * used < owner.nbytes:
            for cache, name in views:
                cache[name] = cache[name].copy()
        live += used
        held += used if 2 * used < owner.nbytes else owner.nbytes
    for arena in arenas.values():
        arena.compact()
        held += arena.nbytes
    return live, held
