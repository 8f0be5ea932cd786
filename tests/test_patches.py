"""Patch shapes: parsing ``HxW`` lists and checking that a shape fits the images."""

from __future__ import annotations

import pytest

from patchbench.patches import PatchShape, check_fits, parse_patch, parse_patches


def test_parse_patch_reads_height_then_width() -> None:
    shape = parse_patch("2x12")
    assert shape == PatchShape(2, 12)
    assert (shape.height, shape.width, shape.area) == (2, 12, 24)
    assert str(shape) == "2x12"


@pytest.mark.parametrize("token", ["5X5", " 5x5 ", "5 x 5", "\t5 X 5\n", "05x005"])
def test_parse_patch_accepts_whitespace_upper_case_x_and_leading_zeros(token: str) -> None:
    assert parse_patch(token) == PatchShape(5, 5)


def test_parse_patches_reads_a_comma_list_in_order() -> None:
    assert parse_patches("5x5,2x12") == [PatchShape(5, 5), PatchShape(2, 12)]
    assert parse_patches("2x12,5x5") == [PatchShape(2, 12), PatchShape(5, 5)]


def test_parse_patches_tolerates_whitespace_around_tokens() -> None:
    assert parse_patches(" 5x5 , 2X12 ") == [PatchShape(5, 5), PatchShape(2, 12)]


def test_parse_patches_drops_duplicates_keeping_the_first_occurrence() -> None:
    assert parse_patches("5x5,2x12,5x5,5X5, 5x5") == [PatchShape(5, 5), PatchShape(2, 12)]


def test_parse_patches_keeps_transposed_shapes_apart() -> None:
    assert parse_patches("2x12,12x2") == [PatchShape(2, 12), PatchShape(12, 2)]


def test_parse_patches_merges_several_strings() -> None:
    shapes = parse_patches(["5x5,2x12", "2x12,1x1"])
    assert shapes == [PatchShape(5, 5), PatchShape(2, 12), PatchShape(1, 1)]
    assert parse_patches(("3x3",)) == [PatchShape(3, 3)]


BAD_TOKENS = [
    ("5x", "malformed patch shape '5x'"),
    ("x5", "malformed patch shape 'x5'"),
    ("axb", "malformed patch shape 'axb'"),
    ("-1x2", "malformed patch shape '-1x2'"),
    ("5x5x5", "malformed patch shape"),
    ("2.5x3", "malformed patch shape"),
    ("5*5", "malformed patch shape"),
    ("0x3", "has a zero side"),
    ("3x0", "has a zero side"),
    ("0x0", "has a zero side"),
    ("", "empty patch shape"),
    ("  ", "empty patch shape"),
    ("5x5,,2x2", "empty patch shape in '5x5,,2x2'"),
    ("5x5,", "empty patch shape"),
    (",5x5", "empty patch shape"),
    ("5x5,2x", "malformed patch shape '2x'"),
]


@pytest.mark.parametrize(("text", "fragment"), BAD_TOKENS, ids=[repr(t) for t, _ in BAD_TOKENS])
def test_parse_patches_rejects_bad_tokens(text: str, fragment: str) -> None:
    with pytest.raises(ValueError) as err:
        parse_patches(text)
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)  # one line, fit for a CLI error


def test_parse_patch_rejects_what_parse_patches_rejects_and_explains_the_format() -> None:
    with pytest.raises(ValueError, match=r"expected HxW with positive integers, e\.g\. 5x5"):
        parse_patch("5x")
    with pytest.raises(ValueError, match="malformed"):
        parse_patch("")
    with pytest.raises(ValueError, match="both sides must be at least 1"):
        parse_patch("0x3")


def test_parse_patches_needs_at_least_one_shape() -> None:
    with pytest.raises(ValueError, match="no patch shape given"):
        parse_patches([])


def test_check_fits_accepts_shapes_up_to_the_image_size() -> None:
    check_fits([PatchShape(1, 1), PatchShape(28, 28), PatchShape(28, 1), PatchShape(1, 28)],
               (28, 28))
    check_fits([PatchShape(10, 32)], (10, 32))
    check_fits([], (1, 1))


@pytest.mark.parametrize(("shape", "image_hw"), [
    (PatchShape(29, 1), (28, 28)),
    (PatchShape(1, 29), (28, 28)),
    (PatchShape(30, 5), (28, 28)),
    (PatchShape(32, 10), (10, 32)),  # a transposed shape need not fit
])
def test_check_fits_rejects_a_shape_larger_than_the_image(shape: PatchShape,
                                                         image_hw: tuple[int, int]) -> None:
    h, w = image_hw
    with pytest.raises(ValueError, match=f"patch {shape} does not fit in the {h}x{w} images"):
        check_fits([PatchShape(1, 1), shape], image_hw)
