"""Model FLOPs and MFU of a benchmark row (the formula is in benchmarks/README.md)."""

from __future__ import annotations

import gc
import time

import torch
import trl_peer
from minialign_runs import LORA_R
from trl_peer import GPT_NEOX_LINEARS


def model_shape(model_name: str) -> dict:
    """Matmul parameter counts of the model (every nn.Linear weight, the output head included) and LoRA's."""
    from minialign.modeling.models import load_model

    model = load_model(model_name)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    n_matmul = sum(m.weight.numel() for m in linears.values())
    n_lora = sum(LORA_R * (m.in_features + m.out_features) for n, m in linears.items()
                 if n.rsplit(".", 1)[-1] in GPT_NEOX_LINEARS)
    cfg = model.config
    out = {"model": model_name, "params": sum(p.numel() for p in model.parameters()), "matmul_params": n_matmul,
           "lora_params": n_lora, "layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size}
    del model
    gc.collect()
    return out


def model_flops(task: str, mode: str, tokens: int, attn_sq: int, shape: dict) -> float:
    """Model FLOPs of the timed steps (formula in README.md).

    Linear layers: 6 N per token (forward 2N, input gradients 2N, weight gradients 2N); LoRA: frozen weights
    need no weight gradients, so 4 N + 6 N_lora. Attention (QK^T and AV): forward 4 L d n per token of a
    document of n tokens, i.e. 4 L d sum(n^2) over documents, times 3 with the backward. DPO adds the
    reference model's forward: 2 N per token + 4 L d sum(n^2).
    """
    n, n_lora, ld = shape["matmul_params"], shape["lora_params"], shape["layers"] * shape["hidden"]
    attn_fwd = 4.0 * ld * attn_sq
    linear = 6.0 * n * tokens if mode == "full" else (4.0 * n + 6.0 * n_lora) * tokens
    flops = linear + 3.0 * attn_fwd
    if task == "dpo":
        flops += 2.0 * n * tokens + attn_fwd
    return flops


def matmul_peak(device: torch.device) -> tuple[float, str]:
    """Measured dense matmul rate in FLOP/s: bf16 8192^3 on a GPU (the MFU denominator), fp32 512^3 on a CPU."""
    n, dtype, warm, iters = (8192, torch.bfloat16, 5, 20) if device.type == "cuda" else (512, torch.float32, 2, 5)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(warm):
        a @ b
    trl_peer._sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    trl_peer._sync(device)
    dt = time.perf_counter() - t0
    del a, b
    return 2.0 * n**3 * iters / dt, f"{str(dtype).replace('torch.', '')} {n}x{n}x{n} matmul, mean of {iters}"


def add_mfu(row: dict, shape: dict, peak: float) -> dict:
    if row.get("tokens") and row.get("elapsed_s"):
        flops = model_flops(row["task"], row["mode"], row["tokens"], row["attn_sq"], shape)
        row["model_tflops_per_s"] = flops / row["elapsed_s"] / 1e12
        row["mfu"] = flops / row["elapsed_s"] / peak
        row["mfu_6n"] = 6.0 * shape["matmul_params"] * row["tokens"] / row["elapsed_s"] / peak
    else:
        row.setdefault("mfu", None)
        row.setdefault("mfu_6n", None)
    return row
