import numpy as np
import pytest
import torch

from dmd.utils.common import MAX_INT_LIST, int_ranges, make_grid, one_hot, parse_int_list, to_uint8


def test_parse_int_list():
    assert parse_int_list("0-3,7,10-11") == [0, 1, 2, 3, 7, 10, 11]
    assert parse_int_list([5, 6]) == [5, 6]
    with pytest.raises(ValueError, match="cannot parse"):
        parse_int_list("1,a")
    with pytest.raises(ValueError, match="ends before"):
        parse_int_list("5-2")


def test_int_ranges_never_expand_a_huge_range():
    seeds = int_ranges("10-4000000009,3")  # 4e9 seeds as a list would take ~160 GB
    assert len(seeds) == 4_000_000_001 and seeds[0] == 10 and seeds[-1] == 3 and seeds[-2] == 4_000_000_009
    head = seeds[:5]
    assert len(head) == 5 and list(head) == [10, 11, 12, 13, 14]
    assert list(seeds[3_999_999_998:]) == [4_000_000_008, 4_000_000_009, 3]
    assert np.asarray(seeds[2:4]).tolist() == [12, 13] and np.asarray(seeds[2:4]).dtype == np.int64
    assert list(int_ranges("0-3,7,10-11")[2:6]) == [2, 3, 7, 10] and list(int_ranges([5, 6])) == [5, 6]
    assert parse_int_list("0-4000000000", limit=3) == [0, 1, 2]
    with pytest.raises(ValueError, match="does not fit in 64 bits"):
        int_ranges("0,99999999999999999999")
    with pytest.raises(ValueError, match="9223372036854775808 does not fit in 64 bits"):
        parse_int_list([2**63])


def test_parse_int_list_refuses_more_than_its_bound():
    """A list longer than MAX_INT_LIST is an error naming its length, not gigabytes of Python ints."""
    assert len(parse_int_list(f"1-{MAX_INT_LIST}")) == MAX_INT_LIST
    for s in [f"0-{MAX_INT_LIST}", "0-4000000000"]:
        with pytest.raises(ValueError, match=f"values, more than the {MAX_INT_LIST} one command takes"):
            parse_int_list(s)


def test_one_hot():
    assert one_hot([2, 0], 0) is None
    assert torch.equal(one_hot([2, 0], 3), torch.tensor([[0.0, 0, 1], [1, 0, 0]]))


def test_to_uint8_matches_edm_quantisation():
    # (x * 127.5 + 128) truncated: -1 -> 0 (0.5 truncates), 0 -> 128, 1 -> 255 (255.5 clipped), 0.003 -> 128.38 -> 128.
    x = torch.tensor([-1.0, 0.0, 1.0, 0.003, -0.0040, 2.0, -2.0]).reshape(1, 1, 1, 7)
    assert to_uint8(x).ravel().tolist() == [0, 128, 255, 128, 127, 255, 0]
    assert to_uint8(x).dtype == np.uint8


def test_make_grid_layout():
    images = torch.linspace(-1, 1, 5).reshape(5, 1, 1, 1).expand(5, 3, 4, 4)
    grid = make_grid(images, nrow=3, pad=1)
    assert grid.size == (3 * 5 + 1, 2 * 5 + 1)
    pixels = np.asarray(grid)
    assert pixels[1, 1].tolist() == [0, 0, 0]  # first image is -1 -> black
    assert pixels[6, 6].tolist() == [255, 255, 255]  # 5th image (row 1, col 1) is +1 -> white
