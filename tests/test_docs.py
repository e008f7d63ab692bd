"""The documentation names every setting the code has."""
from pathlib import Path

import tierkv

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_configuration_doc_lists_every_field_and_variable():
    text = (DOCS / "configuration.md").read_text()
    for name, env, _default, _help in tierkv.StoreConfig.describe():
        assert f"`{name}`" in text and f"`{env}`" in text, f"{name} / {env} missing from docs/configuration.md"
