"""The docs stay true: the routing table is the one route_table.json makes."""

from __future__ import annotations

from pathlib import Path

import pytest

from action_classifier import ActionClassifier
from route_table import RouteTable, markdown

pytestmark = pytest.mark.prd200

DOCS = Path(__file__).resolve().parent.parent / "docs" / "hybrid-orchestrator.md"


def test_the_docs_routing_table_is_generated_from_route_table_json():
    text = DOCS.read_text(encoding="utf-8")
    shown = text.split("<!-- routes:begin -->\n", 1)[1].split("<!-- routes:end -->", 1)[0]
    expected = markdown(RouteTable.load(), lambda a: ActionClassifier().classify(a).value)
    assert shown == expected, "regenerate the table with: python -m route_table"


@pytest.mark.parametrize(
    "section",
    ["## Quickstart", "## Architecture", "## The routing table", "## FAQ", "## Benchmarks"],
)
def test_the_docs_have_the_sections_a_newcomer_needs(section):
    assert section in DOCS.read_text(encoding="utf-8")
