from decimal import Decimal

import pytest

from mycel_cdc import format_lsn, parse_array, parse_lsn
from mycel_cdc._types import array_converter, scalar_converter


def test_flat_array_with_null_and_quoted_elements():
    text = r'{plain,"with space","com,ma","quo\"te","back\\slash",NULL,"NULL"}'
    assert parse_array(text) == [
        "plain",
        "with space",
        "com,ma",
        'quo"te',
        "back\\slash",
        None,
        "NULL",
    ]


def test_nested_array_converts_each_element():
    assert parse_array("{{1,2},{3,NULL}}", int) == [[1, 2], [3, None]]


def test_empty_array_and_empty_string_element():
    assert parse_array("{}") == []
    assert parse_array('{""}') == [""]


def test_array_with_bounds_prefix_starts_at_zero():
    assert parse_array("[0:1]={7,8}", int) == [7, 8]


def test_unterminated_array_is_an_error():
    with pytest.raises(ValueError, match="unterminated array literal"):
        parse_array("{1,2")


def test_numeric_array_keeps_exact_decimals():
    convert = array_converter(scalar_converter(1700))
    assert convert("{1.10,NaN}")[0] == Decimal("1.10")
    assert str(convert("{1.10,NaN}")[0]) == "1.10"
    assert convert("{1.10,NaN}")[1].is_nan()


def test_timestamptz_and_timetz_get_full_offsets():
    assert scalar_converter(1184)("2024-02-29 11:45:06.5+00") == (
        "2024-02-29T11:45:06.5+00:00"
    )
    assert scalar_converter(1266)("13:45:06+05:30") == "13:45:06+05:30"
    assert scalar_converter(1266)("13:45:06-02") == "13:45:06-02:00"


def test_lsn_text_round_trip():
    assert format_lsn(0x1_0000_00A0) == "1/A0"
    assert parse_lsn("1/A0") == 0x1_0000_00A0
    assert parse_lsn(format_lsn(123456789012)) == 123456789012
