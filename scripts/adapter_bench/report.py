"""The benchmark's markdown tables and the machine record."""

from __future__ import annotations

import math
import platform
from typing import Any

import torch


def _f(v: Any, fmt: str) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def adapters_table(res: dict[str, Any]) -> str:
    lines = [
        "| method | config | trainable | × LoRA params | fwd+bwd median ms | min ms | × LoRA time (median) "
        "| peak step MiB | × LoRA mem | status |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in res["rows"]:
        lines.append(
            f"| {r['method']} | {r['config']} | {_f(r.get('trainable'), ',')} | {_f(r.get('params_x_lora'), '.3f')} "
            f"| {_f(r.get('median_ms'), '.2f')} | {_f(r.get('min_ms'), '.2f')} | {_f(r.get('time_x_lora'), '.2f')} "
            f"| {_f(r.get('peak_mib'), '.1f')} "
            f"| {_f(r.get('mem_x_lora'), '.2f')} | {r['status']} |"
        )
    return "\n".join(lines)


def peft_table(res: dict[str, Any]) -> str:
    lines = [
        "| implementation | trainable | step median ms | min ms | tokens/s (median) | peak step MiB | × peft time "
        "| × peft mem |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["rows"]:
        lines.append(
            f"| {r['impl']} | {r['trainable']:,} | {r['median_ms']:.2f} | {r['min_ms']:.2f} | {r['tokens_per_s']:.0f} "
            f"| {r['peak_mib']:.1f} | {r['time_x_peft']:.3f} | {_f(r['mem_x_peft'], '.3f')} |"
        )
    return "\n".join(lines)


def machine(device: torch.device) -> dict[str, Any]:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
