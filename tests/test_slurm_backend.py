"""The Slurm backend without a cluster: the job script as text, the sbatch command line, and how
poll() reads Slurm's answers (fake squeue/scontrol on PATH). The real cluster: test_slurm_gateway.py."""

from __future__ import annotations

import os
import re
import stat
import subprocess
from pathlib import Path

import pytest

from gateway.backends import make_backend
from gateway.backends.base import Status
from gateway.backends.slurm import SlurmBackend
from gateway.backends.slurm_client import JobQueue
from gateway.backends.slurm_job import parse_report, render_job_script, sbatch_argv, slurm_duration
from gateway.backends.desktop import session_environment
from gateway.backends.xauth import xauthority_bytes, xauthority_shell
from gateway.model.config import parse_config
from gateway.common.render import UnsafeValue, render
from gateway.model.tokens import Account

PASSWORD = "s3cretPw"


def account(name: str = "ws01", host: str = "auto", port: int = 5901) -> Account:
    return Account(name, host, f"/desktop/{name}", 6001, port, PASSWORD, 1)


def config(text: str = ""):
    return parse_config("backend: slurm\n" + text)


def script(cfg=None, acct=None, **paths: str) -> str:
    values = {"home": "/shared/ws01/home", "workdir": "/shared/ws01", "secret_file": "/shared/ws01/.vnc-secret"}
    values.update(paths)
    return render_job_script(cfg or config(), acct or account(), **values)


def line_with(text: str, needle: str) -> str:
    (line,) = [line for line in text.splitlines() if needle in line]
    return line


def test_job_script_runtime_none() -> None:
    text = script()
    assert text.startswith("#!/bin/bash\n")
    assert PASSWORD not in text
    assert "export PATH=/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin\n" in text
    assert "export HOME=/shared/ws01/home\n" in text
    assert 'export XDG_RUNTIME_DIR="${TMPDIR:-/tmp}/workshop-desktop-$(id -u)-$job"' in text
    assert "umask 077\n" in text
    # The password reaches vncpasswd on stdin from the secret file.
    assert 'vncpasswd -f <"$secret" >"$passwd_file.tmp"' in text
    assert "secret=/shared/ws01/.vnc-secret\n" in text
    xvnc = line_with(text, "-rfbport")
    assert xvnc.startswith("Xvnc -auth \"$XAUTHORITY\" -displayfd 3 -rfbport 5901 -rfbauth \"$passwd_file\" "
                           "-SecurityTypes VncAuth -UseBlacklist=0 -interface \"$listen_address\" ")
    # slurm.interface: auto, the default: the node's own address in Slurm, worked out on the node.
    assert "listen_address=$(node_address) || exit 1\n" in text and "node_address() {" in text
    # The X cookie comes from builtins and head, never a command line, and is the job's user's alone.
    assert 'export XAUTHORITY="$XDG_RUNTIME_DIR/Xauthority"' in text and "head -c 16 /dev/urandom" in text
    assert xvnc.endswith(' 3>"$display_file" &')
    session = line_with(text, "desktop-session")
    assert session.strip().endswith("containers/desktop-session &")
    assert "report=\"$workdir/report-$job\"" in text
    result = subprocess.run(["bash", "-n"], input=text, text=True, capture_output=True)
    assert result.returncode == 0, result.stderr


def test_job_script_options_reach_xvnc() -> None:
    text = script(config("slurm:\n  interface: 127.0.0.1\ndesktop:\n  geometry: 1600x900\n  keyboard_layout: de\n"),
                  account(port=5999))
    xvnc = line_with(text, "-rfbport")
    assert "-rfbport 5999" in xvnc and '-interface "$listen_address"' in xvnc and "-geometry 1600x900" in xvnc
    assert "\nlisten_address=127.0.0.1\n" in text and "node_address" not in text  # as given, nothing looked up
    assert "export GATEWAY_KEYBOARD_LAYOUT=de\n" in text


def test_job_script_singularity_exec_lines() -> None:
    cfg = config("container:\n  runtime: singularity\n  image: /images/desktop.sif\n"
                 "  binds: [/home, '/scratch:/scratch:rw', '/opt/modules:/opt/modules:ro']\n"
                 "desktop:\n  session: [/opt/desktop/desktop-session]\n")
    text = script(cfg)
    binds = "--bind /home --bind /scratch:/scratch:rw --bind /opt/modules:/opt/modules:ro"
    assert f'singularity exec {binds} /images/desktop.sif vncpasswd -f <"$secret"' in text
    assert line_with(text, "-rfbport").strip().startswith(
        f'singularity exec {binds} /images/desktop.sif Xvnc -auth "$XAUTHORITY" -displayfd 3 -rfbport 5901 -rfbauth "$passwd_file"')
    assert f"singularity exec {binds} /images/desktop.sif /opt/desktop/desktop-session &" in text
    apptainer = script(config("container:\n  runtime: apptainer\n  image: /i.sif\n"))
    assert "apptainer exec /i.sif Xvnc -auth \"$XAUTHORITY\" -displayfd 3" in apptainer
    assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0


EVIL = [
    "/shared/$(touch /tmp/pwned-gateway)/x",
    "/shared/`id`/x",
    "/shared/a'b\"c; rm -rf / #",
    "/shared/with space/$HOME/*",
]


@pytest.mark.parametrize("evil", EVIL)
def test_paths_cannot_inject_commands(evil: str, tmp_path: Path) -> None:
    text = script(workdir=evil, home=evil + "/home", secret_file=evil + "/.s",
                  cfg=config("desktop:\n  session: ['/opt/x y/session', '--name=$(reboot)']\n"))
    # Evaluate just the assignments in bash: each variable holds the path as given, nothing ran.
    assignments = "\n".join(line for line in text.splitlines()
                            if re.match(r"(export HOME|workdir|secret)=", line))
    probe = assignments + '\nprintf "%s\\n%s\\n%s\\n" "$HOME" "$workdir" "$secret"\n'
    result = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, cwd=tmp_path)
    assert result.stdout.splitlines() == [evil + "/home", evil, evil + "/.s"]
    assert not Path("/tmp/pwned-gateway").exists()
    session = line_with(text, "/opt/x y/session")
    assert session.strip() == "'/opt/x y/session' '--name=$(reboot)' &"


def test_newlines_are_refused() -> None:
    with pytest.raises(UnsafeValue):
        script(workdir="/shared/x\nreboot")


def test_job_exports_the_one_session_environment(tmp_path: Path) -> None:
    """The job script's exports are session_environment's, with the job's own values computed by bash."""
    text = script(config("desktop:\n  keyboard_layout: de\n"))
    exports = "\n".join(line for line in text.splitlines() if line.startswith("export "))
    result = subprocess.run(["bash", "-c", "job=42\n" + exports + "\nenv -0"], capture_output=True, text=True,
                            env={"TMPDIR": str(tmp_path)}, check=True)
    env = dict(item.split("=", 1) for item in result.stdout.split("\0") if "=" in item)
    user = subprocess.run(["id", "-un"], capture_output=True, text=True, check=True).stdout.strip()
    runtime_dir = f"{tmp_path}/workshop-desktop-{os.getuid()}-42"
    expected = session_environment(home="/shared/ws01/home", runtime_dir=runtime_dir,
                                   xauthority=f"{runtime_dir}/Xauthority", keyboard_layout="de", user=user)
    assert {name: env.get(name) for name in expected} == expected


def test_the_shell_writes_the_same_xauthority_as_python(tmp_path: Path) -> None:
    target = tmp_path / "Xauthority"
    subprocess.run(["sh", "-c", xauthority_shell('"$1"'), "sh", str(target)], check=True)
    written = target.read_bytes()
    assert len(written) == len(xauthority_bytes(bytes(16)))
    assert written[:-16] == xauthority_bytes(bytes(16))[:-16] and written[-16:] != bytes(16)
    assert xauthority_shell('"$XAUTHORITY"') in script()  # the job script writes it so too


async def test_a_refresh_rewrites_the_secret_the_running_job_reads(tmp_path: Path) -> None:
    """The job makes its password file again from the secret (desktop-job.sh.j2): the refresh writes the
    secret the job was given, 0600, with the account's current view-only password."""
    from gateway.model.viewonly import rotate_view_only_password, view_only_password, vncpasswd_input

    backend = SlurmBackend(config("slurm:\n  run_as: gateway\n"), tmp_path)
    workdir = tmp_path / "elsewhere" / "ws01"  # the job's own record, not where the config now points
    workdir.mkdir(parents=True, mode=0o700)
    state = {"job_id": 7, "user": None, "workdir": str(workdir)}
    before = view_only_password(tmp_path, "ws01")
    rotate_view_only_password(tmp_path, "ws01")
    await backend.refresh_passwords(account(), state)
    secret = workdir / ".vnc-secret"
    assert secret.read_bytes() == vncpasswd_input(PASSWORD, view_only_password(tmp_path, "ws01"))
    assert before not in secret.read_text() and stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert 'secret_digest' in script() and 'watch_secret "$seen" &' in script()


def test_sbatch_argv() -> None:
    cfg = config("slurm:\n  partition: desktop\n  account: course1\n  qos: short\n  time_limit_s: 5400\n"
                 "  cpus_per_desktop: 2\n  mem_per_desktop: 3G\n  job_name_prefix: ws24\n"
                 "  extra_sbatch_args: ['--gres=gpu:1', --exclusive]\n")
    argv = sbatch_argv(cfg, account(), reservation="ws24-event-1", workdir="/shared/ws01")
    assert argv[:2] == ["sbatch", "--parsable"]
    for option in ("--job-name=ws24-ws01", "--time=0-01:30:00", "--cpus-per-task=2", "--mem=3G",
                   "--chdir=/shared/ws01", "--output=/shared/ws01/job-%j.out", "--export=NONE",
                   "--reservation=ws24-event-1", "--partition=desktop", "--account=course1", "--qos=short"):
        assert option in argv
    assert argv[-2:] == ["--gres=gpu:1", "--exclusive"]
    assert not any(a.startswith("--nodelist") for a in argv)
    assert PASSWORD not in " ".join(argv)
    pinned = sbatch_argv(config(), account(host="node07"), reservation=None, workdir="/w")
    assert "--nodelist=node07" in pinned
    assert not any(a.startswith(("--reservation", "--mem", "--partition")) for a in pinned)
    assert "--time=0-12:00:00" in pinned  # always a time limit


def test_slurm_duration_and_report() -> None:
    assert slurm_duration(59) == "0-00:00:59"
    assert slurm_duration(90061) == "1-01:01:01"
    assert parse_report("job=12\nnode=vm\nhost=vm\nport=5901\ndisplay=3\n") == {
        "job": "12", "node": "vm", "host": "vm", "port": "5901", "display": "3"}


def test_config_blocks_are_validated() -> None:
    from gateway.model.errors import InputError

    with pytest.raises(InputError) as info:
        parse_config("backend: slurm\nslurm:\n  partition: 'a b'\n  mem_per_desktop: lots\n  run_as: nobody\n"
                     "  extra_sbatch_args: ['rm -rf']\ncontainer:\n  runtime: apptainer\n  binds: [relative]\n")
    text = "\n".join(str(p) for p in info.value.problems)
    assert "slurm.run_as must be one of: gateway, account" in text
    with pytest.raises(InputError) as info:
        parse_config("slurm:\n  partition: 'a b'\n  mem_per_desktop: lots\n  extra_sbatch_args: ['rm -rf']\n"
                     "container:\n  runtime: apptainer\n  binds: [relative]\n")
    text = "\n".join(str(p) for p in info.value.problems)
    assert "<config>:2: slurm.partition" in text
    assert "<config>:3: slurm.mem_per_desktop" in text
    assert "<config>:4: slurm.extra_sbatch_args" in text
    assert "<config>:6: container.runtime: apptainer needs container.image" in text
    assert "<config>:7: container.binds" in text
    cfg = parse_config("backend: slurm\nslurm:\n  reservation: ws24\n  run_as: account\n  shared_dir: /shared/gw\n")
    assert cfg.slurm.reservation == "ws24" and cfg.slurm.run_as == "account"


def test_an_interface_is_auto_or_one_address_and_every_address_draws_a_warning() -> None:
    from gateway.model.errors import InputError

    cfg = config()
    assert (cfg.slurm.interface, cfg.ssh.interface, cfg.warnings) == ("auto", "auto", ())
    for value in ("0.0.0.0", "::"):
        cfg = parse_config(f"backend: slurm\nslurm:\n  interface: '{value}'\nssh:\n  interface: 10.0.0.5\n")
        (warning,) = cfg.warnings
        assert warning.startswith("<config>:3: slurm.interface: ") and "every address of the node" in warning
        assert "firewall" in warning and "Security model" in warning
    with pytest.raises(InputError) as info:
        parse_config("slurm:\n  interface: '-inetd'\nssh:\n  interface: 'a b'\n")
    text = "\n".join(str(p) for p in info.value.problems)
    assert "<config>:2: slurm.interface: use auto" in text and "<config>:4: ssh.interface: use auto" in text


def run_node_address(node: str | None) -> subprocess.CompletedProcess[str]:
    """The job script's node_address function, run by bash as the job runs it (its log() the job's)."""
    env = {"PATH": os.environ["PATH"], **({"SLURMD_NODENAME": node} if node else {})}
    text = "log() { printf 'desktop-job: %s\\n' \"$*\" >&2; }\n" + render("node-address.sh.j2") + "node_address\n"
    return subprocess.run(["bash", "-c", text], env=env, capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize(("node_addr", "expected"), [("10.1.2.3", "10.1.2.3"), ("127.0.0.1", "127.0.0.1"),
                                                     ("fd00::17", "fd00::17"), ("localhost", "127.0.0.1")])
def test_auto_listens_on_the_nodes_slurm_address(fake_slurm, node_addr: str, expected: str) -> None:
    """The address Slurm gives for the job's node (NodeAddr, which the gateway connects to), as an IP address."""
    fake_slurm("sinfo", f"{node_addr}\n")
    result = run_node_address("node07")
    assert result.returncode == 0 and result.stdout == f"{expected}\n", result.stderr
    (call,) = fake_slurm.calls("sinfo")
    assert call == "sinfo --noheader --Node --nodes=node07 --format=%o"
    # A name that resolves to a loopback address here reaches nothing from elsewhere: said in the job's output.
    assert ("loopback" in result.stderr) == (node_addr == "localhost")


def test_auto_fails_the_job_saying_why_rather_than_listen_everywhere(fake_slurm) -> None:
    fake_slurm("sinfo", "no-such-node.invalid\n")
    result = run_node_address("node07")
    assert result.returncode == 1 and result.stdout == ""
    assert "desktop-job: node node07's address no-such-node.invalid (NodeAddr) does not resolve" in result.stderr
    fake_slurm("sinfo", "", "slurm_load_node error: Unable to contact slurm controller", status=1)
    result = run_node_address("node07")
    assert result.returncode == 1 and result.stdout == ""
    assert "sinfo did not tell node node07's address (NodeAddr): set slurm.interface" in result.stderr
    assert len(fake_slurm.calls("sinfo")) == 1 + 3  # asked again before giving up
    result = run_node_address(None)
    assert result.returncode == 1 and "SLURMD_NODENAME is not set" in result.stderr


# -- poll() against fake Slurm commands -------------------------------------------------------------


@pytest.fixture
def fake_slurm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Put fake squeue/scontrol/sinfo first on PATH; ``answer(cmd, stdout, stderr, status)`` sets one."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"

    def answer(command: str, stdout: str = "", stderr: str = "", status: int = 0) -> None:
        (bin_dir / f"{command}.out").write_text(stdout)
        (bin_dir / f"{command}.err").write_text(stderr)
        path = bin_dir / command
        path.write_text(f"#!/bin/sh\necho {command} \"$*\" >> {calls}\ncat {bin_dir}/{command}.out\n"
                        f"cat {bin_dir}/{command}.err >&2\nexit {status}\n")
        path.chmod(0o755)

    answer("sinfo", "vm|127.0.0.1\n")
    answer.bin_dir = bin_dir
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    answer.calls = lambda command: [line for line in calls.read_text().splitlines()
                                    if line.split()[0] == command] if calls.exists() else []
    return answer


AS_GATEWAY = "slurm:\n  run_as: gateway\n"  # the fake commands run as the test's user, not as accounts


def backend(tmp_path: Path) -> SlurmBackend:
    b = make_backend("slurm", config(AS_GATEWAY), tmp_path / "state")
    assert isinstance(b, SlurmBackend)
    return b


async def test_poll_states(fake_slurm, tmp_path: Path) -> None:
    b = backend(tmp_path)
    workdir = tmp_path / "w"
    workdir.mkdir()
    state = {"job_id": 41, "user": None, "workdir": str(workdir)}
    fake_slurm("squeue", "41|PENDING||Reservation|desktop-ws01|root\n")
    assert (await b.poll(account(), state)).status is Status.PENDING

    b.queue.invalidate()
    fake_slurm("squeue", "41|RUNNING|vm|None|desktop-ws01|root\n")
    result = await b.poll(account(), state)
    assert result.status is Status.RUNNING and result.endpoint is None  # no report yet
    (workdir / "report-41").write_text("job=41\nnode=vm\nhost=vm\nport=5901\ndisplay=2\n")
    b.queue.invalidate()
    result = await b.poll(account(), state)
    assert result.status is Status.RUNNING
    assert (result.endpoint.host, result.endpoint.port) == ("127.0.0.1", 5901)

    b.queue.invalidate()
    fake_slurm("squeue", "41|CANCELLED|vm|None|desktop-ws01|root\n")
    assert (await b.poll(account(), state)).status is Status.GONE


async def test_failing_squeue_is_unknown_never_gone(fake_slurm, tmp_path: Path) -> None:
    b = backend(tmp_path)
    state = {"job_id": 41, "user": None, "workdir": str(tmp_path)}
    fake_slurm("squeue", stderr="squeue: error: Unable to contact slurm controller (connect failure)", status=1)
    fake_slurm("scontrol", stderr="slurm_load_jobs error: Invalid job id specified", status=1)
    result = await b.poll(account(), state)
    assert result.status is Status.UNKNOWN and "Unable to contact" in result.reason
    assert fake_slurm.calls("scontrol") == []


async def test_job_missing_from_squeue(fake_slurm, tmp_path: Path) -> None:
    b = backend(tmp_path)
    state = {"job_id": 41, "user": None, "workdir": str(tmp_path)}
    fake_slurm("squeue", "")
    # scontrol fails for another reason: don't know.
    fake_slurm("scontrol", stderr="slurm_load_jobs error: Socket timed out on send/recv operation", status=1)
    assert (await b.poll(account(), state)).status is Status.UNKNOWN
    # Submitted after the snapshot: scontrol knows it.
    fake_slurm("scontrol", "JobId=41 JobName=desktop-ws01 UserId=root(0) JobState=PENDING Reason=None NodeList=(null)\n")
    b.queue.invalidate()
    assert (await b.poll(account(), state)).status is Status.PENDING
    # Forgotten by Slurm: positive evidence that it is gone.
    fake_slurm("scontrol", stderr="slurm_load_jobs error: Invalid job id specified", status=1)
    b.queue.invalidate()
    assert (await b.poll(account(), state)).status is Status.GONE


async def test_one_squeue_per_cycle_for_all_accounts(fake_slurm, tmp_path: Path) -> None:
    import asyncio

    b = backend(tmp_path)
    fake_slurm("squeue", "".join(f"{i}|RUNNING|vm|None|desktop-ws{i:02d}|root\n" for i in range(1, 21)))
    states = [{"job_id": i, "user": None, "workdir": str(tmp_path)} for i in range(1, 21)]
    results = await asyncio.gather(*(b.poll(account(f"ws{i:02d}"), s) for i, s in enumerate(states, 1)))
    assert all(r.status is Status.RUNNING for r in results)
    assert len(fake_slurm.calls("squeue")) == 1
    assert b.queue.calls == 1


async def test_queue_caches_failures_too(fake_slurm) -> None:
    fake_slurm("squeue", stderr="squeue: error: slurm_receive_msg: Socket timed out", status=1)
    queue = JobQueue(timeout_s=5, ttl_s=60)
    for _ in range(3):
        with pytest.raises(Exception):
            await queue.jobs()
    assert queue.calls == 1


async def test_reservation_record_is_private_and_only_ours_is_deleted(fake_slurm, tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    fake_slurm("scontrol", "Reservation created: x\n")
    b = SlurmBackend(config("slurm:\n  node_count: 2\n  run_as: gateway\n"), state_dir)
    await b.open([account()])
    record = state_dir / "slurm-reservation.json"
    assert stat.S_IMODE(record.stat().st_mode) == 0o600
    assert b.reservation and b.reservation.startswith("desktop-event-")
    # A named reservation is used, never created or deleted.
    named = SlurmBackend(config("slurm:\n  reservation: theirs\n  run_as: gateway\n"), tmp_path / "other")
    fake_slurm("scontrol", "ReservationName=theirs StartTime=now State=ACTIVE\n")
    await named.open([account()])
    await named.close(final=True)
    assert not (tmp_path / "other" / "slurm-reservation.json").exists()
    scontrol = fake_slurm.calls("scontrol")
    assert any("create reservation" in c and "NodeCnt=2" in c and "Users=" in c for c in scontrol)
    assert any("show reservation -o theirs" in c for c in scontrol)
    assert not any("theirs" in c and ("create" in c or "delete" in c) for c in scontrol)
    # close(final=True) deletes the one it created, and forgets it.
    fake_slurm("scontrol", f"ReservationName={b.reservation} StartTime=now State=ACTIVE\n")
    await b.close(final=True)
    assert any(f"delete reservation {b.reservation}" in c for c in fake_slurm.calls("scontrol"))
    assert not record.exists()


def test_preflight_needs_slurm_commands_not_xvnc_for_slurm_accounts(monkeypatch: pytest.MonkeyPatch) -> None:
    import gateway.cli.checks as cli
    from gateway.model.errors import UserError
    from gateway.model.tokens import parse_tokens

    tokens = parse_tokens("a1 auto /d/a1 6001 5901 abcdefg\n", "t.txt")
    missing = {"Xvnc", "vncpasswd"}
    monkeypatch.setattr(cli, "program_exists", lambda program: program not in missing)
    cfg = config(AS_GATEWAY)
    cli.preflight(cfg, tokens)  # no local account: Xvnc is not needed on the gateway
    with pytest.raises(UserError, match="Xvnc"):
        cli.preflight(cfg, parse_tokens("l1 localhost /d/l1 6001 5901 abcdefg\n", "t.txt"))
    missing = {"sbatch"}
    with pytest.raises(UserError, match="program not found: sbatch"):
        cli.preflight(cfg, tokens)
    missing = {"/usr/sbin/apache2"}
    with pytest.raises(UserError, match="apache2"):
        cli.preflight(cfg, tokens)  # Apache is still needed


def test_run_as_account_is_the_default_and_up_checks_the_users_first(monkeypatch: pytest.MonkeyPatch) -> None:
    import gateway.cli.checks as cli
    from gateway.model.errors import UserError
    from gateway.model.tokens import parse_tokens

    monkeypatch.setattr(cli, "program_exists", lambda program: True)
    assert config().slurm.run_as == "account"
    # Accounts that are no users here (nor anywhere NSS looks), and no shared dir: both said, before anything starts.
    tokens = parse_tokens("nosuchuser-gw1 auto /d/a1 6001 5901 abcdefg\nnosuchuser-gw2 auto /d/a2 6002 5902 abcdefg\n",
                          "t.txt")
    with pytest.raises(UserError) as info:
        cli.preflight(config(), tokens)
    lines = str(info.value).splitlines()
    assert any(line.startswith("slurm.shared_dir: ") for line in lines), lines
    (users,) = [line for line in lines if line.startswith("t.txt:1: ")]
    assert "nosuchuser-gw1, nosuchuser-gw2" in users and "useradd" in users and "run_as: gateway" in users
    # With a shared dir, the missing users are the whole message: one line.
    with pytest.raises(UserError) as info:
        cli.preflight(config("slurm:\n  shared_dir: /shared/gw\n"), tokens)
    assert str(info.value) == users
    # A system account (uid 0 here) never runs a participant's job.
    with pytest.raises(UserError, match=r"t.txt:1: these accounts are system users .*: root"):
        cli.preflight(config("slurm:\n  shared_dir: /shared/gw\n"),
                      parse_tokens("root auto /d/a1 6001 5901 abcdefg\n", "t.txt"))
    # run_as: gateway, chosen explicitly, needs no users.
    cli.preflight(config(AS_GATEWAY), tokens)


async def test_a_report_that_disagrees_with_slurm_is_refused(fake_slurm, tmp_path: Path, caplog) -> None:
    b = backend(tmp_path)
    workdir = tmp_path / "w"
    workdir.mkdir()
    state = {"job_id": 41, "user": None, "workdir": str(workdir)}
    fake_slurm("squeue", "41|RUNNING|vm|None|desktop-ws01|root\n")
    report = workdir / "report-41"
    forged = [
        "job=41\nnode=evil\nhost=10.9.9.9\nport=5901\ndisplay=2\n",   # another node
        "job=41\nnode=vm\nhost=vm\nport=22\ndisplay=2\n",              # another port
        "job=41\nhost=10.9.9.9\nport=5901\n",                           # no node, a host of its own
    ]
    for text in forged:
        report.write_text(text)
        b.queue.invalidate()
        result = await b.poll(account(), state)
        assert result.status is Status.RUNNING and result.endpoint is None, text
        assert "report was refused" in result.reason
    refusals = [r for r in caplog.records if "job report refused" in r.getMessage()]
    assert len(refusals) == 1  # logged once per job, not at every poll
    # A directory or a pipe in its place is no report at all (and does not hang or crash the poll).
    report.unlink()
    report.mkdir()
    b.queue.invalidate()
    assert (await b.poll(account(), state)).endpoint is None
    report.rmdir()
    os.mkfifo(report)
    assert (await b.poll(account(), state)).endpoint is None
    report.unlink()
    # Agreeing with Slurm: the endpoint is the node's address and the account's port, never the report's host.
    report.write_text("job=41\nnode=vm\nhost=10.9.9.9\nport=5901\ndisplay=2\n")
    result = await b.poll(account(), state)
    assert (result.endpoint.host, result.endpoint.port) == ("127.0.0.1", 5901)


async def test_sbatch_is_retried_when_slurmctld_is_away(fake_slurm, tmp_path: Path) -> None:
    b = backend(tmp_path)
    counter = tmp_path / "sbatch-count"
    sbatch = fake_slurm.bin_dir / "sbatch"  # only ever the fake: never a path found on PATH
    assert sbatch.is_relative_to(tmp_path)
    sbatch.write_text(f"#!/bin/sh\ncat > {tmp_path}/script.sh\necho x >> {counter}\n"
                      f"if [ $(wc -l < {counter}) -lt 3 ]; then\n"
                      "  echo 'sbatch: error: Batch job submission failed: Unable to contact slurm controller "
                      "(connect failure)' >&2; exit 1\nfi\necho 77\n")
    sbatch.chmod(0o755)
    state = await b.start(account())
    assert state["job_id"] == 77
    assert len(counter.read_text().splitlines()) == 3
    submitted = (tmp_path / "script.sh").read_text()
    assert submitted.startswith("#!/bin/bash") and PASSWORD not in submitted
    secret = Path(state["workdir"]) / ".vnc-secret"
    # The full password, then the view-only one for instructors (never the same).
    full, view_only = secret.read_text().splitlines()
    assert full == PASSWORD and view_only != PASSWORD and stat.S_IMODE(secret.stat().st_mode) == 0o600
    # A lasting refusal is not retried.
    sbatch.write_text("#!/bin/sh\necho 'sbatch: error: Batch job submission failed: Invalid account' >&2\nexit 1\n")
    from gateway.backends.base import BackendError

    with pytest.raises(BackendError, match="Invalid account"):
        await b.start(account())
