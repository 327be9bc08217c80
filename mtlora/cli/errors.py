"""Which exceptions are *user errors*, and their one-line message (:mod:`mtlora.cli.entry` prints it).

User errors are the project's own exceptions (:data:`PROJECT_ERRORS`: ``ConfigError``, ``DataError``,
``RunLoadError``, ...) and the Hugging Face Hub's "not cached and offline" / "not found" errors, also when
``transformers`` wraps them in an ``OSError``. A hub error met while building the model names
``model.hub_id`` (or ``model.tokenizer.hub_id``) and offers a local model dir or
``model.init=random model.tokenizer.kind=bytes``. Any other exception is a bug and keeps its traceback.

Checking an exception imports nothing: the classes are looked up by module and name in the exception's
type hierarchy, so ``--help`` paths stay free of torch and transformers.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

#: the project's own exceptions, as (module, class name)
PROJECT_ERRORS = frozenset(
    {
        ("mtlora.errors", "ConfigError"),
        ("mtlora.errors", "DataError"),
        ("mtlora.errors", "IntegrityError"),
        ("mtlora.trained_run", "RunLoadError"),
        ("mtlora.export", "ExportError"),
        ("mtlora.run.rundir", "RunDirBusy"),
        ("mtlora.training.watchdog", "TrainingDiverged"),
    }
)
#: huggingface_hub's exceptions for a repo or file that is not cached, not reachable or not there
HUB_OFFLINE = frozenset({"LocalEntryNotFoundError", "OfflineModeIsEnabled"})
HUB_NOT_FOUND = frozenset(
    {"RepositoryNotFoundError", "RevisionNotFoundError", "EntryNotFoundError", "RemoteEntryNotFoundError"}
)
HUB_OTHER = frozenset({"GatedRepoError", "HFValidationError"})
#: ``transformers``' OSError messages for the same cases (no hub exception in the chain)
HUB_OS_MESSAGES = {
    "couldn't connect to": "offline",
    "is not a local folder and is not a valid model identifier": "not_found",
    "does not appear to have a file named": "not_found",
    "does not appear to have files named": "not_found",
    "is not a valid git identifier": "not_found",
}
#: functions of mtlora that load the base model or its tokenizer (where a hub error is the model's)
MODEL_FUNCTIONS = {"build_model", "meta_model", "arch_config", "load_base_model", "load_run"}
TOKENIZER_FUNCTIONS = {"build_tokenizer"}
HINT_NO_HUB = "model.init=random model.tokenizer.kind=bytes"


def _chain(e: BaseException) -> Iterator[BaseException]:
    """``e`` and the exceptions it was raised from (``__cause__``, else ``__context__``)."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        yield cur
        cur = cur.__cause__ or cur.__context__


def _names(e: BaseException) -> set[tuple[str, str]]:
    return {(c.__module__, c.__name__) for c in type(e).__mro__}


def is_project_error(e: BaseException) -> bool:
    """An exception of :data:`PROJECT_ERRORS` (also when its module runs as ``__main__``)."""
    for module, name in _names(e):
        if (module, name) in PROJECT_ERRORS:
            return True
        if module == "__main__" and any(name == n for _, n in PROJECT_ERRORS):
            return True
    return False


def hub_error_kind(e: BaseException) -> str | None:
    """``offline``, ``not_found``, ``other`` for a Hugging Face Hub error in ``e``'s chain, else None.

    Each exception of the chain is judged by its most specific hub class (``LocalEntryNotFoundError``
    before its base ``EntryNotFoundError``), then, for an ``OSError``, by ``transformers``' wording."""
    for x in _chain(e):
        for cls in type(x).__mro__:
            if not cls.__module__.startswith("huggingface_hub"):
                continue
            if cls.__name__ in HUB_OFFLINE:
                return "offline"
            if cls.__name__ in HUB_NOT_FOUND:
                return "not_found"
            if cls.__name__ in HUB_OTHER:
                return "other"
        if isinstance(x, OSError):
            text = str(x)
            for phrase, kind in HUB_OS_MESSAGES.items():
                if phrase in text:
                    return kind
    return None


def _functions(e: BaseException) -> set[str]:
    """Names of the mtlora functions on the tracebacks of ``e``'s chain."""
    out: set[str] = set()
    for x in _chain(e):
        tb = x.__traceback__
        while tb is not None:
            if str(tb.tb_frame.f_globals.get("__name__", "")).startswith(("mtlora", "__main__")):
                out.add(tb.tb_frame.f_code.co_name)
            tb = tb.tb_next
    return out


def flatten(message: str) -> str:
    """A (possibly multi-line) message on one line: ``"head:\\n  - a\\n  - b"`` -> ``"head: a; b"``."""
    lines = [ln.strip() for ln in str(message).splitlines() if ln.strip()]
    if not lines:
        return ""
    items = [ln[2:] if ln.startswith("- ") else ln for ln in lines[1:]]
    if not items:
        return lines[0]
    return lines[0] + " " + "; ".join(items) if lines[0].endswith(":") else " ".join([lines[0], *items])


def _get(node: Any, dotted: str) -> Any:
    for key in dotted.split("."):
        if node is None:
            return None
        node = node.get(key) if isinstance(node, Mapping) or hasattr(node, "get") else None
    return node


def hub_message(e: BaseException, model: Any = None) -> str:
    """The one line for a hub error ``e``; ``model``: the ``model`` config node of the command, if known.

    When the error came from loading the base model or its tokenizer, the line names ``model.hub_id``
    (``model.tokenizer.hub_id`` when only that one differs) and offers the ways out: a local model dir, a
    download where there is network, or no hub at all (:data:`HINT_NO_HUB`)."""
    kind = hub_error_kind(e) or "other"
    funcs = _functions(e)
    first = flatten(next((str(x) for x in _chain(e) if str(x).strip()), type(e).__name__))
    if model is None or not funcs & (MODEL_FUNCTIONS | TOKENIZER_FUNCTIONS):
        return f"Hugging Face Hub: {first}"
    hub, tok = _get(model, "hub_id"), _get(model, "tokenizer.hub_id")
    if funcs & TOKENIZER_FUNCTIONS and tok and tok != hub:
        keys, repo = ["model.tokenizer.hub_id"], tok
    else:
        keys, repo = ["model.hub_id"], hub
        if tok and tok == hub and _get(model, "tokenizer.kind") == "hub":
            keys.append("model.tokenizer.hub_id")
    what = {
        "offline": "is not in the local Hugging Face cache and the hub cannot be reached (offline)",
        "not_found": "was not found: neither a local model dir nor a hub repo with the files asked for",
        "other": f"could not be loaded ({first})",
    }[kind]
    local = " ".join(f"{k}=DIR" for k in keys)
    return (
        f"{keys[0]}={repo} {what}; give a local model dir ({local}), download it where there is network "
        f"(`hf download {repo}`), or run without the hub: {HINT_NO_HUB}"
    )


def describe(e: BaseException, model: Any = None) -> str | None:
    """The one-line message for a user error, None for any other exception (a bug: keep its traceback)."""
    if is_project_error(e):
        return flatten(str(e)) or type(e).__name__
    if hub_error_kind(e) is not None:
        return hub_message(e, model)
    return None
