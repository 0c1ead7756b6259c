import numpy as np
import pytest
import torch

from dmd.utils.common import (
    GRID_LINE,
    MAX_INT_LIST,
    display_samples,
    int_ranges,
    make_grid,
    one_hot,
    parse_int_list,
    parse_json,
    to_uint8,
)


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


def cell(grid, top, left, size):
    """The (size, size, 3) pixels of a grid cell whose top-left corner is at (top, left)."""
    return np.asarray(grid)[top : top + size, left : left + size]


def ink(region):
    """How many pixels of a text region are dark (text is black on white)."""
    return int((np.asarray(region) < 128).all(axis=-1).sum())


def test_make_grid_cells_are_the_quantised_images_nearest_upscaled():
    images = torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2.2 - 1.1  # some values clip
    grid = make_grid(images, nrow=3)  # 8 px -> 64 px cells: every pixel an 8 x 8 block; pad 2
    assert grid.mode == "RGB" and grid.size == (3 * (64 + 2) + 2, 2 * (64 + 2) + 2)
    expected = np.repeat(np.repeat(to_uint8(images), 8, axis=1), 8, axis=2)  # (5, 64, 64, 3)
    for i in range(5):
        r, k = divmod(i, 3)
        np.testing.assert_array_equal(cell(grid, 2 + r * 66, 2 + k * 66, 64), expected[i])
    assert (cell(grid, 2 + 66, 2 + 2 * 66, 64) == 255).all()  # the sixth slot is empty
    # The factor is the smallest integer reaching `cell`: 28 px -> 3x (84 px), 64 px -> 1x; cell=1 is native.
    assert make_grid(torch.zeros(1, 3, 28, 28)).size == (84 + 4, 84 + 4)
    assert make_grid(torch.zeros(1, 3, 64, 64)).size == (64 + 4, 64 + 4)
    assert make_grid(torch.zeros(1, 3, 8, 8), cell=100).size == (13 * 8 + 4, 13 * 8 + 4)


def test_make_grid_old_signatures_and_native_size():
    images = torch.linspace(-1, 1, 5).reshape(5, 1, 1, 1).expand(5, 3, 4, 4)
    grid = make_grid(images, nrow=3, pad=1, cell=1)  # the old layout: native size
    assert grid.size == (3 * 5 + 1, 2 * 5 + 1)
    pixels = np.asarray(grid)
    assert pixels[1, 1].tolist() == [0, 0, 0]  # first image is -1 -> black
    assert pixels[6, 6].tolist() == [255, 255, 255]  # 5th image (row 1, col 1) is +1 -> white
    positional = make_grid(images, 3, ["a", "bb"], 1)  # make_grid(images, nrow, row_labels, pad) still works
    assert np.array_equal(np.asarray(positional), np.asarray(make_grid(images, nrow=3, row_labels=["a", "bb"], pad=1)))
    assert display_samples(images).size == make_grid(images).size == (3 * 66 + 2, 2 * 66 + 2)  # 4 px -> 64 px cells
    assert display_samples(images, 5).size == (5 * 66 + 2, 66 + 2)


def test_make_grid_text_bands_and_their_geometry():
    images = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    plain = make_grid(images, nrow=3)
    grid = make_grid(images, nrow=3, row_labels=["G(z)", "mu_fake(x_t)"], col_labels=["a", "b", "c"], title="step 7")
    label_w = grid.width - plain.width  # the row-label column: widest label plus margins
    assert 60 < label_w < 120 and grid.height == plain.height + 2 * GRID_LINE  # 'mu_fake(x_t)'; title, labels
    expected = np.repeat(np.repeat(to_uint8(images), 8, axis=1), 8, axis=2)
    top = 2 * GRID_LINE + 2  # title band, column-label band, pad
    np.testing.assert_array_equal(cell(grid, top, label_w + 2, 64), expected[0])
    np.testing.assert_array_equal(cell(grid, top + 66, label_w + 2 + 2 * 66, 64), expected[5])
    title, labels = grid.crop((0, 0, grid.width, GRID_LINE)), grid.crop((0, top, label_w, top + 130))
    columns = [grid.crop((label_w + 2 + k * 66, GRID_LINE, label_w + 2 + k * 66 + 64, top)) for k in range(3)]
    assert ink(title) > 20 and ink(labels) > 40 and all(ink(c) > 5 for c in columns)
    assert np.array_equal(np.asarray(plain), np.asarray(make_grid(images, nrow=3, title="")))  # no text, no band
    wide = make_grid(images[:1], title="a title wider than one 64-px cell")
    assert wide.width > 68 and ink(wide.crop((0, 0, wide.width, GRID_LINE))) > 20


def test_make_grid_names_classes_once_per_run_of_rows():
    images = torch.zeros(10, 3, 8, 8)
    same = make_grid(images, nrow=4, class_ids=[0, 1, 2, 3] * 2 + [0, 1])  # columns share their class: one band
    assert same.height == GRID_LINE + 3 * 66 + 2 and same.width == 4 * 66 + 2
    changed = make_grid(images, nrow=4, class_ids=[0, 1, 2, 3] * 2 + [0, 5])  # row 2 differs: its own band too
    assert changed.height == 2 * GRID_LINE + 3 * 66 + 2
    band = changed.crop((2, 2 * 66 + GRID_LINE + 2, changed.width, 2 * 66 + 2 * GRID_LINE + 2))
    assert ink(band) > 20
    assert make_grid(images, nrow=4, class_ids=3).height == same.height  # one class for all
    assert np.array_equal(np.asarray(display_samples(images, 4, torch.tensor([0, 1, 2, 3] * 2 + [0, 1]))), same)
    with pytest.raises(ValueError, match="class_ids has 3 entries for 10 images"):
        make_grid(images, class_ids=[0, 1, 2])
    with pytest.raises(ValueError, match="col_labels or class_ids, not both"):
        make_grid(images, col_labels=["a"], class_ids=0)


def test_make_grid_grayscale_and_channel_check():
    images = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(2)) * 2 - 1
    grid = make_grid(images, nrow=2, title="gray")
    gray = np.repeat(np.repeat(to_uint8(images), 8, axis=1), 8, axis=2)  # (4, 64, 64, 1)
    np.testing.assert_array_equal(cell(grid, GRID_LINE + 2 + 66, 2 + 66, 64), np.repeat(gray[3], 3, axis=-1))
    with pytest.raises(ValueError, match="1- or 3-channel images, not 2"):
        make_grid(torch.zeros(1, 2, 8, 8))


def test_make_grid_text_with_old_pillow(monkeypatch):
    """Pillow < 10.1's load_default takes no size: its font is used, in the same geometry."""
    from PIL import ImageFont

    real = ImageFont.load_default

    def load_default(*args, **kwargs):
        if args or kwargs:
            raise TypeError("load_default() got an unexpected keyword argument 'size'")
        return real()

    images = torch.zeros(2, 3, 8, 8)
    new = make_grid(images, nrow=2, row_labels=["row"], class_ids=[4, 7], title="step 1")
    monkeypatch.setattr(ImageFont, "load_default", load_default)
    old = make_grid(images, nrow=2, row_labels=["row"], class_ids=[4, 7], title="step 1")
    assert old.height == new.height and ink(old.crop((0, 0, old.width, 2 * GRID_LINE))) > 20


@pytest.mark.parametrize(
    "text, reason",
    [
        ("[" * 200_000 + "]" * 200_000, "nested too deeply"),
        ("1" * 5000, "digits"),
        ('{"labels": ', "Expecting value"),
        (b'["\x80"]', "can't decode"),
    ],
)
def test_parse_json_is_one_line_for_anything_a_file_holds(text, reason):
    with pytest.raises(ValueError) as info:
        parse_json(text, "d/dataset.json")
    message = str(info.value)
    assert message.startswith("d/dataset.json: not readable JSON (") and reason in message and "\n" not in message
    assert parse_json('{"labels": [["a.png", 1]]}', "x") == {"labels": [["a.png", 1]]}
