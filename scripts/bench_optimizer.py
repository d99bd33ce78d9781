"""Step time and optimizer-state bytes of SO, GaLore and ReLoRA vs torch.optim.Adam on CLIP ViT-B/16.

The 96 tensors SO trains in CLIP ViT-B/16 (per block of each tower: attn.in_proj_weight,
attn.out_proj.weight, mlp.c_fc.weight, mlp.c_proj.weight), with random gradients; no model needed.

    python scripts/bench_optimizer.py --json [--device cpu cuda] [--densities 5e-5 5e-4 5e-3]

Prints one JSON object per measurement (--json) or a table. The optimizers step in turns on the same
tensors (one step of each Adam, then 4 of each SO, round after round), so the ratios hold on a busy
machine. Times are medians over about --repeats SO steps (a quarter as many Adam steps) after
warm-up: `median_ms` wall clock, `cpu_ms` process CPU time (all threads); `mean_ms` includes SO's
support redraws (one step in refresh_every). `vs_adam_*`: the median over rounds of SO's time
over Adam's in the same round. Optimizer `so_in_backward` is SO as the harness runs it
(step_in_backward): each gradient is read at its support first, as the hooks do inside backward
(median `read_ms` for all 96), and the times are those of the step that follows.

`mask_adam` and `sift` (SO with a static support, random or from the first gradient's top entries) and
`spam` (pytorch-optimizer's SPAM, its mask redrawn every --refresh-every steps) step at density 5e-4;
`galore` (so/clip/galore.py, --galore-rank, --galore-gap) steps on the same 96 tensors, in the same rounds;
its timed steps reuse the projections, and `refresh_ms` is one step that recomputes all 96 (an SVD
each, one step in --galore-gap). `relora` (so/clip/relora.py: ReLoRA's restarts on AdamW) steps AdamW on the rank-2 LoRA factors of
the 72 q, k, v projections instead, timed on its own; `reset_ms` is one merge and restart of all 72
(one step in reset_every). state_bytes: every tensor the optimizer keeps (GaLore: its projections too).
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from pytorch_optimizer import SPAM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, not installed
from so import SO  # noqa: E402
from so.clip.galore import GaLore  # noqa: E402
from so.clip.relora import Restarts  # noqa: E402

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
    """Optimizer-state bytes (SO counts its internal buffers too, GaLore its projections, SPAM its
    masks)."""
    if isinstance(opt, SO):
        return opt.state_bytes()
    states = [s for s in opt.state.values() if isinstance(s, dict)]  # SPAM keeps step counters beside them
    tensors = [v for s in states for v in s.values() if torch.is_tensor(v)]
    tensors += [s["projector"].ortho_matrix for s in states if s.get("projector")]
    return sum(t.numel() * t.element_size() for t in tensors)


def bench_relora(device, repeats, common):
    """AdamW steps on the LoRA factors of ViT-B/16's 72 q, k, v projections, and one reset."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    layers = torch.nn.ModuleDict({f"{tower}{block}{t}": torch.nn.Linear(width, width, bias=False)
                                  for tower, width in TOWERS.items() for block in range(12) for t in "qkv"})
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=1, use_rslora=True, target_modules=list(layers)), layers)
    layers.to(device)
    params = [p for n, p in layers.named_parameters() if ".lora_" in n]
    grads = [torch.randn_like(p) for p in params]
    adapters = [m for m in layers.modules() if isinstance(m, LoraLayer)]
    fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
    opt = torch.optim.AdamW(params, lr=1e-6, **fast)
    restarts = Restarts(adapters, opt, reset_every=10**9, restart_warmup=0, prune_ratio=0.9)
    steps = [time_step(opt, params, grads, device) for _ in range(max(2, repeats) + 2)][2:]
    resets = [_timed(restarts.reset, device)[0] for _ in range(3)]
    return dict(common, optimizer="relora", tensors=len(params), numel=sum(p.numel() for p in params),
                density=1.0, median_ms=statistics.median(t[0] for t in steps),
                mean_ms=statistics.fmean(t[0] for t in steps), cpu_ms=statistics.median(t[1] for t in steps),
                reset_ms=statistics.median(resets), state_bytes=state_bytes(opt))


def time_step(opt, params, grads, device, in_backward=False):
    """(wall ms, process CPU ms) of one opt.step() on the given gradients; in_backward: first
    read them as step_in_backward's hooks do, and add the wall ms of those reads."""
    for p, g in zip(params, grads):  # SO frees .grad every step: hand the same gradients back
        p.grad = g
    read = _timed(lambda: [opt.read_grad(p) for p in params], device)[:1] if in_backward else ()
    return _timed(opt.step, device) + read


def _timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start, start_cpu = time.perf_counter(), time.process_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 1e3 * (time.perf_counter() - start), 1e3 * (time.process_time() - start_cpu)


def time_interleaved(opts, params, grads, rounds, warmup, device):
    """Per optimizer, per timed round, time_step's times of its steps. opts maps a
    name to (optimizer, steps per round[, in_backward]); the optimizers take turns, round after
    round, so a shared machine's slow and quiet spells fall on all of them alike. The first
    `warmup` rounds are not timed."""
    times = {name: [] for name in opts}
    for r in range(warmup + rounds):
        for name, (opt, steps, *in_backward) in opts.items():
            took = [time_step(opt, params, grads, device, *in_backward) for _ in range(steps)]
            if r >= warmup:
                times[name].append(took)
    return times


def summary(rounds):
    """(median wall ms, mean wall ms, median process CPU ms) over all steps of all rounds."""
    wall = [t[0] for steps in rounds for t in steps]
    cpu = [t[1] for steps in rounds for t in steps]
    return statistics.median(wall), statistics.fmean(wall), statistics.median(cpu)


def paired_ratio(rounds, reference, column):
    """Median over rounds of (median time in the round / the reference's median in the same
    round): SO's cost relative to Adam, with the machine's speed drifts cancelled."""
    return statistics.median(
        statistics.median(x[column] for x in a) / statistics.median(y[column] for y in b)
        for a, b in zip(rounds, reference))


def bench_device(device, densities, repeats, refresh_every, galore_rank, galore_gap):
    device = torch.device(device)
    gen = torch.Generator(device).manual_seed(0)
    params = [torch.randn(s, device=device, generator=gen).requires_grad_() for s in clip_shapes()]
    grads = [torch.randn(s, device=device, generator=gen) for s in clip_shapes()]
    common = dict(device=str(device), tensors=len(params), numel=CLIP_VIT_B16_NUMEL,
                  threads=torch.get_num_threads(),
                  gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None)
    rows, opts, so_steps = {}, {}, 4  # per round: one step of each Adam, so_steps of each SO
    for name, kw in (("adam_foreach", dict(foreach=True)), ("adam_fused", dict(fused=True))):
        try:
            opts[name] = (torch.optim.Adam(params, lr=1e-6, **kw), 1)
            time_step(opts[name][0], params, grads, device)
        except RuntimeError as err:  # fused Adam is missing on some devices and torch versions
            rows[name] = dict(common, optimizer=name, error=str(err).splitlines()[0])
            opts.pop(name)
    so_names = []
    for density in densities:
        for optimizer, in_backward in (("so", False), ("so_in_backward", True)):
            so_names.append((optimizer, density))
            opts[so_names[-1]] = (SO(params, lr=1e-6, density=density, refresh_every=refresh_every),
                                  so_steps, in_backward)
    for name, switches in (("mask_adam", dict(support="static")), ("sift", dict(grad_selection="topk",
                                                                            support="static"))):
        opts[name] = (SO(params, lr=1e-6, density=5e-4, refresh_every=refresh_every, **switches), so_steps)
    opts["spam"] = (SPAM(params, lr=1e-6, density=5e-4, update_proj_gap=refresh_every, warmup_epoch=0,
                         grad_accu_steps=2), so_steps)
    galore = GaLore(params, lr=1e-6, rank=galore_rank, update_proj_gap=galore_gap, scale=0.25)
    refresh_ms = time_step(galore, params, grads, device)[0]  # step 0 computes every projection
    opts["galore"] = (galore, so_steps)
    rounds = max(1, -(-repeats // so_steps))
    warmup = max(2, -(-(refresh_every + 1) // so_steps))  # past SO's first redraws
    timed = time_interleaved(opts, params, grads, rounds, warmup, device)
    for name, (opt, *_) in opts.items():
        median, mean, cpu = summary(timed[name])
        if name in so_names:
            rows[name] = dict(common, optimizer=name[0], density=name[1], refresh_every=refresh_every)
        elif name == "galore":
            rows[name] = dict(common, optimizer=name, density=1.0, rank=galore_rank, update_proj_gap=galore_gap,
                              refresh_ms=refresh_ms)
        elif name in ("mask_adam", "sift", "spam"):
            rows[name] = dict(common, optimizer=name, density=5e-4, refresh_every=refresh_every)
        else:
            rows[name] = dict(common, optimizer=name, density=1.0)
        rows[name].update(median_ms=median, mean_ms=mean, cpu_ms=cpu, state_bytes=state_bytes(opt))
        if rows[name]["optimizer"] == "so_in_backward":
            rows[name]["read_ms"] = statistics.median(t[2] for steps in timed[name] for t in steps)
    adam = [name for name in opts if name in ("adam_foreach", "adam_fused")]
    for so_name in so_names + ["mask_adam", "sift", "spam", "galore"]:  # step time as a fraction of Adam's
        for name in adam:
            rows[so_name][f"vs_{name}"] = paired_ratio(timed[so_name], timed[name], 0)
            rows[so_name][f"cpu_vs_{name}"] = paired_ratio(timed[so_name], timed[name], 1)
    return list(rows.values()) + [bench_relora(device, repeats, common)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("--device", nargs="+", choices=["cpu", "cuda"],
                        default=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    parser.add_argument("--densities", nargs="+", type=float, default=[5e-5, 5e-4, 5e-3])
    parser.add_argument("--repeats", type=int, default=20, help="timed steps of each SO (Adam: a quarter)")
    parser.add_argument("--refresh-every", type=int, default=10)
    parser.add_argument("--galore-rank", type=int, default=2)
    parser.add_argument("--galore-gap", type=int, default=200, help="GaLore's update_proj_gap")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if "cuda" in args.device and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    for device in args.device:
        for row in bench_device(device, args.densities, args.repeats, args.refresh_every, args.galore_rank,
                                args.galore_gap):
            if args.json:
                print(json.dumps(row), flush=True)
            elif "error" in row:
                print(f"{row['device']:5} {row['optimizer']:14} unavailable: {row['error']}")
            else:
                print(f"{row['device']:5} {row['optimizer']:14} density {row['density']:<7g} "
                      f"median {row['median_ms']:9.2f} ms  mean {row['mean_ms']:9.2f} ms  "
                      f"cpu {row['cpu_ms']:9.2f} ms  "
                      f"state {row['state_bytes'] / 2**20:9.2f} MiB"
                      + "".join(f"  {key[:-3]} {row[key]:7.2f} ms" for key in ("read_ms", "refresh_ms", "reset_ms")
                                if key in row), flush=True)


if __name__ == "__main__":
    main()
