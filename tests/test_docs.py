"""The documentation names every setting the code has."""
from pathlib import Path

import tierkv

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_configuration_doc_lists_every_field_and_variable():
    text = (DOCS / "configuration.md").read_text()
    for name, env, _default, _help in tierkv.StoreConfig.describe():
        assert f"`{name}`" in text and f"`{env}`" in text, f"{name} / {env} missing from docs/configuration.md"


def test_the_readme_example_runs(tmp_path):
    """The 10-line example is the first code a user copies: it must run as written (at a smaller size)."""
    import re

    import torch

    readme = (DOCS.parent / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    code = re.sub(r"(\d+) << 30", r"\1 << 23", code).replace("/mnt/nvme/tierkv", str(tmp_path / "tierkv"))
    token_ids = list(range(70))  # 4 full blocks and a partial one
    blocks = torch.randn(4, 32, 2, 16, 8, 128).to(torch.bfloat16)
    namespace = {"token_ids": token_ids, "blocks": blocks}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["n"] == 4
    assert namespace["cached"].shape == blocks.shape
