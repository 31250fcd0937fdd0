"""The README's policy reference is the one generated from the schema."""

from __future__ import annotations

from pathlib import Path

from gateway.policy.docs import END, START, reference

README = Path(__file__).resolve().parents[2] / "README.md"


def test_policy_reference_in_sync() -> None:
    text = README.read_text()
    inside = text.split(START, 1)[1].split(END, 1)[0]
    assert inside.strip() == reference().strip(), (
        "README policy reference is stale: run `python -m gateway.policy.docs --write`"
    )
