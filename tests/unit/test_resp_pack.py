"""``pack_script`` (the limit script's calls, argument forms kept) packs what hiredis packs."""

from __future__ import annotations

import hiredis
from hypothesis import given
from hypothesis import strategies as st

from gateway.store import resp
from gateway.store.resp import pack, pack_script

ARGS = st.lists(
    st.one_of(
        st.text(max_size=40),
        st.integers(min_value=-(2**63), max_value=2**63 - 1),
        st.binary(max_size=40),
    ),
    min_size=1,
    max_size=30,
)


@given(ARGS)
def test_the_same_bytes_as_hiredis(args: list[str | int | bytes]) -> None:
    expected = hiredis.pack_command(tuple(args))  # type: ignore[arg-type]
    assert pack_script(args) == expected
    assert pack_script(args) == expected  # again, from the kept forms
    assert pack(args) == expected


def test_equal_keys_of_other_types_are_not_confused() -> None:
    # 1, 1.0 and True are one dict key; "1" and b"1" are not that key.
    assert pack_script([1, "1", b"1"]) == hiredis.pack_command((1, "1", b"1"))
    assert pack_script([1.0, 1.5, 1]) == hiredis.pack_command((1.0, 1.5, 1))
    assert pack_script([True]) != pack_script([1])  # hiredis refuses bools; never sent


def test_the_kept_forms_are_bounded(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(resp, "MAX_PACKED_ARGS", 10)
    monkeypatch.setattr(resp, "_PACKED", {})
    for i in range(100):
        assert pack_script([f"key:{i}", i]) == hiredis.pack_command((f"key:{i}", i))
        assert len(resp._PACKED) <= 10
