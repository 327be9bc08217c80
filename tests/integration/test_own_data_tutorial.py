"""``docs/own_data.md`` works as written: its task and mixture files (taken from the page's YAML blocks),
two JSONL files, and its first training command (shortened with ``debug=smoke``) train on the mixture."""

from __future__ import annotations

import json
import re
from pathlib import Path

from tests.helpers.compose import REPO, run_cli

DOC = REPO / "docs" / "own_data.md"


def _yaml_blocks() -> dict[str, str]:
    """The page's YAML blocks keyed by the path in their first-line comment (``# myconf/...``)."""
    blocks = re.findall(r"```yaml\n(.*?)```", DOC.read_text(), flags=re.S)
    return {b.splitlines()[0].lstrip("# ").strip(): b for b in blocks if b.startswith("# myconf/")}


def test_the_tutorial_mixture_trains(tmp_path: Path) -> None:
    blocks = _yaml_blocks()
    assert set(blocks) == {"myconf/data/task/capitals.yaml", "myconf/data/my_mix.yaml"}
    for rel, text in blocks.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    # sums.yaml as the page describes it: capitals.yaml with another prompt, target and metric
    sums = blocks["myconf/data/task/capitals.yaml"].replace("capitals.jsonl", "sums.jsonl")
    sums = sums.replace("What is the capital of {country}?\\nAnswer:", "Add: {q}\\nAnswer:")
    sums = sums.replace('" {capital}"', '" {a}"').replace("metric: exact", "metric: number")
    (tmp_path / "myconf/data/task/sums.yaml").write_text(sums)
    data = tmp_path / "mydata"
    data.mkdir()
    (data / "capitals.jsonl").write_text(
        "".join(json.dumps({"country": f"C{i}", "capital": f"K{i % 7}"}) + "\n" for i in range(60))
    )
    (data / "sums.jsonl").write_text(
        "".join(json.dumps({"q": f"{i} + {i % 5}", "a": i + i % 5}) + "\n" for i in range(60))
    )
    run = tmp_path / "run"
    res = run_cli(
        ["--config-dir", str(tmp_path / "myconf"), "data=my_mix", "debug=smoke", f"hydra.run.dir={run}"],
        env={"MY_DATA": str(data)},
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert (run / "COMPLETED").exists()
    mixture = json.loads((run / "meta.json").read_text())["mixture"]
    assert [(m["task"], m["train_rows"]) for m in mixture] == [("capitals", 54), ("sums", 54)]
