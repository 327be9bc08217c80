"""The papers' reported trainable-parameter shares (%params), re-counted with :func:`mtlora.count.count`.

Every row is counted on the meta device (no weights, nothing downloaded) from the real ``conf/`` presets.
Sources are the tables quoted in ``docs/methods.md`` §9 (HydraLoRA arXiv 2404.19245 v2; R-LoRA arXiv
2502.15455 v1; Align-LoRA ICLR-2026 submission / arXiv 2508.05078).

**Convention.** The share is ``trainable / (base + trainable)`` — peft's ``print_trainable_parameters`` and
``mtlora.count`` — not ``trainable / base``. The three-decimal HydraLoRA numbers decide it: 1 A / 10 B at r=8
on q,v of LLaMA-2-7B is 0.3412% of the total (reported 0.341) but 0.3423% of the base; LoRA r=32 on q,v is
0.2484% of the total (reported 0.248) but 0.2490% of the base. The two-decimal Qwen2.5 rows round to the
same value under either convention.

**Routers.** HydraLoRA's and R-LoRA's LLaMA-2 numbers (0.341 / 0.124, copied into Align-LoRA Table 2 as
0.34) count only the A and B matrices: the router (``num_heads x d_in`` per adapted layer) is left out
(with it: 0.380 / 0.136). Those rows set ``exclude_router``. Align-LoRA's own Qwen2.5 runs (Tables 3-4)
count the router (HydraLoRA(r4) 0.2496% with it, 0.2209% without; reported 0.25, M-LoRA 0.22).

**Tolerance** = half a unit of the reported number's last digit (its rounding).

Rows that no configuration reproduces (left out here, see ``NOT_REPRODUCED``):
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from mtlora.adapters.inject import inject_adapters
from mtlora.count import count
from mtlora.models.factory import meta_model
from tests.helpers.compose import compose_train

QV = "adapter.target_modules=[q_proj,v_proj]"
MLP = "adapter.target_modules=[up_proj,gate_proj,down_proj]"

HYDRA = "HydraLoRA (Tian et al., NeurIPS 2024, arXiv 2404.19245 v2)"
RLORA = "R-LoRA v1 (Liu, Chang, Wu, arXiv 2502.15455; tables read from the repo's figure/*.png)"
ALIGN = "Align-LoRA (Liu, Cheng, Chang, Wu, ICLR-26 submission Mz98kwANpF / arXiv 2508.05078)"


@dataclass(frozen=True)
class Row:
    paper: str
    table: str
    cell: str
    model: str
    overrides: tuple[str, ...]
    reported: float  # % as printed in the paper
    tol: float  # the printed number's rounding
    exclude_router: bool = False  # the paper counts A/B only (see module doc)

    @property
    def id(self) -> str:
        return f"{self.paper.split(' ')[0]}-{self.table}-{self.cell}-{self.model}".replace(" ", "_")


ROWS: list[Row] = [
    # ---- HydraLoRA, LLaMA-2-7B (q_proj, v_proj, r=8 throughout)
    Row(HYDRA, "Table 3", "LoRA %params", "llama2-7b", ("adapter=lora", "adapter.rank=8", QV), 0.062, 0.0005),
    Row(
        HYDRA,
        "Table 3",
        "HydraLoRA 1 A / 10 B %params",
        "llama2-7b",
        ("adapter=hydralora", "adapter.rank=8", "adapter.num_heads=10", QV),
        0.341,
        0.0005,
        exclude_router=True,
    ),
    Row(
        HYDRA,
        "Table 2",
        "HydraLoRA r=8, #B=3 %params",
        "llama2-7b",
        ("adapter=hydralora", "adapter.rank=8", "adapter.num_heads=3", QV),
        0.124,
        0.0005,
        exclude_router=True,
    ),
    # LoRA-Split 16x2 / 8x4 / 4x8 (0.248% each): k LoRAs of rank r/k have the parameters of one LoRA of
    # total rank 32 (= the "LoRA r=32" row of the same table)
    Row(
        HYDRA,
        "Table 1",
        "LoRA-Split 4x8 (= LoRA r=32) %params",
        "llama2-7b",
        ("adapter=lora", "adapter.rank=32", QV),
        0.248,
        0.0005,
    ),
    # ... and the lora_split adapter itself at its defaults (total rank 32 on q,v), k = 2 / 4 / 8 splits
    *[
        Row(
            HYDRA,
            "Table 1",
            f"LoRA-Split {32 // k}x{k} (adapter=lora_split defaults) %params",
            "llama2-7b",
            ("adapter=lora_split", f"adapter.num_splits={k}"),
            0.248,
            0.0005,
        )
        for k in (2, 4, 8)
    ],
    # ---- R-LoRA v1, LLaMA-2-7B
    Row(
        RLORA,
        "Table 3",
        "R-LoRA 1 A / 10 B %params",
        "llama2-7b",
        ("adapter=rlora", "adapter.rank=8", "adapter.num_heads=10", QV),
        0.341,
        0.0005,
        exclude_router=True,
    ),
    Row(
        RLORA,
        "Table 2",
        "R-LoRA r=8, #B=3 %params",
        "llama2-7b",
        ("adapter=rlora", "adapter.rank=8", "adapter.num_heads=3", QV),
        0.124,
        0.0005,
        exclude_router=True,
    ),
    # ---- Align-LoRA Table 2 (LLaMA-2-7B; LoRA/HydraLoRA/R-LoRA as HydraLoRA's settings)
    Row(ALIGN, "Table 2", "LoRA %params", "llama2-7b", ("adapter=lora", "adapter.rank=8", QV), 0.06, 0.005),
    Row(
        ALIGN,
        "Table 2",
        "HydraLoRA %params",
        "llama2-7b",
        ("adapter=hydralora", "adapter.rank=8", "adapter.num_heads=10", QV),
        0.34,
        0.005,
        exclude_router=True,
    ),
    Row(
        ALIGN,
        "Table 2",
        "R-LoRA %params",
        "llama2-7b",
        ("adapter=rlora", "adapter.rank=8", "adapter.num_heads=10", QV),
        0.34,
        0.005,
        exclude_router=True,
    ),
    # ---- Align-LoRA Table 3 (Qwen2.5-7B, Flan-v2 -> BBH; MLP projections; multi-head: r=4, 3 heads)
    *[
        Row(
            ALIGN,
            "Table 3",
            f"LoRA r{r} %params",
            "qwen2.5-7b",
            ("adapter=lora", f"adapter.rank={r}", MLP),
            p,
            0.005,
        )
        for r, p in ((4, 0.10), (8, 0.20), (9, 0.22), (10, 0.25))
    ],
    *[
        Row(
            ALIGN,
            "Table 3",
            f"{cell} %params",
            "qwen2.5-7b",
            (f"adapter={a}", "adapter.rank=4", "adapter.num_heads=3", MLP),
            p,
            0.005,
        )
        for cell, a, p in (
            ("HydraLoRA(r4)", "hydralora", 0.25),
            ("R-LoRA(r4)", "rlora", 0.25),
            ("M-LoRA(r4)", "mlora", 0.22),
        )
    ],
    # ---- Align-LoRA Table 1 (Qwen2.5-3B, 5 tasks)
    Row(
        ALIGN,
        "Table 1",
        "M-LoRA %params",
        "qwen2.5-3b",
        ("adapter=mlora", "adapter.rank=4", "adapter.num_heads=3", MLP),
        0.41,
        0.005,
    ),
    Row(
        ALIGN,
        "Table 1",
        "HydraLoRA w/o Router %params",
        "qwen2.5-3b",
        ("adapter=hydralora", "adapter.rank=4", "adapter.num_heads=3", MLP),
        0.41,
        0.005,
        exclude_router=True,
    ),
    # ---- Align-LoRA Table 4 (5-task training -> BBH). The single %params row matches Qwen2.5-7B only
    # (on LLaMA3-8B / Qwen2.5-14B the same settings give 0.22/0.18, 0.22/0.18, 0.19/0.16, 0.18/0.15).
    *[
        Row(ALIGN, "Table 4", f"{cell} %params", "qwen2.5-7b", (*ov, MLP), p, 0.005)
        for cell, ov, p in (
            ("LoRA r10", ("adapter=lora", "adapter.rank=10"), 0.25),
            ("HydraLoRA", ("adapter=hydralora", "adapter.rank=4", "adapter.num_heads=3"), 0.25),
            ("R-LoRA", ("adapter=rlora", "adapter.rank=4", "adapter.num_heads=3"), 0.25),
            ("M-LoRA", ("adapter=mlora", "adapter.rank=4", "adapter.num_heads=3"), 0.22),
            ("A-LoRA-M r8", ("adapter=align_mmd", "adapter.rank=8"), 0.20),
            ("A-LoRA-K r8", ("adapter=align_kl", "adapter.rank=8"), 0.20),
        )
    ],
    # ---- Align-LoRA Table 5 (8-task in-domain)
    Row(
        ALIGN, "Table 5", "LoRA %params", "qwen2.5-3b", ("adapter=lora", "adapter.rank=10", MLP), 0.45, 0.005
    ),
    Row(
        ALIGN, "Table 5", "LoRA %params", "qwen2.5-7b", ("adapter=lora", "adapter.rank=10", MLP), 0.25, 0.005
    ),
    Row(
        ALIGN,
        "Table 5",
        "A-LoRA-K %params",
        "qwen2.5-7b",
        ("adapter=align_kl", "adapter.rank=8", MLP),
        0.20,
        0.005,
    ),
]

#: reported cells no configuration of ours reproduces within rounding (best explanation each)
NOT_REPRODUCED = {
    "HydraLoRA Table 3 LoraHub 1.240 / LoRAMoE 2.976 (and Align-LoRA Table 2 1.24 / 2.98)": (
        "= 20 x and 48 x the *rounded* LoRA share 0.062; exact counts of 20 / 48 r=8 q,v LoRAs give "
        "1.2297 / 2.9006 % of the total (1.2449 / 2.9882 % of the base); adapter=molora with 48 r=8 q,v experts "
        "and its token router counts 3.0768 %"
    ),
    "Align-LoRA Table 1 HydraLoRA 0.45 / R-LoRA 0.45 (Qwen2.5-3B)": (
        "r=4, 3 heads, MLP, with router = 0.4581 % (0.4602 % of base), rounds to 0.46; M-LoRA/w/o-router 0.41 match"
    ),
    "Align-LoRA Table 2 M-LoRA 0.32 (LLaMA-2-7B)": (
        "rank/heads/targets not stated; no natural setting fits (test_no_natural_mlora_setting_gives_0_32): "
        "the preset keeps R-LoRA's 1 A / 10 B on q,v (0.341%), 9 heads give 0.310%"
    ),
    "Align-LoRA Table 4 LoRAMoE 0.38 / Table 5 LoRAMoE (0.68 on 3B per methods.md §4)": (
        "implementation (MOELoRA vs MoLoRA), experts and ranks unknown; no integer MLP rank fits both models"
    ),
    "Align-LoRA Table 5 A-LoRA-K 0.42 (Qwen2.5-3B)": (
        "r=8 MLP = 0.364, r=9 = 0.410, r=10 = 0.455; none rounds to 0.42 (the t5 presets take r=9, the closest)"
    ),
}
__doc__ += "".join(f"\n* {k}: {v}" for k, v in NOT_REPRODUCED.items()) + "\n"


def router_params(cfg) -> int:
    """Trainable router parameters (``*.lora_router``) of ``cfg.adapter`` on ``cfg.model`` (meta device)."""
    model = meta_model(cfg.model)
    inject_adapters(model, cfg.adapter)
    return sum(p.numel() for n, p in model.named_parameters() if n.endswith("lora_router"))


def paper_share(row: Row) -> tuple[float, dict]:
    cfg = compose_train([f"model={row.model}", *row.overrides])
    res = count(cfg)
    trainable, total = res["trainable"], res["total"]
    if row.exclude_router:
        r = router_params(cfg)
        assert r > 0, "exclude_router on an adapter without a router"
        trainable, total = trainable - r, total - r
    return 100.0 * trainable / total, res


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_paper_params(row: Row) -> None:
    pct, res = paper_share(row)
    assert abs(pct - row.reported) <= row.tol + 1e-9, (
        f"{row.paper} {row.table} {row.cell} on {row.model}: counted {pct:.4f}% "
        f"(trainable {res['trainable']:,} of {res['total']:,}), reported {row.reported}"
    )


def test_router_free_count_equals_mlora() -> None:
    """HydraLoRA without its router has exactly M-LoRA's parameters (same A and B heads)."""
    ov = ["model=llama2-7b", "adapter.rank=8", "adapter.num_heads=10", QV]
    hydra_cfg = compose_train([*ov, "adapter=hydralora"])
    hydra = count(hydra_cfg)["trainable"]
    mlora = count(compose_train([*ov, "adapter=mlora"]))["trainable"]
    assert hydra - router_params(hydra_cfg) == mlora == 32 * 2 * (8 * 4096 + 10 * 4096 * 8)


# LLaMA-2-7B from its shapes (untied 32000 x 4096 embedding and lm_head, 32 layers, final norm)
LLAMA2_7B = 2 * 32000 * 4096 + 32 * (4 * 4096**2 + 3 * 4096 * 11008 + 2 * 4096) + 4096
LLAMA2_SHAPES = {p: (4096, 4096) for p in ("q", "k", "v", "o")} | {
    "gate": (4096, 11008),
    "up": (4096, 11008),
    "down": (11008, 4096),
}


def mlora_share(targets: tuple[str, ...], r: int, n: int) -> float:
    """M-LoRA (shared A, n B heads, no router) on LLaMA-2-7B: 100 · t / (base + t), t = 32 Σ r(d_in + n·d_out)."""
    t = 32 * sum(r * LLAMA2_SHAPES[p][0] + n * r * LLAMA2_SHAPES[p][1] for p in targets)
    return 100 * t / (LLAMA2_7B + t)


def test_no_natural_mlora_setting_gives_0_32() -> None:
    """Align-LoRA Table 2 reports M-LoRA at 0.32% on LLaMA-2-7B: no power-of-two rank with up to 16 heads on
    q,v, q,k,v,o, the MLP projections or all seven rounds to it; the preset's 1 A / 10 B counts 0.341%."""
    fits = [
        (targets, r, n)
        for targets in (("q", "v"), ("q", "k", "v", "o"), ("gate", "up", "down"), tuple(LLAMA2_SHAPES))
        for r in (2, 4, 8, 16, 32, 64)
        for n in range(1, 17)
        if 0.315 <= mlora_share(targets, r, n) < 0.325
    ]
    assert fits == [(tuple(LLAMA2_SHAPES), 2, 7)]  # r=2 with 7 heads on all seven projections (0.3153%)
    assert round(mlora_share(("q", "v"), 8, 10), 4) == 0.3412
    assert round(mlora_share(("q", "v"), 8, 9), 4) == 0.3103
    # the preset counts what the arithmetic says
    cfg = compose_train(["experiment=align_lora/t2/mlora"])
    res = count(cfg)
    assert res["base"] == LLAMA2_7B
    assert res["trainable_pct"] == pytest.approx(mlora_share(("q", "v"), 8, 10))
