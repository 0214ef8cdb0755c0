"""docs/README.md indexes the same method cards as the README's techniques table, none left "in progress"."""

import re

from conftest import ROOT


def test_docs_index_matches_the_readme_table():
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Techniques") : readme.index("## Layout")]
    index = (ROOT / "docs/README.md").read_text()
    cards = set(re.findall(r"\(docs/(\w+\.md)\)", table))
    indexed = set(re.findall(r"\]\((\w+\.md)\)", index.split("## Method cards")[1]))
    assert cards == indexed and all((ROOT / "docs" / card).is_file() for card in cards)
    assert "in progress" not in index and "EcoTTA" in index


def test_the_seed_catalogue_links_only_existing_cards():
    catalogue = (ROOT / "docs/catalogue.md").read_text()
    links = set(re.findall(r"\]\((\w+\.md)\)", catalogue))
    assert len(links) > 20 and [link for link in links if not (ROOT / "docs" / link).is_file()] == []
