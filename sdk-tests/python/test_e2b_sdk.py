"""E2B's stock Python SDK against a real Nestbox: nothing here knows it is not E2B.

Run by the end-to-end test `e2e_e2b_sdk` with E2B_API_URL, E2B_API_KEY and E2B_SANDBOX_URL
pointing at a fresh `nestbox up`, and NESTBOX_OTHER_API_KEY: another team's key.
"""

import os
import time
import uuid

import pytest
from e2b import (
    AuthenticationException,
    CommandExitException,
    NotFoundException,
    Sandbox,
    SandboxException,
)
from e2b.sandbox.commands.command_handle import PtySize
from e2b.sandbox.sandbox_api import SandboxQuery
from e2b.sandbox.sandbox_api import SandboxState


def wait_for(what, check, timeout=120.0, every=0.25):
    """Polls `check` until it returns something truthy; fails after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(every)


@pytest.fixture(scope="module")
def sbx():
    s = Sandbox.create(metadata={"suite": "python"}, envs={"GREETING": "hi"}, timeout=900)
    yield s
    s.kill()


def info_or_none(sandbox_id):
    try:
        return Sandbox.get_info(sandbox_id)
    except NotFoundException:
        return None


def test_run_collected_streamed_and_failing(sbx):
    r = sbx.commands.run("echo $GREETING; echo err >&2")
    assert (r.exit_code, r.stdout, r.stderr) == (0, "hi\n", "err\n")

    chunks = []
    r = sbx.commands.run("for i in 1 2 3; do echo $i; done", on_stdout=chunks.append)
    assert "".join(chunks) == "1\n2\n3\n" == r.stdout

    with pytest.raises(CommandExitException) as failed:
        sbx.commands.run("echo oops >&2; exit 3")
    assert failed.value.exit_code == 3
    assert failed.value.stderr == "oops\n"

    r = sbx.commands.run("pwd; echo $X", cwd="/tmp", envs={"X": "per-command"})
    assert r.stdout == "/tmp\nper-command\n"


def test_background_list_kill_and_stdin(sbx):
    sleeper = sbx.commands.run("sleep 600", background=True)
    assert any(p.pid == sleeper.pid for p in sbx.commands.list())
    assert sbx.commands.kill(sleeper.pid)
    wait_for("the killed process to go", lambda: all(p.pid != sleeper.pid for p in sbx.commands.list()))
    assert not sbx.commands.kill(sleeper.pid)

    cat = sbx.commands.run("cat", background=True, stdin=True)
    sbx.commands.send_stdin(cat.pid, "hello from stdin\n")
    sbx.commands.close_stdin(cat.pid)
    assert cat.wait().stdout == "hello from stdin\n"

    # Reconnecting to a running process gets its later output.
    ticker = sbx.commands.run("sleep 1; echo tick; sleep 600", background=True)
    again = sbx.commands.connect(ticker.pid)
    seen = []
    with pytest.raises(CommandExitException):
        again.wait(on_stdout=lambda d: (seen.append(d), "tick" in "".join(seen) and sbx.commands.kill(ticker.pid)))
    assert "tick" in "".join(seen)


def test_pty(sbx):
    out = bytearray()
    term = sbx.pty.create(PtySize(rows=24, cols=80))
    sbx.pty.resize(term.pid, PtySize(rows=40, cols=132))
    sbx.pty.send_stdin(term.pid, b"stty size; echo pty-$((40+2)); exit\n")
    term.wait(on_pty=out.extend)
    text = out.decode(errors="replace")
    assert "40 132" in text
    assert "pty-42" in text

    idle = sbx.pty.create(PtySize(rows=24, cols=80))
    assert sbx.pty.kill(idle.pid)


def test_files(sbx):
    info = sbx.files.write("/tmp/sdk/a/b.txt", "content")
    assert info.path == "/tmp/sdk/a/b.txt"
    assert sbx.files.read("/tmp/sdk/a/b.txt") == "content"
    assert sbx.files.exists("/tmp/sdk/a/b.txt")
    assert sbx.files.get_info("/tmp/sdk/a/b.txt").size == len("content")

    assert sbx.files.make_dir("/tmp/sdk/d")
    assert not sbx.files.make_dir("/tmp/sdk/d")
    names = sorted(e.name for e in sbx.files.list("/tmp/sdk"))
    assert names == ["a", "d"]
    deep = sorted(e.path for e in sbx.files.list("/tmp/sdk", depth=3))
    assert "/tmp/sdk/a/b.txt" in deep

    moved = sbx.files.rename("/tmp/sdk/a/b.txt", "/tmp/sdk/c.txt")
    assert moved.path == "/tmp/sdk/c.txt"
    assert not sbx.files.exists("/tmp/sdk/a/b.txt")
    sbx.files.remove("/tmp/sdk/c.txt")
    assert not sbx.files.exists("/tmp/sdk/c.txt")

    written = sbx.files.write_files(
        [{"path": "/tmp/sdk/m/1.txt", "data": "one"}, {"path": "/tmp/sdk/m/2.txt", "data": b"two"}]
    )
    assert sorted(w.path for w in written) == ["/tmp/sdk/m/1.txt", "/tmp/sdk/m/2.txt"]
    assert sbx.files.read("/tmp/sdk/m/2.txt") == "two"

    from e2b import FileNotFoundException

    with pytest.raises(FileNotFoundException):
        sbx.files.read("/tmp/sdk/nope")


def test_gzip_octet_stream_and_metadata(sbx):
    import io

    data = os.urandom(1 << 20) + b"tail"
    info = sbx.files.write(
        "/home/user/meta/packed.bin", data, gzip=True, metadata={"Owner": "alice", "build": "7"}
    )
    assert info.metadata == {"owner": "alice", "build": "7"}
    assert sbx.files.read("/home/user/meta/packed.bin", format="bytes", gzip=True) == data
    assert sbx.files.read("/home/user/meta/packed.bin", format="bytes") == data
    assert sbx.files.get_info("/home/user/meta/packed.bin").metadata == {"owner": "alice", "build": "7"}
    listed = {e.name: e.metadata for e in sbx.files.list("/home/user/meta")}
    assert listed == {"packed.bin": {"owner": "alice", "build": "7"}}
    # A file-like object goes as a streamed octet-stream upload.
    sbx.files.write("/home/user/meta/streamed.txt", io.BytesIO(b"streamed"))
    assert sbx.files.read("/home/user/meta/streamed.txt") == "streamed"
    assert sbx.files.get_info("/home/user/meta/streamed.txt").metadata is None
    # Entries in watch events.
    sbx.files.make_dir("/home/user/meta/w")
    handle = sbx.files.watch_dir("/home/user/meta/w", include_entry=True)
    sbx.files.write("/home/user/meta/w/e.txt", "12345")
    events = []
    entry = wait_for(
        "an event with its entry",
        lambda: events.extend(handle.get_new_events())
        or next((e.entry for e in events if e.name == "e.txt" and e.entry and e.entry.size == 5), None),
    )
    assert entry.path == "/home/user/meta/w/e.txt"
    handle.stop()


def test_fifty_mib_round_trip_is_byte_exact(sbx):
    data = os.urandom(50 << 20)
    sbx.files.write("/tmp/big.bin", data)
    assert sbx.files.read("/tmp/big.bin", format="bytes") == data
    r = sbx.commands.run("stat -c %s /tmp/big.bin")
    assert r.stdout.strip() == str(50 << 20)


def test_watch_dir(sbx):
    sbx.files.make_dir("/tmp/watched")
    handle = sbx.files.watch_dir("/tmp/watched")
    sbx.files.write("/tmp/watched/new.txt", "x")
    events = []
    wait_for("a watch event", lambda: events.extend(handle.get_new_events()) or any(e.name == "new.txt" for e in events))
    handle.stop()


def test_list_filters_and_paging():
    run = uuid.uuid4().hex[:12]
    made = [Sandbox.create(metadata={"run": run, "n": str(i)}, timeout=600) for i in range(3)]
    try:
        made[2].pause()
        query = SandboxQuery(metadata={"run": run})
        pager = Sandbox.list(query=query, limit=2)
        first = pager.next_items()
        assert len(first) == 2 and pager.has_next
        second = pager.next_items()
        assert len(second) == 1 and not pager.has_next
        ids = {s.sandbox_id for s in first + second}
        assert ids == {s.sandbox_id for s in made}

        paused = Sandbox.list(query=SandboxQuery(metadata={"run": run}, state=[SandboxState.PAUSED])).next_items()
        assert [s.sandbox_id for s in paused] == [made[2].sandbox_id]
        one = Sandbox.list(query=SandboxQuery(metadata={"run": run, "n": "1"})).next_items()
        assert [s.sandbox_id for s in one] == [made[1].sandbox_id]
        assert one[0].metadata == {"run": run, "n": "1"}
        assert one[0].cpu_count >= 1 and one[0].memory_mb >= 128
    finally:
        for s in made:
            s.kill()


def test_pause_resume_connect_keep_processes_and_tmpfs():
    s = Sandbox.create(timeout=600)
    try:
        s.commands.run("mount -t tmpfs tmpfs /mnt && echo kept > /mnt/f")
        counter = s.commands.run(
            "i=0; while true; do i=$((i+1)); echo $i > /tmp/n.tmp; mv /tmp/n.tmp /tmp/n; sleep 0.2; done",
            background=True,
        )
        before = int(wait_for("the counter to start", lambda: s.files.exists("/tmp/n") and s.files.read("/tmp/n").strip()))
        assert s.pause()
        assert not s.pause(), "pausing a paused sandbox says so"
        assert Sandbox.get_info(s.sandbox_id).state == SandboxState.PAUSED
        again = Sandbox.connect(s.sandbox_id)
        assert Sandbox.get_info(s.sandbox_id).state == SandboxState.RUNNING
        assert again.files.read("/mnt/f") == "kept\n"
        assert any(p.pid == counter.pid for p in again.commands.list())
        wait_for("the counter to go on", lambda: int(again.files.read("/tmp/n")) > before)
        # Connecting to a running sandbox just extends it.
        assert Sandbox.connect(s.sandbox_id, timeout=900).sandbox_id == s.sandbox_id
    finally:
        s.kill()


def test_set_timeout_and_kill_on_deadline():
    s = Sandbox.create(timeout=600)
    end = Sandbox.get_info(s.sandbox_id).end_at
    s.set_timeout(3)
    assert Sandbox.get_info(s.sandbox_id).end_at < end
    wait_for("the sandbox to be killed at its deadline", lambda: info_or_none(s.sandbox_id) is None)
    assert not s.kill(), "killing a killed sandbox says so"


def test_auto_pause_on_deadline_then_connect():
    s = Sandbox.create(timeout=4, lifecycle={"on_timeout": "pause"})
    s.commands.run("echo before > /tmp/state")
    wait_for(
        "the sandbox to pause at its deadline",
        lambda: (i := info_or_none(s.sandbox_id)) is not None and i.state == SandboxState.PAUSED,
    )
    back = Sandbox.connect(s.sandbox_id, timeout=600)
    try:
        assert back.files.read("/tmp/state") == "before\n"
        assert back.commands.run("echo alive").stdout == "alive\n"
        assert Sandbox.get_info(s.sandbox_id).state == SandboxState.RUNNING
    finally:
        back.kill()


def test_metrics(sbx):
    sbx.commands.run("head -c 20000000 /dev/urandom | sha256sum >/dev/null")
    metrics = wait_for("metrics samples", lambda: sbx.get_metrics())
    m = metrics[-1]
    assert m.cpu_count >= 1
    assert m.mem_total > 0 and 0 < m.mem_used
    assert m.disk_total > 0


def test_logs_through_the_sdks_api_client(sbx):
    # The SDK's high-level classes have no logs call; its generated API client does.
    from e2b.api.client.api.sandboxes import (
        get_sandboxes_sandbox_id_logs,
        get_v_2_sandboxes_sandbox_id_logs,
    )
    from e2b.api.client.models import LogLevel, LogsDirection, SandboxLogs, SandboxLogsV2Response
    from e2b.api.client_sync import get_api_client
    from e2b.connection_config import ConnectionConfig

    marker = f"sdk-log-{uuid.uuid4().hex[:8]}"
    sbx.commands.run(f"echo {marker} > /dev/console", user="root")
    api = get_api_client(ConnectionConfig())

    def v2(**params):
        res = get_v_2_sandboxes_sandbox_id_logs.sync(sbx.sandbox_id, client=api, **params)
        assert isinstance(res, SandboxLogsV2Response), res
        return res.logs

    entry = wait_for(
        "the marker in the log",
        lambda: next((e for e in v2(search=marker) if e.message == marker), None),
    )
    assert entry.level == LogLevel.INFO
    assert entry.fields["source"] == "console"
    newest = v2(direction=LogsDirection.BACKWARD, limit=5)
    assert len(newest) == 5
    assert all(a.timestamp >= b.timestamp for a, b in zip(newest, newest[1:])), "newest first"
    assert all(e.timestamp.timestamp() * 1000 >= int(entry.timestamp.timestamp() * 1000)
               for e in v2(cursor=int(entry.timestamp.timestamp() * 1000)))
    assert all(e.level in (LogLevel.WARN, LogLevel.ERROR) for e in v2(level=LogLevel.WARN))

    v1 = get_sandboxes_sandbox_id_logs.sync(sbx.sandbox_id, client=api, start=0, limit=1000)
    assert isinstance(v1, SandboxLogs), v1
    assert any(line.line == marker for line in v1.logs)
    assert [line.line for line in v1.logs] == [e.message for e in v1.log_entries]

    other = get_api_client(ConnectionConfig(api_key=os.environ["NESTBOX_OTHER_API_KEY"]))
    res = get_v_2_sandboxes_sandbox_id_logs.sync_detailed(sbx.sandbox_id, client=other)
    assert res.status_code == 404


def test_snapshots(sbx):
    sbx.files.write("/home/user/from-snapshot.txt", "snapshot data")
    snap = sbx.create_snapshot()
    assert snap.snapshot_id
    child = Sandbox.create(template=snap.snapshot_id, timeout=600)
    try:
        assert child.files.read("/home/user/from-snapshot.txt") == "snapshot data"
        assert child.sandbox_id != sbx.sandbox_id
    finally:
        child.kill()
    assert Sandbox.delete_snapshot(snap.snapshot_id)
    assert not Sandbox.delete_snapshot(snap.snapshot_id)


def test_another_team_gets_not_found_and_a_wrong_key_is_refused(sbx):
    other = os.environ["NESTBOX_OTHER_API_KEY"]
    with pytest.raises(NotFoundException):
        Sandbox.get_info(sbx.sandbox_id, api_key=other)
    with pytest.raises(NotFoundException):
        Sandbox.connect(sbx.sandbox_id, api_key=other)
    assert not Sandbox.kill(sbx.sandbox_id, api_key=other)
    assert sbx.commands.run("true").exit_code == 0, "still alive for its own team"
    ids = [s.sandbox_id for s in Sandbox.list(api_key=other).next_items()]
    assert sbx.sandbox_id not in ids

    with pytest.raises(AuthenticationException):
        Sandbox.create(api_key="e2b_not-a-key")
    with pytest.raises(AuthenticationException):
        Sandbox.list(api_key="e2b_not-a-key").next_items()


def test_bad_input_is_a_clear_error():
    with pytest.raises(SandboxException) as e:
        Sandbox.create(template="no-such-template")
    assert "404" in str(e.value) and "no-such-template" in str(e.value)
    with pytest.raises(SandboxException) as e:
        Sandbox.create(timeout=10**9)
    assert "400" in str(e.value)


def test_fork_copies_diverge_independently():
    src = Sandbox.create(timeout=600)
    try:
        src.commands.run("echo original > /tmp/state; mount -t tmpfs tmpfs /mnt && echo mem > /mnt/m")
        sleeper = src.commands.run("sleep 3600", background=True)
        forks = src.fork(count=3, timeout=600)
        assert len(forks) == 3
        for f in forks:
            assert isinstance(f, Sandbox), f
        try:
            ids = {f.sandbox_id for f in forks} | {src.sandbox_id}
            assert len(ids) == 4, "each fork has its own id"
            for i, f in enumerate(forks):
                assert f.files.read("/tmp/state") == "original\n"
                assert f.files.read("/mnt/m") == "mem\n", "memory (tmpfs) came along"
                assert any(p.pid == sleeper.pid for p in f.commands.list()), "processes came along"
                f.commands.run(f"echo fork-{i} > /tmp/state")
            for i, f in enumerate(forks):
                assert f.files.read("/tmp/state") == f"fork-{i}\n", "forks diverge"
            assert src.files.read("/tmp/state") == "original\n", "the source is untouched"
            hostnames = {f.commands.run("hostname").stdout for f in forks}
            assert len(hostnames) == 3
            randoms = {f.commands.run("head -c 16 /dev/urandom | od -An -tx1").stdout for f in forks}
            assert len(randoms) == 3
        finally:
            for f in forks:
                f.kill()
    finally:
        src.kill()


# The test internet the end-to-end test runs: web servers on port 8080 at the addresses of
# allowed.test, other.test and one more (OPEN), and the DNS server the host resolves with.
ALLOWED = os.environ.get("NESTBOX_TEST_IP_ALLOWED", "")
OTHER = os.environ.get("NESTBOX_TEST_IP_OTHER", "")
OPEN = os.environ.get("NESTBOX_TEST_IP_OPEN", "")


def reach(s, host, port=8080):
    """OPEN or CLOSED: whether the sandbox opens a TCP connection to host:port."""
    cmd = f"timeout 3 bash -c 'exec 3<>/dev/tcp/{host}/{port}' 2>/dev/null && echo OPEN || echo CLOSED"
    return s.commands.run(cmd).stdout.strip()


def resolve(s, name):
    return s.commands.run(f"getent hosts {name} | cut -d' ' -f1 || true").stdout.strip()


@pytest.mark.skipif(not ALLOWED, reason="needs the test internet (NESTBOX_TEST_IP_*)")
def test_egress_allow_and_deny_by_address_and_domain():
    from e2b.sandbox.network import ALL_TRAFFIC

    s = Sandbox.create(
        timeout=600,
        network={"allow_out": ["allowed.test", OPEN], "deny_out": [ALL_TRAFFIC]},
    )
    try:
        # A domain rule: the name resolves and its address is reachable; nothing else is.
        assert resolve(s, "allowed.test") == ALLOWED
        assert reach(s, "allowed.test") == "OPEN"
        assert resolve(s, "other.test") == ""
        assert reach(s, OTHER) == "CLOSED"
        # A CIDR rule.
        assert reach(s, OPEN) == "OPEN"
        info = Sandbox.get_info(s.sandbox_id)
        assert info.allow_internet_access is False

        # Replaced on the running sandbox: open by default, one address denied.
        s.update_network({"deny_out": [f"{OTHER}/32"]})
        assert resolve(s, "other.test") == OTHER
        assert reach(s, "other.test") == "CLOSED"
        assert reach(s, ALLOWED) == "OPEN"
        # And closed again.
        s.update_network({"allow_internet_access": False})
        assert reach(s, ALLOWED) == "CLOSED"
    finally:
        s.kill()

    closed = Sandbox.create(timeout=600, allow_internet_access=False)
    try:
        assert reach(closed, ALLOWED) == "CLOSED"
        assert resolve(closed, "allowed.test") == ""
    finally:
        closed.kill()


def test_auto_resume_on_traffic():
    s = Sandbox.create(timeout=600, lifecycle={"on_timeout": "pause", "auto_resume": True})
    try:
        s.commands.run("echo kept > /tmp/state")
        s.pause()
        assert Sandbox.get_info(s.sandbox_id).state == SandboxState.PAUSED
        # The next request to the sandbox resumes it; nothing else is needed.
        assert s.files.read("/tmp/state") == "kept\n"
        assert Sandbox.get_info(s.sandbox_id).state == SandboxState.RUNNING
        assert s.commands.run("echo hi").stdout == "hi\n"
    finally:
        s.kill()


def test_template_sdk_builds_a_template_its_sandboxes_start_from(tmp_path):
    """E2B's Template SDK: files uploaded by hash, steps, a start command left serving."""
    from e2b import BuildException, Template, wait_for_port

    ctx = tmp_path / "ctx"
    (ctx / "app" / "sub").mkdir(parents=True)
    (ctx / "app" / "index.html").write_text("<h1>from the template sdk</h1>\n")
    (ctx / "app" / "sub" / "b.txt").write_text("nested\n")
    (ctx / "motd.txt").write_text("single file\n")
    name = f"sdk-py-{uuid.uuid4().hex[:8]}"
    template = (
        Template(file_context_path=str(ctx))
        .from_python_image("3.11")
        .copy("app/", "/srv/app")
        .copy("motd.txt", "/etc/motd.txt", user="root", mode=0o640)
        .set_envs({"GREETING": "from-the-template"})
        .run_cmd("echo built as $(id -un) in $(pwd) > /srv/app/built.txt")
        .set_workdir("/srv/app")
        .set_start_cmd("python3 -m http.server 8000", wait_for_port(8000))
    )
    logs = []
    info = Template.build(template, name, cpu_count=1, memory_mb=512, on_build_logs=logs.append)
    assert info.name == name and info.template_id == name
    assert any("python3 -m http.server" in entry.message for entry in logs), logs
    assert Template.exists(name)

    sbx = Sandbox.create(name, timeout=300)
    try:
        run = lambda cmd: sbx.commands.run(cmd).stdout
        # Steps ran as E2B's default user in its home; files landed where COPY said.
        assert run("cat /srv/app/built.txt").strip() == "built as user in /home/user"
        assert run("cat /srv/app/sub/b.txt").strip() == "nested"
        assert run("stat -c '%U %a' /etc/motd.txt /srv/app/index.html") == "root 640\nuser 644\n"
        assert run("echo $GREETING").strip() == "from-the-template"
        # The start command is already serving (and the base has E2B's tools).
        assert "from the template sdk" in run("curl -s http://127.0.0.1:8000/index.html")
        assert "http.server" in run("ps -eo args")
    finally:
        sbx.kill()

    # A failing step fails the build with the SDK's exception, naming it.
    broken = Template().from_template("minimal").run_cmd("echo going wrong >&2; exit 3")
    with pytest.raises(BuildException) as failed:
        Template.build(broken, f"{name}-broken")
    assert "exit code 3" in str(failed.value), failed.value


def test_template_tags_pick_the_build_a_sandbox_starts_from():
    """E2B's template tags: `name:tag` builds, tags listed, assigned and removed, sandboxes
    from `name:tag`; and `from_node_image()` without a registry."""
    from e2b import Template

    name = f"sdk-tags-{uuid.uuid4().hex[:8]}"

    def version(text):
        return Template().from_template("minimal").run_cmd(f"echo {text} > /home/user/version.txt")

    def version_in(reference):
        sbx = Sandbox.create(reference, timeout=120)
        try:
            return sbx.commands.run("cat /home/user/version.txt").stdout.strip()
        finally:
            sbx.kill()

    first = Template.build(version("one"), name, cpu_count=1, memory_mb=512)
    # From `node:lts`: our `node` template, no registry involved.
    on_node = Template().from_node_image().run_cmd(
        """node -e 'console.log("two")' > /home/user/version.txt"""
    )
    second = Template.build(on_node, f"{name}:v2", cpu_count=1, memory_mb=512)
    assert second.tags == ["v2"]
    assert Template.exists(name)
    assert version_in(name) == "one", "a tagged build leaves the name as it was"
    assert version_in(f"{name}:v2") == "two"
    assert {t.tag: t.build_id for t in Template.get_tags(name)} == {
        "default": first.build_id,
        "v2": second.build_id,
    }

    # `default` moved to v2's build: the name is that build now.
    info = Template.assign_tags(f"{name}:v2", ["default", "stable"])
    assert info.build_id == second.build_id
    assert sorted(info.tags) == ["default", "stable"]
    assert version_in(name) == "two"

    Template.remove_tags(name, "v2")
    assert sorted(t.tag for t in Template.get_tags(name)) == ["default", "stable"]
    assert version_in(f"{name}:stable") == "two"
    with pytest.raises(Exception) as gone:
        Sandbox.create(f"{name}:v2", timeout=60)
    assert "not found" in str(gone.value).lower(), gone.value
