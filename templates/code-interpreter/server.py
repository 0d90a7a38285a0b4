#!/usr/bin/env python3
"""The code-interpreter server of Nestbox's `code-interpreter` template.

It speaks E2B's code-interpreter protocol on port 49999, so the stock `e2b-code-interpreter`
SDKs (PyPI and npm) work unmodified. Each execution context is one Jupyter kernel
(`ipykernel`, driven through `jupyter_client`); a context keeps its state between cells.

Routes (query strings are ignored):
- `POST /execute` `{code, context_id?, language?, env_vars?}`: 200 at once, then one ASCII
  JSON object per line: `number_of_executions`, `stdout`/`stderr`, `result`, `error`,
  `keepalive` (after every few seconds of silence, so a client that left is noticed) and
  `end_of_execution`. A client that goes away (its timeout) interrupts the cell.
- `POST /contexts` `{language?, cwd?}`, `GET /contexts`, `POST /contexts/{id}/restart`,
  `DELETE /contexts/{id}`: contexts as `{id, language, cwd}`, listed in creation order.
- `GET /health`: 200 once the default context is up with its libraries imported (the
  template's ready check, so the snapshot holds a warm kernel).

Invariants: cells of one context run one at a time; `env_vars` apply to one cell and are
put back after it; the sandbox's own environment (from the guest agent's `/envs`) is
applied to each context before its first cell, since kernels started while the template
was built do not have it. Errors are plain-text bodies: 404 for an unknown context, 400
for a bad request.
"""

import datetime
import json
import os
import queue
import select
import socket
import sys
import threading
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from jupyter_client import KernelManager
from jupyter_core.paths import jupyter_runtime_dir

PORT = int(os.environ.get("NESTBOX_CODE_INTERPRETER_PORT", "49999"))
GUEST_AGENT = os.environ.get("NESTBOX_GUEST_AGENT_URL", "http://127.0.0.1:49983")
KEEPALIVE_SEC = 5.0
# How often a running cell checks that its client is still there.
POLL_SEC = 0.5
ABANDON_WAIT_SEC = 30
START_TIMEOUT_SEC = 300.0
MAX_BODY = 16 << 20
# Languages we run, by the names clients use; each maps to a kernel.
LANGUAGES = {"python": "python3"}
ALIASES = {"py": "python", "python3": "python", "ipython": "python"}
# Imported into every Python kernel when it starts, so the first cell that uses them does
# not pay for the import (the template's snapshot holds the default kernel warm).
WARM_IMPORTS = "import numpy, pandas, matplotlib, matplotlib.pyplot"

# Run silently in every Python kernel: charts inline (PNG), and data frames also as
# `e2b/data` ({column: [values]}), which the SDKs read as `result.data`.
SETUP = r'''
def __nestbox_setup():
    import json as _json
    from IPython import get_ipython
    from IPython.core.formatters import BaseFormatter
    from traitlets import ObjectName, Unicode

    ip = get_ipython()
    try:
        import matplotlib
        matplotlib.use("module://matplotlib_inline.backend_inline")
    except Exception:
        pass

    class DataFormatter(BaseFormatter):
        format_type = Unicode("e2b/data")
        print_method = ObjectName("_repr_e2b_data_")

        def __call__(self, obj):
            pandas = __import__("sys").modules.get("pandas")
            if pandas is None or not isinstance(obj, pandas.DataFrame):
                return None
            try:
                columns = _json.loads(obj.to_json(orient="columns", date_format="iso"))
            except Exception:
                return None
            return {str(k): list(v.values()) for k, v in columns.items()}

    ip.display_formatter.formatters["e2b/data"] = DataFormatter(parent=ip.display_formatter)

__nestbox_setup()
del __nestbox_setup
'''

# MIME type -> the protocol's result field.
FIELDS = {
    "text/plain": "text",
    "text/html": "html",
    "text/markdown": "markdown",
    "image/svg+xml": "svg",
    "image/png": "png",
    "image/jpeg": "jpeg",
    "application/pdf": "pdf",
    "text/latex": "latex",
    "application/json": "json",
    "application/javascript": "javascript",
    "e2b/data": "data",
    "e2b/chart": "chart",
}


class ClientGone(Exception):
    """The client closed its connection while a cell ran."""


class HttpError(Exception):
    def __init__(self, status, message):
        super().__init__(message)
        self.status = status
        self.message = message


def now():
    return datetime.datetime.now(datetime.timezone.utc).isoformat()


def log(*args):
    print("code-interpreter:", *args, file=sys.stderr, flush=True)


def py_literal(value):
    """A Python literal for a str-to-str mapping (JSON is one)."""
    return json.dumps(value, ensure_ascii=True)


class Context:
    """One kernel, its language and working directory."""

    def __init__(self, language, cwd, warm=False):
        self.id = str(uuid.uuid4())
        # Default contexts import the common libraries up front (the first cell of a
        # sandbox is in one); others start lean, so creating them is quick.
        self.warm = warm
        self.language = language
        self.cwd = cwd
        self.lock = threading.Lock()
        self.km = None
        self.kc = None
        self.sandbox_env_applied = False

    def describe(self):
        return {"id": self.id, "language": self.language, "cwd": self.cwd}

    def start(self):
        # Unix sockets in a private directory: no other process in the sandbox can talk
        # to the kernel (TCP ports on loopback would be open to every local user).
        runtime = jupyter_runtime_dir()
        os.makedirs(runtime, mode=0o700, exist_ok=True)
        km = KernelManager(
            kernel_name=LANGUAGES[self.language],
            transport="ipc",
            ip=os.path.join(runtime, f"kernel-{self.id}"),
        )
        km.start_kernel(cwd=self.cwd, env=dict(os.environ))
        kc = km.blocking_client()
        kc.start_channels()
        try:
            kc.wait_for_ready(timeout=START_TIMEOUT_SEC)
        except Exception:
            kc.stop_channels()
            km.shutdown_kernel(now=True)
            raise
        self.km, self.kc = km, kc
        self.prepare()

    def prepare(self):
        self.silent(SETUP)
        if self.warm:
            self.silent(WARM_IMPORTS)
        self.sandbox_env_applied = False

    def restart(self):
        with self.lock:
            self.revive()

    def revive(self):
        """Starts the kernel afresh (state lost; same id, language and directory)."""
        self.km.restart_kernel(now=True)
        self.kc.wait_for_ready(timeout=START_TIMEOUT_SEC)
        self.prepare()

    def shutdown(self):
        with self.lock:
            try:
                self.kc.stop_channels()
            finally:
                self.km.shutdown_kernel(now=True)

    def silent(self, code):
        """Runs code that shows nothing and keeps no history; returns its error, if any."""
        msg_id = self.kc.execute(code, silent=True, store_history=False, allow_stdin=False)
        error = None
        while True:
            msg = self.kc.get_iopub_msg(timeout=START_TIMEOUT_SEC)
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "error":
                error = f'{msg["content"]["ename"]}: {msg["content"]["evalue"]}'
            if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                break
        if error:
            log("setup code failed in context", self.id, error)
        return error

    def apply_sandbox_env(self, token):
        """Puts the sandbox's environment (from the guest agent) into this kernel once."""
        if self.sandbox_env_applied:
            return
        request = urllib.request.Request(f"{GUEST_AGENT}/envs")
        if token:
            request.add_header("X-Access-Token", token)
        try:
            with urllib.request.urlopen(request, timeout=5) as r:
                env = json.load(r)
        except Exception as e:
            log("reading the sandbox's environment:", e)
            return
        if isinstance(env, dict) and env:
            env = {str(k): str(v) for k, v in env.items()}
            self.silent(f"__import__('os').environ.update({py_literal(env)})")
        self.sandbox_env_applied = True

    def execute(self, code, env_vars, token, emit):
        """Runs a cell, passing each protocol message to `emit` (which raises
        `ClientGone` when the client left: the cell is then interrupted)."""
        with self.lock:
            self.apply_sandbox_env(token)
            if env_vars:
                keys = py_literal(list(env_vars))
                self.silent(
                    "import os as __nestbox_os\n"
                    f"__nestbox_saved_env = {{k: __nestbox_os.environ.get(k) for k in {keys}}}\n"
                    f"__nestbox_os.environ.update({py_literal(env_vars)})"
                )
            try:
                self.run_cell(code, emit)
            finally:
                if env_vars:
                    self.silent(
                        "for __k, __v in __nestbox_saved_env.items():\n"
                        "    if __v is None: __nestbox_os.environ.pop(__k, None)\n"
                        "    else: __nestbox_os.environ[__k] = __v\n"
                        "del __nestbox_saved_env, __k, __v"
                    )

    def run_cell(self, code, emit):
        msg_id = self.kc.execute(code, store_history=True, allow_stdin=False, stop_on_error=True)
        errored = idle = False
        quiet = 0.0
        try:
            while not idle:
                try:
                    msg = self.kc.get_iopub_msg(timeout=POLL_SEC)
                except queue.Empty:
                    if not self.km.is_alive():
                        # The kernel died under the cell (os._exit, a crash, the OOM
                        # killer): the context starts afresh, and the cell says so.
                        self.revive()
                        emit(
                            {
                                "type": "error",
                                "name": "ContextRestarting",
                                "value": "The kernel died while the cell ran; the context was restarted",
                                "traceback": "",
                            }
                        )
                        emit({"type": "end_of_execution"})
                        return
                    quiet += POLL_SEC
                    if quiet >= KEEPALIVE_SEC:
                        quiet = 0.0
                        emit({"type": "keepalive"})
                    else:
                        emit(None)
                    continue
                if msg["parent_header"].get("msg_id") != msg_id:
                    continue
                quiet = 0.0
                kind, content = msg["msg_type"], msg["content"]
                if kind == "status" and content.get("execution_state") == "idle":
                    idle = True
                elif kind == "execute_input":
                    emit({"type": "number_of_executions", "execution_count": content.get("execution_count")})
                elif kind == "stream":
                    name = "stderr" if content.get("name") == "stderr" else "stdout"
                    date = msg["header"].get("date")
                    stamp = date.isoformat() if hasattr(date, "isoformat") else (date or now())
                    emit({"type": name, "text": content.get("text", ""), "timestamp": stamp})
                elif kind in ("execute_result", "display_data"):
                    emit(result(content.get("data", {}), kind == "execute_result"))
                elif kind == "error" and not errored:
                    errored = True
                    emit(
                        {
                            "type": "error",
                            "name": content.get("ename", ""),
                            "value": content.get("evalue", ""),
                            "traceback": "\n".join(content.get("traceback", [])),
                        }
                    )
            reply = self.shell_reply(msg_id)
            if reply == "abort" and not errored:
                emit({"type": "error", "name": "ExecutionAborted", "value": "Execution was aborted", "traceback": ""})
            emit({"type": "end_of_execution"})
        except ClientGone:
            if not idle:
                self.abandon(msg_id)

    def shell_reply(self, msg_id):
        while True:
            try:
                msg = self.kc.get_shell_msg(timeout=30)
            except queue.Empty:
                return None
            if msg["parent_header"].get("msg_id") == msg_id:
                return msg["content"].get("status")

    def abandon(self, msg_id):
        """The client left while its cell ran: stops the cell, and waits for the kernel to
        be idle again so the next cell starts clean."""
        log("client left; interrupting the cell in context", self.id)
        try:
            self.km.interrupt_kernel()
        except Exception as e:
            log("interrupting:", e)
        waited = 0
        while waited < ABANDON_WAIT_SEC:
            try:
                msg = self.kc.get_iopub_msg(timeout=1)
            except queue.Empty:
                waited += 1
                continue
            if (
                msg["parent_header"].get("msg_id") == msg_id
                and msg["msg_type"] == "status"
                and msg["content"].get("execution_state") == "idle"
            ):
                break
        self.shell_reply(msg_id)


def result(data, main):
    out = {"type": "result", "is_main_result": main}
    extra = {}
    for mime, value in data.items():
        field = FIELDS.get(mime)
        if field is None:
            extra[mime] = value
        else:
            out[field] = value
    text = out.get("text")
    if isinstance(text, str) and len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        out["text"] = text[1:-1]
    out["extra"] = extra
    return out


class Contexts:
    """Every context, in creation order, with the default one per language."""

    def __init__(self):
        self.lock = threading.Lock()
        self.all = {}
        self.defaults = {}
        self.ready = threading.Event()

    def language(self, raw):
        name = (raw or "python").strip().lower()
        name = ALIASES.get(name, name)
        if name not in LANGUAGES:
            supported = ", ".join(sorted(LANGUAGES))
            raise HttpError(400, f"language {raw!r} is not supported here (supported: {supported})")
        return name

    def create(self, language, cwd, warm=False):
        if not os.path.isdir(cwd):
            raise HttpError(400, f"the working directory {cwd} does not exist")
        ctx = Context(language, cwd, warm)
        try:
            ctx.start()
        except Exception as e:
            raise HttpError(400, f"starting a {language} kernel failed: {e}")
        with self.lock:
            self.all[ctx.id] = ctx
        return ctx

    def default(self, language):
        with self.lock:
            ctx = self.defaults.get(language)
        if ctx is not None:
            return ctx
        ctx = self.create(language, default_cwd(), warm=True)
        with self.lock:
            # Two first callers may race; the first one's kernel stays the default.
            if language in self.defaults:
                self.all.pop(ctx.id, None)
                threading.Thread(target=ctx.shutdown, daemon=True).start()
                return self.defaults[language]
            self.defaults[language] = ctx
            return ctx

    def get(self, id):
        with self.lock:
            ctx = self.all.get(id)
        if ctx is None:
            raise HttpError(404, f"Context {id} not found")
        return ctx

    def remove(self, id):
        with self.lock:
            ctx = self.all.pop(id, None)
            if ctx is None:
                raise HttpError(404, f"Context {id} not found")
            for lang, d in list(self.defaults.items()):
                if d is ctx:
                    del self.defaults[lang]
        ctx.shutdown()

    def list(self):
        with self.lock:
            return [c.describe() for c in self.all.values()]


def default_cwd():
    home = os.path.expanduser("~")
    return home if os.path.isdir(home) else "/"


CONTEXTS = Contexts()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "nestbox-code-interpreter"

    def log_message(self, fmt, *args):
        pass

    def route(self):
        path = urlsplit(self.path).path.rstrip("/") or "/"
        parts = [p for p in path.split("/") if p]
        method = self.command
        if method == "GET" and parts == ["health"]:
            if not CONTEXTS.ready.is_set():
                raise HttpError(503, "the default context is starting")
            return self.send_json(200, "OK")
        if method == "POST" and parts == ["execute"]:
            return self.execute()
        if parts[:1] == ["contexts"]:
            if method == "GET" and len(parts) == 1:
                return self.send_json(200, CONTEXTS.list())
            if method == "POST" and len(parts) == 1:
                body = self.body()
                language = CONTEXTS.language(body.get("language"))
                cwd = body.get("cwd") or default_cwd()
                if not isinstance(cwd, str):
                    raise HttpError(400, "cwd must be a string")
                return self.send_json(200, CONTEXTS.create(language, cwd).describe())
            if method == "POST" and len(parts) == 3 and parts[2] == "restart":
                CONTEXTS.get(parts[1]).restart()
                return self.send_json(200, None)
            if method == "DELETE" and len(parts) == 2:
                CONTEXTS.remove(parts[1])
                return self.send_json(200, None)
        raise HttpError(404, f"no route for {method} {path}")

    def body(self):
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            raise HttpError(400, "the request body is too large")
        raw = self.rfile.read(length) if length else b""
        if not raw.strip():
            return {}
        try:
            body = json.loads(raw)
        except ValueError as e:
            raise HttpError(400, f"the body is not JSON: {e}")
        if not isinstance(body, dict):
            raise HttpError(400, "the body must be a JSON object")
        return body

    def execute(self):
        body = self.body()
        code = body.get("code")
        if not isinstance(code, str):
            raise HttpError(400, "code must be a string")
        env_vars = body.get("env_vars") or {}
        if not isinstance(env_vars, dict):
            raise HttpError(400, "env_vars must be an object")
        env_vars = {str(k): str(v) for k, v in env_vars.items()}
        context_id, language = body.get("context_id"), body.get("language")
        if context_id and language:
            raise HttpError(400, "Only one of context_id or language can be provided")
        ctx = CONTEXTS.get(context_id) if context_id else CONTEXTS.default(CONTEXTS.language(language))
        token = self.headers.get("X-Access-Token")
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()

        def emit(message):
            # `None` only checks that the client is still there.
            if message is None:
                if self.peer_closed():
                    raise ClientGone()
                return
            line = (json.dumps(message, ensure_ascii=True) + "\n").encode()
            try:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                self.wfile.flush()
            except OSError:
                raise ClientGone()

        try:
            ctx.execute(code, env_vars, token, emit)
        except ClientGone:
            self.close_connection = True
            return
        except Exception as e:
            log("execution failed:", repr(e))
            try:
                emit({"type": "error", "name": type(e).__name__, "value": str(e), "traceback": ""})
            except ClientGone:
                self.close_connection = True
                return
        try:
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except OSError:
            self.close_connection = True

    def peer_closed(self):
        """Whether the client closed its side (it sends nothing while it waits)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def send_json(self, status, value):
        data = json.dumps(value).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def handle_one_request(self):
        # Wraps the standard dispatch so every route's failure becomes a plain-text answer.
        try:
            super().handle_one_request()
        except OSError:
            self.close_connection = True

    def dispatch(self):
        try:
            self.route()
        except HttpError as e:
            self.send_text(e.status, e.message)
        except Exception as e:
            log("request failed:", repr(e))
            self.send_text(500, str(e))

    def send_text(self, status, text):
        data = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_DELETE = dispatch


def main():
    server = ThreadingHTTPServer(("0.0.0.0", PORT), Handler)
    server.daemon_threads = True

    def warm():
        try:
            CONTEXTS.default("python")
            CONTEXTS.ready.set()
            log("ready on port", PORT)
        except Exception as e:
            log("starting the default context failed:", e)
            os._exit(1)

    threading.Thread(target=warm, daemon=True).start()
    server.serve_forever()


if __name__ == "__main__":
    main()
