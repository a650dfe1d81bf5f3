"""The GPU check of the editors' code paths (benchmarks/gpu_check.sh runs it; see benchmarks/README.md).

    python benchmarks/gpu_check.py --device cuda --out OUT      # on a machine with one NVIDIA GPU
    python benchmarks/gpu_check.py --device cpu --out OUT --reference benchmarks/gpu_check_cpu.csv
                                                                  # the CPU figures the GPU run is checked against

For FT-M, ROME, MEMIT, GRACE and RECIPE on SmolLM2-135M-Instruct, in float32 and bfloat16
(``model.dtype``), one ordinary ``python -m editbench`` run each on the embedded sample facts
(``data=sample``, which travels with the repository; 10 cases, T = 1 and T = 10). The runner
times every edit between ``torch.cuda.synchronize()`` calls and records the GPU's peak
allocated memory (``peak_mem_mb``). RECIPE is trained first by the same run, briefly
(``editor.train.steps``, on the sample facts themselves: a code-path check, not a RECIPE
result). Prints one table and writes ``gpu_check.csv``: per editor, dtype and T the
reliability / generality / locality, seconds per edit, inference overhead, peak memory, and,
when a CPU reference file is given, the float32 metrics' largest difference from the CPU
figures of the same command (parity: at most ``--tolerance``).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "editbench" / "data" / "sample_facts.json"
EDITORS = {
    "ft_m": ["editor=ft", "editor.objective=target_new"],
    "rome": ["editor=rome"],
    "memit": ["editor=memit"],
    "grace": ["editor=grace"],
    "recipe": ["editor=recipe", f"data.train_path={SAMPLE}", "+data.train_kind=sample", "editor.train.steps=60",
               "editor.train.n_val=0", "editor.train.progress=false"],
}
METRICS = ["reliability", "generality", "locality", "edit_time_s", "infer_overhead", "peak_mem_mb"]
QUALITY = ["reliability", "generality", "locality"]


def run_one(name: str, dtype: str, device: str, out: Path) -> pd.DataFrame:
    args = [*EDITORS[name], "model=smollm2", f"model.device={device}", f"model.dtype={dtype}", "data=sample",
            "runner.n_cases=10", "runner.steps=[1,10]", "runner.progress=false", "general.tasks=[]",
            f"out_dir={out / 'runs'}"]
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "editbench", *args], cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    (out / "logs").mkdir(parents=True, exist_ok=True)
    (out / "logs" / f"{name}_{dtype}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        print(f"{name} {dtype}: exit {proc.returncode}: {(proc.stdout + proc.stderr).strip().splitlines()[-1:]}")
        return pd.DataFrame()
    folder = Path(next(ln.split("results: ", 1)[1] for ln in proc.stdout.splitlines() if ln.startswith("results: ")))
    s = pd.read_csv(folder / "summary.csv")
    s = s[s.metric.isin(METRICS)].pivot_table(index="T", columns="metric", values="mean").reset_index()
    s.insert(0, "dtype", dtype)
    s.insert(0, "editor", name)
    s["run_wall_s"] = wall
    return s


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--editors", default=",".join(EDITORS))
    ap.add_argument("--reference", type=Path, default=ROOT / "benchmarks" / "gpu_check_cpu.csv",
                    help="CPU figures of the same runs (written by --device cpu)")
    ap.add_argument("--tolerance", type=float, default=0.01)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            print("no CUDA device: nothing measured")
            return 2
        print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    rows = [run_one(e, d, args.device, args.out) for e in args.editors.split(",") for d in args.dtypes.split(",")]
    table = pd.concat([r for r in rows if not r.empty], ignore_index=True)
    if args.device == "cpu":
        table.to_csv(args.reference, index=False)
        print(f"wrote the CPU reference {args.reference}")
    elif args.reference.is_file():
        ref = pd.read_csv(args.reference).set_index(["editor", "dtype", "T"])
        diffs = []
        for _, r in table.iterrows():
            key = (r.editor, r.dtype, r.T)
            diffs.append(max(abs(r[m] - ref.loc[key, m]) for m in QUALITY) if key in ref.index else float("nan"))
        table["max_diff_vs_cpu"] = diffs
        table["parity"] = ["n/a" if d != d else ("ok" if d <= args.tolerance else "DIFFERS") for d in diffs]
        f32 = table[table.dtype == "float32"]
        print(f"float32 parity with the CPU (max |difference| of rel/gen/loc <= {args.tolerance}): "
              f"{(f32.parity == 'ok').sum()} of {len(f32)}")
    else:
        print(f"no CPU reference at {args.reference}: parity not checked (write it with --device cpu)")
    table.to_csv(args.out / "gpu_check.csv", index=False)
    with pd.option_context("display.width", 200, "display.max_columns", None, "display.float_format", "{:.3f}".format):
        print(table.to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
