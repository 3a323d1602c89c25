"""Every lesson in examples/ run as a learner runs it, at gpt2-small's shape, and how long it takes.

Each lesson is executed as a Jupyter notebook (jupytext + nbclient, in a fresh ipykernel kernel
started in a temporary folder outside the repository) with its own defaults, except that a lesson
taking ``MODEL = "gpt2"`` (or ``None``) gets random weights of gpt2-small's shape in the hub's
layout (``common.gpt2_small_folder``): what it would run on with the real gpt2 cached, with noise
in the weights. A lesson defaulting to another model (the induction lesson: the zoo's trained
induction model) keeps it. Output folders go to the temporary folder.

Prints each lesson's wall time (kernel start included) and its slowest cells, each with the CPU
time the kernel spent on it (all its threads). Target: every lesson <= 60 s on 2 cores. On a
machine shared with other work the wall times grow with the load average (printed beside each
lesson). With ``--threads 1`` the kernel runs NumPy's products on one thread: its CPU time then
hardly depends on what else the machine runs (a busy machine delays the kernel, it does not make
it work more), and it bounds from above what the lesson takes on a quiet machine of the same CPU
with two cores, which can only be faster. (With two BLAS threads on a busy machine the CPU time
grows too: OpenBLAS's threads spin while they wait for each other.)

    python benchmarks/bench_lessons.py [ioi dashboards ...] [--cells 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import glob
import os
import tempfile
import time

import nbclient

from common import describe_machine, gpt2_small_folder
from npgpt2.testing import walkthrough_notebook, walkthrough_parameters

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = 60.0  # seconds per lesson on 2 cores


def lessons(names=()):
    paths = sorted(p for p in glob.glob(os.path.join(ROOT, "examples", "*.py")) if not os.path.basename(p).startswith("_"))
    if names:
        known = {os.path.basename(p)[:-3]: p for p in paths}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise SystemExit(f"no lesson(s) {unknown}; the lessons are {sorted(known)}")
        paths = [known[n] for n in names]
    return paths


def parameters(path, gpt2_small: str, out: str) -> dict:
    """The parameters a lesson gets here: gpt2-small-shaped weights where it would take gpt2."""
    known = walkthrough_parameters(path)
    given = {}
    if known.get("MODEL") in ('"gpt2"', "'gpt2'", "None"):
        given["MODEL"] = gpt2_small
    if "OUT_DIR" in known:
        given["OUT_DIR"] = out
    return given


def kernel_cpu_seconds(pid: int) -> float:
    """User + system CPU time the kernel process has used so far (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(path, parameters: dict, workdir: str):
    """Execute the lesson as a notebook, cell by cell: (wall seconds in all, kernel start included;
    kernel CPU seconds; [(wall, cpu, cell) for every code cell])."""
    nb = walkthrough_notebook(path, parameters)
    client = nbclient.NotebookClient(nb, timeout=1800, kernel_name="python3", resources={"metadata": {"path": workdir}})
    cells = []
    t = time.perf_counter()
    with client.setup_kernel():
        pid = client.km.provisioner.pid
        for index, cell in enumerate(nb.cells):
            if cell.cell_type != "code":
                continue
            wall, cpu = time.perf_counter(), kernel_cpu_seconds(pid)
            client.execute_cell(cell, index)
            cells.append((time.perf_counter() - wall, kernel_cpu_seconds(pid) - cpu, cell))
        cpu = kernel_cpu_seconds(pid)
    return time.perf_counter() - t, cpu, cells


def first_line(cell) -> str:
    lines = [l for l in cell.source.splitlines() if l.strip() and not l.lstrip().startswith("#")]
    return (lines[0] if lines else cell.source.splitlines()[0])[:90]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="lessons to run (file names without .py); default: all")
    parser.add_argument("--cells", type=int, default=3, help="slowest cells to print per lesson")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for the kernel's BLAS (default: BLAS's own choice, every core)")
    args = parser.parse_args()
    print(describe_machine())  # (before the threads below are set: they are the kernel's)
    if args.threads is not None:  # read by OpenBLAS (and OpenMP) when the kernel imports numpy
        for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[name] = str(args.threads)
    print(f"kernel BLAS threads: {args.threads or 'default'}")
    print(f"load average at start: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")
    gpt2_small = gpt2_small_folder()
    # the kernel imports this checkout's npgpt2
    os.environ["PYTHONPATH"] = ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")
    rows = []
    for path in lessons(args.names):
        name = os.path.basename(path)[:-3]
        with tempfile.TemporaryDirectory(prefix=f"npgpt2-lesson-{name}-") as workdir:
            seconds, cpu, cells = run(path, parameters(path, gpt2_small, os.path.join(workdir, "out")), workdir)
        load = os.getloadavg()[0]
        # on one thread the CPU time is the bound that holds whatever the load; else the wall time
        judged, by = (cpu, "its one-thread CPU time") if args.threads == 1 else (seconds, "its wall time")
        verdict = f"{'ok' if judged <= TARGET else 'OVER'} by {by}"
        print(f"\n{name}: {seconds:.1f} s; kernel CPU {cpu:.1f} s ({verdict}, target <= {TARGET:.0f} s); "
              f"{len(cells)} code cells; load average {load:.2f}", flush=True)
        for wall, cell_cpu, cell in sorted(cells, key=lambda c: -c[0])[: args.cells]:
            print(f"  {wall:7.1f} s (CPU {cell_cpu:6.1f} s)  {first_line(cell)}", flush=True)
        rows.append((name, seconds, cpu, load))
    print("\n| lesson | wall s | kernel CPU s | load average |\n| --- | --- | --- | --- |")
    for name, seconds, cpu, load in rows:
        print(f"| {name} | {seconds:.1f} | {cpu:.1f} | {load:.2f} |")
    judged = [r[2] if args.threads == 1 else r[1] for r in rows]
    print(f"total {sum(r[1] for r in rows):.0f} s; {sum(j > TARGET for j in judged)} over {TARGET:.0f} s "
          f"({'one-thread CPU time' if args.threads == 1 else 'wall time'})")


if __name__ == "__main__":
    main()
