"""A one-node SLURM cluster on this machine, for tests/test_slurm.py (and by hand).

Debian's slurm-wlm packages (`slurmctld`, `slurmd`, `slurm-client`) and `munge`, installed with apt-get when they
are missing. :class:`SlurmCluster` writes a single-node ``/etc/slurm/slurm.conf`` (this machine's cores and memory
as ``slurmd -C`` sees them, one partition, no GPU gres; an existing file is set aside and put back), starts munged
(unless one already answers), slurmctld and slurmd, waits until ``sinfo`` shows the node idle, and stops everything it
started afterwards. State, spool and logs live in a temporary directory. Every step has a timeout; anything that keeps
the cluster from coming up raises :class:`ClusterUnavailable` with the reason (the tests skip with it).

No accounting (``accounting_storage/none``, no slurmdbd): jobs stay visible to ``squeue`` and ``scontrol show job``
for ``MinJobAge`` (10 minutes) after they end, which is what the executor plugin's ``squeue`` status command needs.

The configuration must be ``/etc/slurm/slurm.conf`` itself: ``SLURM_CONF`` pointing elsewhere does not reach the
job steps (the job-step plugin clears SLURM_* variables before its nested ``srun``).

By hand (as root):  .venv/bin/python tests/slurm_cluster.py    (starts the cluster, waits for Enter, stops it)
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
# What the packages provide that is used here.
PROGRAMS = ("slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "scontrol", "scancel", "munged", "munge", "unmunge")
CONF = Path("/etc/slurm/slurm.conf")
BACKUP = CONF.with_name("slurm.conf.before-diffaudit-tests")
MARKER = "# Written by diffaudit's tests/slurm_cluster.py"
MUNGE_KEY = Path("/etc/munge/munge.key")
PARTITION = "debug"
NODE = "localhost"
PORTS = (6817, 6818)  # slurmctld, slurmd
SBIN = ("/usr/sbin", "/usr/bin", "/sbin", "/bin")


class ClusterUnavailable(RuntimeError):
    """Why the cluster cannot run on this machine."""


def run(cmd: list[str], timeout: float, input: str | None = None, env: dict | None = None,
        check: bool = False) -> subprocess.CompletedProcess:
    """``cmd`` in its own process group, killed as a group (SIGKILL) when it runs past ``timeout`` seconds."""
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        _killpg(proc, signal.SIGKILL)
        out, err = proc.communicate()
        raise ClusterUnavailable(f"`{' '.join(cmd)}` did not finish within {timeout:g} s") from None
    res = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    if check and res.returncode != 0:
        raise ClusterUnavailable(f"`{' '.join(cmd)}` failed ({res.returncode}): {(out + err).strip()[-800:]}")
    return res


def which(name: str) -> str | None:
    return shutil.which(name) or next((f"{d}/{name}" for d in SBIN if os.access(f"{d}/{name}", os.X_OK)), None)


def missing_programs() -> list[str]:
    return [p for p in PROGRAMS if which(p) is None]


def ensure_packages(timeout: float = 150) -> None:
    """Install the missing Debian packages (``apt-get update`` only if the first attempt fails)."""
    missing = missing_programs()
    if not missing:
        return
    if os.geteuid() != 0:
        raise ClusterUnavailable(f"{', '.join(missing)} missing and not root, so apt-get cannot install them")
    if which("apt-get") is None:
        raise ClusterUnavailable(f"{', '.join(missing)} missing and no apt-get (not a Debian system)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    res = run(install, timeout, env=env)
    if res.returncode != 0:
        run(["apt-get", "update", "-q"], 90, env=env)
        res = run(install, timeout, env=env)
    if missing_programs():
        raise ClusterUnavailable(f"apt-get could not install {' '.join(PACKAGES)}: "
                                 f"{(res.stdout + res.stderr).strip()[-800:]}")


def slurm_version() -> str:
    """The version of the installed SLURM, e.g. ``22.05.8``."""
    out = run([which("slurmctld"), "-V"], 10, check=True).stdout
    m = re.search(r"(\d+\.\d+\.\d+)", out)
    if not m:
        raise ClusterUnavailable(f"cannot read the SLURM version from {out!r}")
    return m[1]


def node_hardware() -> tuple[int, int]:
    """(CPUs, RealMemory in MB) of this machine, as ``slurmd -C`` reports them."""
    out = run([which("slurmd"), "-C"], 20).stdout
    cpus = re.search(r"\bCPUs=(\d+)", out)
    mem = re.search(r"\bRealMemory=(\d+)", out)
    if not (cpus and mem):
        raise ClusterUnavailable(f"`slurmd -C` did not report CPUs and RealMemory: {out.strip()[-400:]}")
    return int(cpus[1]), int(mem[1])


def foreign_controller() -> str | None:
    """The controller host that an existing slurm.conf (not one of ours) names, unless it is this machine."""
    if not CONF.exists():
        return None
    text = CONF.read_text(errors="replace")
    if MARKER in text:
        return None  # left behind by an interrupted test run
    hosts = re.findall(r"^\s*(?:SlurmctldHost|ControlMachine)\s*=\s*([^\s(#]+)", text, re.M | re.I)
    local = {"localhost", "127.0.0.1", socket.gethostname(), socket.getfqdn()}
    return next((h for h in hosts if h not in local), None)


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _killpg(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_process(proc: subprocess.Popen, grace: float = 10) -> None:
    """SIGTERM to the process group of ``proc`` (started with ``start_new_session``), SIGKILL after ``grace``."""
    if proc.poll() is None:
        _killpg(proc, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    _killpg(proc, signal.SIGKILL)  # the group may hold children after the leader exited
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        pass


def slurm_conf(state: Path, cpus: int, mem_mb: int) -> str:
    return f"""{MARKER}: a one-node cluster for the tests.
ClusterName=diffaudit
SlurmctldHost={NODE}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
# Ended jobs stay in squeue / scontrol show job this long (s): the plugin's squeue status checks need >= 3x its
# first status-check interval, and the tests read the job records afterwards.
MinJobAge=600
# scancel: SIGTERM, then SIGKILL after this many seconds.
KillWait=5
DefMemPerCPU=500
# The node's CPUs and memory are taken from this file, not checked against the hardware.
SlurmdParameters=config_overrides
StateSaveLocation={state}/ctld
SlurmdSpoolDir={state}/d
SlurmctldPidFile={state}/slurmctld.pid
SlurmdPidFile={state}/slurmd.pid
SlurmctldLogFile={state}/slurmctld.log
SlurmdLogFile={state}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName={NODE} CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN
# Up to 8 jobs share a core, so that the waves of two workflow runs run at once on a small machine.
PartitionName={PARTITION} Nodes={NODE} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:8
"""


class SlurmCluster:
    """A one-node SLURM cluster: ``with SlurmCluster() as c: ...`` (or :meth:`start` / :meth:`stop`)."""

    def __init__(self, up_timeout: float = 60):
        self.up_timeout = up_timeout
        self.state: Path | None = None
        self.procs: dict[str, subprocess.Popen] = {}
        self.version = ""
        self.cpus = self.mem_mb = 0
        self.partition = PARTITION
        self.node = NODE
        self._conf_written = False

    # -- start ---------------------------------------------------------------------------------------------------

    def start(self) -> "SlurmCluster":
        if os.geteuid() != 0:
            raise ClusterUnavailable("not root: the cluster's daemons and /etc/slurm/slurm.conf need root")
        ensure_packages()
        busy = [p for p in PORTS if port_in_use(p)]
        if busy:
            raise ClusterUnavailable(f"port(s) {busy} already in use: a SLURM seems to run here already, "
                                     "and this fixture does not touch it")
        foreign = foreign_controller()
        if foreign:
            raise ClusterUnavailable(f"{CONF} names the controller {foreign}: this machine belongs to a SLURM "
                                     "cluster, and this fixture does not replace its configuration")
        self.version = slurm_version()
        self.cpus, self.mem_mb = node_hardware()
        self.state = Path(tempfile.mkdtemp(prefix="diffaudit-slurm-"))
        try:
            self._start_munge()
            self._write_conf()
            self._daemon("slurmctld", [which("slurmctld"), "-D", "-i"])
            self._daemon("slurmd", [which("slurmd"), "-D", "-N", NODE])
            self._wait_idle()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_munge(self) -> None:
        if self._munge_works():
            return  # a munged already answers (the system's): use it, leave it running
        if not MUNGE_KEY.exists():
            run([which("mungekey"), "--create", f"--keyfile={MUNGE_KEY}"], 30, check=True)
        shutil.chown(MUNGE_KEY, "munge", "munge")
        MUNGE_KEY.chmod(0o400)
        for d in (Path("/run/munge"), Path("/var/lib/munge"), Path("/var/log/munge")):
            d.mkdir(parents=True, exist_ok=True)
            shutil.chown(d, "munge", "munge")
        self._daemon("munged", ["runuser", "-u", "munge", "--", which("munged"), "--foreground", "--force"])
        deadline = time.time() + 15
        while not self._munge_works():
            if time.time() > deadline or self.procs["munged"].poll() is not None:
                raise ClusterUnavailable(f"munged did not come up: {self._log_tail('munged')}")
            time.sleep(0.2)

    @staticmethod
    def _munge_works() -> bool:
        try:
            cred = run([which("munge"), "-n"], 10)
            return cred.returncode == 0 and run([which("unmunge")], 10, input=cred.stdout).returncode == 0
        except ClusterUnavailable:
            return False

    def _write_conf(self) -> None:
        CONF.parent.mkdir(parents=True, exist_ok=True)
        if CONF.exists() and MARKER not in CONF.read_text(errors="replace") and not BACKUP.exists():
            shutil.copy2(CONF, BACKUP)
        (self.state / "ctld").mkdir()
        (self.state / "d").mkdir()
        CONF.write_text(slurm_conf(self.state, self.cpus, self.mem_mb))
        self._conf_written = True

    def _daemon(self, name: str, cmd: list[str]) -> None:
        log = open(self.state / f"{name}.out", "w")
        self.procs[name] = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        log.close()

    def _wait_idle(self) -> None:
        deadline, state = time.time() + self.up_timeout, ""
        while time.time() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise ClusterUnavailable(f"{name} exited ({proc.returncode}): {self._log_tail(name)}")
            res = run([which("sinfo"), "-h", "-N", "-n", NODE, "-o", "%T"], 10)
            state = res.stdout.strip()
            if res.returncode == 0 and state == "idle":
                return
            time.sleep(0.3)
        raise ClusterUnavailable(f"the node is not idle after {self.up_timeout:g} s (sinfo: {state!r}): "
                                 f"{self._log_tail('slurmctld')} {self._log_tail('slurmd')}")

    def _log_tail(self, name: str, n: int = 600) -> str:
        text = ""
        for f in (f"{name}.out", f"{name}.log"):
            p = self.state / f if self.state else None
            if p and p.exists():
                text += p.read_text(errors="replace")
        return text.strip()[-n:]

    # -- stop ----------------------------------------------------------------------------------------------------

    def stop(self) -> None:
        """Cancel the cluster's jobs, stop the daemons started here, put the original slurm.conf back."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            try:
                ids = self.squeue("%i", states="PENDING,RUNNING,SUSPENDED,COMPLETING")
                if ids:
                    run([which("scancel"), *ids], 15)
                    deadline = time.time() + 15
                    while time.time() < deadline and self.squeue("%i", states="RUNNING,COMPLETING"):
                        time.sleep(0.5)
            except ClusterUnavailable:
                pass
        for name in ("slurmd", "slurmctld", "munged"):
            if name in self.procs:
                stop_process(self.procs.pop(name))
        if self._conf_written:
            if BACKUP.exists():
                shutil.move(BACKUP, CONF)
            else:
                CONF.unlink(missing_ok=True)
            self._conf_written = False
        if self.state:
            shutil.rmtree(self.state, ignore_errors=True)
            self.state = None

    def __enter__(self) -> "SlurmCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- queries -------------------------------------------------------------------------------------------------

    def squeue(self, fmt: str, states: str = "all") -> list[str]:
        """One line per job (``squeue -o fmt``), ended jobs included (for MinJobAge)."""
        res = run([which("squeue"), "-h", f"--states={states}", "-o", fmt], 15, check=True)
        return [line.strip() for line in res.stdout.splitlines() if line.strip()]

    def job_record(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` of one job, as key -> value."""
        out = run([which("scontrol"), "show", "job", "-o", str(job_id)], 15, check=True).stdout
        # key=value pairs; values may hold spaces only in a few free-text fields, which come last on the line
        rec = {}
        for m in re.finditer(r"(\S+?)=(.*?)(?=\s+\S+?=|\s*$)", out.strip()):
            rec[m[1]] = m[2]
        return rec

    def sinfo(self) -> str:
        return run([which("sinfo"), "-N", "-o", "%N %P %T %c %m"], 10, check=True).stdout


if __name__ == "__main__":
    with SlurmCluster() as cluster:
        print(f"SLURM {cluster.version}: node {cluster.node}, {cluster.cpus} CPUs, {cluster.mem_mb} MB, "
              f"partition {cluster.partition}; state in {cluster.state}")
        print(cluster.sinfo())
        input("Press Enter to stop the cluster. ")
