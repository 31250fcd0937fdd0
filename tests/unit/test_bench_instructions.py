"""bench.instructions reads callgrind's totals from every dump it wrote."""

from __future__ import annotations

from pathlib import Path

from bench.instructions import callgrind_total


def test_the_largest_total_of_the_dumps_is_taken(tmp_path: Path) -> None:
    out = tmp_path / "callgrind.out"
    out.write_text("events: Ir\nsummary: 120\nfn=main\n1 120\ntotals: 120\n")
    (tmp_path / "callgrind.out.1").write_text("events: Ir\nfn=x\n1 5\ntotals: 4500\n")
    (tmp_path / "other.out").write_text("totals: 999999\n")
    assert callgrind_total(out) == 4500


def test_no_dump_counts_nothing(tmp_path: Path) -> None:
    assert callgrind_total(tmp_path / "callgrind.out") == 0
