"""Why does loading an AOTInductor CUDA package crash on the GPU machines? (docs/ARCHITECTURE.md,
"CUDA status".) Run on a GPU machine: `bash scripts/gpu_check.sh diag` (logs to $OUT/diag.log).

It builds a CUDA package of one `nn.Linear` (torch's documented `aoti_compile_and_package`),
then, each in its own process and with its own time limit, most telling first:
  1. cuda-gdb's native backtrace of `aoti_load_package` (the image has cuda-gdb, not gdb);
  2. `aoti_load_package`, with Python's faulthandler;
  3. the package's model library opened with `AOTIModelContainerRunnerCuda` directly;
  4. a package with its kernels embedded in the .so (`aot_inductor.embed_kernel_binary`);
  5. a CPU package on the same machine.
Each child prints LOADED_AND_RAN and the largest error against eager when it survives.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

OUT = os.environ.get("OUT", "/tmp/arc-gpu")
W = os.environ.get("DIAG_DIR", "/tmp/aoti-diag")
DEV = os.environ.get("DIAG_DEVICE", "cuda")  # cpu: a dry run of this script without a GPU
HEAD = f"import glob, os, sys, torch; W, DEV = {W!r}, {DEV!r}\n"
BUILD = (
    HEAD
    + """
torch.manual_seed(0)
for dev in sorted({DEV, "cpu"}):
    m = torch.nn.Linear(64, 32).to(dev).eval()
    x = torch.randn(4, 64, device=dev)
    torch.save({"x": x.cpu(), "y": m(x).detach().cpu()}, f"{W}/ref_{dev}.pt")
    ep = torch.export.export(m, (x,))
    torch._inductor.aoti_compile_and_package(ep, package_path=f"{W}/lin_{dev}.pt2")
    print("built", dev, flush=True)
    if dev == DEV:
        torch._inductor.aoti_compile_and_package(
            ep, package_path=f"{W}/lin_embed.pt2",
            inductor_configs={"aot_inductor.embed_kernel_binary": True})
        print("built embed", flush=True)
import zipfile
with zipfile.ZipFile(f"{W}/lin_{DEV}.pt2") as z:
    print(*z.namelist(), sep="\\n")
    z.extractall(f"{W}/lin_x")
"""
)


def check(dev: str) -> str:
    return (
        f"r = torch.load(W + '/ref_{dev}.pt'); y = run([r['x'].to('{dev}')])\n"
        "print('LOADED_AND_RAN maxerr', (y[0].cpu() - r['y']).abs().max().item())\n"
    )


def package(name: str, dev: str) -> str:
    return (
        HEAD
        + f"print('loading', flush=True); c = torch._inductor.aoti_load_package(W + '/{name}')\n"
        + "print('loaded', flush=True); run = c.loader.boxed_run\n"
        + check(dev)
    )


RUNNER = (
    HEAD
    + """so = glob.glob(W + "/lin_x/**/*.so", recursive=True)[0]; print("so", so, flush=True)
if torch.cuda.is_available():
    run = torch._C._aoti.AOTIModelContainerRunnerCuda(so, 1, "cuda", os.path.dirname(so)).run
else:
    run = torch._C._aoti.AOTIModelContainerRunnerCpu(so, 1).run
print("runner made", flush=True)
"""
    + check(DEV)
)
GDB = ["cuda-gdb", "-q", "-batch", "-ex", "set pagination off", "-ex", "run", "-ex", "bt 40",
       "-ex", "info registers rip", "--args"]  # fmt: skip


def child(log, name: str, code: str, timeout: int, pre: list[str] | None = None) -> str:
    t = time.time()
    env = {**os.environ, "PYTHONFAULTHANDLER": "1", "TORCH_SHOW_CPP_STACKTRACES": "1"}
    try:
        done = subprocess.run([*(pre or []), sys.executable, "-c", code], capture_output=True,
                              text=True, timeout=timeout, env=env)  # fmt: skip
        rc, out, err = str(done.returncode), done.stdout, done.stderr
    except subprocess.TimeoutExpired as e:
        rc = "TIMEOUT"
        out, err = (e.stdout or b"").decode()[-4000:], (e.stderr or b"").decode()[-4000:]
    log(f"== {name}: rc={rc} ({time.time() - t:.0f} s)")
    log("   out: " + out.strip()[-4000:].replace("\n", "\n   "))
    log("   err: " + err.strip()[-3000:].replace("\n", "\n   "))
    return rc


def main() -> None:
    os.makedirs(OUT, exist_ok=True)
    os.makedirs(W, exist_ok=True)
    with open(os.path.join(OUT, "diag.log"), "a") as f:

        def log(s: str) -> None:
            print(s, flush=True)
            f.write(s + "\n")
            f.flush()

        log(f"#### AOTI load diagnosis {time.strftime('%Y-%m-%d %H:%M:%S')}")
        facts = (
            "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.is_available())"
        )
        child(log, "facts", facts, 60)
        results = {"build": child(log, "build", BUILD, 300)}
        steps = [
            ("cuda-gdb backtrace", package(f"lin_{DEV}.pt2", DEV), 240, GDB),
            ("aoti_load_package", package(f"lin_{DEV}.pt2", DEV), 120, None),
            ("runner directly", RUNNER, 120, None),
            ("kernels embedded", package("lin_embed.pt2", DEV), 120, None),
            ("cpu package", package("lin_cpu.pt2", "cpu"), 120, None),
        ]
        if DEV != "cuda":
            steps = steps[1:]
        for name, code, limit, pre in steps:
            results[name] = child(log, name, code, limit, pre)
        log("SUMMARY " + json.dumps(results))


if __name__ == "__main__":
    main()
