"""From a batch to a prediction: capture the hidden states, keep each row's real (last ``n_pos``)
tokens, cast to the storage dtype on the device and copy to the host without waiting."""

from __future__ import annotations

from dataclasses import fields, replace

import numpy as np
import torch

from actlightning.contracts import Batch, Prediction
from actlightning.errors import ActivationError
from actlightning.model.capture import HiddenStateCapture


def select_tokens(
    lengths: torch.Tensor, first_token: torch.Tensor, seq_len: int, n_pos: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Which padded positions to export, as a flat index into ``[batch * seq_len]``.

    ``lengths``: real tokens per row; ``first_token``: column of each row's first real token (0 with
    right padding). Keeps the last ``n_pos`` real tokens of each row (all when ``n_pos`` is None).
    Returns ``(flat_index [T], n_tokens [B], start_position [B])``; ``start_position`` is the position
    of the first exported token within the unpadded sequence.
    """
    n_tokens = lengths if n_pos is None else lengths.clamp(max=n_pos)
    start_position = lengths - n_tokens
    rows = torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), n_tokens)
    row_starts = torch.cumsum(n_tokens, 0) - n_tokens
    within = torch.arange(rows.numel(), device=lengths.device) - row_starts[rows]
    columns = first_token[rows] + start_position[rows] + within
    return rows * seq_len + columns, n_tokens, start_position


def _to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A host copy of a device tensor: pinned and asynchronous on CUDA; CPU tensors pass through."""
    if tensor.device.type != "cuda":
        return tensor
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    return host


# Rows of a column turned to float64 at a time for its sums (bounds the device memory they take).
MOMENT_ROWS = 4096


def stored_moments(stored: torch.Tensor) -> torch.Tensor:
    """float64 ``[2 * width + 2]``: the sum and sum of squares of each component of ``stored`` (the
    values as the export stores them, exactly widened), the sum of the rows' norms and of their
    squared norms. Computed where the batch is (on the GPU: next to nothing), a chunk of rows at a time."""
    width = stored.shape[1]
    total = torch.zeros(2 * width + 2, dtype=torch.float64, device=stored.device)
    for start in range(0, stored.shape[0], MOMENT_ROWS):
        chunk = stored[start : start + MOMENT_ROWS].double()
        squares = chunk * chunk
        total[:width] += chunk.sum(0)
        total[width : 2 * width] += squares.sum(0)
        norms_squared = squares.sum(1)
        total[-2] += norms_squared.sqrt().sum()
        total[-1] += norms_squared.sum()
    return total


def batch_rows(batch: Batch, rows: slice) -> Batch:
    """The sub-batch of ``rows`` (used to split a batch that ran out of memory)."""
    sliced = {
        f.name: getattr(batch, f.name)[rows]
        for f in fields(batch)
        if isinstance(getattr(batch, f.name), (torch.Tensor, np.ndarray))
    }
    labels = None if batch.labels is None else batch.labels.slice(rows.start, rows.stop - rows.start)
    return replace(batch, **sliced, labels=labels, host_tokens=int(sliced["lengths"].sum()))


def join_predictions(first: Prediction, second: Prediction) -> Prediction:
    """The rows of ``first`` then ``second`` (the halves of a batch split after running out of memory)."""
    for part in (first, second):
        if part.ready is not None:
            part.ready.synchronize()
    return Prediction(
        example_id=torch.cat([first.example_id, second.example_id]),
        n_tokens=torch.cat([first.n_tokens, second.n_tokens]),
        start_position=torch.cat([first.start_position, second.start_position]),
        input_ids=torch.cat([first.input_ids, second.input_ids]),
        vectors={name: torch.cat([first.vectors[name], second.vectors[name]]) for name in first.vectors},
        max_abs=torch.maximum(first.max_abs, second.max_abs),
        moments={name: first.moments[name] + second.moments[name] for name in first.moments},
    )


def predict(capture: HiddenStateCapture, batch: Batch, n_pos: int | None, output_dtype: torch.dtype) -> Prediction:
    """The batch's exported activations: each row's real tokens (the last ``n_pos``), packed, in
    ``output_dtype``, with each column's largest magnitude for the writer's finiteness check."""
    input_ids = batch.input_ids
    hidden = capture(input_ids=input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids)
    batch_size, seq_len = input_ids.shape
    flat, n_tokens, start_position = select_tokens(batch.lengths, batch.first_token, seq_len, n_pos)
    vectors, max_abs, moments = {}, [], {}
    for column, states in hidden.items():
        if states.dim() != 3 or tuple(states.shape[:2]) != (batch_size, seq_len):
            raise ActivationError(
                f"{column} has shape {tuple(states.shape)}, not [batch, sequence, width] = "
                f"[{batch_size}, {seq_len}, ...]; "
                "choose a hook point whose output holds one vector per token"
            )
        selected = states.reshape(batch_size * seq_len, -1).index_select(0, flat)
        stored = selected.to(output_dtype)  # cast on the device: less to copy
        # One pass: the largest magnitude is NaN/inf if any value is, and shows float16 overflow.
        max_abs.append(torch.linalg.vector_norm(selected, ord=float("inf"), dtype=torch.float32))
        moments[column] = _to_host(stored_moments(stored))
        vectors[column] = _to_host(stored)
    prediction = Prediction(
        example_id=_to_host(batch.example_id),
        n_tokens=_to_host(n_tokens),
        start_position=_to_host(start_position),
        input_ids=_to_host(input_ids.reshape(-1).index_select(0, flat).to(torch.int32)),
        vectors=vectors,
        max_abs=_to_host(torch.stack(max_abs)),
        moments=moments,
    )
    if input_ids.device.type == "cuda":
        # The copies above are asynchronous; the writer thread waits on this event, so the next
        # forward pass is queued on the GPU while this batch travels to the host.
        prediction.ready = torch.cuda.Event()
        prediction.ready.record()
    return prediction
