"""Start-up time of the `km` commands that do not train or evaluate, against `python -c pass`.

    python bench/startup.py [--repeats 5]

Each command runs in a fresh interpreter `--repeats` times; the table gives the median wall time, the ratio to
an empty interpreter, and whether torch or Lightning was imported (they must not be: `km --help`, `km config`,
`km data check`, `km sweep start/status`, `km compare` only parse, compose and read files). Prints the thread
count and the machine's load, since both move the absolute times.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROBE = (
    "import sys, runpy; sys.argv = ['km', *sys.argv[1:]]\n"
    "try:\n    runpy.run_module('km.cli', run_name='__main__')\nexcept SystemExit:\n    pass\n"
    "print('HEAVY' if {'torch', 'pytorch_lightning'} & set(sys.modules) else 'LIGHT', file=sys.stderr)"
)


def commands(tmp: Path) -> dict[str, list[str]]:
    spec = ROOT / "sweeps" / "compare_baselines.yaml"
    sweep_dir = tmp / "sw"
    return {
        "km --help": ["--help"],
        "km config model=km": ["config", "model=km"],
        "km data check mnist": ["data", "check", "mnist"],
        "km sweep start --local": ["sweep", "start", str(spec), "--local", "--dir", str(sweep_dir)],
        "km sweep status": ["sweep", "status", str(sweep_dir)],
        "km compare (no runs)": ["compare", str(tmp / "none")],
    }


def timed(argv: list[str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, cwd=ROOT)
    return time.perf_counter() - t0, p.stderr.strip().splitlines()[-1] if p.stderr.strip() else "?"


def _empty() -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    print(f"threads: 1 process each; load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory() as tmp:
        base = statistics.median(_empty() for _ in range(args.repeats))
        print(f"{'command':<26} {'median s':>9} {'/ python -c pass':>17}  imports")
        print(f"{'python -c pass':<26} {base:>9.2f} {1.0:>17.1f}")
        for name, cmd in commands(Path(tmp)).items():
            runs = [timed(cmd) for _ in range(args.repeats)]
            med = statistics.median(t for t, _ in runs)
            heavy = "torch/Lightning!" if any(h == "HEAVY" for _, h in runs) else "no torch, no Lightning"
            print(f"{name:<26} {med:>9.2f} {med / base:>17.1f}  {heavy}")


if __name__ == "__main__":
    main()
