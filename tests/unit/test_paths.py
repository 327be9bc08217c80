"""The data folder outside Hydra (``mtlora.utils.paths.default_data_dir``) follows ``conf/paths``:
``$MTLORA_DATA_DIR``, else ``<repo>/../shared/data``; readers name ``MTLORA_DATA_DIR`` when it is missing."""

from __future__ import annotations

from pathlib import Path

import pytest

from mtlora.errors import DataError
from mtlora.eval import bbh, mmlu
from mtlora.utils.paths import REPO_ROOT, default_data_dir
from tests.helpers.compose import compose_train


def test_repo_root_holds_the_project():
    assert (REPO_ROOT / "conf" / "train.yaml").is_file() and (REPO_ROOT / "mtlora" / "__init__.py").is_file()


@pytest.mark.parametrize("env", [None, "", "custom"])
def test_default_data_dir_matches_conf_paths(monkeypatch, tmp_path, env):
    want = tmp_path / "custom" if env == "custom" else REPO_ROOT.parent / "shared" / "data"
    if env is None:
        monkeypatch.delenv("MTLORA_DATA_DIR", raising=False)
    else:
        monkeypatch.setenv("MTLORA_DATA_DIR", str(want) if env else "")
    assert default_data_dir() == want
    # paths.data_dir is resolved by the same function: the same path, an empty value included
    assert Path(compose_train([]).paths.data_dir) == want


def test_readers_use_the_env_folder_and_name_it_when_missing(monkeypatch, tmp_path):
    monkeypatch.setenv("MTLORA_DATA_DIR", str(tmp_path))
    with pytest.raises(DataError, match="MTLORA_DATA_DIR") as e:
        bbh.bbh_dir()
    assert str(tmp_path / "bbh") in str(e.value)
    with pytest.raises(DataError, match="MTLORA_DATA_DIR") as e:
        mmlu.mmlu_dir()
    assert str(tmp_path / "mmlu") in str(e.value)
    (tmp_path / "bbh").mkdir()
    assert bbh.bbh_dir() == tmp_path / "bbh"
