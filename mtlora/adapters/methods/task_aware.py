"""Task-aware adapters that read one task id per row: MTL-LoRA (§5) and MOELoRA (§8) of ``docs/methods.md``."""

from __future__ import annotations

from mtlora.adapters.registry import register
from mtlora.adapters.spec import MethodSpec, choice_knob, int_knob, num_knob, rank_multiple_of

LAMBDA_FORMATS = ("full", "diag")
#: input_per_head: one dropout mask per expert; input_shared: one mask for all experts
MOE_DROPOUT_PLACES = ("input_per_head", "input_shared")
#: rows of the task embedding: T + 1 (the released code) or T
EMBEDDING_ROWS = ("tasks_plus_one", "tasks")

NUM_TASKS = int_knob(
    "num_tasks",
    None,
    "number T of tasks (must equal the data mixture's; validate_config checks it)",
    required=True,
)

MTL_LORA = register(
    MethodSpec(
        name="mtl_lora",
        layer="mtlora.adapters.task_mix:TaskMixLoraLinear",
        doc="MTL-LoRA: h = W0 x + s·B̃_t Λ_t A drop(x), B̃_t = Σ_j softmax_j(w_t/τ) B_j",
        knobs=(
            NUM_TASKS,
            int_knob("num_up", 3, "number n of shared up-projections B_j"),
            num_knob("tau", 0.1, "temperature τ of the task mixing softmax", lo_open=True),
            choice_knob(
                "lambda_format", "full", LAMBDA_FORMATS, "Λ_t: full r×r (training script) or diag (r-vector)"
            ),
        ),
        task_ids="always",
        router_params=("lora_task_logits",),
    )
)

MOELORA = register(
    MethodSpec(
        name="moelora",
        layer="mtlora.adapters.moelora:MoeLoraLinear",
        doc="MOELoRA: E experts of rank r/E mixed by softmax(W_g Emb[t]) of the row's task",
        knobs=(
            NUM_TASKS,
            int_knob("num_experts", 4, "number E of experts (each of rank rank/E; must divide rank)"),
            int_knob("task_embed_dim", 64, "width of the per-layer task embedding"),
            choice_knob(
                "dropout_place",
                "input_per_head",
                MOE_DROPOUT_PLACES,
                "an independent input mask per expert (released code) or one shared mask",
            ),
            choice_knob(
                "task_embedding_rows",
                "tasks_plus_one",
                EMBEDDING_ROWS,
                "rows of the task embedding: T + 1 (released code; row T never read) or T",
            ),
        ),
        rules=(rank_multiple_of("num_experts", "expert"),),
        task_ids="always",
        heads_key="num_experts",
        router_params=("lora_gate", "lora_task_embedding"),
    )
)
