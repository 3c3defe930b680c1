"""What a backend option that names a program or a host may name (issue 25, item 10).

A pattern of safe characters is not enough: `/bin/sh` is safe characters, and the sbatch line
became `exec /bin/sh -m launcher.shim`; `http://169.254.169.254` is a host name, and the server
would have sent the cloud's metadata service its requests.

- `python`: a Python interpreter, named by a path whose last part is python, python3 or python3.X
  (no `..` in it);
- a cluster address: http(s)://HOST[:PORT] with nothing after the port, HOST never link-local
  (169.254.0.0/16, fe80::/10: where clouds keep their metadata services), never a known metadata
  name or address, never unspecified (0.0.0.0, ::), no user info.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from urllib.parse import urlsplit

PYTHON_NAME = re.compile(r"^python(3(\.\d{1,2})?)?$")
PYTHON_PATH = re.compile(r"^[A-Za-z0-9_./\-]{1,512}$")
METADATA_NAMES = {"metadata", "metadata.google.internal", "metadata.goog", "instance-data", "instance-data.ec2.internal"}
METADATA_ADDRESSES = {ipaddress.ip_address("100.100.100.200"), ipaddress.ip_address("fd00:ec2::254")}


def python_interpreter(value: str) -> str:
    """`value` when it names a Python interpreter; ValueError saying what is allowed otherwise."""
    if not PYTHON_PATH.fullmatch(value):
        raise ValueError("a path of letters, digits and ._/- (at most 512), naming a Python interpreter")
    parts = value.split("/")
    if ".." in parts:
        raise ValueError("the interpreter's path may not go up a directory (..)")
    if not PYTHON_NAME.fullmatch(parts[-1]):
        raise ValueError(f"{parts[-1]!r} is not a Python interpreter: the path must end in python, python3 or python3.X")
    return value


def cluster_address(value: str) -> str:
    """`value` when it is http(s)://HOST[:PORT] with a host that is no metadata service; ValueError otherwise."""
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"not an address: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("the Ray dashboard's address: http://HOST:PORT (or https://)")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise ValueError("the address may not hold a user name or password")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError("the address is http://HOST:PORT, with nothing after the port")
    if port == 0:
        raise ValueError("port 0 is no port")
    host = parts.hostname.lower().rstrip(".")
    if host in METADATA_NAMES:
        raise ValueError(f"{host} is a cloud metadata service, not a Ray cluster")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        try:  # 2852039166, 0xa9fea9fe, 0251.0376.0251.0376: what inet_aton (and so urlopen) takes as IPv4
            address = ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return value  # a name: resolved by whoever connects
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address.is_link_local or address in METADATA_ADDRESSES:
        raise ValueError(f"{host} is a link-local address (where clouds keep their metadata services), not a Ray cluster")
    if address.is_unspecified or address.is_multicast:
        raise ValueError(f"{host} is not an address a cluster answers on")
    return value
