"""One-shot task inference: packed bank (ours) vs the float-stack reference, in one run.

A backbone (default FC 1024, 784-1024-1024-500) with ``k`` random masks (timing does not
depend on their values). For each ``k`` it times one inference from one image (``one_shot``,
objective ``g``): ours, with the bank packed at 1 bit per weight, and the reference, the
original implementation's method (a float stack of every mask, ``W * sum_i alpha_i M_i``,
autograd to alpha). It also times ours amortised over ``--group`` inferences that share one
pass over the bank, as GN evaluation batches them.

Memory: each measurement runs in a fresh subprocess. "Storage" is what each method keeps
between inferences (ours: the packed bank and the mask count the first inference builds; the
reference: the bank and its float stack); "working" is the growth of the peak resident
memory (``VmHWM``, reset once the storage is built) during single inferences. Libraries are loaded before anything is measured.

    python benchmarks/inference_speed.py [--ks 10 50 250] [--group 32] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

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


def random_bank_model(k: int, backbone: str, num_outputs: int):
    """A model whose bank holds ``k`` random masks."""
    from supsup import masks as M
    from supsup.model import SupermaskModel

    model = SupermaskModel.from_name(backbone, num_tasks=k, num_outputs=num_outputs, seed=0)
    gen = torch.Generator().manual_seed(k)
    state = {f"bank.{i}": torch.randint(0, 256, (k, M.packed_nbytes(layer.num_weights)), generator=gen,
                                        dtype=torch.uint8)
             for i, layer in enumerate(model.masked_layers)}
    model.load_bank_state(state)
    return model


def _worker(kind: str, k: int, group: int, repeats: int, backbone: str, num_outputs: int) -> dict:
    """Runs in a subprocess: build, reset the RSS peak, time, report."""
    from supsup.inference import alpha_gradients_reference, float_stacks, infer_tasks

    torch.manual_seed(0)
    x = torch.randn(group, 1, 1, 28, 28)
    # load every library first (numba and its compiled kernels included): not per-inference memory
    warm = random_bank_model(2, backbone, num_outputs)
    infer_tasks(warm, x[:1], method="one_shot", objective="g", num_classes=10)
    del warm
    model = random_bank_model(k, backbone, num_outputs)
    storage = model.bank_bytes
    stacks = None
    if kind == "reference":
        # The original implementation's state: a float stack of every mask, kept across calls.
        stacks = float_stacks(model, model.candidates())
        storage += sum(s.numel() * s.element_size() for s in stacks)

    def once(xs):
        if kind == "ours":
            return infer_tasks(model, xs, method="one_shot", objective="g", num_classes=10)[0]
        alphas = torch.full((xs.shape[0], k), 1.0 / k)
        return alpha_gradients_reference(model, xs, alphas, objective="g", num_classes=10, stacks=stacks).argmin(1)

    t = time.perf_counter()
    once(x[:1])  # the first inference builds what later ones reuse (ours: the bank's mask count)
    first_ms = 1e3 * (time.perf_counter() - t)
    storage += model.cache_bytes
    rss0 = _rss_kb("VmRSS")
    _reset_peak()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        once(x[:1])
        times.append(time.perf_counter() - t)
    working = max(0, _rss_kb("VmHWM") - rss0) * 1024
    out = {"kind": kind, "k": k, "single_ms": 1e3 * min(times), "first_ms": first_ms, "storage_bytes": storage,
           "working_bytes": working, "peak_bytes": storage + working}
    if kind == "ours" and group > 1:
        once(x)
        t = time.perf_counter()
        once(x)
        out["amortised_ms"] = 1e3 * (time.perf_counter() - t) / group
    return out


def _run_worker(kind, k, group, repeats, backbone, num_outputs) -> dict:
    here = str(Path(__file__).resolve().parent)
    code = (f"import json, sys; sys.path.insert(0, {here!r}); import inference_speed as b; "
            f"print(json.dumps(b._worker({kind!r}, {k}, {group}, {repeats}, {backbone!r}, {num_outputs})))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if r.returncode != 0:
        return {"kind": kind, "k": k, "error": (r.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def _num_masked_weights(backbone: str, num_outputs: int) -> int:
    from supsup.model import SupermaskModel

    return SupermaskModel.from_name(backbone, num_tasks=1, num_outputs=num_outputs, seed=0).num_masked_weights


def measure(ks=(10, 50, 250), group: int = 32, repeats: int = 3, backbone: str = "fc1024", num_outputs: int = 500,
            reference_max_bytes: float = 8e9) -> list[dict]:
    """One row per ``k``: ours, the reference (skipped when its float stack and temporaries
    would pass ``reference_max_bytes``), and the ratios reference / ours."""
    rows = []
    num_weights = _num_masked_weights(backbone, num_outputs)
    for k in ks:
        ours = _run_worker("ours", k, group, repeats, backbone, num_outputs)
        row = {"k": k, "backbone": backbone, "ours": ours}
        stack_bytes = 4 * k * num_weights  # k x P fp32
        if 2 * stack_bytes <= reference_max_bytes:  # the stack, and a temporary as large
            row["reference"] = _run_worker("reference", k, 1, repeats, backbone, num_outputs)
        else:
            row["reference"] = {"skipped": f"float stack + temporaries would need {2 * stack_bytes / 1e9:.1f} GB"}
        ref = row["reference"]
        if "single_ms" in ref and "single_ms" in ours:
            row["speedup_single"] = ref["single_ms"] / ours["single_ms"]
            if "amortised_ms" in ours:
                row["speedup_amortised"] = ref["single_ms"] / ours["amortised_ms"]
            row["memory_ratio"] = ref["peak_bytes"] / max(1, ours["peak_bytes"])
        rows.append(row)
    return rows


def _mb(b):
    return f"{b / 1e6:,.1f} MB"


def format_rows(rows: list[dict], group: int) -> str:
    lines = [f"one-shot task inference from 1 image; ours amortised over {group} inferences per bank pass",
             "backbone |    k | ours ms (1 / amortised) | float stack ms | speed-up (1 / amortised) | "
             "peak ours / float stack | memory ratio"]
    for r in rows:
        o, f = r["ours"], r["reference"]
        if "error" in o:
            lines.append(f"{r['backbone']:>8} | {r['k']:>4} | ours failed: {o['error']}")
            continue
        fs = f"{f['single_ms']:.1f}" if "single_ms" in f else f.get("skipped", f.get("error", "?"))
        sp = (f"{r['speedup_single']:.1f}x / {r.get('speedup_amortised', float('nan')):.1f}x"
              if "speedup_single" in r else "-")
        mem = f"{_mb(o['peak_bytes'])} / {_mb(f['peak_bytes']) if 'peak_bytes' in f else '-'}"
        ratio = f"{r['memory_ratio']:.1f}x" if "memory_ratio" in r else "-"
        lines.append(f"{r['backbone']:>8} | {r['k']:>4} | {o['single_ms']:9.1f} / {o.get('amortised_ms', float('nan')):6.1f} | "
                     f"{fs:>13} | {sp:>24} | {mem} | {ratio}")
    return "\n".join(lines)


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
    print(format_rows(rows, a.group))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
