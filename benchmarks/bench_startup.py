"""Start-up: wall time of `inpaint --help`, against a bare Python start, and what it imports.

Run: python benchmarks/bench_startup.py [--repeats 10]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time

HEAVY_MODULES = ("torch", "transformers", "datasets", "accelerate", "cv2", "skimage")


def wall_times(command: list[str], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()

    import os

    print(f"load average {', '.join(f'{v:.1f}' for v in os.getloadavg())}")
    script = shutil.which("inpaint") or str(sys.executable).replace("python", "inpaint")
    commands = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "inpaint --help": [script, "--help"],
        "python -m inpaint_cli.app --help": [sys.executable, "-m", "inpaint_cli.app", "--help"],
    }
    for label, command in commands.items():
        try:
            times = wall_times(command, args.repeats)
        except (OSError, subprocess.CalledProcessError) as error:
            print(f"{label:34s} failed: {error}")
            continue
        print(
            f"{label:34s} median {statistics.median(times) * 1000:7.0f} ms   "
            f"min {min(times) * 1000:7.0f} ms   ({args.repeats} runs)"
        )
    probe = (
        "import sys\n"
        "from inpaint_cli.app import app\n"
        "try:\n"
        "    app(['--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        f"print('HEAVY=' + ','.join(m for m in {HEAVY_MODULES!r} if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=False
    )
    marked = [line for line in result.stdout.splitlines() if line.startswith("HEAVY=")]
    if not marked:
        print(f"could not probe the imports: {result.stderr.strip()[-300:]}")
        return
    print(f"heavy modules imported by --help: {marked[-1][len('HEAVY=') :] or 'none'}")


if __name__ == "__main__":
    main()
