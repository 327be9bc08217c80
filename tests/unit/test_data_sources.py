"""Sources and tasks through the composed config: Flan CoT (shared data), Dolly (generated JSONL), bad data."""

from __future__ import annotations

import copy
import json
import random
import re
from functools import lru_cache
from pathlib import Path

import pytest

from mtlora.data import build_data, selected_tasks
from mtlora.data.tasks import load_task
from mtlora.errors import ConfigError, DataError
from mtlora.models.byte_tokenizer import build_byte_tokenizer
from tests.helpers.compose import CONF, DATA_DIR, compose_train

GSM8K = DATA_DIR / "flan" / "cot_data" / "gsm8k_train.tsv"
AQUA = DATA_DIR / "flan" / "cot_data" / "aqua_train.tsv"
TEMPLATES = DATA_DIR / "flan" / "flan_v2_templates.json"
FLAN_COT_TASKS = ["aqua", "creak", "ecqa", "gsm8k", "qasc", "sensemaking", "strategyqa"]
DOLLY_TASKS = [
    "brainstorming",
    "classification",
    "closed_qa",
    "creative_writing",
    "general_qa",
    "information_extraction",
    "open_qa",
    "summarization",
]

needs_data = pytest.mark.skipif(not GSM8K.is_file(), reason=f"shared data not at {DATA_DIR}")


@pytest.fixture(scope="module")
def tok():
    return build_byte_tokenizer()


@lru_cache(maxsize=4)
def _read_tsv(path: Path) -> list[dict[str, str]]:
    """The test's own reader: 3 tab-separated fields per line, no quoting."""
    rows = []
    for line in path.read_text(encoding="utf-8").split("\n"):
        if line:
            q, a, c = line.split("\t")
            rows.append({"question": q, "answer": a, "chain_of_thought": c})
    return rows


def _unescape(row: dict[str, str]) -> dict[str, str]:
    return {k: v.replace("\\n", "\n") for k, v in row.items()}


@lru_cache(maxsize=4)
def _patterns(key: str) -> list[tuple[str, str]]:
    data = json.loads(TEMPLATES.read_text())
    return [(p["input"], p["target"]) for p in data["patterns"][key]]


def _identify(prompt: str, target: str, by_question: dict, patterns) -> list[tuple[int, dict]]:
    """All (pattern index, source row) that render exactly to (prompt, target)."""
    found = []
    for k, (pin, pout) in enumerate(patterns):
        head, _, tail = pin.partition("{question}")
        if not (prompt.startswith(head) and prompt.endswith(tail)):
            continue
        q = prompt[len(head) : len(prompt) - len(tail)]
        if q in by_question:
            row = by_question[q]
            if pin.format(**row) == prompt and pout.format(**row) == target:
                found.append((k, row))
    return found


def _decode_train(data, tok, t: int) -> list[tuple[str, str]]:
    out = []
    for ex in data.train[t]:
        ids, plen = ex["input_ids"], ex["prompt_len"]
        assert ids[-1] == tok.eos_token_id
        out.append((tok.decode(ids[:plen]), tok.decode(ids[plen:-1])))
    return out


def _flan_cfg(run_dir, *extra):
    return compose_train(["data=flan_cot", "data.select=[gsm8k]", *extra], run_dir=run_dir)


@pytest.fixture(scope="module")
def gsm8k_task(tmp_path_factory):
    """The composed ``data.tasks.gsm8k`` node (composed once); tests edit copies of it."""
    return _flan_cfg(tmp_path_factory.mktemp("run")).data.tasks.gsm8k


def _with(task, **source):
    """A copy of the task node with ``source`` keys replaced (e.g. data_files=<a generated file>)."""
    task = copy.deepcopy(task)
    for k, v in source.items():
        task.source[k] = v
    return task


# --------------------------------------------------------------------------- Flan CoT gsm8k (shared data)


SMALL = ["data.tasks.gsm8k.max_train_examples=60"]


@pytest.fixture(scope="module")
def gsm8k_small(tmp_path_factory, tok):
    """build_data over data=flan_cot, select=[gsm8k], 60 train rows: (cfg, data, rendered train rows)."""
    cfg = _flan_cfg(tmp_path_factory.mktemp("run"), *SMALL)
    data = build_data(cfg.data, tok, max_seq_len=8192)
    return cfg, data, _decode_train(data, tok, 0)


@pytest.fixture(scope="module")
def gsm8k_full(tmp_path_factory):
    """load_task of all gsm8k rows (no caps): (cfg, TaskSplits)."""
    cfg = _flan_cfg(tmp_path_factory.mktemp("run"), "data.tasks.gsm8k.eval.max_examples=null")
    return cfg, load_task("gsm8k", cfg.data.tasks.gsm8k, seed=int(cfg.data.seed))


@needs_data
def test_gsm8k_rows_rendered_with_flan_v2_templates(gsm8k_small, tok):
    cfg, data, train = gsm8k_small
    assert data.task_names == ["gsm8k"]
    assert len(data.train[0]) == len(train) == 60
    assert len(data.eval[0]) == int(cfg.data.tasks.gsm8k.eval.max_examples) == 200
    source = _read_tsv(GSM8K)
    assert len(source) == 7473
    by_question = {r["question"]: r for r in source}
    patterns = _patterns("cot_gsm8k")
    assert len(patterns) == 10
    used = set()
    for prompt, target in train + [(r["prompt"], r["target"]) for r in data.eval[0]]:
        found = _identify(prompt, target, by_question, patterns)
        assert found, f"not a cot_gsm8k pattern over a gsm8k row: {prompt[:80]!r} -> {target[:80]!r}"
        k, row = found[0]
        used.add(k)
        assert row["question"] in prompt
        assert row["answer"] in target and row["chain_of_thought"] in target
    assert len(used) >= 4  # pick: random draws among the 10 patterns


@needs_data
@pytest.mark.parametrize("pick", ["first", "random"])
def test_flan_template_pick(gsm8k_task, tmp_path, pick):
    rows = _tsv_rows(30)
    task = _with(gsm8k_task, data_files=str(_write_tsv(tmp_path / "cot.tsv", rows)))
    task.template.pick = pick
    splits = load_task("gsm8k", task, seed=0)
    cols = ["question", "answer", "chain_of_thought"]
    by_question = {r["question"]: r for r in (_unescape(dict(zip(cols, x))) for x in rows)}
    patterns = _patterns("cot_gsm8k")
    used = set()
    for r in splits.train.to_list() + splits.eval.to_list():
        found = _identify(r["prompt"], r["target"], by_question, patterns)
        assert found, r
        used.add(found[0][0])
    if pick == "first":
        assert used == {0}
    else:
        assert len(used) >= 4


@needs_data
def test_gsm8k_same_row_same_template(run_dir, gsm8k_small, gsm8k_full):
    cfg, _, train = gsm8k_small
    # a second, independent load of the same config gives the same rows in the same order
    again = load_task("gsm8k", _flan_cfg(run_dir, *SMALL).data.tasks.gsm8k, seed=int(cfg.data.seed))
    assert [(r["prompt"], r["target"]) for r in again.train] == train
    # without the caps, the same rows are rendered identically (the template depends on the row only)
    _, full = gsm8k_full
    by_prompt = {r["prompt"]: r["target"] for r in full.train.to_list() + full.eval.to_list()}
    assert len(by_prompt) == 7473
    for prompt, target in train + [(r["prompt"], r["target"]) for r in again.eval]:
        assert by_prompt[prompt] == target


@needs_data
def test_gsm8k_eval_rows_do_not_overlap_train_rows(gsm8k_full, gsm8k_small):
    cfg, splits = gsm8k_full
    source = _read_tsv(GSM8K)
    by_question = {r["question"]: r for r in source}
    patterns = _patterns("cot_gsm8k")

    def questions(rows):
        return [_identify(p, t, by_question, patterns)[0][1]["question"] for p, t in rows]

    train_q = questions((r["prompt"], r["target"]) for r in splits.train)
    eval_q = questions((r["prompt"], r["target"]) for r in splits.eval)
    assert len(eval_q) == round(len(source) * float(cfg.data.tasks.gsm8k.eval.fraction)) == 374
    assert not set(train_q) & set(eval_q)
    assert sorted(train_q + eval_q) == sorted(by_question)  # every row once, in one split
    # the capped build keeps the split: its eval rows are none of its train rows
    _, data, train = gsm8k_small
    assert not {p for p, _ in train} & {r["prompt"] for r in data.eval[0]}
    assert {p for p, _ in train} <= {r["prompt"] for r in splits.train}


@needs_data
def test_flan_cot_literal_backslash_n_becomes_newline(run_dir):
    cfg = compose_train(
        ["data=flan_cot", "data.select=[aqua]", "data.tasks.aqua.max_train_examples=50"], run_dir=run_dir
    )
    splits = load_task("aqua", cfg.data.tasks.aqua, seed=0)
    source = [_unescape(r) for r in _read_tsv(AQUA)]
    rows = splits.train.to_list() + splits.eval.to_list()
    assert rows
    for r in rows:
        assert "\\n" not in r["prompt"] and "\\n" not in r["target"]
    # every aqua question has options on separate lines: the rendered prompt carries real newlines
    multi = [r for r in rows if "\n(A) " in r["prompt"]]
    assert len(multi) == len(rows)
    questions = {s["question"] for s in source}
    assert all(any(q in r["prompt"] for q in questions) for r in rows[:10])


# --------------------------------------------------------------------------- generated TSV files


def _write_tsv(path: Path, rows: list[list[str]]) -> Path:
    path.write_text("".join("\t".join(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _tsv_rows(n: int) -> list[list[str]]:
    return [
        [f"Q{i}: what is {i} plus {i}?\\nThink.", str(2 * i), f"{i} + {i} = {2 * i}.\\nDone"]
        for i in range(n)
    ]


@needs_data
@pytest.mark.parametrize("unescape", [True, False])
def test_tsv_unescape_newlines_option(gsm8k_task, tmp_path, unescape):
    f = _write_tsv(tmp_path / "cot.tsv", _tsv_rows(12))
    splits = load_task("gsm8k", _with(gsm8k_task, data_files=str(f), unescape_newlines=unescape), seed=0)
    rows = splits.train.to_list() + splits.eval.to_list()
    assert len(rows) == 12
    for r in rows:
        i = int(re.search(r"Q(\d+):", r["prompt"])[1])
        nl = "\n" if unescape else "\\n"
        assert f"Q{i}: what is {i} plus {i}?{nl}Think." in r["prompt"]
        assert f"{i} + {i} = {2 * i}.{nl}Done" in r["target"] and str(2 * i) in r["target"]


@needs_data
def test_skipped_bad_tsv_row_does_not_change_other_rows_templates(gsm8k_task, tmp_path):
    good = _tsv_rows(40)
    bad = [list(r) for r in good]
    bad[5][1] = ""  # empty answer
    f_good = _write_tsv(tmp_path / "good.tsv", good)
    f_bad = _write_tsv(tmp_path / "bad.tsv", bad)

    def render(f, mode):
        s = load_task("gsm8k", _with(gsm8k_task, data_files=str(f)), seed=0, on_bad_row=mode)
        return s, {re.search(r"Q(\d+):", r["prompt"])[1]: r for r in s.train.to_list() + s.eval.to_list()}

    with pytest.raises(DataError) as e:
        render(f_bad, "error")
    assert str(f_bad) in str(e.value) and "row 5 " in str(e.value) and "answer" in str(e.value)

    s_good, by_i_good = render(f_good, "error")
    s_bad, by_i_bad = render(f_bad, "skip")
    assert s_good.skipped_rows == 0 and s_bad.skipped_rows == 1
    assert set(by_i_bad) == set(by_i_good) - {"5"}
    by_question = {
        r["question"]: r
        for r in (_unescape(dict(zip(["question", "answer", "chain_of_thought"], x))) for x in good)
    }
    used = {
        _identify(r["prompt"], r["target"], by_question, _patterns("cot_gsm8k"))[0][0]
        for r in by_i_good.values()
    }
    assert len(used) > 2  # several templates in play, so a shifted choice would show
    for i, r in by_i_bad.items():
        assert r == by_i_good[i], i


@needs_data
def test_eval_from_a_separate_split(gsm8k_task, tmp_path):
    rows = _tsv_rows(30)
    bad_val = [list(r) for r in rows[20:]]
    bad_val[3][2] = ""  # empty chain_of_thought in the validation file
    f_train = _write_tsv(tmp_path / "train.tsv", rows[:20])
    f_val = _write_tsv(tmp_path / "val.tsv", bad_val)
    task = _with(gsm8k_task, data_files={"train": str(f_train), "validation": str(f_val)})
    task.eval.split = "validation"
    with pytest.raises(DataError, match=re.escape(str(f_val))) as e:
        load_task("gsm8k", task, seed=0)
    assert "row 3 " in str(e.value)
    s = load_task("gsm8k", task, seed=0, on_bad_row="skip")
    assert s.skipped_rows == 1
    ids = lambda ds: sorted(int(re.search(r"Q(\d+):", r["prompt"])[1]) for r in ds)  # noqa: E731
    assert ids(s.train) == list(range(20))  # all of the train file, nothing held out
    assert ids(s.eval) == [i for i in range(20, 30) if i != 23]
    task.eval.split = "test"
    with pytest.raises(ConfigError, match="test"):
        load_task("gsm8k", task, seed=0)


BROKEN = {
    "short-line": lambda rows: rows[:2] + [rows[2][:2]] + rows[3:],  # one line with 2 of 3 fields
    "long-line": lambda rows: rows[:2] + [rows[2] + ["extra"]] + rows[3:],  # one line with 4 fields
    "all-long": lambda rows: [r + ["extra"] for r in rows],  # every line with 4 fields
    "all-short": lambda rows: [r[:2] for r in rows],  # every line with 2 fields
}


@needs_data
@pytest.mark.parametrize(
    ("broken", "mode"),
    [
        ("short-line", "error"),
        ("long-line", "error"),
        ("all-long", "error"),
        ("all-short", "error"),
        ("short-line", "skip"),
    ],
)
def test_tsv_wrong_number_of_fields_is_a_data_error(gsm8k_task, tmp_path, broken, mode):
    f = _write_tsv(tmp_path / "broken.tsv", BROKEN[broken](_tsv_rows(6)))
    with pytest.raises(DataError, match=re.escape(str(f))) as e:
        load_task("gsm8k", _with(gsm8k_task, data_files=str(f)), seed=0, on_bad_row=mode)
    assert re.search(r"line [13]\b", str(e.value))


@needs_data
def test_missing_data_file_names_the_path_and_data_dir(run_dir, tmp_path):
    missing = tmp_path / "nowhere" / "gsm8k_train.tsv"
    cfg = _flan_cfg(run_dir, f"data.tasks.gsm8k.source.data_files={missing}")
    with pytest.raises(DataError) as e:
        build_data(cfg.data, build_byte_tokenizer(), 128)
    assert str(missing) in str(e.value) and "MTLORA_DATA_DIR" in str(e.value)


def test_data_dir_without_the_files_names_the_path_and_data_dir(run_dir, tmp_path, monkeypatch):
    empty = tmp_path / "empty_data_dir"
    empty.mkdir()
    monkeypatch.setenv("MTLORA_DATA_DIR", str(empty))
    cfg = _flan_cfg(run_dir)
    assert cfg.data.tasks.gsm8k.source.data_files.startswith(str(empty))
    with pytest.raises(DataError) as e:
        build_data(cfg.data, build_byte_tokenizer(), 128)
    assert str(empty) in str(e.value) and "MTLORA_DATA_DIR" in str(e.value)


def test_select_unknown_task_lists_available_tasks(run_dir):
    cfg = compose_train(["data=flan_cot", "data.select=[nope]"], run_dir=run_dir)
    with pytest.raises(ConfigError) as e:
        build_data(cfg.data, build_byte_tokenizer(), 128)
    msg = str(e.value)
    assert "nope" in msg and "data.select" in msg
    for t in FLAN_COT_TASKS:
        assert t in msg


def test_select_orders_and_restricts_tasks(run_dir):
    cfg = compose_train(["data=flan_cot", "data.select=[strategyqa,aqua]"], run_dir=run_dir)
    assert selected_tasks(cfg.data) == ["strategyqa", "aqua"]
    cfg = compose_train(["data=flan_cot"], run_dir=run_dir)
    assert selected_tasks(cfg.data) == FLAN_COT_TASKS
    cfg = compose_train(["data=flan_cot", "data.select=[aqua,aqua]"], run_dir=run_dir)
    with pytest.raises(ConfigError, match="aqua"):
        selected_tasks(cfg.data)


def test_no_data_config_reads_bbh():
    # BBH is the held-out evaluation set: it must never be a training source
    files = sorted((CONF / "data").rglob("*.yaml"))
    assert len(files) > 20
    for f in files:
        assert "bbh" not in f.read_text().lower(), f


def test_unknown_source_type_and_generator_are_config_errors(run_dir):
    cfg = compose_train(["data.tasks.counting.source.type=parquet"], run_dir=run_dir)
    with pytest.raises(ConfigError, match="synthetic.*json.*csv.*tsv.*hub"):
        load_task("counting", cfg.data.tasks.counting, seed=0)
    cfg = compose_train(["data.tasks.counting.source.generator=nope"], run_dir=run_dir)
    with pytest.raises(ConfigError, match="arithmetic"):
        load_task("counting", cfg.data.tasks.counting, seed=0)


@pytest.mark.parametrize("load_kwargs", [None, {}, {"trust_remote_code": False}])
def test_unreachable_hub_source_is_a_data_error_naming_the_task(run_dir, load_kwargs):
    """Offline, a hub task fails with a DataError naming the task, the dataset and the way out, whatever its
    ``load_kwargs`` (null, empty or set) are."""
    from omegaconf import OmegaConf, open_dict

    cfg = compose_train(["data=flanv2"], run_dir=run_dir)
    name = next(iter(cfg.data.tasks))
    task = cfg.data.tasks[name]
    with open_dict(task):
        task.source.load_kwargs = load_kwargs
    assert OmegaConf.select(task, "source.type") == "hub"
    with pytest.raises(DataError) as e:
        load_task(name, task, seed=0)
    assert repr(str(task.source.path)) in str(e.value) and "local files" in str(e.value)


# --------------------------------------------------------------------------- Dolly (generated JSONL)


def _dolly_rows(seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for ci, cat in enumerate(DOLLY_TASKS):
        for j in range(3 + ci % 3):
            row = {
                "instruction": f"[{cat}] instruction {j}: é {rng.randint(0, 10**6)}?",
                "context": "" if j == 0 else f"context {j} of {cat}\nsecond line",
                "response": f"response {j} for {cat} {{not a field}}",
                "category": cat,
            }
            rows.append(row)
    rng.shuffle(rows)
    return rows


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _expected(row: dict) -> tuple[str, str]:
    return f"{row['instruction']}\n{row.get('context') or ''}\nResponse:", f" {row['response']}"


def _dolly_cfg(run_dir, f, *extra):
    return compose_train(
        ["data=dolly", "data.source.type=json", f"+data.source.data_files={f}", *extra], run_dir=run_dir
    )


def test_dolly_each_category_task_gets_exactly_its_rows(run_dir, tmp_path, tok):
    rows = _dolly_rows()
    rows[next(i for i, r in enumerate(rows) if r["context"])].pop("context")  # missing, not only empty
    f = _write_jsonl(tmp_path / "dolly.jsonl", rows)
    cfg = _dolly_cfg(run_dir, f)
    data = build_data(cfg.data, tok, max_seq_len=512)
    assert data.task_names == DOLLY_TASKS
    assert [s["task"] for s in data.summary()] == DOLLY_TASKS
    assert [s["task_id"] for s in data.summary()] == list(range(8))
    for t, cat in enumerate(DOLLY_TASKS):
        got = sorted(_decode_train(data, tok, t) + [(r["prompt"], r["target"]) for r in data.eval[t]])
        want = sorted(_expected(r) for r in rows if r["category"] == cat)
        assert got == want, cat
        assert len(data.eval[t]) == 1  # max(1, round(5% of 3..5 rows))
        assert data.skipped_rows[cat] == 0
    # empty and missing contexts are kept (optional field)
    empties = [r for r in rows if not r.get("context")]
    assert len(empties) == 9
    rendered = {p for t in range(8) for p, _ in _decode_train(data, tok, t)} | {
        r["prompt"] for t in range(8) for r in data.eval[t]
    }
    for r in empties:
        assert _expected(r)[0] in rendered and "\n\nResponse:" in _expected(r)[0]


def test_dolly_select_sets_task_ids(run_dir, tmp_path, tok):
    f = _write_jsonl(tmp_path / "dolly.jsonl", _dolly_rows())
    cfg = _dolly_cfg(run_dir, f, "data.select=[summarization,brainstorming,open_qa]")
    data = build_data(cfg.data, tok, max_seq_len=512)
    assert data.task_names == ["summarization", "brainstorming", "open_qa"]
    for t, cat in enumerate(data.task_names):
        assert all(p.startswith(f"[{cat}]") for p, _ in _decode_train(data, tok, t))
    # each pair's task id selects that task's rows in a batch
    order = data.schedule.epoch_order(0)
    batch = data.batch(order[:6])
    assert batch["task_ids"].tolist() == order[:6, 0].tolist()
    for i, (t, _) in enumerate(order[:6]):
        n = int(batch["attention_mask"][i].sum())
        assert tok.decode(batch["input_ids"][i, :n].tolist()).startswith(f"[{data.task_names[t]}]")


MISSING = object()
BAD_RESPONSES = {"empty": "", "missing": MISSING}  # null and whitespace: in the skip test below


@pytest.mark.parametrize("kind", sorted(BAD_RESPONSES))
def test_dolly_bad_response_names_file_and_row(run_dir, tmp_path, kind):
    rows = _dolly_rows()
    bad_at = 9
    # put a closed_qa row at index 9 with rows of other categories before it (so the file row differs
    # from the row's position within its category)
    bad = {"instruction": "bad instruction", "context": "", "category": "closed_qa"}
    if BAD_RESPONSES[kind] is not MISSING:
        bad["response"] = BAD_RESPONSES[kind]
    rows.insert(bad_at, bad)
    assert sum(r["category"] == "closed_qa" for r in rows[:bad_at]) < bad_at
    f = _write_jsonl(tmp_path / "dolly_bad.jsonl", rows)
    cfg = _dolly_cfg(run_dir, f)
    with pytest.raises(DataError) as e:
        load_task("closed_qa", cfg.data.tasks.closed_qa, seed=0)
    msg = str(e.value)
    assert str(f) in msg and f"row {bad_at} " in msg and "response" in msg and "on_bad_row" in msg


def test_dolly_bad_rows_skipped_and_counted(run_dir, tmp_path, tok):
    rows = _dolly_rows()
    rows.insert(4, {"instruction": "bad A", "context": "", "response": "", "category": "closed_qa"})
    rows.insert(11, {"instruction": "bad B", "context": "x", "category": "closed_qa"})
    rows.insert(17, {"instruction": "bad C", "context": "", "response": " \t", "category": "open_qa"})
    rows.insert(19, {"instruction": "bad D", "context": "", "response": None, "category": "open_qa"})
    rows.insert(20, {"instruction": "", "context": "", "response": "r", "category": "summarization"})
    f = _write_jsonl(tmp_path / "dolly_bad.jsonl", rows)

    with pytest.raises(DataError, match=re.escape(str(f))):
        build_data(_dolly_cfg(run_dir, f).data, tok, max_seq_len=256)

    cfg = _dolly_cfg(run_dir, f, "data.on_bad_row=skip")
    data = build_data(cfg.data, tok, max_seq_len=256)
    expected_skips = {t: 0 for t in DOLLY_TASKS} | {"closed_qa": 2, "open_qa": 2, "summarization": 1}
    assert data.skipped_rows == expected_skips
    assert {s["task"]: s["skipped_rows"] for s in data.summary()} == expected_skips
    assert load_task("closed_qa", cfg.data.tasks.closed_qa, seed=0, on_bad_row="skip").skipped_rows == 2
    for t, cat in enumerate(DOLLY_TASKS):
        got = sorted(_decode_train(data, tok, t) + [(r["prompt"], r["target"]) for r in data.eval[t]])
        want = sorted(_expected(r) for r in _dolly_rows() if r["category"] == cat)
        assert got == want, cat  # exactly the good rows
    assert sum(len(d) for d in data.train) + sum(len(d) for d in data.eval) == len(rows) - 5


def test_on_bad_row_value_is_checked(run_dir, tmp_path):
    f = _write_jsonl(tmp_path / "dolly.jsonl", _dolly_rows())
    cfg = _dolly_cfg(run_dir, f, "data.on_bad_row=ignore")
    with pytest.raises(ConfigError, match="on_bad_row.*error.*skip"):
        load_task("closed_qa", cfg.data.tasks.closed_qa, seed=0, on_bad_row=cfg.data.on_bad_row)


def test_fields_map_a_source_column_onto_a_template_field(run_dir, tmp_path):
    rows = [dict(r, output=f"OUT {i}", response="ignored") for i, r in enumerate(_dolly_rows())]
    f = _write_jsonl(tmp_path / "dolly_fields.jsonl", rows)
    cfg = _dolly_cfg(run_dir, f, "data.tasks.closed_qa.fields={response:output}")
    splits = load_task("closed_qa", cfg.data.tasks.closed_qa, seed=0)
    got = sorted(r["target"] for r in splits.train.to_list() + splits.eval.to_list())
    want = sorted(f" {r['output']}" for r in rows if r["category"] == "closed_qa")
    assert got == want
