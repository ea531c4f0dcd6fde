"""GPU acceptance: everything tlbuild does on a GPU, in one offline command (issue 22, part 3).

    python benchmarks/gpu_acceptance.py [--work DIR]          # on a machine with a CUDA GPU
    python benchmarks/gpu_acceptance.py --allow-cpu --quick   # a smoke run of the script itself

Needs only the project installed (`pip install -e ".[test]"`; offline: the same from a
wheelhouse with `--no-index --find-links WHEELHOUSE`). Steps, each printed as it finishes:
1. the machine: GPU, driver, torch and ONNX Runtime providers, TensorRT status;
2. `pytest -m gpu`: the CUDA training path (AMP, channels-last) end to end;
3. training throughput of each bundled backbone (images/s of forward, backward and an AdamW
   step on random images at timm's benchmark size), AMP on and off, NCHW and channels-last,
   batch 32/64/128, beside timm's published training throughput for the same model (RTX 3090,
   PyTorch 1.12, CUDA 11.3, AMP, its largest batch: a reference scale, not the same GPU);
4. the demo build (`tlbuild run` on the bundled synthetic data) with its time per stage;
5. `tlbuild classify` of the demo's validation images on the CUDA provider: rows per second
   and the backend that ran.
It should take under 10 minutes on one data-centre GPU.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# timm's results/benchmark-train-amp-{nchw,nhwc}-pt112-cu113-rtx3090.csv: train_samples_per_sec
# (batch, image size) for the bundled backbones.
TIMM_PUBLISHED = {
    "tf_efficientnet_lite0": {"nchw": 1591.79, "nhwc": 2134.89, "batch": 512, "size": 224},
    "tf_efficientnet_lite1": {"nchw": 1110.94, "nhwc": 1443.47, "batch": 256, "size": 240},
    "tf_efficientnet_lite2": {"nchw": 816.76, "nhwc": 1121.02, "batch": 256, "size": 260},
}


def machine() -> dict:
    """What this machine has for tlbuild's GPU paths."""
    import onnxruntime as ort
    import torch

    from tlbuild.runtime.providers import provider_problem
    from tlbuild.runtime.tensorrt import tensorrt_status

    ok, why = tensorrt_status()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "gpu": gpu,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "onnxruntime": ort.__version__,
        "ort_cuda_provider": provider_problem("cuda") or "starts",
        "tensorrt": why if ok else f"not usable: {why}",
    }


def gpu_tests() -> dict:
    """`pytest -m gpu`, its exit code and last line."""
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:logging", "-ra"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    lines = (done.stdout + done.stderr).strip().splitlines()
    return {"exit_code": done.returncode, "summary": lines[-1] if lines else ""}


def train_rate(backbone: str, batch: int, amp: bool, channels_last: bool, steps: int) -> float:
    """Images per second of training steps on random images (after 3 untimed steps)."""
    import timm
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    size = TIMM_PUBLISHED[backbone]["size"]
    model = timm.create_model(backbone, pretrained=False, num_classes=10).to(device).train()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler(device, enabled=amp and device == "cuda")
    x = torch.randn(batch, 3, size, size, device=device).to(memory_format=fmt)
    y = torch.randint(0, 10, (batch,), device=device)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device, enabled=amp and device == "cuda"):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    for _ in range(3):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - t0)


def throughput_table(quick: bool) -> list[dict]:
    """Every bundled backbone x AMP x layout x batch (quick: one small configuration each)."""
    import torch

    rows = []
    backbones = list(TIMM_PUBLISHED)[:1] if quick else list(TIMM_PUBLISHED)
    batches = (8,) if quick else (32, 64, 128)
    amps = (True, False) if torch.cuda.is_available() else (False,)  # autocast is CUDA's here
    for b in backbones:
        for amp in amps:
            for cl in (False, True):
                for batch in batches:
                    rate = train_rate(b, batch, amp, cl, steps=2 if quick else 20)
                    ref = TIMM_PUBLISHED[b]["nhwc" if cl else "nchw"] if amp else None
                    rows.append(
                        {
                            "backbone": b,
                            "amp": amp,
                            "channels_last": cl,
                            "batch": batch,
                            "images_per_s": round(rate, 1),
                            "timm_published_amp": ref,
                        }
                    )
                    print(
                        f"  {b} amp={amp} channels_last={cl} batch {batch}: {rate:.0f} img/s"
                        + (f" (timm, RTX 3090, AMP: {ref:.0f})" if ref else ""),
                        flush=True,
                    )
    return rows


def demo_build(work: Path, quick: bool) -> dict:
    """The demo recipe on the bundled synthetic data, with each stage's seconds."""
    from rich.console import Console

    from tlbuild import runner
    from tlbuild.data.synth import synth_defects
    from tlbuild.recipe import load_recipe

    data = work / "demo-data"
    if not data.is_dir():
        synth_defects(data, per_class=30 if quick else 150, size=160, seed=0)
    text = (ROOT / "recipes" / "defects.toml").read_text()
    text = text.replace('root = "../data/demo"', f'root = "{data}"')
    text = text.replace('name = "defects"', f'name = "defects"\noutput_dir = "{work}"')
    if quick:
        text = text.replace("batch_sizes = [1, 8, 32]", "batch_sizes = [1]")
    recipe_path = work / "defects.toml"
    recipe_path.write_text(text)
    recipe = load_recipe(recipe_path)
    t0 = time.perf_counter()
    result = runner.run(recipe, Console(quiet=True))
    stages = {s.stage: round(s.seconds, 1) for s in result.stages if s.action == "ran"}
    failed = [g.gate for g in result.gates if g.failed]
    after = round(sum(s for k, s in stages.items() if k != "train"), 1)
    manifest = json.loads((recipe.out_dir / "manifest.json").read_text())
    return {
        "seconds": round(time.perf_counter() - t0, 1),
        "stages": stages,
        # The goal: the stages after training take no longer than training itself.
        "after_training_s": after,
        "after_over_training": round(after / stages["train"], 2) if stages.get("train") else None,
        "checks_on": {k: v["evaluated_with"] for k, v in manifest.get("variants", {}).items()},
        "gates_failed": failed,
        "out": str(recipe.out_dir),
    }


def classify_on_gpu(out: Path, work: Path) -> dict:
    """Classify the demo's validation images on the CUDA provider (auto elsewhere)."""
    from tlbuild.classify.run import ClassifyOptions, classify
    from tlbuild.runtime.providers import provider_problem

    cuda = provider_problem("cuda") is None
    val = [p for p, _ in json.loads((out / "splits.json").read_text())["val"]]
    listing = work / "val.txt"
    listing.write_text("\n".join(val))
    opts = ClassifyOptions(provider="cuda" if cuda else "auto", overwrite=True)
    s = classify([str(listing)], out, work / "classify.parquet", opts)
    return {"rows": s.rows, "rows_per_s": round(s.rate, 1), "backend": s.backend}


def main() -> int:
    """Run every step; print each result; exit 2 without a GPU unless --allow-cpu."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--allow-cpu", action="store_true", help="run on the CPU (a smoke test)")
    ap.add_argument("--quick", action="store_true", help="one small configuration per step")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="tlbuild-gpu-acceptance-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    report: dict = {"machine": machine()}
    print(f"1. machine: {json.dumps(report['machine'])}", flush=True)
    if report["machine"]["gpu"] is None and not args.allow_cpu:
        print("no CUDA GPU is visible to PyTorch: run this on a GPU machine (or --allow-cpu)")
        return 2
    report["gpu_tests"] = gpu_tests()
    print(f"2. pytest -m gpu: {report['gpu_tests']['summary']}", flush=True)
    print("3. training throughput (images/s):", flush=True)
    report["training"] = throughput_table(args.quick)
    report["demo_build"] = demo_build(work, args.quick)
    d = report["demo_build"]
    print(f"4. demo build: {d['seconds']} s; per stage: {d['stages']}; failed gates: "
          f"{d['gates_failed'] or 'none'}", flush=True)  # fmt: skip
    print(f"   after training: {d['after_training_s']} s = {d['after_over_training']}x training "
          f"(goal <= 1); checks on {d['checks_on']}", flush=True)  # fmt: skip
    report["classify"] = classify_on_gpu(Path(d["out"]), work)
    c = report["classify"]
    print(f"5. classify: {c['rows']} images at {c['rows_per_s']} img/s on {c['backend']}")
    report["seconds"] = round(time.perf_counter() - t0, 1)
    (work / "gpu_acceptance.json").write_text(json.dumps(report, indent=1))
    print(f"done in {report['seconds']} s; everything in {work / 'gpu_acceptance.json'}")
    failed = report["gpu_tests"]["exit_code"] not in (0, 5) or d["gates_failed"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
