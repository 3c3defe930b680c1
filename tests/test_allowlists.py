"""Backend options that name a program or a host name only what they are for (issue 25, item 10):
Slurm's and Ray's `python` is a Python interpreter, never `/bin/sh` (the sbatch line execs it);
Ray's `address` is a dashboard, never a cloud's metadata service, in any spelling."""

from __future__ import annotations

import sys

import pytest
from pydantic import ValidationError

from launcher.backends.ray import RayOptions
from launcher.backends.slurm import SlurmOptions


@pytest.mark.parametrize("python", ["/bin/sh", "/bin/bash", "sh", "/usr/bin/env", "/opt/py/bin/python-evil", "/usr/bin/../../bin/python3",
                                    "/usr/bin/pythonw", "perl"])
@pytest.mark.parametrize("options", [SlurmOptions, RayOptions])
def test_python_must_be_a_python_interpreter(options, python):
    with pytest.raises(ValidationError) as refused:
        options(python=python)
    assert refused.value.errors()[0]["loc"] == ("python",)


@pytest.mark.parametrize("python", [sys.executable, "python", "python3", "python3.11", "/usr/bin/python3.12", "/opt/conda/envs/ft/bin/python"])
@pytest.mark.parametrize("options", [SlurmOptions, RayOptions])
def test_an_interpreter_path_is_taken(options, python):
    assert options(python=python).python == python


@pytest.mark.parametrize("address", [
    "http://169.254.169.254", "http://169.254.169.254:80/", "http://[fe80::1]:8265", "http://[::ffff:169.254.169.254]:80",
    "http://2852039166", "http://0xa9fea9fe:80", "http://0251.0376.0251.0376", "http://metadata.google.internal",
    "http://100.100.100.200", "http://[fd00:ec2::254]", "http://0.0.0.0:8265", "http://user@127.0.0.1:8265",
    "http://127.0.0.1:8265/api/jobs", "file:///etc/passwd", "gopher://127.0.0.1:8265",
])
def test_ray_address_is_no_metadata_service(address):
    with pytest.raises(ValidationError) as refused:
        RayOptions(address=address)
    assert refused.value.errors()[0]["loc"] == ("address",)


@pytest.mark.parametrize("address", ["http://127.0.0.1:8265", "https://ray-head.internal:8265", "http://10.0.0.5:8265/", "http://[::1]:8265"])
def test_a_dashboard_address_is_taken(address):
    assert RayOptions(address=address).address == address

