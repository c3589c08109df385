"""The "use Fishr in your own training loop" example of README.md runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example() -> str:
    text = README.read_text()
    section = text.split("<!-- fishr-example-start -->", 1)[1].split("<!-- fishr-example-end -->", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "expected exactly one python block between the fishr-example markers"
    return blocks[0]


def test_readme_example_runs_and_trains():
    namespace: dict = {}
    exec(compile(readme_example(), str(README), "exec"), namespace)
    loss, featurizer = namespace["loss"], namespace["featurizer"]
    assert loss.ndim == 0 and bool(loss.isfinite())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in featurizer.parameters())


def test_readme_example_is_short():
    assert len(readme_example().strip().splitlines()) <= 16
