"""The command line around the entry points: the ``mtlora`` command and its subcommands, each entry point's
own ``--help`` (answered without torch), the one-line message of each kind of user error and the
local-override template."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from mtlora.cli import COMMANDS, command_argv
from mtlora.cli.entry import EXIT_USER_ERROR, check_local_overrides, run_main, with_default_overrides
from mtlora.cli.errors import describe, flatten, hub_error_kind
from mtlora.errors import ConfigError, DataError
from tests.helpers.compose import CONF, REPO, compose_train, run_module

HEAVY = ("torch", "transformers", "datasets", "accelerate")


def _help_imports(module: str, *args: str) -> tuple[str, list[str]]:
    """(stdout of ``python -m <module> <args>``, the heavy modules it imported)."""
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['{module}', *{list(args)!r}]\n"
        "try:\n"
        f"    runpy.run_module('{module}', run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    assert e.code in (0, None), e.code\n"
        f"print('HEAVY=' + ','.join(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out, _, heavy = r.stdout.rpartition("HEAVY=")
    return out, [m for m in heavy.strip().split(",") if m]


@pytest.mark.parametrize(
    ("module", "own"),
    [
        (
            "mtlora.train",
            ["mtlora train:", "resume (null | auto", "== Config groups", "adapter: ", "--cfg job"],
        ),
        (
            "mtlora.evaluate",
            ["mtlora evaluate:", "run_dir=RUN", "out=DIR", "allow_incomplete=true", "device="],
        ),
        ("mtlora.diagnose", ["mtlora diagnose:", "run_dir=RUN", "allow_incomplete=true", "device=cpu|cuda"]),
        ("mtlora.count", ["mtlora count:", "meta device", "python -m mtlora.count model="]),
        ("mtlora.export", ["python -m mtlora.export run_dir=RUN format=peft", "allow_incomplete=true"]),
    ],
)
def test_each_entry_point_documents_its_own_options_without_loading_torch(
    module: str, own: list[str]
) -> None:
    out, heavy = _help_imports(module, "--help")
    for text in own:
        assert text in out, (module, text)
    if module != "mtlora.train":  # the training groups' help is train's, not theirs
        assert "mtlora train:" not in out
    assert heavy == [], (module, heavy)


def test_train_shows_its_config_without_loading_torch() -> None:
    out, heavy = _help_imports("mtlora.train", "--cfg", "job", "-p", "adapter")
    assert OmegaConf.create(out).name == "lora" and heavy == []


def test_mtlora_command_lists_and_dispatches_the_entry_points(tmp_path: Path) -> None:
    assert '[project.scripts]\nmtlora = "mtlora.cli:main"\n' in (REPO / "pyproject.toml").read_text()
    r = run_module("mtlora", ["--help"], cwd=tmp_path)
    assert r.returncode == 0
    for name, (module, _) in COMMANDS.items():
        assert f"  {name} " in r.stdout and f"python -m {module}" in r.stdout
    assert {"train", "evaluate", "export", "diagnose", "count"} <= set(COMMANDS)
    assert command_argv("count", ["model=tiny", "--help"]) == [sys.executable, "-m", "mtlora.count"] + [
        "model=tiny",
        "--help",
    ]
    # the remaining arguments reach the module: the same output as `python -m mtlora.count ...`
    args = ["adapter=hydralora", "adapter.rank=3", "--cfg", "job", "-p", "adapter"]
    via, direct = (
        run_module("mtlora", ["count", *args], cwd=tmp_path),
        run_module("mtlora.count", args, cwd=tmp_path),
    )
    assert via.returncode == direct.returncode == 0 and via.stdout == direct.stdout
    assert OmegaConf.create(via.stdout).rank == 3 and OmegaConf.create(via.stdout).name == "hydralora"
    assert list(tmp_path.iterdir()) == []  # nothing written
    r = run_module("mtlora", ["evaluate", "--help"], cwd=tmp_path)
    assert r.returncode == 0 and "mtlora evaluate:" in r.stdout
    r = run_module("mtlora", ["trian"], cwd=tmp_path)
    assert r.returncode == EXIT_USER_ERROR and r.stderr.startswith("error: unknown command 'trian'")


# ------------------------------------------------------------------------------------------ user errors


def test_project_errors_become_one_line() -> None:
    e = ConfigError(
        "invalid config:\n  - adapter.rank=0: must be an integer >= 1\n  - train.lr=-1: must be > 0"
    )
    assert describe(e) == "invalid config: adapter.rank=0: must be an integer >= 1; train.lr=-1: must be > 0"
    assert describe(DataError("row 5 of x.jsonl: empty response")) == "row 5 of x.jsonl: empty response"
    assert describe(RuntimeError("a bug")) is None  # keeps its traceback
    assert describe(KeyError("x")) is None
    assert flatten("a\nb") == "a b"


def test_hub_errors_offline_name_the_model_key_and_the_ways_out(monkeypatch, tmp_path: Path) -> None:
    from mtlora.models import build_tokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    model = compose_train(["model=qwen2.5-0.5b"]).model
    with pytest.raises(OSError) as e:
        build_tokenizer(model)
    assert hub_error_kind(e.value) == "offline"
    line = describe(e.value, model)
    assert line.startswith("model.hub_id=Qwen/Qwen2.5-0.5B is not in the local Hugging Face cache")
    assert "model.hub_id=DIR model.tokenizer.hub_id=DIR" in line
    assert line.endswith("run without the hub: model.init=random model.tokenizer.kind=bytes")
    assert "\n" not in line
    # a tokenizer of its own: only that key is named
    with_tok = OmegaConf.merge(model, {"tokenizer": {"hub_id": "org/tok"}})
    with pytest.raises(OSError) as e:
        build_tokenizer(with_tok)
    assert describe(e.value, with_tok).startswith("model.tokenizer.hub_id=org/tok ")
    # without the model config (or from elsewhere): the hub's own first line
    assert describe(e.value).startswith("Hugging Face Hub: ")


def test_plain_entry_points_turn_a_user_error_into_one_line_and_status_2(capsys) -> None:
    def fails(exc: Exception):
        def main() -> int:
            raise exc

        return main

    assert run_main(fails(DataError("row 3 of a.jsonl:\n  bad"))) == EXIT_USER_ERROR
    assert capsys.readouterr().err == "error: row 3 of a.jsonl: bad\n"
    assert run_main(lambda: 0) == 0 and run_main(lambda: None) == 0 and run_main(lambda: 1) == 1
    with pytest.raises(RuntimeError):  # a bug keeps its traceback
        run_main(fails(RuntimeError("bug")))


def test_local_key_is_refused() -> None:
    cfg = OmegaConf.create({"train": {"max_steps": 3}, "local": {"train": {"max_steps": 5}}})
    with pytest.raises(ConfigError, match=r"conf/local/default\.yaml lacks the `# @package _global_` header"):
        check_local_overrides(cfg)
    check_local_overrides(OmegaConf.create({"train": {"max_steps": 3}}))


def test_local_example_is_tracked_with_its_header_and_composes_to_the_default() -> None:
    example = CONF / "local" / "example.yaml"
    assert example.read_text().splitlines()[0] == "# @package _global_"
    tracked = subprocess.run(["git", "ls-files", "conf/local"], cwd=REPO, capture_output=True, text=True)
    assert "conf/local/example.yaml" in tracked.stdout.split()
    ignored = subprocess.run(["git", "check-ignore", "-q", "conf/local/default.yaml"], cwd=REPO)
    assert ignored.returncode == 0  # the machine's own file stays out of git
    cfg = compose_train(["local=example"])
    assert "local" not in cfg and cfg == compose_train([])  # every line commented out


def test_default_overrides_go_after_the_users_arguments() -> None:
    """Hydra's parser (argparse) takes the overrides as one run of arguments, options before or after it."""
    argv = with_default_overrides(["prog", "--config-dir", "d", "a=1"], {"a": "0", "b": "2"})
    assert argv == ["prog", "--config-dir", "d", "b=2", "a=1"]
    argv = with_default_overrides(["prog", "a=1", "--cfg", "job", "-p", "x"], {"b": "2"})
    assert argv == ["prog", "b=2", "a=1", "--cfg", "job", "-p", "x"]
    assert with_default_overrides(["prog", "--cfg", "job"], {"b": "2"}) == ["prog", "--cfg", "job", "b=2"]
    assert with_default_overrides(["prog", "--info"], {"b": "2"}) == ["prog", "b=2", "--info"]
