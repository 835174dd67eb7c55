"""Window geometry against hand-derived values (Swin sec. 3.2, Swin V2 sec. 3.3)."""

import math

import pytest
import torch

from swinv2.shifted_windows import shifted_merge, shifted_partition
from swinv2.windows import (
    SHIFT_MASK_VALUE,
    border_patterns,
    clip_window,
    inverse_norm,
    log_spaced_coords_table,
    relative_position_index,
    shift_region_mask,
    window_partition,
    window_reverse,
)


def test_coords_table_hand_values():
    table = log_spaced_coords_table((3, 3))
    # offsets -2..2 divided by (3 - 1), times 8: -8, -4, 0, 4, 8 -> sign * log2(1 + |t|) / 3
    expected_1d = [-math.log2(9) / 3, -math.log2(5) / 3, 0.0, math.log2(5) / 3, math.log2(9) / 3]
    assert table.shape == (5, 5, 2)
    for i, dy in enumerate(expected_1d):
        for j, dx in enumerate(expected_1d):
            assert torch.allclose(table[i, j], torch.tensor([dy, dx]), atol=1e-6)


def test_coords_table_normalised_by_pretrained_window():
    # window 3 fine-tuned from window 2: offsets divided by (2 - 1), so +-1 -> +-8 and +-2 -> +-16
    table = log_spaced_coords_table((3, 3), pretrained_window=(2, 2))
    assert math.isclose(table[0, 2, 0].item(), -math.log2(17) / 3, rel_tol=1e-6)
    assert math.isclose(table[1, 2, 0].item(), -math.log2(9) / 3, rel_tol=1e-6)
    assert table[2, 2].abs().sum() == 0


def test_coords_table_rectangular_and_window_of_one():
    table = log_spaced_coords_table((1, 4))
    assert table.shape == (1, 7, 2)
    assert torch.isfinite(table).all() and table[..., 0].abs().sum() == 0  # a side of 1 has only offset 0
    assert math.isclose(table[0, 0, 1].item(), -math.log2(9) / 3, rel_tol=1e-6)  # dx = -3 / (4 - 1) * 8


def test_relative_position_index_hand_values():
    index = relative_position_index((2, 2))  # tokens (0,0), (0,1), (1,0), (1,1); rows of 2*2-1 = 3
    assert index[0, 3] == 0  # query (0,0), key (1,1): dy = dx = -1
    assert index[3, 0] == 8  # dy = dx = +1
    assert index[1, 2] == (-1 + 1) * 3 + (1 + 1)  # query (0,1), key (1,0): dy = -1, dx = +1
    assert (index.diagonal() == 4).all()


def test_relative_position_index_matches_loop():
    wh, ww = 3, 5
    index = relative_position_index((wh, ww))
    tokens = [(y, x) for y in range(wh) for x in range(ww)]
    for a, (qy, qx) in enumerate(tokens):
        for b, (ky, kx) in enumerate(tokens):
            assert index[a, b] == (qy - ky + wh - 1) * (2 * ww - 1) + (qx - kx + ww - 1)


def test_shift_mask_hand_example():
    # 4x4 map, window 2, shift 1: regions rows [0,2) [2,3) [3,4) x cols likewise
    mask = shift_region_mask((4, 4), (2, 2), (1, 1))
    assert mask.shape == (4, 4, 4)
    assert (mask[0] == 0).all()  # top-left window lies in one region
    # bottom-right window holds tokens of four different regions: only the diagonal is allowed
    assert torch.equal(mask[3], torch.full((4, 4), -100.0).fill_diagonal_(0))
    # top-right window: columns 2 and 3 are different regions, rows 0 and 1 the same
    expected = torch.tensor([[0, -100, 0, -100], [-100, 0, -100, 0], [0, -100, 0, -100], [-100, 0, -100, 0]]).float()
    assert torch.equal(mask[1], expected)


@pytest.mark.parametrize("size,window,shift", [((4, 4), (2, 2), (1, 1)), ((8, 12), (4, 4), (2, 2)),
                                               ((3, 15), (3, 5), (0, 2)), ((12, 8), (4, 4), (2, 0))])
def test_border_patterns_are_the_shift_mask_per_window(size, window, shift):
    """The four groups the attention uses (interior, last row, last column, corner) laid out per window give the
    full (nW, N, N) mask back."""
    full = shift_region_mask(size, window, shift)
    patterns = border_patterns(window, shift)
    grid = (size[0] // window[0], size[1] // window[1])
    for index in range(full.shape[0]):
        row, col = divmod(index, grid[1])
        kind = {(False, False): None, (True, False): "last_row", (False, True): "last_col", (True, True): "corner"}[
            (row == grid[0] - 1, col == grid[1] - 1)]
        want = torch.zeros_like(full[index]) if kind is None else patterns[kind].float() * SHIFT_MASK_VALUE
        assert torch.equal(full[index], want), (index, kind)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_inverse_norm_is_finite_for_zero_and_tiny_vectors_in_every_dtype(dtype):
    """A padded key is exactly 0: its factor and gradient are 0 (F.normalize's 1e-12 underflows in fp16, 0 * inf
    is NaN); a tiny nonzero vector stays within the dtype's range; ordinary ones are F.normalize's."""
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0], [1e-7, 0.0]], dtype=dtype, requires_grad=True)
    factor = inverse_norm(x, 100.0)
    out = factor * x
    out.sum().backward()
    assert factor.dtype == dtype and torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    assert out[0].abs().sum() == 0 and x.grad[0].abs().sum() == 0
    want = 100.0 * torch.nn.functional.normalize(x[1:2].detach().double(), dim=-1)
    torch.testing.assert_close(out[1:2].double(), want, rtol=1e-2 if dtype.itemsize == 2 else 1e-12, atol=0.0)


def test_partition_reverse_round_trip_and_order():
    x = torch.arange(2 * 4 * 6 * 3, dtype=torch.float32).view(2, 4, 6, 3)
    windows = window_partition(x, (2, 3))
    assert windows.shape == (2, 4, 6, 3)
    assert torch.equal(windows[0, 1, 0], x[0, 0, 3])  # second window starts at column 3
    assert torch.equal(windows[0, 2, 4], x[0, 3, 1])  # third window starts at row 2; token 4 = (1, 1)
    assert torch.equal(window_reverse(windows, (2, 3), (4, 6)), x)


def test_clip_window_per_side():
    assert clip_window((6, 6), (12, 12), (6, 6)) == ((6, 6), (0, 0))
    assert clip_window((12, 16), (12, 12), (6, 6)) == ((12, 12), (0, 6))
    assert clip_window((48, 48), (12, 12), (6, 6)) == ((12, 12), (6, 6))


@pytest.mark.parametrize(
    "size,window,shift",
    [
        ((8, 8), (4, 4), (2, 2)),
        ((16, 24), (8, 8), (4, 4)),
        ((14, 14), (7, 7), (3, 3)),
        ((8, 12), (4, 6), (0, 0)),
        ((8, 8), (4, 4), (3, 1)),
        ((6, 6), (6, 6), (0, 0)),
    ],
)
def test_one_pass_shifted_partition_and_merge_equal_roll_and_partition(size, window, shift):
    x = torch.randn(2, *size, 6, dtype=torch.float64, requires_grad=True)
    want = window_partition(torch.roll(x, (-shift[0], -shift[1]), (1, 2)), window)
    got = shifted_partition(x, window, shift)
    assert torch.equal(got, want)
    grad = torch.randn_like(want)
    assert torch.equal(torch.autograd.grad(got, x, grad)[0], torch.autograd.grad(want, x, grad)[0])
    windows = got.detach().requires_grad_()
    merged = shifted_merge(windows, window, shift, size)
    want = torch.roll(window_reverse(windows, window, size), shift, (1, 2))
    assert torch.equal(merged, want)
    assert torch.equal(merged, x.detach())
    grad = torch.randn_like(want)
    assert torch.equal(torch.autograd.grad(merged, windows, grad)[0], torch.autograd.grad(want, windows, grad)[0])
