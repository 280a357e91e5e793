"""Text micro-batches run sorted by length in chunks under a padded-token budget, and the outputs come back
in the requests' order (in process, with a model that echoes what it was given)."""

from __future__ import annotations

import torch
import torch.nn as nn

from slimguard.serve.text import PAD_BUDGET, TextBatch, TextServing, length_chunks


def test_length_chunks_sort_rows_and_keep_each_chunk_under_the_budget():
    lengths = [30, 5, 6, 29, 100, 7]
    chunks = length_chunks(lengths, budget=64)
    assert sorted(i for c in chunks for i in c) == list(range(len(lengths)))
    flat = [lengths[i] for c in chunks for i in c]
    assert flat == sorted(lengths)
    for c in chunks:  # within budget, except a row longer than the budget, alone
        assert len(c) * max(lengths[i] for i in c) <= 64 or len(c) == 1
    assert chunks == [[1, 2, 5], [3, 0], [4]]
    assert length_chunks([], 64) == []


class _Echo(nn.Module):
    """Returns, per row, the sum of its token ids and its length (from the attention mask); records the
    packed shapes it was called with."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def forward(self, packed: torch.Tensor) -> torch.Tensor:
        self.shapes.append(tuple(packed.shape))
        ids, mask = packed[:, 0], packed[:, 1]
        return torch.stack([(ids * mask).sum(-1), mask.sum(-1)], -1).float()


def test_forward_answers_in_the_batch_order_with_bounded_padding():
    serving = TextServing.__new__(TextServing)  # only pack() and forward() are used: no tokenizer needed
    serving.pad_id = 0
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(1, 50, (int(n),), generator=g).tolist() for n in torch.randint(1, 120, (64,), generator=g)]
    model = _Echo()
    out = serving.forward(model, TextBatch(rows))
    want = torch.tensor([[sum(r), len(r)] for r in rows], dtype=torch.float32)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    assert len(model.shapes) > 1 and sum(s[0] for s in model.shapes) == 64
    assert all(s[0] * s[2] <= PAD_BUDGET for s in model.shapes)
    one = _Echo()
    torch.testing.assert_close(serving.forward(one, TextBatch([[3, 4], [5]])), torch.tensor([[7.0, 2.0], [5.0, 1.0]]))
    assert one.shapes == [(2, 2, 2)]
