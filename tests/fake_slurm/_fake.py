"""Small stand-ins for Slurm's sbatch, squeue, scontrol, scancel and srun, for the slurm backend's fast tests.

State lives in the directory named by the file state_dir beside this one: <id>.pid (the job's process), <id>.state (a state forced by a test:
PREEMPTED, NODE_FAIL, TIMEOUT, ... which a one-node cluster cannot produce), <id>.exit (the job
script's exit code, written by the wrapper). A job runs its script with bash in a session of its own.
"""

import os
import signal
import subprocess
import sys
from pathlib import Path

# the backend passes only allow-listed variables to sbatch, so the state directory is named in a file
# beside this one (written by the test's fixture into its own copy of these programs)
STATE = Path(Path(__file__).with_name("state_dir").read_text().strip())


def _alive(job: str) -> bool:
    try:
        os.kill(int((STATE / f"{job}.pid").read_text()), 0)
        return True
    except (OSError, ValueError):
        return False


def _state(job: str) -> str | None:
    forced = STATE / f"{job}.state"
    if forced.exists():
        return forced.read_text().strip()
    if not (STATE / f"{job}.pid").exists():
        return None
    if _alive(job) and not (STATE / f"{job}.exit").exists():
        return "RUNNING"
    if (STATE / f"{job}.cancelled").exists():
        return "CANCELLED"
    code = (STATE / f"{job}.exit").read_text().strip() if (STATE / f"{job}.exit").exists() else "1"
    return "COMPLETED" if code == "0" else "FAILED"


def sbatch(args):
    script = args[-1]
    STATE.mkdir(parents=True, exist_ok=True)
    counter = STATE / "next"
    job = str(int(counter.read_text()) + 1 if counter.exists() else 1)
    counter.write_text(job)
    output = next((line.split("=", 1)[1] for line in Path(script).read_text().splitlines() if line.startswith("#SBATCH --output=")), os.devnull)
    # the wrapper records the exit code; it ignores TERM as slurmstepd would outlive the step's signal
    wrapper = f"trap true TERM; SLURM_NODEID=0 SLURM_JOB_ID={job} SLURM_JOB_NODELIST=localhost bash {script!r}; echo $? > {str(STATE / (job + '.exit'))!r}"
    with open(output, "ab") as log:
        proc = subprocess.Popen(["bash", "-c", wrapper], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    (STATE / f"{job}.pid").write_text(str(proc.pid))
    print(job)


def squeue(args):
    job = args[args.index("-j") + 1]
    state = _state(job)
    if state in ("RUNNING", "PENDING", "PREEMPTED", "NODE_FAIL", "TIMEOUT", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "CONFIGURING", "COMPLETING", "SUSPENDED"):
        print(state)


def scontrol(args):
    if args[:2] == ["show", "hostnames"]:
        print("localhost")
        return
    job = args[2]
    state = _state(job)
    if state is None:
        print("slurm_load_jobs error: Invalid job id specified", file=sys.stderr)
        sys.exit(1)
    print(f"JobId={job} JobName=fake JobState={state} Reason=None ExitCode=0:0")


def scancel(args):
    job = args[-1]
    try:
        pgid = int((STATE / f"{job}.pid").read_text())
    except (OSError, ValueError):
        return
    if "--signal=TERM" in args:  # to the job's steps only
        try:
            os.killpg(int((STATE / f"{job}.step").read_text()), signal.SIGTERM)
        except (OSError, ValueError):
            pass
        return
    (STATE / f"{job}.cancelled").write_text("1")
    for group in (pgid, *([int((STATE / f"{job}.step").read_text())] if (STATE / f"{job}.step").exists() else [])):
        try:
            os.killpg(group, signal.SIGKILL)
        except OSError:
            pass


def srun(args):
    """Runs the step's command in a process group of its own, as slurmstepd would, so that a
    `scancel --signal=TERM` reaches the step and not the batch script."""
    command = [a for a in args if not a.startswith("--")]
    proc = subprocess.Popen(command, start_new_session=True)
    (STATE / f"{os.environ['SLURM_JOB_ID']}.step").write_text(str(proc.pid))
    sys.exit(proc.wait())


def sinfo(args):
    print("debug* up 1")


if __name__ == "__main__":
    name = Path(sys.argv[1]).name
    {"sbatch": sbatch, "squeue": squeue, "scontrol": scontrol, "scancel": scancel, "sinfo": sinfo, "srun": srun}[name](sys.argv[2:])
