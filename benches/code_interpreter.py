"""Benchmark: create -> first `run_code` result with the `code-interpreter` template.

Uses E2B's stock SDKs against a running Nestbox (E2B_API_URL, E2B_API_KEY, E2B_SANDBOX_URL)
that has the template built (`nestbox template build templates/code-interpreter/Dockerfile
--name code-interpreter`). Each run creates a code-interpreter sandbox and waits for the
result of `1 + 1`; next to it, as the baseline measured in the same process, a sandbox of
the default template and its first command (`true`). Runs alternate, so machine noise hits
both alike. Prints each run and the medians; asserts nothing about time.

    python benches/code_interpreter.py [RUNS]
"""

import os
import statistics
import sys
import time

from e2b import Sandbox as PlainSandbox
from e2b_code_interpreter import Sandbox

TEMPLATE = os.environ.get("NESTBOX_CODE_INTERPRETER_TEMPLATE", "code-interpreter")


def first_cell():
    began = time.perf_counter()
    sbx = Sandbox.create(template=TEMPLATE)
    try:
        result = sbx.run_code("1 + 1")
        took = time.perf_counter() - began
        if result.text != "2":
            raise SystemExit(f"unexpected result: {result.text!r} {result.error}")
        return took
    finally:
        sbx.kill()


def first_command():
    began = time.perf_counter()
    sbx = PlainSandbox.create()
    try:
        sbx.commands.run("true")
        return time.perf_counter() - began
    finally:
        sbx.kill()


def main():
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    cells, commands = [], []
    first_cell()  # warm both paths once (connections, the host's page cache)
    first_command()
    for i in range(runs):
        cells.append(first_cell())
        commands.append(first_command())
        print(f"run {i + 1}: create -> first run_code {cells[-1]:.3f} s; "
              f"create -> first command (default template) {commands[-1]:.3f} s", flush=True)
    cell, command = statistics.median(cells), statistics.median(commands)
    print(f"create -> first run_code result, median of {runs}: {cell:.3f} s "
          f"(min {min(cells):.3f}, max {max(cells):.3f}); "
          f"baseline create -> first command: {command:.3f} s; ratio {cell / command:.2f}")


if __name__ == "__main__":
    main()
