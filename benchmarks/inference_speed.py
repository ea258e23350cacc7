"""One-shot task inference: packed bank (ours) vs the float-stack reference, in one run.

FC 1024 (784-1024-1024-500) with ``k`` random masks. For each ``k`` it times one inference
from one image (``one_shot``, objective ``g``) and the amortised time when ``--group``
inferences share one pass over the bank (as GN evaluation does), and measures memory:

* storage: the packed bank (1 bit per weight) vs the float stack of masks the original code
  keeps (``k x P`` fp32);
* working memory: peak RSS growth during the inference, measured in a fresh subprocess per
  measurement (``VmHWM`` from /proc).

    python benchmarks/inference_speed.py [--ks 10 50 250] [--group 32] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def _reset_peak() -> None:
    # Writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0).
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _build(k: int, backbone: str, num_outputs: int):
    from supsup import masks as M
    from supsup.model import SupermaskModel

    model = SupermaskModel.from_name(backbone, num_tasks=k, num_outputs=num_outputs, seed=0)
    gen = torch.Generator().manual_seed(k)
    for layer in model.masked_layers:  # random masks: timing does not depend on their values
        layer.reserve(k)
        nbytes = M.packed_nbytes(layer.num_weights)
        layer.bank[:k] = torch.randint(0, 256, (k, nbytes), generator=gen, dtype=torch.uint8)
        layer.num_masks = k
    model.load_bank_state(model.bank_state())
    return model


def _worker(kind: str, k: int, group: int, repeats: int, backbone: str, num_outputs: int) -> dict:
    """Runs in a subprocess: build, reset the RSS peak, time, report."""
    from supsup.inference import alpha_gradients_reference, float_stacks, infer_tasks

    torch.manual_seed(0)
    model = _build(k, backbone, num_outputs)
    x = torch.randn(group, 1, 1, 28, 28)
    storage = model.bank_bytes
    stacks = None
    if kind == "reference":
        # The original implementation's state: a float stack of every mask, kept across calls.
        stacks = float_stacks(model)
        storage = sum(s.numel() * s.element_size() for s in stacks)

    def once(xs):
        if kind == "ours":
            return infer_tasks(model, xs, method="one_shot", objective="g", num_classes=10)[0]
        alphas = torch.full((xs.shape[0], k), 1.0 / k)
        return alpha_gradients_reference(model, xs, alphas, objective="g", num_classes=10, stacks=stacks).argmin(1)

    once(x[:1])  # warm up
    rss0 = _rss_kb("VmRSS")
    _reset_peak()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        once(x[:1])
        times.append(time.perf_counter() - t)
    peak = _rss_kb("VmHWM")
    out = {"kind": kind, "k": k, "single_ms": 1e3 * min(times), "storage_bytes": storage,
           "working_bytes": max(0, peak - rss0) * 1024}
    if kind == "ours" and group > 1:
        t = time.perf_counter()
        once(x)
        out["amortised_ms"] = 1e3 * (time.perf_counter() - t) / group
    return out


def _run_worker(kind, k, group, repeats, backbone, num_outputs) -> dict:
    code = ("import json, sys; sys.path.insert(0, 'benchmarks'); import inference_speed as b; "
            f"print(json.dumps(b._worker({kind!r}, {k}, {group}, {repeats}, {backbone!r}, {num_outputs})))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if r.returncode != 0:
        return {"kind": kind, "k": k, "error": (r.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def measure(ks=(10, 50, 250), group: int = 32, repeats: int = 3, backbone: str = "fc1024", num_outputs: int = 500,
            reference_max_bytes: float = 8e9) -> list[dict]:
    rows = []
    for k in ks:
        ours = _run_worker("ours", k, group, repeats, backbone, num_outputs)
        stack_bytes = 32 * ours.get("storage_bytes", 0)  # 32 bits of float per stored bit
        row = {"k": k, "ours": ours}
        if 2 * stack_bytes <= reference_max_bytes:
            row["reference"] = _run_worker("reference", k, 1, repeats, backbone, num_outputs)
        else:
            row["reference"] = {"skipped": f"float stack would need {2 * stack_bytes / 1e9:.1f} GB"}
        ref = row["reference"]
        if "single_ms" in ref and "single_ms" in ours:
            row["speedup_single"] = ref["single_ms"] / ours["single_ms"]
            if "amortised_ms" in ours:
                row["speedup_amortised"] = ref["single_ms"] / ours["amortised_ms"]
            row["memory_ratio_total"] = ((ref["storage_bytes"] + ref["working_bytes"])
                                         / (ours["storage_bytes"] + ours["working_bytes"]))
            row["memory_ratio_working"] = ref["working_bytes"] / max(1, ours["working_bytes"])
        rows.append(row)
    return rows


def _fmt_mb(b):
    return f"{b / 1e6:,.1f} MB"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ks", type=int, nargs="+", default=[10, 50, 250])
    p.add_argument("--group", type=int, default=32, help="inferences sharing one pass over the bank")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--backbone", default="fc1024")
    p.add_argument("--num-outputs", type=int, default=500)
    p.add_argument("--json", help="write the rows to this file")
    a = p.parse_args()
    rows = measure(a.ks, a.group, a.repeats, a.backbone, a.num_outputs)
    print(f"one-shot inference, {a.backbone}, 1 image; ours amortised over {a.group} inferences per bank pass")
    print("   k | ours ms (1 / amortised) | float stack ms | speed-up (1 / amort.) | storage ours / stack | working ours / stack | total memory ratio")
    for r in rows:
        o, f = r["ours"], r["reference"]
        if "error" in o:
            print(f"{r['k']:>4} | ours failed: {o['error']}")
            continue
        fs = f"{f['single_ms']:.1f}" if "single_ms" in f else f.get("skipped", f.get("error", "?"))
        sp = (f"{r['speedup_single']:.1f}x / {r.get('speedup_amortised', float('nan')):.1f}x"
              if "speedup_single" in r else "-")
        print(f"{r['k']:>4} | {o['single_ms']:8.1f} / {o.get('amortised_ms', float('nan')):6.1f} | {fs:>14} | {sp:>21} | "
              f"{_fmt_mb(o['storage_bytes'])} / {_fmt_mb(f['storage_bytes']) if 'storage_bytes' in f else '-'} | "
              f"{_fmt_mb(o['working_bytes'])} / {_fmt_mb(f['working_bytes']) if 'working_bytes' in f else '-'} | "
              f"{r.get('memory_ratio_total', float('nan')):.1f}x")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()
