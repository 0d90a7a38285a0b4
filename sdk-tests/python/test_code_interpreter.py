"""E2B's stock code-interpreter SDK (PyPI `e2b-code-interpreter`) against Nestbox's
`code-interpreter` template: nothing here knows it is not E2B.

Run by the end-to-end test `e2e_code_interpreter` with E2B_API_URL, E2B_API_KEY and
E2B_SANDBOX_URL pointing at a `nestbox up` that has built the template, named by
NESTBOX_CODE_INTERPRETER_TEMPLATE.
"""

import base64
import os
import time

import pytest
from e2b import NotFoundException, TimeoutException
from e2b_code_interpreter import Sandbox

TEMPLATE = os.environ.get("NESTBOX_CODE_INTERPRETER_TEMPLATE", "code-interpreter")


@pytest.fixture(scope="module")
def sbx():
    began = time.monotonic()
    s = Sandbox.create(template=TEMPLATE, envs={"SANDBOX_WIDE": "from-create"}, timeout=900)
    first = s.run_code("1 + 1")
    print(f"\ncreate -> first run_code result: {time.monotonic() - began:.2f} s")
    assert first.text == "2"
    yield s
    s.kill()


def test_cells_stream_their_output_and_keep_state(sbx):
    seen = []
    r = sbx.run_code(
        "import sys\nanswer = 40\nprint('to stdout')\nprint('to stderr', file=sys.stderr)\nanswer + 2",
        on_stdout=lambda m: seen.append(m.line),
    )
    assert r.error is None
    assert r.text == "42"
    assert r.logs.stdout == ["to stdout\n"]
    assert r.logs.stderr == ["to stderr\n"]
    assert seen == ["to stdout\n"]
    assert r.execution_count >= 1
    assert sbx.run_code("answer * 2").text == "80"


def test_a_matplotlib_chart_is_a_png_result(sbx):
    r = sbx.run_code(
        "import matplotlib.pyplot as plt\n"
        "plt.plot([1, 2, 3], [1, 4, 9])\n"
        "plt.title('squares')\n"
        "plt.show()"
    )
    assert r.error is None
    charts = [x for x in r.results if x.png]
    assert len(charts) == 1
    assert base64.b64decode(charts[0].png).startswith(b"\x89PNG\r\n\x1a\n")
    assert "Figure" in charts[0].text


def test_a_data_frame_comes_back_as_data_html_and_text(sbx):
    r = sbx.run_code(
        "import pandas as pd\n"
        "frame = pd.DataFrame({'a': [1, 2, 3], 'b': ['x', 'y', 'z']})\n"
        "frame"
    )
    assert r.error is None
    main = r.results[0]
    assert main.is_main_result
    assert main.data == {"a": [1, 2, 3], "b": ["x", "y", "z"]}
    assert "<table" in main.html
    assert "a" in main.text and "z" in main.text


def test_an_exception_comes_with_its_traceback(sbx):
    r = sbx.run_code("def inner():\n    raise ValueError('bad value')\n\ninner()")
    assert r.error is not None
    assert r.error.name == "ValueError"
    assert r.error.value == "bad value"
    assert "inner" in r.error.traceback
    assert "ValueError" in r.error.traceback
    # The context is still usable, with its state.
    assert sbx.run_code("answer").text == "40"


def test_environment_variables(sbx):
    # The sandbox's own, then one cell's (which does not outlive the cell).
    assert sbx.run_code("import os; os.getenv('SANDBOX_WIDE')").text == "from-create"
    r = sbx.run_code("import os; os.getenv('PER_CELL')", envs={"PER_CELL": "only-here"})
    assert r.text == "only-here"
    assert sbx.run_code("import os; os.getenv('PER_CELL') is None").text == "True"


def test_contexts_are_created_listed_restarted_and_removed(sbx):
    ctx = sbx.create_code_context(cwd="/tmp")
    assert (ctx.language, ctx.cwd) == ("python", "/tmp")
    assert ctx.id in [c.id for c in sbx.list_code_contexts()]
    assert sbx.run_code("import os; os.getcwd()", context=ctx).text == "/tmp"
    sbx.run_code("kept = 7", context=ctx)
    assert sbx.run_code("kept", context=ctx).text == "7"
    # Contexts do not share state.
    assert sbx.run_code("'kept' in dir()").text == "False"
    sbx.restart_code_context(ctx)
    assert sbx.run_code("kept", context=ctx).error.name == "NameError"
    sbx.remove_code_context(ctx)
    assert ctx.id not in [c.id for c in sbx.list_code_contexts()]
    with pytest.raises(NotFoundException):
        sbx.run_code("1", context=ctx)


def test_a_timeout_stops_the_cell_and_the_context_carries_on(sbx):
    began = time.monotonic()
    with pytest.raises(TimeoutException):
        sbx.run_code("import time; time.sleep(30)", timeout=2)
    assert sbx.run_code("1 + 1", timeout=120).text == "2"
    print(f"\na timed-out cell and the next one: {time.monotonic() - began:.1f} s")
