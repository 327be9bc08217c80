"""``python -m mtlora.count [overrides]``: parameter accounting for a model preset + adapter, on the meta device.

Composes the same config as ``python -m mtlora.train`` (``conf/train.yaml``), builds ``model.arch`` on the
meta device (no weights, no download, no memory), injects ``adapter`` with its ``target_modules`` and
prints one table: total parameters, trainable (adapter) parameters, the trainable share in %, the
router/gate parameters among them and the share without them, and the number of adapted modules. Nothing
is written: no run dir, no ``.hydra/``, no log file.

Usage::

    python -m mtlora.count model=qwen2.5-7b adapter=lora adapter.target_modules=[up_proj,gate_proj,down_proj]
    python -m mtlora.count model=llama3-8b adapter.rank=16
    python -m mtlora.count model=qwen2.5-0.5b adapter.target_modules=all-linear
    python -m mtlora.count model=qwen2.5-14b 'adapter.target_modules=".*\\.mlp\\..*_proj"'

Percentages are of the adapted model's total (base + adapter), as peft's ``print_trainable_parameters``
reports them. A target list that matches no module fails with a ``ConfigError`` naming the modules there are.

Router/gate parameters are the trainable tensors that the method's spec names in ``router_params``
(:class:`mtlora.adapters.spec.MethodSpec`: token routers of HydraLoRA, R-LoRA, MoLoRA and mtLoRA; MOELoRA's
task embedding and gate; MTL-LoRA's task mixing logits).
Papers differ on counting them: HydraLoRA's 0.341% (r=8 on q,v, 10 heads, LLaMA-2-7B) excludes the router,
``trainable % w/o router`` = ``(trainable − router) / (total − router)``; mtLoRA's 39.8 M includes it.

LoraHub (``adapter.method=lorahub``, the spec's ``composes_library``) trains nothing: the table's trainable count is the one composed LoRA,
while the papers count the library of ``K`` LoRAs it composes (HydraLoRA's 1.240% = 20 LoRAs r=8 on q,v;
mtLoRA's 75.5M = 9 LoRAs r=16 on q,v). The table adds ``K``, ``K × trainable`` and its share
``K·t / (base + K·t)``. ``K`` is ``adapter.num_modules`` when set, else the number of library run dirs found
(``adapter.library`` / ``library_glob``), else one LoRA per task of the data mixture (what ``make lorahub``
builds); the row says which.
"""

from __future__ import annotations

import sys
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from mtlora.cli.entry import NO_OUTPUT_OVERRIDES, user_errors, with_default_overrides
from mtlora.cli.help import exit_with_help
from mtlora.errors import ConfigError
from mtlora.utils.paths import CONFIG_PATH
from mtlora.utils.resolvers import register_resolvers

register_resolvers()


def count(cfg: DictConfig) -> dict[str, Any]:
    """Total / trainable parameters and adapted modules of ``cfg.model`` with ``cfg.adapter`` injected."""
    from mtlora.adapters.base import adapter_layers  # torch: not on the --help path
    from mtlora.adapters.inject import inject_adapters
    from mtlora.adapters.registry import spec_of
    from mtlora.models.factory import count_parameters, meta_model

    spec = spec_of(cfg.adapter.get("method"))

    model = meta_model(cfg.model)
    base = count_parameters(model)["total"]
    inject_adapters(model, cfg.adapter)
    params = count_parameters(model)
    layers = adapter_layers(model)
    router = _router_parameters(model, spec.router_params)
    rest = params["trainable"] - router
    res = {
        "model": cfg.model.name,
        "adapter": cfg.adapter.name,
        "rank": cfg.adapter.get("rank"),
        "target_modules": _targets_shown(cfg.adapter),
        "base": base,
        "total": params["total"],
        "trainable": params["trainable"],
        "trainable_pct": params["trainable_pct"],
        "router": router,
        "trainable_pct_no_router": 100.0 * rest / max(params["total"] - router, 1),
        "adapted_modules": len(layers),
        "adapted_kinds": sorted({n.rsplit(".", 1)[-1] for n in layers}),
    }
    if spec.composes_library:
        k, source = lorahub_library_size(cfg)
        lib = k * params["trainable"]
        res.update(
            library_modules=k,
            library_source=source,
            library_trainable=lib,
            library_pct=100.0 * lib / (base + lib),
        )
    return res


def lorahub_library_size(cfg: DictConfig) -> tuple[int, str]:
    """``K``, the LoRAs a LoraHub config composes, and where the number comes from (module doc)."""
    from mtlora.data.build import selected_tasks  # heavy imports: not on the --help path
    from mtlora.procedures.lorahub.library import resolve_library

    a = cfg.adapter
    if a.get("num_modules") is not None:
        return int(a.num_modules), "adapter.num_modules"
    try:
        return len(resolve_library(a)), "library run dirs"
    except ConfigError:
        return len(selected_tasks(cfg.data)), "one per data task"


def _router_parameters(model, router_params: tuple[str, ...]) -> int:
    """Trainable parameters whose name ends in one of ``router_params`` (shared ones counted once)."""
    seen: dict[int, int] = {}
    for name, p in model.named_parameters():
        if p.requires_grad and name.rsplit(".", 1)[-1] in router_params:
            seen[id(p)] = p.numel()
    return sum(seen.values())


def _targets_shown(adapter: DictConfig) -> Any:
    """``target_modules`` as given, or a note when a block-level placement ignores them (mtLoRA)."""
    placement = adapter.get("placement", "component")
    if placement != "component":
        return f"ignored (placement={placement})"
    tm = adapter.target_modules
    return OmegaConf.to_container(tm) if OmegaConf.is_config(tm) else tm


def format_table(res: dict[str, Any]) -> str:
    rows = [
        ("model", str(res["model"])),
        (
            "adapter",
            f"{res['adapter']} (rank {res['rank']})" if res["rank"] is not None else str(res["adapter"]),
        ),
        ("target_modules", str(res["target_modules"])),
        ("adapted modules", f"{res['adapted_modules']:,} ({', '.join(res['adapted_kinds'])})"),
        ("base parameters", f"{res['base']:,}"),
        ("total parameters", f"{res['total']:,}"),
        ("trainable parameters", f"{res['trainable']:,}"),
        ("trainable %", f"{res['trainable_pct']:.4f}%"),
        ("router/gate parameters", f"{res['router']:,}"),
        ("trainable % w/o router", f"{res['trainable_pct_no_router']:.4f}%"),
    ]
    if "library_modules" in res:  # LoraHub: the composed LoRA above, the library it composes here
        rows += [
            ("LoraHub library LoRAs", f"{res['library_modules']} ({res['library_source']})"),
            ("library parameters", f"{res['library_trainable']:,}"),
            ("library % (K x trainable)", f"{res['library_pct']:.4f}%"),
        ]
    w = max(len(k) for k, _ in rows)
    v = max(len(val) for _, val in rows)
    sep = f"+-{'-' * w}-+-{'-' * v}-+"
    # counts right-aligned (digits line up), text left-aligned
    lines = (
        [sep]
        + [
            f"| {k:<{w}} | {val:>{v}} |" if val[:1].isdigit() else f"| {k:<{w}} | {val:<{v}} |"
            for k, val in rows
        ]
        + [sep]
    )
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def main(cfg: DictConfig) -> None:
    with user_errors(cfg):
        from mtlora.config.command_line import check_command_line

        check_command_line(cfg, "mtlora.count", rules=("model.", "adapter."))
        print(format_table(count(cfg)), flush=True)


def _with_defaults(argv: list[str]) -> list[str]:
    """``argv`` plus :data:`NO_OUTPUT_OVERRIDES` and this command's help (conf/hydra/help/count.yaml) for
    the keys it does not set itself."""
    return with_default_overrides(argv, {**NO_OUTPUT_OVERRIDES, "hydra/help": "count"})


if __name__ == "__main__":
    exit_with_help("count", sys.argv[1:])  # the same text as Hydra's, without composing
    sys.argv = _with_defaults(sys.argv)
    main()
