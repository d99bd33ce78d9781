"""Step time and optimizer-state bytes of SO vs torch.optim.Adam on CLIP ViT-B/16's trainable set.

The 96 tensors SO trains in CLIP ViT-B/16 (per block of each tower: attn.in_proj_weight,
attn.out_proj.weight, mlp.c_fc.weight, mlp.c_proj.weight), with random gradients; no model needed.

    python scripts/bench_optimizer.py --json [--device cpu cuda] [--densities 5e-5 5e-4 5e-3]

Prints one JSON object per measurement (--json) or a table. Times are medians over --repeats steps
after warm-up: `median_ms` wall clock, `cpu_ms` process CPU time (all threads; on CPU it is less
disturbed by other processes on a shared machine); `mean_ms` includes SO's support redraws
(one step in refresh_every).
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, not installed
from so import SO  # noqa: E402

TOWERS = {"vision": 768, "text": 512}  # width; 12 blocks each
CLIP_VIT_B16_NUMEL = 122_683_392


def clip_shapes():
    shapes = []
    for width in TOWERS.values():
        for _ in range(12):
            shapes += [(3 * width, width), (width, width), (4 * width, width), (width, 4 * width)]
    assert sum(a * b for a, b in shapes) == CLIP_VIT_B16_NUMEL, "shapes do not match ViT-B/16"
    return shapes


def state_bytes(opt):
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
               if torch.is_tensor(v))


def time_steps(opt, params, grads, warmup, repeats, device):
    """(median wall ms, mean wall ms, median process CPU ms) of opt.step()."""
    wall, cpu = [], []
    for i in range(warmup + repeats):
        for p, g in zip(params, grads):  # SO frees .grad every step: hand the same gradients back
            p.grad = g
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start, start_cpu = time.perf_counter(), time.process_time()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            wall.append(1e3 * (time.perf_counter() - start))
            cpu.append(1e3 * (time.process_time() - start_cpu))
    return statistics.median(wall), statistics.fmean(wall), statistics.median(cpu)


def bench_device(device, densities, repeats, refresh_every):
    device = torch.device(device)
    gen = torch.Generator(device).manual_seed(0)
    params = [torch.randn(s, device=device, generator=gen).requires_grad_() for s in clip_shapes()]
    grads = [torch.randn(s, device=device, generator=gen) for s in clip_shapes()]
    common = dict(device=str(device), tensors=len(params), numel=CLIP_VIT_B16_NUMEL,
                  threads=torch.get_num_threads(),
                  gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None)
    rows = []
    for name, kw in (("adam_foreach", dict(foreach=True)), ("adam_fused", dict(fused=True))):
        try:
            opt = torch.optim.Adam(params, lr=1e-6, **kw)
            median, mean, cpu = time_steps(opt, params, grads, 2, max(3, repeats // 4), device)
        except RuntimeError as err:  # fused Adam is missing on some devices and torch versions
            rows.append(dict(common, optimizer=name, error=str(err).splitlines()[0]))
            continue
        rows.append(dict(common, optimizer=name, density=1.0, median_ms=median, mean_ms=mean,
                         cpu_ms=cpu, state_bytes=state_bytes(opt)))
        del opt
    adam = {r["optimizer"]: r for r in rows if "median_ms" in r}
    for density in densities:
        opt = SO(params, lr=1e-6, density=density, refresh_every=refresh_every)
        median, mean, cpu = time_steps(opt, params, grads, refresh_every + 1, repeats, device)
        row = dict(common, optimizer="so", density=density, refresh_every=refresh_every,
                   median_ms=median, mean_ms=mean, cpu_ms=cpu, state_bytes=state_bytes(opt))
        for name, a in adam.items():  # SO step time as a fraction of Adam's
            row[f"vs_{name}"] = median / a["median_ms"]
            row[f"cpu_vs_{name}"] = cpu / a["cpu_ms"]
        rows.append(row)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("--device", nargs="+", choices=["cpu", "cuda"],
                        default=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    parser.add_argument("--densities", nargs="+", type=float, default=[5e-5, 5e-4, 5e-3])
    parser.add_argument("--repeats", type=int, default=20, help="timed SO steps (Adam: a quarter)")
    parser.add_argument("--refresh-every", type=int, default=10)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if "cuda" in args.device and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    for device in args.device:
        for row in bench_device(device, args.densities, args.repeats, args.refresh_every):
            if args.json:
                print(json.dumps(row), flush=True)
            elif "error" in row:
                print(f"{row['device']:5} {row['optimizer']:13} unavailable: {row['error']}")
            else:
                print(f"{row['device']:5} {row['optimizer']:13} density {row['density']:<7g} "
                      f"median {row['median_ms']:9.2f} ms  mean {row['mean_ms']:9.2f} ms  "
                      f"cpu {row['cpu_ms']:9.2f} ms  "
                      f"state {row['state_bytes'] / 2**20:9.2f} MiB", flush=True)


if __name__ == "__main__":
    main()
