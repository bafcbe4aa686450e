"""LoRA training throughput for a LLaMA-2-7B-shaped model with random weights, on one CUDA GPU.

    python bench/gpu_llama7b_lora.py [--steps 20] [--batch 8] [--seq 256]

bf16 frozen base, LoRA rank 8 on q/k/v/o in fp32 under autocast (the agnews-llama2-7b preset's LoRA),
AdamW on the LoRA weights only, loss on the last 4 positions of each row (a label), gradient
checkpointing off. Prints JSON: tokens/s and model FLOPs utilisation against the GPU's dense bf16 peak
(4*N*tokens for a frozen base: forward plus activation gradients; 6*N is also given for comparison).
"""
from __future__ import annotations

import argparse
import json
import time

import torch

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print(json.dumps({"skipped": "no CUDA device"}))
        return
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                             task_type="CAUSAL_LM"))
    for n, p in model.named_parameters():
        if p.requires_grad:
            p.data = p.data.float()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    n_linear = sum(p.numel() for n, p in model.named_parameters()
                   if p.dim() == 2 and "embed" not in n and "lm_head" not in n and "lora" not in n)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device="cuda")
    labels = torch.full_like(ids, -100)
    labels[:, -4:] = ids[:, -4:]

    def step() -> float:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    tokens = args.steps * args.batch * args.seq
    tps = tokens / dt
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    out = {"device": name, "params_linear": n_linear, "batch": args.batch, "seq": args.seq, "steps": args.steps,
           "tokens_per_s": round(tps, 1), "step_s": round(dt / args.steps, 4),
           "flops_convention": "4*N*tokens (frozen base: forward + activation gradients); 6N shown too",
           "model_tflops_4N": round(4 * n_linear * tps / 1e12, 1), "model_tflops_6N": round(6 * n_linear * tps / 1e12, 1),
           "peak_bf16_tflops": peak and peak / 1e12,
           "mfu_4N": peak and round(4 * n_linear * tps / peak, 3),
           "max_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1)}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
