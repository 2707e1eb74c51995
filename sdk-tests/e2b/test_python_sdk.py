"""The official `e2b` Python SDK, unchanged, against a kiln E2B listener.

Run by `sdk-tests/e2b/run` (which `.ci/run` calls): it starts `kiln serve
--e2b-listen` on real VMs and sets E2B_API_URL, E2B_SANDBOX_URL,
E2B_API_KEY, KILN_URL and KILN_ADMIN_KEY.
"""

import json
import os
import time
import urllib.request
import uuid

import httpx
import pytest
from e2b import (
    CommandExitException,
    FileType,
    NotFoundException,
    PtySize,
    Sandbox,
    SandboxQuery,
    SandboxState,
)

RUN = uuid.uuid4().hex[:12]


def kiln(method, path, body=None, key=None):
    request = urllib.request.Request(
        os.environ["KILN_URL"] + path,
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={
            "Authorization": "Bearer " + (key or os.environ["KILN_ADMIN_KEY"]),
            "Content-Type": "application/json",
        },
    )
    with urllib.request.urlopen(request) as answer:
        text = answer.read()
        return json.loads(text) if text else None


@pytest.fixture(scope="module")
def sbx():
    sandbox = Sandbox.create(
        timeout=600,
        metadata={"suite": "python", "run": RUN},
        envs={"KILN_GREETING": "hello from create"},
    )
    yield sandbox
    sandbox.kill()


@pytest.fixture(scope="module")
def other_key():
    made = kiln(
        "POST",
        "/api/v1/keys",
        {"name": "e2b-other", "scopes": ["write"], "tenant": "e2b-other-" + RUN},
    )
    return made["secret"]


def test_the_agent_script_prints_42(sbx):
    assert sbx.commands.run("python3 -c 'print(6*7)'").stdout == "42\n"


def test_a_sandbox_is_a_kiln_vm(sbx):
    vms = kiln("GET", "/api/v1/vms")["vms"]
    assert any(vm["id"] == sbx.sandbox_id for vm in vms)


def test_stdout_stderr_and_exit_codes(sbx):
    result = sbx.commands.run("echo out; echo err >&2")
    assert (result.stdout, result.stderr, result.exit_code) == ("out\n", "err\n", 0)
    with pytest.raises(CommandExitException) as failed:
        sbx.commands.run("echo partial; exit 3")
    assert failed.value.exit_code == 3
    assert failed.value.stdout == "partial\n"


def test_create_env_vars_merge_with_the_commands(sbx):
    assert sbx.commands.run("echo $KILN_GREETING").stdout == "hello from create\n"
    result = sbx.commands.run(
        "echo $KILN_GREETING/$EXTRA; pwd", envs={"EXTRA": "x", "KILN_GREETING": "over"}, cwd="/tmp"
    )
    assert result.stdout == "over/x\n/tmp\n"


def test_commands_run_as_the_default_user_or_root(sbx):
    assert sbx.commands.run("whoami").stdout == "user\n"
    assert sbx.commands.run("pwd").stdout == "/home/user\n"
    assert sbx.commands.run("whoami", user="root").stdout == "root\n"


def test_streaming_callbacks_see_output_as_it_comes(sbx):
    seen = []
    sbx.commands.run(
        "for i in 1 2 3; do echo $i; sleep 0.2; done; echo e >&2",
        on_stdout=lambda line: seen.append(("out", line, time.monotonic())),
        on_stderr=lambda line: seen.append(("err", line, time.monotonic())),
    )
    outs = [s for s in seen if s[0] == "out"]
    assert "".join(s[1] for s in outs) == "1\n2\n3\n"
    assert any(s[0] == "err" for s in seen)
    # Streamed, not delivered at the end in one piece.
    assert outs[-1][2] - outs[0][2] > 0.2


def test_background_command_is_listed_and_killed(sbx):
    handle = sbx.commands.run("sleep 300", background=True, timeout=0)
    pids = [p.pid for p in sbx.commands.list()]
    assert handle.pid in pids
    assert sbx.commands.kill(handle.pid) is True
    with pytest.raises(CommandExitException):
        handle.wait()
    deadline = time.time() + 10
    while handle.pid in [p.pid for p in sbx.commands.list()] and time.time() < deadline:
        time.sleep(0.1)
    assert handle.pid not in [p.pid for p in sbx.commands.list()]
    assert sbx.commands.kill(handle.pid) is False


def test_a_process_outlives_its_stream_and_can_be_reattached(sbx):
    handle = sbx.commands.run("sleep 1; echo later", background=True, timeout=0)
    handle.disconnect()
    again = sbx.commands.connect(handle.pid)
    assert again.wait().stdout == "later\n"


def test_send_stdin_and_close_it(sbx):
    handle = sbx.commands.run("read x; echo got:$x; cat", background=True, stdin=True)
    sbx.commands.send_stdin(handle.pid, "hello\n")
    sbx.commands.send_stdin(handle.pid, "rest\n")
    sbx.commands.close_stdin(handle.pid)
    assert handle.wait().stdout == "got:hello\nrest\n"


def test_a_pty(sbx):
    data = bytearray()
    handle = sbx.pty.create(PtySize(rows=24, cols=80))
    sbx.pty.resize(handle.pid, PtySize(rows=30, cols=100))
    sbx.pty.send_stdin(handle.pid, b"stty size; tty; exit 0\n")
    handle.wait(on_pty=data.extend)
    text = data.decode(errors="replace")
    assert "30 100" in text
    assert "/dev/pts/" in text


def test_files_text_bytes_and_ten_mib(sbx):
    sbx.files.write("/tmp/kiln-e2b/hello.txt", "hello, file")
    assert sbx.files.read("/tmp/kiln-e2b/hello.txt") == "hello, file"
    blob = bytes(range(256)) * 4
    sbx.files.write("/tmp/kiln-e2b/blob.bin", blob)
    assert bytes(sbx.files.read("/tmp/kiln-e2b/blob.bin", format="bytes")) == blob
    big = os.urandom(10 << 20)
    sbx.files.write("big.bin", big)
    assert bytes(sbx.files.read("/home/user/big.bin", format="bytes")) == big
    assert sbx.commands.run("stat -c %U /home/user/big.bin").stdout == "user\n"
    sbx.files.write_files(
        [
            {"path": "/tmp/kiln-e2b/many/a.txt", "data": "a"},
            {"path": "/tmp/kiln-e2b/many/b.txt", "data": "b"},
        ]
    )
    assert sbx.commands.run("cat /tmp/kiln-e2b/many/a.txt /tmp/kiln-e2b/many/b.txt").stdout == "ab"


def test_directories(sbx):
    base = "/tmp/kiln-dirs"
    assert sbx.files.make_dir(base + "/sub") is True
    assert sbx.files.make_dir(base + "/sub") is False
    sbx.files.write(base + "/f.txt", "x")
    entries = {e.name: e for e in sbx.files.list(base)}
    assert set(entries) == {"sub", "f.txt"}
    assert entries["sub"].type == FileType.DIR
    assert entries["f.txt"].type == FileType.FILE
    assert entries["f.txt"].size == 1
    assert sbx.files.exists(base + "/f.txt")
    assert not sbx.files.exists(base + "/nope")
    moved = sbx.files.rename(base + "/f.txt", base + "/sub/g.txt")
    assert moved.path == base + "/sub/g.txt"
    assert sbx.files.read(base + "/sub/g.txt") == "x"
    sbx.files.remove(base)
    assert not sbx.files.exists(base)
    with pytest.raises(Exception):
        sbx.files.read(base + "/sub/g.txt")


def test_watch_dir(sbx):
    sbx.files.make_dir("/tmp/kiln-watch")
    handle = sbx.files.watch_dir("/tmp/kiln-watch")
    sbx.files.write("/tmp/kiln-watch/new.txt", "1")
    events = []
    deadline = time.time() + 10
    while not events and time.time() < deadline:
        time.sleep(0.3)
        events = handle.get_new_events()
    handle.stop()
    assert any(e.name == "new.txt" and e.type.name == "CREATE" for e in events), events


def test_timeout_info_and_running(sbx):
    sbx.set_timeout(900)
    info = sbx.get_info()
    assert info.sandbox_id == sbx.sandbox_id
    assert info.metadata["run"] == RUN
    remaining = info.end_at.timestamp() - time.time()
    assert 800 < remaining <= 901
    assert sbx.is_running()


def test_list_by_metadata_with_paging(sbx):
    second = Sandbox.create(timeout=120, metadata={"suite": "python", "run": RUN})
    try:
        query = SandboxQuery(metadata={"run": RUN})
        pages = Sandbox.list(query=query, limit=1)
        seen = []
        while pages.has_next:
            items = pages.next_items()
            assert len(items) <= 1
            seen += [s.sandbox_id for s in items]
        assert sorted(seen) == sorted([sbx.sandbox_id, second.sandbox_id])
        nobody = Sandbox.list(query=SandboxQuery(metadata={"run": "no-such-" + RUN}))
        assert nobody.next_items() == []
    finally:
        second.kill()


def test_connect_by_id_from_a_second_client(sbx):
    again = Sandbox.connect(sbx.sandbox_id)
    again.files.write("/tmp/from-second", "2")
    assert sbx.files.read("/tmp/from-second") == "2"


def test_another_tenant_can_neither_see_nor_reach_it(sbx, other_key):
    with pytest.raises(Exception) as refused:
        Sandbox.connect(sbx.sandbox_id, api_key=other_key)
    assert "not found" in str(refused.value).lower()
    listed = Sandbox.list(query=SandboxQuery(metadata={"run": RUN}), api_key=other_key)
    assert listed.next_items() == []
    assert Sandbox.kill(sbx.sandbox_id, api_key=other_key) is False
    # envd without the sandbox's token.
    answer = httpx.get(
        os.environ["E2B_SANDBOX_URL"] + "/health",
        headers={"E2b-Sandbox-Id": sbx.sandbox_id, "X-Access-Token": "guess"},
    )
    assert answer.status_code == 401
    assert sbx.is_running()


def test_pause_and_resume_keep_files_and_processes():
    sandbox = Sandbox.create(timeout=300, metadata={"run": RUN, "pause": "yes"})
    try:
        sandbox.files.write("/tmp/kept.txt", "still here")
        counter = sandbox.commands.run(
            "while true; do echo tick >> /tmp/count; sleep 0.2; done",
            background=True,
            timeout=0,
        )
        time.sleep(1)
        assert sandbox.pause() is True
        assert sandbox.pause() is False
        info = Sandbox.get_info(sandbox.sandbox_id)
        assert info.state == SandboxState.PAUSED
        paused = Sandbox.list(query=SandboxQuery(metadata={"pause": "yes"}, state=[SandboxState.PAUSED]))
        assert [s.sandbox_id for s in paused.next_items()] == [sandbox.sandbox_id]
        resumed = Sandbox.connect(sandbox.sandbox_id)
        assert resumed.files.read("/tmp/kept.txt") == "still here"
        before = len(resumed.files.read("/tmp/count").split())
        time.sleep(1)
        assert len(resumed.files.read("/tmp/count").split()) > before, "the loop did not run on"
        assert counter.pid in [p.pid for p in resumed.commands.list()]
    finally:
        sandbox.kill()


def test_kill_ends_it(other_key):
    sandbox = Sandbox.create(timeout=60)
    assert sandbox.kill() is True
    assert not sandbox.is_running()
    assert Sandbox.kill(sandbox.sandbox_id) is False
    with pytest.raises(Exception) as gone:
        sandbox.commands.run("true")
    assert "not" in str(gone.value).lower()
    with pytest.raises(NotFoundException):
        Sandbox.connect(sandbox.sandbox_id)
