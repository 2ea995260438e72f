#!/usr/bin/env python3
# /// script
# requires-python = ">=3.8"
# dependencies = []
# ///
# SPDX-License-Identifier: MIT
# ------------------------------------------------------------------------------------------
# 1. Header
#    What coproxy is, how to run it, and the table of contents: the docstring is the manual.
# ------------------------------------------------------------------------------------------
"""coproxy: your GitHub Copilot subscription as a local OpenAI- and Anthropic-compatible API.

One file, standard library only, Python 3.8+, Linux/macOS/Windows.

Quick start::

    curl -O https://raw.githubusercontent.com/coproxy/coproxy/main/coproxy.py
    python3 coproxy.py auth login        # GitHub device flow, once
    python3 coproxy.py serve             # http://127.0.0.1:8080
    export OPENAI_BASE_URL=http://127.0.0.1:8080/v1 OPENAI_API_KEY=unused
    eval "$(python3 coproxy.py claude-code)" && claude    # Claude Code via /v1/messages

Subcommands: ``serve [-d]``, ``stop``, ``status``, ``service systemd|launchd``, ``auth
login|status|logout|refresh``, ``models``, ``usage``, ``claude-code``. Every flag has an
environment variable (``--help`` lists them): ``GHCP_GITHUB_TOKEN``, ``GHCP_PROXY_API_KEY`` and
``COPROXY_*`` for the rest. State lives in ``--state-dir`` (default: ``$XDG_STATE_HOME/coproxy``,
``~/Library/Application Support/coproxy`` on macOS, ``%APPDATA%\\coproxy\\config`` on Windows):
``auth/github-access-token`` and ``auth/ghcp-token.json``, the same files as the Rust coproxy.

Routes: ``/v1/chat/completions``, ``/v1/responses``, ``/v1/embeddings``, ``/v1/messages`` (and
``/count_tokens``), ``/v1/models``, ``/usage``, ``/metrics``, ``/healthz``; each also without ``/v1``.

Security: binds 127.0.0.1 unless told otherwise, and refuses a non-loopback address without
``--api-key``; token files are 0600 in a 0700 directory, written atomically; tokens never
appear in logs, responses or error messages. GitHub warns that heavy automated use of Copilot
may be treated as abuse: pace your agents (``--rate-limit``).

Embedding: ``import coproxy`` has no side effects. Names in ``__all__`` are kept stable across
minor versions; everything else (leading underscore or not) may change.

Sections (each uses only those above it; ``grep -n '^# [0-9]*\\. ' coproxy.py``):
   1. Header
   2. Imports, guard, constants
   3. Errors and small utilities
   4. Config
   5. Token store
   6. Upstream HTTP client (blocking)
   7. GitHub and Copilot auth (blocking)
   8. Formats and translation (pure)
   9. HTTP/1.1 server (asyncio)
  10. App and routes
  11. CLI
  12. Entry
"""

# ------------------------------------------------------------------------------------------
# 2. Imports, guard, constants
#    The guard must run before anything newer than Python 3.6 is touched, so this file keeps
#    a 3.6-parseable grammar (no walrus, no positional-only parameters, no f"{x=}"). Then,
#    before the imports it would waste, `serve` re-executes itself from its compiled code.
# ------------------------------------------------------------------------------------------

import sys

if sys.version_info < (3, 8):  # pragma: no cover - exercised by CI on 3.6/3.7
    sys.stderr.write("coproxy needs Python 3.8+ (this is Python %d.%d.%d)\n" % sys.version_info[:3])
    sys.exit(1)

#: The child's whole program: take the module's code object from the inherited file descriptor
#: and run it as this ``__main__``, with argv, ``__file__`` and ``sys.path[0]`` as for the script.
_BYTECODE_LAUNCHER = (
    "import marshal,os,sys;_fd=int(sys.argv[1]);__file__=sys.argv[2];del sys.argv[:3];"
    "sys.path[0]=os.path.dirname(os.path.abspath(__file__));"
    "__bytecode__=marshal.loads(os.pread(_fd,os.fstat(_fd).st_size,0));os.close(_fd);del _fd;exec(__bytecode__)")


def _serve_from_bytecode(module_code, script_path):
    """Re-execute this process (same pid) from the module's code object, without the script's parse tree.

    CPython keeps a script's whole parse tree alive until the script's top-level code returns,
    which for ``serve`` is never: for this file that is ~11 MB of RSS for nothing. So ``serve``
    hands the code it already compiled to a fresh interpreter through an anonymous file and
    ``exec``s it; the new interpreter neither parses the source nor holds a tree. It runs with
    ``-S``: coproxy imports only the standard library, and skipping site-packages (and any
    ``.pth`` hooks in them) starts faster. Interpreter flags that change behaviour are kept. On any
    failure it returns and the server simply runs in this process.
    """
    import marshal
    import os
    flags = ["-S"]
    for flag, on in (("-I", sys.flags.isolated), ("-E", sys.flags.ignore_environment),
                     ("-s", sys.flags.no_user_site), ("-B", sys.flags.dont_write_bytecode),
                     ("-P", getattr(sys.flags, "safe_path", False))):
        if on:
            flags.append(flag)
    flags += ["-O"] * sys.flags.optimize + ["-b"] * sys.flags.bytes_warning + ["-W" + w for w in sys.warnoptions]
    flags += ["-X" + (k if v is True else "%s=%s" % (k, v)) for k, v in sys._xoptions.items()]
    if getattr(sys.stdout, "write_through", False):  # -u or PYTHONUNBUFFERED
        flags.append("-u")
    data = marshal.dumps(module_code)
    fd = None
    try:
        if hasattr(os, "memfd_create"):  # Linux: never touches a disk
            fd = os.memfd_create("coproxy-bytecode", 0)
        else:  # macOS and the BSDs: an unlinked 0600 temporary file
            import tempfile
            fd, path = tempfile.mkstemp(prefix="coproxy-bytecode-")
            os.unlink(path)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.set_inheritable(fd, True)
        os.execv(sys.executable, [sys.executable] + flags + ["-c", _BYTECODE_LAUNCHER, str(fd), script_path] + sys.argv)
    except OSError:  # no exec here (read-only /tmp, seccomp, ...): serve from this process
        if fd is not None:
            os.close(fd)


if (__name__ == "__main__" and globals().get("__spec__") is None and "__bytecode__" not in globals()
        and "serve" in sys.argv[1:] and sys.executable and not getattr(sys, "frozen", False)
        and sys.platform != "win32" and sys.gettrace() is None and sys.getprofile() is None):
    _serve_from_bytecode(sys._getframe(0).f_code, __file__)

import _thread
import argparse
import asyncio
import base64
import collections
import concurrent.futures
import contextlib
import dataclasses
import errno
import functools
import http
import queue
import json
import logging
import os
import re
import signal
import socket
import ssl
import stat
import struct
import threading
import time
import urllib.parse

__version__ = "0.1.0"
__all__ = ["Config", "TokenStore", "UpstreamClient", "CopilotAuth", "DeviceFlow", "App", "Server",
           "SSEDecoder", "main", "__version__"]

#: OAuth client id of the GitHub Copilot editor plugins (a GitHub App; tokens start ``ghu_``).
#: Only tokens from this app can be exchanged at ``/copilot_internal/v2/token``.
GITHUB_CLIENT_ID = "Iv1.b507a08c87ecfe98"
GITHUB_SCOPE = "read:user"
DEFAULT_GITHUB_URL = "https://github.com"
DEFAULT_GITHUB_API_URL = "https://api.github.com"
DEFAULT_COPILOT_API_URL = "https://api.githubcopilot.com"

#: Identity headers: Copilot checks Editor-Version and Copilot-Integration-Id and refuses Go's
#: default User-Agent, so we present ourselves the way VS Code's Copilot Chat does.
EDITOR_VERSION = "vscode/1.104.3"
EDITOR_PLUGIN_VERSION = "copilot-chat/0.26.7"
COPILOT_USER_AGENT = "GitHubCopilotChat/0.26.7"
COPILOT_INTEGRATION_ID = "vscode-chat"
COPILOT_CHAT_API_VERSION = "2025-05-01"
GITHUB_API_VERSION = "2025-04-01"

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
#: Body cap in MiB: agent clients send whole conversations with base64 images.
DEFAULT_MAX_BODY_MB = 32
#: Concurrent proxied requests (streams included); excess requests wait, then get 503.
DEFAULT_MAX_CONCURRENCY = 1024
#: Seconds of upstream silence before an SSE comment keeps the client's stream alive.
DEFAULT_PING_SECONDS = 15.0
#: Seconds a client has to send a complete request head (then 408), and an idle
#: keep-alive connection is kept (then a silent close; uvicorn uses 5 s, we allow agents more).
DEFAULT_HEADER_TIMEOUT_SECONDS = 30.0
DEFAULT_IDLE_TIMEOUT_SECONDS = 15.0
DEFAULT_BODY_TIMEOUT_SECONDS = 120.0
DEFAULT_UPSTREAM_CONNECT_TIMEOUT_SECONDS = 15.0
#: Longest silence tolerated *between bytes* of an upstream answer; never a total limit.
#: Copilot has been seen silent for 41 s mid-stream and taking 290 s for one long answer.
DEFAULT_UPSTREAM_READ_TIMEOUT_SECONDS = 600.0
DEFAULT_SHUTDOWN_GRACE_SECONDS = 10.0
#: Seconds the /models catalogue is cached (VS Code refreshes at most every 10 minutes).
DEFAULT_MODELS_TTL_SECONDS = 300.0
#: Seconds a request waits for a concurrency slot before 503.
DEFAULT_QUEUE_TIMEOUT_SECONDS = 30.0

#: The Copilot token is refreshed when less than this remains (VS Code and Zed use 5 minutes).
TOKEN_REFRESH_MARGIN_SECONDS = 300
MAX_REQUEST_LINE_BYTES = 8 * 1024          # 414 beyond (CPython uses 64 KiB; nobody needs that)
MAX_HEADER_BYTES = 32 * 1024               # 431 beyond (h11: 16 KiB, asyncio: 64 KiB)
MAX_HEADER_COUNT = 100                     # 431 beyond (http.client._MAXHEADERS)
MAX_CHUNK_LINE_BYTES = 1024                # 400 beyond (bottle)
MAX_UPSTREAM_ERROR_BODY_BYTES = 1 << 20    # error bodies we read from upstream
MAX_UPSTREAM_JSON_BYTES = 64 << 20         # successful JSON answers (non-stream)
MAX_IMAGE_BYTES = 20 << 20                 # an image fetched from a URL (OpenAI's own limit)
MAX_IMAGE_REDIRECTS = 5
IMAGE_CACHE_BYTES = 64 << 20               # fetched images kept: agents resend the history
IMAGE_CACHE_SECONDS = 600.0
STREAM_HIGH_WATER_BYTES = 1 << 20          # upstream bytes buffered for a slow client
#: Bytes asked of the upstream socket per read: TLS hands out at most one 16 KiB record per
#: read anyway, and a smaller ask keeps 1,000 streams' short-lived read buffers small.
UPSTREAM_RECV_BYTES = 16 * 1024
IDLE_UPSTREAM_CONNECTIONS = 64             # kept-alive connections per origin
IDLE_UPSTREAM_SECONDS = 90.0               # an idle pooled connection older than this is dropped
IDLE_WORKER_SECONDS = 60.0                 # an idle worker thread beyond the first few exits after this
MIN_WORKERS = 4
#: Stack reserved per worker thread by `serve` (one thread per stream): 1,000 streams reserve
#: 1 GB of address space instead of 8 GB, which matters under ``ulimit -v`` or strict
#: overcommit. Workers only do I/O, shallow JSON and TLS; deep client JSON is parsed on the loop.
WORKER_STACK_BYTES = 1024 * 1024

KNOWN_METHODS = frozenset(["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE",
                           "CONNECT"])
_TOKEN_CHARS = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")   # RFC 9110 §5.6.2 token
REASONS = {s.value: s.phrase for s in http.HTTPStatus}
REASONS.update({499: "Client Closed Request", 529: "Overloaded"})

# ------------------------------------------------------------------------------------------
# 3. Errors and small utilities
#    One exception tree. ``ClientError`` is what a client of ours sees (status + envelope
#    fields); ``BadRequest`` is malformed HTTP; the rest are raised by the blocking layers and
#    turned into one-line CLI messages or error envelopes. Messages never contain tokens.
# ------------------------------------------------------------------------------------------

log = logging.getLogger("coproxy")
access_log = logging.getLogger("coproxy.access")


class CoproxyError(Exception):
    """Base of every error coproxy raises on purpose; its message is shown to the user."""


class ConfigError(CoproxyError):
    """A flag, environment variable or file holds a value we cannot use."""


class AuthError(CoproxyError):
    """Not logged in, or GitHub refused to give us a Copilot token (the message says why)."""

    def __init__(self, message, code="copilot_auth_failed", status=None):
        super().__init__(message)
        self.code = code
        self.status = status


class UpstreamUnreachable(CoproxyError):
    """A network, DNS, TLS or proxy failure before any answer from GitHub or Copilot."""

    def __init__(self, message, timeout=False):
        super().__init__(message)
        self.timeout = timeout


class ClientError(CoproxyError):
    """An error answer for our own client: HTTP status plus the fields of the error envelope."""

    def __init__(self, status, message, kind=None, code=None, param=None, headers=None):
        super().__init__(message)
        self.status = status
        self.kind = kind or error_type_for_status(status)
        self.code = code
        self.param = param
        self.headers = headers or []


class BadRequest(Exception):
    """Malformed HTTP from the client; the connection is answered with ``status`` and closed."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line (--log-format json): ts, level, message, plus an access line's fields."""

    def format(self, record):
        entry = {"ts": round(record.created, 3), "level": record.levelname.lower(), "message": record.getMessage()}
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info and record.levelno >= logging.ERROR:
            entry["error"] = redact(self.formatException(record.exc_info).splitlines()[-1])
        return json.dumps(entry, separators=(",", ":"), ensure_ascii=False)


def error_type_for_status(status):
    """The OpenAI ``error.type`` that goes with an HTTP status."""
    if status == 401:
        return "authentication_error"
    if status == 403:
        return "permission_error"
    if status == 404:
        return "not_found_error"
    if status == 429:
        return "rate_limit_error"
    if 400 <= status < 500:
        return "invalid_request_error"
    return "api_error"


_SECRET_PATTERNS = re.compile(
    r"(gh[pousr]_[A-Za-z0-9_]{8,}|github_pat_[A-Za-z0-9_]{8,}|tid=[^\s\"',]+|"
    r"(?i:bearer|token)\s+[A-Za-z0-9._~+/=;:-]{12,})")


def redact(text):
    """Replace anything that looks like a GitHub or Copilot token with ``[redacted]``."""
    return _SECRET_PATTERNS.sub("[redacted]", str(text))


def json_dumps(obj):
    """Compact JSON as bytes (the form every response and upstream body uses)."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def random_id(digits=32):
    """``digits`` random hex digits, for the ids of answers we build (``chatcmpl-...``, ``msg_...``)."""
    return os.urandom((digits + 1) // 2).hex()[:digits]


def random_uuid():
    """A random (version 4) UUID string, as ``str(uuid.uuid4())`` but without that module's import."""
    raw = bytearray(os.urandom(16))
    raw[6] = raw[6] & 0x0F | 0x40
    raw[8] = raw[8] & 0x3F | 0x80
    digits = raw.hex()
    return "%s-%s-%s-%s-%s" % (digits[:8], digits[8:12], digits[12:16], digits[16:20], digits[20:])


_WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def http_date(timestamp):
    """``Sun, 06 Nov 1994 08:49:37 GMT`` (RFC 9110 §5.6.7), in English whatever the locale."""
    t = time.gmtime(timestamp)
    return "%s, %02d %s %d %02d:%02d:%02d GMT" % (_WEEKDAYS[t.tm_wday], t.tm_mday, _MONTHS[t.tm_mon - 1], t.tm_year,
                                                   t.tm_hour, t.tm_min, t.tm_sec)


def parse_json_object(raw, what="request body"):
    """Parse bytes as a JSON object or raise ``ClientError(400)`` saying what is wrong."""
    try:
        payload = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise ClientError(400, "%s is not valid JSON: %s" % (what, exc), code="invalid_json")
    if not isinstance(payload, dict):
        raise ClientError(400, "%s must be a JSON object" % what, code="invalid_json")
    return payload


def is_loopback_host(host):
    """True for 127.0.0.0/8, ::1 and ``localhost``: the addresses that are safe without a key.
    (inet_pton, not the ipaddress module: serve asks before listening, and that import costs.)"""
    host = host.strip("[]").lower()
    if host in ("localhost", "localhost."):
        return True
    try:
        packed = socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
    except (OSError, ValueError):
        return False
    return packed[0] == 127 if len(packed) == 4 else packed == bytes(15) + b"\x01"


def format_size(count):
    """``812 bytes``, ``3.0 KiB``, ``2.5 MiB``."""
    if count < 1024:
        return "%d bytes" % count
    return "%.1f KiB" % (count / 1024.0) if count < 1 << 20 else "%.1f MiB" % (count / 1048576.0)


def format_duration(seconds):
    """``1h 02m``, ``14m 05s``, ``9s``: a token lifetime a person can read."""
    seconds = int(max(0, seconds))
    if seconds >= 3600:
        return "%dh %02dm" % (seconds // 3600, seconds % 3600 // 60)
    if seconds >= 60:
        return "%dm %02ds" % (seconds // 60, seconds % 60)
    return "%ds" % seconds


# ------------------------------------------------------------------------------------------
# 4. Config
#    Every knob is one row of OPTIONS: flag, environment variable, type, default, help. The
#    CLI parser and the env lookup are both generated from it, so a flag cannot exist without
#    its variable. Precedence: flag > environment > default.
# ------------------------------------------------------------------------------------------

def _parse_bool(text):
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("expected true/false, got %r" % text)


API_SURFACES = ("chat", "responses", "embeddings", "messages")
API_SURFACE_PRESETS = {"chat": ("chat",), "chat-responses": ("chat", "responses"),
                       "chat-embeddings": ("chat", "embeddings"), "all": API_SURFACES}


def _api_surface(text):
    """The seed's presets, or a comma list of chat,responses,embeddings,messages."""
    text = str(text).strip().lower()
    if text in API_SURFACE_PRESETS:
        return frozenset(API_SURFACE_PRESETS[text])
    parts = frozenset(p.strip() for p in text.split(",") if p.strip())
    unknown = parts - set(API_SURFACES)
    if unknown or not parts:
        raise ValueError("use %s, or a comma list of %s" % ("/".join(API_SURFACE_PRESETS), ",".join(API_SURFACES)))
    return parts


def _number(convert, low, high=None, strict=False):
    """A converter for a numeric option: ``convert`` the text, then check its bounds."""
    def parse(text):
        value = convert(text)
        if (value <= low if strict else value < low) or (high is not None and value > high):
            raise ValueError("must be %s %s%s" % (">" if strict else ">=", low, "" if high is None else " and <= %s" % high))
        return value
    return parse


_port = _number(int, 0, 65535)
_positive_int = _number(int, 1)
_positive_float = _number(float, 0, strict=True)
_non_negative_float = _number(float, 0)


def _log_level(text):
    value = str(text).strip().upper()
    if value not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ValueError("must be debug, info, warning or error")
    return value


class Repeatable:
    """A flag that may be given several times; its environment variable holds a comma list."""

    def __init__(self, item):
        self.item = item

    def __call__(self, text):
        return [self.item(part.strip()) for part in str(text).split(",") if part.strip()]


def _model_alias(text):
    name, sep, target = text.partition("=")
    if not sep or not name.strip() or not target.strip():
        raise ValueError("expected FROM=TO, got %r" % text)
    return name.strip(), target.strip()


def _origin(text):
    if text != "*" and not re.match(r"^https?://[^/\s]+$", text):
        raise ValueError("expected * or an origin like https://app.example.com, got %r" % text)
    return text


def _log_format(text):
    value = str(text).strip().lower()
    if value not in ("text", "json"):
        raise ValueError("must be text or json")
    return value


Option = collections.namedtuple("Option", "flag dest env type default scope help metavar")

#: scope "shared": accepted before or after any subcommand; "serve": only by ``serve``.
OPTIONS = [
    Option("--state-dir", "state_dir", "COPROXY_STATE_DIR", str, None, "shared",
           "directory for token files (default: the platform's state directory)", "DIR"),
    Option("--github-token", "github_token", "GHCP_GITHUB_TOKEN", str, None, "shared",
           "GitHub OAuth token to use instead of the saved one (ghu_/gho_ from a Copilot login)",
           "TOKEN"),
    Option("--github-host", "github_host", "COPROXY_GITHUB_HOST", str, "github.com", "shared",
           "GitHub host; TENANT.ghe.com switches login, API and Copilot hosts (data residency)",
           "HOST"),
    Option("--ca-file", "ca_file", "COPROXY_CA_FILE", str, None, "shared",
           "extra PEM bundle of trusted CAs (corporate TLS inspection); SSL_CERT_FILE also works",
           "FILE"),
    Option("--log-level", "log_level", "COPROXY_LOG_LEVEL", _log_level, "INFO", "shared",
           "debug, info, warning or error", "LEVEL"),
    Option("--log-format", "log_format", "COPROXY_LOG_FORMAT", _log_format, "text", "shared",
           "text, or json for one JSON object per log line", "FORMAT"),
    Option("--github-url", "github_url", "COPROXY_GITHUB_URL", str, None, "shared",
           "base URL for the device flow (default https://github.com or https://TENANT.ghe.com)",
           "URL"),
    Option("--github-api-url", "github_api_url", "COPROXY_GITHUB_API_URL", str, None, "shared",
           "GitHub REST base URL (default https://api.github.com or https://api.TENANT.ghe.com)",
           "URL"),
    Option("--copilot-api-url", "copilot_api_url", "COPROXY_COPILOT_API_URL", str, None, "shared",
           "Copilot API base URL (default: endpoints.api from the Copilot token)", "URL"),
    Option("--host", "host", "COPROXY_HOST", str, DEFAULT_HOST, "serve",
           "address to bind; anything but loopback requires --api-key", "ADDR"),
    Option("--port", "port", "COPROXY_PORT", _port, DEFAULT_PORT, "serve",
           "port to bind (0 picks a free one; the real port is printed)", "PORT"),
    Option("--api-key", "api_key", "GHCP_PROXY_API_KEY", str, None, "serve",
           "require this key from clients (Authorization: Bearer KEY or x-api-key: KEY)", "KEY"),
    Option("--allow-unauthenticated", "allow_unauthenticated", "COPROXY_ALLOW_UNAUTHENTICATED",
           bool, False, "serve", "allow a non-loopback --host without --api-key (not advised)",
           None),
    Option("--no-auto-login", "no_auto_login", "COPROXY_NO_AUTO_LOGIN", bool, False, "serve",
           "start even when not logged in (requests get 503 until a token exists)", None),
    Option("--no-image-fetch", "no_image_fetch", "COPROXY_NO_IMAGE_FETCH", bool, False, "serve",
           "send image URLs on as they are instead of fetching them and sending the image itself "
           "(Copilot refuses most external image URLs)", None),
    Option("--api-surface", "api_surface", "COPROXY_API_SURFACE", _api_surface, "all", "serve",
           "APIs to serve: chat, chat-responses, chat-embeddings, all, or a comma list of "
           "chat,responses,embeddings,messages", "LIST"),
    Option("--default-model", "default_model", "COPROXY_DEFAULT_MODEL", str, None, "serve",
           "model used when a request names none", "MODEL"),
    Option("--model-alias", "model_aliases", "COPROXY_MODEL_ALIAS", Repeatable(_model_alias), None, "serve",
           "FROM=TO: requests for FROM go to TO on every route (repeatable; env: comma list)", "FROM=TO"),
    Option("--rate-limit", "rate_limit", "COPROXY_RATE_LIMIT", _non_negative_float, 0.0, "serve",
           "at least this many seconds between requests sent to Copilot (0: off); excess get 429", "SECONDS"),
    Option("--wait", "wait", "COPROXY_WAIT", bool, False, "serve",
           "with --rate-limit, queue requests until their turn instead of answering 429", None),
    Option("--cors-origin", "cors_origins", "COPROXY_CORS_ORIGIN", Repeatable(_origin), None, "serve",
           "allow browser pages from this origin (repeatable; * for any); off by default", "ORIGIN"),
    Option("--detach", "detach", "COPROXY_DETACH", bool, False, "serve",
           "-d: run in the background, writing <state-dir>/coproxy.pid and coproxy.log", None),
    Option("--max-body-mb", "max_body_mb", "COPROXY_MAX_BODY_MB", _positive_float,
           DEFAULT_MAX_BODY_MB, "serve", "largest request body accepted, in MiB (413 beyond)",
           "MB"),
    Option("--max-concurrency", "max_concurrency", "COPROXY_MAX_CONCURRENCY", _positive_int,
           DEFAULT_MAX_CONCURRENCY, "serve",
           "concurrent proxied requests and streams; excess requests wait, then get 503", "N"),
    Option("--queue-timeout", "queue_timeout", "COPROXY_QUEUE_TIMEOUT", _positive_float,
           DEFAULT_QUEUE_TIMEOUT_SECONDS, "serve",
           "seconds a request waits for a free slot at the concurrency limit (503 after)", "SECONDS"),
    Option("--ping-seconds", "ping_seconds", "COPROXY_PING_SECONDS", _positive_float,
           DEFAULT_PING_SECONDS, "serve",
           "send an SSE keep-alive comment after this much upstream silence", "SECONDS"),
    Option("--header-timeout", "header_timeout", "COPROXY_HEADER_TIMEOUT", _positive_float,
           DEFAULT_HEADER_TIMEOUT_SECONDS, "serve",
           "seconds a client has to send a request head (408 after)", "SECONDS"),
    Option("--idle-timeout", "idle_timeout", "COPROXY_IDLE_TIMEOUT", _positive_float,
           DEFAULT_IDLE_TIMEOUT_SECONDS, "serve",
           "seconds an idle keep-alive connection is kept open", "SECONDS"),
    Option("--upstream-timeout", "upstream_timeout", "COPROXY_UPSTREAM_TIMEOUT", _positive_float,
           DEFAULT_UPSTREAM_READ_TIMEOUT_SECONDS, "serve",
           "longest upstream silence tolerated between bytes (never a total limit)", "SECONDS"),
    Option("--shutdown-grace", "shutdown_grace", "COPROXY_SHUTDOWN_GRACE", _positive_float,
           DEFAULT_SHUTDOWN_GRACE_SECONDS, "serve",
           "on SIGINT/SIGTERM, seconds in-flight requests get to finish", "SECONDS"),
]
OPTION_BY_DEST = {o.dest: o for o in OPTIONS}


def default_state_dir(platform=None, environ=None):
    """Where token files live: the same place as the Rust coproxy, so its users keep their login."""
    platform = platform or sys.platform
    environ = os.environ if environ is None else environ
    home = os.path.expanduser("~")
    if platform.startswith("win"):
        base = environ.get("APPDATA") or os.path.join(home, "AppData", "Roaming")
        return os.path.join(base, "coproxy", "config")
    if platform == "darwin":
        return os.path.join(home, "Library", "Application Support", "coproxy")
    base = environ.get("XDG_STATE_HOME") or os.path.join(home, ".local", "state")
    return os.path.join(base, "coproxy")


@dataclasses.dataclass
class Config:
    """Every setting of one coproxy run, resolved from flags, environment and defaults."""
    state_dir: str = ""
    github_token: str = None
    github_token_source: str = None
    github_host: str = "github.com"
    ca_file: str = None
    log_level: str = "INFO"
    github_url: str = None
    github_api_url: str = None
    copilot_api_url: str = None
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    api_key: str = None
    allow_unauthenticated: bool = False
    no_auto_login: bool = False
    no_image_fetch: bool = False
    default_model: str = None
    model_aliases: list = dataclasses.field(default_factory=list)
    rate_limit: float = 0.0
    wait: bool = False
    cors_origins: list = dataclasses.field(default_factory=list)
    detach: bool = False
    log_format: str = "text"
    api_surface: frozenset = frozenset(API_SURFACES)
    max_body_mb: float = DEFAULT_MAX_BODY_MB
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY
    queue_timeout: float = DEFAULT_QUEUE_TIMEOUT_SECONDS
    ping_seconds: float = DEFAULT_PING_SECONDS
    header_timeout: float = DEFAULT_HEADER_TIMEOUT_SECONDS
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT_SECONDS
    upstream_timeout: float = DEFAULT_UPSTREAM_READ_TIMEOUT_SECONDS
    shutdown_grace: float = DEFAULT_SHUTDOWN_GRACE_SECONDS
    body_timeout: float = DEFAULT_BODY_TIMEOUT_SECONDS
    connect_timeout: float = DEFAULT_UPSTREAM_CONNECT_TIMEOUT_SECONDS
    models_ttl: float = DEFAULT_MODELS_TTL_SECONDS
    environ: dict = dataclasses.field(default_factory=dict, repr=False)

    @property
    def max_body_bytes(self):
        return int(self.max_body_mb * 1024 * 1024)

    @property
    def is_ghe(self):
        return self.github_host.lower() != "github.com"

    @classmethod
    def resolve(cls, values=None, environ=None):
        """Build a Config from parsed flags (a dict; missing keys = not given) and environment."""
        values = dict(values or {})
        environ = dict(os.environ if environ is None else environ)
        config = cls(environ=environ)
        for option in OPTIONS:
            if option.dest in values and values[option.dest] is not None:
                value = values[option.dest]
                source = option.flag
            elif environ.get(option.env, "") != "":
                source = option.env
                try:
                    value = (_parse_bool if option.type is bool else option.type)(environ[option.env])
                except ValueError as exc:
                    raise ConfigError("%s=%r is not valid: %s" % (option.env, environ[option.env], exc))
            else:
                continue
            setattr(config, option.dest, value)
            if option.dest == "github_token":
                config.github_token_source = source
        config.github_host = config.github_host.strip().lower().rstrip("/") or "github.com"
        if "://" in config.github_host or "/" in config.github_host:
            raise ConfigError("--github-host takes a host name such as TENANT.ghe.com, not a URL")
        # The device flow and REST hosts follow --github-host unless overridden one by one.
        if config.github_url is None:
            config.github_url = "https://" + config.github_host
        if config.github_api_url is None:
            config.github_api_url = "https://api." + config.github_host
        for name in ("github_url", "github_api_url", "copilot_api_url"):
            url = getattr(config, name)
            if url is not None:
                parsed = urllib.parse.urlsplit(url)
                if parsed.scheme not in ("http", "https") or not parsed.hostname:
                    raise ConfigError("%s must be an http(s) URL, got %r" % (
                        OPTION_BY_DEST[name].env, url))
                setattr(config, name, url.rstrip("/"))
        if config.github_token is not None:
            config.github_token = config.github_token.strip() or None
        config.model_aliases = dict(config.model_aliases or [])
        if config.ca_file:
            try:
                with open(config.ca_file, "rb") as handle:
                    pem = handle.read()
            except OSError as exc:
                raise ConfigError("--ca-file %s cannot be read: %s" % (config.ca_file, exc.strerror or exc))
            if b"-----BEGIN CERTIFICATE-----" not in pem:
                raise ConfigError("--ca-file %s holds no PEM certificate (-----BEGIN CERTIFICATE-----)" % config.ca_file)
        config.state_dir = os.path.abspath(os.path.expanduser(config.state_dir or default_state_dir()))
        return config


# ------------------------------------------------------------------------------------------
# 5. Token store
#    Two files under <state-dir>/auth/, byte-compatible with the Rust coproxy: the GitHub
#    token as plain text and the Copilot token as JSON (``token``, ``expires_at``,
#    ``api_endpoint``; extra fields allowed). Directory 0700, files created 0600 by os.open
#    (no umask window), written to a temp file, fsynced and renamed. A corrupt or empty file
#    reads as absent. No network here.
# ------------------------------------------------------------------------------------------

GITHUB_TOKEN_FILE = "github-access-token"
COPILOT_TOKEN_FILE = "ghcp-token.json"


def write_file_atomic(path, text, posix=(os.name == "posix")):
    """Write ``text`` to ``path`` as a 0600 file that never exists half-written: a temp file in the
    same directory (created 0600 by os.open, so no umask window), fsync, rename, fsync the dir."""
    directory = os.path.dirname(path) or "."
    tmp = "%s.%d.%s.tmp" % (path, os.getpid(), random_id(8))
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(text.encode("utf-8"))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if posix:
        try:  # make the rename itself durable
            dir_fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError:
            pass


class TokenStore:
    """The on-disk auth state: ``auth/github-access-token`` and ``auth/ghcp-token.json``."""

    def __init__(self, state_dir, posix=None):
        self.state_dir = state_dir
        self.auth_dir = os.path.join(state_dir, "auth")
        self.posix = (os.name == "posix") if posix is None else posix
        #: (file identity, token) of the last read: the token is asked for on every request
        self._github_token_seen = (None, None)

    @property
    def github_token_path(self):
        return os.path.join(self.auth_dir, GITHUB_TOKEN_FILE)

    @property
    def copilot_token_path(self):
        return os.path.join(self.auth_dir, COPILOT_TOKEN_FILE)

    def _ensure_dir(self):
        os.makedirs(self.auth_dir, mode=0o700, exist_ok=True)
        if self.posix:
            for path in (self.state_dir, self.auth_dir):
                if stat.S_IMODE(os.stat(path).st_mode) & 0o077:
                    os.chmod(path, 0o700)

    def _read(self, path):
        """File text, or None if absent/unreadable; files others can read are tightened first."""
        try:
            if self.posix:
                mode = stat.S_IMODE(os.stat(path).st_mode)
                if mode & 0o077:
                    log.warning("%s was readable by others (mode %o); setting it to 0600", path, mode)
                    os.chmod(path, 0o600)
            with open(path, "r", encoding="utf-8") as handle:
                return handle.read()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            log.warning("cannot read %s (%s); treating it as absent", path, exc.__class__.__name__)
            return None

    def _write_atomic(self, path, text):
        self._ensure_dir()
        write_file_atomic(path, text, self.posix)

    def load_github_token(self):
        """The saved GitHub token, or None. The file is read again only when its inode, size, mtime
        or mode change, so a login or logout by another process is still seen on the next request."""
        try:
            found = os.stat(self.github_token_path)
        except OSError:
            return None
        identity = (found.st_ino, found.st_size, found.st_mtime_ns, found.st_mode)
        seen, token = self._github_token_seen
        if identity != seen:
            token = (self._read(self.github_token_path) or "").strip() or None
            # Timestamps are coarse (a few ms) and inodes get reused: a file written within the
            # last seconds could be rewritten without its identity changing, so it is not cached.
            fresh = time.time() - found.st_mtime < 2.0
            self._github_token_seen = (None if fresh else identity, token)
        return token

    def save_github_token(self, token):
        self._write_atomic(self.github_token_path, token.strip() + "\n")

    def load_copilot_token(self):
        """The cached Copilot token record, or None if absent, corrupt or missing fields."""
        text = self._read(self.copilot_token_path)
        if not text or not text.strip():
            return None
        try:
            record = json.loads(text)
        except ValueError:
            log.warning("%s is corrupt; ignoring it", self.copilot_token_path)
            return None
        if not isinstance(record, dict) or not isinstance(record.get("token"), str):
            return None
        if not isinstance(record.get("expires_at"), (int, float)):
            return None
        return record

    def save_copilot_token(self, record):
        self._write_atomic(self.copilot_token_path, json.dumps(record, indent=2, sort_keys=True) + "\n")

    def clear(self):
        """Delete both files; returns the paths that existed."""
        removed = []
        for path in (self.github_token_path, self.copilot_token_path):
            try:
                os.unlink(path)
                removed.append(path)
            except FileNotFoundError:
                pass
        return removed

    def clear_copilot_token(self):
        try:
            os.unlink(self.copilot_token_path)
        except FileNotFoundError:
            pass


# ------------------------------------------------------------------------------------------
# 6. Upstream HTTP client (blocking)
#    A small HTTP/1.1 client of our own over socket and ssl.create_default_context() (which
#    honours SSL_CERT_FILE; --ca-file adds a bundle): one sendall per request, a one-pass head
#    parser, chunked bodies handed on as fast as they arrive. (http.client parsed every
#    answer's headers with the email package: a fifth of the proxy's CPU.) One LIFO pool of
#    kept-alive connections per origin: a connection goes back only after its answer was read
#    to the end and the server did not ask to close. One retry, only when a *pooled*
#    connection proves stale before any response byte. HTTPS_PROXY and NO_PROXY are honoured
#    through a CONNECT tunnel. Called only from worker threads.
# ------------------------------------------------------------------------------------------

def _no_proxy_matches(host, port, no_proxy):
    """NO_PROXY semantics as curl has them: ``*``, exact names, domain suffixes, host:port."""
    host = host.lower().strip("[]")
    for entry in no_proxy.replace(" ", "").split(","):
        entry = entry.lower()
        if not entry:
            continue
        if entry == "*":
            return True
        entry_host, _, entry_port = entry.rpartition(":") if entry.count(":") == 1 else (entry, "", "")
        if entry_port and entry_port != str(port):
            continue
        entry_host = entry_host.lstrip(".").strip("[]")
        if host == entry_host or host.endswith("." + entry_host):
            return True
    return False


def proxy_for(url, environ):
    """(host, port, authorization header or None) of the proxy for ``url``, or None."""
    parts = urllib.parse.urlsplit(url)
    names = ("https_proxy", "HTTPS_PROXY") if parts.scheme == "https" else ("http_proxy", "HTTP_PROXY")
    proxy = next((environ[n] for n in names if environ.get(n)), None)
    if not proxy:
        return None
    no_proxy = environ.get("no_proxy") or environ.get("NO_PROXY") or ""
    if _no_proxy_matches(parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80),
                         no_proxy):
        return None
    if "://" not in proxy:
        proxy = "http://" + proxy
    p = urllib.parse.urlsplit(proxy)
    if p.scheme not in ("http", "https") or not p.hostname:
        raise ConfigError("proxy URL %r is not usable (only http:// proxies are supported)" % proxy)
    auth = None
    if p.username is not None:
        creds = "%s:%s" % (urllib.parse.unquote(p.username), urllib.parse.unquote(p.password or ""))
        auth = "Basic " + base64.b64encode(creds.encode("utf-8")).decode("ascii")
    return p.hostname, p.port or 80, auth


def describe_network_error(exc, url):
    """A sentence naming what failed and what usually fixes it."""
    host = urllib.parse.urlsplit(url).netloc
    if isinstance(exc, ssl.SSLCertVerificationError):
        return ("TLS certificate of %s could not be verified (%s); behind a TLS-inspecting proxy, "
                "pass its CA bundle with --ca-file or SSL_CERT_FILE" % (host, exc.verify_message))
    if isinstance(exc, ssl.SSLError):
        return "TLS error talking to %s: %s" % (host, exc)
    if isinstance(exc, socket.gaierror):
        return "cannot resolve %s (%s); check your network or HTTPS_PROXY" % (host, exc.strerror)
    if isinstance(exc, socket.timeout):
        return "timed out talking to %s" % host
    if isinstance(exc, ConnectionRefusedError):
        return "connection to %s refused; check your network or HTTPS_PROXY" % host
    if isinstance(exc, OSError) and "Tunnel connection failed" in str(exc):
        return "the HTTPS proxy refused the tunnel to %s (%s)" % (host, exc)
    return "cannot reach %s: %s" % (host, exc.__class__.__name__ + (": %s" % exc if str(exc) else ""))


class WorkerPool(concurrent.futures.Executor):
    """The dedicated thread pool for blocking upstream work (a stream holds a thread throughout).

    Idle workers are reused; a new one is started only when none is idle, up to ``max_workers``;
    workers idle for ``idle_seconds`` exit, down to MIN_WORKERS.
    Unlike ThreadPoolExecutor, submit() never waits for a new thread to boot: Thread.start()
    blocks its caller (here the event loop) until the new thread gets the GIL, which with
    hundreds of busy streams took milliseconds per thread and delayed every other client."""

    def __init__(self, max_workers, idle_seconds=IDLE_WORKER_SECONDS):
        self.max_workers = max_workers
        self.idle_seconds = idle_seconds
        self._jobs = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0
        self.workers = 0
        self._shutdown = False

    def _enqueue(self, job):
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._jobs.put(job)
            start = False
            if self._idle:
                self._idle -= 1  # that worker will take this job
            elif self.workers < self.max_workers:
                self.workers += 1
                start = True
        if start:
            _thread.start_new_thread(self._work, ())

    def submit(self, fn, *args, **kwargs):
        """concurrent.futures API (the CLI and the tests use it)."""
        future = concurrent.futures.Future()
        self._enqueue((future, None, fn, args, kwargs))
        return future

    def run(self, loop, fn, *args):
        """``fn(*args)`` in a worker; an asyncio future of ``loop`` gets the result. Leaner than
        run_in_executor, which chains a concurrent future to an asyncio one for every call."""
        future = loop.create_future()
        self._enqueue((future, loop, fn, args, {}))
        return future

    @staticmethod
    def _settle(future, result, error):
        if not future.done():
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)

    def _work(self):
        while True:
            try:
                job = self._jobs.get(timeout=self.idle_seconds)
            except queue.Empty:
                # After a burst (1,000 streams), give the threads back. Every waiting worker is
                # counted in _idle or holds a queued job, so leaving while _idle > 0 strands no job.
                with self._lock:
                    if self._idle > 0 and self.workers > MIN_WORKERS:
                        self._idle -= 1
                        self.workers -= 1
                        return
                continue
            if job is None:
                return
            future, loop, fn, args, kwargs = job
            del job
            if loop is None and not future.set_running_or_notify_cancel():
                fn = None
            if fn is not None:
                result = error = None
                try:
                    result = fn(*args, **kwargs)
                except BaseException as exc:  # delivered to whoever awaits the future
                    error = exc
                if loop is None:
                    if error is not None:
                        future.set_exception(error)
                    else:
                        future.set_result(result)
                else:
                    try:
                        loop.call_soon_threadsafe(self._settle, future, result, error)
                    except RuntimeError:  # the loop has closed: nobody awaits this any more
                        pass
                del result, error
            del future, loop, fn, args, kwargs
            with self._lock:
                if self._shutdown:
                    return
                self._idle += 1

    def shutdown(self, wait=True, **_):
        """Idle workers exit now; busy ones when their job ends (they never block process exit)."""
        with self._lock:
            self._shutdown = True
            idle, self._idle = self._idle, 0
        for _ in range(idle):
            self._jobs.put(None)


class AbortHandle:
    """Lets the event loop cut off a blocking upstream call from another thread.

    The worker registers the socket it is using; ``abort()`` shuts it down, which wakes a
    thread blocked in a read at once (close() alone would not)."""

    def __init__(self):
        self.aborted = False
        self._sock = None
        self._lock = threading.Lock()

    def attach(self, sock):
        with self._lock:
            self._sock = sock
            aborted = self.aborted
        if aborted:
            self._shutdown(sock)

    def abort(self):
        with self._lock:
            self.aborted = True
            sock = self._sock
        if sock is not None:
            self._shutdown(sock)

    @staticmethod
    def _shutdown(sock):
        try:  # the plain-socket method: SSLSocket.shutdown would drop its SSL object under a reader
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
        except OSError:
            pass


_DECIMAL = re.compile(r"[0-9]+\Z")


class UpstreamConnection:
    """A kept-alive socket to one origin, and how requests on it are addressed."""

    __slots__ = ("sock", "absolute_form", "proxy_auth")

    def __init__(self, sock, absolute_form=False, proxy_auth=None):
        self.sock = sock
        self.absolute_form = absolute_form  # plain HTTP through a proxy: the full URL as target
        self.proxy_auth = proxy_auth

    def close(self):
        self.sock.close()


class UpstreamCutShort(ConnectionError):
    """The upstream closed the connection before its answer was complete."""


class UpstreamResponse:
    """One HTTP/1.1 answer read from a kept-alive socket: status and headers at once, the body
    on demand. Our own reader, not http.client's: it parses the head in one pass instead of
    through the email package, and ``read1`` returns every chunk already received in one call,
    so a burst of SSE events costs one hand-over to the event loop, not one per event."""

    def __init__(self, client, origin, conn, method, abort_handle=None):
        self._client = client
        self._origin = origin
        self._conn = conn
        self._sock = conn.sock
        self._abort = abort_handle
        self._buf = bytearray()
        self.done = False
        self._complete = False
        while True:  # 1xx interim answers are skipped
            self.status, self.headers, self.will_close = self._read_head()
            if not 100 <= self.status < 200:
                break
        coding = self.headers.get("transfer-encoding", "").lower()
        length = self.headers.get("content-length")
        self._chunked = coding.rstrip().endswith("chunked")
        self._need_crlf = self._in_trailers = False
        #: body bytes still to come: of the whole body, of the current chunk, or None (until close)
        self._left = 0
        self.length = None
        if method == "HEAD" or self.status in (204, 304):
            self._complete = True
        elif self._chunked:
            pass
        elif length is not None:
            values = set(v.strip() for v in length.split(","))  # repeats of one value are allowed
            if len(values) != 1 or not _DECIMAL.match(next(iter(values))):
                raise ValueError("the upstream sent an invalid Content-Length %r" % length[:40])
            self.length = self._left = int(values.pop())
            self._complete = self._left == 0
        else:
            self._left = None
            self.will_close = True

    def _recv(self):
        """Append what arrives next; False at the end of a body that runs until the server closes."""
        data = self._sock.recv(UPSTREAM_RECV_BYTES)
        if not data:
            if self._left is None and not self._chunked:
                return False
            raise UpstreamCutShort("the upstream closed the connection mid-answer")
        self._buf += data
        return True

    def _read_head(self):
        """(status, headers with lower-case names, will_close) of the next answer on the socket."""
        buf = self._buf
        while True:
            ends = [(end, end + size) for end, size in ((buf.find(b"\r\n\r\n"), 4), (buf.find(b"\n\n"), 2))
                    if end >= 0]  # the first blank line; bare LF line ends are tolerated, as http.client does
            if ends:
                end, rest = min(ends)
                head = bytes(buf[:end])
                break
            if len(buf) > MAX_HEADER_BYTES * 2:
                raise ValueError("the upstream sent a response head larger than %d bytes" % (MAX_HEADER_BYTES * 2))
            data = self._sock.recv(UPSTREAM_RECV_BYTES)
            if not data:
                # Before any byte: a pooled connection the server had closed (retried once).
                raise (ConnectionResetError if not buf else UpstreamCutShort)(
                    "the upstream closed the connection without answering")
            buf += data
        del buf[:rest]
        lines = head.decode("latin-1").replace("\r\n", "\n").split("\n")
        parts = lines[0].split(None, 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or len(parts[1]) != 3 or not parts[1].isdigit():
            raise ValueError("the upstream answered with a malformed status line %r" % lines[0][:80])
        if len(lines) > MAX_HEADER_COUNT + 1:
            raise ValueError("the upstream sent more than %d header lines" % MAX_HEADER_COUNT)
        headers = {}
        name = None
        for line in lines[1:]:
            if line[:1] in (" ", "\t") and name:  # obsolete line folding
                headers[name] += " " + line.strip()
                continue
            name, colon, value = line.partition(":")
            if not colon:
                name = None
                continue
            name = name.strip().lower()
            value = value.strip()
            headers[name] = headers[name] + ", " + value if name in headers else value
        tokens = headers.get("connection", "").lower()
        will_close = "close" in tokens or (parts[0] == "HTTP/1.0" and "keep-alive" not in tokens)
        return int(parts[1]), headers, will_close

    def header(self, name, default=None):
        return self.headers.get(name.lower(), default)

    def _take(self, size):
        """Body bytes already received, at most ``size``, with chunked framing removed."""
        buf = self._buf
        if not self._chunked:
            n = len(buf) if self._left is None else min(len(buf), self._left)
            n = min(n, size)
            data = bytes(buf[:n])
            del buf[:n]
            if self._left is not None:
                self._left -= n
                self._complete = self._left == 0
            return data
        out = []
        taken = 0
        while taken < size and not self._complete:
            if self._left:
                n = min(self._left, len(buf), size - taken)
                if not n:
                    break
                out.append(bytes(buf[:n]))
                del buf[:n]
                self._left -= n
                taken += n
                self._need_crlf = self._left == 0
                continue
            end = buf.find(b"\n")
            if end < 0:
                if len(buf) > MAX_CHUNK_LINE_BYTES:
                    raise ValueError("the upstream sent a chunk-size line longer than %d bytes" % MAX_CHUNK_LINE_BYTES)
                break
            line = bytes(buf[:end]).strip()
            del buf[:end + 1]
            if self._need_crlf:  # the line end that closes a chunk's data
                self._need_crlf = False
                if line:
                    raise ValueError("the upstream's chunked framing is broken (no CRLF after a chunk)")
            elif self._in_trailers:
                self._complete = not line
            else:
                try:
                    self._left = int(line.split(b";", 1)[0], 16)
                except ValueError:
                    raise ValueError("the upstream sent a bad chunk size %r" % line[:40])
                if self._left < 0:
                    raise ValueError("the upstream sent a bad chunk size %r" % line[:40])
                self._in_trailers = self._left == 0
        return b"".join(out)

    def read1(self, size=65536):
        """Every body byte that has arrived (up to ``size``), waiting only when there is none;
        b"" at the end. For streams: an event is handed on as soon as its bytes are here."""
        while True:
            if self._buf:
                data = self._take(size)
                if data:
                    return data
            if self._complete:
                self.close()
                return b""
            if not self._recv():  # the body ran until the server closed
                self._complete = True

    def read_all(self, limit):
        """The whole body (at most ``limit`` bytes; beyond that the connection is dropped).
        An answer cut short raises instead of returning part of it."""
        try:
            if self.length is not None and self.length > limit:
                self.close(reuse=False)
                raise UpstreamUnreachable("upstream answer of %d bytes is larger than %d" % (self.length, limit))
            parts = []
            total = 0
            while True:
                data = self.read1(1 << 20)
                if not data:
                    return b"".join(parts)
                total += len(data)
                if total > limit:
                    self.close(reuse=False)
                    raise UpstreamUnreachable("upstream answer larger than %d bytes" % limit)
                parts.append(data)
        except (OSError, ValueError) as exc:
            self.close(reuse=False)
            if self._abort is not None and self._abort.aborted:
                raise UpstreamUnreachable("aborted")
            raise UpstreamUnreachable("upstream connection failed mid-answer: %s" % exc.__class__.__name__,
                                      timeout=isinstance(exc, socket.timeout))

    def close(self, reuse=True):
        """Give the connection back to the pool if the answer was fully read, else close it."""
        if self.done:
            return
        self.done = True
        if (reuse and self._complete and not self.will_close and not self._buf
                and not (self._abort is not None and self._abort.aborted)):
            self._client._release(self._origin, self._conn)
        else:
            self._conn.close()

    def abort(self):
        """Close from another thread: wakes a reader blocked in read1 and never pools the socket."""
        if self._abort is None:
            self._abort = AbortHandle()
            self._abort.attach(self._sock)
        self._abort.abort()


class UpstreamClient:
    """Blocking HTTP/1.1 client with a kept-alive connection pool per origin.

    Requests go out as one pre-formatted block in one ``sendall``; answers are read by
    UpstreamResponse. Plain sockets and ``ssl`` do the rest (TLS, CONNECT tunnels)."""

    def __init__(self, ca_file=None, connect_timeout=DEFAULT_UPSTREAM_CONNECT_TIMEOUT_SECONDS,
                 read_timeout=DEFAULT_UPSTREAM_READ_TIMEOUT_SECONDS, environ=None):
        self.ca_file = ca_file
        self._ssl_context = None
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.environ = dict(os.environ if environ is None else environ)
        self._pools = {}
        self._origins = {}
        self._lock = threading.Lock()
        #: connections opened since start (the benchmark checks keep-alive with it)
        self.connections_opened = 0

    @property
    def ssl_context(self):
        """Built on first HTTPS use: loading the trust store costs ~2 MB and tens of milliseconds."""
        with self._lock:
            if self._ssl_context is None:
                context = ssl.create_default_context()
                if self.ca_file:
                    try:
                        context.load_verify_locations(cafile=self.ca_file)
                    except (OSError, ssl.SSLError) as exc:
                        raise UpstreamUnreachable("--ca-file %s is not a usable PEM bundle: %s" % (self.ca_file, exc))
                self._ssl_context = context
            return self._ssl_context

    def _origin(self, url):
        """((scheme, host, port), request target, Host header) of ``url``. The parsed part is
        remembered per scheme://authority: the same few base URLs come back on every request."""
        authority_end = url.find("/", url.find("://") + 3) if "://" in url else -1
        base, path = (url, "/") if authority_end < 0 else (url[:authority_end], url[authority_end:])
        if "?" in base:
            base, query = base.split("?", 1)
            path = "/?" + query
        path = path.split("#", 1)[0]
        known = self._origins.get(base)
        if known is None:
            try:
                parts = urllib.parse.urlsplit(base)
                default = 443 if parts.scheme == "https" else 80
                port = parts.port or default
            except ValueError:
                parts = None
            if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
                raise UpstreamUnreachable("not a usable http(s) URL: %r" % url)
            host = "[%s]" % parts.hostname if ":" in parts.hostname else parts.hostname
            known = ((parts.scheme, parts.hostname, port), host if port == default else "%s:%d" % (host, port))
            self._origins[base] = known
        return known[0], path, known[1]

    def _connect(self, origin, url):
        scheme, host, port = origin
        proxy = proxy_for(url, self.environ)
        target = proxy[:2] if proxy else (host, port)
        sock = socket.create_connection(target, timeout=self.connect_timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if scheme == "https":
                if proxy:
                    self._tunnel(sock, host, port, proxy[2])
                sock = self.ssl_context.wrap_socket(sock, server_hostname=host)
            sock.settimeout(self.read_timeout)
        except BaseException:
            sock.close()
            raise
        with self._lock:
            self.connections_opened += 1
        absolute_form = bool(proxy) and scheme == "http"
        return UpstreamConnection(sock, absolute_form, proxy[2] if absolute_form else None)

    @staticmethod
    def _tunnel(sock, host, port, proxy_auth):
        """CONNECT host:port through an HTTP proxy; the TLS handshake then runs inside it."""
        authority = "[%s]:%d" % (host, port) if ":" in host else "%s:%d" % (host, port)
        head = "CONNECT %s HTTP/1.1\r\nHost: %s\r\n" % (authority, authority)
        if proxy_auth:
            head += "Proxy-Authorization: %s\r\n" % proxy_auth
        sock.sendall((head + "\r\n").encode("latin-1"))
        answer = b""
        while b"\r\n\r\n" not in answer and b"\n\n" not in answer:
            data = sock.recv(4096)  # the proxy says nothing after its head until we speak TLS
            if not data or len(answer) > MAX_HEADER_BYTES:
                raise OSError("Tunnel connection failed: the proxy closed the connection")
            answer += data
        status_line = answer.split(b"\n", 1)[0].decode("latin-1").strip()
        parts = status_line.split(None, 2)
        if len(parts) < 2 or parts[1] != "200":
            raise OSError("Tunnel connection failed: %s" % (" ".join(parts[1:]) or status_line))

    def _acquire(self, origin):
        with self._lock:
            pool = self._pools.get(origin)
            now = time.monotonic()
            while pool:
                conn, since = pool.pop()
                if now - since < IDLE_UPSTREAM_SECONDS:
                    return conn
                conn.close()
        return None

    def _release(self, origin, conn):
        with self._lock:
            pool = self._pools.setdefault(origin, [])
            if len(pool) < IDLE_UPSTREAM_CONNECTIONS:
                pool.append((conn, time.monotonic()))
                return
        conn.close()

    def close(self):
        with self._lock:
            pools, self._pools = self._pools, {}
        for pool in pools.values():
            for conn, _ in pool:
                conn.close()

    def request(self, method, url, headers, body=None, abort_handle=None):
        """Send one request and return once status and headers are in (body unread).

        Raises UpstreamUnreachable for network/TLS/proxy failures (never for HTTP statuses)."""
        origin, path, host_header = self._origin(url)
        block = "".join(["%s: %s\r\n" % item for item in headers.items()])
        if block.count("\n") != len(headers) or block.count("\r") != len(headers):  # no CR/LF injection
            raise UpstreamUnreachable("refusing to send a header value that contains a line break")
        if "Accept-Encoding" not in headers:  # bodies are relayed as they come: no gzip, please
            block += "Accept-Encoding: identity\r\n"
        for attempt in (0, 1):
            conn = self._acquire(origin)
            reused = conn is not None
            try:
                if conn is None:
                    conn = self._connect(origin, url)
                if abort_handle is not None:
                    abort_handle.attach(conn.sock)
                    if abort_handle.aborted:
                        conn.close()
                        raise UpstreamUnreachable("aborted")
                head = "%s %s HTTP/1.1\r\nHost: %s\r\n%s" % (
                    method, url.split("#", 1)[0] if conn.absolute_form else path, host_header, block)
                if conn.proxy_auth:
                    head += "Proxy-Authorization: %s\r\n" % conn.proxy_auth
                if body is not None:
                    head += "Content-Length: %d\r\n" % len(body)
                data = (head + "\r\n").encode("latin-1")
                if body is not None and len(body) <= 65536:
                    conn.sock.sendall(data + body)  # one segment for the usual small request
                else:
                    conn.sock.sendall(data)
                    if body:
                        conn.sock.sendall(body)
                response = UpstreamResponse(self, origin, conn, method, abort_handle)
            except UpstreamUnreachable:
                raise
            except (ConnectionResetError, BrokenPipeError, ConnectionAbortedError) as exc:
                if conn is not None:
                    conn.close()
                if reused and attempt == 0 and not (abort_handle and abort_handle.aborted):
                    log.debug("pooled upstream connection was stale (%s); retrying once",
                              exc.__class__.__name__)
                    continue
                raise UpstreamUnreachable(describe_network_error(exc, url))
            except (OSError, ValueError) as exc:
                if conn is not None:
                    conn.close()
                if abort_handle is not None and abort_handle.aborted:
                    raise UpstreamUnreachable("aborted")
                raise UpstreamUnreachable(describe_network_error(exc, url),
                                          timeout=isinstance(exc, socket.timeout))
            return response
        raise AssertionError("unreachable")  # pragma: no cover

    def request_json(self, method, url, headers, payload=None, limit=MAX_UPSTREAM_JSON_BYTES):
        """(status, parsed JSON or None, raw bytes, response) for a small JSON exchange."""
        body = json_dumps(payload) if payload is not None else None
        response = self.request(method, url, headers, body)
        raw = response.read_all(limit)
        try:
            parsed = json.loads(raw) if raw else None
        except ValueError:
            parsed = None
        return response.status, parsed, raw, response

    def fetch_image(self, url, limit=MAX_IMAGE_BYTES):
        """(media type, bytes) of the image at ``url``, following up to MAX_IMAGE_REDIRECTS
        redirects; UpstreamUnreachable saying why when it is not an image that can be had."""
        for _ in range(MAX_IMAGE_REDIRECTS + 1):
            if not url.lower().startswith(("http://", "https://")):
                raise UpstreamUnreachable("it redirects to something that is not an http(s) URL")
            response = self.request("GET", url, {"Accept": "image/*", "User-Agent": COPILOT_USER_AGENT})
            location = response.header("location")
            if response.status in (301, 302, 303, 307, 308) and location:
                response.read_all(MAX_UPSTREAM_ERROR_BODY_BYTES)
                url = urllib.parse.urljoin(url, location)
                continue
            if response.status != 200:
                response.close(reuse=False)
                raise UpstreamUnreachable("its server answered HTTP %d" % response.status)
            media_type = (response.header("content-type") or "").split(";")[0].strip().lower()
            if not media_type.startswith("image/"):
                response.close(reuse=False)
                raise UpstreamUnreachable("it is not an image (Content-Type %s)" % (media_type or "missing"))
            if response.length is not None and response.length > limit:
                response.close(reuse=False)
                raise UpstreamUnreachable("it is larger than %d MiB" % (limit >> 20))
            return media_type, response.read_all(limit)
        raise UpstreamUnreachable("more than %d redirects" % MAX_IMAGE_REDIRECTS)


# ------------------------------------------------------------------------------------------
# 7. GitHub and Copilot auth (blocking)
#    The device flow (RFC 8628: honour ``interval``, add 5 s for good on every ``slow_down``,
#    stop on ``expired_token``/``access_denied``/the deadline); the exchange of the GitHub
#    token for a short-lived Copilot token, cached in memory and on disk and refreshed by one
#    thread while the others wait (single-flight); the API base from the token's
#    ``endpoints.api``; the /models catalogue with a TTL. Sleep and clock are injectable.
# ------------------------------------------------------------------------------------------

def github_headers(token=None):
    """Headers for github.com / api.github.com calls: VS Code-like identity, GitHub token."""
    headers = {
        "Accept": "application/json",
        "User-Agent": COPILOT_USER_AGENT,
        "Editor-Version": EDITOR_VERSION,
        "Editor-Plugin-Version": EDITOR_PLUGIN_VERSION,
        "X-GitHub-Api-Version": GITHUB_API_VERSION,
    }
    if token:
        headers["Authorization"] = "token " + token
    return headers


def copilot_headers(copilot_token, initiator="user", vision=False, intent="conversation-panel"):
    """Headers for the Copilot API, as VS Code's Copilot Chat sends them (protocol notes §4)."""
    headers = {
        "Authorization": "Bearer " + copilot_token,
        "Content-Type": "application/json",
        "Accept": "application/json",
        "Copilot-Integration-Id": COPILOT_INTEGRATION_ID,
        "Editor-Version": EDITOR_VERSION,
        "Editor-Plugin-Version": EDITOR_PLUGIN_VERSION,
        "User-Agent": COPILOT_USER_AGENT,
        "OpenAI-Intent": intent,
        "X-GitHub-Api-Version": COPILOT_CHAT_API_VERSION,
        "X-Request-Id": random_uuid(),
        "X-Initiator": initiator,
        "X-VSCode-User-Agent-Library-Version": "electron-fetch",
    }
    if vision:
        headers["Copilot-Vision-Request"] = "true"
    return headers


def upstream_error_message(raw, limit=2000):
    """The human message inside an upstream error body: JSON ``error.message``, ``message``,
    or the text itself; never double-encoded, never a token."""
    text = raw.decode("utf-8", "replace").strip() if isinstance(raw, bytes) else str(raw or "")
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    fields = {}
    if isinstance(data, dict):
        inner = data.get("error")
        if isinstance(inner, dict):
            fields = inner
        elif isinstance(inner, str):
            fields = {"message": inner, "code": data.get("code")}
        else:
            fields = data
        text = fields.get("message") or data.get("error_description") or text
        if not isinstance(text, str):
            text = json.dumps(text)
    return redact(text[:limit]).strip(), fields


class DeviceFlow:
    """GitHub's OAuth device flow for the Copilot GitHub App."""

    def __init__(self, client, github_url, sleep=time.sleep, clock=time.monotonic):
        self.client = client
        self.github_url = github_url
        self.sleep = sleep
        self.clock = clock

    def start(self):
        """Ask for a code: dict with device_code, user_code, verification_uri, expires_in, interval."""
        status, data, raw, _ = self.client.request_json(
            "POST", self.github_url + "/login/device/code",
            dict(github_headers(), **{"Content-Type": "application/json"}),
            {"client_id": GITHUB_CLIENT_ID, "scope": GITHUB_SCOPE})
        if status != 200 or not isinstance(data, dict) or not data.get("device_code"):
            message, _ = upstream_error_message(raw)
            raise AuthError("GitHub refused to start the device flow (HTTP %d): %s" % (status, message),
                            code="device_flow_failed")
        data.setdefault("verification_uri", self.github_url + "/login/device")
        data["interval"] = max(1, int(data.get("interval") or 5))
        data["expires_in"] = int(data.get("expires_in") or 900)
        return data

    def poll(self, code, on_wait=None):
        """Poll until the user approves; returns the GitHub token or raises AuthError."""
        interval = code["interval"]
        deadline = self.clock() + code["expires_in"]
        network_failures = 0
        while True:
            remaining = deadline - self.clock()
            if remaining <= 0:
                raise AuthError("the device code expired before it was approved; run "
                                "`coproxy.py auth login` again", code="expired_token")
            if on_wait:
                on_wait(remaining, interval)
            self.sleep(min(interval, max(remaining, 0.01)))
            try:
                _, data, raw, _ = self.client.request_json(
                    "POST", self.github_url + "/login/oauth/access_token",
                    dict(github_headers(), **{"Content-Type": "application/json"}),
                    {"client_id": GITHUB_CLIENT_ID, "device_code": code["device_code"],
                     "grant_type": "urn:ietf:params:oauth:grant-type:device_code"})
            except UpstreamUnreachable as exc:
                network_failures += 1
                if network_failures >= 5:
                    raise AuthError("lost contact with GitHub while waiting: %s" % exc, code="network")
                log.warning("polling GitHub failed (%s); trying again", exc)
                continue
            network_failures = 0
            # Pending answers come as 200 or 400 depending on who you ask: read the body only.
            if not isinstance(data, dict):
                data = dict(urllib.parse.parse_qsl(raw.decode("utf-8", "replace")))
            if data.get("access_token"):
                return data["access_token"]
            error = data.get("error")
            if error == "authorization_pending":
                continue
            if error == "slow_down":
                interval += 5  # RFC 8628 §3.5: for this and all later requests
                if str(data.get("interval", "")).isdigit():
                    interval = max(interval, int(data["interval"]))
                continue
            if error == "expired_token":
                raise AuthError("the device code expired before it was approved; run "
                                "`coproxy.py auth login` again", code="expired_token")
            if error == "access_denied":
                raise AuthError("authorization was denied on GitHub (access_denied)", code="access_denied")
            description = data.get("error_description") or "no access_token in the answer"
            raise AuthError("GitHub ended the device flow: %s (%s)" % (error or "unknown", redact(description)),
                            code=error or "device_flow_failed")


# Notification ids GitHub puts in a refused exchange, and what the user can do about each.
_EXCHANGE_HINTS = {
    "no_copilot_access": "this GitHub account has no Copilot subscription or seat",
    "not_signed_up": "this GitHub account has not signed up for Copilot",
    "subscription_ended": "the Copilot subscription of this account has ended",
    "feature_flag_blocked": "Copilot is blocked for this account by a policy",
    "enterprise_managed_user_account": "this managed (EMU) account has no Copilot seat here",
    "access_revoked": "Copilot access of this account was revoked",
    "billing_locked": "Copilot is locked because of a billing problem",
    "spammy_user": "GitHub flagged this account; contact GitHub support",
    "trade_restricted": "Copilot is not available for this account (trade restrictions)",
    "trade_restricted_country": "Copilot is not available in this country",
}


class CopilotAuth:
    """The GitHub token, the Copilot token derived from it, and the calls that need them."""

    def __init__(self, config, store, client, clock=time.time):
        self.config = config
        self.store = store
        self.client = client
        self.clock = clock
        self._record = None
        self._fingerprinted = (None, None)
        self._disk_checked = False
        self._refresh_lock = threading.Lock()
        self._models_lock = threading.Lock()
        self._models = None
        self._models_at = 0.0
        #: token exchanges performed, and how many failed (tests and /metrics read them)
        self.exchanges = 0
        self.exchange_failures = 0

    # -- the GitHub token --------------------------------------------------------------------
    def github_token(self):
        """(token, where it came from) or (None, None); flag > GHCP_GITHUB_TOKEN > file."""
        if self.config.github_token:
            return self.config.github_token, self.config.github_token_source or "--github-token"
        token = self.store.load_github_token()
        if token:
            return token, self.store.github_token_path
        return None, None

    def require_github_token(self):
        token, _ = self.github_token()
        if not token:
            raise AuthError("not logged in to GitHub: run `python3 coproxy.py auth login` "
                            "(or set GHCP_GITHUB_TOKEN)", code="not_logged_in")
        return token

    # -- the Copilot token -------------------------------------------------------------------
    def _fingerprint(self, github_token):
        """Short SHA-256 of the GitHub token, kept with the Copilot token to tell whose it is.
        Checked on every request, so the last answer is remembered."""
        if self._fingerprinted[0] != github_token:
            import hashlib  # here, not at the top: serve would load OpenSSL's digests before listening
            self._fingerprinted = (github_token, hashlib.sha256(github_token.encode("utf-8")).hexdigest()[:16])
        return self._fingerprinted[1]

    def _usable(self, record, github_token):
        if not record:
            return False
        owner = record.get("github_token_sha256")
        if owner and owner != self._fingerprint(github_token):
            return False
        now = self.clock()
        if record["expires_at"] - now < TOKEN_REFRESH_MARGIN_SECONDS:
            return False
        refresh_at = record.get("refresh_at")
        return not (isinstance(refresh_at, (int, float)) and now >= refresh_at)

    def copilot_token(self, force=False):
        """A valid Copilot token record; exchanges a new one when needed (one thread at a time)."""
        github_token = self.require_github_token()
        record = self._record
        if not force and self._usable(record, github_token):
            return record
        with self._refresh_lock:
            record = self._record
            if not force and self._usable(record, github_token):
                return record  # another thread refreshed while we waited
            if not force and not self._disk_checked:
                self._disk_checked = True
                disk = self.store.load_copilot_token()
                if self._usable(disk, github_token):
                    self._record = disk
                    return disk
            record = self._exchange(github_token)
            self._record = record
            try:
                self.store.save_copilot_token(record)
            except OSError as exc:
                log.warning("could not save the Copilot token to %s: %s", self.store.copilot_token_path, exc)
            return record

    def invalidate(self, token):
        """Forget ``token`` after Copilot answered 401 to it (a newer one is kept)."""
        with self._refresh_lock:
            if self._record is not None and self._record.get("token") == token:
                self._record = None
                self._disk_checked = True

    def _exchange(self, github_token):
        self.exchanges += 1
        try:
            return self._exchange_once(github_token)
        except AuthError:
            self.exchange_failures += 1
            raise

    def _exchange_once(self, github_token):
        url = self.config.github_api_url + "/copilot_internal/v2/token"
        try:
            status, data, raw, _ = self.client.request_json("GET", url, github_headers(github_token))
        except UpstreamUnreachable as exc:
            raise AuthError("cannot get a Copilot token: %s" % exc, code="network")
        if status == 200 and isinstance(data, dict) and isinstance(data.get("token"), str):
            now = self.clock()
            record = dict(data)
            record["expires_at"] = int(data.get("expires_at") or now + 1500)
            refresh_in = data.get("refresh_in")
            if isinstance(refresh_in, (int, float)) and refresh_in > 0:
                record["refresh_at"] = int(now + refresh_in)
            record["obtained_at"] = int(now)
            record["api_endpoint"] = self._api_base_from(data)
            record["github_host"] = self.config.github_host
            record["github_token_sha256"] = self._fingerprint(github_token)
            log.info("copilot token obtained sku=%s expires_in=%s", data.get("sku", "?"),
                     format_duration(record["expires_at"] - now))
            return record
        raise self._exchange_error(status, data, raw, github_token)

    def _exchange_error(self, status, data, raw, github_token):
        message, _ = upstream_error_message(raw)
        details = data.get("error_details") if isinstance(data, dict) else None
        notification = details.get("notification_id") if isinstance(details, dict) else None
        source = self.github_token()[1] or "the saved login"
        if status == 401:
            return AuthError("GitHub rejected the GitHub token from %s (401: it is invalid, expired or "
                             "revoked); run `python3 coproxy.py auth login` again" % source,
                             code="github_token_invalid", status=401)
        if github_token.startswith(("ghp_", "github_pat_")):
            return AuthError("the token from %s is a personal access token; GitHub only exchanges "
                             "tokens from a Copilot login for Copilot tokens. Run `python3 coproxy.py "
                             "auth login` instead (HTTP %d)" % (source, status),
                             code="personal_access_token", status=status)
        if notification:
            hint = _EXCHANGE_HINTS.get(notification, "GitHub refused Copilot access")
            url = details.get("url") if isinstance(details, dict) else None
            return AuthError("%s (%s, HTTP %d)%s" % (hint, notification, status,
                                                       "; see " + url if url else ""),
                             code=notification, status=status)
        if status == 404:
            return AuthError("GitHub has no Copilot token for this account (404): the account has no "
                             "Copilot seat, or the token in %s does not come from a Copilot login "
                             "(gho_ tokens of other OAuth apps are refused); run `python3 coproxy.py "
                             "auth login`" % source, code="no_copilot_access", status=404)
        if status == 403 and "rate limit" in message.lower():
            return AuthError("GitHub API rate limit hit while getting a Copilot token: %s" % message,
                             code="rate_limited", status=403)
        return AuthError("GitHub refused a Copilot token (HTTP %d): %s" % (status, message or "no details"),
                         code="copilot_token_refused", status=status)

    def _api_base_from(self, data):
        endpoints = data.get("endpoints")
        if isinstance(endpoints, dict) and isinstance(endpoints.get("api"), str):
            return endpoints["api"].rstrip("/")
        match = re.search(r"(?:^|;)proxy-ep=([^;:]+)", data.get("token", ""))
        if match:
            host = match.group(1)
            return "https://" + (("api." + host[len("proxy."):]) if host.startswith("proxy.") else host)
        if self.config.is_ghe:
            return "https://copilot-api." + self.config.github_host
        return DEFAULT_COPILOT_API_URL

    def api_base(self, record=None):
        """Base URL of the Copilot API: the override, else what the token says."""
        if self.config.copilot_api_url:
            return self.config.copilot_api_url
        record = record or self.copilot_token()
        return (record.get("api_endpoint") or self._api_base_from(record)).rstrip("/")

    # -- calls that need the tokens ----------------------------------------------------------
    def github_user(self):
        """GET /user: the account's public profile (``login``)."""
        token = self.require_github_token()
        try:
            status, data, raw, _ = self.client.request_json(
                "GET", self.config.github_api_url + "/user", github_headers(token))
        except UpstreamUnreachable as exc:
            raise AuthError(str(exc), code="network")
        if status != 200 or not isinstance(data, dict):
            message, _ = upstream_error_message(raw)
            raise AuthError("GitHub /user answered HTTP %d: %s" % (status, message), status=status)
        return data

    def copilot_user(self):
        """GET /copilot_internal/user: plan, quotas and endpoints of the Copilot account."""
        token = self.require_github_token()
        try:
            status, data, raw, _ = self.client.request_json(
                "GET", self.config.github_api_url + "/copilot_internal/user", github_headers(token))
        except UpstreamUnreachable as exc:
            raise AuthError(str(exc), code="network")
        if status != 200 or not isinstance(data, dict):
            message, _ = upstream_error_message(raw)
            raise AuthError("GitHub /copilot_internal/user answered HTTP %d: %s" % (status, message),
                            status=status)
        return data

    def fetch_models(self, force=False):
        """The Copilot /models list (cached for models_ttl); stale cache if a refresh fails."""
        with self._models_lock:
            now = time.monotonic()
            if not force and self._models is not None and now - self._models_at < self.config.models_ttl:
                return self._models
            try:
                record = self.copilot_token()
                status, data, raw, _ = self.client.request_json(
                    "GET", self.api_base(record) + "/models",
                    copilot_headers(record["token"], intent="model-access"))
                if status == 401:
                    self.invalidate(record["token"])
                    record = self.copilot_token()
                    status, data, raw, _ = self.client.request_json(
                        "GET", self.api_base(record) + "/models",
                        copilot_headers(record["token"], intent="model-access"))
                if status != 200 or not isinstance(data, dict) or not isinstance(data.get("data"), list):
                    message, _ = upstream_error_message(raw)
                    raise UpstreamUnreachable("Copilot /models answered HTTP %d: %s" % (status, message))
            except (UpstreamUnreachable, AuthError):
                if self._models is not None:
                    log.warning("refreshing the model list failed; serving the cached one")
                    return self._models
                raise
            models, seen = [], set()
            for model in data["data"]:
                if isinstance(model, dict) and isinstance(model.get("id"), str) and model["id"] not in seen:
                    seen.add(model["id"])
                    models.append(model)
            self._models, self._models_at = models, now
            return models


# ------------------------------------------------------------------------------------------
# 8. Formats and translation (pure)
#    Dicts in, dicts out; bytes in, events out. No I/O, no clock (callers pass ``now``), no
#    globals. 8a SSE codec, 8b OpenAI chat requests and answers, 8c the chat stream
#    normaliser, 8d error envelopes, 8e the model catalogue and model names, 8f Anthropic
#    Messages <-> OpenAI chat (requests, answers, streams, token estimate), 8g OpenAI chat <->
#    Responses (for responses-only models), embeddings and quota.
# ------------------------------------------------------------------------------------------

# -- 8a. Server-sent events ----------------------------------------------------------------

SSEEvent = collections.namedtuple("SSEEvent", "event data")


class SSEDecoder:
    """Incremental SSE parser (WHATWG rules): LF, CR or CRLF line ends, multi-line ``data:``,
    comments, and UTF-8 characters split across reads (data is decoded per whole event)."""

    def __init__(self):
        self._pending = b""
        self._data = []
        self._event = None

    def feed(self, chunk):
        """Bytes in, complete events out (a list of SSEEvent with ``data`` as str)."""
        buf = self._pending + chunk
        held = b""
        if buf.endswith(b"\r"):  # may be the first half of a CRLF split across reads
            buf, held = buf[:-1], b"\r"
        if b"\r" in buf:
            buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        lines = buf.split(b"\n")
        self._pending = lines.pop() + held
        events = []
        for line in lines:
            if not line:
                if self._data:
                    events.append(SSEEvent(self._event, b"\n".join(self._data).decode("utf-8", "replace")))
                self._data = []
                self._event = None
            elif line[:1] == b":":
                continue
            else:
                field, _, value = line.partition(b":")
                if value[:1] == b" ":
                    value = value[1:]
                if field == b"data":
                    self._data.append(value)
                elif field == b"event":
                    self._event = value.decode("utf-8", "replace")
        return events

    def finish(self):
        """Events still pending when the stream ends without a final blank line."""
        events = self.feed(b"\n\n") if (self._pending.strip(b"\r") or self._data) else []
        self._pending = b""
        return events


def encode_sse(data, event=None):
    """One SSE frame; ``data`` is bytes without newlines (compact JSON always is)."""
    if event:
        return b"event: " + event.encode("ascii") + b"\ndata: " + data + b"\n\n"
    return b"data: " + data + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"
SSE_PING = b": ping\n\n"

# -- 8b. OpenAI chat completions -----------------------------------------------------------

_IMAGE_PART_TYPES = frozenset(["image_url", "image", "input_image"])


def messages_have_image(messages):
    """True if any message carries an image part (Copilot then needs Copilot-Vision-Request)."""
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and part.get("type") in _IMAGE_PART_TYPES:
                    return True
    return False


def chat_initiator(messages):
    """``agent`` when the last message is the assistant's or a tool result, else ``user``.

    Copilot bills a premium request per ``user`` turn; tool loops are follow-ups."""
    if messages and isinstance(messages[-1], dict) and messages[-1].get("role") in ("assistant", "tool"):
        return "agent"
    return "user"


ChatRequest = collections.namedtuple("ChatRequest", "payload model stream include_usage merge_choices "
                                                    "initiator vision")


def prepare_chat_request(payload, default_model=None):
    """Check an OpenAI chat request and work out what the proxy needs to know about it."""
    messages = payload.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ClientError(400, "'messages' must be a non-empty array", param="messages",
                          code="invalid_messages")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ClientError(400, "messages[%d] must be an object with a 'role'" % index,
                              param="messages", code="invalid_messages")
    model = payload.get("model") or default_model
    if not isinstance(model, str) or not model:
        raise ClientError(400, "'model' is required (or start coproxy with --default-model)",
                          param="model", code="model_required")
    payload["model"] = model
    stream = payload.get("stream") is True
    options = payload.get("stream_options")
    include_usage = bool(stream and isinstance(options, dict) and options.get("include_usage"))
    n = payload.get("n")
    merge = not (isinstance(n, int) and n > 1)
    return ChatRequest(payload, model, stream, include_usage, merge, chat_initiator(messages),
                       messages_have_image(messages))


def _merge_finish(current, new):
    """Finish reason of choices merged into one: a tool call wins over everything else."""
    if current == "tool_calls" or new == "tool_calls":
        return "tool_calls"
    return current or new


def merge_choices(choices):
    """Claude via Copilot may put text in choices[0] and tool calls in choices[1]; one choice."""
    merged = dict(choices[0])
    message = dict(merged.get("message") or {"role": "assistant"})
    texts, tool_calls, finish = [], [], None
    for choice in sorted(choices, key=lambda c: c.get("index") or 0):
        part = choice.get("message") or {}
        if isinstance(part.get("content"), str) and part["content"]:
            texts.append(part["content"])
        tool_calls.extend(part.get("tool_calls") or [])
        for key, value in part.items():
            if key not in ("content", "tool_calls") and value is not None and message.get(key) is None:
                message[key] = value
        finish = _merge_finish(finish, choice.get("finish_reason"))
    message["content"] = "".join(texts) if texts else None
    if tool_calls:
        message["tool_calls"] = tool_calls
    merged["message"] = message
    merged["index"] = 0
    merged["finish_reason"] = finish
    return merged


def normalize_chat_response(data, model, merge, now):
    """A complete OpenAI chat.completion from what Copilot returned."""
    if not isinstance(data, dict):
        raise ValueError("answer is not a JSON object")
    choices = [c for c in (data.get("choices") or []) if isinstance(c, dict)]
    if merge and len(choices) > 1:
        choices = [merge_choices(choices)]
    for position, choice in enumerate(choices):
        choice.setdefault("index", position)
        message = choice.get("message")
        if isinstance(message, dict):
            message.pop("padding", None)
            message.setdefault("role", "assistant")
            message.setdefault("content", None)
        choice.setdefault("finish_reason", None)
        choice.setdefault("logprobs", None)
    data["choices"] = choices
    data["id"] = data.get("id") or "chatcmpl-" + random_id()
    data["object"] = "chat.completion"
    data["created"] = data.get("created") or int(now)
    data["model"] = data.get("model") or model
    usage = data.get("usage")
    if not isinstance(usage, dict):
        usage = data["usage"] = {}
    usage.setdefault("prompt_tokens", 0)
    usage.setdefault("completion_tokens", 0)
    usage.setdefault("total_tokens", usage["prompt_tokens"] + usage["completion_tokens"])
    return data


# -- 8c. The chat stream normaliser --------------------------------------------------------

class StreamTranslator:
    """Base of every stream translator (upstream events in, client frames out).

    feed_event(SSEEvent) -> frames; finish() when the upstream ends; error(message) at most once,
    after which nothing more is sent. A subclass says how its dialect frames an error."""

    finished = False
    INCOMPLETE = "Copilot closed the stream before the answer was complete"

    def feed_event(self, event):
        return self.feed(event.data)

    def finish(self):
        return [] if self.finished else self.error(self.INCOMPLETE)

    def error(self, message, code=None):
        if self.finished:
            return []
        self.finished = True
        return self.error_frames(message, code)

    def error_frames(self, message, code):
        raise NotImplementedError


def parse_chat_chunk(data):
    """One chat-completions stream event: (chunk, None); (None, None) to skip it; or
    (None, (message, code)) for a malformed event or an error Copilot reports mid-stream."""
    try:
        chunk = json.loads(data)
    except ValueError:
        return None, ("Copilot sent a malformed stream event", None)
    if not isinstance(chunk, dict):
        return None, None
    if chunk.get("error") and not chunk.get("choices"):
        message, fields = upstream_error_message(json.dumps(chunk))
        return None, (message or "Copilot reported an error mid-stream", fields.get("code"))
    return chunk, None


class ChatStreamNormalizer(StreamTranslator):
    """Copilot chat chunks in, OpenAI chat.completion.chunk SSE frames out.

    What it fixes: chunks without ``object``/``created``/``id``; filter-result and metadata
    chunks with no choices (dropped); usage (sent once, as its own final chunk, only when the
    client asked with stream_options.include_usage); Claude's split choices (merged into
    index 0, tool-call indexes renumbered, one finish_reason at the end); an error object in
    the stream (one OpenAI error event, then the stream ends)."""

    def __init__(self, model, include_usage, merge, now):
        self.model = model
        self.include_usage = include_usage
        self.merge = merge
        self.created = int(now)
        self.id = None
        self.usage = None
        self.finish_reason = None
        self.saw_done = False
        self._tool_index = {}

    def feed(self, data):
        """One upstream event's data (str) → list of SSE frames (bytes)."""
        if self.finished or self.saw_done:
            return []
        if data == "[DONE]" or data.strip() == "[DONE]":
            self.saw_done = True
            return []
        chunk, problem = parse_chat_chunk(data)
        if chunk is None:
            return self.error(*problem) if problem else []
        choices = chunk.get("choices")
        usage = chunk.pop("usage", None)
        if isinstance(usage, dict):
            self.usage = usage
        if not isinstance(choices, list) or not choices:
            return []
        if self.id is None:
            self.id = chunk.get("id") or "chatcmpl-" + random_id()
        chunk["id"] = self.id
        chunk["object"] = "chat.completion.chunk"
        chunk["created"] = chunk.get("created") or self.created
        chunk["model"] = chunk.get("model") or self.model
        if self.merge:
            kept = []
            for choice in choices:
                if not isinstance(choice, dict):
                    continue
                finish = choice.get("finish_reason")
                delta = choice.get("delta")
                source_index = choice.get("index") or 0
                choice["index"] = 0
                if finish:
                    self.finish_reason = _merge_finish(self.finish_reason, finish)
                    choice["finish_reason"] = None
                if isinstance(delta, dict) and delta.get("tool_calls"):
                    for call in delta["tool_calls"]:
                        if isinstance(call, dict):
                            key = (source_index, call.get("index") or 0)
                            call["index"] = self._tool_index.setdefault(key, len(self._tool_index))
                if delta or not finish:
                    kept.append(choice)
            if not kept:
                return []
            chunk["choices"] = kept
        else:
            for choice in choices:
                if isinstance(choice, dict) and choice.get("finish_reason"):
                    self.finish_reason = choice["finish_reason"]
        return [encode_sse(json_dumps(chunk))]

    def _chunk(self, choices, **extra):
        chunk = {"id": self.id or "chatcmpl-" + random_id(), "object": "chat.completion.chunk",
                 "created": self.created, "model": self.model, "choices": choices}
        chunk.update(extra)
        return encode_sse(json_dumps(chunk))

    def finish(self):
        """Frames that close a stream that ended (with or without [DONE])."""
        if self.finished or (not self.saw_done and self.finish_reason is None):
            return super().finish()
        frames = []
        if self.merge and self.finish_reason:
            frames.append(self._chunk([{"index": 0, "delta": {}, "finish_reason": self.finish_reason,
                                        "logprobs": None}]))
        if self.include_usage and self.usage is not None:
            frames.append(self._chunk([], usage=self.usage))
        frames.append(SSE_DONE)
        return frames

    def error_frames(self, message, code):
        return [encode_sse(json_dumps(openai_error_body(message, "api_error", code or "upstream_stream_error")))]


# -- 8d. Error envelopes -------------------------------------------------------------------

def openai_error_body(message, kind="api_error", code=None, param=None):
    """``{"error": {"message", "type", "param", "code"}}``, OpenAI's envelope."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


_ANTHROPIC_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                          404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                          503: "overloaded_error", 529: "overloaded_error"}


def anthropic_error_body(status, message):
    """``{"type": "error", "error": {"type", "message"}}``, Anthropic's envelope."""
    kind = _ANTHROPIC_ERROR_TYPES.get(status) or ("invalid_request_error" if 400 <= status < 500 else "api_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def client_error_from_upstream(status, raw, headers=None):
    """A ClientError that keeps the upstream status, message, code and retry-after."""
    message, fields = upstream_error_message(raw)
    if not message:
        message = "Copilot answered HTTP %d %s" % (status, REASONS.get(status, ""))
    kind = fields.get("type") if isinstance(fields.get("type"), str) and fields.get("type") else None
    if kind in (None, "error", ""):
        kind = error_type_for_status(status)
    code = fields.get("code") if isinstance(fields.get("code"), (str, int)) and fields.get("code") != "" else None
    param = fields.get("param") if isinstance(fields.get("param"), str) and fields.get("param") else None
    passed = []
    for name in ("retry-after", "x-ratelimit-exceeded"):
        value = headers.get(name) if headers is not None else None
        if value:
            passed.append((name.title() if name == "retry-after" else name, value))
    return ClientError(status, message, kind=kind, code=code, param=param, headers=passed)


# -- 8e. The model catalogue ---------------------------------------------------------------

#: Served by /v1/models when Copilot cannot be reached (seed behaviour); shaped like /models.
FALLBACK_MODELS = [
    {"id": "gpt-4.1", "name": "GPT-4.1", "vendor": "Azure OpenAI",
     "capabilities": {"type": "chat", "limits": {"max_context_window_tokens": 128000, "max_output_tokens": 16384},
                      "supports": {"tool_calls": True, "vision": True, "streaming": True}}},
    {"id": "gpt-4o", "name": "GPT-4o", "vendor": "Azure OpenAI",
     "capabilities": {"type": "chat", "limits": {"max_context_window_tokens": 128000, "max_output_tokens": 4096},
                      "supports": {"tool_calls": True, "vision": True, "streaming": True}}},
    {"id": "gpt-5-mini", "name": "GPT-5 mini", "vendor": "Azure OpenAI",
     "capabilities": {"type": "chat", "limits": {"max_context_window_tokens": 264000, "max_output_tokens": 64000},
                      "supports": {"tool_calls": True, "vision": True, "streaming": True}}},
    {"id": "claude-sonnet-4.5", "name": "Claude Sonnet 4.5", "vendor": "Anthropic",
     "capabilities": {"type": "chat", "limits": {"max_context_window_tokens": 200000, "max_output_tokens": 32000},
                      "supports": {"tool_calls": True, "vision": True, "streaming": True}}},
    {"id": "gemini-2.5-pro", "name": "Gemini 2.5 Pro", "vendor": "Google",
     "capabilities": {"type": "chat", "limits": {"max_context_window_tokens": 128000, "max_output_tokens": 64000},
                      "supports": {"tool_calls": True, "vision": True, "streaming": True}}},
    {"id": "text-embedding-3-small", "name": "Embedding V3 small", "vendor": "Azure OpenAI",
     "capabilities": {"type": "embeddings", "limits": {"max_inputs": 512}, "supports": {"dimensions": True}}},
]


def copilot_model_to_openai(model):
    """One Copilot /models entry in OpenAI's model shape, plus the extras clients find useful."""
    caps = model.get("capabilities") if isinstance(model.get("capabilities"), dict) else {}
    limits = caps.get("limits") if isinstance(caps.get("limits"), dict) else {}
    supports = caps.get("supports") if isinstance(caps.get("supports"), dict) else {}
    vendor = model.get("vendor") or "GitHub Copilot"
    entry = {
        "id": model["id"], "object": "model", "created": 0,
        "owned_by": re.sub(r"[^a-z0-9]+", "-", vendor.lower()).strip("-"),
        "name": model.get("name") or model["id"], "vendor": vendor,
        "type": caps.get("type") or "chat",
        "context_window": limits.get("max_context_window_tokens"),
        "max_prompt_tokens": limits.get("max_prompt_tokens"),
        "max_output_tokens": limits.get("max_output_tokens"),
        "capabilities": {"tool_calls": bool(supports.get("tool_calls")),
                         "vision": bool(supports.get("vision")),
                         "streaming": bool(supports.get("streaming", caps.get("type", "chat") == "chat")),
                         "structured_outputs": bool(supports.get("structured_outputs")),
                         "reasoning_effort": supports.get("reasoning_effort")},
    }
    for key in ("supported_endpoints", "preview", "billing", "model_picker_enabled"):
        if key in model:
            entry[key] = model[key]
    if isinstance(model.get("policy"), dict):
        entry["policy_state"] = model["policy"].get("state")
    return entry


_DATE_SUFFIX = re.compile(r"-(?:20\d{6}|latest)$")


def _version_key(model_id):
    """Sort key that puts newer versions last: claude-sonnet-4.5 > claude-sonnet-4 > -3.7."""
    return [int(part) if part.isdigit() else -1 for part in re.split(r"[.-]", model_id)]


def resolve_model(name, ids):
    """The catalog id a client's model name means, or None.

    Handles Anthropic-style names (``claude-sonnet-4-5``, dated ``claude-sonnet-4-5-20250929``,
    ``claude-opus-4-6[1m]``) against Copilot's dotted ids (``claude-sonnet-4.5``), and the bare
    families ``opus``/``sonnet``/``haiku`` (newest in the catalog)."""
    if name in ids:
        return name
    lowered = {i.lower(): i for i in ids}
    wanted = name.strip().lower().replace("[1m]", "-1m")
    wanted = _DATE_SUFFIX.sub("", wanted)
    # 4-5 is version 4.5, but the 1 of "-1m" (the 1M-context variant) is not a minor version.
    for candidate in (wanted, re.sub(r"(?<=\d)-(?=\d+(?:-|$))", ".", wanted)):
        if candidate in lowered:
            return lowered[candidate]
    family = re.match(r"^(?:claude-)?(opus|sonnet|haiku)(?:-(\d+(?:[.-]\d+)?))?$", wanted)
    if family:
        prefix = "claude-" + family.group(1)
        if family.group(2):
            prefix += "-" + family.group(2).replace("-", ".")
        matches = [i for i in ids if (i.lower() == prefix or i.lower().startswith(prefix + ".")
                                      or i.lower().startswith(prefix + "-"))
                   and not i.lower().endswith("-1m")]
        if matches:
            return max(matches, key=_version_key)
    return None


def unknown_model_error(name, ids):
    """404 model_not_found that suggests the catalog ids closest to what was asked for."""
    import difflib  # only for this message
    close = difflib.get_close_matches(name.lower(), [i.lower() for i in ids], n=4, cutoff=0.4)
    by_lower = {i.lower(): i for i in ids}
    hint = "; did you mean %s?" % ", ".join(by_lower[c] for c in close) if close else ""
    return ClientError(404, "model %r is not in your Copilot catalog%s (GET /v1/models lists them)" % (name, hint),
                       code="model_not_found", param="model")


def check_chat_capabilities(payload, info, vision):
    """400 before any upstream call for what the model is known not to accept."""
    caps = info.get("capabilities") if isinstance(info.get("capabilities"), dict) else {}
    supports = caps.get("supports") if isinstance(caps.get("supports"), dict) else {}
    if vision and supports.get("vision") is False:
        raise ClientError(400, "model %s does not accept images; pick one with vision (see GET /v1/models)" % info["id"],
                          code="model_without_vision", param="messages")
    effort = payload.get("reasoning_effort")
    allowed = supports.get("reasoning_effort")
    if effort is not None and isinstance(allowed, list) and effort not in allowed:
        raise ClientError(400, "reasoning_effort %r is not accepted by %s; allowed: %s" % (
            effort, info["id"], ", ".join(map(str, allowed))), code="invalid_reasoning_effort", param="reasoning_effort")


_SCHEMA_CHILDREN = ("properties", "patternProperties", "$defs", "definitions")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")


def is_gemini(model, info=None):
    vendor = info.get("vendor") if isinstance(info, dict) else None
    return model.lower().startswith("gemini") or (isinstance(vendor, str) and vendor.lower() == "google")


def _json_type(values):
    """The one JSON Schema type all of ``values`` have (bool before int: True is an int), or None."""
    for name, kinds in (("boolean", bool), ("integer", int), ("number", (int, float))):
        if all(isinstance(v, kinds) and (name == "boolean" or not isinstance(v, bool)) for v in values):
            return name
    return None


def gemini_schema(schema, depth=0):
    """A copy of a JSON Schema that Gemini accepts: it refuses (with a bare 400 for the whole
    request) ``type`` lists and non-string ``enum`` members, both valid JSON Schema.
    ``["X", "null"]`` becomes ``X`` + ``nullable``; other type lists become ``string`` (or
    their first type) with the choice in the description; a string enum gets string members;
    any other enum moves into the description, so the model still sees the allowed values."""
    if not isinstance(schema, dict) or depth > 64:
        return schema
    out = dict(schema)
    notes = []
    kind = out.get("type")
    if isinstance(kind, list):
        real = [t for t in kind if t != "null"]
        if "null" in kind:
            out["nullable"] = True
        if len(real) > 1:
            notes.append("Any of these types: %s." % ", ".join(map(str, real)))
        out["type"] = "string" if len(real) != 1 and ("string" in real or not real) else real[0]
    enum = out.get("enum")
    if isinstance(enum, list) and not all(isinstance(v, str) for v in enum):
        if None in enum:
            out["nullable"] = True
        values = [v for v in enum if v is not None]
        if out.get("type") is None and values and not any(isinstance(v, str) for v in values):
            out["type"] = _json_type(values)
        if out.get("type") in (None, "string"):
            out["enum"] = [v if isinstance(v, str) else json.dumps(v) for v in values]
        else:
            del out["enum"]
            notes.append("One of: %s." % ", ".join(json.dumps(v) for v in values))
    if notes:
        described = out.get("description").strip() if isinstance(out.get("description"), str) else ""
        if described and described[-1] not in ".!?:":
            described += "."
        out["description"] = " ".join(([described] if described else []) + notes)
    for key in _SCHEMA_CHILDREN:
        if isinstance(out.get(key), dict):
            out[key] = {name: gemini_schema(child, depth + 1) for name, child in out[key].items()}
    for key in _SCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [gemini_schema(child, depth + 1) for child in out[key]]
    for key in ("items", "additionalProperties", "not", "contains"):
        if isinstance(out.get(key), dict):
            out[key] = gemini_schema(out[key], depth + 1)
        elif key == "items" and isinstance(out.get(key), list):
            out[key] = [gemini_schema(child, depth + 1) for child in out[key]]
    return out


def gemini_tools(payload):
    """Make the function tools' parameter schemas of a chat request acceptable to Gemini."""
    for tool in payload.get("tools") if isinstance(payload.get("tools"), list) else []:
        function = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(function, dict) and isinstance(function.get("parameters"), dict):
            function["parameters"] = gemini_schema(function["parameters"])


def endpoint_for(info, wanted):
    """Copilot path to use for a model: ``wanted`` unless the catalog says it only has /responses."""
    endpoints = info.get("supported_endpoints")
    if isinstance(endpoints, list) and endpoints and wanted not in endpoints and "/responses" in endpoints:
        return "/responses"
    return wanted


# -- 8f. Anthropic Messages <-> OpenAI chat ------------------------------------------------

def _blocks(content):
    """Anthropic content as a list of blocks (a plain string is one text block)."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return [b for b in content if isinstance(b, dict)] if isinstance(content, list) else []


def _image_part(block):
    source = block.get("source") if isinstance(block.get("source"), dict) else {}
    if source.get("type") == "base64":
        url = "data:%s;base64,%s" % (source.get("media_type", "image/png"), source.get("data", ""))
    else:
        url = source.get("url", "")
    return {"type": "image_url", "image_url": {"url": url}}


def _text_of(blocks):
    return "\n\n".join(b.get("text", "") for b in blocks if b.get("type") == "text" and b.get("text"))


def anthropic_messages_have_image(payload):
    for message in payload.get("messages") or []:
        for block in _blocks(message.get("content") if isinstance(message, dict) else None):
            if block.get("type") == "image":
                return True
            if block.get("type") == "tool_result" and any(
                    b.get("type") == "image" for b in _blocks(block.get("content"))):
                return True
    return False


def anthropic_initiator(messages):
    """``user`` only when the last turn is the user's with real content; a turn that carries
    tool results (even with reminder text after them) is the agent's follow-up."""
    if not messages or not isinstance(messages[-1], dict) or messages[-1].get("role") != "user":
        return "agent"
    blocks = _blocks(messages[-1].get("content"))
    if any(b.get("type") == "tool_result" for b in blocks):
        return "agent"
    if len(messages) == 1 and [b.get("type") for b in blocks] == ["text"] and blocks[0].get("text", "").strip() == "Warmup":
        return "agent"  # Claude Code's start-up probe (2.0.28+): the tool's request, not the person's
    if any((b.get("type") == "text" and b.get("text", "").strip()) or b.get("type") in ("image", "document")
           for b in blocks):
        return "user"
    return "agent"


def validate_anthropic_request(payload):
    messages = payload.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ClientError(400, "messages: must be a non-empty array", param="messages")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant", "system"):
            raise ClientError(400, "messages.%d: role must be 'user' or 'assistant'" % index, param="messages")
    if not isinstance(payload.get("model"), str) or not payload["model"]:
        raise ClientError(400, "model: field required", param="model")
    if not isinstance(payload.get("max_tokens"), int):
        raise ClientError(400, "max_tokens: field required (an integer)", param="max_tokens")


def anthropic_to_openai_request(payload, model_info=None):
    """An Anthropic Messages request as an OpenAI chat request for Copilot."""
    messages = []
    system = payload.get("system")
    system_text = system if isinstance(system, str) else _text_of(_blocks(system))
    if system_text:
        messages.append({"role": "system", "content": system_text})
    for message in payload["messages"]:
        role = message.get("role")
        blocks = _blocks(message.get("content"))
        if role == "system":  # Claude Code 2.1 sends these inside messages
            text = message["content"] if isinstance(message.get("content"), str) else _text_of(blocks)
            messages.append({"role": "system", "content": text})
        elif role == "assistant":
            out = {"role": "assistant", "content": _text_of(blocks) or None}
            thinking = [b for b in blocks if b.get("type") == "thinking"]
            if thinking:
                out["reasoning_text"] = "".join(b.get("thinking", "") for b in thinking)
                signature = next((b.get("signature") for b in thinking if b.get("signature")), None)
                if signature:
                    out["reasoning_opaque"] = signature
            calls = [{"id": b.get("id"), "type": "function",
                      "function": {"name": b.get("name"), "arguments": json.dumps(b.get("input") or {})}}
                     for b in blocks if b.get("type") == "tool_use"]
            if calls:
                out["tool_calls"] = calls
            messages.append(out)
        else:
            # Tool results answer the previous assistant turn, so they go first (OpenAI order).
            images = []
            for block in blocks:
                if block.get("type") == "tool_result":
                    inner = _blocks(block.get("content"))
                    text = block["content"] if isinstance(block.get("content"), str) else _text_of(inner)
                    if block.get("is_error"):
                        text = "Error: " + text
                    messages.append({"role": "tool", "tool_call_id": block.get("tool_use_id"), "content": text})
                    images.extend(_image_part(b) for b in inner if b.get("type") == "image")
            rest = [b for b in blocks if b.get("type") in ("text", "image")]
            if any(b.get("type") == "image" for b in rest) or images:
                parts = [{"type": "text", "text": b["text"]} if b["type"] == "text" else _image_part(b)
                         for b in rest if b.get("type") == "image" or b.get("text")]
                messages.append({"role": "user", "content": images + parts})
            elif rest and _text_of(rest):
                messages.append({"role": "user", "content": _text_of(rest)})
    request = {"model": payload["model"], "messages": messages, "max_tokens": payload["max_tokens"]}
    if payload.get("stream"):
        request["stream"] = True
        request["stream_options"] = {"include_usage": True}
    for source, target in (("temperature", "temperature"), ("top_p", "top_p"), ("stop_sequences", "stop")):
        if payload.get(source) is not None:
            request[target] = payload[source]
    metadata = payload.get("metadata")
    if isinstance(metadata, dict) and metadata.get("user_id"):
        request["user"] = metadata["user_id"]
    tools = payload.get("tools")
    if isinstance(tools, list) and tools:
        request["tools"] = [{"type": "function", "function": {
            "name": t.get("name"), "description": t.get("description", ""),
            "parameters": t.get("input_schema") or {"type": "object", "properties": {}}}}
            for t in tools if isinstance(t, dict) and t.get("name")]
    choice = payload.get("tool_choice")
    if isinstance(choice, dict):
        kind = choice.get("type")
        if kind == "auto":
            request["tool_choice"] = "auto"
        elif kind == "any":
            request["tool_choice"] = "required"
        elif kind == "none":
            request["tool_choice"] = "none"
        elif kind == "tool" and choice.get("name"):
            request["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
        if choice.get("disable_parallel_tool_use") and "tools" in request:
            request["parallel_tool_calls"] = False
    thinking = payload.get("thinking")
    if isinstance(thinking, dict) and thinking.get("type") == "enabled" and thinking.get("budget_tokens"):
        supports = ((model_info or {}).get("capabilities") or {}).get("supports") or {}
        limits = ((model_info or {}).get("capabilities") or {}).get("limits") or {}
        budget = max(int(thinking["budget_tokens"]), int(supports.get("min_thinking_budget") or 1024))
        ceiling = [v for v in (supports.get("max_thinking_budget"),
                               (limits.get("max_output_tokens") or 0) - 1) if isinstance(v, int) and v > 0]
        request["thinking_budget"] = min([budget] + ceiling)
    return request


_STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use",
                 "function_call": "tool_use", "content_filter": "end_turn"}


def _anthropic_usage(usage):
    usage = usage if isinstance(usage, dict) else {}
    details = usage.get("prompt_tokens_details") if isinstance(usage.get("prompt_tokens_details"), dict) else {}
    cached = details.get("cached_tokens") or 0
    out = {"input_tokens": max(0, (usage.get("prompt_tokens") or 0) - cached),
           "output_tokens": usage.get("completion_tokens") or 0}
    if cached:
        out["cache_read_input_tokens"] = cached
    return out


def _parse_arguments(text):
    try:
        value = json.loads(text) if text else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def openai_to_anthropic_response(data, model):
    """A Copilot chat completion as an Anthropic message (all choices read: Claude splits them)."""
    thinking, texts, tools, finish = [], [], [], None
    for choice in sorted((c for c in data.get("choices") or [] if isinstance(c, dict)),
                         key=lambda c: c.get("index") or 0):
        message = choice.get("message") or {}
        if message.get("reasoning_text") or message.get("reasoning_opaque"):
            thinking.append({"type": "thinking", "thinking": message.get("reasoning_text") or "",
                             "signature": message.get("reasoning_opaque") or ""})
        content = message.get("content")
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if content:
            texts.append({"type": "text", "text": content})
        for call in message.get("tool_calls") or []:
            function = call.get("function") or {}
            tools.append({"type": "tool_use", "id": call.get("id") or "toolu_" + random_id(24),
                          "name": function.get("name"), "input": _parse_arguments(function.get("arguments"))})
        finish = _merge_finish(finish, choice.get("finish_reason"))
    stop_reason = "tool_use" if tools else _STOP_REASONS.get(finish, "end_turn" if finish else None)
    return {"id": data.get("id") or "msg_" + random_id(), "type": "message", "role": "assistant",
            "model": data.get("model") or model, "content": thinking + texts + tools,
            "stop_reason": stop_reason, "stop_sequence": None, "usage": _anthropic_usage(data.get("usage"))}


class AnthropicStreamTranslator(StreamTranslator):
    """OpenAI chat chunks in, Anthropic Messages stream events out, in Anthropic's exact order:
    message_start, then per block content_block_start/delta.../stop, then message_delta (with
    usage, held back until the upstream ends because Copilot sends usage last) and message_stop."""

    def __init__(self, model, estimated_input_tokens=0):
        self.model = model
        self.estimated_input_tokens = estimated_input_tokens
        self.started = False
        self.index = -1
        self.open_type = None
        self.tool_blocks = {}
        self.usage = None
        self.finish_reason = None
        self.saw_tool = False
        self.id = None

    @staticmethod
    def frame(event, data):
        return encode_sse(json_dumps(data), event)

    def _start(self, chunk_id=None):
        if self.started:
            return []
        self.started = True
        self.id = "msg_" + (chunk_id or random_id())
        return [self.frame("message_start", {"type": "message_start", "message": {
            "id": self.id, "type": "message", "role": "assistant", "content": [], "model": self.model,
            "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": self.estimated_input_tokens, "output_tokens": 0}}})]

    def _close(self):
        if self.open_type is None:
            return []
        self.open_type = None
        return [self.frame("content_block_stop", {"type": "content_block_stop", "index": self.index})]

    def _open(self, block):
        out = self._close()
        self.index += 1
        self.open_type = block["type"]
        out.append(self.frame("content_block_start", {"type": "content_block_start", "index": self.index,
                                                      "content_block": block}))
        return out

    def _delta(self, delta, index=None):
        return self.frame("content_block_delta", {"type": "content_block_delta",
                                                  "index": self.index if index is None else index, "delta": delta})

    def feed(self, data):
        """One upstream event's data (str) → list of SSE frames (bytes)."""
        if self.finished or data.strip() == "[DONE]":
            return []
        chunk, problem = parse_chat_chunk(data)
        if chunk is None:
            return self.error(problem[0]) if problem else []
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        out = []
        for choice in chunk.get("choices") or []:
            if not isinstance(choice, dict):
                continue
            out.extend(self._start(chunk.get("id")))
            delta = choice.get("delta") or {}
            if delta.get("reasoning_text"):
                if self.open_type != "thinking":
                    out.extend(self._open({"type": "thinking", "thinking": ""}))
                out.append(self._delta({"type": "thinking_delta", "thinking": delta["reasoning_text"]}))
            if delta.get("reasoning_opaque"):
                if self.open_type != "thinking":
                    out.extend(self._open({"type": "thinking", "thinking": ""}))
                out.append(self._delta({"type": "signature_delta", "signature": delta["reasoning_opaque"]}))
                out.extend(self._close())
            content = delta.get("content")
            if isinstance(content, str) and content:
                if self.open_type != "text":
                    out.extend(self._open({"type": "text", "text": ""}))
                out.append(self._delta({"type": "text_delta", "text": content}))
            for call in delta.get("tool_calls") or []:
                if not isinstance(call, dict):
                    continue
                key = (choice.get("index") or 0, call.get("index") or 0)
                function = call.get("function") or {}
                if key not in self.tool_blocks or call.get("id"):
                    out.extend(self._open({"type": "tool_use", "id": call.get("id") or "toolu_" + random_id(24),
                                           "name": function.get("name") or "", "input": {}}))
                    self.tool_blocks[key] = self.index
                    self.saw_tool = True
                if function.get("arguments"):
                    out.append(self._delta({"type": "input_json_delta", "partial_json": function["arguments"]},
                                           self.tool_blocks[key]))
            if choice.get("finish_reason"):
                self.finish_reason = _merge_finish(self.finish_reason, choice["finish_reason"])
        return out

    def finish(self):
        """The closing events: message_delta with the usage, then message_stop."""
        if self.finished:
            return []
        out = self._start() + self._close()
        self.finished = True
        stop_reason = "tool_use" if self.saw_tool else _STOP_REASONS.get(self.finish_reason, "end_turn")
        usage = _anthropic_usage(self.usage)
        if not self.usage:
            usage["input_tokens"] = self.estimated_input_tokens
        out.append(self.frame("message_delta", {"type": "message_delta",
                                                "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                                                "usage": usage}))
        out.append(self.frame("message_stop", {"type": "message_stop"}))
        return out

    def error_frames(self, message, code):
        return [self.frame("error", anthropic_error_body(500, message))]


class AnthropicPassthrough(StreamTranslator):
    """Native Copilot /v1/messages events passed on as they come (re-framed per event so pings
    never land inside one); a stream that ends without message_stop gets an error event."""

    def feed_event(self, event):
        if self.finished:
            return []
        if event.event in ("message_stop", "error"):
            self.finished = True
        return [encode_sse(event.data.encode("utf-8"), event.event)]

    def error_frames(self, message, code):
        return [encode_sse(json_dumps(anthropic_error_body(500, message)), "error")]


ANTHROPIC_PING = encode_sse(b'{"type":"ping"}', "ping")
#: anthropic-beta values Copilot's /v1/messages is known to accept (VS Code filters the same way).
SUPPORTED_ANTHROPIC_BETAS = ("interleaved-thinking-", "context-management-", "advanced-tool-use-")


def estimate_input_tokens(payload):
    """A deliberately high estimate of the prompt tokens of an Anthropic request.

    Claude Code compacts its context from this number, so undercounting is the costly error.
    Every ASCII run counts one token per 3 characters (real tokenizers average 3.5-4.5 for
    English and code), every other character one token (CJK is about 1 per character), each
    image 1,600 tokens (Anthropic's cost of the largest image it accepts), plus per-message and
    tool-definition overheads, then 10% on top."""
    def text_tokens(text):
        ascii_chars = sum(1 for ch in text if ord(ch) < 128)
        return (ascii_chars + 2) // 3 + (len(text) - ascii_chars)

    def content_tokens(content):
        total = 0
        for block in _blocks(content):
            kind = block.get("type")
            if kind == "image" or kind == "document":
                total += 1600
            elif kind == "tool_result":
                total += 10 + content_tokens(block.get("content"))
            elif kind == "tool_use":
                total += 10 + text_tokens(block.get("name", "") + json.dumps(block.get("input") or {}))
            elif kind == "thinking":
                total += text_tokens(block.get("thinking", ""))
            else:
                total += text_tokens(block.get("text", "") if kind == "text" else json.dumps(block))
        return total

    total = 8 + content_tokens(payload.get("system") or "")
    for message in payload.get("messages") or []:
        if isinstance(message, dict):
            total += 7 + content_tokens(message.get("content"))
    for tool in payload.get("tools") or []:
        total += 30 + text_tokens(json.dumps(tool, separators=(",", ":")))
    if payload.get("tools"):
        total += 350  # the tool-use system prompt Anthropic adds
    return int(total * 1.1) + 1


# -- 8g. OpenAI chat <-> Responses, embeddings, quota --------------------------------------

def _plain_text(content):
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content or [] if isinstance(p, dict) and isinstance(p.get("text"), str))


def chat_to_responses_request(payload):
    """An OpenAI chat request as a Responses request (for models Copilot serves only there)."""
    items = []
    for message in payload["messages"]:
        role, content = message.get("role"), message.get("content")
        if role in ("system", "developer"):
            items.append({"type": "message", "role": "developer",
                          "content": [{"type": "input_text", "text": _plain_text(content)}]})
        elif role == "user":
            if isinstance(content, str):
                parts = [{"type": "input_text", "text": content}]
            else:
                parts = []
                for part in content or []:
                    if not isinstance(part, dict):
                        continue
                    if part.get("type") == "text":
                        parts.append({"type": "input_text", "text": part.get("text", "")})
                    elif part.get("type") == "image_url":
                        image = part.get("image_url") if isinstance(part.get("image_url"), dict) else {"url": part.get("image_url")}
                        parts.append({"type": "input_image", "image_url": image.get("url"),
                                      "detail": image.get("detail") or "auto"})
            items.append({"type": "message", "role": "user", "content": parts})
        elif role == "assistant":
            text = _plain_text(content)
            if text:
                items.append({"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": text}]})
            for call in message.get("tool_calls") or []:
                function = call.get("function") or {}
                items.append({"type": "function_call", "call_id": call.get("id"), "name": function.get("name"),
                              "arguments": function.get("arguments") or "{}"})
        elif role == "tool":
            items.append({"type": "function_call_output", "call_id": message.get("tool_call_id"),
                          "output": _plain_text(content)})
    request = {"model": payload["model"], "input": items, "store": False}
    if payload.get("stream"):
        request["stream"] = True
    limit = payload.get("max_completion_tokens") or payload.get("max_tokens")
    if limit:
        request["max_output_tokens"] = limit
    for key in ("temperature", "top_p", "parallel_tool_calls", "user"):
        if payload.get(key) is not None:
            request[key] = payload[key]
    if payload.get("reasoning_effort"):
        request["reasoning"] = {"effort": payload["reasoning_effort"]}
    tools = [t.get("function") for t in payload.get("tools") or [] if isinstance(t, dict) and t.get("function")]
    if tools:
        request["tools"] = [dict({"type": "function", "name": f.get("name"), "description": f.get("description", ""),
                                  "parameters": f.get("parameters") or {"type": "object", "properties": {}}},
                                 **({"strict": f["strict"]} if "strict" in f else {})) for f in tools]
    choice = payload.get("tool_choice")
    if isinstance(choice, str):
        request["tool_choice"] = choice
    elif isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        request["tool_choice"] = {"type": "function", "name": choice["function"].get("name")}
    fmt = payload.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema" and isinstance(fmt.get("json_schema"), dict):
        schema = fmt["json_schema"]
        request["text"] = {"format": dict({"type": "json_schema", "name": schema.get("name", "response"),
                                           "schema": schema.get("schema", {})},
                                          **({"strict": schema["strict"]} if "strict" in schema else {}))}
    elif isinstance(fmt, dict) and fmt.get("type") == "json_object":
        request["text"] = {"format": {"type": "json_object"}}
    return request


def _responses_usage(usage):
    usage = usage if isinstance(usage, dict) else {}
    out = {"prompt_tokens": usage.get("input_tokens") or 0, "completion_tokens": usage.get("output_tokens") or 0}
    out["total_tokens"] = usage.get("total_tokens") or out["prompt_tokens"] + out["completion_tokens"]
    details = usage.get("input_tokens_details")
    if isinstance(details, dict) and details.get("cached_tokens"):
        out["prompt_tokens_details"] = {"cached_tokens": details["cached_tokens"]}
    details = usage.get("output_tokens_details")
    if isinstance(details, dict) and details.get("reasoning_tokens"):
        out["completion_tokens_details"] = {"reasoning_tokens": details["reasoning_tokens"]}
    return out


def _responses_finish(response, saw_tool):
    if saw_tool:
        return "tool_calls"
    details = response.get("incomplete_details") if isinstance(response.get("incomplete_details"), dict) else {}
    if response.get("status") == "incomplete":
        return "length" if details.get("reason") == "max_output_tokens" else "content_filter"
    return "stop"


def responses_to_chat_response(data, model, now):
    """A Responses answer as an OpenAI chat.completion."""
    texts, calls = [], []
    for item in data.get("output") or []:
        if not isinstance(item, dict):
            continue
        if item.get("type") == "message":
            texts.extend(p.get("text") or p.get("refusal") or "" for p in item.get("content") or [] if isinstance(p, dict))
        elif item.get("type") == "function_call":
            calls.append({"id": item.get("call_id") or item.get("id"), "type": "function",
                          "function": {"name": item.get("name"), "arguments": item.get("arguments") or "{}"}})
    message = {"role": "assistant", "content": "".join(texts) or None}
    if calls:
        message["tool_calls"] = calls
    return {"id": "chatcmpl-" + str(data.get("id") or random_id()), "object": "chat.completion",
            "created": int(data.get("created_at") or now), "model": data.get("model") or model,
            "choices": [{"index": 0, "message": message, "finish_reason": _responses_finish(data, bool(calls)),
                         "logprobs": None}],
            "usage": _responses_usage(data.get("usage"))}


class ResponsesToChatStream(StreamTranslator):
    """Responses stream events in, OpenAI chat.completion.chunk frames out."""

    def __init__(self, model, include_usage, now):
        self.model = model
        self.include_usage = include_usage
        self.created = int(now)
        self.id = "chatcmpl-" + random_id()
        self.started = False
        self.tools = {}
        self.arguments_seen = set()

    def _chunk(self, delta, finish=None, **extra):
        chunk = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                 "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
        chunk.update(extra)
        return encode_sse(json_dumps(chunk))

    def feed_event(self, event):
        if self.finished:
            return []
        try:
            data = json.loads(event.data)
        except ValueError:
            return self.error("Copilot sent a malformed stream event")
        if not isinstance(data, dict):
            return []
        kind = data.get("type") or event.event
        out = []
        if not self.started:
            self.started = True
            out.append(self._chunk({"role": "assistant", "content": ""}))
        if kind == "response.output_text.delta":
            out.append(self._chunk({"content": data.get("delta", "")}))
        elif kind in ("response.output_item.added", "response.output_item.done"):
            item = data.get("item") if isinstance(data.get("item"), dict) else {}
            if item.get("type") == "function_call":
                position = data.get("output_index")
                if position not in self.tools:
                    self.tools[position] = len(self.tools)
                    out.append(self._chunk({"tool_calls": [{"index": self.tools[position], "id": item.get("call_id"),
                                                            "type": "function", "function": {
                                                                "name": item.get("name"), "arguments": ""}}]}))
                if kind == "response.output_item.done" and position not in self.arguments_seen and item.get("arguments"):
                    out.append(self._chunk({"tool_calls": [{"index": self.tools[position],
                                                            "function": {"arguments": item["arguments"]}}]}))
        elif kind == "response.function_call_arguments.delta":
            position = data.get("output_index")
            if position in self.tools:
                self.arguments_seen.add(position)
                out.append(self._chunk({"tool_calls": [{"index": self.tools[position],
                                                        "function": {"arguments": data.get("delta", "")}}]}))
        elif kind in ("response.completed", "response.incomplete"):
            response = data.get("response") if isinstance(data.get("response"), dict) else {}
            self.finished = True
            out.append(self._chunk({}, _responses_finish(response, bool(self.tools))))
            if self.include_usage:
                usage_chunk = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                               "model": self.model, "choices": [], "usage": _responses_usage(response.get("usage"))}
                out.append(encode_sse(json_dumps(usage_chunk)))
            out.append(SSE_DONE)
        elif kind in ("response.failed", "error"):
            response = data.get("response") if isinstance(data.get("response"), dict) else data
            error = response.get("error") if isinstance(response.get("error"), dict) else response
            out.extend(self.error(error.get("message") or "Copilot reported an error mid-stream"))
        return out

    def error_frames(self, message, code):
        return [encode_sse(json_dumps(openai_error_body(message, "api_error", code or "upstream_stream_error")))]


class ResponsesPassthrough(StreamTranslator):
    """Copilot's Responses events passed on as they come; an error event if the stream breaks off."""

    _FINAL = ("response.completed", "response.failed", "response.incomplete", "error")

    def feed_event(self, event):
        if self.finished:
            return []
        kind = event.event
        if kind is None and '"type"' in event.data:
            match = re.search(r'"type"\s*:\s*"([^"]+)"', event.data)
            kind = match.group(1) if match else None
        if kind in self._FINAL:
            self.finished = True
        return [encode_sse(event.data.encode("utf-8"), event.event)]

    def error_frames(self, message, code):
        return [encode_sse(json_dumps({"type": "error", "code": code or "upstream_stream_error", "message": message,
                                       "param": None}), "error")]


class ChainedTranslator(StreamTranslator):
    """Two translators in a row (Responses → chat → Anthropic): the first one's frames are decoded
    back into events for the second, so each translation is written once."""

    def __init__(self, first, second):
        self.first = first
        self.second = second
        self._decoder = SSEDecoder()

    def _through(self, frames):
        out = []
        for event in self._decoder.feed(b"".join(frames)):
            out.extend(self.second.feed_event(event))
        self.finished = self.second.finished
        return out

    def feed_event(self, event):
        return self._through(self.first.feed_event(event))

    def finish(self):
        out = self._through(self.first.finish())
        return out if self.second.finished else out + self.second.finish()

    def error(self, message, code=None):
        self.finished = True
        return self.second.error(message, code)


def responses_initiator(payload):
    """``agent`` when the newest input item is a tool output or the assistant's, else ``user``."""
    items = payload.get("input")
    if not isinstance(items, list) or not items or not isinstance(items[-1], dict):
        return "user"
    last = items[-1]
    if last.get("type") in ("function_call_output", "function_call", "reasoning") or last.get("role") == "assistant":
        return "agent"
    return "user"


def responses_have_image(payload):
    for item in payload.get("input") if isinstance(payload.get("input"), list) else []:
        content = item.get("content") if isinstance(item, dict) else None
        if isinstance(content, list) and any(isinstance(p, dict) and p.get("type") in _IMAGE_PART_TYPES for p in content):
            return True
    return False


def prepare_embeddings_request(payload):
    """(Copilot request, encoding_format) for an OpenAI embeddings request."""
    model, text = payload.get("model"), payload.get("input")
    if not isinstance(model, str) or not model:
        raise ClientError(400, "'model' is required", param="model", code="model_required")
    if isinstance(text, str):
        text = [text]
    if not isinstance(text, list) or not text:
        raise ClientError(400, "'input' must be a string or a non-empty array of strings", param="input")
    if not all(isinstance(t, str) for t in text):
        raise ClientError(400, "'input' must hold strings: Copilot does not take token arrays", param="input",
                          code="token_arrays_not_supported")
    encoding = payload.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise ClientError(400, "encoding_format must be 'float' or 'base64'", param="encoding_format")
    request = {"model": model, "input": text}
    if payload.get("dimensions") is not None:
        if not isinstance(payload["dimensions"], int) or payload["dimensions"] < 1:
            raise ClientError(400, "'dimensions' must be a positive integer", param="dimensions")
        request["dimensions"] = payload["dimensions"]
    return request, encoding


def normalize_embeddings_response(data, model, encoding):
    """OpenAI's embeddings list; base64 is made here (little-endian float32, as OpenAI sends it)."""
    items = []
    for index, item in enumerate(data.get("data") or []):
        if not isinstance(item, dict):
            continue
        vector = item.get("embedding")
        if encoding == "base64" and isinstance(vector, list):
            vector = base64.b64encode(struct.pack("<%df" % len(vector), *vector)).decode("ascii")
        items.append({"object": "embedding", "index": item.get("index", index), "embedding": vector})
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    prompt = usage.get("prompt_tokens") or 0
    return {"object": "list", "data": items, "model": data.get("model") or model,
            "usage": {"prompt_tokens": prompt, "total_tokens": usage.get("total_tokens") or prompt}}


def summarize_quota(user):
    """Plan, premium requests and chat quota from /copilot_internal/user, in one flat shape."""
    snapshots = user.get("quota_snapshots") if isinstance(user.get("quota_snapshots"), dict) else {}

    def bucket(name):
        snap = snapshots.get(name)
        if not isinstance(snap, dict):
            return None
        unlimited = bool(snap.get("unlimited")) or snap.get("entitlement") == -1
        entitlement, remaining = snap.get("entitlement"), snap.get("remaining")
        used = None
        if not unlimited and isinstance(entitlement, (int, float)) and isinstance(remaining, (int, float)):
            used = entitlement - remaining
        return {"unlimited": unlimited, "entitlement": entitlement, "remaining": remaining, "used": used,
                "percent_remaining": snap.get("percent_remaining"), "overage_count": snap.get("overage_count", 0),
                "overage_permitted": snap.get("overage_permitted", False)}

    return {"login": user.get("login"), "plan": user.get("copilot_plan"), "sku": user.get("access_type_sku"),
            "premium_requests": bucket("premium_interactions"), "chat": bucket("chat"),
            "completions": bucket("completions"),
            "reset_date": user.get("quota_reset_date_utc") or user.get("quota_reset_date")}


# -- 8h. Images given by URL ---------------------------------------------------------------
# Copilot refuses most external image URLs, so the App fetches them and sends the bytes: these
# find such images in any dialect's request and put the fetched bytes in their place.

def remote_images(payload):
    """[(part, kind, url)] for every image given by http(s) URL in a request's message content:
    OpenAI chat ``image_url`` parts, Responses ``input_image`` parts (also in tool outputs),
    Anthropic ``url`` image sources (also in tool results). Only content is looked at, never
    tool definitions or a model's tool inputs, and only where messages keep it: this runs on
    every request, and walking whole agent conversations would cost as much as parsing them."""
    found = []

    def scan(parts):
        for part in parts if isinstance(parts, list) else ():
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "tool_result":
                scan(part.get("content"))
                continue
            if kind == "image_url":
                url = part["image_url"].get("url") if isinstance(part.get("image_url"), dict) else None
            elif kind == "input_image":
                url = part.get("image_url")
            elif kind == "image" and isinstance(part.get("source"), dict) and part["source"].get("type") == "url":
                url = part["source"].get("url")
            else:
                continue
            if isinstance(url, str) and url[:8].lower().startswith(("http://", "https://")):
                found.append((part, kind, url))

    for key in ("messages", "input"):
        for item in payload.get(key) if isinstance(payload.get(key), list) else ():
            if isinstance(item, dict):
                scan(item.get("content"))
                scan(item.get("output"))
    return found


def inline_image(node, kind, media_type, data):
    """Replace the URL of an image found by remote_images with the image itself."""
    encoded = base64.b64encode(data).decode("ascii")
    if kind == "image":
        node["source"] = {"type": "base64", "media_type": media_type, "data": encoded}
    elif kind == "input_image":
        node["image_url"] = "data:%s;base64,%s" % (media_type, encoded)
    else:
        node["image_url"] = dict(node["image_url"], url="data:%s;base64,%s" % (media_type, encoded))


def url_for_message(url):
    """``scheme://host:port/path`` of a URL: credentials (user info, signed queries) left out."""
    parts = urllib.parse.urlsplit(url)
    return "%s://%s%s" % (parts.scheme, parts.netloc.rpartition("@")[2], parts.path) + ("?..." if parts.query else "")


# ------------------------------------------------------------------------------------------
# 9. HTTP/1.1 server (asyncio)
#    A strict, small HTTP/1.1 server on asyncio streams. Per connection: a byte buffer we
#    parse ourselves (so 414 and 431 are told apart and pipelined requests stay queued in
#    order), a timer for the head (408), one for idle keep-alive (silent close), none on an
#    active stream. Bodies by Content-Length or chunked, 413 over the cap, 100-continue when
#    the app first reads the body. Every protocol error gets a JSON envelope and a close.
#    Knows nothing of JSON shapes beyond that envelope: routes live in the App (§10).
# ------------------------------------------------------------------------------------------

class ClientDisconnected(ConnectionError):
    """The client went away while we were answering; not an error worth more than a debug line."""


class _EndOfInput(Exception):
    """The client closed its side before a complete request arrived."""


class Request:
    """One parsed request head; the body is read on demand with ``await read_body()``."""

    __slots__ = ("method", "target", "path", "query", "version", "headers", "content_length",
                 "chunked", "keep_alive", "expect_continue", "body", "body_consumed", "_conn", "started")

    def __init__(self, method, target, path, query, version, headers):
        self.method = method
        self.target = target
        self.path = path
        self.query = query
        self.version = version
        self.headers = headers
        self.content_length = 0
        self.chunked = False
        self.keep_alive = True
        self.expect_continue = False
        self.body = None
        self.body_consumed = False
        self._conn = None
        self.started = time.monotonic()

    def header(self, name, default=None):
        return self.headers.get(name, default)

    async def read_body(self, limit):
        """The whole body as bytes; 413 over ``limit``, 400 for broken chunked framing."""
        if self.body is None:
            self.body = await self._conn.read_body(self, limit)
            self.body_consumed = True
        return self.body


def parse_request_head(head):
    """Parse the bytes before CRLFCRLF into a Request, or raise BadRequest with the status."""
    lines = head.split(b"\r\n")
    request_line = lines[0]
    if len(request_line) > MAX_REQUEST_LINE_BYTES:
        raise BadRequest(414, "request line longer than %d bytes" % MAX_REQUEST_LINE_BYTES)
    if len(head) - len(request_line) > MAX_HEADER_BYTES:
        raise BadRequest(431, "request headers larger than %d bytes" % MAX_HEADER_BYTES)
    if len(lines) - 1 > MAX_HEADER_COUNT:
        raise BadRequest(431, "more than %d request headers" % MAX_HEADER_COUNT)
    parts = request_line.split(b" ")
    if len(parts) != 3:
        raise BadRequest(400, "malformed request line")
    method, target, version = (p.decode("latin-1") for p in parts)
    if not _TOKEN_CHARS.match(method):
        raise BadRequest(400, "malformed method")
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        match = re.match(r"^HTTP/(\d+)(?:\.\d+)?$", version)
        if match and int(match.group(1)) >= 2:
            raise BadRequest(505, "HTTP version %s is not supported; use HTTP/1.1" % version)
        raise BadRequest(400, "malformed HTTP version")
    if target.startswith(("http://", "https://")):  # absolute-form, RFC 9112 §3.2.2
        split = urllib.parse.urlsplit(target)
        path, query = split.path or "/", split.query
    elif target.startswith("/") or (target == "*" and method == "OPTIONS"):
        path, _, query = target.partition("?")
    else:
        raise BadRequest(400, "malformed request target")
    if any(c in target for c in "\x00 \t\x7f") or not target.isprintable():
        raise BadRequest(400, "malformed request target")
    headers = {}
    for line in lines[1:]:
        if line[:1] in (b" ", b"\t"):
            raise BadRequest(400, "obsolete header line folding is not accepted")
        name, sep, value = line.partition(b":")
        name = name.decode("latin-1")
        if not sep or not _TOKEN_CHARS.match(name):
            raise BadRequest(400, "malformed header line")
        value = value.strip(b" \t").decode("latin-1")
        if "\n" in value or "\r" in value or "\x00" in value:
            raise BadRequest(400, "invalid character in header %s" % name)
        name = name.lower()
        if name in headers:
            if name in ("host", "content-type"):
                raise BadRequest(400, "duplicate %s header" % name)
            headers[name] += ", " + value
        else:
            headers[name] = value
    request = Request(method, target, path, query, version, headers)
    if version == "HTTP/1.1" and "host" not in headers:
        raise BadRequest(400, "HTTP/1.1 request without a Host header")
    connection = headers.get("connection", "").lower()
    if version == "HTTP/1.1":
        request.keep_alive = "close" not in connection
    else:
        request.keep_alive = "keep-alive" in connection
    # Framing (RFC 9112 §6.1-6.3): both or conflicting lengths are how requests get smuggled.
    te = headers.get("transfer-encoding")
    cl = headers.get("content-length")
    if te is not None:
        if cl is not None:
            raise BadRequest(400, "both Transfer-Encoding and Content-Length")
        if version == "HTTP/1.0":
            raise BadRequest(400, "Transfer-Encoding in an HTTP/1.0 request")
        if te.strip().lower() != "chunked":
            raise BadRequest(501, "only the chunked transfer coding is supported")
        request.chunked = True
    elif cl is not None:
        values = set(v.strip() for v in cl.split(","))
        if len(values) != 1:
            raise BadRequest(400, "conflicting Content-Length values")
        value = values.pop()
        if not value.isdigit() or len(value) > 20 or not value.isascii():
            raise BadRequest(400, "malformed Content-Length")
        request.content_length = int(value)
    request.expect_continue = headers.get("expect", "").lower() == "100-continue"
    return request


class Response:
    """Writes one answer: ``send()`` a whole body, or ``start_stream()``/``write()``/``end()``."""

    __slots__ = ("conn", "request", "status", "started", "finished", "streaming", "chunked",
                 "keep_alive", "bytes_sent", "log_fields", "extra_headers")

    def __init__(self, conn, request):
        self.conn = conn
        self.request = request
        self.status = None
        self.started = False
        self.finished = False
        self.streaming = False
        self.chunked = False
        self.keep_alive = request.keep_alive if request is not None else False
        self.bytes_sent = 0
        self.log_fields = {}
        self.extra_headers = []  # added to whatever answer goes out (CORS)

    def _head(self, status, headers, content_length=None):
        self.status = status
        self.started = True
        if self.conn.server.closing:
            self.keep_alive = False
        lines = ["HTTP/1.1 %d %s" % (status, REASONS.get(status, "Unknown")),
                 "Date: " + self.conn.server.http_date(), "Server: coproxy/" + __version__]
        for name, value in headers:
            lines.append("%s: %s" % (name, value))
        for name, value in self.extra_headers:
            lines.append("%s: %s" % (name, value))
        if content_length is not None:
            lines.append("Content-Length: %d" % content_length)
        elif self.chunked:
            lines.append("Transfer-Encoding: chunked")
        if not self.keep_alive:
            lines.append("Connection: close")
        elif self.request is not None and self.request.version == "HTTP/1.0":
            lines.append("Connection: keep-alive")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    async def send(self, status, headers, body=b""):
        """The whole answer at once (a HEAD request gets the headers only)."""
        if self.started:
            raise RuntimeError("response already started")
        head = self._head(status, headers, len(body))
        if self.request is not None and self.request.method == "HEAD":
            body = b""
        self.finished = True
        await self.conn.write(head + body if len(body) < 65536 else head)
        if len(body) >= 65536:
            await self.conn.write(body)
        self.bytes_sent += len(body)

    async def start_stream(self, status, headers):
        """Status line and headers of a streamed answer (chunked; close-delimited on HTTP/1.0)."""
        if self.started:
            raise RuntimeError("response already started")
        self.streaming = True
        if self.request is not None and self.request.version == "HTTP/1.0":
            self.keep_alive = False
        else:
            self.chunked = True
        await self.conn.write(self._head(status, headers))

    async def write(self, data):
        """One piece of a streamed body, sent now (with backpressure from the socket)."""
        if not data:
            return
        self.bytes_sent += len(data)
        if self.chunked:
            data = b"%x\r\n%s\r\n" % (len(data), data)
        await self.conn.write(data)

    async def end(self):
        """Finish a streamed body cleanly."""
        if self.finished:
            return
        self.finished = True
        if self.chunked:
            await self.conn.write(b"0\r\n\r\n")


class Connection:
    """One client socket: reads requests, hands them to the app, decides about keep-alive."""

    def __init__(self, server, reader, writer):
        self.server = server
        self.reader = reader
        self.writer = writer
        self.transport = writer.transport
        self.buf = bytearray()
        self.busy = False
        self.lost = False
        self._watcher = None
        self._on_lost = []
        self._timed_out = False
        sock = writer.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        peer = writer.get_extra_info("peername")
        self.peer = "%s:%s" % tuple(peer[:2]) if isinstance(peer, tuple) else str(peer)

    # -- reading --------------------------------------------------------------------------
    async def _fill(self):
        data = await self.reader.read(65536)
        if not data:
            raise _EndOfInput()
        self.buf += data

    def _arm(self, seconds, answer_408):
        return self.server.loop.call_later(seconds, self._on_timeout, answer_408)

    def _on_timeout(self, answer_408):
        self._timed_out = True
        if answer_408 and not self.transport.is_closing():
            body = self.server.error_body(408, "request not received in time")
            self.transport.write(("HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\n"
                                  "Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)).encode()
                                 + body)
        self.transport.close()

    async def _read_head(self):
        searched = 0
        while True:
            index = self.buf.find(b"\r\n\r\n", searched)
            if index >= 0:
                head = bytes(self.buf[:index])
                del self.buf[:index + 4]
                return head
            searched = max(0, len(self.buf) - 3)
            line_end = self.buf.find(b"\r\n")
            if (line_end < 0 and len(self.buf) > MAX_REQUEST_LINE_BYTES) or line_end > MAX_REQUEST_LINE_BYTES:
                raise BadRequest(414, "request line longer than %d bytes" % MAX_REQUEST_LINE_BYTES)
            if len(self.buf) > MAX_REQUEST_LINE_BYTES + MAX_HEADER_BYTES:
                raise BadRequest(431, "request headers larger than %d bytes" % MAX_HEADER_BYTES)
            await self._fill()

    async def _read_exactly(self, size):
        while len(self.buf) < size:
            await self._fill()
        data = bytes(self.buf[:size])
        del self.buf[:size]
        return data

    async def _read_line(self, limit, what):
        searched = 0
        while True:
            index = self.buf.find(b"\r\n", searched)
            if index >= 0:
                if index > limit:
                    raise BadRequest(400, "%s longer than %d bytes" % (what, limit))
                line = bytes(self.buf[:index])
                del self.buf[:index + 2]
                return line
            if len(self.buf) > limit:
                raise BadRequest(400, "%s longer than %d bytes" % (what, limit))
            searched = max(0, len(self.buf) - 1)
            await self._fill()

    async def read_body(self, request, limit):
        """Read the body announced by ``request`` (called by the app through Request.read_body)."""
        if request.content_length > limit:
            raise BadRequest(413, "request body of %d bytes is larger than the %d-byte limit "
                                  "(--max-body-mb)" % (request.content_length, limit))
        if not request.chunked and request.content_length == 0:
            return b""
        if request.expect_continue and request.version == "HTTP/1.1" and not self.buf:
            self.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if not request.chunked and len(self.buf) >= request.content_length:  # all here: no timer, no wait
            body = bytes(self.buf[:request.content_length])
            del self.buf[:request.content_length]
            return body
        timer = self._arm(self.server.body_timeout, True)
        try:
            if not request.chunked:
                return await self._read_exactly(request.content_length)
            body = bytearray()
            while True:
                line = await self._read_line(MAX_CHUNK_LINE_BYTES, "chunk-size line")
                size_text = line.split(b";", 1)[0].strip()
                if not size_text or len(size_text) > 16 or size_text.strip(b"0123456789abcdefABCDEF"):
                    raise BadRequest(400, "malformed chunk size")
                size = int(size_text, 16)
                if size == 0:
                    break
                if len(body) + size > limit:
                    raise BadRequest(413, "chunked request body larger than the %d-byte limit "
                                          "(--max-body-mb)" % limit)
                body += await self._read_exactly(size)
                if await self._read_exactly(2) != b"\r\n":
                    raise BadRequest(400, "chunk not followed by CRLF")
            for _ in range(MAX_HEADER_COUNT + 1):  # trailer fields: read and ignored
                if not await self._read_line(MAX_HEADER_BYTES, "trailer line"):
                    return bytes(body)
            raise BadRequest(431, "too many trailer fields")
        finally:
            timer.cancel()

    # -- noticing a client that leaves while we stream -----------------------------------------
    def watch_for_disconnect(self, callback):
        """Call ``callback`` as soon as the client closes; bytes it pipelines meanwhile are kept."""
        self._on_lost.append(callback)
        if self._watcher is None:
            self._watcher = self.server.loop.create_task(self._watch())

    async def _watch(self):
        try:
            while len(self.buf) < MAX_HEADER_BYTES * 4:
                data = await self.reader.read(65536)
                if not data:
                    break
                self.buf += data
            else:
                return  # a client pipelining this much can wait for the stream to end
        except (ConnectionError, OSError):
            pass
        self._mark_lost()

    def _mark_lost(self):
        if not self.lost:
            self.lost = True
            callbacks, self._on_lost = self._on_lost, []
            for callback in callbacks:
                try:
                    callback()
                except Exception:  # a failing callback must not stop the others
                    log.exception("disconnect callback failed")

    async def stop_watching(self):
        self._on_lost = []
        watcher, self._watcher = self._watcher, None
        if watcher is not None and not watcher.done():
            watcher.cancel()
            try:
                await watcher
            except asyncio.CancelledError:
                pass

    # -- writing --------------------------------------------------------------------------
    async def write(self, data):
        if self.lost or self.transport.is_closing():
            self._mark_lost()
            raise ClientDisconnected("client went away")
        self.writer.write(data)
        try:
            await self.writer.drain()
        except (ConnectionError, OSError):
            self._mark_lost()
            raise ClientDisconnected("client went away")

    # -- the request loop ---------------------------------------------------------------------
    async def run(self):
        first = True
        while not (self.server.closing and not first):
            self.busy = False
            if not self.buf:
                timer = self._arm(self.server.header_timeout if first else self.server.idle_timeout, first)
                try:
                    await self._fill()
                except (_EndOfInput, ConnectionError, OSError):
                    return
                finally:
                    timer.cancel()
            first = False
            self.busy = True
            while self.buf[:2] == b"\r\n":  # RFC 9112 §2.2: ignore a stray CRLF between requests
                del self.buf[:2]
            # A head that is already buffered (the usual case) needs no timer.
            timer = None if b"\r\n\r\n" in self.buf else self._arm(self.server.header_timeout, True)
            try:
                request = parse_request_head(await self._read_head())
                request._conn = self
            except (_EndOfInput, ConnectionError, OSError):
                return
            except BadRequest as exc:
                await self._answer_bad_request(exc)
                return
            finally:
                if timer is not None:
                    timer.cancel()
            if not await self._handle(request):
                return

    async def _handle(self, request):
        """Run one exchange; True if the connection may carry another request."""
        response = Response(self, request)
        try:
            await self.server.app.dispatch(request, response)
        except BadRequest as exc:
            if not response.started:
                await self._answer_bad_request(exc, response)
            return False
        except (ClientDisconnected, _EndOfInput):
            return False
        except Exception:  # a bug in a handler: 500 if we still can, never a traceback to the client
            log.exception("unhandled error answering %s %s", request.method, request.path)
            if not response.started:
                response.keep_alive = False
                try:
                    await response.send(500, [("Content-Type", "application/json")],
                                        self.server.error_body(500, "internal error in coproxy; see its log"))
                except ConnectionError:
                    pass
            return False
        finally:
            if self._watcher is not None:
                await self.stop_watching()
            self.server.app.log_exchange(request, response, self)
        if self._timed_out or not response.finished or not response.keep_alive:
            return False
        if not request.body_consumed and (request.chunked or request.content_length):
            return False  # the unread body is still on the wire; we cannot find the next request
        return True

    async def _answer_bad_request(self, exc, response=None):
        response = response or Response(self, None)
        response.keep_alive = False
        try:
            await response.send(exc.status, [("Content-Type", "application/json")],
                                self.server.error_body(exc.status, str(exc)))
        except ConnectionError:
            pass
        log.debug("bad request from %s: %d %s", self.peer, exc.status, exc)


class Server:
    """Accepts connections, runs a Connection per socket, and shuts down gracefully."""

    def __init__(self, app, header_timeout=DEFAULT_HEADER_TIMEOUT_SECONDS,
                 idle_timeout=DEFAULT_IDLE_TIMEOUT_SECONDS, body_timeout=DEFAULT_BODY_TIMEOUT_SECONDS):
        self.app = app
        self.header_timeout = header_timeout
        self.idle_timeout = idle_timeout
        self.body_timeout = body_timeout
        self.closing = False
        self.loop = None
        self.port = None
        self.host = None
        self._server = None
        self._connections = {}
        self._date = (0, "")

    def error_body(self, status, message):
        return self.app.protocol_error_body(status, message)

    def http_date(self):
        now = int(time.time())
        if self._date[0] != now:
            self._date = (now, http_date(now))
        return self._date[1]

    async def start(self, host, port):
        """Bind and start accepting; ``self.port`` holds the real port (``port=0`` allowed)."""
        self.loop = asyncio.get_running_loop()
        self._server = await asyncio.start_server(self._on_connection, host, port, backlog=1024)
        sockname = self._server.sockets[0].getsockname()
        self.host, self.port = sockname[0], sockname[1]

    async def _on_connection(self, reader, writer):
        conn = Connection(self, reader, writer)
        task = asyncio.current_task()
        self._connections[task] = conn
        try:
            await conn.run()
        except Exception:  # never let one connection's failure reach the loop's exception handler
            log.exception("connection from %s failed", conn.peer)
        finally:
            self._connections.pop(task, None)
            writer.transport.close()

    async def shutdown(self, grace):
        """Stop accepting, let in-flight exchanges finish within ``grace`` seconds, close the rest.

        This order (close idle transports ourselves, then wait, then abort) is the one that is
        clean on every Python from 3.8 to 3.13: wait_closed() hangs on 3.12+ while any client is
        connected, and cancelling handler tasks prints tracebacks on 3.11/3.12."""
        self.closing = True
        if self._server is not None:
            self._server.close()
        for conn in list(self._connections.values()):
            if not conn.busy:
                conn.transport.close()
        busy = [task for task, conn in self._connections.items() if conn.busy]
        if busy:
            log.info("waiting up to %ss for %d in-flight request(s)", grace, len(busy))
            await asyncio.wait(busy, timeout=grace)
        for conn in list(self._connections.values()):
            conn.transport.abort()
        remaining = list(self._connections)
        if remaining:
            await asyncio.wait(remaining, timeout=2)
        if self._server is not None:
            try:
                await asyncio.wait_for(self._server.wait_closed(), 2)
            except asyncio.TimeoutError:  # asyncio.TimeoutError is the builtin only from 3.11
                pass


# ------------------------------------------------------------------------------------------
# 10. App and routes
#     The App owns the blocking world (token store, auth, upstream client) and the thread pool
#     it runs in. Two bridges cross from the loop into threads: ``run_blocking`` (one call,
#     one answer) and ``StreamPump`` (a worker thread reading an upstream stream, handing the
#     loop every chunk that has arrived at each wake-up). The pool is sized above the
#     concurrency limit so streams never wait for a thread.
# ------------------------------------------------------------------------------------------

SSE_HEADERS = [("Content-Type", "text/event-stream; charset=utf-8"), ("Cache-Control", "no-cache"),
               ("X-Accel-Buffering", "no")]
JSON_HEADERS = [("Content-Type", "application/json")]


_MAX_TOKENS_REFUSED = re.compile(r"max_tokens.{0,80}max_completion_tokens|unsupported parameter:? *'?max_tokens",
                                 re.I | re.S)


class StreamPump:
    """Reads an upstream stream in a worker thread and hands chunks to the event loop.

    The thread appends to a list and wakes the loop only if the loop is waiting, so a burst of
    events costs one wake-up. Past STREAM_HIGH_WATER_BYTES unread, the thread waits (a slow
    client slows the upstream read, nothing piles up). ``cancel()`` shuts the upstream socket
    so the thread leaves its read at once and the connection is closed, never pooled."""

    def __init__(self, loop, executor, upstream):
        self._loop = loop
        self._upstream = upstream
        self._lock = threading.Lock()
        self._chunks = []
        self._buffered = 0
        self._finished = False
        self._error = None
        self._cancelled = False
        self._waiter = None
        self._room = threading.Event()
        self._room.set()
        self._ping_timer = None
        self._last_data = loop.time()
        executor.run(loop, self._run)  # _run reports through the chunks and the waiter, never raises

    def _run(self):
        try:
            while not self._cancelled:
                data = self._upstream.read1(65536)
                if not data:
                    break
                with self._lock:
                    self._chunks.append(data)
                    self._buffered += len(data)
                    waiter, self._waiter = self._waiter, None
                    full = self._buffered >= STREAM_HIGH_WATER_BYTES
                    if full:
                        self._room.clear()
                if waiter is not None:
                    self._wake_threadsafe(waiter)
                if full:
                    self._room.wait()
        except Exception as exc:  # the stream broke: reported to the consumer, never raised here
            if not self._cancelled:
                self._error = exc
        finally:
            self._upstream.close(reuse=not self._cancelled and self._error is None)
            with self._lock:
                self._finished = True
                waiter, self._waiter = self._waiter, None
            if waiter is not None:
                self._wake_threadsafe(waiter)

    def _wake_threadsafe(self, waiter):
        try:
            self._loop.call_soon_threadsafe(self._wake, waiter)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    @staticmethod
    def _wake(waiter):
        if not waiter.done():
            waiter.set_result(None)

    async def next(self, timeout):
        """(chunks, finished, error) as soon as anything is there; (None, False, None) after
        ``timeout`` seconds without upstream data (time for a keep-alive ping).

        One timer per stream, re-armed from the time of the last data when it fires, rather
        than a timer created and cancelled for every chunk."""
        with self._lock:
            if not (self._chunks or self._finished):
                waiter = self._waiter = self._loop.create_future()
            else:
                waiter = None
        if waiter is not None:
            if self._ping_timer is None:
                self._ping_timer = self._loop.call_at(self._last_data + timeout, self._ping_due, timeout)
            await waiter
        with self._lock:
            self._waiter = None
            if not (self._chunks or self._finished):
                self._last_data = self._loop.time()  # a ping is going out: count silence from now
                return None, False, None
            chunks, self._chunks, self._buffered = self._chunks, [], 0
            self._room.set()
            finished, error = self._finished, self._error
        self._last_data = self._loop.time()
        if finished and self._ping_timer is not None:
            self._ping_timer.cancel()
            self._ping_timer = None
        return chunks, finished, error

    def _ping_due(self, timeout):
        self._ping_timer = None
        if self._loop.time() - self._last_data >= timeout:
            waiter = self._waiter
            if waiter is not None:
                self._wake(waiter)
        elif self._waiter is not None:
            self._ping_timer = self._loop.call_at(self._last_data + timeout, self._ping_due, timeout)

    def cancel(self):
        """Stop now: the client left or the answer is complete; drops the upstream connection."""
        if self._ping_timer is not None:
            self._ping_timer.cancel()
            self._ping_timer = None
        with self._lock:
            if self._finished or self._cancelled:
                return
            self._cancelled = True
            waiter, self._waiter = self._waiter, None
        self._upstream.abort()
        self._room.set()
        if waiter is not None:
            self._wake(waiter)


class Metrics:
    """Counters and histograms for GET /metrics, in Prometheus' text format (0.0.4).

    Only touched from the event loop; label values are bounded (routes, statuses, catalog ids)."""

    BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
    HELP = {
        "coproxy_requests_total": ("counter", "Requests answered, by route, status, model and initiator."),
        "coproxy_request_bytes_total": ("counter", "Request body bytes received from clients."),
        "coproxy_response_bytes_total": ("counter", "Response body bytes sent to clients."),
        "coproxy_premium_requests_total": ("counter", "Premium requests spent (model multiplier per user turn)."),
        "coproxy_upstream_latency_seconds": ("histogram", "Time from a request's arrival to Copilot's answer headers."),
        "coproxy_upstream_ttfb_seconds": ("histogram", "Time from a streamed request's arrival to Copilot's first body bytes."),
    }

    def __init__(self):
        self.counters = collections.Counter()
        self.histograms = {}
        self.active_streams = 0

    def inc(self, name, labels=(), value=1):
        self.counters[(name, labels)] += value

    def observe(self, name, seconds, labels=()):
        histogram = self.histograms.get((name, labels))
        if histogram is None:
            histogram = self.histograms[(name, labels)] = [[0] * len(self.BUCKETS), 0, 0.0]
        for index, bound in enumerate(self.BUCKETS):
            if seconds <= bound:
                histogram[0][index] += 1
        histogram[1] += 1
        histogram[2] += seconds

    @staticmethod
    def _labels(pairs):
        if not pairs:
            return ""
        return "{%s}" % ",".join('%s="%s"' % (k, str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", " "))
                                 for k, v in pairs)

    def render(self, gauges):
        """The exposition text; ``gauges`` are (name, help, value) read at scrape time."""
        lines = []
        for name, (kind, text) in sorted(self.HELP.items()):
            lines += ["# HELP %s %s" % (name, text), "# TYPE %s %s" % (name, kind)]
            if kind == "counter":
                for (metric, labels), value in sorted(self.counters.items()):
                    if metric == name:
                        lines.append("%s%s %s" % (name, self._labels(labels), format(value, "g")))
            else:
                for (metric, labels), (buckets, count, total) in sorted(self.histograms.items()):
                    if metric != name:
                        continue
                    for bound, cumulative in zip(self.BUCKETS, buckets):
                        lines.append("%s_bucket%s %d" % (name, self._labels(labels + (("le", format(bound, "g")),)), cumulative))
                    lines.append("%s_bucket%s %d" % (name, self._labels(labels + (("le", "+Inf"),)), count))
                    lines.append("%s_sum%s %s" % (name, self._labels(labels), format(total, ".6f")))
                    lines.append("%s_count%s %d" % (name, self._labels(labels), count))
        for name, text, kind, value in gauges:
            lines += ["# HELP %s %s" % (name, text), "# TYPE %s %s" % (name, kind), "%s %s" % (name, format(value, "g"))]
        return ("\n".join(lines) + "\n").encode("utf-8")


#: error.code for each status the HTTP layer answers by itself (malformed or oversized input)
PROTOCOL_ERROR_CODES = {408: "request_timeout", 413: "request_too_large", 414: "uri_too_long",
                        431: "headers_too_large", 501: "not_implemented", 505: "http_version_not_supported"}

CORS_ALLOWED_HEADERS = ("authorization, content-type, x-api-key, anthropic-version, anthropic-beta, "
                        "openai-organization, openai-project, x-stainless-arch, x-stainless-lang, x-stainless-os, "
                        "x-stainless-package-version, x-stainless-runtime, x-stainless-runtime-version, "
                        "x-stainless-retry-count, x-stainless-timeout")


class App:
    """Routes, auth check, and the handlers that talk to Copilot."""

    def __init__(self, config, store=None, client=None, auth=None):
        self.config = config
        self.store = store or TokenStore(config.state_dir)
        self.client = client or UpstreamClient(config.ca_file, config.connect_timeout,
                                               config.upstream_timeout, config.environ)
        self.auth = auth or CopilotAuth(config, self.store, self.client)
        self.executor = WorkerPool(config.max_concurrency + 16)
        self.loop = None
        self.started_at = time.time()
        self.last_auth_error = None
        self._slots = None
        self._max_body = config.max_body_bytes
        # Canonical paths (without /v1): every route answers with and without the prefix. The
        # surface names which --api-surface part mounts it (None: always there).
        self.routes = {
            "/chat/completions": ("chat", {"POST": self.handle_chat_completions}),
            "/models": (None, {"GET": self.handle_models}),
            "/messages": ("messages", {"POST": self.handle_messages}),
            "/messages/count_tokens": ("messages", {"POST": self.handle_count_tokens}),
            "/embeddings": ("embeddings", {"POST": self.handle_embeddings}),
            "/responses": ("responses", {"POST": self.handle_responses}),
            "/usage": (None, {"GET": self.handle_usage}),
            "/metrics": (None, {"GET": self.handle_metrics}),
        }
        self.prefix_routes = [("/models/", None, {"GET": self.handle_model}),
                              ("/responses/", "responses", {"GET": self.handle_response_get})]
        self.public_routes = {"/healthz": {"GET": self.handle_health}, "/health": {"GET": self.handle_health}}
        self._catalog_cache = (0.0, None, None, {})
        self._catalog_refresh = None
        #: models that refused max_tokens (learnt from Copilot's 400; sent max_completion_tokens after)
        self._max_completion_models = set()
        self.metrics = Metrics()
        #: the pacing gate (--rate-limit); clock and sleep are replaceable so tests take no time
        self.clock = time.monotonic
        self.sleep = asyncio.sleep
        self._next_upstream_at = 0.0
        #: images fetched from URLs: url -> (media type, bytes, when), oldest first
        self._images = collections.OrderedDict()
        self._image_bytes = 0

    async def start(self):
        """Create the loop-bound pieces (asyncio primitives must be born inside the running loop)."""
        self.loop = asyncio.get_running_loop()
        self._slots = asyncio.Semaphore(self.config.max_concurrency)

    def close(self):
        self.executor.shutdown(wait=False)
        self.client.close()

    async def run_blocking(self, fn, *args):
        """Run a blocking call (sections 5-7) in the upstream pool; the one plain bridge."""
        return await self.executor.run(self.loop, fn, *args)

    async def _inline_images(self, payload, model, info):
        """Fetch every image the request gives by URL (in parallel, through a small cache) and
        put the image itself in the request: Copilot refuses most external image URLs. What the
        model's catalogue entry says it cannot take is refused here, with the reason."""
        found = [] if self.config.no_image_fetch else remote_images(payload)
        if not found:
            return
        urls = list(dict.fromkeys(url for _, _, url in found))
        images = dict(zip(urls, await asyncio.gather(*(self._image(url) for url in urls))))
        limits = (((info or {}).get("capabilities") or {}).get("limits") or {}).get("vision") or {}
        types, largest = limits.get("supported_media_types"), limits.get("max_prompt_image_size")
        for url, (media_type, data) in images.items():
            if isinstance(types, list) and types and media_type not in types:
                raise ClientError(400, "the image at %s is %s; %s accepts %s" % (
                    url_for_message(url), media_type, model, ", ".join(map(str, types))), code="image_not_supported")
            if isinstance(largest, int) and 0 < largest < len(data):
                raise ClientError(400, "the image at %s is %s; %s accepts at most %s per image" % (
                    url_for_message(url), format_size(len(data)), model, format_size(largest)), code="image_too_large")
        for node, kind, url in found:
            inline_image(node, kind, *images[url])

    async def _image(self, url):
        cached = self._images.pop(url, None)
        if cached is not None:
            self._image_bytes -= len(cached[1])
            if time.monotonic() - cached[2] < IMAGE_CACHE_SECONDS:
                self._remember_image(url, cached)
                return cached[0], cached[1]
        try:
            media_type, data = await self.run_blocking(self.client.fetch_image, url)
        except UpstreamUnreachable as exc:
            raise ClientError(400, "could not fetch the image at %s: %s" % (url_for_message(url), exc),
                              code="image_fetch_failed")
        log.debug("fetched %s: %s, %d bytes", url_for_message(url), media_type, len(data))
        self._remember_image(url, (media_type, data, time.monotonic()))
        return media_type, data

    def _remember_image(self, url, entry):
        self._images[url] = entry
        self._image_bytes += len(entry[1])
        while self._image_bytes > IMAGE_CACHE_BYTES:
            _, (_, old, _) = self._images.popitem(last=False)
            self._image_bytes -= len(old)

    # -- dispatch ---------------------------------------------------------------------------
    def protocol_error_body(self, status, message):
        return json_dumps(openai_error_body(message, error_type_for_status(status),
                                            PROTOCOL_ERROR_CODES.get(status, "bad_request")))

    async def dispatch(self, request, response):
        path = request.path
        public = path in self.public_routes
        param = None
        canonical = path[3:] if path.startswith("/v1/") else path
        dialect = "anthropic" if canonical.startswith("/messages") else "openai"
        if self.config.cors_origins and self._cors(request, response):
            await response.send(204, [])
            return
        surface = None
        if public:
            handlers = self.public_routes[path]
        else:
            surface, handlers = self.routes.get(canonical, (None, None))
            response.log_fields["route"] = canonical if handlers else "other"
            for prefix, prefix_surface, prefix_handlers in self.prefix_routes:
                if handlers is None and canonical.startswith(prefix) and len(canonical) > len(prefix):
                    surface, handlers = prefix_surface, prefix_handlers
                    param = urllib.parse.unquote(canonical[len(prefix):])
                    response.log_fields["route"] = prefix + "{id}"
        try:
            if request.method not in KNOWN_METHODS:
                response.keep_alive = False  # we cannot know how this method frames its body
                raise ClientError(501, "method %s is not implemented" % request.method, code="not_implemented")
            if handlers is None:
                raise ClientError(404, "no such endpoint: %s %s (coproxy serves /v1/chat/completions, /v1/responses, "
                                       "/v1/embeddings, /v1/messages, /v1/models, /usage and /healthz)"
                                  % (request.method, path), code="unknown_url")
            if surface is not None and surface not in self.config.api_surface:
                raise ClientError(404, "%s is not enabled: start coproxy with --api-surface all (or a list that "
                                       "includes %s)" % (path, surface), code="api_surface_disabled")
            handler = handlers.get("GET" if request.method == "HEAD" else request.method)
            allow = ", ".join(sorted(set(handlers) | ({"HEAD"} if "GET" in handlers else set())))
            if request.method == "OPTIONS":
                await response.send(204, [("Allow", allow + ", OPTIONS")])
                return
            if handler is None:
                raise ClientError(405, "%s does not accept %s (allowed: %s)" % (path, request.method, allow),
                                  code="method_not_allowed", headers=[("Allow", allow)])
            if not public:
                self.check_api_key(request)
            await handler(request, response, param)
        except ClientError as exc:
            await self.send_error(response, exc, dialect)
        except BadRequest as exc:  # from reading the body: answered in the route's dialect, then closed
            response.keep_alive = False
            await self.send_error(response, ClientError(exc.status, str(exc),
                                                        code=PROTOCOL_ERROR_CODES.get(exc.status, "bad_request")), dialect)
        except AuthError as exc:
            self.last_auth_error = str(exc)
            status = 502 if exc.code == "network" else 503
            await self.send_error(response, ClientError(status, str(exc), kind="api_error", code=exc.code), dialect)
        except UpstreamUnreachable as exc:
            await self.send_error(response, ClientError(504 if exc.timeout else 502, str(exc), kind="api_error",
                                                        code="upstream_timeout" if exc.timeout else "upstream_unreachable"),
                                  dialect)

    def _cors(self, request, response):
        """CORS for --cors-origin: headers on every answer to an allowed origin; True when this
        was a preflight and has been answered (preflights need no API key, by the CORS rules)."""
        origin = request.header("origin")
        allowed = origin is not None and (origin in self.config.cors_origins or "*" in self.config.cors_origins)
        if allowed:
            response.extra_headers = [("Access-Control-Allow-Origin", origin), ("Vary", "Origin"),
                                      ("Access-Control-Expose-Headers", "Retry-After, X-Coproxy-Models-Source")]
        if request.method != "OPTIONS" or request.header("access-control-request-method") is None:
            return False
        response.log_fields["route"] = "preflight"
        if allowed:
            response.extra_headers += [
                ("Access-Control-Allow-Methods", "GET, POST, OPTIONS"),
                ("Access-Control-Allow-Headers", request.header("access-control-request-headers") or CORS_ALLOWED_HEADERS),
                ("Access-Control-Max-Age", "600")]
        return True

    def check_api_key(self, request):
        """Constant-time check of Authorization: Bearer K or x-api-key: K (when a key is set)."""
        key = self.config.api_key
        if not key:
            return
        expected = key.encode("utf-8")
        authorization = request.header("authorization", "")
        bearer = authorization[7:].strip() if authorization[:7].lower() == "bearer " else ""
        import hmac  # loaded once, on the first request that has to be checked
        by_header = hmac.compare_digest(request.header("x-api-key", "").encode("utf-8"), expected)
        by_bearer = hmac.compare_digest(bearer.encode("utf-8"), expected)
        if not (by_header or by_bearer):
            raise ClientError(401, "missing or wrong API key: send Authorization: Bearer <key> or "
                                   "x-api-key: <key> (the key coproxy was started with)",
                              code="invalid_api_key", headers=[("WWW-Authenticate", "Bearer")])

    async def send_error(self, response, exc, dialect="openai"):
        """An error in the route's envelope (OpenAI or Anthropic); nothing if a stream started."""
        response.log_fields["error"] = exc.code or exc.kind
        if response.started:
            return
        if dialect == "anthropic":
            body = json_dumps(anthropic_error_body(exc.status, str(exc)))
        else:
            body = json_dumps(openai_error_body(str(exc), exc.kind, exc.code, exc.param))
        if exc.status >= 500 or exc.status == 429:
            log.warning("answered %d %s: %s", exc.status, exc.code or exc.kind, exc)
        await response.send(exc.status, JSON_HEADERS + list(exc.headers), body)

    async def send_json(self, response, status, payload, headers=()):
        await response.send(status, JSON_HEADERS + list(headers), json_dumps(payload))

    def log_exchange(self, request, response, conn):
        """After each exchange: the metrics, and one access-log line (text, or JSON fields)."""
        fields = response.log_fields
        model = fields.get("model", "")
        if model and model not in self._catalog_cache[3] and model not in self.config.model_aliases:
            model = "other"  # keep label values bounded: only catalog ids
        status = response.status or 0
        self.metrics.inc("coproxy_requests_total", (("route", fields.get("route", "other")), ("status", status),
                                                    ("model", model), ("initiator", fields.get("initiator", ""))))
        if request.body:
            self.metrics.inc("coproxy_request_bytes_total", (), len(request.body))
        self.metrics.inc("coproxy_response_bytes_total", (), response.bytes_sent)
        if not access_log.isEnabledFor(logging.INFO):
            return
        duration = (time.monotonic() - request.started) * 1000
        shown = [(k, fields[k]) for k in ("model", "stream", "initiator", "premium", "path", "error") if k in fields]
        extra = "".join(" %s=%s" % (k, str(v).lower() if isinstance(v, bool) else v) for k, v in shown)
        record = None
        if self.config.log_format == "json":
            record = {"fields": dict(shown, method=request.method, path=request.path, status=status,
                                     duration_ms=round(duration, 1))}
        access_log.info("%s %s %s %.1fms%s", request.method, request.path, status or "-", duration, extra, extra=record)

    async def _acquire_slot(self):
        if self._slots.locked():
            try:
                await asyncio.wait_for(self._slots.acquire(), self.config.queue_timeout)
            except asyncio.TimeoutError:
                raise ClientError(503, "coproxy is at its concurrency limit (--max-concurrency %d); "
                                       "try again shortly" % self.config.max_concurrency,
                                  code="overloaded", headers=[("Retry-After", "1")])
        else:
            await self._slots.acquire()

    # -- talking to Copilot (runs in a worker thread) -----------------------------------------
    def _copilot_call(self, path, body, initiator, vision, stream, abort, extra_headers=None,
                      intent="conversation-panel", method="POST"):
        """POST to Copilot with the identity headers; a 401 forces one refresh and one retry.

        Returns (response, raw): raw is the body for errors and non-stream answers, None for
        a successful stream (left unread for the StreamPump)."""
        for attempt in (0, 1):
            record = self.auth.copilot_token()
            headers = copilot_headers(record["token"], initiator, vision, intent)
            if stream:
                headers["Accept"] = "text/event-stream"
            if extra_headers:
                headers.update(extra_headers)
            response = self.client.request(method, self.auth.api_base(record) + path, headers, body, abort)
            if response.status == 401 and attempt == 0:
                response.read_all(MAX_UPSTREAM_ERROR_BODY_BYTES)
                log.info("copilot answered 401; refreshing the Copilot token and retrying once")
                self.auth.invalidate(record["token"])
                continue
            if not 200 <= response.status < 300:
                return response, response.read_all(MAX_UPSTREAM_ERROR_BODY_BYTES)
            if stream:
                return response, None
            return response, response.read_all(MAX_UPSTREAM_JSON_BYTES)
        raise AssertionError("unreachable")  # pragma: no cover

    # -- handlers -----------------------------------------------------------------------------
    async def handle_health(self, request, response, _):
        token, source = self.auth.github_token()
        record = self.auth._record
        payload = {
            "status": "ok", "version": __version__,
            "auth": {"github_token": bool(token),
                     "copilot_token": ("valid" if record and record["expires_at"] > time.time() else
                                       "not yet fetched" if token else "missing"),
                     "ready": bool(token) and self.last_auth_error is None,
                     "error": self.last_auth_error},
            "uptime_seconds": int(time.time() - self.started_at),
        }
        await self.send_json(response, 200, payload, [("Cache-Control", "no-store")])

    async def _catalog(self):
        """(models, source): Copilot's list, or the built-in one when Copilot cannot be reached.

        A fresh copy is answered from the loop without a thread hop (it is on the hot path of
        every proxied request). A stale one is refreshed once, however many requests ask at that
        moment: they all await the same task (1,000 streams opening at once must not send 1,000
        worker threads to queue on the blocking fetch's lock)."""
        fetched_at, models, source, _ = self._catalog_cache
        if models is not None and time.monotonic() - fetched_at < min(self.config.models_ttl, 60):
            return models, source
        if self._catalog_refresh is None:
            self._catalog_refresh = self.loop.create_task(self._refresh_catalog())
        return await asyncio.shield(self._catalog_refresh)

    async def _refresh_catalog(self):
        try:
            try:
                models = await self.run_blocking(self.auth.fetch_models)
                self.last_auth_error = None
                source = "copilot"
            except (AuthError, UpstreamUnreachable) as exc:
                if isinstance(exc, AuthError):
                    self.last_auth_error = str(exc)
                log.warning("model list unavailable (%s); serving the built-in fallback list", exc)
                models, source = FALLBACK_MODELS, "fallback"
            self._catalog_cache = (time.monotonic() if source == "copilot" else 0.0, models, source,
                                   {m["id"]: m for m in models})
            return models, source
        finally:
            self._catalog_refresh = None

    async def _resolve_model(self, payload):
        """Put the catalog id into payload["model"]; (model, catalog entry or {}).

        Unknown names get a 404 with close matches before any upstream call, unless the catalog
        is the built-in fallback (then Copilot decides)."""
        _, source = await self._catalog()
        by_id = self._catalog_cache[3]
        name = self.config.model_aliases.get(payload["model"], payload["model"])
        model = name if name in by_id else resolve_model(name, list(by_id))
        if model is None:
            if source == "copilot":
                raise unknown_model_error(name, list(by_id))
            return name, {}
        payload["model"] = model
        return model, by_id[model]

    def _account(self, response, model, initiator, info, stream):
        """Access-log fields and the counters behind /usage, with the premium cost of the request."""
        billing = info.get("billing") if isinstance(info.get("billing"), dict) else {}
        multiplier = billing.get("multiplier")
        cost = (multiplier if initiator == "user" else 0) if isinstance(multiplier, (int, float)) else None
        response.log_fields.update(model=model, stream=stream, initiator=initiator)
        if cost is not None:
            response.log_fields["premium"] = "%g" % cost
            self.metrics.inc("coproxy_premium_requests_total", (("model", model),), cost)

    def _alias_entries(self):
        return [{"id": alias, "object": "model", "created": 0, "owned_by": "coproxy-alias", "alias_of": target}
                for alias, target in sorted(self.config.model_aliases.items())]

    async def handle_models(self, request, response, _):
        models, source = await self._catalog()
        data = [copilot_model_to_openai(m) for m in models] + self._alias_entries()
        await self.send_json(response, 200, {"object": "list", "data": data, "has_more": False},
                             [("X-Coproxy-Models-Source", source)])

    async def handle_model(self, request, response, model_id):
        models, source = await self._catalog()
        for alias in self._alias_entries():
            if alias["id"] == model_id:
                await self.send_json(response, 200, alias)
                return
        for model in models:
            if model["id"] == model_id:
                await self.send_json(response, 200, copilot_model_to_openai(model),
                                     [("X-Coproxy-Models-Source", source)])
                return
        raise ClientError(404, "model %r is not in the Copilot catalog (GET /v1/models lists them)" % model_id,
                          code="model_not_found", param="model")

    async def handle_chat_completions(self, request, response, _):
        payload = parse_json_object(await request.read_body(self._max_body))
        chat = prepare_chat_request(payload, self.config.default_model)
        model, info = await self._resolve_model(payload)
        if info:
            check_chat_capabilities(payload, info, chat.vision)
        if is_gemini(model, info):
            gemini_tools(payload)
        await self._inline_images(payload, model, info)
        path = endpoint_for(info, "/chat/completions")
        self._account(response, model, chat.initiator, info, chat.stream)
        if path == "/responses":  # e.g. gpt-5.x-codex: Copilot serves it only on /responses
            response.log_fields["path"] = "responses"
            body = json_dumps(chat_to_responses_request(payload))
        else:
            if model in self._max_completion_models and "max_tokens" in payload:
                payload["max_completion_tokens"] = payload.pop("max_tokens")
            body = json_dumps(payload)
        await self._acquire_slot()
        try:
            try:
                upstream, raw = await self._call_upstream(path, body, chat.initiator, chat.vision, chat.stream, model)
            except ClientError as exc:
                if not (path == "/chat/completions" and exc.status == 400 and "max_tokens" in payload
                        and _MAX_TOKENS_REFUSED.search(str(exc))):
                    raise
                log.info("model %s refuses max_tokens; sending max_completion_tokens from now on", model)
                self._max_completion_models.add(model)
                payload["max_completion_tokens"] = payload.pop("max_tokens")
                upstream, raw = await self._call_upstream(path, json_dumps(payload), chat.initiator, chat.vision,
                                                          chat.stream, model)
            if chat.stream:
                translator = (ResponsesToChatStream(model, chat.include_usage, time.time()) if path == "/responses"
                              else ChatStreamNormalizer(model, chat.include_usage, chat.merge_choices, time.time()))
                await self._relay_stream(upstream, translator, SSE_PING, request, response, model)
                return
            try:
                data = json.loads(raw)
                answer = (responses_to_chat_response(data, model, time.time()) if path == "/responses" else
                          normalize_chat_response(data, model, chat.merge_choices, time.time()))
            except (ValueError, RecursionError, AttributeError, TypeError):
                raise ClientError(502, "Copilot sent an answer that is not a chat completion",
                                  code="bad_upstream_response")
            await self.send_json(response, 200, answer)
        finally:
            self._slots.release()

    async def handle_embeddings(self, request, response, _):
        payload, encoding = prepare_embeddings_request(parse_json_object(await request.read_body(self._max_body)))
        model, info = await self._resolve_model(payload)
        # Embeddings are not premium requests; "agent" keeps them from ever being counted as one.
        self._account(response, model, "agent", info, False)
        upstream, raw = await self._call_upstream("/embeddings", json_dumps(payload), "agent", False, False, model,
                                                  intent="copilot-panel")
        try:
            answer = normalize_embeddings_response(json.loads(raw), model, encoding)
        except (ValueError, RecursionError, AttributeError, TypeError, struct.error):
            raise ClientError(502, "Copilot sent an answer that is not an embeddings list", code="bad_upstream_response")
        await self.send_json(response, 200, answer)

    async def handle_responses(self, request, response, _):
        payload = parse_json_object(await request.read_body(self._max_body))
        payload["model"] = payload.get("model") or self.config.default_model
        if not isinstance(payload["model"], str) or not payload["model"]:
            raise ClientError(400, "'model' is required (or start coproxy with --default-model)", param="model",
                              code="model_required")
        model, info = await self._resolve_model(payload)
        stream = payload.get("stream") is True
        initiator = responses_initiator(payload)
        await self._inline_images(payload, model, info)
        self._account(response, model, initiator, info, stream)
        await self._acquire_slot()
        try:
            upstream, raw = await self._call_upstream("/responses", json_dumps(payload), initiator,
                                                      responses_have_image(payload), stream, model)
            if stream:
                await self._relay_stream(upstream, ResponsesPassthrough(), SSE_PING, request, response, model)
                return
            await self._send_upstream_json(response, raw)
        finally:
            self._slots.release()

    async def handle_response_get(self, request, response, response_id):
        upstream, raw = await self._call_upstream("/responses/" + urllib.parse.quote(response_id, safe=""), None,
                                                  "agent", False, False, "-", method="GET")
        await self._send_upstream_json(response, raw)

    async def _send_upstream_json(self, response, raw):
        try:
            if not isinstance(json.loads(raw), dict):
                raise ValueError("not an object")
        except (ValueError, RecursionError):
            raise ClientError(502, "Copilot sent an answer that is not JSON", code="bad_upstream_response")
        await response.send(200, JSON_HEADERS, raw)

    async def handle_metrics(self, request, response, _):
        gauges = [("coproxy_active_streams", "Streams being relayed now.", "gauge", self.metrics.active_streams),
                  ("coproxy_token_refreshes_total", "Copilot token exchanges.", "counter", self.auth.exchanges),
                  ("coproxy_token_refresh_failures_total", "Copilot token exchanges that failed.", "counter",
                   self.auth.exchange_failures),
                  ("coproxy_upstream_connections_opened_total", "Connections opened to GitHub and Copilot.", "counter",
                   self.client.connections_opened),
                  ("coproxy_start_time_seconds", "When this coproxy started (unix time).", "gauge", self.started_at)]
        await response.send(200, [("Content-Type", "text/plain; version=0.0.4; charset=utf-8")],
                            self.metrics.render(gauges))

    def usage_since_start(self):
        """/usage's counters, read off the metrics: model requests by initiator and by model."""
        by_initiator, by_model, premium = collections.Counter(), collections.Counter(), 0.0
        for (name, labels), value in self.metrics.counters.items():
            labels = dict(labels)
            if name == "coproxy_requests_total" and labels.get("initiator"):
                by_initiator[labels["initiator"]] += value
                by_model[labels["model"]] += value
            elif name == "coproxy_premium_requests_total":
                premium += value
        return {"started_at": int(self.started_at), "requests": sum(by_initiator.values()),
                "by_initiator": dict(by_initiator), "by_model": dict(by_model), "premium_requests": round(premium, 2)}

    async def handle_usage(self, request, response, _):
        payload = {"since_start": self.usage_since_start()}
        try:
            payload["copilot"] = summarize_quota(await self.run_blocking(self.auth.copilot_user))
        except (AuthError, UpstreamUnreachable) as exc:
            payload["copilot"], payload["error"] = None, str(exc)
        await self.send_json(response, 200, payload, [("Cache-Control", "no-store")])

    async def _relay_stream(self, upstream, translator, ping, request, response, model):
        """Pass an upstream SSE stream through ``translator`` to the client as events arrive.

        ``translator`` has feed_event(SSEEvent) -> frames, finish() and error(message) -> the
        closing frames, and ``finished``. Upstream silence sends ``ping``; an upstream failure
        sends one error event in the route's dialect; a client that leaves stops everything."""
        decoder = SSEDecoder()
        pump = StreamPump(self.loop, self.executor, upstream)
        request._conn.watch_for_disconnect(pump.cancel)
        self.metrics.active_streams += 1
        first = True
        try:
            await response.start_stream(200, SSE_HEADERS)
            while True:
                chunks, finished, error = await pump.next(self.config.ping_seconds)
                if chunks is None:
                    await response.write(ping)  # upstream is thinking; keep the client's stream alive
                    continue
                if first:
                    first = False
                    self.metrics.observe("coproxy_upstream_ttfb_seconds", time.monotonic() - request.started,
                                         (("route", response.log_fields.get("route", "other")),))
                out = []
                for data in chunks:
                    for event in decoder.feed(data):
                        out.extend(translator.feed_event(event))
                if finished and not translator.finished:
                    if error is not None:
                        log.warning("upstream stream failed model=%s: %s", model, error.__class__.__name__)
                        out.extend(translator.error("the connection to Copilot failed mid-stream (%s)" % (
                            "timeout" if isinstance(error, socket.timeout) else error.__class__.__name__)))
                    else:
                        for event in decoder.finish():
                            out.extend(translator.feed_event(event))
                        out.extend(translator.finish())
                if out:
                    await response.write(b"".join(out))
                if finished or translator.finished:
                    break
            await response.end()
        finally:
            self.metrics.active_streams -= 1
            pump.cancel()

    async def _pace(self):
        """--rate-limit: one upstream request per interval; the excess waits (--wait) or gets 429."""
        gap = self.config.rate_limit
        if not gap:
            return
        now = self.clock()
        if now >= self._next_upstream_at:
            self._next_upstream_at = now + gap
            return
        delay = self._next_upstream_at - now
        if not self.config.wait:
            raise ClientError(429, "coproxy's own rate limit: one request to Copilot every %gs (--rate-limit); "
                                   "retry in %.1fs, or start coproxy with --wait to queue instead" % (gap, delay),
                              code="rate_limited", headers=[("Retry-After", str(max(1, int(delay + 0.999))))])
        self._next_upstream_at += gap  # this request's turn is reserved before it sleeps
        await self.sleep(delay)

    async def _call_upstream(self, path, body, initiator, vision, stream, model, **extra):
        """Run one Copilot call in a worker; a non-2xx answer becomes a ClientError."""
        await self._pace()
        started = time.monotonic()
        upstream, raw = await self.run_blocking(
            functools.partial(self._copilot_call, path, body, initiator, vision, stream, AbortHandle(), **extra))
        self.metrics.observe("coproxy_upstream_latency_seconds", time.monotonic() - started, (("route", path),))
        self.last_auth_error = None
        if not 200 <= upstream.status < 300:
            error = client_error_from_upstream(upstream.status, raw, upstream.headers)
            policy = (self._catalog_cache[3].get(model) or {}).get("policy")
            state = policy.get("state") if isinstance(policy, dict) else None
            if error.code == "model_not_supported" and state not in (None, "enabled"):
                error = ClientError(error.status, "%s: %s is not enabled for your account (policy: %s); enable it at "
                                    "https://github.com/settings/copilot/features or once in VS Code's model picker"
                                    % (str(error).rstrip(". "), model, state), kind=error.kind, code=error.code,
                                    param=error.param, headers=error.headers)
            log.warning("upstream status=%d model=%s code=%s retry_after=%s", upstream.status, model,
                        error.code, upstream.header("retry-after", "-"))
            raise error
        return upstream, raw

    async def handle_messages(self, request, response, _):
        payload = parse_json_object(await request.read_body(self._max_body))
        validate_anthropic_request(payload)
        model, info = await self._resolve_model(payload)
        stream = payload.get("stream") is True
        initiator = anthropic_initiator(payload["messages"])
        vision = anthropic_messages_have_image(payload)
        await self._inline_images(payload, model, info)
        native = "/v1/messages" in (info.get("supported_endpoints") or [])
        self._account(response, model, initiator, info, stream)
        response.log_fields["path"] = "native" if native else "chat"
        if native:
            headers = {"anthropic-version": request.header("anthropic-version") or "2023-06-01"}
            betas = [b.strip() for b in request.header("anthropic-beta", "").split(",")
                     if b.strip().startswith(SUPPORTED_ANTHROPIC_BETAS)]
            if betas:
                headers["anthropic-beta"] = ",".join(betas)
            call = dict(path="/v1/messages", body=json_dumps(payload), extra_headers=headers, intent="messages-proxy")
        elif endpoint_for(info, "/chat/completions") == "/responses":  # e.g. gpt-5.1-codex from Claude Code
            response.log_fields["path"] = "responses"
            call = dict(path="/responses",
                        body=json_dumps(chat_to_responses_request(anthropic_to_openai_request(payload, info))))
        else:
            chat_payload = anthropic_to_openai_request(payload, info)
            if is_gemini(model, info):
                gemini_tools(chat_payload)
            call = dict(path="/chat/completions", body=json_dumps(chat_payload))
        await self._acquire_slot()
        try:
            upstream, raw = await self._call_upstream(call.pop("path"), call.pop("body"), initiator, vision,
                                                      stream, model, **call)
            via_responses = response.log_fields.get("path") == "responses"
            if stream:
                translator = AnthropicPassthrough() if native else AnthropicStreamTranslator(
                    model, estimate_input_tokens(payload))
                if via_responses:
                    translator = ChainedTranslator(ResponsesToChatStream(model, True, time.time()), translator)
                await self._relay_stream(upstream, translator, ANTHROPIC_PING, request, response, model)
                return
            try:
                answer = json.loads(raw)
                if via_responses:
                    answer = responses_to_chat_response(answer, model, time.time())
                if not native:
                    answer = openai_to_anthropic_response(answer, model)
                elif not isinstance(answer, dict):
                    raise ValueError("not an object")
            except (ValueError, RecursionError, AttributeError):
                raise ClientError(502, "Copilot sent an answer that is not a message", code="bad_upstream_response")
            await self.send_json(response, 200, answer)
        finally:
            self._slots.release()

    async def handle_count_tokens(self, request, response, _):
        payload = parse_json_object(await request.read_body(self._max_body))
        if not isinstance(payload.get("messages"), list):
            raise ClientError(400, "messages: must be an array", param="messages")
        await self.send_json(response, 200, {"input_tokens": estimate_input_tokens(payload)})


async def run_server(config, app=None, on_ready=None, stop_event=None, announce=True):
    """Serve until SIGINT/SIGTERM (or ``stop_event``), then shut down gracefully."""
    app = app or App(config)
    await app.start()
    server = Server(app, config.header_timeout, config.idle_timeout, config.body_timeout)
    try:
        await server.start(config.host, config.port)
    except OSError as exc:
        app.close()
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError("cannot listen on %s:%s: address already in use (another coproxy? "
                              "choose another --port)" % (config.host, config.port))
        raise ConfigError("cannot listen on %s:%s: %s" % (config.host, config.port, exc.strerror or exc))
    stop_event = stop_event or asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(signum, stop_event.set)
        except (NotImplementedError, RuntimeError, ValueError):
            pass  # Windows, or not the main thread: Ctrl-C arrives as KeyboardInterrupt instead
    host = server.host if ":" not in server.host else "[%s]" % server.host
    if on_ready is not None:
        on_ready(server)
    if announce and config.log_format == "json":  # every stderr line stays one JSON object
        url = "http://%s:%d" % (host, server.port)
        sys.stderr.write(json.dumps({"ts": round(time.time(), 3), "level": "info", "message": "listening on " + url,
                                     "url": url}) + "\n")
        sys.stderr.flush()
    elif announce:
        base = "http://%s:%d" % ("127.0.0.1" if host in ("0.0.0.0", "[::]") else host, server.port)
        sys.stderr.write("listening on http://%s:%d\n" % (host, server.port))
        sys.stderr.write("  OpenAI clients:      OPENAI_BASE_URL=%s/v1\n"
                         "  Anthropic clients:   ANTHROPIC_BASE_URL=%s   (Claude Code: eval \"$(python3 %s claude-code"
                         "%s)\")\n" % (base, base, os.path.basename(sys.argv[0]) if sys.argv[0].endswith(".py") else
                                        "coproxy.py", "" if server.port == DEFAULT_PORT else " --port %d" % server.port))
        sys.stderr.flush()
    try:
        await stop_event.wait()
        log.info("shutting down")
    finally:
        await server.shutdown(config.shutdown_grace)
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.remove_signal_handler(signum)
            except (NotImplementedError, RuntimeError, ValueError):
                pass
        app.close()
    return 0


# ------------------------------------------------------------------------------------------
# 11. CLI
#     argparse subcommands generated from OPTIONS (§4): shared options work before or after
#     the subcommand. Each ``cmd_*`` returns an exit code; results go to stdout, diagnostics
#     and prompts to stderr.
# ------------------------------------------------------------------------------------------

class UsageError(CoproxyError):
    """The command line asks for something that cannot be done as given (exit 2)."""


def _flag_type(flag, convert):
    """An argparse type: ``convert``, with its ValueError shown as a usage error naming the flag."""
    def parse(text):
        try:
            return convert(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError("%s: %s" % (flag, exc))
    return parse


def _add_options(parser, scope, only=None):
    for option in OPTIONS:
        if option.scope != scope or (only is not None and option.dest not in only):
            continue
        shown_default = "" if option.default in (None, False) else " [default: %s]" % option.default
        help_text = "%s (env %s)%s" % (option.help, option.env, shown_default)
        flags = ("-d", option.flag) if option.dest == "detach" else (option.flag,)
        if option.type is bool:
            parser.add_argument(*flags, dest=option.dest, action="store_true", default=argparse.SUPPRESS,
                                help=help_text)
        elif isinstance(option.type, Repeatable):
            parser.add_argument(option.flag, dest=option.dest, type=_flag_type(option.flag, option.type.item),
                                action="append", metavar=option.metavar, default=argparse.SUPPRESS, help=help_text)
        else:
            parser.add_argument(option.flag, dest=option.dest, type=_flag_type(option.flag, option.type),
                                metavar=option.metavar, default=argparse.SUPPRESS, help=help_text)

def build_parser(command=None):
    """The CLI. With ``command``, only that subcommand's parser is built: argparse spends ~0.4 ms
    per subparser (gettext lookups included), which ``serve`` would pay before listening."""
    shared = argparse.ArgumentParser(add_help=False)
    _add_options(shared, "shared")
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="coproxy", parents=[shared], formatter_class=formatter,
        description="Your GitHub Copilot subscription as a local OpenAI- and Anthropic-compatible API.",
        epilog="first run:  coproxy.py auth login && coproxy.py serve\n"
               "then point clients at http://127.0.0.1:8080/v1 (any API key unless --api-key is set)")
    parser.add_argument("--version", action="version", version="coproxy " + __version__)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    if command in (None, "serve"):
        serve = commands.add_parser("serve", parents=[shared], formatter_class=formatter,
                                    help="run the proxy server",
                                    description="Serve the OpenAI API on HOST:PORT, backed by Copilot.")
        _add_options(serve, "serve")
        serve.add_argument("--pid-file", help=argparse.SUPPRESS)  # set by `serve -d` for its background child

    if command in (None, "auth"):
        auth = commands.add_parser("auth", help="log in, inspect or forget the GitHub login",
                                   description="Manage the GitHub login and the Copilot token.")
        auth_commands = auth.add_subparsers(dest="auth_command", metavar="ACTION")
        login = auth_commands.add_parser("login", parents=[shared], help="log in with GitHub's device flow",
                                         description="Show a code and a URL; approve on GitHub; the token is saved "
                                                     "(0600) in the state directory.")
        login.add_argument("--no-browser", action="store_true", help="do not try to open a web browser")
        auth_commands.add_parser("status", parents=[shared], help="show login, plan, token expiry and API base",
                                 description="Exit status 0 when a Copilot token can be had, 1 otherwise.")
        auth_commands.add_parser("logout", parents=[shared], help="delete the saved tokens",
                                 description="Remove auth/github-access-token and auth/ghcp-token.json.")
        auth_commands.add_parser("refresh", parents=[shared], help="fetch a new Copilot token now",
                                 description="Exchange the GitHub token for a fresh Copilot token and save it.")

    if command in (None, "models"):
        models = commands.add_parser("models", parents=[shared], help="list the models Copilot offers you",
                                     description="Table of id, vendor, context window, output limit, tools/vision.")
        models.add_argument("--json", action="store_true", help="print OpenAI-shaped JSON instead of a table")
        _add_options(models, "serve", only=("model_aliases",))

    if command in (None, "stop"):
        commands.add_parser("stop", parents=[shared], help="stop the background server started with serve -d",
                            description="Send SIGTERM to the server in <state-dir>/coproxy.pid, wait for its graceful "
                                        "drain, and report.")

    if command in (None, "status"):
        commands.add_parser("status", parents=[shared], help="is a background server running? pid, address, uptime, auth",
                            description="Exit status 0 when the server in <state-dir>/coproxy.pid is running, 1 otherwise.")

    if command in (None, "service"):
        service = commands.add_parser("service", parents=[shared], help="print a systemd user unit or a launchd plist",
                                      description="Print a service definition that runs `serve` for this Python and this "
                                                  "file; see the README for installing it.")
        service.add_argument("kind", choices=("systemd", "launchd"))
        _add_options(service, "serve", only=("host", "port"))

    if command in (None, "usage"):
        usage = commands.add_parser("usage", parents=[shared], help="show your Copilot plan, premium requests and quotas",
                                    description="Plan, premium requests used/remaining/entitlement, chat quota and the "
                                                "reset date, from GitHub's copilot_internal/user.")
        usage.add_argument("--json", action="store_true", help="print JSON (the same as GET /usage's copilot part)")

    if command in (None, "claude-code"):
        claude = commands.add_parser(
            "claude-code", parents=[shared], formatter_class=formatter,
            help="print the environment that points Claude Code at coproxy",
            description="Print ANTHROPIC_* settings for Claude Code: base URL, auth token, and model choices from\n"
                        "your live Copilot catalog. Use:  eval \"$(python3 coproxy.py claude-code)\"  then run `claude`.")
        _add_options(claude, "serve", only=("host", "port", "api_key"))
        claude.add_argument("--shell", choices=("sh", "fish", "powershell"), default="sh",
                            help="syntax of the lines printed [default: sh, for bash/zsh]")
        claude.add_argument("--model", help="main model (default: the newest Sonnet in your catalog)")
    return parser


def _say(text):
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def _interactive():
    return sys.stdin is not None and sys.stdin.isatty() and sys.stderr.isatty()


@contextlib.contextmanager
def _session(config):
    """Token store, upstream client and auth for one CLI command; pooled sockets closed after."""
    store = TokenStore(config.state_dir)
    client = UpstreamClient(config.ca_file, config.connect_timeout, config.upstream_timeout, config.environ)
    try:
        yield store, client, CopilotAuth(config, store, client)
    finally:
        client.close()


def run_device_login(config, store, client, auth, open_browser=True):
    """The interactive part of ``auth login`` (also used by ``serve`` on a TTY)."""
    flow = DeviceFlow(client, config.github_url)
    code = flow.start()
    uri = code.get("verification_uri_complete") or code["verification_uri"]
    _say("To log in, open %s and enter the code:  %s" % (code["verification_uri"], code["user_code"]))
    tty = sys.stderr.isatty()
    if open_browser and _interactive():
        try:
            import webbrowser  # only here: it costs start-up time and memory every serve would pay
            webbrowser.open(uri)
        except Exception:  # no browser is fine: the URL is on screen
            pass

    def on_wait(remaining, interval):
        if tty:
            sys.stderr.write("\rwaiting for approval (code expires in %s, checking every %ds)  " % (
                format_duration(remaining), interval))
            sys.stderr.flush()

    if not tty:
        _say("waiting for approval (the code expires in %s)" % format_duration(code["expires_in"]))
    try:
        token = flow.poll(code, on_wait)
    finally:
        if tty:
            sys.stderr.write("\n")
    store.save_github_token(token)
    _say("GitHub login saved to %s" % store.github_token_path)
    auth.copilot_token(force=True)
    return token


def cmd_serve(config, args):
    if not is_loopback_host(config.host) and not config.api_key and not config.allow_unauthenticated:
        raise UsageError("refusing to listen on %s without an API key: anyone who can reach it would use your "
                         "Copilot subscription. Set --api-key (or GHCP_PROXY_API_KEY), or pass "
                         "--allow-unauthenticated if you really mean it" % config.host)
    store = TokenStore(config.state_dir)
    client = UpstreamClient(config.ca_file, config.connect_timeout, config.upstream_timeout, config.environ)
    auth = CopilotAuth(config, store, client)
    token, source = auth.github_token()
    if not token:
        if config.no_auto_login:
            log.warning("not logged in; requests get 503 until `coproxy.py auth login` has run")
        elif _interactive():
            run_device_login(config, store, client, auth)
        else:
            raise CoproxyError("not logged in to GitHub: run `python3 coproxy.py auth login` first, set "
                               "GHCP_GITHUB_TOKEN, or pass --no-auto-login to start anyway")
    if config.detach:
        return start_detached(config, args)
    try:  # process-wide, so set here by the command and not by App (embedders keep their own)
        threading.stack_size(WORKER_STACK_BYTES)
    except (ValueError, RuntimeError):  # a platform that does not allow it: keep its default
        pass
    app = App(config, store, client, auth)
    pid_file = getattr(args, "pid_file", None)

    def warm_up(server):
        if pid_file:  # written only once listening, so `serve -d` knows the child is up
            host = server.host if ":" not in server.host else "[%s]" % server.host
            write_file_atomic(pid_file, "%d\nhttp://%s:%d\n" % (os.getpid(), host, server.port))
        if auth.github_token()[0]:  # fetch the Copilot token now, not on the first request
            def check():
                try:
                    auth.copilot_token()
                except (AuthError, UpstreamUnreachable) as exc:
                    app.last_auth_error = str(exc)
                    log.error("%s", exc)
            app.executor.submit(check)

    try:
        return asyncio.run(run_server(config, app, on_ready=warm_up))
    except KeyboardInterrupt:  # Windows: no signal handlers in the loop
        return 0
    finally:
        if pid_file and read_pid_file(pid_file)[0] == os.getpid():
            os.unlink(pid_file)


def cmd_auth_login(config, args):
    if config.github_token:
        _say("note: a token from %s is set and will be used instead of the one saved here" %
             config.github_token_source)
    with _session(config) as (store, client, auth):
        run_device_login(config, store, client, auth, open_browser=not args.no_browser)
        try:
            login = auth.github_user().get("login", "?")
        except AuthError:
            login = "?"
        record = auth.copilot_token()
        print("logged in as %s; Copilot token valid for %s" % (login, format_duration(record["expires_at"] - time.time())))
        return 0


def cmd_auth_status(config, args):
    with _session(config) as (store, client, auth):
        token, source = auth.github_token()
        print("state dir:      %s" % config.state_dir)
        if not token:
            print("GitHub:         not logged in (run `python3 coproxy.py auth login`)")
            return 1
        try:
            login = auth.github_user().get("login", "?")
        except AuthError as exc:
            login = "unknown (%s)" % exc
        print("GitHub:         %s (token from %s)" % (login, source))
        try:
            record = auth.copilot_token()
        except (AuthError, UpstreamUnreachable) as exc:
            print("Copilot:        no token: %s" % exc)
            return 1
        try:
            plan = auth.copilot_user().get("copilot_plan") or "?"
        except (AuthError, UpstreamUnreachable):
            plan = "?"
        remaining = record["expires_at"] - time.time()
        print("Copilot plan:   %s (sku %s)" % (plan, record.get("sku", "?")))
        print("Copilot token:  valid for %s (expires %s)" % (
            format_duration(remaining), time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(record["expires_at"]))))
        print("API base:       %s" % auth.api_base(record))
        return 0


def cmd_auth_logout(config, args):
    store = TokenStore(config.state_dir)
    removed = store.clear()
    print("removed %s" % ", ".join(removed) if removed else "no saved login in %s" % store.auth_dir)
    if config.github_token:
        _say("note: %s is still set and will keep being used" % config.github_token_source)
    return 0


def cmd_auth_refresh(config, args):
    with _session(config) as (store, client, auth):
        record = auth.copilot_token(force=True)
        print("new Copilot token valid for %s; API base %s" % (
            format_duration(record["expires_at"] - time.time()), auth.api_base(record)))
        return 0


def cmd_models(config, args):
    with _session(config) as (store, client, auth):
        entries = [copilot_model_to_openai(m) for m in auth.fetch_models()]
        entries += [{"id": a, "object": "model", "owned_by": "coproxy-alias", "alias_of": t}
                    for a, t in sorted(config.model_aliases.items())] if args.json else []
        if args.json:
            print(json.dumps({"object": "list", "data": entries}, indent=2))
            return 0
        rows = [("ID", "VENDOR", "CONTEXT", "OUTPUT", "TOOLS", "VISION")]
        for entry in entries:
            rows.append((entry["id"], entry["vendor"], str(entry["context_window"] or "-"),
                         str(entry["max_output_tokens"] or "-"), "yes" if entry["capabilities"]["tool_calls"] else "no",
                         "yes" if entry["capabilities"]["vision"] else "no"))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        for row in rows:
            print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
        for alias, target in sorted(config.model_aliases.items()):
            print("alias %s -> %s" % (alias, target))
        return 0


PID_FILE = "coproxy.pid"
LOG_FILE = "coproxy.log"


def read_pid_file(path):
    """(pid, url) from a pid file (pid on line 1, address on line 2), or (None, None)."""
    try:
        with open(path, "r", encoding="utf-8") as handle:
            lines = handle.read().split()
        return int(lines[0]), (lines[1] if len(lines) > 1 else None)
    except (OSError, ValueError, IndexError):
        return None, None


def process_alive(pid):
    """True if ``pid`` is a live coproxy (on Linux, /proc also confirms it is not a recycled pid)."""
    if os.name == "nt":  # os.kill on Windows would terminate it, so ask the kernel instead
        import ctypes
        handle = ctypes.windll.kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return False
        code = ctypes.c_ulong()
        ctypes.windll.kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
        ctypes.windll.kernel32.CloseHandle(handle)
        return code.value == 259  # STILL_ACTIVE
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as handle:
            return b"coproxy" in handle.read()
    except OSError:
        return True  # no /proc (macOS): the pid is alive, trust the file


def running_instance(config):
    """(pid, url) of the background server of this state dir; a stale pid file is removed."""
    path = os.path.join(config.state_dir, PID_FILE)
    pid, url = read_pid_file(path)
    if pid is None:
        return None, None
    if process_alive(pid):
        return pid, url
    _say("removing a stale pid file (pid %d is gone): %s" % (pid, path))
    try:
        os.unlink(path)
    except OSError:
        pass
    return None, None


def start_detached(config, args):
    """serve -d: run this same command again as a background process (re-exec, so it also works on
    Windows, where there is no fork), wait until it listens, and report where."""
    pid, url = running_instance(config)
    if pid is not None:
        raise CoproxyError("coproxy is already running (pid %d, %s); `coproxy.py stop` first" % (pid, url))
    os.makedirs(config.state_dir, mode=0o700, exist_ok=True)
    pid_path = os.path.join(config.state_dir, PID_FILE)
    log_path = os.path.join(config.state_dir, LOG_FILE)
    argv = [sys.executable, os.path.abspath(__file__)] + [a for a in args.argv if a not in ("-d", "--detach")]
    argv += ["--no-auto-login", "--pid-file", pid_path]
    environ = dict(os.environ)
    environ.pop("COPROXY_DETACH", None)
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    options = {"start_new_session": True} if os.name != "nt" else {
        "creationflags": 0x00000008 | 0x00000200}  # DETACHED_PROCESS | CREATE_NEW_PROCESS_GROUP
    import subprocess  # only here: the background child is the one place coproxy starts a process
    try:
        child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_fd, stderr=log_fd, env=environ,
                                 close_fds=True, **options)
    finally:
        os.close(log_fd)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        pid, url = read_pid_file(pid_path)
        if pid == child.pid:
            print("coproxy is running in the background: pid %d, %s, log %s" % (pid, url, log_path))
            return 0
        if child.poll() is not None:
            break
        time.sleep(0.05)
    with open(log_path, "r", encoding="utf-8", errors="replace") as handle:
        tail = handle.read()[-2000:].strip().splitlines()[-5:]
    if child.poll() is None:
        child.terminate()
    raise CoproxyError("the background server did not start; last lines of %s:\n  %s" % (log_path, "\n  ".join(tail)))


def cmd_stop(config, args):
    pid, url = running_instance(config)
    if pid is None:
        print("coproxy is not running (no live pid in %s)" % os.path.join(config.state_dir, PID_FILE))
        return 1
    os.kill(pid, signal.SIGTERM)  # graceful: in-flight requests get --shutdown-grace to finish
    deadline = time.monotonic() + config.shutdown_grace + 10
    while time.monotonic() < deadline and process_alive(pid):
        time.sleep(0.05)
    if process_alive(pid):
        print("coproxy (pid %d) has not stopped yet; check %s" % (pid, os.path.join(config.state_dir, LOG_FILE)))
        return 1
    print("stopped coproxy (pid %d, %s)" % (pid, url))
    return 0


def cmd_status(config, args):
    pid, url = running_instance(config)
    if pid is None:
        print("coproxy is not running")
        return 1
    started = os.path.getmtime(os.path.join(config.state_dir, PID_FILE))
    print("running:  pid %d, %s, up %s" % (pid, url, format_duration(time.time() - started)))
    client = UpstreamClient(connect_timeout=3, read_timeout=3, environ={})
    try:
        health = client.request_json("GET", url + "/healthz", {"Accept": "application/json"})[1] or {}
        auth = health.get("auth") or {}
        print("auth:     %s" % ("ready" if auth.get("ready") else "not ready: %s" % (
            auth.get("error") or ("no GitHub login" if not auth.get("github_token") else "no Copilot token yet"))))
    except (UpstreamUnreachable, AttributeError) as exc:
        print("health:   /healthz did not answer (%s)" % exc)
        return 1
    finally:
        client.close()
    return 0


def _service_command(config):
    argv = [sys.executable, os.path.abspath(__file__), "serve", "--no-auto-login", "--state-dir", config.state_dir]
    if config.host != DEFAULT_HOST:
        argv += ["--host", config.host]
    if config.port != DEFAULT_PORT:
        argv += ["--port", str(config.port)]
    return argv


def cmd_service(config, args):
    argv = _service_command(config)
    proxies = [(k, v) for k, v in sorted(os.environ.items())
               if k.upper() in ("HTTPS_PROXY", "HTTP_PROXY", "NO_PROXY", "SSL_CERT_FILE") and v]
    if args.kind == "systemd":
        quote = lambda a: '"%s"' % a.replace("\\", "\\\\").replace('"', '\\"') if re.search(r'[\s"\\]', a) else a
        lines = ["# coproxy as a systemd user service. Install:",
                 "#   python3 coproxy.py service systemd > ~/.config/systemd/user/coproxy.service",
                 "#   systemctl --user daemon-reload && systemctl --user enable --now coproxy",
                 "#   journalctl --user -u coproxy -f",
                 "[Unit]", "Description=coproxy: GitHub Copilot as a local OpenAI/Anthropic API",
                 "After=network-online.target", "Wants=network-online.target", "",
                 "[Service]", "Type=simple", "ExecStart=" + " ".join(quote(a) for a in argv),
                 "Restart=on-failure", "RestartSec=5", "KillSignal=SIGTERM",
                 "TimeoutStopSec=%d" % int(config.shutdown_grace + 5)]
        lines += ["Environment=%s" % quote("%s=%s" % kv) for kv in proxies]
        lines += ["# hardening: no new privileges, read-only system and home except the state directory",
                  "NoNewPrivileges=yes", "UMask=0077", "PrivateTmp=yes", "ProtectSystem=strict",
                  "ProtectHome=read-only", "ReadWritePaths=%s" % quote(config.state_dir),
                  "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX", "RestrictRealtime=yes",
                  "RestrictSUIDSGID=yes", "LockPersonality=yes", "SystemCallArchitectures=native", "",
                  "[Install]", "WantedBy=default.target"]
        print("\n".join(lines))
        return 0
    escape = lambda text: text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    log_path = os.path.join(config.state_dir, LOG_FILE)
    lines = ['<?xml version="1.0" encoding="UTF-8"?>',
             "<!-- coproxy as a launchd agent. Install:",
             "       python3 coproxy.py service launchd > ~/Library/LaunchAgents/com.github.coproxy.plist",
             "       launchctl load -w ~/Library/LaunchAgents/com.github.coproxy.plist -->",
             '<!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST 1.0//EN" "http://www.apple.com/DTDs/PropertyList-1.0.dtd">',
             '<plist version="1.0">', "<dict>",
             "  <key>Label</key><string>com.github.coproxy</string>", "  <key>ProgramArguments</key>", "  <array>"]
    lines += ["    <string>%s</string>" % escape(a) for a in argv]
    lines += ["  </array>", "  <key>RunAtLoad</key><true/>",
              "  <key>KeepAlive</key><dict><key>SuccessfulExit</key><false/></dict>",
              "  <key>ProcessType</key><string>Background</string>",
              "  <key>StandardOutPath</key><string>%s</string>" % escape(log_path),
              "  <key>StandardErrorPath</key><string>%s</string>" % escape(log_path)]
    if proxies:
        lines.append("  <key>EnvironmentVariables</key><dict>")
        lines += ["    <key>%s</key><string>%s</string>" % (escape(k), escape(v)) for k, v in proxies]
        lines.append("  </dict>")
    lines += ["</dict>", "</plist>"]
    print("\n".join(lines))
    return 0


def _describe_bucket(bucket, reset):
    if bucket is None:
        return "not reported"
    if bucket["unlimited"]:
        return "unlimited"
    text = "%s used of %s, %s left" % (bucket["used"], bucket["entitlement"], bucket["remaining"])
    if bucket.get("percent_remaining") is not None:
        text += " (%.1f%% left)" % bucket["percent_remaining"]
    if bucket.get("overage_count"):
        text += ", %s over quota" % bucket["overage_count"]
    return text + (", resets %s" % reset[:10] if reset else "")


def cmd_usage(config, args):
    with _session(config) as (store, client, auth):
        summary = summarize_quota(auth.copilot_user())
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print("account:           %s" % (summary["login"] or "?"))
    print("plan:              %s (sku %s)" % (summary["plan"] or "?", summary["sku"] or "?"))
    print("premium requests:  %s" % _describe_bucket(summary["premium_requests"], summary["reset_date"]))
    print("chat:              %s" % _describe_bucket(summary["chat"], None))
    print("completions:       %s" % _describe_bucket(summary["completions"], None))
    return 0


def claude_code_environment(config, model_ids, main_model=None):
    """(name, value) pairs that make Claude Code talk to coproxy, models from the live catalog."""
    opus, sonnet, haiku = (resolve_model(family, model_ids) for family in ("opus", "sonnet", "haiku"))
    main = (resolve_model(main_model, model_ids) or main_model) if main_model else (sonnet or opus or
                                                                                     (model_ids or [None])[0])
    host = "127.0.0.1" if config.host in ("0.0.0.0", "::", "") else config.host
    host = "[%s]" % host if ":" in host else host
    pairs = [("ANTHROPIC_BASE_URL", "http://%s:%d" % (host, config.port)),
             ("ANTHROPIC_AUTH_TOKEN", config.api_key or "coproxy"),
             ("ANTHROPIC_MODEL", main), ("ANTHROPIC_DEFAULT_OPUS_MODEL", opus),
             ("ANTHROPIC_DEFAULT_SONNET_MODEL", sonnet), ("ANTHROPIC_DEFAULT_HAIKU_MODEL", haiku),
             ("ANTHROPIC_SMALL_FAST_MODEL", haiku or main),
             ("DISABLE_NON_ESSENTIAL_MODEL_CALLS", "1"), ("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1")]
    return [(name, value) for name, value in pairs if value]


def cmd_claude_code(config, args):
    with _session(config) as (store, client, auth):
        try:
            models = auth.fetch_models()
        except (AuthError, UpstreamUnreachable) as exc:
            _say("warning: cannot read your Copilot catalog (%s); using the built-in model list" % exc)
            models = FALLBACK_MODELS
    import shlex  # this command only
    ids = [m["id"] for m in models if ((m.get("capabilities") or {}).get("type") or "chat") == "chat"]
    for name, value in claude_code_environment(config, ids, args.model):
        if args.shell == "fish":
            print("set -gx %s %s" % (name, shlex.quote(value)))
        elif args.shell == "powershell":
            print('$env:%s = "%s"' % (name, value.replace("`", "``").replace('"', '`"').replace("$", "`$")))
        else:
            print("export %s=%s" % (name, shlex.quote(value)))
    return 0


COMMANDS = {("serve", None): cmd_serve, ("claude-code", None): cmd_claude_code, ("usage", None): cmd_usage,
            ("stop", None): cmd_stop, ("status", None): cmd_status, ("service", None): cmd_service, ("auth", "login"): cmd_auth_login, ("auth", "status"): cmd_auth_status,
            ("auth", "logout"): cmd_auth_logout, ("auth", "refresh"): cmd_auth_refresh,
            ("models", None): cmd_models}


# ------------------------------------------------------------------------------------------
# 12. Entry
#     Parse, configure logging, dispatch. Domain errors become one ``coproxy: error:`` line
#     and exit 1; usage errors exit 2; Ctrl-C exits 130. Tracebacks only at --log-level debug.
# ------------------------------------------------------------------------------------------

def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv[0] if argv and argv[0] in {name for name, _ in COMMANDS} else None)
    args = parser.parse_args(argv)
    args.argv = argv  # serve -d re-runs itself with these
    command = (args.command, getattr(args, "auth_command", None))
    if command not in COMMANDS:
        parser.print_help(sys.stderr) if args.command is None else parser.parse_args(
            [args.command, "--help"])
        return 2
    debug = False
    try:
        config = Config.resolve({o.dest: getattr(args, o.dest) for o in OPTIONS if hasattr(args, o.dest)})
        debug = config.log_level == "DEBUG"
        level = config.log_level if args.command == "serve" or debug else "WARNING"
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonLogFormatter() if config.log_format == "json" else
                             logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.handlers[:] = [handler]
        log.setLevel(level)
        log.propagate = False
        return COMMANDS[command](config, args)
    except UsageError as exc:
        _say("coproxy: error: %s" % exc)
        return 2
    except CoproxyError as exc:
        _say("coproxy: error: %s" % redact(exc))
        return 1
    except KeyboardInterrupt:
        _say("interrupted")
        return 130
    except Exception as exc:
        if debug:
            raise
        _say("coproxy: error: unexpected %s: %s (run with --log-level debug for details)" % (
            exc.__class__.__name__, redact(exc)))
        return 1


if __name__ == "__main__":
    sys.exit(main())

