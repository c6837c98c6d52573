"""Verify cost of a Llama-8B-shaped target on a GPU: torch + transformers only (no Ray, no project code).

A random-weight target (hidden 4096, 32 layers, 8 KV heads, vocab 128256, bf16) verifies K tokens per
session (6 by default; `--k 6 9 13 16` for the node counts of token trees, whose cost is their verified
positions) on top of a 512-token cache, rolled back after every step, at several batch sizes. Prints
ms/step and the ratio to the memory floor (weight bytes / measured device-to-device copy bandwidth).

Modes: `eager` (DynamicCache, crop(-K) rollback) and `static` (StaticCache written at fixed positions, so a
rollback is free; with `--compile` the step is captured by torch.compile in reduce-overhead mode, i.e.
CUDA graphs, as gpt-fast does). `--small` runs a tiny shape, for a CPU smoke test.

    python benchmarks/gpu_verify.py --mode eager static --compile
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import sys
import time

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM


def config(small: bool) -> LlamaConfig:
    if small:
        return LlamaConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           intermediate_size=256, vocab_size=1000, max_position_embeddings=1024)
    return LlamaConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       intermediate_size=14336, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def copy_bandwidth(device: str, nbytes: int = 2 << 30) -> float:
    """Bytes per second for a device-to-device copy (read + write counted once each)."""
    if not device.startswith("cuda"):
        nbytes = 64 << 20
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    sync(device)
    started, reps = time.perf_counter(), 10
    for _ in range(reps):
        dst.copy_(src)
    sync(device)
    return 2 * nbytes * reps / (time.perf_counter() - started)


def cache_kwarg(model) -> str:
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def time_steps(step, device: str, warmup: int, reps: int) -> float:
    for _ in range(warmup):
        step()
    sync(device)
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        step()
        sync(device)
        times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)


@torch.inference_mode()
def eager_ms(model, batch: int, ctx: int, k: int, device: str, warmup: int, reps: int) -> float:
    kw = cache_kwarg(model)
    cache = DynamicCache()
    model(input_ids=torch.randint(0, 1000, (batch, ctx), device=device), use_cache=True, **{kw: cache})
    new = torch.randint(0, 1000, (batch, k), device=device)
    pos = torch.arange(ctx, ctx + k, device=device).expand(batch, k)

    def step():
        model(input_ids=new, position_ids=pos, use_cache=True, **{kw: cache})
        cache.crop(-k)  # roll the K verified positions back

    return time_steps(step, device, warmup, reps)


@torch.inference_mode()
def static_ms(model, batch: int, ctx: int, k: int, device: str, warmup: int, reps: int, compile_: bool) -> float:
    from transformers import StaticCache

    kw = cache_kwarg(model)
    cache = StaticCache(config=model.config, max_cache_len=ctx + k, max_batch_size=batch)
    prefill_pos = torch.arange(ctx, device=device)
    model(input_ids=torch.randint(0, 1000, (batch, ctx), device=device), cache_position=prefill_pos,
          use_cache=True, **{kw: cache})
    new = torch.randint(0, 1000, (batch, k), device=device)
    cache_pos = torch.arange(ctx, ctx + k, device=device)

    counters = [layer.cumulative_length for layer in getattr(cache, "layers", [])
                if isinstance(getattr(layer, "cumulative_length", None), torch.Tensor)]

    def forward(ids):
        # Rollback = writing the same K slots every step. transformers <= 5.23 places writes by
        # `cache_position`; 5.24 by a per-layer write counter, which is reset to ctx in place here.
        for c in counters:
            c.fill_(ctx)
        return model(input_ids=ids, cache_position=cache_pos, position_ids=cache_pos.expand(batch, k),
                     use_cache=True, **{kw: cache}).logits

    fn = torch.compile(forward, mode="reduce-overhead", fullgraph=False) if compile_ else forward
    return time_steps(lambda: fn(new), device, warmup + (3 if compile_ else 0), reps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--small", action="store_true", help="tiny shapes (CPU smoke test)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--k", type=int, nargs="+", default=[6], help="verified positions per session (one run each)")
    ap.add_argument("--mode", nargs="+", default=["eager", "static"], choices=["eager", "static"])
    ap.add_argument("--compile", action="store_true", help="torch.compile the static step (CUDA graphs)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", help="also write this Markdown file (e.g. docs/results/gpu_verify.md)")
    args = ap.parse_args()
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    torch.manual_seed(0)
    with torch.device(args.device):
        model = LlamaForCausalLM(config(args.small)).to(dtype).eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bw = copy_bandwidth(args.device)
    floor_ms = weight_bytes / bw * 1e3
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    import transformers

    lines = [f"device {name}; torch {torch.__version__}; transformers {transformers.__version__}; {dtype}",
             f"weights {weight_bytes / 1e9:.2f} GB; copy bandwidth {bw / 1e9:.0f} GB/s; memory floor {floor_ms:.2f} ms",
             f"{'mode':>16} | {'K':>3} | {'batch':>5} | {'ms/step':>8} | {'x floor':>7}"]
    print("\n".join(lines))
    for mode in args.mode:
        for k in args.k:
            for b in args.batches:
                if mode == "eager":
                    ms = eager_ms(model, b, args.ctx, k, args.device, args.warmup, args.reps)
                else:
                    ms = static_ms(model, b, args.ctx, k, args.device, args.warmup, args.reps, args.compile)
                label = mode + ("+compile" if mode == "static" and args.compile else "")
                lines.append(f"{label:>16} | {k:>3} | {b:>5} | {ms:>8.2f} | {ms / floor_ms:>7.2f}")
                print(lines[-1])
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(f"# GPU verify cost (Llama-8B shape, random weights)\n\nCommand: `python -m benchmarks.gpu_verify "
                     f"{' '.join(sys.argv[1:])}`\n\n```\n" + "\n".join(lines) + "\n```\n")


if __name__ == "__main__":
    main()
