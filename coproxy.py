#!/usr/bin/env python3
# /// script
# requires-python = ">=3.8"
# dependencies = []
# ///
# SPDX-License-Identifier: MIT
# ------------------------------------------------------------------------------------------
# 1. Header
#    What coproxy is, how to run it, and the table of contents: the docstring is the manual.
#    After it, the reader's map: how a request flows, a reading order, the words the file
#    uses, the threads and what each owns.
# ------------------------------------------------------------------------------------------
"""coproxy: your GitHub Copilot subscription as a local OpenAI- and Anthropic-compatible API.

One file, standard library only, Python 3.8+, Linux/macOS/Windows. Unofficial: not made or
supported by GitHub, and GitHub may treat heavy automated use of Copilot as abuse.

Quick start::

    curl -O https://raw.githubusercontent.com/coproxy/coproxy/main/coproxy.py
    python3 coproxy.py serve             # logs in on first run, then http://127.0.0.1:8080
    curl http://127.0.0.1:8080/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{"model": "gpt-4.1", "messages": [{"role": "user", "content": "hi"}]}'

Subcommands: ``serve [-d]``, ``stop``, ``status``, ``service systemd|launchd``, ``auth
login|status|logout|refresh``, ``models``, ``usage``, ``claude-code``. Every flag has an
environment variable (``--help`` lists them): ``GHCP_GITHUB_TOKEN``, ``GHCP_PROXY_API_KEY`` (or
``COPROXY_API_KEY``) and ``COPROXY_*`` for the rest. State lives in ``--state-dir`` (default:
``$XDG_STATE_HOME/coproxy``, ``~/Library/Application Support/coproxy`` on macOS,
``%APPDATA%\\coproxy\\config`` on Windows).

Routes: ``/v1/chat/completions``, ``/v1/responses`` (and ``/compact``), ``/v1/embeddings``,
``/v1/messages`` (and ``/count_tokens``), ``/v1/models``, ``/usage``, ``/metrics``, ``/healthz``;
each also without ``/v1``. Ollama's API on the same port: ``/`` and ``/api/*`` (chat, generate,
embed, embeddings, show, tags, ps, version), for JetBrains AI Assistant and VS Code's Ollama
provider. ``GET /`` in a browser is a dashboard of ``/dashboard/data``.

Security: binds 127.0.0.1 and, without ``--api-key``, answers only requests addressed to this
machine's loopback names and no web page it was not told to trust (``--allowed-host``,
``--cors-origin``); refuses a non-loopback address without a key; fetches images only from
public addresses; token files are 0600 in a 0700 directory that no one else may write; secrets
never appear in logs, answers, command lines or generated service files.

Embedding: ``import coproxy`` has no side effects. Names in ``__all__`` are kept stable across
minor versions; everything else (leading underscore or not) may change.

Sections (each uses only those above it; ``grep -n '^# [0-9]*\\. ' coproxy.py``):
   1. Header
   2. Imports, guard, constants
   3. Errors and small utilities
   4. Config
   5. Token store and history
   6. Upstream HTTP client (blocking)
   7. GitHub and Copilot auth (blocking)
   8. Requests (pure)
   9. Answers and plans (pure)
  10. Bridges between threads and the event loop
  11. HTTP/1.1 server (asyncio)
  12. Catalogue, gateway and stream relay
  13. App and routes
  14. CLI
  15. Entry
"""

# ------------------------------------------------------------------------------------------
# Reader's map
#
# One request, top to bottom (section numbers in brackets):
#
#   client --HTTP/1.1--> Server/Connection [11]  parse the head, cap and time the body
#                          |
#                          v
#                        App._handle [13]  route, Guard (Host, Origin, API key), envelope
#                          |  handler: read_json -> validate_* -> Catalogue.resolve -> plan_*
#                          |  (pure functions of [8] and [9]; a heavy body runs them in a
#                          |   worker, one at a time: App.work)
#                          v
#                        Gateway.run [12]  slot, pace, inline images, send
#                          |  WorkerPool thread [10]: UpstreamClient.request [6] with the
#                          |  Copilot token of CopilotAuth [7]; one retry on a stale pooled
#                          |  connection or a 401, one after a refusal the plan can fix or
#                          |  a short 429/503
#                          v
#               whole answer: plan.answer(data) -> Response.send
#               stream:       StreamHub thread [10] reads every upstream socket --batches-->
#                             StreamRelay [12] on the loop: translate, ping, backpressure
#                          |
#                          v
#                        Gateway._account [12]: metrics, access log, history file [5]
#
# Reading order: the constants of [2] and the errors of [3]; then a Plan (end of [9]) and one
# planner, plan_chat; then Gateway.run and StreamRelay [12]; then whichever side you need:
# the wire ([6], [11]), the formats ([8], [9]), login and tokens ([5], [7]), the CLI ([14]).
#
# Glossary
#   plan        everything one request sends upstream (method, path, payload, headers) and
#               how its answer comes back (answer(), chain(), dialect): class Plan [9].
#   planner     plan_chat, plan_messages, plan_responses, ...: request in, Plan out, pure.
#   chain       the translators a streamed answer goes through, upstream format first
#               (e.g. ChatReader -> ChatToAnthropic); StreamTranslation runs it.
#   translator  one step of a chain: items in, items out; it also counts usage.
#   dialect     how a client wants its stream and errors framed: OPENAI, ANTHROPIC,
#               RESPONSES, OLLAMA (SSE or NDJSON, the error envelope, the keep-alive ping).
#   catalogue   Copilot's model list (cached) and the quirks refusals taught per model+path.
#   quirks      what a refusal taught (an effort level, a max-tokens field), for 10 minutes.
#   slot        one of --max-concurrency places a request holds while Copilot works on it.
#   pacing      --rate-limit: the gap between requests sent to Copilot.
#   hub         the StreamHub: one thread that reads every streamed upstream answer.
#   relay       the StreamRelay of one stream: its coroutine (run) owns the stream's life from
#               head to ending; its _relay method translates and writes each batch the hub
#               hands over (a coroutine woken per batch cost the loop a quarter more CPU).
#   guard       the checks every request passes before any route (Guard [13]).
#   pool        two meanings: the WorkerPool of threads [10], and the kept-alive upstream
#               connections of the UpstreamClient [6]; each says which.
#
# Threads, and what each owns
#   event loop (main thread)   every client socket, the App, the Gateway's slots and the
#                              relays; never waits on the network, a lock or a large file.
#   coproxy-worker-N           one blocking job each: an upstream request up to its answer's
#                              head, a token exchange, an image fetch, a heavy body's parsing.
#   coproxy-stream-hub         every streamed upstream socket once its head is read; hands
#                              bytes to the loop in batches; returns clean connections to the pool.
#   coproxy-pool-reaper        closes kept-alive upstream connections left idle too long [6].
#   coproxy-history            appends finished requests to <state-dir>/history (History [5]).
#   A token refresh runs on whichever worker asks first; the others wait for it (CopilotAuth
#   [7]). Threads share data only through the loop (call_soon_threadsafe) or a lock they name.
#
# States of a stream (StreamRelay's docstring [12] says what the client and the log see in each):
#
#   opened -> relaying <-> paused -> ended: normal | failed | upstream cut | timed out
#                                           | client left

# ------------------------------------------------------------------------------------------
# 2. Imports, guard, constants
#    The guard must run before anything newer than Python 3.6 is touched, so this file keeps
#    a 3.6-parseable grammar (no walrus, no positional-only parameters, no f"{x=}").
# ------------------------------------------------------------------------------------------

import sys

if sys.version_info < (3, 8):  # pragma: no cover - exercised by CI on 3.6/3.7
    sys.stderr.write("coproxy needs Python 3.8+ (this is Python %d.%d.%d)\n" % sys.version_info[:3])
    sys.exit(1)

import argparse
import asyncio
import base64
import bisect
import collections
import concurrent.futures
import contextlib
import dataclasses
import errno
import functools
import http
import importlib
import itertools
import json
import logging
import os
import queue
import re
import selectors
import signal
import socket
import ssl
import stat
import struct
import threading
import time
import urllib.parse
import zlib

__version__ = "0.2.0"
__all__ = ["Config", "TokenStore", "UpstreamClient", "CopilotAuth", "DeviceFlow", "App", "Server",
           "SSEDecoder", "main", "__version__"]

#: OAuth client id of the GitHub Copilot editor plugins (a GitHub App; tokens start ``ghu_``).
#: Only tokens from this app can be exchanged at ``/copilot_internal/v2/token``.
GITHUB_CLIENT_ID = "Iv1.b507a08c87ecfe98"
GITHUB_SCOPE = "read:user"
DEFAULT_COPILOT_API_URL = "https://api.githubcopilot.com"

#: Identity headers: Copilot checks Editor-Version and Copilot-Integration-Id, refuses Go's
#: default User-Agent and (since 2026-02, status 466) clients it considers too old, so we
#: present ourselves as a current VS Code Copilot Chat. Both versions are options
#: (--editor-version, --editor-plugin-version) for the day Copilot moves its floor again.
#: The pair VS Code 1.140 ships (copilot-chat is bundled with it), as peers send it in late 2026.
DEFAULT_EDITOR_VERSION = "vscode/1.140.0"
DEFAULT_EDITOR_PLUGIN_VERSION = "copilot-chat/0.68.0"
COPILOT_INTEGRATION_ID = "vscode-chat"
#: What VS Code sends to the Copilot API (chat, responses, messages, models) since 2026-08; the
#: token exchange and /copilot_internal/user stay on the GitHub REST version.
COPILOT_CHAT_API_VERSION = "2026-08-01"
GITHUB_API_VERSION = "2025-04-01"

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
#: Body cap in MiB: agent clients send whole conversations with base64 images.
DEFAULT_MAX_BODY_MB = 32
#: Concurrent proxied requests (streams included); excess requests wait, then get 503.
DEFAULT_MAX_CONCURRENCY = 1024
#: Seconds of upstream silence before an SSE comment keeps the client's stream alive.
DEFAULT_PING_SECONDS = 15.0
#: Seconds a client has to send a complete request head, and the longest silence inside a
#: request body (then 408); an idle keep-alive connection is kept for the idle timeout (then a
#: silent close; uvicorn uses 5 s, we allow agents more).
DEFAULT_HEADER_TIMEOUT_SECONDS = 30.0
DEFAULT_IDLE_TIMEOUT_SECONDS = 15.0
#: The longest a whole request body may take, however steadily it arrives.
DEFAULT_BODY_TIMEOUT_SECONDS = 120.0
DEFAULT_UPSTREAM_CONNECT_TIMEOUT_SECONDS = 15.0
#: Longest silence tolerated *between bytes* of an upstream answer; never a total limit.
#: Copilot has been seen silent for 41 s mid-stream and taking 290 s for one long answer.
DEFAULT_UPSTREAM_READ_TIMEOUT_SECONDS = 600.0
DEFAULT_SHUTDOWN_GRACE_SECONDS = 10.0
#: Days of request history kept in <state-dir>/history.
DEFAULT_HISTORY_DAYS = 90
#: Seconds the /models catalogue is cached (VS Code refreshes at most every 10 minutes).
DEFAULT_MODELS_TTL_SECONDS = 300.0
#: Responses coproxy builds for translated models, kept for previous_response_id, GET and DELETE.
RESPONSE_STORE_COUNT = 1000
RESPONSE_STORE_BYTES = 64 << 20
RESPONSE_STORE_ENTRY_SHARE = 16            # one entry: at most 1/16 of the store (4 MiB)
RESPONSE_STORE_SECONDS = 6 * 3600.0
#: How long what a refusal taught about a model on one Copilot endpoint (an effort it takes,
#: max_completion_tokens) is applied before it must be taught again: a refusal one request
#: provoked must not shape every later request for good.
QUIRK_TTL_SECONDS = 600.0
#: /usage asks GitHub for the account's quotas at most this often (a failure: every 5 s), and
#: callers at the same moment share one call: any local client could spend the GitHub API quota.
ACCOUNT_CACHE_SECONDS = 30.0
ACCOUNT_RETRY_SECONDS = 5.0
#: Seconds a request waits for a concurrency slot before 503.
DEFAULT_QUEUE_TIMEOUT_SECONDS = 30.0

#: The Copilot token is refreshed when less than this remains (VS Code and Zed use 5 minutes).
TOKEN_REFRESH_MARGIN_SECONDS = 300
MAX_REQUEST_LINE_BYTES = 8 * 1024          # 414 beyond (CPython uses 64 KiB; nobody needs that)
MAX_HEADER_BYTES = 32 * 1024               # 431 beyond (h11: 16 KiB, asyncio: 64 KiB)
MAX_HEADER_COUNT = 100                     # 431 beyond (http.client._MAXHEADERS)
MAX_CHUNK_LINE_BYTES = 1024                # 400 beyond (bottle)
MAX_JSON_DEPTH = 256                       # 400 beyond: nesting deeper than any real request
#: Client connections at once: half the descriptors left after RESERVED_DESCRIPTORS (each may
#: hold an upstream socket too), at most this. Past the cap, connections that have not sent a
#: complete request head are closed to make room (oldest first), else the newcomer gets 503.
MAX_CLIENT_CONNECTIONS = 10_000
#: Request bodies being received at once may come to at most this, or BODIES_IN_FLIGHT times the
#: body cap if lower (8 x 32 MB = 256 MiB); past it a request gets 503 with Retry-After. Without
#: it, a dozen clients each trickling a 31 MB body held ~400 MB for the 120 s body timeout.
MAX_BODY_BYTES_IN_FLIGHT = 256 << 20
BODIES_IN_FLIGHT = 8
RESERVED_DESCRIPTORS = 64                  # log and state files, selectors, wake-up pairs
#: "out of descriptors" and "connection cap reached" are logged at most this often
RESOURCE_WARNING_SECONDS = 60.0
#: 400 beyond: arrays, objects and comma-separated values in one request body. Each is a Python
#: object that json.loads builds while holding the GIL (1M empty arrays: ~0.2 s, ~90 MB); a long
#: agent conversation with its tool schemas has tens of thousands.
MAX_JSON_VALUES = 500_000
#: A compressed request body may inflate to at most this (or --max-body-mb if lower): 32 KB of
#: gzip can hold 33 MB of "[]".
MAX_DECOMPRESSED_BODY_BYTES = 16 << 20
#: Bodies larger than this (and every compressed one) are decoded, parsed, checked and planned
#: in a worker thread, not on the event loop that serves every other client.
INLINE_PARSE_BYTES = 256 << 10
#: So is a smaller body with more arrays, objects and commas than this: checking and planning
#: cost ~20 us per item, and 60 KB of `{},` hold 20,000 items.
INLINE_PARSE_VALUES = 4000
#: 400 beyond: items in a Responses `input`. A long Codex session sends a few thousand.
MAX_INPUT_ITEMS = 20_000
MAX_UPSTREAM_ERROR_BODY_BYTES = 1 << 20    # error bodies we read from upstream
MAX_UPSTREAM_JSON_BYTES = 64 << 20         # successful JSON answers (non-stream)
#: Images given by URL are fetched (Copilot refuses most external URLs); these bound what one
#: request can make coproxy do: OpenAI's own per-image size, a few redirects, a deadline per
#: image, a count and a byte total per request, and a few fetches at once for the whole server.
MAX_IMAGE_BYTES = 20 << 20
MAX_IMAGE_REDIRECTS = 5
IMAGE_FETCH_SECONDS = 30.0
MAX_IMAGES_PER_REQUEST = 32
MAX_IMAGE_BYTES_PER_REQUEST = 64 << 20
IMAGE_FETCHES_AT_ONCE = 4
IMAGE_CACHE_BYTES = 64 << 20               # fetched images kept: agents resend the history
IMAGE_CACHE_SECONDS = 600.0
#: Body bytes of one stream the event loop has not written yet before its upstream read pauses.
STREAM_HIGH_WATER_BYTES = 1 << 20
#: A streaming client that takes none of those bytes for this long is disconnected: it would
#: otherwise hold a concurrency slot and an upstream connection for as long as it likes.
STALLED_CLIENT_SECONDS = 300.0
#: Bytes asked of an upstream socket per read: TLS hands out at most one 16 KiB record per read.
UPSTREAM_RECV_BYTES = 16 * 1024
#: Streams the event loop relays new bytes of before it looks at other clients again.
HUB_STREAMS_PER_TURN = 64
IDLE_UPSTREAM_CONNECTIONS = 64             # kept-alive connections per origin
IDLE_UPSTREAM_TOTAL = 128                  # kept-alive connections in all
IDLE_UPSTREAM_SECONDS = 90.0               # an idle pooled connection older than this is closed
IDLE_WORKER_SECONDS = 60.0                 # an idle worker beyond MIN_WORKERS exits after this
MIN_WORKERS = 4
#: Stack reserved per worker thread by `serve`: workers only do I/O, shallow JSON and TLS
#: (client JSON is parsed on the loop), and with hundreds of blocking calls in flight 8 MiB
#: each would reserve gigabytes of address space (what ``ulimit -v`` and strict overcommit count).
WORKER_STACK_BYTES = 1024 * 1024

KNOWN_METHODS = frozenset(["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE",
                           "CONNECT"])
_TOKEN_CHARS = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")   # RFC 9110 §5.6.2 token
REASONS = {s.value: s.phrase for s in http.HTTPStatus}
REASONS.update({466: "Client Version Not Supported", 499: "Client Closed Request",
                529: "Overloaded"})

# ------------------------------------------------------------------------------------------
# 3. Errors and small utilities
#    One exception tree. ``ClientError`` is what a client of ours sees (status + envelope
#    fields); ``BadRequest`` is malformed HTTP; the rest are raised by the blocking layers and
#    turned into one-line CLI messages or error envelopes. Messages never contain secrets:
#    ``redact`` removes tokens and URL credentials, and log lines have control characters
#    escaped so that no value (a model name, a path) can forge a line of its own.
# ------------------------------------------------------------------------------------------

log = logging.getLogger("coproxy")
access_log = logging.getLogger("coproxy.access")


class CoproxyError(Exception):
    """Base of every error coproxy raises on purpose; its message is shown to the user."""


class ConfigError(CoproxyError):
    """A flag, environment variable or file holds a value we cannot use."""


class AuthError(CoproxyError):
    """Not logged in, or GitHub refused to give us a Copilot token (the message says why)."""

    def __init__(self, message, code="copilot_auth_failed"):
        super().__init__(message)
        self.code = code


class UpstreamUnreachable(CoproxyError):
    """A network, DNS, TLS or proxy failure before any answer from GitHub or Copilot.
    ``kind`` names the class of failure for /healthz: dns, refused, tls, timeout, proxy, ..."""

    def __init__(self, message, timeout=False, kind="network"):
        super().__init__(message)
        self.timeout = timeout
        self.kind = "timeout" if timeout else kind


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


class RetryOnce(Exception):
    """Raised by a first attempt that failed in a way a second attempt can fix (see retry_once)."""


def retry_once(attempt):
    """``attempt(first=True)``; if that raises RetryOnce, ``attempt(first=False)`` once more. The
    one retry rule of the file: a stale pooled connection, a 401 that a fresh token fixes. The
    second attempt must not raise RetryOnce (it raises its real error instead)."""
    try:
        return attempt(True)
    except RetryOnce as exc:
        log.debug("retrying once: %s", str(exc))  # text: a kept record must not hold the frames
    return attempt(False)


_ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                429: "rate_limit_error"}


def error_type_for_status(status):
    """The OpenAI ``error.type`` that goes with an HTTP status."""
    return _ERROR_TYPES.get(status) or ("invalid_request_error" if 400 <= status < 500
                                        else "api_error")


_SECRET_PATTERNS = re.compile(
    r"(gh[pousr]_[A-Za-z0-9_]{8,}|github_pat_[A-Za-z0-9_]{8,}|tid=[^\s\"',]+|"
    r"(?i:bearer|token)\s+[A-Za-z0-9._~+/=;:-]{12,}|eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_.-]+)")
# Greedy up to the last @ of the authority: a password may itself hold an @.
_URL_CREDENTIALS = re.compile(r"(?i)\b([a-z][a-z0-9+.-]{0,31}://)[^/\s]+@")
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


#: What every secret pattern starts with, looked for first in lowercased text: one cheap scan
#: spares the full patterns for almost every log line.
_SECRET_HINTS = re.compile(r"gh[pousr]_|github_pat_|tid=|bearer\s|token\s|eyj")  # eyJ: a JWT


def redact(text):
    """Replace tokens and the user:password of URLs with ``[redacted]``."""
    text = str(text)
    if _SECRET_HINTS.search(text.lower()):
        text = _SECRET_PATTERNS.sub("[redacted]", text)
    if "@" in text and "://" in text:
        text = _URL_CREDENTIALS.sub(r"\1[redacted]@", text)
    return text


def escape_controls(text):
    """Control characters as ``\\xNN``: a logged value can never start a line of its own."""
    return _CONTROL_CHARS.sub(lambda m: "\\x%02x" % ord(m.group()) if ord(m.group()) < 256 else
                              "\\u%04x" % ord(m.group()), text)


class LogFormatter(logging.Formatter):
    """Text log lines (``TIME LEVEL message key=value...``) or, with ``json=True``, one JSON object
    per line, always ``ts``, ``level``, ``logger``, ``message`` and then the record's ``fields``
    (an access line's numbers stay numbers). Messages are redacted and control characters
    escaped."""

    def __init__(self, json_lines=False):
        super().__init__("%(asctime)s %(levelname)s %(message)s")
        self.json_lines = json_lines

    def format(self, record):
        """One record as one line. A traceback is kept only for errors (a warning's would be
        noise); in JSON only its last line, the exception, so that a record stays one line."""
        message = escape_controls(redact(record.getMessage()))
        error = None
        if record.exc_info and record.levelno >= logging.ERROR:
            error = redact(self.formatException(record.exc_info))
        if not self.json_lines:
            return "%s %s %s%s" % (self.formatTime(record), record.levelname, message,
                                   "\n" + error if error else "")
        entry = {"ts": round(record.created, 3), "level": record.levelname.lower(),
                 "logger": record.name, "message": message}
        entry.update(get_typed(vars(record), "fields", dict, {}))
        if error:
            entry["error"] = error.splitlines()[-1]
        return json.dumps(entry, separators=(",", ":"), ensure_ascii=False)


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def json_dumps(obj):
    """Compact JSON as UTF-8 bytes (the form every answer and upstream body uses). A lone
    surrogate (``"\\ud800"`` parses, but is no character) becomes U+FFFD: text cut in the middle
    of a character by a client is a client's slip worth forgiving, not a reason to fail a turn."""
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return _LONE_SURROGATE.sub("\ufffd", text).encode("utf-8")


def get_typed(node, key, kind, default=None):
    """``node[key]`` when it is a ``kind`` (a type or a tuple of types), else ``default``.
    JSON from clients and from Copilot may hold any type anywhere; this is the one way this file
    reads a field it cannot trust, so a wrong type reads as absent instead of failing later.
    A ``node`` that is not a dict reads as empty."""
    value = node.get(key) if isinstance(node, dict) else None
    return value if isinstance(value, kind) else default


#: random_id's keyed BLAKE2b (key from os.urandom, never shown), made on first use: hashlib
#: loads OpenSSL's digests, ~2 ms that a start need not wait for. And its counter.
_ID_HASHER = []
_ID_COUNTER = itertools.count()


def random_id(digits=32):
    """``digits`` (at most 128) hex digits no one can predict, for the ids of what we build
    (``chatcmpl-...``, ``resp_...``). A stored Response's id is all a caller needs to read or
    delete it, so ids must not be guessable from earlier ones, as the random module's are; and
    os.urandom per id is a system call that hands the GIL to another thread the event loop then
    waits for. So: a keyed hash (BLAKE2b, key from os.urandom at start) of a counter."""
    if not _ID_HASHER:  # two threads may both make one: either key will do
        import hashlib
        _ID_HASHER.append(hashlib.blake2b(key=os.urandom(32)))
    hasher = _ID_HASHER[0].copy()
    hasher.update(b"%d" % next(_ID_COUNTER))  # next() on a count is atomic under the GIL
    return hasher.hexdigest()[:digits]


def random_uuid():
    """A random (version 4) UUID string, as ``str(uuid.uuid4())`` without importing uuid; an id
    (X-Request-Id), made as random_id's are."""
    value = int(random_id(), 16) & ~(0xF << 76) & ~(0x3 << 62) | (0x4 << 76) | (0x2 << 62)
    digits = "%032x" % value
    return "%s-%s-%s-%s-%s" % (digits[:8], digits[8:12], digits[12:16], digits[16:20], digits[20:])


_WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def http_date(timestamp):
    """``Sun, 06 Nov 1994 08:49:37 GMT`` (RFC 9110 §5.6.7), in English whatever the locale."""
    t = time.gmtime(timestamp)
    return "%s, %02d %s %d %02d:%02d:%02d GMT" % (
        _WEEKDAYS[t.tm_wday], t.tm_mday, _MONTHS[t.tm_mon - 1], t.tm_year,
        t.tm_hour, t.tm_min, t.tm_sec)


#: A string (an unterminated one runs to the end, so each byte is looked at once), or a bracket;
#: the second pattern also finds the commas between values.
_JSON_DEPTH_TOKENS = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*(?:"|\\?\Z)|[\[{]|[\]}]', re.S)
_JSON_VALUE_TOKENS = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*(?:"|\\?\Z)|[\[{]|[\]}]|,', re.S)


def json_cost_problem(raw):
    """Why parsing ``raw`` would cost too much, or None: brackets nested deeper than
    MAX_JSON_DEPTH (json.loads would recurse until RecursionError, and so would the translators),
    or more than MAX_JSON_VALUES arrays, objects and values (json.loads would build them all).

    Counting brackets and commas over the raw bytes is cheap and an upper bound (those inside
    strings count too), so it settles the usual body; only one over a bound is scanned token by
    token, strings skipped, and the scan stops at the bound: its work is bounded too."""
    opens = raw.count(b"[") + raw.count(b"{")
    values = opens + raw.count(b",")
    if opens <= MAX_JSON_DEPTH and values <= MAX_JSON_VALUES:
        return None
    tokens = _JSON_VALUE_TOKENS if values > MAX_JSON_VALUES else _JSON_DEPTH_TOKENS
    depth = values = 0
    for match in tokens.finditer(raw):
        token = match.group()
        if token in (b"[", b"{"):
            depth += 1
            values += 1
            if depth > MAX_JSON_DEPTH:
                return "nests deeper than %d levels" % MAX_JSON_DEPTH
        elif token in (b"]", b"}"):
            depth -= 1
        elif token == b",":
            values += 1
        if values > MAX_JSON_VALUES:  # (a string leaves it as it was)
            return "holds more than %d arrays, objects and values" % MAX_JSON_VALUES
    return None


def parse_json_object(raw):
    """Parse a request body as a JSON object or raise ``ClientError(400)`` saying what is wrong."""
    problem = json_cost_problem(raw)
    if problem:
        raise ClientError(400, "request body " + problem, code="invalid_json")
    try:
        payload = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise ClientError(400, "request body is not valid JSON: %s" % exc, code="invalid_json")
    if not isinstance(payload, dict):
        raise ClientError(400, "request body must be a JSON object", code="invalid_json")
    return payload


class ThrottledWarning:
    """A warning logged at most once per ``interval`` seconds; the repeats in between are counted
    and reported with the next one (a flood of accept errors must not fill the log)."""

    def __init__(self, interval):
        self.interval = interval
        self._next_at = 0.0
        self._repeats = 0

    def warn(self, message, *args):
        now = time.monotonic()
        if now < self._next_at:
            self._repeats += 1
            return
        self._next_at = now + self.interval
        if self._repeats:
            message += " (%d times since the last warning)" % (self._repeats + 1)
            self._repeats = 0
        log.warning(message, *args)


def is_loopback_host(host):
    """True for 127.0.0.0/8, ::1 and ``localhost``: the names that always mean this machine.
    (inet_pton, not the ipaddress module: serve asks before listening, and that import costs.)"""
    host = host.strip("[]").lower()
    if host in ("localhost", "localhost."):
        return True
    try:
        packed = socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
    except (OSError, ValueError):
        return False
    return packed[0] == 127 if len(packed) == 4 else packed == bytes(15) + b"\x01"


def http_url(host, port):
    """``http://host:port``, an IPv6 address in brackets."""
    return "http://%s:%d" % ("[%s]" % host if ":" in host else host, port)


def local_url(url):
    """``url`` with a wildcard address (0.0.0.0, ::) as 127.0.0.1: where a client on this
    machine reaches a server that listens on every address."""
    return url.replace("://0.0.0.0:", "://127.0.0.1:").replace("://[::]:", "://127.0.0.1:")


def host_without_port(value):
    """``example.com`` of a Host header ``example.com:8080``; ``::1`` of ``[::1]:8080``."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


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


def open_private(path, flags):
    """os.open that never follows a symlink at ``path`` (someone else's file planted in our state
    dir must not be written through) and creates files 0600."""
    return os.open(path, flags | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
                   | getattr(os, "O_BINARY", 0), 0o600)

# ------------------------------------------------------------------------------------------
# 4. Config
#    Every knob is one row of OPTIONS: flag, environment variable, type, default, help. The
#    CLI parser and the env lookup are both generated from it, so a flag cannot exist without
#    its variable. Precedence: flag > environment > default. Secrets given as flags are
#    remembered, so that `serve` can warn that `ps` shows them and never passes them on.
# ------------------------------------------------------------------------------------------

def _parse_bool(text):
    """A boolean option's variable, in the spellings people use in shell profiles and unit
    files (a variable set to nothing counts as unset: see Config.resolve)."""
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("expected true/false, got %r" % text)


API_SURFACES = ("chat", "responses", "embeddings", "messages", "ollama")
#: The values coproxy-rs's --api-surface takes, kept so its users' scripts keep working.
API_SURFACE_PRESETS = {"chat": ("chat",), "chat-responses": ("chat", "responses"),
                       "chat-embeddings": ("chat", "embeddings"), "all": API_SURFACES}


def _api_surface(text):
    """A preset (chat, chat-responses, chat-embeddings, all), or a comma list of surfaces."""
    text = str(text).strip().lower()
    if text in API_SURFACE_PRESETS:
        return frozenset(API_SURFACE_PRESETS[text])
    parts = frozenset(p.strip() for p in text.split(",") if p.strip())
    if not parts or parts - set(API_SURFACES):
        raise ValueError("use %s, or a comma list of %s"
                         % ("/".join(API_SURFACE_PRESETS), ",".join(API_SURFACES)))
    return parts


def _number(convert, low, high=None, strict=False, what="a number"):
    """A converter for a numeric option: ``convert`` the text, then check its bounds."""
    def parse(text):
        try:
            value = convert(text)
        except ValueError:
            raise ValueError("%r is not %s" % (text, what))
        if (value <= low if strict else value < low) or (high is not None and value > high):
            ceiling = "" if high is None else " and <= %s" % high
            raise ValueError("must be %s %s%s" % (">" if strict else ">=", low, ceiling))
        return value
    return parse


def _choice(*values):
    """A converter for an option that takes one of ``values`` (in any case)."""
    def parse(text):
        value = str(text).strip().lower()
        if value not in values:
            raise ValueError("must be %s or %s" % (", ".join(values[:-1]), values[-1]))
        return value
    return parse


_port = _number(int, 0, 65535, what="a port number (0-65535)")
_positive_int = _number(int, 1, what="a whole number")
_positive_float = _number(float, 0, strict=True)
_non_negative_float = _number(float, 0)
_log_level = _choice("debug", "info", "warning", "error")
_log_format = _choice("text", "json")


class Repeatable:
    """A flag that may be given several times; its environment variable holds a comma list."""

    def __init__(self, item):
        self.item = item

    def __call__(self, text):
        return [self.item(part.strip()) for part in str(text).split(",") if part.strip()]


def _model_alias(text):
    """``FROM=TO`` as a (from, to) pair, kept as given: FROM is looked up as the client spells
    the model (also without an Ollama ``:tag``), and TO is resolved like any model name."""
    name, sep, target = text.partition("=")
    if not sep or not name.strip() or not target.strip():
        raise ValueError("expected FROM=TO, got %r" % text)
    return name.strip(), target.strip()


def _origin(text):
    """``*``, ``null`` (sandboxed pages, file://) or scheme://host[:port], as browsers send it."""
    value = text.strip().lower().rstrip("/")
    if value not in ("*", "null") and not re.match(r"^[a-z][a-z0-9+.-]*://[^/\s?#]+$", value):
        raise ValueError("expected * or an origin like https://app.example.com, got %r" % text)
    return value


def _host_name(text):
    """A host name or address as a Host header names it (a port, if given, is ignored)."""
    value = host_without_port(text).rstrip(".")  # "name." and "name" are the same host
    if not value or not re.match(r"^[a-z0-9._:-]+$", value):
        raise ValueError("expected a host name such as my-laptop.local or 192.168.1.5, got %r"
                         % text)
    return value


def _matching(pattern, expected):
    """A converter for an option whose value must match ``pattern`` (stripped); ``expected``
    names a good value for the error."""
    def parse(text):
        value = str(text).strip()
        if not re.match(pattern, value):
            raise ValueError("expected %s, got %r" % (expected, text))
        return value
    return parse


#: ``name/version`` as a header value: no spaces or control characters.
_product_version = _matching(r"^[A-Za-z0-9._+-]+/[A-Za-z0-9._+-]+$",
                             "NAME/VERSION such as vscode/1.140.0")
#: An X-GitHub-Api-Version value.
_api_version = _matching(r"^\d{4}-\d{2}-\d{2}$", "a date such as %s" % COPILOT_CHAT_API_VERSION)
#: A Copilot-Integration-Id value.
_integration_id = _matching(r"^[A-Za-z0-9._-]{1,64}$", "a name such as copilot-developer-cli")
#: A GitHub organisation or user name (letters, digits, single hyphens).
_github_login = _matching(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,38})$",
                          "an organisation name such as my-org")


_auth_mode = _choice("auto", "exchange", "direct")

#: One row per setting: its flag, the Config attribute (dest), its variable, the converter
#: (``bool``: a switch that takes no value), the default, where it is accepted (scope, below),
#: the help text and the value's name in --help.
Option = collections.namedtuple("Option", "flag dest env type default scope help metavar")

#: scope "shared": accepted before or after any subcommand; "serve": only by ``serve`` (and the
#: commands that print how to reach a server: ``service``, ``claude-code``).
OPTIONS = [
    Option("--state-dir", "state_dir", "COPROXY_STATE_DIR", str, None, "shared",
           "directory for token files, pid file and log (default: the platform's state "
           "directory)", "DIR"),
    Option("--github-token", "github_token", "GHCP_GITHUB_TOKEN", str, None, "shared",
           "GitHub token to use instead of the saved login (ghu_/gho_ from a Copilot login, a "
           "fine-grained PAT github_pat_, an App installation token ghs_); prefer the variable: "
           "a flag shows in ps", "TOKEN"),
    Option("--github-token-file", "github_token_file", "COPROXY_GITHUB_TOKEN_FILE", str, None,
           "shared", "read the GitHub token from this file, again whenever it changes (a secret "
           "manager's or a CI job's token); the file must be yours and private (chmod 600)",
           "FILE"),
    Option("--auth-mode", "auth_mode", "COPROXY_AUTH_MODE", _auth_mode, "auto", "shared",
           "auto (by the token's prefix: gho_/ghu_ exchanged, github_pat_ sent directly, ghs_ "
           "directly then exchanged), exchange (always the Copilot token exchange) or direct "
           "(always the GitHub token itself)", "MODE"),
    Option("--integration-id", "integration_id", "COPROXY_INTEGRATION_ID", _integration_id, None,
           "shared", "Copilot-Integration-Id to send (default: vscode-chat for exchanged tokens, "
           "copilot-developer-cli for tokens sent directly)", "ID"),
    Option("--github-app-id", "github_app_id", "COPROXY_GITHUB_APP_ID", _positive_int, None,
           "shared", "mint organisation-billed tokens as this GitHub App (with "
           "--github-app-key-file and --github-app-installation-id or --github-app-org)", "ID"),
    Option("--github-app-key-file", "github_app_key_file", "COPROXY_GITHUB_APP_KEY_FILE", str,
           None, "shared", "the GitHub App's private key (PEM, PKCS#1 or PKCS#8); must be yours "
           "and private (chmod 600)", "FILE"),
    Option("--github-app-installation-id", "github_app_installation_id",
           "COPROXY_GITHUB_APP_INSTALLATION_ID", _positive_int, None, "shared",
           "the App's installation to mint tokens for", "ID"),
    Option("--github-app-org", "github_app_org", "COPROXY_GITHUB_APP_ORG", _github_login, None,
           "shared", "look the App's installation up by organisation instead of "
           "--github-app-installation-id", "ORG"),
    Option("--github-host", "github_host", "COPROXY_GITHUB_HOST", str, "github.com", "shared",
           "GitHub host; TENANT.ghe.com switches login, API and Copilot hosts (data residency)",
           "HOST"),
    Option("--ca-file", "ca_file", "COPROXY_CA_FILE", str, None, "shared",
           "extra PEM bundle of trusted CAs (corporate TLS inspection); SSL_CERT_FILE also works",
           "FILE"),
    Option("--log-level", "log_level", "COPROXY_LOG_LEVEL", _log_level, None, "shared",
           "debug, info, warning or error (default: info for serve, warning for the other "
           "commands)", "LEVEL"),
    Option("--log-format", "log_format", "COPROXY_LOG_FORMAT", _log_format, "text", "shared",
           "text, or json for one JSON object per log line", "FORMAT"),
    Option("--github-url", "github_url", "COPROXY_GITHUB_URL", str, None, "shared",
           "base URL for the device flow (default https://github.com or https://TENANT.ghe.com)",
           "URL"),
    Option("--github-api-url", "github_api_url", "COPROXY_GITHUB_API_URL", str, None, "shared",
           "GitHub REST base URL (default https://api.github.com or https://api.TENANT.ghe.com)",
           "URL"),
    Option("--copilot-api-url", "copilot_api_url", "COPROXY_COPILOT_API_URL", str, None, "shared",
           "Copilot API base URL (default: endpoints.api from the Copilot token; for tokens sent "
           "directly https://api.githubcopilot.com or https://copilot-api.TENANT.ghe.com)", "URL"),
    Option("--api-version", "api_version", "COPROXY_API_VERSION", _api_version,
           COPILOT_CHAT_API_VERSION, "shared", "X-GitHub-Api-Version sent to the Copilot API (the "
           "Auto model needs 2026-08-01 or newer)", "DATE"),
    Option("--editor-version", "editor_version", "COPROXY_EDITOR_VERSION", _product_version,
           DEFAULT_EDITOR_VERSION, "shared", "Editor-Version sent to GitHub and Copilot",
           "NAME/VER"),
    Option("--editor-plugin-version", "editor_plugin_version", "COPROXY_EDITOR_PLUGIN_VERSION",
           _product_version, DEFAULT_EDITOR_PLUGIN_VERSION, "shared",
           "Editor-Plugin-Version sent to GitHub and Copilot (the User-Agent follows it)",
           "NAME/VER"),
    Option("--host", "host", "COPROXY_HOST", str, DEFAULT_HOST, "serve",
           "address to bind; anything but loopback requires --api-key", "ADDR"),
    Option("--port", "port", "COPROXY_PORT", _port, DEFAULT_PORT, "serve",
           "port to bind (0 picks a free one; the real port is printed)", "PORT"),
    Option("--api-key", "api_key", "GHCP_PROXY_API_KEY", str, None, "serve",
           "require this key from clients (Authorization: Bearer KEY or x-api-key: KEY); prefer "
           "the variable: a flag shows in ps", "KEY"),
    Option("--allow-unauthenticated", "allow_unauthenticated", "COPROXY_ALLOW_UNAUTHENTICATED",
           bool, False, "serve", "allow a non-loopback --host without --api-key (not advised)",
           None),
    Option("--allowed-host", "allowed_hosts", "COPROXY_ALLOWED_HOSTS", Repeatable(_host_name),
           None, "serve",
           "without --api-key, also answer requests addressed to this host name (Host header; "
           "loopback names always work; repeatable; env: comma list)", "NAME"),
    Option("--cors-origin", "cors_origins", "COPROXY_CORS_ORIGIN", Repeatable(_origin), None,
           "serve",
           "let web pages from this origin call coproxy (repeatable; * for any); requests from "
           "other pages are refused", "ORIGIN"),
    Option("--no-auto-login", "no_auto_login", "COPROXY_NO_AUTO_LOGIN", bool, False, "serve",
           "start even when not logged in (requests get 503 until a token exists)", None),
    Option("--no-image-fetch", "no_image_fetch", "COPROXY_NO_IMAGE_FETCH", bool, False, "serve",
           "send image URLs on as they are instead of fetching them and sending the image itself "
           "(Copilot refuses most external image URLs)", None),
    Option("--image-fetch-allow-private", "image_fetch_allow_private",
           "COPROXY_IMAGE_FETCH_ALLOW_PRIVATE", bool, False, "serve",
           "also fetch images from loopback, private and link-local addresses (intranet image "
           "hosts)", None),
    Option("--api-surface", "api_surface", "COPROXY_API_SURFACE", _api_surface, "all", "serve",
           "APIs to serve: chat, chat-responses, chat-embeddings, all, or a comma list of "
           "chat,responses,embeddings,messages,ollama", "LIST"),
    Option("--default-model", "default_model", "COPROXY_DEFAULT_MODEL", str, None, "serve",
           "model used when a request names none", "MODEL"),
    Option("--model-alias", "model_aliases", "COPROXY_MODEL_ALIAS", Repeatable(_model_alias),
           None, "serve",
           "FROM=TO: requests for FROM go to TO on every route (repeatable; env: comma list)",
           "FROM=TO"),
    Option("--rate-limit", "rate_limit", "COPROXY_RATE_LIMIT", _non_negative_float, 0.0, "serve",
           "at least this many seconds between requests sent to Copilot (0: off); excess get 429",
           "SECONDS"),
    Option("--wait", "wait", "COPROXY_WAIT", bool, False, "serve",
           "with --rate-limit, queue requests until their turn instead of answering 429", None),
    Option("--detach", "detach", "COPROXY_DETACH", bool, False, "serve",
           "-d: run in the background, writing <state-dir>/coproxy.pid and coproxy.log", None),
    Option("--max-body-mb", "max_body_mb", "COPROXY_MAX_BODY_MB", _positive_float,
           DEFAULT_MAX_BODY_MB, "serve",
           "largest request body accepted, in MiB, also after decompression (413 beyond)", "MB"),
    Option("--max-concurrency", "max_concurrency", "COPROXY_MAX_CONCURRENCY", _positive_int,
           DEFAULT_MAX_CONCURRENCY, "serve",
           "concurrent proxied requests and streams; excess requests wait, then get 503", "N"),
    Option("--queue-timeout", "queue_timeout", "COPROXY_QUEUE_TIMEOUT", _positive_float,
           DEFAULT_QUEUE_TIMEOUT_SECONDS, "serve",
           "seconds a request waits for a free slot at the concurrency limit (503 after)",
           "SECONDS"),
    Option("--ping-seconds", "ping_seconds", "COPROXY_PING_SECONDS", _positive_float,
           DEFAULT_PING_SECONDS, "serve",
           "send a keep-alive in an SSE stream (a comment, or Anthropic's ping event) after this "
           "much upstream silence", "SECONDS"),
    Option("--header-timeout", "header_timeout", "COPROXY_HEADER_TIMEOUT", _positive_float,
           DEFAULT_HEADER_TIMEOUT_SECONDS, "serve",
           "seconds a client has to send a request head, and the longest silence inside a body "
           "(408 after)", "SECONDS"),
    Option("--idle-timeout", "idle_timeout", "COPROXY_IDLE_TIMEOUT", _positive_float,
           DEFAULT_IDLE_TIMEOUT_SECONDS, "serve",
           "seconds an idle keep-alive connection is kept open", "SECONDS"),
    Option("--upstream-timeout", "upstream_timeout", "COPROXY_UPSTREAM_TIMEOUT", _positive_float,
           DEFAULT_UPSTREAM_READ_TIMEOUT_SECONDS, "serve",
           "longest upstream silence tolerated between bytes (never a total limit)", "SECONDS"),
    Option("--history-days", "history_days", "COPROXY_HISTORY_DAYS", _positive_int,
           DEFAULT_HISTORY_DAYS, "serve",
           "keep the request history (<state-dir>/history, no prompt or answer text) this many "
           "days", "DAYS"),
    Option("--no-history", "no_history", "COPROXY_NO_HISTORY", bool, False, "serve",
           "keep no request history on disk (the dashboard then shows this run only)", None),
    Option("--no-dashboard", "no_dashboard", "COPROXY_NO_DASHBOARD", bool, False, "serve",
           "do not serve the dashboard page (GET / from a browser) and /dashboard/data", None),
    Option("--shutdown-grace", "shutdown_grace", "COPROXY_SHUTDOWN_GRACE", _positive_float,
           DEFAULT_SHUTDOWN_GRACE_SECONDS, "serve",
           "on SIGINT/SIGTERM, seconds in-flight requests get to finish", "SECONDS"),
]
OPTION_BY_DEST = {o.dest: o for o in OPTIONS}
#: Options whose value is a secret: never on a command line coproxy writes, never logged.
SECRET_OPTIONS = ("api_key", "github_token")
#: More names for an option's variable, read only when the option's own variable is unset (so
#: GHCP_PROXY_API_KEY, coproxy-rs's name, wins over COPROXY_API_KEY when both are set).
#: COPROXY_API_KEY is the name every other setting's pattern suggests, and the one Codex's recipe
#: uses: a user who exports it believes the server is keyed, so it must be.
ENV_ALIASES = {"api_key": ("COPROXY_API_KEY",)}
#: Every variable coproxy reads with its own prefixes is an option's or an alias's: a variable
#: read elsewhere must be added here, or start-up calls it a misspelling.
VARIABLE_PREFIXES = ("COPROXY_", "GHCP_")


def unknown_variable_warnings(environ):
    """One warning per COPROXY_*/GHCP_* variable coproxy does not read, naming the closest known
    one: COPROXY_PROT=58104 is otherwise silently ignored, and the port is not what the user
    set."""
    import difflib  # only when a variable needs it
    known = [o.env for o in OPTIONS] + [a for aliases in ENV_ALIASES.values() for a in aliases]
    # compared without the prefix, which every name shares and which would make any two look alike
    by_stem = {known_name.split("_", 1)[1]: known_name for known_name in known}
    warnings = []
    for name in sorted(environ):
        if not name.upper().startswith(VARIABLE_PREFIXES) or name in known:
            continue
        stem = name.upper().split("_", 1)[1]
        close = difflib.get_close_matches(stem, by_stem, n=1, cutoff=0.6)
        hint = ("did you mean %s?" % by_stem[close[0]] if close
                else "`python3 coproxy.py --help` lists them")
        warnings.append("%s is set but coproxy reads no such variable (%s)" % (name, hint))
    return warnings


def default_state_dir(platform=None, environ=None):
    """Where token files live: the same place as coproxy-rs, so its users keep their login."""
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


#: Settings with no flag or variable (tests and embedding programs set them on a Config).
HIDDEN_SETTINGS = {"body_timeout": DEFAULT_BODY_TIMEOUT_SECONDS,
                   "connect_timeout": DEFAULT_UPSTREAM_CONNECT_TIMEOUT_SECONDS,
                   "models_ttl": DEFAULT_MODELS_TTL_SECONDS}


class Config:
    """Every setting of one coproxy run, resolved from flags, environment and defaults.

    One attribute per OPTIONS row (named by its ``dest``) and per HIDDEN_SETTINGS entry. The
    defaults live in those two tables only, so the help text, the CLI and a bare ``Config()``
    cannot disagree. Besides: ``sources`` ({dest: "--flag" or "ENV_VAR"}, defaults absent),
    ``warnings`` (what the user should hear about the settings, logged once logging is set up)
    and ``environ`` (the environment it was read from). No repr: it holds secrets."""

    def __init__(self, environ=None):
        for option in OPTIONS:
            value = option.default
            if isinstance(value, str) and option.type is not str:
                value = option.type(value)  # "all" -> the surfaces it names
            setattr(self, option.dest, value)
        self.__dict__.update(HIDDEN_SETTINGS)
        self.sources = {}
        self.warnings = []
        self.environ = dict(environ or {})
        self._collections()

    def _collections(self):
        """Repeatable options arrive as None or lists of items; aliases are looked up by name."""
        self.model_aliases = dict(self.model_aliases or [])
        self.allowed_hosts = list(self.allowed_hosts or [])
        self.cors_origins = list(self.cors_origins or [])

    @property
    def max_body_bytes(self):
        # The option is in MiB and may be a fraction (tests use 1 KiB).
        return int(self.max_body_mb * 1024 * 1024)

    @property
    def is_ghe(self):
        """True for any host but github.com (a GHE.com tenant, a GHES server): the Copilot API
        is then not the public one."""
        return self.github_host.lower() != "github.com"

    @property
    def user_agent(self):
        """GitHubCopilotChat/0.68.0 for copilot-chat/0.68.0: the User-Agent follows the plugin."""
        return "GitHubCopilotChat/" + self.editor_plugin_version.split("/", 1)[1]

    @property
    def secret_flags(self):
        """(flag, variable) of each secret given on the command line, where ps shows it."""
        return [(OPTION_BY_DEST[d].flag, OPTION_BY_DEST[d].env) for d in SECRET_OPTIONS
                if self.sources.get(d, "").startswith("--")]

    @property
    def api_key_variable(self):
        """The variable to name where a command needs the API key: the one it was read from, or
        the option's own when it came from a flag (the flag warning asks to move it there)."""
        source = self.sources.get("api_key", "")
        return source if source and not source.startswith("--") else OPTION_BY_DEST["api_key"].env

    @property
    def copilot_cli_token(self):
        """COPILOT_GITHUB_TOKEN (the Copilot CLI's variable), a token source of ours too."""
        return self.environ.get("COPILOT_GITHUB_TOKEN", "").strip()

    def source_of(self, dest):
        return self.sources.get(dest, "the default")

    @property
    def state_dir_option(self):
        """" --state-dir DIR" unless it is the default one, for commands we tell the user to
        run."""
        default = os.path.abspath(default_state_dir(environ=self.environ))
        return "" if self.state_dir == default else " --state-dir %s" % self.state_dir

    @classmethod
    def resolve(cls, values, environ=None):
        """Build a Config from parsed flags (a dict; missing keys = not given) and environment.

        Precedence is flag > variable (then its aliases) > default. The values are then checked
        together (URLs, secrets, token sources, the CA file), so that a bad setting stops the
        command at once, naming the flag or variable it came from, instead of failing a request
        later."""
        environ = dict(os.environ if environ is None else environ)
        config = cls(environ=environ)
        for option in OPTIONS:
            config._take(option, values, environ)
        config._check_urls()
        config._check_secrets()
        config._check_token_sources()
        config._absolute_paths()
        config._collections()
        config._check_ca_file()
        config.warnings += unknown_variable_warnings(environ)
        return config

    def _take(self, option, values, environ):
        """Set ``option`` from its flag, else from the first of its variables that is set (with
        a warning when they disagree), and note where it came from; a default goes unnoted."""
        names = [n for n in (option.env,) + ENV_ALIASES.get(option.dest, ())
                 if environ.get(n, "") != ""]
        flagged = option.dest in values and values[option.dest] is not None
        if len({environ[n] for n in names}) > 1 and not flagged:
            self.warnings.append("%s are set to different values; %s is used"
                                 % (" and ".join(names), names[0]))
        if flagged:
            value, source = values[option.dest], option.flag
        elif names:
            source = names[0]
            try:
                value = (_parse_bool if option.type is bool else option.type)(environ[source])
            except ValueError as exc:
                shown = "[secret]" if option.dest in SECRET_OPTIONS else repr(environ[source])
                raise ConfigError("%s=%s is not valid: %s" % (source, shown, exc))
        else:
            return
        setattr(self, option.dest, value)
        self.sources[option.dest] = source

    def _check_urls(self):
        """--github-host is a host name, and the device-flow and REST URLs follow it unless
        given one by one; every URL is http(s) with a host, kept without a trailing slash."""
        self.github_host = self.github_host.strip().lower().rstrip("/") or "github.com"
        if "/" in self.github_host:  # a URL
            raise ConfigError("--github-host takes a host name such as TENANT.ghe.com, not a URL")
        if self.github_url is None:
            self.github_url = "https://" + self.github_host
        if self.github_api_url is None:
            self.github_api_url = "https://api." + self.github_host
        for name in ("github_url", "github_api_url", "copilot_api_url"):
            url = getattr(self, name)
            if url is None:
                continue
            try:
                parsed = urllib.parse.urlsplit(url)
                parsed.port  # a port that is not a number raises here
            except ValueError:
                parsed = None
            if parsed is None or parsed.scheme not in ("http", "https") or not parsed.hostname:
                raise ConfigError("%s must be an http(s) URL, got %r"
                                  % (OPTION_BY_DEST[name].env, redact(url)))
            setattr(self, name, url.rstrip("/"))

    def _check_secrets(self):
        """A key or token stripped (blank is unset) and printable: a line break in one would
        split the header it is sent in."""
        for name in SECRET_OPTIONS:
            value = (getattr(self, name) or "").strip() or None
            if value is not None and not value.isprintable():
                raise ConfigError("%s holds a line break or control character"
                                  % self.source_of(name))
            setattr(self, name, value)

    def _check_ca_file(self):
        """Checked at start-up: a wrong file (a DER certificate, a key) stops the command naming
        the file, instead of failing every request later."""
        if not self.ca_file:
            return
        try:
            with open(self.ca_file, "rb") as handle:
                pem = handle.read()
        except OSError as exc:
            raise ConfigError("--ca-file %s cannot be read: %s"
                              % (self.ca_file, exc.strerror or exc))
        if b"-----BEGIN CERTIFICATE-----" not in pem:
            raise ConfigError("--ca-file %s holds no PEM certificate "
                              "(-----BEGIN CERTIFICATE-----)" % self.ca_file)

    def _check_token_sources(self):
        """At most one explicit GitHub token source, and a GitHub App only with all it needs."""
        sources = ("github_token", "github_token_file", "github_app_id")
        given = [OPTION_BY_DEST[d].flag for d in sources if getattr(self, d) is not None]
        if len(given) > 1:
            raise ConfigError("%s and %s both give the GitHub token; keep one" % tuple(given[:2]))
        app_parts = ("github_app_key_file", "github_app_installation_id", "github_app_org")
        if self.github_app_id is None:
            stray = [OPTION_BY_DEST[d].flag for d in app_parts if getattr(self, d) is not None]
            if stray:
                raise ConfigError("%s needs --github-app-id" % stray[0])
            return
        if not self.github_app_key_file:
            raise ConfigError("--github-app-id needs --github-app-key-file (the App's private key, "
                              "PEM)")
        if (self.github_app_installation_id is None) == (self.github_app_org is None):
            raise ConfigError("--github-app-id needs one of --github-app-installation-id and "
                              "--github-app-org")

    def _absolute_paths(self):
        """Paths made absolute now: they are handed on to a background server and written
        into service files, which may run from another directory."""
        state_dir = self.state_dir or default_state_dir(environ=self.environ)
        self.state_dir = os.path.abspath(os.path.expanduser(state_dir))
        for name in ("github_token_file", "github_app_key_file"):
            if getattr(self, name):
                setattr(self, name, os.path.abspath(os.path.expanduser(getattr(self, name))))

    def changed_settings(self):
        """[(Option, value)] of every setting that differs from its default, flags and variables
        alike: what a service file must carry to run this same configuration."""
        return [(option, getattr(self, option.dest)) for option in OPTIONS
                if option.dest in self.sources and option.dest != "detach"]


#: Variables that decide how coproxy reaches GitHub (proxies, trust): a command run elsewhere on
#: behalf of this configuration (a service, the banner's claude-code line) must carry them too.
CONNECTION_VARIABLES = ("HTTPS_PROXY", "HTTP_PROXY", "NO_PROXY", "SSL_CERT_FILE", "SSL_CERT_DIR")


def connection_environment(environ):
    """({name: value}, {name: value}): the connection variables set in ``environ``, plain ones
    and secret ones (a proxy URL with user:password, with a scheme or not)."""
    plain, secret = {}, {}
    for name, value in sorted(environ.items()):
        if name.upper() in CONNECTION_VARIABLES and value:
            (secret if "@" in value else plain)[name] = value
    return plain, secret


def settings_argv(config, scope=("shared", "serve"), leave_out=()):
    """(flags, secrets) that reproduce every setting of ``config`` that differs from its default
    (but those named in ``leave_out``), whether it came from a flag or an environment variable:
    flags for the plain ones, and {variable: value} for the secrets, which must never be on a
    command line."""
    argv, secrets = ["--state-dir", config.state_dir], {}
    if config.copilot_cli_token:  # the Copilot CLI's variable is a token source of ours too
        secrets["COPILOT_GITHUB_TOKEN"] = config.copilot_cli_token
    for option, value in config.changed_settings():
        if option.scope not in scope or option.dest == "state_dir" or option.dest in leave_out:
            continue
        if isinstance(value, dict):  # --model-alias, a dict by now: back to FROM=TO items
            value = ["%s=%s" % item for item in sorted(value.items())]
        # A user:password in a URL is as secret as a key (redact's pattern finds it).
        if option.dest in SECRET_OPTIONS or (isinstance(value, str)
                                             and _URL_CREDENTIALS.match(value)):
            secrets[option.env] = value
        elif option.type is bool:
            argv += [option.flag] if value else []
        elif isinstance(value, list):  # a repeatable flag: once per item
            argv += [word for item in value for word in (option.flag, item)]
        elif isinstance(value, frozenset):  # --api-surface: its comma list
            argv += [option.flag, ",".join(sorted(value))]
        else:
            argv += [option.flag, str(value)]
    return argv, secrets


# ------------------------------------------------------------------------------------------
# 5. Token store and history
#    Two files under <state-dir>/auth/, byte-compatible with coproxy-rs: the GitHub token as
#    plain text and the Copilot token as JSON (``token``, ``expires_at``, ``api_endpoint``;
#    extra fields allowed). The state dir must belong to the user and be writable by no one
#    else (OpenSSH's StrictModes: a dir others can write is one they could plant files in);
#    files are opened without following symlinks, created 0600, written to a temp file,
#    fsynced and renamed; loose modes are fixed with fchmod on the open file. A corrupt or
#    empty file reads as absent. The request history (5b) lives in the same dir under the
#    same rules: what each finished request used and cost, never its text. No network here.
# ------------------------------------------------------------------------------------------

#: File owners, modes and directory fsyncs are POSIX notions; elsewhere they are skipped.
_POSIX = os.name == "posix"
GITHUB_TOKEN_FILE = "github-access-token"
COPILOT_TOKEN_FILE = "ghcp-token.json"


def secure_dir(path):
    """Create ``path`` (0700) if needed and make sure only its owner, the user, can write to it;
    a dir others can merely read is tightened to 0700. Raises ConfigError naming the fix."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    if not _POSIX:
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)  # a directory, or makedirs had raised
    try:
        info = os.fstat(fd)
        if info.st_uid != os.getuid():
            raise ConfigError("refusing to use %s: it belongs to uid %d, not to you (uid %d); use "
                              "a directory of your own with --state-dir"
                              % (path, info.st_uid, os.getuid()))
        mode = stat.S_IMODE(info.st_mode)
        if mode & 0o022:
            raise ConfigError("refusing to use %s: others can write to it (mode %04o), so its "
                              "files could have been replaced; check them, then run: chmod 700 %s"
                              % (path, mode, path))
        if mode & 0o077:
            os.fchmod(fd, 0o700)
    finally:
        os.close(fd)


def write_file_atomic(path, text):
    """Write ``text`` to ``path`` as a 0600 file that never exists half-written: a temp file in the
    same directory (created 0600 by os.open, so no umask window), fsync, rename, fsync the dir."""
    directory = os.path.dirname(path) or "."
    tmp = "%s.%d.%s.tmp" % (path, os.getpid(), random_id(8))
    fd = open_private(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(text.encode("utf-8"))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if _POSIX:
        with contextlib.suppress(OSError):  # make the rename itself durable
            dir_fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)


def read_private_file(path):
    """Text of a file of ours, or None if absent. A symlink is refused (OSError), and a file others
    can read is tightened to 0600 through its open descriptor, with a warning."""
    fd = open_private(path, os.O_RDONLY)
    with os.fdopen(fd, "rb") as handle:
        if _POSIX:
            mode = stat.S_IMODE(os.fstat(fd).st_mode)
            if mode & 0o077:
                log.warning("%s was readable by others (mode %o); setting it to 0600", path, mode)
                os.fchmod(fd, 0o600)
        return handle.read().decode("utf-8")


#: A token or key file is a few KiB; anything far larger is not one.
MAX_SECRET_FILE_BYTES = 64 * 1024


def read_owner_only_file(path, what):
    """Text of a secret the user keeps outside the state dir (a GitHub App key, a token file). The
    state dir's rules apply: it must be the user's and no one else may read or write it (checked
    on the open file, so a swap between check and read cannot slip through). ConfigError naming
    the fix otherwise."""
    try:  # non-blocking: a FIFO planted at the path must not hang the thread in open()
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    except OSError as exc:
        raise ConfigError("%s %s cannot be read: %s" % (what, path, exc.strerror or exc))
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError("refusing to use %s %s: not a regular file" % (what, path))
        if _POSIX:
            if info.st_uid != os.getuid():
                raise ConfigError("refusing to use %s %s: it belongs to uid %d, not to you (uid %d)"
                                  % (what, path, info.st_uid, os.getuid()))
            mode = stat.S_IMODE(info.st_mode)
            if mode & 0o077:
                raise ConfigError("refusing to use %s %s: others can read or change it (mode "
                                  "%04o); run: chmod 600 %s" % (what, path, mode, path))
        data = handle.read(MAX_SECRET_FILE_BYTES + 1)
    if len(data) > MAX_SECRET_FILE_BYTES:
        raise ConfigError("%s %s is larger than %s: not a token or key"
                          % (what, path, format_size(MAX_SECRET_FILE_BYTES)))
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError("%s %s is not text" % (what, path))


class WatchedFile:
    """A small file read again only when its inode, size, mtime or mode change: cheap enough to
    ask on every request, so a token rewritten by another process is used from the next request.
    Timestamps are coarse (a few ms) and inodes get reused: a file written within the last
    seconds could be rewritten without its identity changing, so such a file is not cached."""

    def __init__(self, path, read, stat_file=os.stat):
        self.path = path
        self._read = read
        self._stat = stat_file
        self._seen = (None, None)   # (identity, value) of the last read

    def value(self):
        """What ``read`` made of the file, or None when it does not exist."""
        try:
            found = self._stat(self.path)
        except OSError:
            return None
        identity = (found.st_ino, found.st_size, found.st_mtime_ns, found.st_mode)
        seen, value = self._seen
        if identity != seen:
            value = self._read()
            fresh = time.time() - found.st_mtime < 2.0
            self._seen = (None if fresh else identity, value)
        return value


class TokenStore:
    """The on-disk auth state: ``auth/github-access-token`` and ``auth/ghcp-token.json``."""

    def __init__(self, state_dir):
        self.state_dir = state_dir
        self.auth_dir = os.path.join(state_dir, "auth")
        self._dirs_checked = False
        self.github_token_path = os.path.join(self.auth_dir, GITHUB_TOKEN_FILE)
        self.copilot_token_path = os.path.join(self.auth_dir, COPILOT_TOKEN_FILE)
        #: the token is asked for on every request: read again only when the file changes
        self._github_token = WatchedFile(self.github_token_path, self._read_github_token, os.lstat)

    def check_dirs(self):
        """The state and auth dirs exist, are the user's and only the user's (ConfigError if
        not). Checked once per run: the token is read on every request."""
        if not self._dirs_checked:
            for path in (self.state_dir, self.auth_dir):
                secure_dir(path)
            self._dirs_checked = True

    def _read(self, path):
        """File text, or None if absent or unusable (with a warning saying why)."""
        try:
            return read_private_file(path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            # ELOOP is O_NOFOLLOW's answer: say it plainly
            why = ("it is a symbolic link" if exc.errno == errno.ELOOP
                   else exc.strerror or exc.__class__.__name__)
            log.warning("cannot read %s (%s); treating it as absent", path, why)
            return None
        except UnicodeDecodeError:
            log.warning("cannot read %s (not UTF-8 text); treating it as absent", path)
            return None

    def load_github_token(self):
        """The saved GitHub token, or None; a login or logout by another process is seen on the
        next request (the file is read again when it changes)."""
        return self._github_token.value()

    def _read_github_token(self):
        self.check_dirs()
        return (self._read(self.github_token_path) or "").strip() or None

    def save_github_token(self, token):
        self.check_dirs()
        write_file_atomic(self.github_token_path, token.strip() + "\n")

    def load_copilot_token(self):
        """The cached Copilot token record, or None if absent, corrupt or missing fields."""
        if not os.path.lexists(self.copilot_token_path):
            return None
        self.check_dirs()
        text = self._read(self.copilot_token_path)
        if not text or not text.strip():
            return None
        try:
            record = json.loads(text)
        except ValueError:
            log.warning("%s is corrupt; ignoring it", self.copilot_token_path)
            return None
        usable = (isinstance(record, dict) and isinstance(record.get("token"), str)
                  and isinstance(record.get("expires_at"), (int, float)))
        return record if usable else None

    def save_copilot_token(self, record):
        self.check_dirs()
        write_file_atomic(self.copilot_token_path,
                          json.dumps(record, indent=2, sort_keys=True) + "\n")

    def clear(self):
        """Delete both files; returns the paths that existed."""
        removed = []
        for path in (self.github_token_path, self.copilot_token_path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
                removed.append(path)
        return removed


# -- 5b. Request history -------------------------------------------------------------------

HISTORY_DIR = "history"
#: What the dashboard covers: charts per hour and latency percentiles over the last 24 hours,
#: charts per day over the last 30 days, and a table of the last 200 requests.
HISTORY_HOURS = 24
HISTORY_CHART_DAYS = 30
HISTORY_RECENT = 200
#: Agent sessions kept in memory (the most recently active ones); the files keep them all.
HISTORY_MAX_SESSIONS = 500
#: Latency samples kept for the route percentiles (the newest; at most the last 24 hours): a
#: busy day would otherwise keep millions (the soak: ~120 requests a second, 10 million a day).
HISTORY_LATENCY_SAMPLES = 10_000
#: Records waiting for the writer thread; beyond this (a disk that hangs) new ones are dropped.
HISTORY_QUEUE_LIMIT = 10000
#: the history writer rests this long after each batch, so that records gather (see History)
HISTORY_WRITE_SECONDS = 0.5
#: What each total counts; a record's numbers have the same names.
TOTAL_FIELDS = ("requests", "errors", "credits", "premium", "input", "cached", "output",
                "reasoning")


def local_day(timestamp):
    """The server's local calendar day of a unix time, as history files are named."""
    return time.strftime("%Y-%m-%d", time.localtime(timestamp))


def percentiles(values):
    """{"p50": .., "p90": .., "p99": ..} of ``values`` (nearest rank: the ceil(p% of n)-th
    smallest, 1 to n for p below 100), None when there are none."""
    ordered = sorted(v for v in values if v is not None)
    if not ordered:
        return None
    return {"p%d" % p: ordered[-(-p * len(ordered) // 100) - 1] for p in (50, 90, 99)}


def parse_since(text, now):
    """``?since=``: unix seconds, or an age such as 90m, 24h or 7d; None when not given."""
    if text is None or text == "":
        return None
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        since = (now - float(text[:-1]) * units[text[-1]]) if text[-1:] in units else float(text)
        if not 0 <= since < 32503680000:  # up to the year 3000; not nan or inf (no day holds them)
            raise ValueError
        return since
    except ValueError:
        raise ValueError("since must be unix seconds or an age such as 90m, 24h or 7d, got %r"
                         % text[:40])


class Ledger:
    """Totals of finished requests as the dashboard and ``usage`` show them: per hour for the
    last 24 hours and per day, split by model; per agent session; latency samples per route for
    the last 24 hours; the last 200 requests. Fed one record at a time (live, on the loop) and
    from history files at start (``add_day`` takes a past day's summary). One thread at a time."""

    def __init__(self, clock=time.time):
        self.clock = clock
        self.hourly = {}    # hour start (unix seconds) -> {model: totals}
        self.daily = {}     # local day "YYYY-MM-DD" -> {model: totals}
        # session id -> {"requests", "credits", "premium", "models", "first", "last", "client"}
        self.sessions = {}
        # (t, route, ttfb_ms, ms) of the last 24 hours
        self.latency = collections.deque(maxlen=HISTORY_LATENCY_SAMPLES)
        self.recent = collections.deque(maxlen=HISTORY_RECENT)
        self.count = 0      # records added: the page asks whether anything changed by it
        self._day = (None, None)  # (quarter hour, local day) of the last record: days by cache

    @staticmethod
    def _totals(table, key, model):
        models = table.setdefault(key, {})
        return models.get(model) or models.setdefault(model, dict.fromkeys(TOTAL_FIELDS, 0))

    @staticmethod
    def _count(totals, failed, amounts):
        totals["requests"] += 1
        totals["errors"] += failed
        for name, value in amounts:
            totals[name] += value

    def _local_day(self, t):
        """local_day(t), remembered per quarter hour (every time zone's offset is a multiple of
        15 minutes): a start counts thousands of records in time order."""
        quarter = int(t // 900)
        if self._day[0] != quarter:
            self._day = (quarter, local_day(t))
        return self._day[1]

    def add(self, record, totals=True, now=None):
        """Count one record; ``totals=False`` when its day's totals came from a summary."""
        t = record["t"]
        model = record.get("model") or "-"
        failed = 1 if record.get("error") or record.get("status", 200) >= 400 else 0
        amounts = [(name, record[name]) for name in TOTAL_FIELDS[2:] if record.get(name)]
        if totals:
            self._count(self._totals(self.daily, self._local_day(t), model), failed, amounts)
            session_id = record.get("session")
            session = self.sessions.get(session_id) if session_id else None
            # An existing session is counted in place, not through _add_session's merge of a
            # part: a start adds thousands of records (bench --history measures it).
            if session is not None:
                session["requests"] += 1
                session["credits"] += record.get("credits") or 0
                session["premium"] += record.get("premium") or 0
                session["models"][model] = session["models"].get(model, 0) + 1
                session["first"] = min(session["first"], t)
                session["last"] = max(session["last"], t)
                session["client"] = record.get("client") or session["client"]
            elif session_id:
                self._add_session(session_id, {
                    "requests": 1, "credits": record.get("credits") or 0,
                    "premium": record.get("premium") or 0, "models": {model: 1}, "first": t,
                    "last": t, "client": record.get("client")})
        now = self.clock() if now is None else now
        if t >= now - HISTORY_HOURS * 3600:
            self._count(self._totals(self.hourly, int(t // 3600) * 3600, model), failed, amounts)
            self.latency.append((t, record.get("route"), record.get("ttfb_ms"), record.get("ms")))
        self.recent.append(record)
        self.count += 1
        if self.count % 1024 == 0:  # bounded even when no one looks at the views
            self.trim(now)

    def _add_session(self, session_id, part):
        session = self.sessions.get(session_id)
        if session is None:
            if len(self.sessions) >= 2 * HISTORY_MAX_SESSIONS:  # trimmed in bulk: one sort per 500
                kept = sorted(self.sessions.items(), key=lambda item: item[1]["last"])
                self.sessions = dict(kept[-HISTORY_MAX_SESSIONS:])
            self.sessions[session_id] = dict(part, models=dict(part["models"]))
            return
        for name in ("requests", "credits", "premium"):
            session[name] += part[name]
        for model, count in part["models"].items():
            session["models"][model] = session["models"].get(model, 0) + count
        session["first"] = min(session["first"], part["first"])
        session["last"] = max(session["last"], part["last"])
        session["client"] = part.get("client") or session.get("client")

    def add_day(self, summary):
        """Merge a past day's summary (see ``summary``)."""
        for model, totals in summary.get("models", {}).items():
            mine = self._totals(self.daily, summary["day"], model)
            for name in TOTAL_FIELDS:
                mine[name] += totals.get(name, 0)
        for session_id, part in summary.get("sessions", {}).items():
            self._add_session(session_id, part)

    def summary(self, day):
        """One day's totals and sessions as a summary file keeps them (of a ledger fed that day)."""
        return {"day": day, "models": self.daily.get(day, {}), "sessions": self.sessions}

    # -- views: what /usage?by= and the dashboard answer ---------------------------------------
    def trim(self, now):
        """Forget hours and latency samples older than 24 hours, and days older than the charts."""
        horizon = now - HISTORY_HOURS * 3600
        for hour in [h for h in self.hourly if h + 3600 <= horizon]:
            del self.hourly[hour]
        while self.latency and self.latency[0][0] < horizon:
            self.latency.popleft()
        oldest = local_day(now - (HISTORY_CHART_DAYS + 1) * 86400)
        for day in [d for d in self.daily if d < oldest]:
            del self.daily[day]

    @staticmethod
    def _rounded(models):
        return {model: dict(totals, credits=round(totals["credits"], 6),
                            premium=round(totals["premium"], 4))
                for model, totals in models.items()}

    def by_hour(self, now, since=None):
        """The last 24 hours, oldest first, empty hours included: [{"start", "models"}]."""
        self.trim(now)
        current = int(now // 3600) * 3600
        hours = [current - 3600 * back for back in range(HISTORY_HOURS - 1, -1, -1)]
        return [{"start": hour, "models": self._rounded(self.hourly.get(hour, {}))}
                for hour in hours if since is None or hour + 3600 > since]

    def by_day(self, now, days=HISTORY_CHART_DAYS, since=None):
        """The last ``days`` local days, oldest first, empty days included: [{"day", "models"}]."""
        # dict.fromkeys keeps the order and the first of a repeat: a day of 25 hours (daylight
        # saving) appears once
        names = list(dict.fromkeys(local_day(now - 86400 * back)
                                   for back in range(days - 1, -1, -1)))
        first = local_day(since) if since is not None else None
        return [{"day": name, "models": self._rounded(self.daily.get(name, {}))}
                for name in names if first is None or name >= first]

    def by_model(self, now, since=None):
        """Totals per model over the days from ``since`` (default: the last 30)."""
        merged = {}
        for day in self.by_day(now, since=since):
            for model, totals in day["models"].items():
                merged.setdefault(model, collections.Counter()).update(totals)  # adds them up
        return self._rounded(merged)

    def by_session(self, since=None, limit=100):
        """Sessions, most recently active first."""
        chosen = [dict(s, id=k, credits=round(s["credits"], 6), premium=round(s["premium"], 4))
                  for k, s in self.sessions.items() if since is None or s["last"] >= since]
        chosen.sort(key=lambda s: s["last"], reverse=True)
        return chosen[:limit]

    def by_route(self, now, since=None):
        """Per route over the last 24 hours: requests, percentiles of first byte and total time."""
        self.trim(now)
        routes = {}
        for t, route, ttfb, total in self.latency:
            if since is None or t >= since:
                entry = routes.setdefault(route or "other", ([], []))
                entry[0].append(ttfb)
                entry[1].append(total)
        return {route: {"requests": len(totals), "ttfb_ms": percentiles(ttfbs),
                        "ms": percentiles(totals)}
                for route, (ttfbs, totals) in sorted(routes.items())}

    def requests(self, since=None):
        """The last requests (at most HISTORY_RECENT are kept), newest first."""
        return [r for r in reversed(self.recent) if since is None or r["t"] >= since]


class History:
    """The request history on disk: one JSON line per finished request in
    ``<state-dir>/history/YYYY-MM-DD.jsonl`` (the server's local days; 0600 files in a 0700
    dir, like the token files), and for each past day a ``YYYY-MM-DD.sum.json`` of its totals.
    A start reads the summaries of past days and only the last 24 hours of records, so 30 days
    of a heavy user load in milliseconds. Records are written by a thread of its own, in
    batches: a request never waits for the disk. Files older than ``keep_days`` are removed."""

    def __init__(self, state_dir, keep_days=90):
        self.state_dir = state_dir
        self.dir = os.path.join(state_dir, HISTORY_DIR)
        self.keep_days = keep_days
        self._queue = queue.Queue(HISTORY_QUEUE_LIMIT)
        self._thread = None
        self._hurry = threading.Event()  # flush and close cut the writer's rest short
        self._last_day = None  # the day of the last record written: a new day summarizes it
        self._failed = None    # the last write error, logged once
        self._dirs_checked = False  # secure_dir once per run, not per batch (as TokenStore)

    def path(self, day, suffix=".jsonl"):
        return os.path.join(self.dir, day + suffix)

    def days(self):
        """Days that have a records file, oldest first."""
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return []
        return sorted(n[:-6] for n in names if n.endswith(".jsonl") and len(n) == 16)

    # -- writing (the writer thread) -------------------------------------------------------
    def append(self, record):
        """Queue one record for the writer thread (started on first use); never blocks."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._write_loop, name="coproxy-history",
                                            daemon=True)
            self._thread.start()
        # Full (a disk that hangs): the record is lost rather than waited for.
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(record)

    def flush(self):
        """Wait until every queued record is written (tests, and close)."""
        if self._thread is not None:
            self._hurry.set()
            self._queue.join()

    def close(self, timeout=5.0):
        if self._thread is not None:
            with contextlib.suppress(queue.Full):
                self._queue.put(None, timeout=timeout)
            self._hurry.set()
            self._thread.join(timeout)
            self._thread = None

    def _write_loop(self):
        """The writer thread: takes what is queued (up to 1,000 records) as one batch, so that
        a burst costs one open and write per day file, not one per request. A write error is
        logged when it changes, not per batch (a full disk would flood the log). Ends at the
        None that close() queues, after writing what came before it."""
        while True:
            batch = [self._queue.get()]
            while len(batch) < 1000:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                self.write([r for r in batch if r is not None])
            except (OSError, ConfigError) as exc:
                if str(exc) != self._failed:
                    log.warning("cannot write the request history to %s: %s", self.dir, exc)
                self._failed = str(exc)
            finally:
                for _ in batch:
                    self._queue.task_done()
            if None in batch:
                return
            # Rest before taking the next batch. A writer blocked in get() is woken by every
            # put: a thread wake-up on the loop for each request (~9 % of the loop's time with
            # one client). Resting, it takes what gathered meanwhile in one go.
            self._hurry.wait(HISTORY_WRITE_SECONDS)
            self._hurry.clear()

    def write(self, records):
        """Append records to their days' files; when a new day begins, summarize the last one."""
        by_day = {}
        for record in records:
            by_day.setdefault(local_day(record["t"]), []).append(
                json.dumps(record, separators=(",", ":"), ensure_ascii=False))
        if not by_day:
            return
        if not self._dirs_checked:
            secure_dir(self.state_dir)
            secure_dir(self.dir)
            self._dirs_checked = True
        for day, lines in sorted(by_day.items()):
            fd = open_private(self.path(day), os.O_WRONLY | os.O_APPEND | os.O_CREAT)
            with os.fdopen(fd, "ab") as handle:
                handle.write(("\n".join(lines) + "\n").encode("utf-8", "replace"))
            if self._last_day is not None and day > self._last_day:
                self.summarize(self._last_day)
                self.prune(max(record["t"] for record in records))
            self._last_day = max(day, self._last_day or day)

    def prune(self, now):
        """Remove the files of days older than ``keep_days``."""
        oldest = local_day(now - self.keep_days * 86400)
        for day in self.days():
            if day < oldest:
                for suffix in (".jsonl", ".sum.json"):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self.path(day, suffix))

    # -- reading -----------------------------------------------------------------------------
    def records(self, day, since=None):
        """The records of one day, skipping any line cut short (a crash mid-write) and, with
        ``since``, lines older than that (read from their leading "t" without parsing them)."""
        try:
            fd = open_private(self.path(day), os.O_RDONLY)
        except FileNotFoundError:
            return []
        with os.fdopen(fd, "rb") as handle:
            text = handle.read().decode("utf-8", "replace")
        lines = [line for line in text.split("\n") if line]
        if since is not None:
            lines = [line for line in lines
                     if not line.startswith('{"t":') or self._time(line) >= since]
        try:  # one parse for the whole file is twice as fast as one per line
            parsed = json.loads("[" + ",".join(lines) + "]")
        except ValueError:
            parsed = []
            for line in lines:
                with contextlib.suppress(ValueError):
                    parsed.append(json.loads(line))
        return [r for r in parsed if isinstance(r, dict) and isinstance(r.get("t"), (int, float))]

    @staticmethod
    def _time(line):
        try:
            return float(line[5:line.index(",", 5)])
        except ValueError:
            return float("inf")  # unreadable here: parsed (and judged) whole

    def summarize(self, day):
        """Totals of a past day, from its summary file when that still matches the records
        file's size, else counted from the records and saved."""
        try:
            size = os.stat(self.path(day)).st_size
        except FileNotFoundError:
            return {"day": day, "models": {}, "sessions": {}}
        with contextlib.suppress(OSError, ValueError, UnicodeDecodeError):
            saved = json.loads(read_private_file(self.path(day, ".sum.json")))
            if isinstance(saved, dict) and saved.get("bytes") == size and saved.get("day") == day:
                return saved
        ledger = Ledger()
        for record in self.records(day):
            ledger.add(record, now=0)
        summary = dict(ledger.summary(day), bytes=size)
        with contextlib.suppress(OSError):
            write_file_atomic(self.path(day, ".sum.json"),
                              json.dumps(summary, separators=(",", ":")))
        return summary

    def load(self, ledger, now, days=HISTORY_CHART_DAYS, prune=True):
        """Fill ``ledger`` with the last ``days`` days: today's records, past days' summaries,
        and the records of the last 24 hours (hours, latency, the last requests). Returns how
        many records were read. Only ``serve`` prunes: it knows --history-days."""
        secure_dir(self.state_dir)
        if os.path.isdir(self.dir):
            secure_dir(self.dir)
        if prune:
            self.prune(now)
        today, oldest = local_day(now), local_day(now - (days - 1) * 86400)
        horizon = now - HISTORY_HOURS * 3600
        read = 0
        for day in self.days():
            if not oldest <= day <= today:
                continue
            if day == today:
                recent = self.records(day)
            else:
                ledger.add_day(self.summarize(day))
                recent = self.records(day, since=horizon) if day >= local_day(horizon) else []
            for record in recent:
                ledger.add(record, totals=day == today, now=now)
            read += len(recent)
            self._last_day = max(day, self._last_day or day)
        return read

# ------------------------------------------------------------------------------------------
# 6. Upstream HTTP client (blocking)
#    A small HTTP/1.1 client of our own over socket and ssl.create_default_context() (which
#    honours SSL_CERT_FILE; --ca-file adds a bundle): one sendall per request, a one-pass head
#    parser, chunked bodies handed on as fast as they arrive, and a non-blocking ``pull`` for
#    the stream hub (§10). Nothing a caller passes reaches the wire unchecked: header values
#    with line breaks are refused, and request targets are percent-encoded (a CR/LF in a URL
#    would split the request). Kept-alive connections to GitHub and Copilot are pooled per
#    origin (LIFO; only after an answer read to the end, never after an exchange that failed or
#    was aborted; idle ones closed by a timer; a cap per origin and in all). One retry (on a new
#    connection) when a pooled connection, a TLS handshake or a proxy tunnel is hung up on
#    before any response byte. HTTPS_PROXY/NO_PROXY through a CONNECT tunnel. Images given by
#    URL use ImageFetcher: fresh connections, never the pool, public addresses only.
# ------------------------------------------------------------------------------------------

def _no_proxy_matches(host, port, no_proxy):
    """NO_PROXY semantics as curl has them: ``*``, exact names, domain suffixes, host:port."""
    host = host.lower().strip("[]")
    for entry in no_proxy.replace(" ", "").lower().split(","):
        if entry == "*":
            return True
        # host:port (an IPv6 address has more colons and no port)
        name, entry_port = entry.split(":") if entry.count(":") == 1 else (entry, "")
        name = name.lstrip(".").strip("[]")
        if name and entry_port in ("", str(port)) and (host == name or host.endswith("." + name)):
            return True
    return False


def proxy_for(url, environ):
    """(host, port, Proxy-Authorization value or None) of the proxy for ``url``, or None."""
    parts = urllib.parse.urlsplit(url)
    https = parts.scheme == "https"
    # the lower-case spelling wins when both are set, as in curl
    names = ("https_proxy", "HTTPS_PROXY") if https else ("http_proxy", "HTTP_PROXY")
    proxy = next((environ[n] for n in names if environ.get(n)), None)
    if not proxy:
        return None
    no_proxy = environ.get("no_proxy") or environ.get("NO_PROXY") or ""
    if _no_proxy_matches(parts.hostname or "", parts.port or (443 if https else 80), no_proxy):
        return None
    return parse_proxy(proxy)


def parse_proxy(proxy):
    """(host, port, Proxy-Authorization value or None) of a proxy URL; ConfigError if unusable."""
    if "://" not in proxy:
        proxy = "http://" + proxy
    try:
        p = urllib.parse.urlsplit(proxy)
        port = p.port or 80
    except ValueError:
        p = port = None
    if p is None or p.scheme != "http" or not p.hostname:
        raise ConfigError("proxy URL %s is not usable (only http:// proxies are supported)"
                          % redact(proxy))
    auth = None
    if p.username is not None:
        creds = "%s:%s" % (urllib.parse.unquote(p.username), urllib.parse.unquote(p.password or ""))
        auth = "Basic " + base64.b64encode(creds.encode("utf-8")).decode("ascii")
    return p.hostname, port, auth


def network_error(exc, url):
    """UpstreamUnreachable for a socket/TLS failure: a sentence naming what failed and what
    usually fixes it, and the kind of failure (dns, refused, tls, timeout, proxy, network)."""
    if isinstance(exc, UpstreamUnreachable):
        return exc
    # (every caller has had ``url`` through parse_target before anything else could fail)
    host = parse_target(url).host_header
    if isinstance(exc, ssl.SSLCertVerificationError):
        return UpstreamUnreachable("TLS certificate of %s could not be verified (%s); behind a "
                                   "TLS-inspecting proxy, pass its CA bundle with --ca-file or "
                                   "SSL_CERT_FILE" % (host, exc.verify_message), kind="tls")
    if isinstance(exc, ssl.SSLError):
        return UpstreamUnreachable("TLS error talking to %s: %s" % (host, exc), kind="tls")
    if isinstance(exc, socket.gaierror):
        return UpstreamUnreachable("cannot resolve %s (%s); check your network or HTTPS_PROXY"
                                   % (host, exc.strerror), kind="dns")
    if isinstance(exc, socket.timeout):
        return UpstreamUnreachable("timed out talking to %s" % host, timeout=True)
    if isinstance(exc, ConnectionRefusedError):
        return UpstreamUnreachable("connection to %s refused; check your network or HTTPS_PROXY"
                                   % host, kind="refused")
    if isinstance(exc, OSError) and "Tunnel connection failed" in str(exc):
        return UpstreamUnreachable("the HTTPS proxy refused the tunnel to %s (%s)" % (host, exc),
                                   kind="proxy")
    if isinstance(exc, UpstreamCutShort):
        return UpstreamUnreachable("%s closed the connection mid-answer" % host, kind="cut")
    detail = exc.__class__.__name__ + (": %s" % exc if str(exc) else "")
    return UpstreamUnreachable("cannot reach %s: %s" % (host, detail))


class AbortHandle:
    """Lets the event loop cut off a blocking upstream call from another thread.

    The worker registers the socket it is using; ``abort()`` shuts it down, which wakes a
    thread blocked in a read at once (close() alone would not). A caller that times the call
    itself (``times_out``) calls ``expire()`` when the upstream has been silent too long (the
    reads note ``last_progress``, monotonic): the socket then blocks with no timeout of its own,
    which is cheaper (see UpstreamClient.request)."""

    def __init__(self, times_out=False):
        self.aborted = False
        self.times_out = times_out
        self.expired = False
        self.last_progress = time.monotonic()
        self._sock = None
        self._lock = threading.Lock()

    def expire(self):
        """The call took longer than its caller allows: cut it off as a timeout."""
        self.expired = True
        self.abort()

    def failure(self):
        """What an aborted call raises: a timeout after ``expire``, else "aborted"."""
        if self.expired:
            return UpstreamUnreachable("the upstream was silent for --upstream-timeout",
                                       timeout=True)
        return UpstreamUnreachable("aborted", kind="aborted")

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

    def detach(self, sock):
        """Let go of ``sock`` before it goes back to the pool; False if the call was aborted (then
        the socket must be closed). Without this, a client that leaves just after its answer was
        read would shut down a pooled socket, and the next request on it would fail."""
        with self._lock:
            if self._sock is sock:
                self._sock = None
            return not self.aborted

    @staticmethod
    def _shutdown(sock):
        # the plain-socket method: SSLSocket.shutdown would drop its SSL object under a reader
        with contextlib.suppress(OSError):
            socket.socket.shutdown(sock, socket.SHUT_RDWR)


class UpstreamCutShort(ConnectionError):
    """The upstream closed the connection before its answer was complete."""


def hung_up_before_answer(exc):
    """True for the errors of a peer that went away before saying anything: a reset, a closed
    pipe, a TLS connection that ended without its close_notify ("EOF occurred in violation of
    protocol"). Not a timeout (the request may be running) and not a cut-short answer."""
    # UpstreamCutShort is a ConnectionError but none of these, so a cut answer is never counted
    return isinstance(exc, (ConnectionResetError, BrokenPipeError, ConnectionAbortedError,
                            ssl.SSLEOFError, ssl.SSLZeroReturnError))


_DECIMAL = re.compile(r"[0-9]+\Z")
_WOULD_BLOCK = (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


def parse_response_head(head):
    """(status, headers with lower-case names, will_close) of a response head, the bytes before
    its blank line: ValueError for a malformed status line or too many header lines. Repeated
    headers are joined with ", " (RFC 9110 §5.3) and obsolete line folding is undone."""
    lines = head.decode("latin-1").replace("\r\n", "\n").split("\n")
    parts = lines[0].split(None, 2)
    if (len(parts) < 2 or not parts[0].startswith("HTTP/1.") or len(parts[1]) != 3
            or not parts[1].isdigit()):
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


class UpstreamConnection:
    """A socket to one origin, and how requests on it are addressed."""

    __slots__ = ("sock", "absolute_form", "proxy_auth", "fresh", "answered")

    def __init__(self, sock, proxy=None):
        """``proxy``: (host, port, auth) of the proxy plain HTTP goes through, which is sent the
        full URL as target (the absolute form) and the proxy's credentials on every request."""
        self.sock = sock
        self.absolute_form = proxy is not None
        self.proxy_auth = proxy[2] if proxy else None
        self.fresh = True   # not yet given back to the pool
        #: a byte of the answer to the current request (a 1xx included) has arrived: the upstream
        #: has seen the request, so a failure from here on is never retried (it would run twice)
        self.answered = False

    def close(self):
        self.sock.close()


class UpstreamResponse:
    """One HTTP/1.1 answer read from a socket: status and headers at once, the body on demand.
    ``read1`` returns every body byte already received in one call (a burst of SSE events is one
    hand-over, and an event never waits for the line end after it); ``pull`` does the same
    without waiting, for a non-blocking socket. ``release(conn)`` takes the connection back
    when the answer was read to its end; without it the connection is closed."""

    def __init__(self, conn, method, release=None, abort_handle=None):
        """Reads the head (blocking) and works out how the body is framed: chunked, a length,
        none (HEAD, 204, 304), or until the server closes, in which case the connection can
        never go back to the pool."""
        self._conn = conn
        self._sock = conn.sock
        self._release = release
        self._abort = abort_handle
        self._buf = bytearray()
        self._failure = None
        self._last_read = 0
        self.done = False
        self._complete = False
        while True:  # 1xx interim answers are skipped
            self.status, self.headers, self.will_close = self._read_head()
            if not 100 <= self.status < 200:
                break
        length = self.headers.get("content-length")
        self._chunked = (self.headers.get("transfer-encoding", "").lower().rstrip()
                         .endswith("chunked"))
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

    def _read_head(self):
        """parse_response_head of the next answer's head, received from the socket until its
        blank line. Whether any byte has come (``answered``) decides what a hang-up means: a
        pooled connection closed before it (retried once) or an answer cut short."""
        buf = self._buf
        while True:
            # the first blank line; bare LF line ends are tolerated, as http.client does
            ends = [(end, end + size)
                    for end, size in ((buf.find(b"\r\n\r\n"), 4), (buf.find(b"\n\n"), 2))
                    if end >= 0]
            if ends:
                end, rest = min(ends)
                head = bytes(buf[:end])
                break
            if len(buf) > MAX_HEADER_BYTES * 2:
                raise ValueError("the upstream sent a response head larger than %d bytes"
                                 % (MAX_HEADER_BYTES * 2))
            answered = self._conn.answered
            try:
                data = self._sock.recv(UPSTREAM_RECV_BYTES)
            except OSError as exc:
                if answered and hung_up_before_answer(exc):  # a reset after "HTTP/1.1 200 OK"
                    raise UpstreamCutShort("the upstream hung up mid-answer (%s)"
                                           % exc.__class__.__name__) from exc
                raise
            if not data:
                # Before any byte: a pooled connection the server had closed (retried once).
                raise (UpstreamCutShort if answered else ConnectionResetError)(
                    "the upstream closed the connection without answering")
            self._conn.answered = True
            if self._abort is not None:
                self._abort.last_progress = time.monotonic()
            buf += data
        del buf[:rest]
        return parse_response_head(head)

    def header(self, name, default=None):
        return self.headers.get(name.lower(), default)

    def _take(self, size):
        """Body bytes already received, at most ``size``, with chunked framing removed."""
        buf = self._buf
        if not self._chunked:
            n = min(len(buf), size, len(buf) if self._left is None else self._left)
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
                    raise ValueError("the upstream sent a chunk-size line longer than %d bytes"
                                     % MAX_CHUNK_LINE_BYTES)
                break
            line = bytes(buf[:end]).strip()
            del buf[:end + 1]
            if self._need_crlf:  # the line end that closes a chunk's data
                self._need_crlf = False
                if line:
                    raise ValueError("the upstream's chunked framing is broken "
                                     "(no CRLF after a chunk)")
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

    def _next(self, size, wait):
        """Body bytes that have arrived (receiving when there are none); b"" at the end of the body;
        None when ``wait`` is false and nothing can be had without blocking."""
        if self._failure is not None:
            raise self._failure
        while True:
            if self._buf:
                data = self._take(size)
                if data:
                    return data
            if self._complete:
                return b""
            try:
                data = self._sock.recv(UPSTREAM_RECV_BYTES)
            except _WOULD_BLOCK:
                if wait:
                    raise
                return None
            self._last_read = len(data)
            if data:
                self._buf += data
                if wait and self._abort is not None:  # (a stream's pulls: the hub times those)
                    self._abort.last_progress = time.monotonic()
            elif self._left is None and not self._chunked:
                self._complete = True  # the body ran until the server closed
            else:
                raise UpstreamCutShort("the upstream closed the connection mid-answer")

    def read1(self, size=65536):
        """Every body byte that has arrived (up to ``size``), waiting only when there is none;
        b"" at the end (the connection then goes back to its pool)."""
        data = self._next(size, True)
        if not data:
            self.close()
        return data

    @property
    def socket(self):
        """The connection's socket, for the StreamHub's selector (it reads it non-blocking)."""
        return self._sock

    def pull(self):
        """(body bytes, finished) without blocking, for a socket in non-blocking mode: what has
        arrived, and whether the body is complete. Raises on a cut or broken answer. It stops once
        the socket's buffers are likely empty (TLS: nothing pending; plain: a short read) instead of
        asking until the socket says so: the selector reports whatever comes later."""
        parts = []
        while True:
            try:
                data = self._next(1 << 20, False)
            except Exception as exc:
                if not parts:
                    raise
                # The bytes that came before the failure go first; the failure is raised by the
                # next pull. No traceback: it would hold this frame (and the body) alive.
                self._failure = exc.with_traceback(None)
                return b"".join(parts), False
            if not data:
                return b"".join(parts), data is not None
            parts.append(data)
            if not self._buf and self._drained():
                return b"".join(parts), self._complete

    def _drained(self):
        # TLS knows what it holds decrypted; a plain socket's short read means it had no more
        pending = getattr(self._sock, "pending", None)
        return pending() == 0 if pending is not None else self._last_read < UPSTREAM_RECV_BYTES

    def read_all(self, limit, deadline=None):
        """The whole body (at most ``limit`` bytes; beyond that the connection is dropped); with a
        ``deadline`` (time.monotonic) the whole read must end by then. An answer cut short raises
        instead of returning part of it."""
        try:
            if self.length is not None and self.length > limit:
                self.close(reuse=False)
                raise UpstreamUnreachable("upstream answer of %d bytes is larger than %d"
                                          % (self.length, limit), kind="too_large")
            parts = []
            total = 0
            while True:
                if deadline is not None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise socket.timeout("deadline")
                    self._sock.settimeout(remaining)
                data = self.read1(1 << 20)
                if not data:
                    return b"".join(parts)
                total += len(data)
                if total > limit:
                    self.close(reuse=False)
                    raise UpstreamUnreachable("upstream answer larger than %d bytes" % limit,
                                              kind="too_large")
                parts.append(data)
        except (OSError, ValueError) as exc:
            self.close(reuse=False)
            if self._abort is not None and self._abort.aborted:
                raise self._abort.failure()
            raise UpstreamUnreachable("upstream connection failed mid-answer: %s"
                                      % exc.__class__.__name__,
                                      timeout=isinstance(exc, socket.timeout), kind="cut")

    def close(self, reuse=True):
        """Give the connection back if the answer was fully read and reuse is allowed, else
        close it: a connection with unread bytes, a failure or an abort behind it would hand the
        next request someone else's answer or a dead socket."""
        if self.done:
            return
        self.done = True
        if (reuse and self._release is not None and self._complete and not self.will_close
                and not self._buf and self._failure is None
                and (self._abort is None or self._abort.detach(self._sock))):
            self._release(self._conn)
        else:
            self._conn.close()


_UNSAFE_IN_TARGET = re.compile(r"[^\x21-\x7e]|%(?![0-9A-Fa-f]{2})")
_HOST_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9_.-]*[a-z0-9_])?\.?$")
Target = collections.namedtuple("Target", "origin host port path host_header")


def safe_request_target(path):
    """``path`` as a request target that cannot split or bend a request: every byte outside
    printable ASCII (CR, LF, space, controls, non-ASCII as UTF-8) and any stray ``%`` is
    percent-encoded; the usual already-clean path comes back as it is."""
    try:
        return _UNSAFE_IN_TARGET.sub(
            lambda match: "".join(["%%%02X" % byte for byte in match.group().encode("utf-8")]),
            path)
    except UnicodeEncodeError:
        raise UpstreamUnreachable("not a usable URL (it contains a lone surrogate)", kind="bad_url")


def _split_url(url):
    """(scheme://authority, path and query) of a URL, split by hand: urllib.parse quietly drops
    CR, LF and tabs, and the path must reach safe_request_target as the caller gave it."""
    scheme, sep, rest = url.partition("://")
    cut = min([i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0]
              or [len(rest)])
    path = rest[cut:].split("#", 1)[0]
    return scheme + sep + rest[:cut], ("/" + path if path[:1] == "?" else path) or "/"


def parse_target(url):
    """Target(origin, host, port, path, host_header) of an http(s) URL, checked: a host name that
    is a name or an IP literal (IDNA for non-ASCII names), a numeric port, the path made safe."""
    base, path = _split_url(url)
    try:
        parts = urllib.parse.urlsplit(base)
        port = parts.port
    except ValueError:
        parts = None
    if (parts is None or parts.scheme not in ("http", "https") or not parts.hostname
            or "@" in base or not base.isprintable() or " " in base):
        raise UpstreamUnreachable("not a usable http(s) URL", kind="bad_url")
    host = parts.hostname
    if ":" in host:
        try:
            socket.inet_pton(socket.AF_INET6, host)
        except (OSError, ValueError):
            raise UpstreamUnreachable("not a usable http(s) URL (bad IPv6 address)", kind="bad_url")
    else:
        try:
            host = host if host.isascii() else host.encode("idna").decode("ascii")
        except UnicodeError:
            host = ""
        if not _HOST_NAME.match(host):
            raise UpstreamUnreachable("not a usable http(s) URL (bad host name)", kind="bad_url")
    default = 443 if parts.scheme == "https" else 80
    port = port or default
    shown = "[%s]" % host if ":" in host else host
    return Target((parts.scheme, host, port), host, port, safe_request_target(path),
                  shown if port == default else "%s:%d" % (shown, port))


def _check_header_values(headers):
    """The header block; refused if a value could break out of its line (CR, LF, any control
    character) or cannot be sent as latin-1."""
    for value in headers.values():
        if not (value.isprintable() and (value.isascii() or max(map(ord, value)) < 256)):
            raise UpstreamUnreachable("refusing to send a header value that contains a line "
                                      "break or control character", kind="bad_header")
    return "".join(["%s: %s\r\n" % item for item in headers.items()])


def _connect_tunnel(sock, host, port, proxy_auth):
    """CONNECT ``host``:``port`` through an HTTP proxy; the TLS handshake then runs inside it."""
    authority = "%s:%d" % ("[%s]" % host if ":" in host else host, port)
    head = "CONNECT %s HTTP/1.1\r\nHost: %s\r\n" % (authority, authority)
    if proxy_auth:
        head += "Proxy-Authorization: %s\r\n" % proxy_auth
    sock.sendall((head + "\r\n").encode("latin-1"))
    answer = b""
    while b"\r\n\r\n" not in answer and b"\n\n" not in answer:
        data = sock.recv(4096)  # the proxy says nothing after its head until we speak TLS
        if not data:
            # a reset, so retried once like a stale connection (hung_up_before_answer)
            raise ConnectionResetError("Tunnel connection failed: the proxy closed the connection")
        if len(answer) > MAX_HEADER_BYTES:
            raise OSError("Tunnel connection failed: the proxy sent an oversized answer")
        answer += data
    status_line = answer.split(b"\n", 1)[0].decode("latin-1").strip()
    parts = status_line.split(None, 2)
    if len(parts) < 2 or parts[1] != "200":
        raise OSError("Tunnel connection failed: %s" % (" ".join(parts[1:]) or status_line))


def _send_request(conn, method, target, head_block, body):
    """One request on ``conn`` as one pre-formatted block (and the body in the same segment when
    small: the usual request is one TCP segment)."""
    head = "%s %s HTTP/1.1\r\n%s" % (method, target, head_block)
    if conn.proxy_auth:
        head += "Proxy-Authorization: %s\r\n" % conn.proxy_auth
    if body is not None:
        head += "Content-Length: %d\r\n" % len(body)
    data = (head + "\r\n").encode("latin-1")
    if body is not None and len(body) <= 65536:
        conn.sock.sendall(data + body)
    else:
        conn.sock.sendall(data)
        if body:
            conn.sock.sendall(body)


class UpstreamClient:
    """Blocking HTTP/1.1 client for GitHub and Copilot, with a kept-alive pool per origin (see
    §6). Safe to share between threads: the pool, the known origins and the TLS sessions are
    guarded by one lock, held for bookkeeping, never across a network read or write."""

    def __init__(self, ca_file=None, connect_timeout=DEFAULT_UPSTREAM_CONNECT_TIMEOUT_SECONDS,
                 read_timeout=DEFAULT_UPSTREAM_READ_TIMEOUT_SECONDS, environ=None):
        """``environ`` is read for the proxy variables (a copy: later changes do not count). A
        proxy URL that cannot be used is a ConfigError here, at start, not on every request."""
        self.ca_file = ca_file
        self._ssl_context = None
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.environ = dict(os.environ if environ is None else environ)
        for name in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
            if self.environ.get(name):
                parse_proxy(self.environ[name])
        self._pools = {}
        self._idle = 0
        self._tls_sessions = {}  # origin -> the last TLS session, for resumption
        self._lock = threading.Lock()
        self._reaper_wake = threading.Condition(self._lock)
        self._reaper = None
        self._closed = False
        #: connections opened since start (the benchmark checks keep-alive with it)
        self.connections_opened = 0

    @property
    def ssl_context(self):
        """Built on first HTTPS use: loading the trust store costs ~2 MB and tens of
        milliseconds."""
        with self._lock:
            if self._ssl_context is None:
                context = ssl.create_default_context()
                if self.ca_file:
                    try:
                        context.load_verify_locations(cafile=self.ca_file)
                    except (OSError, ssl.SSLError) as exc:
                        raise UpstreamUnreachable("--ca-file %s is not a usable PEM bundle: %s"
                                                  % (self.ca_file, exc), kind="tls")
                self._ssl_context = context
            return self._ssl_context

    def _dial(self, target, proxy):
        """A TCP connection to the origin, or to its proxy."""
        sock = socket.create_connection(proxy[:2] if proxy else target.origin[1:],
                                        timeout=self.connect_timeout)
        # a request goes out in one or two sendall calls: Nagle's algorithm would only delay
        # the second one
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def _secure(self, sock, target, proxy):
        """The dialled socket made ready for requests: the CONNECT tunnel and TLS handshake for
        HTTPS (closed on failure)."""
        scheme, host, port = target.origin
        try:
            if scheme == "https":
                if proxy:
                    _connect_tunnel(sock, host, port, proxy[2])
                # Resuming the last TLS session of this origin skips the certificate checks on
                # both sides: most of a handshake's cost when many streams open at once.
                sock = self.ssl_context.wrap_socket(sock, server_hostname=host,
                                                    session=self._tls_sessions.get(target.origin))
            sock.settimeout(self.read_timeout)
        except BaseException:
            sock.close()
            self._tls_sessions.pop(target.origin, None)  # a retry starts with a full handshake
            raise
        with self._lock:
            self.connections_opened += 1
        return UpstreamConnection(sock, proxy if scheme == "http" else None)

    def _acquire(self, origin):
        """The most recently pooled connection to ``origin`` (LIFO: the warmest one, and the
        idle ones at the bottom age out), or None; one idle too long is closed on the way."""
        with self._lock:
            pool = self._pools.get(origin)
            while pool:
                conn, since = pool.pop()
                self._idle -= 1
                if time.monotonic() - since < IDLE_UPSTREAM_SECONDS:
                    return conn
                conn.close()
        return None

    def release(self, origin, conn):
        """Take back a connection whose answer was read to the end (from any thread)."""
        if conn.sock.fileno() < 0:
            return  # closed (its timeout is set by the next request that takes it from the pool)
        if conn.fresh:  # a new connection's TLS session, kept for the next handshake to resume
            conn.fresh = False
            # Read only after a full handshake: a resumed one leaves the session we hold good. The
            # getter costs ~0.2 ms and leaks a copy of the session (~6 KB) on CPython 3.10-3.12
            # and 3.13.0 (gh-116810, fixed in later 3.12/3.13 releases): read on every new
            # connection, that was the soak's 3 MB a minute; now it is once per ticket lifetime.
            if not getattr(conn.sock, "session_reused", True):  # (plain HTTP has no session)
                session = conn.sock.session  # TLS 1.3 sends its ticket after the handshake
                if session is not None:
                    self._tls_sessions[origin] = session
        with self._lock:
            if not self._closed and self._idle < IDLE_UPSTREAM_TOTAL:
                pool = self._pools.setdefault(origin, [])
                if len(pool) < IDLE_UPSTREAM_CONNECTIONS:
                    pool.append((conn, time.monotonic()))
                    self._idle += 1
                    if self._reaper is None:
                        self._reaper = threading.Thread(target=self._reap, daemon=True,
                                                        name="coproxy-pool-reaper")
                        self._reaper.start()
                    return
        conn.close()

    def _reap(self):
        """Close pooled connections idle for IDLE_UPSTREAM_SECONDS; leave when nothing is pooled."""
        with self._lock:
            while self._idle and not self._closed:
                self._reaper_wake.wait(IDLE_UPSTREAM_SECONDS / 3)
                now = time.monotonic()
                for origin, pool in list(self._pools.items()):
                    expired = [conn for conn, since in pool
                               if now - since >= IDLE_UPSTREAM_SECONDS]
                    if expired:
                        pool[:] = [(conn, since) for conn, since in pool
                                   if now - since < IDLE_UPSTREAM_SECONDS]
                        self._idle -= len(expired)
                        for conn in expired:
                            conn.close()
                    if not pool:
                        del self._pools[origin]
            self._reaper = None

    def idle_connections(self):
        with self._lock:
            return self._idle

    def close(self):
        with self._lock:
            pools, self._pools, self._idle = self._pools, {}, 0
            self._closed = True
            self._reaper_wake.notify_all()
        for pool in pools.values():
            for conn, _ in pool:
                conn.close()

    def request(self, method, url, headers, body=None, abort_handle=None):
        """Send one request and return once status and headers are in (body unread).

        Raises UpstreamUnreachable for network/TLS/proxy failures (never for HTTP statuses).
        A connection that fails before any byte of the answer is tried once more on a new one
        (Copilot saw nothing, or nothing it answered): a pooled connection the server had closed
        or reset, a TLS handshake or a proxy tunnel the other side hung up on."""
        target = parse_target(url)
        head_block = "Host: %s\r\n%s" % (target.host_header, _check_header_values(headers))
        if "Accept-Encoding" not in headers:  # bodies are relayed as they come: no gzip, please
            head_block += "Accept-Encoding: identity\r\n"
        # (absolute form for a plain-HTTP proxy, origin form otherwise)
        request_target = ("%s://%s%s" % (target.origin[0], target.host_header, target.path),
                          target.path)
        release = functools.partial(self.release, target.origin)

        def attempt(first):
            """One try; ``stage`` records how far it got, because only a failure while on a
            pooled connection or in the handshake/tunnel, before any answer byte, is safe to
            retry (see retry_once)."""
            conn = self._acquire(target.origin) if first else None  # a retry: a new connection
            stage = "pooled" if conn is not None else "dial"
            try:
                if conn is None:
                    proxy = proxy_for(url, self.environ)
                    sock = self._dial(target, proxy)
                    stage = "handshake"
                    conn = self._secure(sock, target, proxy)
                    stage = "fresh"
                if abort_handle is not None:
                    abort_handle.attach(conn.sock)
                    if abort_handle.aborted:
                        conn.close()
                        raise abort_handle.failure()
                # A call its caller times out blocks without a timeout: with one, each TLS write
                # polls first and each read that waits is read, poll, read again (three system
                # calls, each a hand-off of the GIL, instead of one). Only a change of mode costs
                # a system call (settimeout), so the mode is left as the last request set it.
                timeout = None if abort_handle is not None and abort_handle.times_out else (
                    self.read_timeout)
                if conn.sock.gettimeout() != timeout:
                    conn.sock.settimeout(timeout)
                conn.answered = False  # (a pooled one: from its previous request)
                _send_request(conn, method, request_target[0 if conn.absolute_form else 1],
                              head_block, body)
                if abort_handle is not None:  # the silence is the wait for the answer, counted
                    abort_handle.last_progress = time.monotonic()  # from the request's last byte
                return UpstreamResponse(conn, method, release, abort_handle)
            except (OSError, ValueError) as exc:
                if conn is not None:
                    conn.close()
                if abort_handle is not None and abort_handle.aborted:
                    raise abort_handle.failure()
                answered = conn is not None and conn.answered
                if (first and stage in ("pooled", "handshake") and not answered
                        and hung_up_before_answer(exc)):
                    raise RetryOnce("%s upstream connection failed before any answer (%s)"
                                    % ("a pooled" if stage == "pooled" else "a new",
                                       exc.__class__.__name__))
                raise network_error(exc, url)
        return retry_once(attempt)

    def request_json(self, method, url, headers, payload=None, limit=MAX_UPSTREAM_JSON_BYTES,
                     abort_handle=None):
        """(status, parsed JSON or None, raw bytes, response) for a small JSON exchange; a
        ``payload`` is sent as JSON, with its Content-Type."""
        body = None
        if payload is not None:
            body, headers = json_dumps(payload), dict(headers,
                                                      **{"Content-Type": "application/json"})
        response = self.request(method, url, headers, body, abort_handle)
        raw = response.read_all(limit)
        try:
            parsed = json.loads(raw) if raw else None
        except ValueError:
            parsed = None
        return response.status, parsed, raw, response


# -- Images given by URL: fetched from public addresses only ----------------------------------

#: Address blocks that are not the public internet (IANA special-purpose registries): a URL in a
#: request must not make coproxy reach the user's own machine, LAN, cloud metadata or routers.
_NON_PUBLIC_NETWORKS = (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
    "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24", "192.168.0.0/16", "198.18.0.0/15",
    "198.51.100.0/24", "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4",
    "::/128", "::1/128", "64:ff9b:1::/48", "100::/64", "2001::/23", "2001:db8::/32", "3fff::/20",
    "fc00::/7", "fe80::/10", "fec0::/10", "ff00::/8")
#: IPv6 forms that carry an IPv4 address (mapped, SIIT-translated, compatible, NAT64, 6to4):
#: judged by that address.
_EMBEDDED_IPV4 = (("::ffff:0:0/96", 0), ("::ffff:0:0:0/96", 0), ("::/96", 0), ("64:ff9b::/96", 0),
                  ("2002::/16", 80))


@functools.lru_cache(maxsize=1)
def _special_networks():
    import ipaddress  # only for image fetching
    return ([ipaddress.ip_network(n) for n in _NON_PUBLIC_NETWORKS],
            [(ipaddress.ip_network(n), shift) for n, shift in _EMBEDDED_IPV4])


def address_is_public(text):
    """True when the IP address ``text`` is on the public internet (IPv4-in-IPv6 forms judged by
    the IPv4 address inside)."""
    import ipaddress
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return False
    non_public, embedding = _special_networks()
    if address.version == 6:
        for network, shift in embedding:
            if address in network:
                return address_is_public(
                    str(ipaddress.IPv4Address((int(address) >> shift) & 0xFFFFFFFF)))
    return not any(address in network for network in non_public
                   if network.version == address.version)


class ImageNotFetched(Exception):
    """Why an image could not be had; the detail goes to the debug log, never to the client
    (telling what is at an address would make coproxy a scanner)."""


class ImageFetcher:
    """GET an image by URL for a request: fresh connections (never the pool that carries tokens),
    the address checked after resolving on every hop and then connected to directly (no second
    lookup, also through a proxy), a deadline for the whole fetch, a byte limit, image/* only."""

    def __init__(self, client, allow_private=False):
        self.client = client
        self.allow_private = allow_private

    def _addresses(self, host, port):
        """Every address ``host`` resolves to; all must be public (unless allowed otherwise),
        since _open may connect to any of them."""
        try:
            found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:
            raise ImageNotFetched("cannot resolve %s: %s" % (host, exc))
        addresses = [(family, address[0]) for family, _, _, _, address in found]
        if not self.allow_private:
            hidden = [a for _, a in addresses if not address_is_public(a)]
            if hidden:
                raise ImageNotFetched("%s resolves to a non-public address (%s)"
                                      % (host, hidden[0]))
        return addresses

    def _open(self, target, url, deadline, abort):
        """A new connection to the first address of ``target`` that answers, by the address
        itself (also through a proxy's CONNECT): resolving again could give another, unchecked
        one. Returns (connection, the address as a URL host)."""
        scheme, host, port = target.origin
        addresses = self._addresses(host, port)
        proxy = proxy_for(url, self.client.environ)
        last = None
        for family, address in addresses:
            literal = "[%s]" % address if family == socket.AF_INET6 else address
            timeout = max(0.01, min(self.client.connect_timeout, deadline - time.monotonic()))
            try:
                sock = socket.create_connection(proxy[:2] if proxy else (address, port),
                                                timeout=timeout)
            except OSError as exc:
                last = exc
                continue
            try:
                abort.attach(sock)
                if scheme == "https":
                    if proxy:
                        _connect_tunnel(sock, address, port, proxy[2])
                    sock = self.client.ssl_context.wrap_socket(sock, server_hostname=host,
                                                               do_handshake_on_connect=False)
                    # before the handshake: wrapping detached the plain socket attached above
                    abort.attach(sock)
                    sock.do_handshake()
                return UpstreamConnection(sock, proxy if scheme == "http" else None), literal
            except BaseException:
                sock.close()
                raise
        raise ImageNotFetched("cannot connect to %s: %s" % (host, last))

    def fetch(self, url, abort=None, timeout=None):
        """(media type, bytes) of the image at ``url``, or ImageNotFetched saying why (for the
        log). Redirects are followed by hand, each hop checked as the first."""
        abort = abort or AbortHandle()  # (the tests' calls: nobody cuts them off)
        deadline = time.monotonic() + (IMAGE_FETCH_SECONDS if timeout is None else timeout)
        for _ in range(MAX_IMAGE_REDIRECTS + 1):
            try:
                target = parse_target(url)
                conn, literal = self._open(target, url, deadline, abort)
            except (UpstreamUnreachable, OSError, ValueError) as exc:
                raise ImageNotFetched(str(network_error(exc, url)))
            block = ("Host: %s\r\nAccept: image/*\r\nUser-Agent: coproxy/%s\r\n"
                     "Connection: close\r\n" % (target.host_header, __version__))
            # a plain-HTTP proxy is told the checked address, not the name
            where = ("http://%s:%d%s" % (literal, target.port, target.path) if conn.absolute_form
                     else target.path)
            try:
                conn.sock.settimeout(max(0.01, deadline - time.monotonic()))
                _send_request(conn, "GET", where, block, None)
                response = UpstreamResponse(conn, "GET", None, abort)
                location = response.header("location")
                if response.status in (301, 302, 303, 307, 308) and location:
                    response.close(reuse=False)
                    url = urllib.parse.urljoin(url, location)
                    if not url.lower().startswith(("http://", "https://")):
                        raise ImageNotFetched("redirected to something that is not an http(s) URL")
                    continue
                media_type = (response.header("content-type") or "").split(";")[0].strip().lower()
                if response.status != 200 or not media_type.startswith("image/"):
                    response.close(reuse=False)
                    raise ImageNotFetched("HTTP %d, Content-Type %s"
                                          % (response.status, media_type or "missing"))
                return media_type, response.read_all(MAX_IMAGE_BYTES, deadline)
            except (UpstreamUnreachable, OSError, ValueError) as exc:
                conn.close()
                raise ImageNotFetched(str(network_error(exc, url)))
        raise ImageNotFetched("more than %d redirects" % MAX_IMAGE_REDIRECTS)

# ------------------------------------------------------------------------------------------
# 7. GitHub and Copilot auth (blocking)
#    The device flow (RFC 8628: honour ``interval``, add 5 s for good on every ``slow_down``,
#    stop on ``expired_token``/``access_denied``/the deadline); the exchange of the GitHub
#    token for a short-lived Copilot token, cached in memory and on disk and refreshed by one
#    thread while the others wait (single-flight); the API base from the token's
#    ``endpoints.api``; the account and model-list calls. Sleep and clock are injectable.
# ------------------------------------------------------------------------------------------

def github_headers(config, token=None):
    """Headers for github.com / api.github.com calls: VS Code-like identity, GitHub token."""
    headers = {
        "Accept": "application/json",
        "User-Agent": config.user_agent,
        "Editor-Version": config.editor_version,
        "Editor-Plugin-Version": config.editor_plugin_version,
        "X-GitHub-Api-Version": GITHUB_API_VERSION,
    }
    if token:
        headers["Authorization"] = "token " + token
    return headers


def copilot_headers(config, copilot_token, initiator="user", vision=False,
                    intent="conversation-panel", interaction=None, integration_id=None):
    """Headers for the Copilot API, as VS Code's Copilot Chat sends them (protocol notes §4);
    ``integration_id`` is the token record's (tokens sent directly need their own)."""
    request_id = random_uuid()
    headers = {
        "Authorization": "Bearer " + copilot_token,
        "Content-Type": "application/json",
        "Accept": "application/json",
        "Copilot-Integration-Id": integration_id or COPILOT_INTEGRATION_ID,
        "Editor-Version": config.editor_version,
        "Editor-Plugin-Version": config.editor_plugin_version,
        "User-Agent": config.user_agent,
        "OpenAI-Intent": intent,
        "X-GitHub-Api-Version": config.api_version,
        "X-Request-Id": request_id,
        "X-Initiator": initiator,
        "X-VSCode-User-Agent-Library-Version": "electron-fetch",
    }
    if interaction:
        headers["X-Interaction-Type"] = interaction
        headers["X-Agent-Task-Id"] = request_id
    if vision:
        headers["Copilot-Vision-Request"] = "true"
    return headers


def upstream_error_message(raw):
    """(message, fields) of an upstream error body: JSON ``error.message``, ``message``, or the
    text itself; never double-encoded, never a token."""
    text = raw.decode("utf-8", "replace").strip() if isinstance(raw, bytes) else str(raw or "")
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
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
    return redact(text[:2000]).strip(), fields


class DeviceFlow:
    """GitHub's OAuth device flow for the Copilot GitHub App."""

    def __init__(self, client, config, sleep=time.sleep, clock=time.monotonic):
        self.client = client
        self.config = config
        self.sleep = sleep
        self.clock = clock

    def _post(self, path, payload):
        return self.client.request_json("POST", self.config.github_url + path,
                                        github_headers(self.config), payload)

    def start(self):
        """Ask for a code: dict with device_code, user_code, verification_uri, expires_in,
        interval."""
        status, data, raw, _ = self._post("/login/device/code",
                                          {"client_id": GITHUB_CLIENT_ID, "scope": GITHUB_SCOPE})
        if status != 200 or not isinstance(data, dict) or not data.get("device_code"):
            message, _ = upstream_error_message(raw)
            raise AuthError("GitHub refused to start the device flow (HTTP %d): %s"
                            % (status, message), code="device_flow_failed")
        data.setdefault("verification_uri", self.config.github_url + "/login/device")
        data["interval"] = max(1, int(data.get("interval") or 5))
        data["expires_in"] = int(data.get("expires_in") or 900)
        return data

    def poll(self, code, on_wait=None):
        """Poll until the user approves; returns the GitHub token or raises AuthError. A few
        network failures in a row are waited out (a laptop changing networks while its user
        types the code); five end the login."""
        interval = code["interval"]
        deadline = self.clock() + code["expires_in"]
        network_failures = 0
        expired = AuthError("the device code expired before it was approved; run "
                            "`coproxy.py auth login` again", code="expired_token")
        while True:
            remaining = deadline - self.clock()
            if remaining <= 0:
                raise expired
            if on_wait:
                on_wait(remaining, interval)
            self.sleep(min(interval, max(remaining, 0.01)))
            try:
                _, data, raw, _ = self._post("/login/oauth/access_token", {
                    "client_id": GITHUB_CLIENT_ID, "device_code": code["device_code"],
                    "grant_type": "urn:ietf:params:oauth:grant-type:device_code"})
            except UpstreamUnreachable as exc:
                network_failures += 1
                if network_failures >= 5:
                    raise AuthError("lost contact with GitHub while waiting: %s" % exc,
                                    code="network")
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
                raise expired
            if error == "access_denied":
                raise AuthError("authorization was denied on GitHub (access_denied)",
                                code="access_denied")
            description = data.get("error_description") or "no access_token in the answer"
            raise AuthError("GitHub ended the device flow: %s (%s)"
                            % (error or "unknown", redact(description)),
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


# -- Token kinds, direct mode and GitHub App tokens ---------------------------------------------

#: What a GitHub token is, by its prefix (GitHub's token formats since 2021): (prefix, kind,
#: what a person reads). How each kind reaches Copilot in --auth-mode auto (protocol notes
#: §10.1-10.2): OAuth tokens of a Copilot login are exchanged; fine-grained PATs are sent
#: directly (the exchange answers 403 to them); App installation tokens go directly first, as
#: the Copilot CLI sends them, then through the exchange, as bifrost does.
TOKEN_KINDS = (("github_pat_", "fine-grained-pat", "fine-grained personal access token"),
               ("ghp_", "classic-pat", "classic personal access token"),
               ("ghs_", "app-installation", "GitHub App installation token"),
               ("gho_", "oauth", "OAuth app token"),
               ("ghu_", "oauth", "GitHub App user token"))
_UNKNOWN_TOKEN_KIND = ("", "unknown", "token of an unknown kind")
#: The integration id the Copilot CLI sends with a GitHub token sent directly (PATs work with
#: no other).
DIRECT_INTEGRATION_ID = "copilot-developer-cli"


def _token_kind_row(token):
    return next((row for row in TOKEN_KINDS if token.startswith(row[0])), _UNKNOWN_TOKEN_KIND)


def token_kind(token):
    """fine-grained-pat, classic-pat, app-installation, oauth or unknown."""
    return _token_kind_row(token)[1]


def github_token_kind(token):
    """The kind of a GitHub token as `status` and the dashboard name it (None without one):
    read from its prefix, so the token itself is never shown."""
    return _token_kind_row(token)[2] if token else None


def integration_id_for(config, mode, kind):
    """--integration-id, else vscode-chat for exchanged and OAuth tokens (Copilot answers
    model_not_available_for_integrator to others) and copilot-developer-cli for the rest."""
    if config.integration_id:
        return config.integration_id
    if mode == "exchange" or kind == "oauth":
        return COPILOT_INTEGRATION_ID
    return DIRECT_INTEGRATION_ID


def direct_api_base(config):
    """The Copilot API host for a token sent directly (there is no exchange answer to name it):
    the override, GHE.com's copilot-api.TENANT.ghe.com, GHES's enterprise host, or the default."""
    if config.copilot_api_url:
        return config.copilot_api_url
    if config.github_host.endswith(".ghe.com"):
        return "https://copilot-api." + config.github_host
    if config.is_ghe:
        return "https://api.enterprise.githubcopilot.com"
    return DEFAULT_COPILOT_API_URL


def exchanged_api_base(config, data):
    """The Copilot API host an exchange answer names: ``endpoints.api``, else the token's own
    ``proxy-ep=proxy.HOST`` field (older answers), whose API host is ``api.HOST``."""
    api = get_typed(get_typed(data, "endpoints", dict), "api", str)
    if api:
        return api.rstrip("/")
    match = re.search(r"(?:^|;)proxy-ep=([^;:]+)", data.get("token", ""))
    if match:
        host = match.group(1)
        if host.startswith("proxy."):
            host = "api." + host[len("proxy."):]
        return "https://" + host
    if config.is_ghe:
        return "https://copilot-api." + config.github_host
    return DEFAULT_COPILOT_API_URL


#: OID 1.2.840.113549.1.1.1 (rsaEncryption), DER-encoded, as PKCS#8 names an RSA key.
_RSA_ENCRYPTION_OID = bytes.fromhex("2a864886f70d010101")
#: DER DigestInfo prefix of a SHA-256 hash (RFC 8017 §9.2, note 1).
_SHA256_DIGEST_INFO = bytes.fromhex("3031300d060960864801650304020105000420")


def _der_element(data, offset):
    """(tag, contents, offset after it) of the DER element at ``offset`` (ValueError if cut)."""
    if offset + 2 > len(data):
        raise ValueError("the key's DER data is cut short")
    tag, length = data[offset], data[offset + 1]
    offset += 2
    if length & 0x80:
        count = length & 0x7F
        if not 1 <= count <= 4 or offset + count > len(data):
            raise ValueError("the key's DER data has a bad length")
        length = int.from_bytes(data[offset:offset + count], "big")
        offset += count
    if offset + length > len(data):
        raise ValueError("the key's DER data is cut short")
    return tag, data[offset:offset + length], offset + length


def _der_items(contents):
    """The (tag, contents) elements one after another in ``contents``."""
    items, offset = [], 0
    while offset < len(contents):
        tag, value, offset = _der_element(contents, offset)
        items.append((tag, value))
    return items


def _der_sequence(data):
    """The (tag, contents) elements of the DER SEQUENCE that ``data`` starts with."""
    tag, contents, _ = _der_element(data, 0)
    if tag != 0x30:
        raise ValueError("the key's DER data is not a SEQUENCE")
    return _der_items(contents)


def parse_rsa_private_key(pem):
    """(n, e, d, p, q) of an RSA private key in PEM: PKCS#1 (BEGIN RSA PRIVATE KEY, what GitHub
    hands out) or PKCS#8 (BEGIN PRIVATE KEY, what openssl pkey writes). ValueError saying what
    is wrong."""
    match = re.search(r"-----BEGIN ((?:RSA |ENCRYPTED )?)PRIVATE KEY-----(.*?)"
                      r"-----END \1PRIVATE KEY-----", pem, re.S)
    if not match:
        raise ValueError("no PEM private key in it (-----BEGIN RSA PRIVATE KEY----- or "
                         "-----BEGIN PRIVATE KEY-----)")
    if match.group(1) == "ENCRYPTED " or "Proc-Type:" in match.group(2):
        raise ValueError("the key is protected by a passphrase; write a plain copy with "
                         "`openssl pkey -in KEY -out PLAIN` and keep it private")
    try:
        der = base64.b64decode("".join(match.group(2).split()), validate=True)
    except ValueError:
        raise ValueError("the PEM key is not valid base64")
    items = _der_sequence(der)
    if not match.group(1):  # PKCS#8: version, AlgorithmIdentifier, OCTET STRING holding PKCS#1
        if len(items) < 3 or items[1][0] != 0x30 or items[2][0] != 0x04:
            raise ValueError("the PKCS#8 key is malformed")
        algorithm = _der_items(items[1][1])
        if not algorithm or algorithm[0] != (0x06, _RSA_ENCRYPTION_OID):
            raise ValueError("it is not an RSA key (GitHub App keys are RSA)")
        items = _der_sequence(items[2][1])
    if len(items) < 6 or any(tag != 0x02 for tag, _ in items[:6]):
        raise ValueError("it is not an RSA private key")
    _, n, e, d, p, q = (int.from_bytes(value, "big") for _, value in items[:6])
    if n != p * q or n.bit_length() < 1024:
        raise ValueError("the RSA key's numbers do not fit together")
    return n, e, d, p, q


def rs256_sign(key, message):
    """RSASSA-PKCS1-v1_5 with SHA-256 (RFC 8017 §8.2.1): EMSA-PKCS1-v1_5 encoding, then m^d mod n.
    Deterministic, so RFC 7515 Appendix A.2 gives its exact expected output as a test."""
    import hashlib  # here, not at the top: serve would load OpenSSL's digests before listening
    n, e, d, p, q = key
    size = (n.bit_length() + 7) // 8
    digest_info = _SHA256_DIGEST_INFO + hashlib.sha256(message).digest()
    padding = b"\xff" * (size - len(digest_info) - 3)
    encoded = int.from_bytes(b"\x00\x01" + padding + b"\x00" + digest_info, "big")
    # m^d mod n by the Chinese remainder theorem (RFC 8017 §5.1.2): two half-size pows, 3-4x faster
    part_p, part_q = pow(encoded, d % (p - 1), p), pow(encoded, d % (q - 1), q)
    signature = part_q + q * ((pow(q, -1, p) * (part_p - part_q)) % p)
    # A CRT result with one faulty half (a flipped bit) gives away p by gcd(s^e - m, n): check
    # it with the public exponent (0.1 ms) before the signature leaves the process.
    if pow(signature, e, n) != encoded:
        raise ConfigError("the GitHub App key gave an invalid signature: check the key file")
    return signature.to_bytes(size, "big")


def b64url(data):
    """base64url without padding, as JWTs spell their parts."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def app_jwt(app_id, key, now):
    """The GitHub App's JWT: iat a minute back (clock drift), exp under GitHub's 10-minute limit."""
    def part(obj):
        return b64url(json.dumps(obj, separators=(",", ":")).encode("utf-8"))
    signing_input = part({"alg": "RS256", "typ": "JWT"}) + "." + part(
        {"iat": int(now) - 60, "exp": int(now) + 540, "iss": app_id})
    return signing_input + "." + b64url(rs256_sign(key, signing_input.encode("ascii")))


def parse_github_time(text):
    """Unix time of GitHub's ``2026-12-07T12:00:00Z`` (None if it is not that)."""
    import calendar  # only here
    try:
        return calendar.timegm(time.strptime(str(text)[:19], "%Y-%m-%dT%H:%M:%S"))
    except ValueError:
        return None


#: Installation token permissions, newest form first: the organisation permission "Copilot
#: Requests" (read), then the older repository permission copilot_requests (write).
APP_PERMISSION_FORMS = (("organization_copilot_requests", "read"), ("copilot_requests", "write"))


class GitHubApp:
    """Organisation-billed installation tokens (``ghs_``) minted as a GitHub App: the App's JWT
    signed here (RS256), the installation found by organisation when asked, the token minted
    (newest permission form first) and minted again before its hour runs out, by one thread
    while the others wait. The key is read once, at start, under the state dir's file rules."""

    def __init__(self, config, client, clock=time.time):
        """Reads and parses the key at once: a key file that is not the user's own, not private
        or not an RSA key stops the start naming the file, instead of failing a request."""
        self.config = config
        self.client = client
        self.clock = clock
        self.app_id = config.github_app_id
        text = read_owner_only_file(config.github_app_key_file, "the GitHub App key file")
        try:
            self.key = parse_rsa_private_key(text)
        except ValueError as exc:
            raise ConfigError("the GitHub App key file %s is not usable: %s"
                              % (config.github_app_key_file, exc))
        self.installation_id = config.github_app_installation_id
        #: the permission form GitHub granted, e.g. "organization_copilot_requests=read"
        self.permission_form = None
        self.record = None              # {"token", "expires_at"} of the current installation token
        self.mints = 0
        self._lock = threading.Lock()

    @property
    def source(self):
        return "GitHub App %d" % self.app_id

    def token(self, force=False):
        """A valid installation token, minted when needed."""
        record = self.record
        if not force and self._fresh(record):
            return record["token"]
        with self._lock:
            record = self.record
            if force or not self._fresh(record):
                record = self.record = self._mint()
            return record["token"]

    def _fresh(self, record):
        return bool(record) and record["expires_at"] - self.clock() > TOKEN_REFRESH_MARGIN_SECONDS

    def forget(self, token):
        """Mint anew next time: Copilot refused ``token`` (a newer one is kept)."""
        with self._lock:
            if self.record and self.record["token"] == token:
                self.record = None

    def _call(self, method, path, payload=None):
        headers = dict(github_headers(self.config), Accept="application/vnd.github+json",
                       Authorization="Bearer " + app_jwt(self.app_id, self.key, self.clock()))
        try:
            return self.client.request_json(method, self.config.github_api_url + path, headers,
                                            payload)
        except UpstreamUnreachable as exc:
            raise AuthError("cannot reach GitHub to mint the App's token: %s" % exc, code="network")

    def _installation(self):
        if self.installation_id is None:
            org = self.config.github_app_org
            path = "/orgs/%s/installation" % urllib.parse.quote(org)
            status, data, raw, _ = self._call("GET", path)
            if status != 200 or get_typed(data, "id", int) is None:
                raise self._refusal(status, raw, "looking up its installation on %s" % org,
                                    lookup=True)
            self.installation_id = data["id"]
            log.info("GitHub App %d is installation %d on %s", self.app_id, self.installation_id,
                     org)
        return self.installation_id

    def _mint(self):
        """A new installation token. The newest permission form is asked for first; GitHub
        answers 422 to a form the installation was not granted, and installations made before
        the organisation permission existed hold only the older one, so 422 tries the next."""
        self.mints += 1
        path = "/app/installations/%d/access_tokens" % self._installation()
        for number, (name, level) in enumerate(APP_PERMISSION_FORMS):
            status, data, raw, _ = self._call("POST", path, {"permissions": {name: level}})
            if status in (200, 201) and get_typed(data, "token", str) is not None:
                now = self.clock()
                expires_at = parse_github_time(data.get("expires_at")) or int(now + 3600)
                self.permission_form = "%s=%s" % (name, level)
                log.info("GitHub App %d minted an installation token (%s) expires_in=%s",
                         self.app_id, self.permission_form, format_duration(expires_at - now))
                return {"token": data["token"], "expires_at": expires_at}
            if status != 422 or number == len(APP_PERMISSION_FORMS) - 1:
                raise self._refusal(status, raw, "minting an installation token")
            log.info("GitHub refused the %s=%s permission form (422); trying the older %s=%s",
                     name, level, *APP_PERMISSION_FORMS[number + 1])

    def _refusal(self, status, raw, doing, lookup=False):
        """AuthError saying which refusal this is and what to check."""
        message, _ = upstream_error_message(raw)
        what = "GitHub refused %s for GitHub App %d (HTTP %d: %s)" % (doing, self.app_id, status,
                                                                     message or "no details")
        if status == 401:
            fix = ("the App's JWT was not accepted: check that --github-app-key-file is this App's "
                   "private key, that --github-app-id %d is right, and this machine's clock (the "
                   "JWT is valid 10 minutes)" % self.app_id)
        elif status == 404 and lookup:
            fix = ("the App is not installed on %s, or --github-app-id %d is not this App"
                   % (self.config.github_app_org, self.app_id))
        elif status == 404:
            fix = ("no such App or installation: check --github-app-id %d and "
                   "--github-app-installation-id %s" % (self.app_id, self.installation_id))
        elif status == 422:
            tried = " and ".join("%s=%s" % form for form in APP_PERMISSION_FORMS)
            fix = ("installation %s was not granted the Copilot Requests permission (tried %s): "
                   "give the App the organisation permission \"Copilot Requests\" (read-only) and "
                   "have the organisation accept it" % (self.installation_id, tried))
        else:
            fix = "try again later"
        return AuthError("%s; %s" % (what, fix), code="app_token_refused")


#: Auto model (protocol notes §10.3, §10.9): Copilot picks a model for a session of ~24 h.
AUTO_MODEL_ID = "auto"
#: The version the legacy /models/session endpoint was seen with (the newer /auto wants 2026-08-01).
LEGACY_AUTO_API_VERSION = "2025-07-16"
#: An Auto session is renewed this long before it expires (VS Code renews 5 minutes early).
AUTO_SESSION_MARGIN_SECONDS = 300


def who_pays(kind, sku):
    """Who Copilot bills for a token, as far as the token says."""
    if kind == "app-installation":
        return "organisation (GitHub App installation)"
    if sku and ("business" in sku or "enterprise" in sku):
        return "organisation (the account's %s seat)" % sku
    return "user (%s)" % sku if sku else "user (the token's account)"


def _org_has_not_enabled_apps(text):
    lowered = text.lower()
    return "not enabled" in lowered and ("app" in lowered or "installation" in lowered)


def explain_refusal(error, model, facts, integration_option):
    """A Copilot refusal caused by the token, its permissions or its integration id, told with
    what to do about it; any other error as it is. ``facts``: CopilotAuth.describe();
    ``integration_option``: the --integration-id given, if any."""
    text = str(error)
    lowered = text.lower()
    integration = facts.get("integration_id") or integration_option or COPILOT_INTEGRATION_ID
    chosen = ("--integration-id" if integration_option else "chosen for %s tokens sent %s"
              % (facts.get("token_kind", "these"), facts.get("mode", "directly")))
    if error.status == 400 and "personal access tokens are not supported" in lowered:
        code = "pat_integration_refused"
        message = ("Copilot refused the fine-grained personal access token with "
                   "Copilot-Integration-Id %s (%s): such tokens work only with "
                   "copilot-developer-cli. Start coproxy with --integration-id "
                   "copilot-developer-cli, or without --integration-id (--auth-mode auto picks it "
                   "for github_pat_ tokens). Copilot said: %s" % (integration, chosen, text))
    elif "copilot requests permission" in lowered:
        code = "pat_missing_permission"
        message = ("the fine-grained personal access token lacks the \"Copilot Requests\" "
                   "permission: on GitHub open Settings > Developer settings > Personal access "
                   "tokens > Fine-grained tokens, edit the token, add Account permissions > "
                   "\"Copilot Requests\", and save. Copilot said: %s" % text)
    elif error.code == "model_not_available_for_integrator" or "for_integrator" in lowered:
        code = "model_not_available_for_integrator"
        message = ("Copilot limits the models each integration id may use, and %s is not "
                   "available to %s (the Copilot-Integration-Id in use, %s). Pick another model "
                   "from GET /v1/models, or start coproxy with another --integration-id "
                   "(vscode-chat for an OAuth login, copilot-developer-cli for a personal access "
                   "token). Copilot said: %s" % (model, integration, chosen, text))
    elif error.status == 403 and _org_has_not_enabled_apps(text):
        code = "app_copilot_requests_disabled"
        message = ("the organisation has not enabled \"Copilot requests from GitHub App "
                   "installations\": an organisation owner turns it on in the organisation's "
                   "Copilot policies. The token was minted with the %s permission form. Copilot "
                   "said: %s" % (facts.get("app_permission", "(unknown)"), text))
    else:
        return error
    return ClientError(error.status, message, kind=error.kind, code=code, param=error.param,
                       headers=error.headers)


def exchange_error(status, data, raw, kind, source, login, direct_refusal=None):
    """AuthError for a refused token exchange: the cause and the fix. ``kind``: the GitHub
    token's kind; ``source``: where it came from; ``login``: the `auth login` command;
    ``direct_refusal``: what Copilot said to the same App token sent directly, if it was (both
    ways failed then, and the user must hear of both)."""
    error = _exchange_refusal(status, data, raw, kind, source, login)
    if kind != "app-installation" or not direct_refusal:
        return error
    hint = (" The organisation has not enabled \"Copilot requests from GitHub App "
            "installations\": an owner turns it on in the organisation's Copilot policies."
            if _org_has_not_enabled_apps(direct_refusal) else "")
    return AuthError("Copilot refused the App installation token sent directly (%s), and the "
                     "token exchange refused it too: %s.%s" % (direct_refusal, error, hint),
                     code=error.code)


def _exchange_refusal(status, data, raw, kind, source, login):
    """The refusal told by what is most specific: a 401 (the token itself), a kind of token
    the exchange never takes, GitHub's notification id, then the status alone."""
    message, _ = upstream_error_message(raw)
    details = data.get("error_details") if isinstance(data, dict) else None
    notification = details.get("notification_id") if isinstance(details, dict) else None
    if status == 401:
        if source == "GHCP_GITHUB_TOKEN":  # a new login cannot win over the variable
            fix = "unset GHCP_GITHUB_TOKEN (or put a valid token in it), then run `%s`" % login
        elif source == "--github-token":
            fix = "pass a valid token, or drop --github-token and run `%s`" % login
        else:
            fix = "run `%s` again" % login
        return AuthError("GitHub rejected the GitHub token from %s (401: it is invalid, expired or "
                         "revoked); %s" % (source, fix), code="github_token_invalid")
    if kind == "fine-grained-pat":
        return AuthError("GitHub's token exchange refuses fine-grained personal access tokens "
                         "(HTTP %d: %s); send the token directly with --auth-mode direct "
                         "(--auth-mode auto, the default, already does for github_pat_ tokens)"
                         % (status, message or "no details"), code="personal_access_token")
    if kind == "classic-pat":
        return AuthError("the token from %s is a classic personal access token; GitHub only "
                         "exchanges tokens from a Copilot login for Copilot tokens. Run `%s` "
                         "instead (HTTP %d)" % (source, login, status),
                         code="personal_access_token")
    if notification:
        hint = _EXCHANGE_HINTS.get(notification, "GitHub refused Copilot access")
        url = details.get("url") if isinstance(details, dict) else None
        return AuthError("%s (%s, HTTP %d)%s" % (hint, notification, status,
                                                   "; see " + url if isinstance(url, str) else ""),
                         code=notification)
    if status == 404:
        return AuthError("GitHub has no Copilot token for this account (404): the account has no "
                         "Copilot seat, or the token in %s does not come from a Copilot login "
                         "(gho_ tokens of other OAuth apps are refused); run `%s`"
                         % (source, login), code="no_copilot_access")
    if status == 403 and "rate limit" in message.lower():
        return AuthError("GitHub API rate limit hit while getting a Copilot token: %s" % message,
                         code="rate_limited")
    return AuthError("GitHub refused a Copilot token (HTTP %d): %s"
                     % (status, message or "no details"), code="copilot_token_refused")


#: The GitHub token sources ahead of the saved login, in the order they win (Config allows one
#: of the first three; COPILOT_GITHUB_TOKEN may come with any), one row each: the Config
#: attribute that sets it, how the notes of `auth login` and `auth logout` name it, and
#: (token, where it came from) as CopilotAuth.github_token gets them (the App's may be minted).
TOKEN_SOURCES = (
    ("github_token", lambda config: config.source_of("github_token"),
     lambda auth: (auth.config.github_token, auth.config.source_of("github_token"))),
    ("github_token_file", lambda config: "--github-token-file %s" % config.github_token_file,
     lambda auth: (auth.token_file.value(), auth.config.github_token_file)),
    ("github_app_id", lambda config: "--github-app-id %d" % config.github_app_id,
     lambda auth: (auth.app.token(), auth.app.source)),
    ("copilot_cli_token", lambda config: "COPILOT_GITHUB_TOKEN",
     lambda auth: (auth.config.copilot_cli_token, "COPILOT_GITHUB_TOKEN")))


def token_source_before_login(config):
    """What gives the GitHub token ahead of a saved login (a flag, a variable, a token file, a
    GitHub App), for the notes of `auth login` and `auth logout`; None when nothing does."""
    return next((name(config) for dest, name, _ in TOKEN_SOURCES if getattr(config, dest)), None)


class CopilotAuth:
    """The GitHub token (from a flag or variable, a token file, a GitHub App, or the saved login),
    the way it reaches Copilot (exchanged for a Copilot token, or sent directly), the Auto
    model's session, and the calls that need them."""

    def __init__(self, config, store, client, clock=time.time):
        """Nothing goes over the network here: tokens are found, exchanged or minted on first
        use, so `status` and a server started before the login work (the App's key file is
        read, to fail early)."""
        self.config = config
        self.store = store
        self.client = client
        self.clock = clock
        self.record = None           # the token record in use: exchanged, or for a direct token
        self._disk_checked = False
        self._refresh_lock = threading.Lock()
        #: token exchanges performed, and how many failed (tests and /metrics read them)
        self.exchanges = 0
        self.exchange_failures = 0
        self.app = GitHubApp(config, client, clock) if config.github_app_id else None
        self.token_file = (WatchedFile(config.github_token_file, self._read_token_file)
                           if config.github_token_file else None)
        #: how App installation tokens reach Copilot once one call showed it ("direct"/"exchange")
        self.app_token_path = None
        self._direct_refusal = None  # what Copilot said when it refused an App token sent directly
        self.auto = AutoModel(self)

    # -- the GitHub token --------------------------------------------------------------------
    def github_token(self):
        """(token, where it came from) or (None, None). In this order: --github-token or
        GHCP_GITHUB_TOKEN, --github-token-file, the GitHub App, COPILOT_GITHUB_TOKEN (the Copilot
        CLI's variable), the saved login. Never GITHUB_TOKEN: in CI that is a repository token
        without Copilot (TOKEN_SOURCES). The App's token may be minted here (network)."""
        found = next((get for dest, _, get in TOKEN_SOURCES if getattr(self.config, dest)), None)
        if found:
            return found(self)
        token = self.store.load_github_token()
        return (token, self.store.github_token_path) if token else (None, None)

    def has_credentials(self):
        """Whether a GitHub token can be had without a login, without minting one (no network)."""
        return bool(token_source_before_login(self.config) or self.store.load_github_token())

    def _read_token_file(self):
        try:
            text = read_owner_only_file(self.config.github_token_file, "the token file")
            return text.strip() or None
        except ConfigError as exc:
            raise AuthError(str(exc), code="token_file_unusable")

    def login_command(self):
        """The `auth login` command for this state dir, as the user would type it."""
        return "python3 coproxy.py auth login" + self.config.state_dir_option

    def require_github_token(self):
        token, source = self.github_token()
        if token:
            return token
        if self.token_file is not None:
            raise AuthError("the token file %s is missing or empty (--github-token-file)" % source,
                            code="not_logged_in")
        raise AuthError("not logged in to GitHub: run `%s` (or set GHCP_GITHUB_TOKEN)"
                        % self.login_command(), code="not_logged_in")

    # -- how the token reaches Copilot ---------------------------------------------------------
    def mode_for(self, token):
        """"exchange" or "direct" for this token: --auth-mode, or in auto by the token's kind."""
        if self.config.auth_mode != "auto":
            return self.config.auth_mode
        kind = token_kind(token)
        if kind == "classic-pat":
            raise AuthError("the token from %s is a classic personal access token (ghp_), which "
                            "Copilot does not accept; run `%s`, or use a fine-grained token "
                            "(github_pat_) with the \"Copilot Requests\" permission"
                            % (self.github_token()[1], self.login_command()),
                            code="personal_access_token")
        if kind == "fine-grained-pat":
            return "direct"  # the exchange answers 403 to PATs
        if kind == "app-installation":
            return self.app_token_path or "direct"
        return "exchange"

    # -- the Copilot token -------------------------------------------------------------------
    @staticmethod
    def _fingerprint(github_token):
        """Short SHA-256 of the GitHub token, kept with the Copilot token to tell whose it is."""
        import hashlib  # here, not at the top: serve would load OpenSSL's digests first
        return hashlib.sha256(github_token.encode("utf-8")).hexdigest()[:16]

    def _usable(self, record, github_token):
        if not record or record.get("mode") == "direct":
            return False
        owner = record.get("github_token_sha256")
        if owner and owner != self._fingerprint(github_token):
            return False
        now = self.clock()
        refresh_at = get_typed(record, "refresh_at", (int, float), float("inf"))
        return record["expires_at"] - now >= TOKEN_REFRESH_MARGIN_SECONDS and now < refresh_at

    def copilot_token(self, force=False):
        """The token record to call Copilot with: ``token`` (the Authorization bearer), ``mode``,
        ``kind``, ``integration_id``, ``expires_at``, ``api_endpoint``. An exchanged token is
        exchanged again when needed (one thread at a time); a direct one is the GitHub token."""
        if force and self.app is not None:
            self.app.token(force=True)
        github_token = self.require_github_token()
        if self.mode_for(github_token) == "direct":
            record = self.record
            if (force or not record or record.get("mode") != "direct"
                    or record["token"] != github_token):
                record = self.record = self._direct_record(github_token)
            return record
        record = self.record
        if not force and self._usable(record, github_token):
            return record
        with self._refresh_lock:
            record = self.record
            if not force and self._usable(record, github_token):
                return record  # another thread refreshed while we waited
            if not force and not self._disk_checked:
                self._disk_checked = True
                disk = self.store.load_copilot_token()
                if self._usable(disk, github_token):
                    self.record = disk
                    return disk
            record = self.record = self._exchange(github_token)
            try:
                self.store.save_copilot_token(record)
            except (OSError, ConfigError) as exc:
                log.warning("could not save the Copilot token to %s: %s",
                            self.store.copilot_token_path, exc)
            return record

    def _direct_record(self, github_token):
        """A record for a GitHub token sent as it is. Its expiry is the App token's, else unknown
        (a day ahead, marked as a guess: Copilot's 401 says when it ends)."""
        kind = token_kind(github_token)
        minted = self.app.record if self.app is not None else None
        app_token = bool(minted) and minted["token"] == github_token
        expires_at = minted["expires_at"] if app_token else int(self.clock()) + 86400
        return {"token": github_token, "mode": "direct", "kind": kind, "expires_at": expires_at,
                "expiry_known": app_token, "api_endpoint": direct_api_base(self.config),
                "integration_id": integration_id_for(self.config, "direct", kind)}

    def invalidate(self, token):
        """Forget ``token`` after Copilot answered 401 to it (a newer one is kept)."""
        with self._refresh_lock:
            if self.record is not None and self.record.get("token") == token:
                self.record = None
                self._disk_checked = True
        if self.app is not None:
            self.app.forget(token)

    def retry_after_refusal(self, record, status, raw):
        """Copilot refused ``record`` with 401/403: True when a second try with a new record can
        work. An App token sent directly and refused goes through the exchange from then on (both
        ways exist in the wild); a 401 means the token expired, so a fresh one is fetched."""
        if (record.get("kind") == "app-installation" and record.get("mode") == "direct"
                and self.config.auth_mode == "auto" and self.app_token_path is None):
            message, _ = upstream_error_message(raw)
            self._direct_refusal = "HTTP %d: %s" % (status, message or "no details")
            self.app_token_path = "exchange"
            log.warning("Copilot refused the App installation token sent directly (%s); using "
                        "the token exchange for App tokens from now on", self._direct_refusal)
            with self._refresh_lock:
                self.record = None
            return True
        if status == 401:
            self.invalidate(record["token"])
            return True
        return False

    def worked(self, record):
        """Copilot accepted ``record``: an App token's way in is settled."""
        if self.app_token_path is None and record.get("kind") == "app-installation":
            self.app_token_path = record.get("mode")

    def _exchange(self, github_token):
        """Trade the GitHub token for a Copilot token record. Besides Copilot's answer, the
        record keeps when to refresh (``refresh_in``), the API base, and a fingerprint of the
        GitHub token: a record cached on disk is never used with another account's token. A
        refusal is an AuthError that names the cause and the fix (exchange_error)."""
        self.exchanges += 1
        try:
            status, data, raw, _ = self.client.request_json(
                "GET", self.config.github_api_url + "/copilot_internal/v2/token",
                github_headers(self.config, github_token))
        except UpstreamUnreachable as exc:
            self.exchange_failures += 1
            raise AuthError("cannot get a Copilot token: %s" % exc, code="network")
        if status == 200 and get_typed(data, "token", str) is not None:
            now = self.clock()
            # Without an expiry, 25 minutes: the usual refresh_in of a token that lives 30.
            expires_at = get_typed(data, "expires_at", (int, float), now + 1500)
            kind = token_kind(github_token)
            record = dict(data, expires_at=int(expires_at), mode="exchange", kind=kind,
                          api_endpoint=exchanged_api_base(self.config, data),
                          github_token_sha256=self._fingerprint(github_token),
                          integration_id=integration_id_for(self.config, "exchange", kind))
            refresh_in = get_typed(data, "refresh_in", (int, float), 0)
            if refresh_in > 0:
                record["refresh_at"] = int(now + refresh_in)
            log.info("copilot token obtained sku=%s expires_in=%s", data.get("sku", "?"),
                     format_duration(record["expires_at"] - now))
            return record
        self.exchange_failures += 1
        raise exchange_error(status, data, raw, token_kind(github_token),
                             self.github_token()[1] or "the saved login", self.login_command(),
                             self._direct_refusal)

    def api_base(self, record):
        """Base URL of the Copilot API: the override, else what the token ``record`` says."""
        if self.config.copilot_api_url:
            return self.config.copilot_api_url
        return (record.get("api_endpoint") or exchanged_api_base(self.config, record)).rstrip("/")

    # -- what to tell the user ---------------------------------------------------------------
    def describe(self, record=None):
        """What /healthz, `status` and `auth status` show about the token record in use (or
        ``record``): token kind, mode, integration id, who pays and the expiry (None when
        unknown); never a token. {} before the first record."""
        record = record or self.record
        if not record:
            return {}
        kind = record.get("kind") or "oauth"
        expires = record["expires_at"] if record.get("expiry_known", True) else None
        facts = {"token_kind": kind, "mode": record.get("mode", "exchange"),
                 "integration_id": record.get("integration_id") or COPILOT_INTEGRATION_ID,
                 "payer": who_pays(kind, record.get("sku")), "expires_at": expires}
        if self.app is not None and self.app.permission_form:
            facts["app_permission"] = self.app.permission_form
        return facts

    # -- calls that need the tokens ----------------------------------------------------------
    def github_json(self, path):
        """GET a GitHub REST path with the GitHub token: ``/user`` (the account's ``login``) or
        ``/copilot_internal/user`` (plan, quotas and endpoints of the Copilot account)."""
        token = self.require_github_token()
        try:
            status, data, raw, _ = self.client.request_json(
                "GET", self.config.github_api_url + path, github_headers(self.config, token))
        except UpstreamUnreachable as exc:
            raise AuthError(str(exc), code="network")
        if status != 200 or not isinstance(data, dict):
            message, _ = upstream_error_message(raw)
            raise AuthError("GitHub %s answered HTTP %d: %s" % (path, status, message))
        return data

    def copilot_json(self, method, path, payload=None, headers=None):
        """(status, data, raw) of a small Copilot API call, with one new token after a refusal
        that a new token can fix (see retry_after_refusal)."""
        def attempt(first):
            record = self.copilot_token()
            sent = copilot_headers(self.config, record["token"], intent="model-access",
                                   integration_id=record.get("integration_id"))
            sent.update(headers or {})
            status, data, raw, _ = self.client.request_json(method, self.api_base(record) + path,
                                                            sent, payload)
            if status in (401, 403) and first and self.retry_after_refusal(record, status, raw):
                raise RetryOnce("Copilot %s answered %d; trying a new token" % (path, status))
            if 200 <= status < 300:
                self.worked(record)
            return status, data, raw
        return retry_once(attempt)

    def fetch_models(self):
        """Copilot's /models list (deduplicated), with one token refresh if Copilot says 401."""
        status, data, raw = self.copilot_json("GET", "/models")
        if status != 200 or get_typed(data, "data", list) is None:
            message, _ = upstream_error_message(raw)
            error = explain_refusal(ClientError(status, message or "no details"), "the model list",
                                    self.describe(), self.config.integration_id)
            raise UpstreamUnreachable("Copilot /models answered HTTP %d: %s" % (status, error),
                                      kind="http_%d" % status)
        # The first entry of an id wins: the catalogue and /v1/models list each id once.
        models = {}
        for model in data["data"]:
            if get_typed(model, "id", str) is not None:
                models.setdefault(model["id"], model)
        return list(models.values())


def peek_github_token(auth):
    """(kind, where it came from) of the token ``auth.github_token()`` would use, without minting
    an App token (no network, no wait on a mint: the dashboard asks from the event loop)."""
    if auth.app is not None:  # the App is the only explicit source then (Config checks it)
        return github_token_kind("ghs_"), auth.app.source
    token, source = auth.github_token()
    return github_token_kind(token), source


class AutoModel:
    """The Auto model's session: the model Copilot picked and the session token to send with it
    (``POST /auto``, or the older ``/models/session`` once /auto is refused), kept until shortly
    before it expires and renewed by one thread while the others wait."""

    def __init__(self, auth):
        self.auth = auth
        self.clock = auth.clock
        self.current = None
        self._lock = threading.Lock()
        self.legacy = False   # /auto refused: the older /models/session is used
        self.sessions = 0

    def fresh(self):
        """The Auto session when it needs no renewal, else None (asked on the event loop: no
        I/O)."""
        session = self.current
        if session and session["expires_at"] - self.clock() > AUTO_SESSION_MARGIN_SECONDS:
            return session
        return None

    def session(self):
        """{"model", "entry", "token", "expires_at"}: ``entry`` is the picked model's catalogue
        entry when Copilot sent it (the current endpoint does, the legacy one names only the id)."""
        session = self.fresh()
        if session:
            return session
        with self._lock:
            session = self.fresh()
            if not session:
                session = self.current = self._new_session(self.current)
            return session

    def _new_session(self, old):
        """A new Auto session (renewing ``old``: its token is sent, as VS Code does). POST /auto
        first; a Copilot that does not know it (400, 404, 405, 410) is asked at the older
        /models/session from then on."""
        headers = {"Copilot-Session-Token": old["token"]} if old else {}
        if not self.legacy:
            status, data, raw = self.auth.copilot_json("POST", "/auto", {"prompt": ""},
                                                       headers=headers)
            if status not in (400, 404, 405, 410):
                return self._session_from("/auto", status, data, raw)
            message, _ = upstream_error_message(raw)
            log.info("Copilot refused POST /auto (HTTP %d: %s); using the older /models/session",
                     status, message)
            self.legacy = True
        headers["X-GitHub-Api-Version"] = LEGACY_AUTO_API_VERSION
        status, data, raw = self.auth.copilot_json(
            "POST", "/models/session", {"auto_mode": {"model_hints": ["auto"]}}, headers=headers)
        return self._session_from("/models/session", status, data, raw)

    def _session_from(self, path, status, data, raw):
        """The session of an /auto or /models/session answer (ClientError 502 for any other
        answer): /auto names the picked model by its catalogue entry, the legacy endpoint by its
        id. An expiry missing or past is taken as an hour, so that a bad answer costs one call
        an hour, not one per request."""
        if status != 200 or get_typed(data, "session_token", str) is None:
            message, _ = upstream_error_message(raw)
            raise ClientError(502, "Copilot did not pick a model for \"auto\" (%s answered HTTP "
                                   "%d: %s); name a model instead (GET /v1/models lists them)"
                                   % (path, status, message or "no details"),
                              code="auto_unavailable")
        selected = data.get("selected_model")
        entry = selected if isinstance(selected, dict) else None
        model = entry.get("id") if entry else selected
        if not isinstance(model, str) or not model:
            raise ClientError(502, "Copilot's %s answer names no selected model" % path,
                              code="auto_unavailable")
        expires_at = data.get("expires_at")
        now = self.clock()
        if (not isinstance(expires_at, (int, float)) or isinstance(expires_at, bool)
                or expires_at <= now):
            expires_at = now + 3600
        self.sessions += 1
        log.info("auto model session: %s picked %s, for %s", path, model,
                 format_duration(expires_at - now))
        return {"model": model, "entry": entry, "token": data["session_token"],
                "expires_at": expires_at}

# ------------------------------------------------------------------------------------------
# 8. Requests (pure)
#    What a client sends, up to the body Copilot is sent: bodies decoded and checked, the
#    model catalogue (names, effort, schemas), and each dialect's request validated and turned
#    into the shape its upstream endpoint takes. Dicts in, dicts out: no I/O, no clock, no
#    globals. Split from the answers (§9) so a reader following a request meets only this;
#    the validators here are what the translators (and §9) may rely on.
# ------------------------------------------------------------------------------------------

# -- 8a. Request bodies and field checks ----------------------------------------------------

def decode_body(raw, encoding, limit):
    """A request body as sent before ``Content-Encoding`` (gzip, deflate; zstd where Python has
    it), held while decoding to ``limit`` bytes or MAX_DECOMPRESSED_BODY_BYTES, whichever is
    lower: a small bomb cannot grow past either."""
    encoding = (encoding or "identity").strip().lower()
    if encoding in ("identity", ""):
        return raw
    limit = min(limit, MAX_DECOMPRESSED_BODY_BYTES)
    if encoding in ("gzip", "x-gzip", "deflate"):
        # gzip: wbits 16+15; deflate is zlib-wrapped per RFC 9110, but raw deflate is common too
        decoders = [functools.partial(zlib.decompressobj, wbits)
                    for wbits in ((31,) if encoding != "deflate" else (15, -15))]
        broken = zlib.error
    elif encoding == "zstd":
        # compression.zstd is standard library from 3.14 on; imported by name so that the
        # stdlib-only checks, which run on older Pythons, accept it
        try:
            zstd = importlib.import_module("compression.zstd")
        except ImportError:
            raise ClientError(415, "zstd request bodies need Python 3.14+ (this is %d.%d); run "
                                   "coproxy on a newer Python, or turn request compression off in "
                                   "the client (Codex: -c features.enable_request_compression="
                                   "false)" % sys.version_info[:2],
                              code="unsupported_content_encoding")
        decoders, broken = [zstd.ZstdDecompressor], zstd.ZstdError
    else:
        raise ClientError(415, "Content-Encoding %r is not supported; send the body uncompressed, "
                               "or as gzip, deflate or zstd" % encoding[:40],
                          code="unsupported_content_encoding")
    for make in decoders:  # each way the encoding may be spelled, until one reads the body
        decoder = make()
        try:
            data = decoder.decompress(raw, max_length=limit + 1)
        except broken:
            continue
        if len(data) > limit or getattr(decoder, "unconsumed_tail", b""):
            raise _too_large_decompressed(limit)
        if not decoder.eof:
            raise ClientError(400, "the %s request body is truncated" % encoding,
                              code="invalid_encoding")
        return data
    raise ClientError(400, "the request body is not valid %s data" % encoding,
                      code="invalid_encoding")


def _too_large_decompressed(limit):
    return ClientError(413, "request body is larger than %d bytes once decompressed (the lower "
                            "of --max-body-mb and %d MiB)"
                       % (limit, MAX_DECOMPRESSED_BODY_BYTES >> 20), code="request_too_large")



def heavy_body(raw, encoding):
    """Whether the work on a request body (parsing, checking, planning) belongs in a worker
    thread: a compressed body, one over INLINE_PARSE_BYTES, or one with more than
    INLINE_PARSE_VALUES arrays, objects and commas (counted over the bytes: cheap)."""
    raw = raw or b""
    values = raw.count(b"[") + raw.count(b"{") + raw.count(b",")
    return (encoding not in (None, "", "identity") or len(raw) > INLINE_PARSE_BYTES
            or values > INLINE_PARSE_VALUES)


def decode_json_body(raw, encoding, limit):
    """decode_body, then parse_json_object: what a worker does with a large or compressed body."""
    return parse_json_object(decode_body(raw, encoding, limit))


_KINDS = {"string": str, "boolean": bool, "object": dict, "array": list}


def _is_kind(value, kind):
    cls = _KINDS.get(kind)
    if cls is not None:
        return isinstance(value, cls)
    number = isinstance(value, (int, float) if kind == "number" else int)
    return number and not isinstance(value, bool)  # JSON's true is no number


def _kinds_text(kinds):
    return " or ".join(("an " if k[0] in "aio" else "a ") + k for k in kinds)


def _kind_of(value):
    """"a string", "an array", ...: what a value is, for messages."""
    for kind in ("boolean", "integer", "number", "string", "array", "object"):
        if _is_kind(value, kind):
            return _kinds_text([kind])
    return "null" if value is None else type(value).__name__


def check(container, key, kinds, where="", required=False):
    """``container[key]`` if it is one of ``kinds`` ("string", "integer", "number", "boolean",
    "object", "array"; null counts as absent), else a 400 naming the field and what it must be."""
    value = container.get(key)
    if value is None:
        if required:
            raise ClientError(400, "%s%s: field required" % (where, key), param=where + key,
                              code="missing_field")
        return None
    if isinstance(kinds, str):  # the common case, without a generator: this runs per field
        if _is_kind(value, kinds):
            return value
        kinds = (kinds,)
    elif any(_is_kind(value, kind) for kind in kinds):
        return value
    raise ClientError(400, "%s%s must be %s, not %s"
                      % (where, key, _kinds_text(kinds), _kind_of(value)),
                      param=where + key, code="invalid_type")


def check_items(container, key, where="", kinds="object"):
    """The array at ``container[key]`` (or [] when absent), each member one of ``kinds``."""
    items = check(container, key, "array", where) or []
    kinds = (kinds,) if isinstance(kinds, str) else kinds
    for index, item in enumerate(items):
        if not any(_is_kind(item, kind) for kind in kinds):
            name = "%s%s[%d]" % (where, key, index)
            raise ClientError(400, "%s must be %s, not %s"
                              % (name, _kinds_text(kinds), _kind_of(item)),
                              param=name, code="invalid_type")
    return items


def check_fields(container, where="", **kinds):
    """check() each ``key=kinds`` of ``container`` in order (nothing when the container is None)."""
    if container:
        for key, kind in kinds.items():
            check(container, key, kind, where)


#: The fields of a content part that must be strings when present.
_PART_STRINGS = ("text", "thinking", "signature", "tool_use_id", "id", "name", "url", "data",
                 "refusal")


def check_parts(content, where):
    """Message content: a string, or an array of parts that are objects with a string ``type``."""
    if content is None or isinstance(content, str):
        return
    if not isinstance(content, list):
        raise ClientError(400, "%s must be a string or an array of parts, not %s"
                          % (where, _kind_of(content)), param=where, code="invalid_type")
    for index, part in enumerate(content):
        name = "%s[%d]" % (where, index)
        if not isinstance(part, dict):
            raise ClientError(400, "%s must be an object, not %s" % (name, _kind_of(part)),
                              param=name, code="invalid_type")
        prefix = name + "."
        check(part, "type", "string", prefix, required=True)
        # long histories have thousands of parts: check() only what is not fine
        for key in _PART_STRINGS:
            if not isinstance(part.get(key, ""), str):
                check(part, key, "string", prefix)
        check(part, "image_url", ("string", "object"), prefix)
        check_fields(get_typed(part, "image_url", dict), prefix + "image_url.", url="string")
        check_fields(check(part, "source", "object", prefix), prefix + "source.", type="string",
                     url="string", data="string", media_type="string")
        check(part, "input", "object", prefix)
        if part.get("type") == "tool_result":
            check_parts(part.get("content"), prefix + "content")


# -- 8b. The model catalogue: names, effort, capabilities, schemas --------------------------

#: Served by /v1/models when Copilot cannot be reached (seed behaviour); shaped like /models.
FALLBACK_MODELS = [
    {"id": model_id, "name": name, "vendor": vendor,
     "capabilities": {"type": "chat",
                      "limits": {"max_context_window_tokens": context, "max_output_tokens": output},
                      "supports": {"tool_calls": True, "vision": True, "streaming": True}}}
    for model_id, name, vendor, context, output in (
        ("gpt-4.1", "GPT-4.1", "Azure OpenAI", 128000, 16384),
        ("gpt-4o", "GPT-4o", "Azure OpenAI", 128000, 4096),

        ("gpt-5-mini", "GPT-5 mini", "Azure OpenAI", 264000, 64000),
        ("claude-sonnet-4.5", "Claude Sonnet 4.5", "Anthropic", 200000, 32000),
        ("gemini-2.5-pro", "Gemini 2.5 Pro", "Google", 128000, 64000))
] + [
    {"id": "text-embedding-3-small", "name": "Embedding V3 small", "vendor": "Azure OpenAI",
     "capabilities": {"type": "embeddings", "limits": {"max_inputs": 512},
                      "supports": {"dimensions": True}}},
]


#: The Auto model as /v1/models lists it (after Copilot's own models): a request for it goes to
#: the model Copilot picks for the session (AutoModel in §7).
AUTO_MODEL_ENTRY = {"id": AUTO_MODEL_ID, "name": "Auto (Copilot picks the model)",
                    "vendor": "GitHub Copilot", "object": "model", "capabilities": {
                        "type": "chat", "supports": {"tool_calls": True, "vision": True,
                                                     "streaming": True}}}

#: Where a resolved ``auto`` request carries its session in the chosen model's catalogue entry.
AUTO_SESSION_KEY = "coproxy_auto_session"


def auto_discount(info):
    """The fraction the Auto model takes off (``billing.auto_discount``; 10 read as 10 %)."""
    value = _dig(info, "billing").get("auto_discount")
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < 100:
        return 0.0
    return value / 100.0 if value >= 1 else float(value)


def _dig(node, *keys):
    """node[k1][k2]... where each level is a dict; {} when any level is missing or not a dict."""
    for key in keys:
        node = node.get(key) if isinstance(node, dict) else None
    return node if isinstance(node, dict) else {}


def _index(node):
    """A stream part's ``index`` (a choice's, a tool call's): 0 when absent or not an integer."""
    value = node.get("index")
    return value if isinstance(value, int) else 0


def _count(node, *keys):
    value = _dig(node, *keys[:-1]).get(keys[-1])
    return value if _is_kind(value, "number") and value >= 0 else 0


def copilot_model_to_openai(model):
    """One Copilot /models entry in OpenAI's model shape, plus the extras clients find useful."""
    if "alias_of" in model:  # a --model-alias (see Catalogue.listing), shown as one
        return {"id": model["id"], "object": "model", "created": 0, "owned_by": "coproxy-alias",
                "alias_of": model["alias_of"]}
    caps = _dig(model, "capabilities")
    limits, supports = _dig(caps, "limits"), _dig(caps, "supports")
    vendor = get_typed(model, "vendor", str, "GitHub Copilot")
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
                         "streaming": bool(supports.get("streaming",
                                                        caps.get("type", "chat") == "chat")),
                         "structured_outputs": bool(supports.get("structured_outputs")),
                         "reasoning_effort": supports.get("reasoning_effort")},
    }
    entry.update((key, model[key]) for key in ("supported_endpoints", "preview", "billing",
                                               "model_picker_enabled") if key in model)
    if isinstance(entry.get("supported_endpoints"), list):  # coproxy serves no WebSocket: VS Code
        entry["supported_endpoints"] = [e for e in entry["supported_endpoints"]  # would try one
                                        if not (isinstance(e, str) and e.startswith("ws:"))]
    if isinstance(model.get("policy"), dict):
        entry["policy_state"] = model["policy"].get("state")
    return entry


def _whole(value):
    """``value`` if it is a non-negative integer (not a bool), else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _support(flag):
    return {"supported": bool(flag)}


#: Anthropic's created_at when a release date is unknown (its docs allow the epoch); Copilot's
#: catalogue has no dates.
UNKNOWN_RELEASE = "1970-01-01T00:00:00Z"

_ANTHROPIC_LINES = ("haiku", "sonnet", "opus")


def anthropic_model_id(model_id):
    """A Claude id as Anthropic spells it (claude-sonnet-4.5 -> claude-sonnet-4-5); other ids as
    they are. Claude Code reads a dotted id as an older model (Sonnet 4, with a "retired" warning
    on every run, seen in 2.1.197); coproxy resolves either spelling to the catalogue's id."""
    if not model_id.startswith("claude-"):
        return model_id
    return re.sub(r"(?<=\d)\.(?=\d)", "-", model_id)


def anthropic_model_info(model):
    """A Copilot catalogue entry as the anthropic SDK's ``ModelInfo``: the fields Claude Code's
    gateway discovery reads (id, display_name) and every key the SDK requires, capabilities as
    its objects, filled from the catalogue's limits and supports (false where Copilot has no
    such feature: batches, citations, server tools)."""
    caps = _dig(model, "capabilities")
    limits, supports = _dig(caps, "limits"), _dig(caps, "supports")
    efforts = get_typed(supports, "reasoning_effort", list, [])
    budget = bool(_whole(supports.get("max_thinking_budget")))
    adaptive = supports.get("adaptive_thinking") is True
    lowered = model["id"].lower()
    lines = [kind for kind in _ANTHROPIC_LINES if kind in lowered and "claude" in lowered]
    name = get_typed(model, "name", str)
    context = _whole(limits.get("max_prompt_tokens")) or _whole(
        limits.get("max_context_window_tokens"))
    no = _support(False)
    effort = {level: _support(level in efforts)
              for level in ("low", "medium", "high", "max", "xhigh")}
    return {
        "type": "model", "id": anthropic_model_id(model["id"]), "display_name": name or model["id"],
        "created_at": UNKNOWN_RELEASE,
        "lifecycle": "active", "deprecated_at": None, "retires_at": None,
        "line": lines[0] if lines else None,
        "max_input_tokens": context, "max_tokens": _whole(limits.get("max_output_tokens")),
        "capabilities": {
            "batch": no, "citations": no, "code_execution": no, "context_management": no,
            "effort": dict(effort, supported=bool(efforts)),
            "image_input": _support(supports.get("vision")), "pdf_input": no,
            "server_tools": {"supported": False, "code_execution": no, "web_search": no},
            "structured_outputs": _support(supports.get("structured_outputs")),
            "thinking": {"supported": budget or adaptive, "types": {
                "adaptive": _support(adaptive), "enabled": _support(budget),
                "disabled": _support(True), "between_tools": no}}}}


def _query_value(query, name):
    values = query.get(name) or query.get(name + "[]")
    return values[-1] if values else None


def anthropic_model_page(items, query):
    """Anthropic's list page over ``items`` (dicts with an ``id``), as its API pages: ``limit``
    (1 to 1000, default 20) items after ``after_id`` or before ``before_id``; ``query`` is the
    parsed query string. ``has_more`` says whether more lie that way."""
    limit_text = _query_value(query, "limit")
    # ASCII digits only: str.isdigit() takes "²", which int() then refuses
    digits = limit_text is not None and re.match(r"[0-9]{1,4}\Z", limit_text)
    limit = None if limit_text is None else int(limit_text) if digits else 0
    if limit is not None and not 1 <= limit <= 1000:
        raise ClientError(400, "limit: must be an integer from 1 to 1000", param="limit")
    limit = limit or 20
    after, before = _query_value(query, "after_id"), _query_value(query, "before_id")
    if after is not None and before is not None:
        raise ClientError(400, "after_id and before_id cannot be used together", param="before_id")
    ids = [item["id"] for item in items]
    for name, cursor in (("after_id", after), ("before_id", before)):
        if cursor is not None and cursor not in ids:
            raise ClientError(400, "%s: no model with the id %r in the list" % (name, cursor[:200]),
                              param=name)
    if before is not None:
        end = ids.index(before)
        start = max(0, end - limit)
        page, has_more = items[start:end], start > 0
    else:
        start = ids.index(after) + 1 if after is not None else 0
        page, has_more = items[start:start + limit], start + limit < len(items)
    return {"data": page, "has_more": has_more, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None}


def anthropic_model_list(entries, query):
    """GET /v1/models for an Anthropic client: the chat models of the catalogue listing as
    ``ModelInfo``, one page of them (``query``: the parsed query string)."""
    chat = [e for e in entries if (_dig(e, "capabilities").get("type") or "chat") == "chat"]
    return anthropic_model_page([anthropic_model_info(e) for e in chat], query)


_DATE_SUFFIX = re.compile(r"-(?:20\d{6}|latest)$")


def _version_key(model_id):
    """Sort key that puts newer versions last: claude-sonnet-4.5 > claude-sonnet-4 > -3.7."""
    return [int(part) if part.isdigit() else -1 for part in re.split(r"[.-]", model_id)]


def without_tag(name):
    """A model name without its Ollama tag: ``gpt-4.1:latest`` -> ``gpt-4.1`` (Ollama clients
    name models ``model:tag``; Copilot's ids have no colon)."""
    base, colon, _ = name.rpartition(":")
    return base if colon and base else name


def resolve_model(name, ids):
    """The catalog id a client's model name means, or None.

    Handles Anthropic-style names (``claude-sonnet-4-5``, dated ``claude-sonnet-4-5-20250929``,
    ``claude-opus-4-6[1m]``) against Copilot's dotted ids (``claude-sonnet-4.5``), and the bare
    families ``opus``/``sonnet``/``haiku`` (newest in the catalog). An Ollama tag is dropped
    (``gpt-4.1:latest``)."""
    if name in ids:
        return name
    name = without_tag(name)
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
    return ClientError(404, "model %r is not in your Copilot catalog%s (GET /v1/models lists them)"
                       % (name, hint), code="model_not_found", param="model")


def with_policy_hint(error, model, info):
    """model_not_supported for a model whose catalogue policy is not ``enabled``: say where to
    enable it (coproxy does not accept a model's terms on the user's behalf)."""
    state = _dig(info, "policy").get("state")
    if error.code != "model_not_supported" or state in (None, "enabled"):
        return error
    return ClientError(error.status, "%s: %s is not enabled for your account (policy: %s); enable "
                       "it at https://github.com/settings/copilot/features or once in VS Code's "
                       "model picker" % (str(error).rstrip(". "), model, state),
                       kind=error.kind, code=error.code,
                       param=error.param, headers=error.headers)


def check_vision(model, info, vision, param):
    """400 before any upstream call when images go to a model the catalogue says cannot see."""
    if vision and _dig(info, "capabilities", "supports").get("vision") is False:
        raise ClientError(400, "model %s does not accept images; pick one with vision (see GET "
                               "/v1/models)" % model, code="model_without_vision", param=param)


#: Reasoning effort values from least to most; a value a model does not list is moved to the
#: nearest one it does (on a tie, the higher: the client asked for at least that much).
EFFORT_SCALE = ("none", "minimal", "low", "medium", "high", "xhigh", "max")


def nearest_effort(wanted, allowed):
    """The value of ``allowed`` nearest to ``wanted`` on EFFORT_SCALE, or None when either is
    off the scale (then the request goes as it is and Copilot decides)."""
    allowed = [a for a in allowed if a in EFFORT_SCALE]
    if wanted in allowed or wanted not in EFFORT_SCALE or not allowed:
        return wanted if wanted in allowed else None
    rank = EFFORT_SCALE.index(wanted)
    return min(allowed, key=lambda a: (abs(EFFORT_SCALE.index(a) - rank), -EFFORT_SCALE.index(a)))


def supported_efforts_in(message):
    """The effort values a refusal lists ("supported values: [medium]", "Supported values are:
    'minimal', 'low'..."), or [] when it lists none."""
    match = re.search(r"\bsupported values?(?: are)?:?(.*)", message, re.I | re.S)
    return re.findall(r"\b(%s)\b" % "|".join(EFFORT_SCALE), match.group(1)) if match else []


def is_effort_refusal(error):
    text = str(error).lower()
    return error.status == 400 and (error.code == "invalid_reasoning_effort" or (
        error.code in ("unsupported_value", "invalid_request_body")
        and ("effort" in text or "reasoning" in text)))


#: Where each upstream API keeps the reasoning effort, and the name clients of that API know.
_EFFORT_FIELDS = {"/chat/completions": ("reasoning_effort",), "/responses": ("reasoning", "effort"),
                  "/v1/messages": ("output_config", "effort")}


def get_effort(path, payload):
    """The request's reasoning effort, wherever ``path``'s API keeps it."""
    *parents, last = _EFFORT_FIELDS.get(path, (None,))
    return get_typed(_dig(payload, *parents), last, str)


def set_effort(path, payload, value):
    """Set the effort where ``path``'s API keeps it (objects made as needed)."""
    *parents, last = _EFFORT_FIELDS[path]
    node = payload
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value


_SCHEMA_CHILDREN = ("properties", "patternProperties", "$defs", "definitions")

_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")


def is_gemini(model, info=None):
    vendor = get_typed(info, "vendor", str, "")
    return model.lower().startswith("gemini") or vendor.lower() == "google"


def _json_type(values):
    """The one JSON Schema type all of ``values`` have (bool before int: True is an int), or
    None."""
    for name, kinds in (("boolean", bool), ("integer", int), ("number", (int, float))):
        if all(isinstance(v, kinds) and (name == "boolean" or not isinstance(v, bool))
               for v in values):
            return name
    return None


def _gemini_type(out, kinds):
    """A ``type`` list as one type in ``out`` (null as ``nullable``); the notes for the
    description that say what the list allowed."""
    real = [t for t in kinds if t != "null"]
    if "null" in kinds:
        out["nullable"] = True
    out["type"] = "string" if len(real) != 1 and ("string" in real or not real) else real[0]
    return ["Any of these types: %s." % ", ".join(map(str, real))] if len(real) > 1 else []


def _gemini_enum(out, enum):
    """An enum with members other than strings: string members for a string (or untyped)
    schema, else no enum and a note that lists the values (null as ``nullable``)."""
    if None in enum:
        out["nullable"] = True
    values = [v for v in enum if v is not None]
    if out.get("type") is None and values and not any(isinstance(v, str) for v in values):
        out["type"] = _json_type(values)
    if out.get("type") in (None, "string"):
        out["enum"] = [v if isinstance(v, str) else json.dumps(v) for v in values]
        return []
    del out["enum"]
    return ["One of: %s." % ", ".join(json.dumps(v) for v in values)]


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
    if isinstance(out.get("type"), list):
        notes += _gemini_type(out, out["type"])
    enum = out.get("enum")
    if isinstance(enum, list) and not all(isinstance(v, str) for v in enum):
        notes += _gemini_enum(out, enum)
    if notes:
        described = get_typed(out, "description", str, "").strip()
        if described and described[-1] not in ".!?:":
            described += "."
        out["description"] = " ".join(([described] if described else []) + notes)
    for key in _SCHEMA_CHILDREN:
        if isinstance(out.get(key), dict):
            out[key] = {name: gemini_schema(child, depth + 1) for name, child in out[key].items()}
    for key in _SCHEMA_LISTS + ("items",):  # "items" as a list: the old tuple form
        if isinstance(out.get(key), list):
            out[key] = [gemini_schema(child, depth + 1) for child in out[key]]
    for key in ("items", "additionalProperties", "not", "contains"):
        if isinstance(out.get(key), dict):
            out[key] = gemini_schema(out[key], depth + 1)
    return out


def gemini_tools(payload):
    """Make the function tools' parameter schemas of a chat request acceptable to Gemini."""
    for tool in get_typed(payload, "tools", list, []):
        function = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(function, dict) and isinstance(function.get("parameters"), dict):
            function["parameters"] = gemini_schema(function["parameters"])


def endpoint_for(info, wanted):
    """Copilot path to use for a model: ``wanted`` unless the catalog says it only has
    /responses."""
    endpoints = get_typed(info, "supported_endpoints", list, [])
    if endpoints and wanted not in endpoints and "/responses" in endpoints:
        return "/responses"
    return wanted


# -- 8c. OpenAI chat completions requests ---------------------------------------------------

def _copy_given(target, source, *keys, **renamed):
    """``target[key] = source[key]`` for each of ``keys``, and ``target[new] = source[old]`` for
    each ``new=old``, where ``source`` has a value: a translator passes on only what the client
    sent, so Copilot applies its own defaults to the rest."""
    for new, old in [(key, key) for key in keys] + list(renamed.items()):
        if source.get(old) is not None:
            target[new] = source[old]

_IMAGE_PART_TYPES = frozenset(["image_url", "image", "input_image"])


def content_parts(payload):
    """(part, type) for every part of a request's message content: chat and Anthropic messages'
    ``content``, Responses items' ``content`` and ``output``, and tool results' content within
    them. Only content, never tool definitions or a model's tool inputs: this runs on every
    request, and walking whole agent conversations would cost as much as parsing them."""
    def walk(parts):
        for part in parts if isinstance(parts, list) else ():
            if isinstance(part, dict):
                if part.get("type") == "tool_result":
                    yield from walk(part.get("content"))
                else:
                    yield part, part.get("type")
    for key in ("messages", "input"):
        for item in get_typed(payload, key, list, ()):
            if isinstance(item, dict):
                yield from walk(item.get("content"))
                yield from walk(item.get("output"))


def has_image(payload, kinds=_IMAGE_PART_TYPES):
    """True if the request's content carries an image part (Copilot then wants
    Copilot-Vision-Request)."""
    return any(kind in kinds for _, kind in content_parts(payload))


def chat_initiator(messages):
    """``agent`` when the last message is the assistant's or a tool result, else ``user``.

    Copilot bills a user turn (a premium request, or its tokens); tool loops are follow-ups."""
    # validate_chat_request: messages is non-empty
    return "agent" if messages[-1].get("role") in ("assistant", "tool") else "user"


def _model_or_default(payload, default_model):
    """The request's ``model``, else the configured default (stored in the payload), else 400."""
    model = check(payload, "model", "string") or default_model
    if not model:
        raise ClientError(400, "'model' is required (or start coproxy with --default-model)",
                          param="model", code="model_required")
    payload["model"] = model
    return model


def validate_chat_request(payload, default_model=None):
    """Check every field of an OpenAI chat request that coproxy reads or rewrites; fills ``model``
    from the default. Returns (model name, stream, include_usage, merge choices)."""
    if not check(payload, "messages", "array", required=True):
        raise ClientError(400, "messages must be a non-empty array", param="messages",
                          code="invalid_messages")
    for index, message in enumerate(check_items(payload, "messages")):
        where = "messages[%d]." % index
        check(message, "role", "string", where, required=True)
        check_parts(message.get("content"), where + "content")
        check(message, "tool_call_id", "string", where)
        for call_index, call in enumerate(check_items(message, "tool_calls", where)):
            call_where = "%stool_calls[%d]." % (where, call_index)
            check_fields(check(call, "function", "object", call_where), call_where + "function.",
                         name="string", arguments="string")
    model = _model_or_default(payload, default_model)
    stream = check(payload, "stream", "boolean") is True
    options = check(payload, "stream_options", "object") or {}
    include_usage = bool(stream and check(options, "include_usage", "boolean", "stream_options."))
    n = check(payload, "n", "integer")
    check_fields(payload, max_tokens="integer", max_completion_tokens="integer",
                 temperature="number", top_p="number", parallel_tool_calls="boolean",
                 user="string", reasoning_effort="string",
                 tool_choice=("string", "object"))
    check_fields(check(payload, "response_format", "object"), "response_format.", type="string",
                 json_schema="object")
    for index, tool in enumerate(check_items(payload, "tools")):
        check_fields(check(tool, "function", "object", "tools[%d]." % index),
                     "tools[%d].function." % index,
                     name="string", parameters="object")
    return model, stream, include_usage, not (n is not None and n > 1)


# -- 8d. Anthropic Messages requests -> OpenAI chat -----------------------------------------

def _blocks(content):
    """Anthropic content as a list of blocks (a plain string is one text block). check_parts
    has made it a string, a list of objects or None."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return content or []


def _image_part(block):
    source = block.get("source") or {}
    if source.get("type") == "base64":
        url = "data:%s;base64,%s" % (source.get("media_type", "image/png"), source.get("data", ""))
    else:
        url = source.get("url", "")
    return {"type": "image_url", "image_url": {"url": url}}


def _text_of(blocks):
    return "\n\n".join(b.get("text", "") for b in blocks if b.get("type") == "text"
                       and b.get("text"))


def anthropic_initiator(messages):
    """``user`` only when the last turn is the user's with real content; a turn that carries
    tool results (even with reminder text after them) is the agent's follow-up. System-role
    messages after it do not count: Claude Code 2.1 appends its attachments (the list of agent
    types, reminders) as one after the person's prompt for some models, Haiku among them."""
    turns = [m for m in messages if m.get("role") != "system"]
    if not turns or turns[-1].get("role") != "user":
        return "agent"
    blocks = _blocks(turns[-1].get("content"))
    if any(b.get("type") == "tool_result" for b in blocks):
        return "agent"
    alone = len(turns) == 1 and [b.get("type") for b in blocks] == ["text"]
    if alone and (blocks[0].get("text") or "").strip() == "Warmup":
        # Claude Code's start-up probe (2.0.28+): the tool's request, not the person's
        return "agent"
    said = any((b.get("type") == "text" and (b.get("text") or "").strip())
               or b.get("type") in ("image", "document") for b in blocks)
    return "user" if said else "agent"


def validate_anthropic_request(payload):
    """Check every field of an Anthropic Messages request that coproxy reads or rewrites."""
    if not check(payload, "messages", "array", required=True):
        raise ClientError(400, "messages: must be a non-empty array", param="messages")
    for index, message in enumerate(check_items(payload, "messages")):
        if message.get("role") not in ("user", "assistant", "system"):
            raise ClientError(400, "messages.%d: role must be 'user' or 'assistant'" % index,
                              param="messages")
        check_parts(message.get("content"), "messages.%d.content" % index)
    if not check(payload, "model", "string", required=True):
        raise ClientError(400, "model: field required", param="model")
    if not _is_kind(payload.get("max_tokens"), "integer"):
        raise ClientError(400, "max_tokens: field required (an integer)", param="max_tokens")
    check_parts(check(payload, "system", ("string", "array")), "system")  # a string passes
    check_fields(payload, stream="boolean", temperature="number", top_p="number")
    check_items(payload, "stop_sequences", kinds="string")
    check_fields(check(payload, "metadata", "object"), "metadata.", user_id="string")
    for index, tool in enumerate(check_items(payload, "tools")):
        check_fields(tool, "tools.%d." % index, name="string", type="string", description="string",
                     input_schema="object")
    check_fields(check(payload, "tool_choice", "object"), "tool_choice.", type="string",
                 name="string")
    check_fields(check(payload, "thinking", "object"), "thinking.", type="string",
                 budget_tokens="integer")
    check_fields(check(payload, "output_config", "object"), "output_config.", effort="string",
                 format="object")
    check_fields(_dig(payload, "output_config").get("format"), "output_config.format.",
                 type="string", schema="object")


#: anthropic-beta values Copilot's /v1/messages is known to accept (VS Code filters the same way).
SUPPORTED_ANTHROPIC_BETAS = ("interleaved-thinking-", "context-management-", "advanced-tool-use-",
                             "extended-cache-ttl-")


def clean_anthropic_request(payload):
    """Take out of an Anthropic request what Copilot refuses and would fail the turn for:
    ``anthropic_beta`` in the body, tools' ``eager_input_streaming``, advisor tools (their beta is
    filtered too). Returns what was removed. A web search tool is refused here with a clear 400:
    Copilot has no web search (it answers ``unsupported_value``)."""
    removed = []
    if "anthropic_beta" in payload:
        del payload["anthropic_beta"]
        removed.append("anthropic_beta")
    tools = payload.get("tools") or []
    kept = []
    for tool in tools:
        kind = tool.get("type") or ""
        if kind.startswith("web_search"):
            raise ClientError(400, "tools: Copilot has no web search, so the %s tool cannot be "
                                   "served; remove it (Claude Code: deny the WebSearch tool in "
                                   "your permissions)" % kind,
                              param="tools", code="web_search_not_supported")
        if kind.startswith("advisor_"):
            removed.append("tools[%s]" % kind)
            continue
        if "eager_input_streaming" in tool:
            tool = {k: v for k, v in tool.items() if k != "eager_input_streaming"}
            removed.append("tools[%s].eager_input_streaming" % (tool.get("name") or kind))
        kept.append(tool)
    if tools:
        payload["tools"] = kept
        if not kept:
            del payload["tools"]
            payload.pop("tool_choice", None)
    return removed


def fit_thinking_budget(budget, info, max_tokens=None):
    """A thinking budget within the model's catalogue bounds (at least its minimum, 1,024 when
    unknown) and below its output limit and ``max_tokens`` (Claude wants room for the answer)."""
    supports = _dig(info, "capabilities", "supports")
    limits = _dig(info, "capabilities", "limits")
    budget = max(budget, int(_count(supports, "min_thinking_budget") or 1024))
    ceiling = [v for v in (supports.get("max_thinking_budget"), (max_tokens or 0) - 1,
                           _count(limits, "max_output_tokens") - 1) if isinstance(v, int) and v > 0]
    return min([budget] + ceiling)


def _anthropic_turn_as_chat(message):
    """One Anthropic message as the chat messages it becomes (none, one, or several for a user
    turn that carries tool results). System-role messages stay system messages: Claude Code 2.1
    sends some inside ``messages``."""
    role, blocks = message.get("role"), _blocks(message.get("content"))
    if role == "system":
        return [{"role": "system", "content": _text_of(blocks)}]
    if role == "assistant":
        return [_anthropic_assistant_as_chat(blocks)]
    return _anthropic_user_as_chat(blocks)


def _anthropic_assistant_as_chat(blocks):
    """The assistant's turn: its text, its thinking as Copilot's ``reasoning_text`` and
    ``reasoning_opaque`` (the signature Claude needs to see again), its tool_use blocks as
    tool_calls."""
    out = {"role": "assistant", "content": _text_of(blocks) or None}
    thinking = [b for b in blocks if b.get("type") == "thinking"]
    if thinking:
        out["reasoning_text"] = "".join(b.get("thinking") or "" for b in thinking)
        signature = next((b.get("signature") for b in thinking if b.get("signature")), None)
        if signature:
            out["reasoning_opaque"] = signature
    calls = [{"id": b.get("id"), "type": "function",
              "function": {"name": b.get("name"), "arguments": json.dumps(b.get("input") or {})}}
             for b in blocks if b.get("type") == "tool_use"]
    if calls:
        out["tool_calls"] = calls
    return out


def _anthropic_user_as_chat(blocks):
    """The user's turn: tool results first, as tool messages (they answer the previous
    assistant turn, and OpenAI wants them right after it), then text and images as one user
    message. Images inside tool results join that message: a chat tool message holds text."""
    messages, images = [], []
    for block in blocks:
        if block.get("type") == "tool_result":
            inner = _blocks(block.get("content"))
            text = ("Error: " if block.get("is_error") else "") + _text_of(inner)
            messages.append({"role": "tool", "tool_call_id": block.get("tool_use_id"),
                             "content": text})
            images.extend(_image_part(b) for b in inner if b.get("type") == "image")
    rest = [b for b in blocks if b.get("type") in ("text", "image")]
    if images or any(b.get("type") == "image" for b in rest):
        parts = [{"type": "text", "text": b["text"]} if b["type"] == "text" else _image_part(b)
                 for b in rest if b.get("type") == "image" or b.get("text")]
        messages.append({"role": "user", "content": images + parts})
    elif _text_of(rest):
        messages.append({"role": "user", "content": _text_of(rest)})
    return messages


def _function_spec(name, description, parameters, strict=None):
    """A function tool as chat (inside ``function``) and Responses (beside ``type``) both spell
    it, whichever API it came from: an empty object schema when it takes no parameters, and
    ``strict`` only when the client set it."""
    spec = {"name": name, "description": description or "",
            "parameters": parameters or {"type": "object", "properties": {}}}
    return spec if strict is None else dict(spec, strict=strict)


def _anthropic_tools_as_chat(payload):
    """Anthropic's ``tools`` and ``tool_choice`` as chat's ``tools``, ``tool_choice`` and
    ``parallel_tool_calls`` (``any`` is chat's ``required``; a named tool a named function)."""
    fields = {}
    if payload.get("tools"):
        fields["tools"] = [{"type": "function", "function": _function_spec(
            t["name"], t.get("description"), t.get("input_schema"))}
            for t in payload["tools"] if t.get("name")]
    choice = payload.get("tool_choice") or {}
    kind = choice.get("type")
    if kind in ("auto", "any", "none"):
        fields["tool_choice"] = "required" if kind == "any" else kind
    elif kind == "tool" and choice.get("name"):
        fields["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
    if choice.get("disable_parallel_tool_use") and "tools" in fields:
        fields["parallel_tool_calls"] = False
    return fields


def anthropic_to_openai_request(payload, model_info=None):
    """An Anthropic Messages request (checked by validate_anthropic_request) as an OpenAI chat
    request for Copilot: the system prompt and each turn as chat messages, then the settings
    that have a chat spelling; a thinking budget is fitted to ``model_info``'s bounds."""
    system = _text_of(_blocks(payload.get("system")))
    messages = [{"role": "system", "content": system}] if system else []
    for message in payload["messages"]:
        messages += _anthropic_turn_as_chat(message)
    request = {"model": payload["model"], "messages": messages, "max_tokens": payload["max_tokens"]}
    if payload.get("stream"):
        request.update(stream=True, stream_options={"include_usage": True})
    _copy_given(request, payload, "temperature", "top_p", stop="stop_sequences")
    if _dig(payload, "metadata").get("user_id"):
        request["user"] = payload["metadata"]["user_id"]
    request.update(_anthropic_tools_as_chat(payload))
    _copy_given(request, _dig(payload, "output_config"), reasoning_effort="effort")
    answer_format = _dig(payload, "output_config", "format")
    if answer_format.get("type") == "json_schema" and answer_format.get("schema") is not None:
        # structured output (Claude Code asks for its session titles so): Responses' text.format
        # shape without its name, which chat requires (see _responses_format_as_chat)
        request["response_format"] = _responses_format_as_chat(answer_format)
    thinking = payload.get("thinking") or {}
    if thinking.get("type") == "enabled" and thinking.get("budget_tokens"):
        request["thinking_budget"] = fit_thinking_budget(thinking["budget_tokens"], model_info)
    return request


def _parse_arguments(text):
    """Tool call arguments (JSON text) as an object; {} for anything
    else: a model's arguments may be cut off or not JSON at all."""
    try:
        value = json.loads(text) if isinstance(text, str) and text else {}
    except (ValueError, RecursionError):
        return {}
    return value if isinstance(value, dict) else {}


def estimate_input_tokens(payload):
    """A deliberately high estimate of the prompt tokens of an Anthropic request.

    Claude Code compacts its context from this number, so undercounting is the costly error.
    Every ASCII run counts one token per 3 characters (real tokenizers average 3.5-4.5 for
    English and code), every other character one token (CJK is about 1 per character), each
    image 1,600 tokens (Anthropic's cost of the largest image it accepts), plus per-message and
    tool-definition overheads, then 10% on top."""
    def text_tokens(text):
        text = text if isinstance(text, str) else json.dumps(text)
        ascii_chars = len(text) if text.isascii() else len(text.encode("ascii", "ignore"))
        return (ascii_chars + 2) // 3 + (len(text) - ascii_chars)

    def content_tokens(content):
        """Tokens of one message's content, block by block (see the rates above)."""
        total = 0
        for block in _blocks(content):
            kind = block.get("type")
            if kind == "image" or kind == "document":
                total += 1600
            elif kind == "tool_result":
                total += 10 + content_tokens(block.get("content"))
            elif kind == "tool_use":
                called = str(block.get("name", "")) + json.dumps(block.get("input") or {})
                total += 10 + text_tokens(called)
            elif kind == "thinking":
                total += text_tokens(block.get("thinking") or "")
            else:
                total += text_tokens((block.get("text") or "") if kind == "text"
                                     else json.dumps(block))
        return total

    tools = payload.get("tools") or []
    total = (8 + content_tokens(payload.get("system") or "")
             + sum(7 + content_tokens(message.get("content")) for message in payload["messages"])
             + sum(30 + text_tokens(json.dumps(tool, separators=(",", ":"))) for tool in tools))
    if tools:
        total += 350  # the tool-use system prompt Anthropic adds
    return int(total * 1.1) + 1


# -- 8e. OpenAI Responses requests: chat <-> Responses, history, tools, Claude --------------

def count_tokens_of_request(payload):
    """POST /v1/messages/count_tokens: the fields the estimate reads checked, then the estimate."""
    check(payload, "messages", "array", required=True)
    for index, message in enumerate(check_items(payload, "messages")):
        check_parts(message.get("content"), "messages.%d.content" % index)
    check_parts(check(payload, "system", ("string", "array")), "system")
    check_items(payload, "tools")
    return estimate_input_tokens(payload)

def validate_responses_request(payload, default_model=None):
    """Check the fields of a Responses (or compact) request that coproxy reads; fills ``model``."""
    model = _model_or_default(payload, default_model)
    if isinstance(check(payload, "input", ("string", "array")), list):
        if len(payload["input"]) > MAX_INPUT_ITEMS:
            raise ClientError(400, "input holds %d items; at most %d are taken (a long agent "
                                   "session sends a few thousand)"
                              % (len(payload["input"]), MAX_INPUT_ITEMS),
                              param="input", code="too_many_items")
        for index, item in enumerate(check_items(payload, "input")):
            where = "input[%d]." % index
            check_fields(item, where, type="string", role="string", call_id="string", name="string",
                         arguments="string", input="string", encrypted_content="string",
                         output=("string", "array"))
            check_parts(item.get("content"), where + "content")
            check_parts(item.get("output"), where + "output")  # a string passes as it is
    check_fields(payload, stream="boolean", instructions=("string", "array"),
                 tool_choice=("string", "object"), parallel_tool_calls="boolean",
                 max_output_tokens="integer", temperature="number", top_p="number", store="boolean",
                 previous_response_id="string", metadata="object", user="string")
    check_items(payload, "include", kinds="string")
    check_fields(check(payload, "reasoning", "object"), "reasoning.", effort="string",
                 summary="string")
    check_fields(check(payload, "text", "object"), "text.", format="object")
    check_fields(_dig(payload, "text", "format"), "text.format.", type="string", name="string",
                 schema="object")
    tools = [("tools[%d]." % index, tool)
             for index, tool in enumerate(check_items(payload, "tools"))]
    for where, tool in tools:
        if tool.get("type") == "namespace":  # Codex groups tools so: they are read like the others
            tools += [("%stools[%d]." % (where, index), inner)
                      for index, inner in enumerate(check_items(tool, "tools", where))]
    for where, tool in tools:
        check_fields(tool, where, type="string", name="string", description="string",
                     parameters="object", strict="boolean", format="object")
    check_fields(get_typed(payload, "tool_choice", dict), "tool_choice.", type="string",
                 name="string")
    return model


def _plain_text(content):
    """Chat content as text: a string as it is, else the text of its text parts, joined."""
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content or [] if isinstance(p, dict)
                   and isinstance(p.get("text"), str))


def _user_parts_as_input(content):
    """A user message's content as Responses input parts (text and images; chat's other part
    types have no Responses form)."""
    if isinstance(content, str):
        return [{"type": "input_text", "text": content}]
    parts = []
    for part in content or []:
        if part.get("type") == "text":
            parts.append({"type": "input_text", "text": part.get("text") or ""})
        elif part.get("type") == "image_url":
            image = part.get("image_url")  # a URL, or an object with one
            image = image if isinstance(image, dict) else {"url": image}
            parts.append({"type": "input_image", "image_url": image.get("url"),
                          "detail": get_typed(image, "detail", str, "auto")})
    return parts


def _chat_message_as_items(message):
    """One chat message as Responses input items: system and developer text as a developer
    message, the assistant's text and each of its tool calls as items of their own, a tool
    message as a function_call_output."""
    role, content = message.get("role"), message.get("content")
    if role in ("system", "developer"):
        return [{"type": "message", "role": "developer",
                 "content": [{"type": "input_text", "text": _plain_text(content)}]}]
    if role == "user":
        return [{"type": "message", "role": "user", "content": _user_parts_as_input(content)}]
    if role == "tool":
        return [{"type": "function_call_output", "call_id": message.get("tool_call_id"),
                 "output": _plain_text(content)}]
    if role != "assistant":
        return []
    text = _plain_text(content)
    items = [{"type": "message", "role": "assistant",
              "content": [{"type": "output_text", "text": text}]}] if text else []
    return items + [{"type": "function_call", "call_id": call.get("id"),
                     "name": _dig(call, "function").get("name"),
                     "arguments": _dig(call, "function").get("arguments") or "{}"}
                    for call in message.get("tool_calls") or []]


def _with_strict(fields, source):
    """``fields`` plus ``source``'s ``strict`` when it has one (both APIs spell it so)."""
    return dict(fields, strict=source["strict"]) if "strict" in source else fields


def chat_to_responses_request(payload):
    """An OpenAI chat request as a Responses request (for models Copilot serves only there):
    the messages as input items, then the settings, tools, tool choice and answer format in
    Responses' spelling."""
    items = [item for message in payload["messages"] for item in _chat_message_as_items(message)]
    request = {"model": payload["model"], "input": items, "store": False}
    if payload.get("stream"):
        request["stream"] = True
    limit = payload.get("max_completion_tokens") or payload.get("max_tokens")
    if limit:
        request["max_output_tokens"] = limit
    _copy_given(request, payload, "temperature", "top_p", "parallel_tool_calls", "user")
    if payload.get("reasoning_effort"):
        request["reasoning"] = {"effort": payload["reasoning_effort"]}
    tools = [t["function"] for t in payload.get("tools") or [] if t.get("function") is not None]
    if tools:
        request["tools"] = [dict({"type": "function"}, **_function_spec(
            f.get("name"), f.get("description"), f.get("parameters"), f.get("strict")))
            for f in tools]
    choice = payload.get("tool_choice")
    if isinstance(choice, str):
        request["tool_choice"] = choice
    elif isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        request["tool_choice"] = {"type": "function", "name": choice["function"].get("name")}
    fmt = payload.get("response_format") or {}
    if fmt.get("type") == "json_schema" and fmt.get("json_schema") is not None:
        schema = fmt["json_schema"]
        request["text"] = {"format": _with_strict(
            {"type": "json_schema", "name": schema.get("name", "response"),
             "schema": schema.get("schema", {})}, schema)}
    elif fmt.get("type") == "json_object":
        request["text"] = {"format": {"type": "json_object"}}
    return request


def responses_initiator(payload):
    """``agent`` when the newest input item is a tool output, the assistant's, or a compaction
    trigger; else ``user``."""
    items = payload.get("input")
    if not isinstance(items, list) or not items:  # a string is the user's
        return "user"
    last = items[-1]
    follow_up = ("function_call_output", "function_call", "reasoning", "compaction_trigger",
                 "custom_tool_call_output")
    return "agent" if last.get("type") in follow_up or last.get("role") == "assistant" else "user"


def as_output_items(items):
    """Input items (a string, or items in the forms a request may use) as an answer's items: a
    message's string content becomes parts (``output_text`` with its annotations for the
    assistant's words, ``input_text`` for anyone else's), and an item without a type a message."""
    if isinstance(items, str):
        items = [{"role": "user", "content": items}]
    out = []
    for item in items or []:  # validate_responses_request: objects
        item = dict(item, type=item.get("type") or "message")
        if item["type"] == "message" and not isinstance(item.get("content"), list):
            text = get_typed(item, "content", str, "")
            item["content"] = [{"type": "output_text", "text": text, "annotations": []}
                               if item.get("role") == "assistant"
                               else {"type": "input_text", "text": text}]
        out.append(item)
    return out


#: Tokens of history above which Copilot compacts when coproxy asks it to (for Codex's
#: /responses/compact): low, because a client that asks for compaction wants it now.
COMPACT_THRESHOLD_TOKENS = 1000


def compact_request(payload):
    """Codex's POST /responses/compact body (model, input, instructions, tools, ...) as a Copilot
    /responses request that compacts: Copilot has no compact endpoint, but compacts a history
    inside /responses when ``context_management`` asks for it."""
    request = {k: v for k, v in payload.items()
               if k not in ("stream", "service_tier", "store", "background")}
    return dict(request, store=False,
                input=[i for i in payload["input"] if i.get("type") != "compaction_trigger"],
                context_management=[{"type": "compaction",
                                     "compact_threshold": COMPACT_THRESHOLD_TOKENS}])


# Responses for models Copilot serves only on /chat/completions or /v1/messages (Claude, Gemini,
# gpt-4.1, ...): the request becomes a chat request (and, for Claude, an Anthropic one from
# that), and the answer comes back through one ResponseBuilder, fed by a chat reader or an
# Anthropic reader, whole or streamed. Custom tools (Codex's freeform apply_patch) travel as a
# function with one string argument; Claude's thinking travels in a reasoning item's
# ``encrypted_content`` (its text and signature, which a later turn must send back).

#: Tool types OpenAI runs on its own side; no model behind chat completions or Messages has them.
_CLIENT_TOOL_TYPES = ("function", "custom")

#: The argument a custom tool's text travels in while it is a function.
CUSTOM_TOOL_ARGUMENT = "input"

#: Thinking budgets for a Responses ``reasoning.effort`` on Claude (fitted to the model's bounds).
EFFORT_THINKING_BUDGETS = {"minimal": 1024, "low": 4096, "medium": 8192, "high": 16384,
                           "xhigh": 24576, "max": 32000}

_THINKING_PREFIX = "coproxy.thinking."


def _string(node, key):
    """``node[key]`` when it is a non-empty string, else None (upstream answers are not checked)."""
    value = node.get(key)
    return value if isinstance(value, str) and value else None


def pack_thinking(text, signature):
    """Claude's thinking block as a reasoning item's ``encrypted_content`` (opaque to clients)."""
    packed = base64.urlsafe_b64encode(json_dumps({"thinking": text, "signature": signature}))
    return _THINKING_PREFIX + packed.decode("ascii")


def unpack_thinking(value):
    """(thinking text, signature) from pack_thinking's form, or None for anything else."""
    if not isinstance(value, str) or not value.startswith(_THINKING_PREFIX):
        return None
    try:
        block = json.loads(base64.urlsafe_b64decode(value[len(_THINKING_PREFIX):].encode("ascii")))
    except (ValueError, TypeError):
        return None
    whole = get_typed(block, "thinking", str) is not None and _string(block, "signature")
    return (block["thinking"], block["signature"]) if whole else None


def is_claude_thinking(item):
    """A reasoning item coproxy made of Claude's thinking (see pack_thinking)."""
    return (item.get("type") == "reasoning"
            and str(item.get("encrypted_content") or "").startswith(_THINKING_PREFIX))


def responses_upstream(info, payload):
    """The Copilot path for a Responses request: /responses where the catalogue lists it (or the
    model is unknown to it: Copilot decides), else /v1/messages where listed (Claude) unless the
    request wants structured output, which only chat completions take, else /chat/completions."""
    endpoints = get_typed(info, "supported_endpoints", list, [])
    if not info or "/responses" in endpoints:
        return "/responses"
    structured = _dig(payload, "text", "format").get("type") in ("json_schema", "json_object")
    if "/v1/messages" in endpoints and not (structured and "/chat/completions" in endpoints):
        return "/v1/messages"
    return "/chat/completions"


def check_client_tools(payload, model, path):
    """400 for hosted tools (web_search, file_search, code_interpreter, computer_use, mcp, ...):
    OpenAI runs them on its side, and the model's Copilot endpoint has nothing of the kind."""
    for index, tool in enumerate(payload.get("tools") or []):
        kinds = [tool.get("type")]
        if kinds[0] == "namespace":
            kinds = [t.get("type") for t in tool.get("tools") or []]
        hosted = [kind for kind in kinds if kind not in _CLIENT_TOOL_TYPES]
        if hosted:
            codex = " (Codex: web_search = \"disabled\")" if hosted[0] == "web_search" else ""
            raise ClientError(
                400, "tools[%d]: %s is a hosted tool that only OpenAI's own Responses models "
                     "run; %s is served through Copilot's %s, which has no hosted tools: remove "
                     "it%s, or pick a model Copilot serves on /responses"
                     % (index, hosted[0], model, path, codex),
                param="tools[%d].type" % index, code="hosted_tool_not_supported")


def client_tools(payload):
    """{name the model sees: (tool, namespace or None)} for the function and custom tools of a
    request. A namespace's tools (Codex groups some so) become tools of their own, named
    ``<namespace>__<name>`` (function names allow no dots), their calls given back the namespace."""
    tools = {}
    for tool in payload.get("tools") or []:
        if tool.get("type") == "namespace":
            for inner in tool.get("tools") or []:
                if inner.get("type") in _CLIENT_TOOL_TYPES:
                    described = "\n\n".join(d for d in (tool.get("description"),
                                                          inner.get("description")) if d)
                    tools["%s__%s" % (tool.get("name"), inner.get("name"))] = (
                        dict(inner, description=described), tool.get("name"))
        elif tool.get("type") in _CLIENT_TOOL_TYPES:
            tools[tool.get("name")] = (tool, None)
    return tools


def _chat_tool(name, tool):
    """A Responses function or custom tool as a chat completions tool called ``name``."""
    if tool.get("type") == "function":
        return {"type": "function", "function": _function_spec(
            name, tool.get("description"), tool.get("parameters"), tool.get("strict"))}
    described = tool.get("description") or ""
    fmt = tool.get("format") or {}
    if fmt.get("type") == "grammar" and _string(fmt, "definition"):
        described += "\n\nThe input must follow this %s grammar:\n%s" % (fmt.get("syntax") or "",
                                                                        fmt["definition"])
    argument = {"type": "string", "description": "the tool's input as plain text"}
    return {"type": "function", "function": {
        "name": name, "description": described.strip(),
        "parameters": {"type": "object", "properties": {CUSTOM_TOOL_ARGUMENT: argument},
                       "required": [CUSTOM_TOOL_ARGUMENT], "additionalProperties": False}}}


def _chat_parts(parts, where):
    """Responses content parts (input_text, input_image, output_text, refusal) as chat parts."""
    out = []
    for index, part in enumerate(parts):
        kind = part.get("type")
        if kind in ("input_text", "output_text", "text", "summary_text", "refusal"):
            words = part.get("refusal" if kind == "refusal" else "text")
            out.append({"type": "text", "text": words or ""})
        elif kind == "input_image":
            url = _string(part, "image_url")
            if url is None:
                raise ClientError(400, "%s[%d]: only images given by image_url (a URL or a data: "
                                       "URL) can be sent to this model, not file ids"
                                  % (where, index),
                                  param="%s[%d]" % (where, index), code="unsupported_content")
            image = {"url": url}
            if isinstance(part.get("detail"), str):
                image["detail"] = part["detail"]
            out.append({"type": "image_url", "image_url": image})
        else:
            raise ClientError(400, "%s[%d]: %s parts can only be sent to models Copilot serves on "
                                   "/responses" % (where, index, kind),
                              param="%s[%d].type" % (where, index), code="unsupported_content")
    return out


_TOOL_CALLS = ("function_call", "custom_tool_call")
_TOOL_OUTPUTS = ("function_call_output", "custom_tool_call_output")


def _tool_call_as_chat(item):
    """A function or custom tool call item as a chat tool call: a custom tool's text in its one
    argument, a namespaced tool under the name client_tools gave it."""
    if item.get("type") == "function_call":
        arguments = item.get("arguments")
    else:
        arguments = json.dumps({CUSTOM_TOOL_ARGUMENT: item.get("input") or ""})
    name = item.get("name")
    if _string(item, "namespace"):
        name = "%s__%s" % (item["namespace"], name)
    return {"id": item.get("call_id"), "type": "function",
            "function": {"name": name, "arguments": arguments or "{}"}}


def _tool_output_as_chat(item, where):
    """(tool message, its image parts) for a tool output item: chat tool messages hold text
    only, so the images travel on in a user message after the outputs."""
    output = item.get("output")
    if isinstance(output, list):
        parts = _chat_parts(output, where)
    else:
        text = output if isinstance(output, str) else json.dumps(output)
        parts = [{"type": "text", "text": text}]
    message = {"role": "tool", "tool_call_id": item.get("call_id"), "content": _plain_text(parts)}
    return message, [p for p in parts if p["type"] == "image_url"]


def _input_message_as_chat(item, where):
    """A message item that is not the assistant's: system and developer ones as system text,
    anyone else's as the user's (plain text when it has no images)."""
    parts = _chat_parts(item["content"], where)
    if item.get("role") in ("system", "developer"):
        return {"role": "system", "content": _plain_text(parts)}
    simple = all(p["type"] == "text" for p in parts)
    return {"role": "user", "content": _plain_text(parts) if simple else parts}


def _responses_items_as_chat(items, first_own, keep_thinking):
    """Responses items as chat messages; ``first_own`` is the index of the request's own first
    item (those before are a stored history), for the names in errors. An assistant message
    and the tool calls after it make one assistant message (chat has one per turn); Claude's
    thinking (a reasoning item, used when ``keep_thinking``) goes on the assistant message that
    follows it; images from tool outputs follow as one user message once the outputs end."""
    messages, assistant, thinking, tool_images = [], None, None, []
    for index, item in enumerate(items):
        kind, where = item.get("type"), "input[%d]" % (index - first_own)
        if tool_images and kind not in _TOOL_OUTPUTS:
            messages.append({"role": "user", "content": tool_images})
            tool_images = []
        if kind in _TOOL_CALLS or (kind == "message" and item.get("role") == "assistant"):
            if assistant is None:
                assistant = {"role": "assistant", "content": None}
                if thinking:
                    assistant["reasoning_text"], assistant["reasoning_opaque"] = thinking
                messages.append(assistant)
                thinking = None
            if kind == "message":
                text = _plain_text(_chat_parts(item["content"], where + ".content"))
                if text:
                    assistant["content"] = (assistant["content"] or "") + text
            else:
                assistant.setdefault("tool_calls", []).append(_tool_call_as_chat(item))
            continue
        assistant = None
        if kind == "reasoning":
            thinking = unpack_thinking(item.get("encrypted_content")) if keep_thinking else None
        elif kind == "message":
            messages.append(_input_message_as_chat(item, where + ".content"))
        elif kind in _TOOL_OUTPUTS:
            message, images = _tool_output_as_chat(item, where + ".output")
            messages.append(message)
            tool_images += images
        # other items (item references, native models' compaction items) have no chat form
    if tool_images:
        messages.append({"role": "user", "content": tool_images})
    return messages


def _responses_tool_choice_as_chat(choice):
    """A Responses ``tool_choice`` in chat's spelling, or None when it has none (hosted tools)."""
    if choice in ("auto", "none", "required"):
        return choice
    if not isinstance(choice, dict):
        return None
    if choice.get("type") in _CLIENT_TOOL_TYPES and choice.get("name"):
        return {"type": "function", "function": {"name": choice["name"]}}
    if choice.get("type") == "allowed_tools":
        return "required" if choice.get("mode") == "required" else "auto"
    return None


def _responses_format_as_chat(fmt):
    """A Responses ``text.format`` as chat's ``response_format``, or None for plain text."""
    if fmt.get("type") == "json_schema":
        schema = {"name": fmt.get("name") or "response", "schema": fmt.get("schema") or {}}
        if isinstance(fmt.get("strict"), bool):
            schema["strict"] = fmt["strict"]
        return {"type": "json_schema", "json_schema": schema}
    if fmt.get("type") == "json_object":
        return {"type": "json_object"}
    return None


def responses_to_chat_request(payload, history, keep_thinking, own_items=None):
    """A Responses request as a chat completions request: ``instructions`` as a system message;
    a stored conversation (``history``: the items of the responses before, for
    previous_response_id) then ``input`` (see _responses_items_as_chat); then the settings that
    have a chat spelling, tools as chat functions (see _chat_tool).
    ``own_items``: as_output_items of ``input`` when the caller has built them already."""
    instructions = _string(payload, "instructions")  # it may also be an array of items
    messages = [{"role": "system", "content": instructions}] if instructions else []
    if own_items is None:
        own_items = as_output_items(payload.get("input"))
    messages += _responses_items_as_chat(history + own_items, len(history), keep_thinking)
    request = {"model": payload["model"], "messages": messages}
    if payload.get("stream"):
        request.update(stream=True, stream_options={"include_usage": True})
    _copy_given(request, payload, "temperature", "top_p", "user", max_tokens="max_output_tokens")
    _copy_given(request, _dig(payload, "reasoning"), reasoning_effort="effort")
    tools = [_chat_tool(name, tool) for name, (tool, _) in client_tools(payload).items()]
    if tools:
        request["tools"] = tools
        _copy_given(request, payload, "parallel_tool_calls")
    _copy_given(request, {
        "tool_choice": _responses_tool_choice_as_chat(payload.get("tool_choice")),
        "response_format": _responses_format_as_chat(_dig(payload, "text", "format"))},
        "tool_choice", "response_format")
    return request


def thinking_budget_for(effort, info, max_tokens):
    """Claude's thinking budget for a reasoning effort, or None (no effort, "none", or no room)."""
    wanted = EFFORT_THINKING_BUDGETS.get(effort)
    if wanted is None or (max_tokens is not None and max_tokens <= 1024):
        return None
    return fit_thinking_budget(wanted, info, max_tokens)


def _anthropic_image(part):
    url = part["image_url"].get("url") or ""
    match = re.match(r"data:([^;,]+);base64,(.*)$", url, re.S)
    if match:
        return {"type": "image", "source": {"type": "base64", "media_type": match.group(1),
                                            "data": match.group(2)}}
    return {"type": "image", "source": {"type": "url", "url": url}}


def _anthropic_content(content):
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    return [{"type": "text", "text": p["text"]} if p["type"] == "text" else _anthropic_image(p)
            for p in content or [] if p["type"] != "text" or p.get("text")]


def _mark_cache(blocks):
    """A prompt-cache breakpoint on the last block that may carry one (never a thinking block)."""
    for block in reversed(blocks):
        if block.get("type") not in ("thinking", "redacted_thinking"):
            block.setdefault("cache_control", {"type": "ephemeral"})
            return


def _chat_messages_as_anthropic(chat_messages):
    """(system blocks, messages) of chat messages that responses_to_chat_request made: turns
    of one role merged (Messages alternates), tool results as the user's, the assistant's
    thinking first with its signature, then its text and tool_use blocks."""
    system, messages = [], []

    def push(role, blocks):
        if not blocks:
            return
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"].extend(blocks)
        else:
            messages.append({"role": role, "content": blocks})
    for message in chat_messages:
        role = message["role"]
        if role == "system":
            system.extend(_anthropic_content(message["content"]))
        elif role == "tool":
            push("user", [{"type": "tool_result", "tool_use_id": message.get("tool_call_id"),
                           "content": message.get("content") or ""}])
        elif role == "assistant":
            blocks = []
            if message.get("reasoning_opaque"):
                blocks.append({"type": "thinking", "thinking": message.get("reasoning_text") or "",
                               "signature": message["reasoning_opaque"]})
            blocks += _anthropic_content(message.get("content"))
            blocks += [{"type": "tool_use", "id": call["id"], "name": call["function"]["name"],
                        "input": _parse_arguments(call["function"]["arguments"])}
                       for call in message.get("tool_calls", [])]
            push("assistant", blocks)
        else:
            push("user", _anthropic_content(message["content"]))
    return system, messages


def _chat_tools_as_anthropic(chat):
    """A chat request's tools and tool_choice as Anthropic's (``required`` is ``any``), a
    prompt-cache breakpoint on the last tool: tool definitions are a long, stable prefix."""
    tools = [{"name": f["name"], "description": f.get("description") or "",
              "input_schema": f["parameters"]} for f in (t["function"] for t in chat["tools"])]
    tools[-1]["cache_control"] = {"type": "ephemeral"}
    choice = chat.get("tool_choice", "auto")
    if isinstance(choice, dict):
        tool_choice = {"type": "tool", "name": choice["function"]["name"]}
    else:
        tool_choice = {"type": {"required": "any"}.get(choice, choice)}
    if chat.get("parallel_tool_calls") is False and choice != "none":
        tool_choice["disable_parallel_tool_use"] = True
    return {"tools": tools, "tool_choice": tool_choice}


def chat_to_anthropic_request(chat, info):
    """A chat request (as responses_to_chat_request makes it) as an Anthropic Messages request,
    for Claude on Copilot's /v1/messages: system messages into ``system``, turns of one role
    merged (Messages alternates), tool results first in their user turn, thinking blocks with
    their signatures, and prompt-cache breakpoints on the system prompt, the tools and the newest
    turn (OpenAI clients expect caching without asking; Claude caches only where marked). The
    chat request's ``reasoning_effort`` becomes a thinking budget."""
    system, messages = _chat_messages_as_anthropic(chat["messages"])
    limits = _dig(info, "capabilities", "limits")
    # Copilot caps whole (non-stream) answers lower than streamed ones
    whole = 0 if chat.get("stream") else _count(limits, "max_non_streaming_output_tokens")
    request = {"model": chat["model"], "messages": messages, "max_tokens": chat.get("max_tokens")
               or whole or _count(limits, "max_output_tokens") or 8192}
    if system:
        _mark_cache(system)
        request["system"] = system
    if messages:
        _mark_cache(messages[-1]["content"])
    if chat.get("stream"):
        request["stream"] = True
    if chat.get("user"):
        request["metadata"] = {"user_id": chat["user"]}
    if chat.get("tools"):
        request.update(_chat_tools_as_anthropic(chat))
    forced = _dig(request, "tool_choice").get("type") in ("any", "tool")
    thinking_budget = thinking_budget_for(chat.get("reasoning_effort"), info, request["max_tokens"])
    if thinking_budget and not forced:  # Claude thinks only when it may pick its tool
        request["thinking"] = {"type": "enabled", "budget_tokens": thinking_budget}
    else:  # thinking takes neither (Anthropic refuses them)
        _copy_given(request, chat, "temperature", "top_p")
    return request


# -- 8f. Embeddings requests, images by URL -------------------------------------------------

def prepare_embeddings_request(payload):
    """(Copilot request, encoding_format) for an OpenAI embeddings request."""
    model = check(payload, "model", "string")
    if not model:
        raise ClientError(400, "'model' is required", param="model", code="model_required")
    text = payload.get("input")
    if isinstance(text, str):
        text = [text]
    if not isinstance(text, list) or not text:
        raise ClientError(400, "'input' must be a string or a non-empty array of strings",
                          param="input")
    if not all(isinstance(t, str) for t in text):
        raise ClientError(400, "'input' must hold strings: Copilot does not take token arrays",
                          param="input", code="token_arrays_not_supported")
    encoding = payload.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise ClientError(400, "encoding_format must be 'float' or 'base64'",
                          param="encoding_format")
    request = {"model": model, "input": text}
    dimensions = check(payload, "dimensions", "integer")
    if dimensions is not None:
        if dimensions < 1:
            raise ClientError(400, "'dimensions' must be a positive integer", param="dimensions")
        request["dimensions"] = dimensions
    return request, encoding


def remote_images(payload):
    """[(part, kind, url)] for every image given by http(s) URL in a request's content (see
    content_parts): OpenAI chat ``image_url`` parts, Responses ``input_image`` parts, Anthropic
    ``url`` image sources."""
    found = []
    for part, kind in content_parts(payload):
        if kind == "image_url":
            url = get_typed(part, "image_url", dict, {}).get("url")
        elif kind == "input_image":
            url = part.get("image_url")
        elif kind == "image" and _dig(part, "source").get("type") == "url":
            url = part["source"].get("url")
        else:
            continue
        if isinstance(url, str) and url[:8].lower().startswith(("http://", "https://")):
            found.append((part, kind, url))
    return found


def inline_image(node, kind, media_type, encoded, data_url):
    """Replace the URL of an image found by remote_images with the image itself (``encoded``:
    its base64 text; ``data_url``: the same as a data: URL; both shared by every use of a URL)."""
    if kind == "image":
        node["source"] = {"type": "base64", "media_type": media_type, "data": encoded}
    elif kind == "input_image":
        node["image_url"] = data_url
    else:
        node["image_url"] = dict(node["image_url"], url=data_url)


def url_for_message(url):
    """``scheme://host:port/path`` of a URL for a message: credentials (user info, signed queries)
    left out, and never more than 200 characters."""
    try:
        parts = urllib.parse.urlsplit(url)
        shown = "%s://%s%s%s" % (parts.scheme, parts.netloc.rpartition("@")[2], parts.path,
                                 "?..." if parts.query else "")
    except ValueError:
        shown = "a malformed URL"
    return shown if len(shown) <= 200 else shown[:197] + "..."


def check_image_limits(images, model, info):
    """400 for fetched images the model's catalogue ``limits.vision`` says it cannot take."""
    limits = _dig(info, "capabilities", "limits", "vision")
    types, largest = limits.get("supported_media_types"), limits.get("max_prompt_image_size")
    for url, (media_type, data) in images.items():
        if isinstance(types, list) and types and media_type not in types:
            raise ClientError(400, "the image at %s is %s; %s accepts %s" % (
                url_for_message(url), media_type, model, ", ".join(map(str, types))),
                code="image_not_supported")
        if isinstance(largest, int) and 0 < largest < len(data):
            raise ClientError(400, "the image at %s is %s; %s accepts at most %s per image" % (
                url_for_message(url), format_size(len(data)), model, format_size(largest)),
                code="image_too_large")


# -- 8g. Ollama's API: requests -------------------------------------------------------------
# JetBrains AI Assistant, VS Code Copilot's "Ollama" provider, Open WebUI and AnythingLLM speak
# Ollama's API. An /api/chat or /api/generate request becomes an OpenAI chat request here, and
# plan_ollama (9i) plans it like any other chat request.

#: Ollama's think levels (besides true and false), sent to Copilot as reasoning efforts ...
OLLAMA_THINK_LEVELS = ("low", "medium", "high", "max")

#: ... or, for models that take a thinking budget instead (Claude on chat completions), these.
_THINK_BUDGETS = {"low": 1024, "medium": 4096, "high": 16384, "max": 32000}

_IMAGE_SIGNATURES = ((b"\x89PNG", "image/png"), (b"\xff\xd8\xff", "image/jpeg"),
                     (b"GIF8", "image/gif"), (b"RIFF", "image/webp"))


def model_thinks(supports):
    """Whether a catalogue entry's ``supports`` says the model can reason before answering."""
    budget = _whole(supports.get("max_thinking_budget"))
    adaptive = supports.get("adaptive_thinking") is True
    return bool(supports.get("reasoning_effort")) or bool(budget) or adaptive


def validate_ollama_request(payload, kind):
    """Check the fields coproxy reads of an /api/chat (``kind`` "chat") or /api/generate request."""
    check(payload, "model", "string", required=True)
    if kind == "chat":
        for index, message in enumerate(check_items(payload, "messages")):
            where = "messages[%d]." % index
            check(message, "role", "string", where, required=True)
            check_fields(message, where, content="string", thinking="string", tool_name="string",
                         tool_call_id="string")
            check_items(message, "images", where, kinds="string")
            for position, call in enumerate(check_items(message, "tool_calls", where)):
                call_where = "%stool_calls[%d]." % (where, position)
                check(call, "id", "string", call_where)
                check_fields(check(call, "function", "object", call_where, required=True),
                             call_where + "function.", name="string", arguments="object")
    else:
        check_fields(payload, prompt="string", system="string", suffix="string")
        check_items(payload, "images", kinds="string")
    for index, tool in enumerate(check_items(payload, "tools")):
        where = "tools[%d]." % index
        check_fields(check(tool, "function", "object", where), where + "function.", name="string",
                     parameters="object")
    check_fields(payload, format=("string", "object"), stream="boolean")
    think = check(payload, "think", ("boolean", "string"))
    if isinstance(think, str) and think not in OLLAMA_THINK_LEVELS:
        raise ClientError(400, "think must be true, false or one of %s"
                          % ", ".join(OLLAMA_THINK_LEVELS), param="think")
    options = check(payload, "options", "object") or {}
    check_fields(options, "options.", temperature="number", top_p="number", num_predict="integer",
                 seed="integer", stop=("string", "array"))


def ollama_image_part(encoded, where):
    """A base64 image of an Ollama message as a chat image part (a data: URL, media type read
    from the image's first bytes)."""
    if encoded.startswith("data:"):
        return {"type": "image_url", "image_url": {"url": encoded}}
    try:
        head = base64.b64decode(encoded[:16], validate=True)
    except ValueError:
        head = b""
    media_type = next((kind for sign, kind in _IMAGE_SIGNATURES if head.startswith(sign)), None)
    if media_type is None:
        raise ClientError(400, "%s is not a base64 PNG, JPEG, GIF or WebP image" % where,
                          param=where, code="invalid_image")
    return {"type": "image_url", "image_url": {"url": "data:%s;base64,%s" % (media_type, encoded)}}


def _ollama_content(text, images, where):
    if not images:
        return text
    return ([{"type": "text", "text": text}] if text else []) + [
        ollama_image_part(image, "%s[%d]" % (where, index)) for index, image in enumerate(images)]


def _ollama_calls_as_chat(calls, index):
    """An Ollama assistant message's tool calls as chat's: arguments as JSON text, and an id
    made up (from the message's ``index``) where Ollama sent none."""
    return [{"id": call.get("id") or "call_%d_%d" % (index, position), "type": "function",
             "function": {"name": call["function"].get("name") or "",
                          "arguments": json.dumps(call["function"].get("arguments") or {})}}
            for position, call in enumerate(calls)]


def ollama_messages(payload, kind):
    """The chat messages of an Ollama request. Ollama's tool calls may have no id and its tool
    results name only the tool, so calls get ids and each result answers the first open call of
    that name (or the first open call); a result that answers no call becomes the user's text."""
    if kind == "generate":
        system = payload.get("system")
        prompt = _ollama_content(payload.get("prompt") or "", payload.get("images"), "images")
        return ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}]
    out, open_calls = [], []
    for index, message in enumerate(payload.get("messages") or []):
        role, text = message["role"], message.get("content") or ""
        if role == "assistant":
            calls = _ollama_calls_as_chat(message.get("tool_calls") or [], index)
            open_calls = [(call["id"], call["function"]["name"]) for call in calls]
            out.append({"role": "assistant", "content": text or None})
            if calls:
                out[-1]["tool_calls"] = calls
        elif role == "tool":
            wanted = message.get("tool_call_id"), message.get("tool_name")
            answered = (next((c for c in open_calls if c[0] == wanted[0]), None)
                        or next((c for c in open_calls if c[1] == wanted[1]), None)
                        or (open_calls[0] if open_calls else None))
            if answered is None:
                text = "Result of the %s tool: %s" % (wanted[1] or "a", text)
                out.append({"role": "user", "content": text})
                continue
            open_calls.remove(answered)
            out.append({"role": "tool", "tool_call_id": answered[0], "content": text})
        else:
            out.append({"role": role, "content": _ollama_content(text, message.get("images"),
                                                                 "messages[%d].images" % index)})
    return out


def ollama_to_chat_request(payload, kind, model, info):
    """An /api/chat or /api/generate request as an OpenAI chat request: options, tools, format
    (``"json"`` or a JSON schema) and think (an effort, or a budget for models that take one)."""
    stream = payload.get("stream") is not False  # Ollama streams unless told not to
    request = {"model": model, "messages": ollama_messages(payload, kind), "stream": stream}
    if stream:
        request["stream_options"] = {"include_usage": True}
    options = payload.get("options") or {}
    _copy_given(request, options, "temperature", "top_p", "seed")
    if (options.get("num_predict") or 0) > 0:  # -1: no limit
        request["max_tokens"] = options["num_predict"]
    if options.get("stop"):
        request["stop"] = [options["stop"]] if isinstance(options["stop"], str) else options["stop"]
    if payload.get("tools"):
        request["tools"] = payload["tools"]
    fmt = payload.get("format")
    if fmt == "json":
        request["response_format"] = {"type": "json_object"}
    elif isinstance(fmt, dict):
        request["response_format"] = _responses_format_as_chat({"type": "json_schema",
                                                                "schema": fmt})
    think = payload.get("think")
    level = think if isinstance(think, str) else "medium" if think is True else None
    supports = _dig(info, "capabilities", "supports")
    if level and supports.get("reasoning_effort"):
        request["reasoning_effort"] = level  # fitted to what the model takes, as for every route
    elif level and model_thinks(supports):
        low = _whole(supports.get("min_thinking_budget")) or 1024
        high = _whole(supports.get("max_thinking_budget")) or 32000
        request["thinking_budget"] = max(low, min(_THINK_BUDGETS[level], high))
    elif level and info:
        raise ClientError(400, "%r does not support thinking" % model, param="think")
    return request


# ------------------------------------------------------------------------------------------
# 9. Answers and plans (pure)
#    What comes back, up to what the client reads: SSE items and the client dialects, Copilot's
#    errors, usage and cost, and the translators (whole answers and streams) from each upstream
#    shape back to the caller's. The plans at the end join both halves: one value per request
#    saying what §8 sends and which translator of this section brings the answer back.
#    Like §8: dicts or bytes in, items out; no I/O, no clock (callers pass ``now``).
# ------------------------------------------------------------------------------------------

# -- 9a. Server-sent events: items in, items out, one encoder per dialect -------------------
# Upstream SSE is decoded once into items ``(event, data)``: ``event`` is the SSE event name or
# None, ``data`` the text of the event or, once a translator has built it, a dict. Translators
# (9d-9f) map items to items; StreamError is the one special item, a failure for the client's
# dialect to spell. The dialect's encoder writes the wire bytes at the very end.

class SSEDecoder:
    """Incremental SSE parser (WHATWG rules): LF, CR or CRLF line ends, multi-line ``data:``,
    comments, and UTF-8 characters split across reads (data is decoded per whole event)."""

    def __init__(self):
        self._pending = b""
        self._data = []
        self._event = None

    def feed(self, chunk):
        """Bytes in, complete events out: a list of (event name or None, data text)."""
        buf = self._pending + chunk if self._pending else chunk
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
                    events.append((self._event, b"\n".join(self._data).decode("utf-8", "replace")))
                self._data = []
                self._event = None
            elif line[:1] != b":":  # a line that starts with ":" is a comment
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
    """One SSE frame of bytes ``data`` (each of its lines its own ``data:`` line)."""
    if b"\n" in data or b"\r" in data:
        data = b"\ndata: ".join(data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n"))
    if event:
        return b"event: " + event.encode("utf-8") + b"\ndata: " + data + b"\n\n"
    return b"data: " + data + b"\n\n"


class StreamError:
    """An item that ends a stream with a failure, spelled by the client's dialect."""

    __slots__ = ("message", "code")

    def __init__(self, message, code=None):
        self.message = message
        self.code = code


def openai_error_body(message, kind="api_error", code=None, param=None):
    """``{"error": {"message", "type", "param", "code"}}``, OpenAI's envelope."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


#: Where Anthropic's error types differ from OpenAI's.
_ANTHROPIC_ERROR_TYPES = {413: "request_too_large", 503: "overloaded_error",
                          529: "overloaded_error"}


def anthropic_error_body(status, message):
    """``{"type": "error", "error": {"type", "message"}}``, Anthropic's envelope."""
    kind = _ANTHROPIC_ERROR_TYPES.get(status) or error_type_for_status(status)
    return {"type": "error", "error": {"type": kind, "message": message}}


def encode_sse_item(item):
    event, data = item
    return encode_sse(data.encode("utf-8") if isinstance(data, str) else json_dumps(data), event)


def encode_ndjson_item(item):
    """One line of newline-delimited JSON (Ollama's streams): the item's data, then LF."""
    data = item[1]
    return (data.encode("utf-8") if isinstance(data, str) else json_dumps(data)) + b"\n"


# A whole (non-stream) answer is its stream folded: the upstream's whole answer is replayed as
# the items its stream would have carried, goes through the same translators (translate_whole),
# and the client's dialect folds the items that come out into the one object its API answers
# with. So a streamed answer and a whole one are the same translation and cannot drift apart.

def _fold_chat_delta(message, delta):
    """One chunk's delta into the whole message: text pieces appended, other fields set, tool
    call pieces joined by their index (a dict until fold_chat_chunks lists them). Empty pieces
    add nothing, so a message without text keeps ``content: null``, as OpenAI's answers do."""
    for key, value in delta.items():
        if key == "tool_calls":
            for piece in value:
                call = message.setdefault("tool_calls", {}).setdefault(_index(piece), {
                    "id": None, "type": "function", "function": {"name": "", "arguments": ""}})
                call.update((k, piece[k]) for k in ("id", "type") if piece.get(k))
                for name, text in _dig(piece, "function").items():
                    if isinstance(text, str):
                        call["function"][name] = call["function"].get(name, "") + text
        elif isinstance(value, str) and key != "role":
            if value:
                message[key] = (message.get(key) or "") + value
        elif value is not None:
            message[key] = value


def fold_chat_chunks(items):
    """Chat completion chunks folded into the chat.completion they spell: every field of the
    chunks kept (usage and copilot_usage come in the last), choices by index with their
    deltas joined and their finish_reason."""
    answer, choices = {}, {}
    for _, chunk in items:
        if not isinstance(chunk, dict):  # [DONE]
            continue
        for key, value in chunk.items():  # the answer's own id, created and model: the first
            if key in ("id", "created", "model"):  # chunk's (the ones made after it are ours)
                answer.setdefault(key, value)
            elif key != "choices":
                answer[key] = value
        for piece in chunk["choices"]:
            choice = choices.setdefault(_index(piece), {
                "index": _index(piece), "finish_reason": None, "logprobs": None,
                "message": {"role": "assistant", "content": None, "refusal": None}})
            _fold_chat_delta(choice["message"], piece.get("delta") or {})
            choice.update((key, value) for key, value in piece.items()
                          if value is not None and key not in ("delta", "index"))
    for choice in choices.values():
        calls = choice["message"].get("tool_calls")
        if calls:
            choice["message"]["tool_calls"] = [calls[index] for index in sorted(calls)]
            for call in choice["message"]["tool_calls"]:  # a call without arguments: "{}", which
                call["function"]["arguments"] = call["function"]["arguments"] or "{}"  # parses
    answer.update(object="chat.completion", choices=[choices[i] for i in sorted(choices)])
    answer.setdefault("usage", {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0})
    return answer


#: The field of its block each kind of Anthropic content_block_delta adds to.
_ANTHROPIC_DELTA_FIELDS = {"text_delta": "text", "thinking_delta": "thinking",
                           "signature_delta": "signature", "input_json_delta": "partial_json"}


def fold_anthropic_events(items):
    """Anthropic Messages events folded into the message they spell: message_start's message,
    each block as it started with its deltas added (a tool's input JSON parsed once whole),
    message_delta's stop reason and usage."""
    message, inputs = None, {}
    for kind, event in items:
        if kind == "message_start":
            message = dict(event["message"], content=[])
        elif kind == "content_block_start":
            message["content"].append(dict(event["content_block"]))
        elif kind == "content_block_delta":
            field = _ANTHROPIC_DELTA_FIELDS[event["delta"]["type"]]
            if field == "partial_json":
                inputs[event["index"]] = inputs.get(event["index"], "") + event["delta"][field]
            else:
                message["content"][event["index"]][field] += event["delta"][field]
        elif kind == "message_delta":
            message.update(event["delta"], usage=dict(message["usage"], **event["usage"]))
    for index, text in inputs.items():
        message["content"][index]["input"] = _parse_arguments(text)
    return message


def fold_ollama_objects(items):
    """Ollama's stream objects as its one answer: the last (done) object with the text,
    thinking and tool calls of those before, under ``message`` or at the top (/api/generate)."""
    answer = dict(items[-1][1])
    if "message" in answer:
        answer["message"] = dict(answer["message"])
    whole = answer.get("message", answer)
    for _, part in items[:-1]:
        piece = part.get("message", part)
        for key in ("content", "response", "thinking"):
            if piece.get(key):
                whole[key] = whole.get(key, "") + piece[key]
        if piece.get("tool_calls"):
            whole["tool_calls"] = whole.get("tool_calls", []) + piece["tool_calls"]
    return answer


class Dialect:
    """How one client API spells things on the wire: answers, stream items (``encode``, sent as
    ``stream_type``), a stream failure, a keep-alive ping (None: the plan brings its own), an
    error envelope, and ``fold``: a stream's items as the one object of a whole answer. One
    instance per API (OPENAI, RESPONSES, ANTHROPIC, OLLAMA)."""

    def __init__(self, ping, stream_error, envelope, fold, encode=encode_sse_item,
                 stream_type="text/event-stream; charset=utf-8"):
        self.ping = ping
        self.fold = fold
        self._stream_error = stream_error
        self._envelope = envelope
        self.encode = encode
        self.stream_headers = [("Content-Type", stream_type), ("Cache-Control", "no-cache"),
                               ("X-Accel-Buffering", "no")]

    def stream_error(self, message, code=None, sequence_number=0):
        """The bytes of the one event that ends a failed stream (``sequence_number``: the next
        one of the stream, which Responses events carry)."""
        return self.encode(self._stream_error(message, code or "upstream_stream_error",
                                              sequence_number))

    def envelope(self, error):
        """The JSON body of an error answer (``error`` is a ClientError)."""
        return json_dumps(self._envelope(error))


OPENAI = Dialect(b": ping\n\n",
                 lambda message, code, _: (None, openai_error_body(message, "api_error", code)),
                 lambda e: openai_error_body(str(e), e.kind, e.code, e.param), fold_chat_chunks)

RESPONSES = Dialect(b": ping\n\n",
                    lambda message, code, sequence: ("error", {
                        "type": "error", "code": code, "message": message, "param": None,
                        "sequence_number": sequence}),
                    lambda e: openai_error_body(str(e), e.kind, e.code, e.param),
                    lambda items: items[-1][1]["response"])  # the last event has it whole

ANTHROPIC = Dialect(encode_sse(b'{"type":"ping"}', "ping"),
                    lambda message, code, _: ("error", anthropic_error_body(500, message)),
                    lambda e: anthropic_error_body(e.status, str(e)), fold_anthropic_events)

#: Ollama's API: NDJSON streams, ``{"error": "..."}`` for errors (a line of its own mid-stream),
#: and no comment syntax for pings: its plans ping with an empty line of their answer's shape.
OLLAMA = Dialect(None, lambda message, code, _: (None, {"error": message}),
                 lambda e: {"error": str(e)}, fold_ollama_objects, encode=encode_ndjson_item,
                 stream_type="application/x-ndjson")


def run_stage(mapper, items):
    """``items`` through one translator; a StreamError passes unchanged (the encoder ends the
    stream at it)."""
    out = []
    for item in items:
        out.extend([item] if isinstance(item, StreamError) else mapper.feed(item[0], item[1]))
    return out


class StreamTranslation:
    """Upstream SSE bytes in, the client's wire bytes out: decode once, map the items through
    ``chain`` (translators, each turning one format's items into the next one's), encode in the
    client's ``dialect``. The end rule lives here, the same for every route: each stage must have
    seen its input's own end marker (``[DONE]``/a finish, ``message_stop``, ``response.completed``),
    else the client gets the dialect's error event and no normal end."""

    INCOMPLETE = "Copilot closed the stream before the answer was complete"

    def __init__(self, chain, dialect):
        self.chain = chain
        self.dialect = dialect
        self.decoder = SSEDecoder()
        self.finished = False   # an end (normal or failed) has been written
        self.failure = None     # the message of a failed end

    @property
    def source(self):
        """The first translator: the one that read the upstream's own items (usage lives there)."""
        return self.chain[0]

    def _run(self, items, start=0):
        """``items`` through the chain's stages from ``start``; a StreamError passes
        every stage unchanged."""
        for mapper in self.chain[start:]:
            items = run_stage(mapper, items)
        return items

    def _encode(self, items):
        """Items as the dialect's bytes, up to the first StreamError, which ends
        the stream."""
        out = []
        for item in items:
            if isinstance(item, StreamError):
                out.append(self._fail(item.message, item.code))
                break
            out.append(self.dialect.encode(item))
        return b"".join(out)

    def _fail(self, message, code=None):
        self.finished = True
        self.failure = message
        return self.dialect.stream_error(message, code, self.chain[-1].next_sequence_number)

    def feed(self, data):
        """Upstream body bytes → client bytes (b"" when nothing is complete yet)."""
        if self.finished:
            return b""
        events = self.decoder.feed(data)
        if not events:
            return b""
        if len(self.chain) == 1:  # the usual case, without _run's generality
            feed, items = self.chain[0].feed, []
            for event, text in events:
                items.extend(feed(event, text))
            return self._encode(items)
        return self._encode(self._run(events))

    def end(self):
        """The upstream body ended cleanly: the translators' closing items, or the failure."""
        if self.finished:
            return b""
        out = [self._encode(self._run(self.decoder.finish()))]
        items = []  # the closing items of the stages before, entering this one
        for index, mapper in enumerate(self.chain):
            if self.finished:
                return b"".join(out)
            fed = run_stage(mapper, items)
            failed = any(isinstance(item, StreamError) for item in fed)
            if not (mapper.complete or failed):
                out.append(self._encode(self._run(fed, index + 1)))
                if not self.finished:
                    out.append(self._fail(self.INCOMPLETE, "incomplete_stream"))
                return b"".join(out)
            items = fed if failed else fed + mapper.end()
        out.append(self._encode(items))
        self.finished = True
        return b"".join(out)

    def fail(self, message, code=None):
        """The upstream broke (cut, timeout): one error event, unless the stream already ended."""
        return b"" if self.finished else self._fail(message, code)


class Translator:
    """Base of the stream translators: ``feed(event, data)`` → items, ``end()`` → the closing
    items once the upstream ended cleanly; ``complete`` once its input's end marker was seen;
    ``usage`` what the upstream said the answer cost (see 9c)."""

    complete = False
    usage = None
    #: the sequence_number the next Responses event would carry (Responses streams count them)
    next_sequence_number = 0

    def end(self):
        return []


def parse_event_json(data):
    """An event's data as a dict: None for non-objects, StreamError for malformed JSON."""
    if isinstance(data, dict):
        return data
    try:
        value = json.loads(data)
    except (ValueError, RecursionError):
        return StreamError("Copilot sent a malformed stream event", "bad_upstream_event")
    return value if isinstance(value, dict) else None


def translate_whole(chain, dialect, items):
    """Stream ``items`` (a whole answer replayed) through ``chain``, folded by ``dialect``; a
    failure the stream would have ended with (Copilot's error) is a 502 with its message."""
    for translator in chain:
        items = run_stage(translator, items) + translator.end()
        for item in items:
            if isinstance(item, StreamError):
                raise ClientError(502, item.message, code=item.code or "bad_upstream_response")
    return dialect.fold(items)


# -- 9b. Error envelopes and what Copilot's errors mean -------------------------------------

_RETRY_AFTER_IN_TEXT = re.compile(r"retry after (\d+(?:\.\d+)?) ?(second|minute|hour)", re.I)

#: Waits this short are worth one automatic retry of a transient 429/503 (longer ones are not).
TRANSIENT_RETRY_SECONDS = 5


def parse_retry_after(value, now):
    """Seconds from a Retry-After value (delta-seconds or an HTTP date), or None."""
    value = (value or "").strip()
    if value.isdigit() and value.isascii():
        return int(value)
    try:
        import email.utils  # rare: only dated Retry-After values
        return max(0, int(email.utils.parsedate_to_datetime(value).timestamp() - now))
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


UpstreamVerdict = collections.namedtuple("UpstreamVerdict", "error window wait transient")


def _quota_window(status, text):
    """The quota a 429 says is used up ("weekly", "5-hour session"), or None for a plain 429."""
    if status == 429 and "weekly" in text:
        return "weekly"
    if status == 429 and ("session limit" in text or "user_global_rate_limited" in text):
        return "5-hour session"
    return None


def _limit_message(window, message, wait, now):
    """Copilot's message on a used-up quota, with when it ends (local time) when known."""
    ends = ""
    if wait is not None:
        at = time.strftime("%Y-%m-%d %H:%M %Z", time.localtime(now + wait))
        ends = " It ends at %s (in %s)." % (at, format_duration(wait))
    return "Copilot's %s limit is reached: %s%s Requests are not retried automatically." % (
        window, message.rstrip(), ends)


def client_error_from_upstream(status, raw, headers, now, identity=None):
    """What a non-2xx Copilot answer means for our client: UpstreamVerdict(error, window, wait,
    transient). ``error`` keeps the upstream status, message, code and retry-after; a 5-hour
    session or weekly limit names its ``window`` and when it ends (the wait is often only in the
    message text); a 466 names the identity options; ``transient`` marks a short plain 429/503
    worth one retry. ``identity`` is (editor version, plugin version) for the 466 message."""
    message, fields = upstream_error_message(raw)
    message = message or "Copilot answered HTTP %d %s" % (status, REASONS.get(status, ""))
    kind = get_typed(fields, "type", str) or None
    if kind in (None, "error", ""):
        kind = error_type_for_status(status)
    code = get_typed(fields, "code", (str, int))
    code = None if code == "" else code
    param = get_typed(fields, "param", str) or None
    headers = headers or {}
    wait = parse_retry_after(headers.get("retry-after"), now)
    match = _RETRY_AFTER_IN_TEXT.search(message)
    if wait is None and match:
        unit = {"second": 1, "minute": 60, "hour": 3600}[match.group(2).lower()]
        wait = int(float(match.group(1)) * unit)
    window = _quota_window(status, (message + " " + str(code or "")).lower())
    passed = [(name.title() if name == "retry-after" else name, headers[name])
              for name in ("retry-after", "x-ratelimit-exceeded") if headers.get(name)]
    if window:
        if wait is not None and not headers.get("retry-after"):
            passed.insert(0, ("Retry-After", str(wait)))
        message = _limit_message(window, message, wait, now)
        code = code or ("user_weekly_rate_limited" if window == "weekly"
                        else "user_global_rate_limited")
    elif status == 466:
        editor, plugin = identity or (DEFAULT_EDITOR_VERSION, DEFAULT_EDITOR_PLUGIN_VERSION)
        message = ("Copilot refused this client version (HTTP 466: %s). Start coproxy with a newer "
                   "--editor-version and --editor-plugin-version (now %s and %s), or update coproxy"
                   % (message.rstrip(". "), editor, plugin))
        code = "client_version_refused"
    error = ClientError(status, message, kind=kind, code=code, param=param, headers=passed)
    transient = window is None and (
        (status == 429 and wait is not None and wait <= TRANSIENT_RETRY_SECONDS) or
        (status == 503 and (wait is None or wait <= TRANSIENT_RETRY_SECONDS)))
    return UpstreamVerdict(error, window, wait, transient)


# -- 9c. Usage and cost ---------------------------------------------------------------------
# One shape for what an answer used, whatever its API: input (prompt tokens, cached included),
# cached, output, reasoning, and nano_aiu (Copilot's own price of the answer in nano AI credits,
# ``copilot_usage.total_nano_aiu``; 1 credit = 1e9 nano-AIU = US$0.01), None when not reported.

NANO_AIU_PER_CREDIT = 1e9


def _nano_aiu(copilot_usage):
    value = get_typed(copilot_usage, "total_nano_aiu", (int, float))
    return value if _is_kind(value, "number") and value >= 0 else None


def usage_from_chat(usage, copilot_usage=None, spelling=("prompt", "completion")):
    """Chat's usage (or, with Responses' ``spelling``, a Responses usage) in the one shape."""
    given, made = spelling
    return {"input": _count(usage, given + "_tokens"),
            "cached": _count(usage, given + "_tokens_details", "cached_tokens"),
            "output": _count(usage, made + "_tokens"),
            "reasoning": _count(usage, made + "_tokens_details", "reasoning_tokens"),
            "nano_aiu": _nano_aiu(copilot_usage)}


def usage_from_responses(usage, copilot_usage=None):
    return usage_from_chat(usage, copilot_usage, ("input", "output"))


def usage_from_anthropic(usage, copilot_usage=None):
    """Anthropic's usage in the one shape: its input_tokens leave out the cache's
    reads and writes, which count as input here."""
    cached = _count(usage, "cache_read_input_tokens")
    written = _count(usage, "cache_creation_input_tokens")
    return {"input": _count(usage, "input_tokens") + cached + written,
            "cached": cached, "output": _count(usage, "output_tokens"),
            "reasoning": _count(usage, "output_tokens_details", "thinking_tokens"),
            "nano_aiu": _nano_aiu(copilot_usage)}


def merge_usage(old, new):
    """Two reports of one answer (Anthropic streams give input at the start, output at the end)."""
    if old is None:
        return new
    merged = {key: max(old[key], new[key]) for key in ("input", "cached", "output", "reasoning")}
    merged["nano_aiu"] = new["nano_aiu"] if new["nano_aiu"] is not None else old["nano_aiu"]
    return merged


#: How each Copilot path spells an answer's usage.
_USAGE_READERS = {"/responses": usage_from_responses, "/v1/messages": usage_from_anthropic,
                  "/chat/completions": usage_from_chat, "/embeddings": usage_from_chat}


def usage_of_answer(path, data):
    """The usage of a whole (non-stream) upstream answer, by the API it came from."""
    if not isinstance(data, dict) or path not in _USAGE_READERS:
        return None
    return _USAGE_READERS[path](data.get("usage"), data.get("copilot_usage"))


def _price(prices, *names):
    """The first of ``names`` that is a number in ``prices`` (GitHub spells
    them both in snake_case and camelCase)."""
    return next((prices[name] for name in names if _is_kind(prices.get(name), "number")), None)


def estimate_credits(usage, info):
    """AI credits of an answer from the token counts and the model's catalogue prices
    (``billing.token_prices``: credits per ``batch_size`` tokens; a ``long_context`` tier applies
    above the default tier's ``context_max``), or None when the catalogue has no prices."""
    billing = _dig(info, "billing")
    prices = get_typed(billing, "token_prices", dict, _dig(billing, "tokenPrices"))
    if not prices:
        return None
    batch = _price(prices, "batch_size", "batchSize") or 1000000
    tier = _dig(prices, "default") or prices
    long_tier = _dig(prices, "long_context") or _dig(prices, "longContext")
    ceiling = _price(tier, "context_max", "contextMax", "max_prompt_tokens")
    if long_tier and ceiling and usage["input"] > ceiling:
        tier = long_tier
    input_price = _price(tier, "input_price", "inputPrice")
    output_price = _price(tier, "output_price", "outputPrice")
    if input_price is None or output_price is None:
        return None
    cache_price = _price(tier, "cache_read_price", "cacheReadPrice", "cache_price", "cachePrice")
    cached = usage["cached"] if cache_price is not None else 0
    total = ((usage["input"] - cached) * input_price + cached * (cache_price or 0)
             + usage["output"] * output_price)
    return total / batch


def parse_ratelimit_header(value):
    """``x-usage-ratelimit-session:
    ent=0&ov=0.0&ovPerm=false&rem=99.6&rst=2026-04-22T14%3A30%3A56Z`` →
    {"percent_remaining": 99.6, "resets_at": "2026-04-22T14:30:56Z"}; None when unreadable."""
    fields = dict(urllib.parse.parse_qsl(value or ""))
    try:
        remaining = float(fields["rem"])
    except (KeyError, ValueError):
        return None
    return {"percent_remaining": remaining, "resets_at": fields.get("rst")}


def summarize_quota(user):
    """Plan and quotas from /copilot_internal/user, in one flat shape. Token-billed accounts
    (``token_based_billing``, or ``credits_used`` on a snapshot) get the AI-credit pool as
    ``credits``; request-billed ones keep ``premium_requests``; -1 means unlimited."""
    snapshots = get_typed(user, "quota_snapshots", dict, {})

    def bucket(name):
        """One quota snapshot in a fixed shape; ``used`` worked out from entitlement and
        remaining when GitHub leaves it out (request-billed plans do)."""
        snap = snapshots.get(name)
        if not isinstance(snap, dict):
            return None
        entitlement, remaining = snap.get("entitlement"), snap.get("remaining")
        unlimited = bool(snap.get("unlimited")) or entitlement == -1 or remaining == -1
        used = snap.get("credits_used")
        numbers = all(isinstance(v, (int, float)) for v in (entitlement, remaining))
        if not isinstance(used, (int, float)) and not unlimited and numbers:
            used = entitlement - remaining
        return {"unlimited": unlimited, "entitlement": None if unlimited else entitlement,
                "remaining": None if unlimited else remaining,
                "used": used if isinstance(used, (int, float)) else None,
                "percent_remaining": snap.get("percent_remaining"),
                "overage_count": snap.get("overage_count", 0),
                "overage_permitted": snap.get("overage_permitted", False)}

    token_billed = bool(user.get("token_based_billing")) or any(
        isinstance(s, dict) and ("credits_used" in s or s.get("token_based_billing"))
        for s in snapshots.values())
    pool = bucket("premium_interactions")
    reset = user.get("quota_reset_date_utc") or user.get("quota_reset_date")
    reset_at = _dig(snapshots, "premium_interactions").get("quota_reset_at")
    if not reset and isinstance(reset_at, (int, float)):
        try:
            reset = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(reset_at))
        except (OverflowError, OSError, ValueError):  # past year 9999, or NaN: the reset is unknown
            reset = None
    return {"login": user.get("login"), "plan": user.get("copilot_plan"),
            "sku": user.get("access_type_sku"),
            "billing": "tokens" if token_billed else "requests",
            "credits": pool if token_billed else None,
            "premium_requests": None if token_billed else pool,
            "chat": bucket("chat"), "completions": bucket("completions"), "reset_date": reset}


# -- 9d. OpenAI chat completions answers ----------------------------------------------------

def chat_answer_items(data):
    """A whole chat completion as its stream (see translate_whole): one chunk, each message its
    choice's delta (tool calls numbered, no Azure ``padding``; an empty choice if none, as
    OpenAI has at least one and the translators read id and model from it), then ``[DONE]``."""
    choices = []
    listed = get_typed(data, "choices", list, [])
    if not listed and data.get("error"):  # an error in a 200: a failure, as inside a stream
        return [(None, data)]
    for choice in listed or [{"index": 0, "message": {}}]:
        if not isinstance(choice, dict):
            continue
        delta = {k: v for k, v in _dig(choice, "message").items() if k != "padding"}
        if isinstance(delta.get("content"), list):
            delta["content"] = _plain_text(delta["content"])
        if isinstance(delta.get("tool_calls"), list):
            delta["tool_calls"] = [dict(call, index=index)
                                   for index, call in enumerate(delta["tool_calls"])
                                   if isinstance(call, dict)]
        choices.append(dict({k: v for k, v in choice.items() if k != "message"}, delta=delta))
    return [(None, dict(data, choices=choices)), (None, "[DONE]")]


_KEYS_TO_ACT_ON = ('"tool_calls"', '"usage"', '"copilot_usage"', '"error"', '"object"')


class ChatReader(Translator):
    """A translator whose input is chat completion chunks."""

    raw_usage = copilot_usage = finish_reason = None

    def note_finish(self, reason):
        """A choice's finish_reason (when it has one) into the answer's, which is then complete:
        the first one, but a tool call wins over everything else (Claude's split choices finish
        one by one)."""
        if reason:
            calls = "tool_calls" in (self.finish_reason, reason)
            self.finish_reason = "tool_calls" if calls else self.finish_reason or reason
            self.complete = True

    def take_chat_usage(self, chunk):
        """Usage and Copilot's cost out of a chat chunk: they may come in separate chunks, in
        either order, so each is kept until the other arrives."""
        usage, cost = chunk.pop("usage", None), chunk.pop("copilot_usage", None)
        if isinstance(usage, dict):
            self.raw_usage = usage
        if isinstance(cost, dict):
            self.copilot_usage = cost
        if usage is not None or cost is not None:
            self.usage = usage_from_chat(self.raw_usage, self.copilot_usage)

    @staticmethod
    def said(delta):
        """A chat delta's words: its content, else its refusal. Anthropic's, Ollama's and the
        Responses built here carry a refusal's words as text; dropping them left the client an
        empty answer with no reason given."""
        return _string(delta, "content") or _string(delta, "refusal")

    def open_chunk(self, data):
        """A chat stream's data line as (chunk, None), or (None, items to emit instead): none for
        the end marker, the parse error for a line that is not JSON, the upstream's error for an
        error chunk. Usage and Copilot's cost are taken out of the chunk on the way."""
        if data == "[DONE]":
            self.complete = True
            return None, []
        chunk = parse_event_json(data)
        if not isinstance(chunk, dict):
            return None, ([chunk] if chunk is not None else [])
        if chunk.get("error") and not chunk.get("choices"):  # Copilot's error, mid-stream
            message, fields = upstream_error_message(json.dumps(chunk))
            return None, [StreamError(message or "Copilot reported an error mid-stream",
                                      fields.get("code"))]
        self.take_chat_usage(chunk)
        return chunk, None

    def feed(self, event, data):
        """Each choice of a chunk, with its delta, through read_choice (see open_chunk for the
        end marker, errors and usage). ChatNormalize, which passes whole chunks on, has its own."""
        chunk, instead = self.open_chunk(data)
        if chunk is None:
            return instead
        out = []
        for choice in get_typed(chunk, "choices", list, []):
            if isinstance(choice, dict):
                out += self.read_choice(chunk, choice, _dig(choice, "delta"))
        return out


def chat_chunk(stream, delta=None, finish=None, **extra):
    """A chat.completion.chunk coproxy writes itself, named as ``stream`` (a translator with an
    id, created and model) names its chunks: one choice 0 with ``delta`` and ``finish``, or no
    choice (a usage chunk, its fields in ``extra``). ChatNormalize and ResponsesToChat share it."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish,
                                         "logprobs": None}]
    return (None, dict({"id": stream.id or "chatcmpl-" + random_id(),
                        "object": "chat.completion.chunk", "created": stream.created,
                        "model": stream.model, "choices": choices}, **extra))


class ChatNormalize(ChatReader):
    """Copilot chat chunks in, OpenAI chat.completion.chunk items out.

    What it fixes: chunks without ``object``/``created``/``id``; filter-result and metadata
    chunks with no choices (dropped); usage (sent once, as its own final chunk, only when the
    client asked with stream_options.include_usage, with Copilot's cost beside it); Claude's
    split choices (merged into index 0, tool-call indexes renumbered, one finish_reason at the
    end); an error object in the stream (a StreamError). Complete at ``[DONE]`` or a finish."""

    def __init__(self, model, include_usage, merge, now):
        self.model = model
        self.include_usage = include_usage
        self.merge = merge
        self.created = int(now)
        self.id = None
        self.saw_done = False
        self._tool_index = {}
        self._id_marker = None  # '"id":"chatcmpl-..."', as this stream's chunks spell their id
        self._model_marker = None  # '"model":"..."', likewise for the model

    def feed(self, event, data):
        """One chunk made whole (id, object, created, model) or dropped. A chunk that needs
        only ``object`` goes on as text, unparsed (see _as_it_is): most of a long answer's
        chunks, and parsing them was most of the cost of a stream."""
        if self.saw_done:
            return []
        if data == "[DONE]":
            self.saw_done = self.complete = True
            return []
        if self._as_it_is(data):
            return [(None, '{"object":"chat.completion.chunk",' + data[1:])]
        chunk, instead = self.open_chunk(data)
        if chunk is None:
            return instead
        choices = chunk.get("choices")
        if not isinstance(choices, list) or not choices:
            return []
        if self.id is None:
            self.id = get_typed(chunk, "id", str) or "chatcmpl-" + random_id()
            self._id_marker = '"id":%s' % json.dumps(self.id)
            # One model name per answer: the one Copilot's first chunk names (often a dated
            # snapshot, gpt-4.1-2025-04-14), as in a non-stream answer; every later chunk, the
            # finish and usage chunks coproxy writes included, carries it.
            self.model = _string(chunk, "model") or self.model
            self._model_marker = '"model":%s' % json.dumps(self.model)
        chunk["id"] = self.id
        chunk["object"] = "chat.completion.chunk"
        chunk["created"] = chunk.get("created") or self.created
        chunk["model"] = self.model
        if not self.merge:  # the choices go as they are; a finish is only the stream's end
            if any(isinstance(c, dict) and c.get("finish_reason") for c in choices):
                self.complete = True
            return [(None, chunk)]
        chunk["choices"] = self._merged(choices)
        return [(None, chunk)] if chunk["choices"] else []

    def _merged(self, choices):
        """A chunk's choices folded into choice 0 (Claude on Copilot splits one answer over
        several): tool calls renumbered across them, finish reasons held back for end(), and
        choices left with nothing to say dropped."""
        kept = []
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            finish = choice.get("finish_reason")
            delta = choice.get("delta")
            source_index = _index(choice)
            choice["index"] = 0
            if finish:
                self.note_finish(finish)
                choice["finish_reason"] = None
            if isinstance(delta, dict) and isinstance(delta.get("tool_calls"), list):
                for call in delta["tool_calls"]:
                    if isinstance(call, dict):
                        key = (source_index, _index(call))
                        call["index"] = self._tool_index.setdefault(key, len(self._tool_index))
            if delta or not finish:
                kept.append(choice)
        return kept

    def _as_it_is(self, data):
        """True when the text of a chunk shows it needs nothing but "object": it names this
        stream's id and model, has created, one choice 0, and none of the keys this translator
        acts on (finish_reason other than null, tool_calls, usage, copilot_usage, error, object).
        Most chunks are one text delta, and passing their text on instead of parsing and writing
        them again halves the proxy's CPU per streamed chunk. Keys are looked for as the text
        spells them ("key" with its quotes, as every JSON encoder writes an ASCII key); a string
        value that happens to equal one only sends its chunk down the general path."""
        return (self._id_marker is not None and self._id_marker in data
                and data.count('"index"') == 1
                and '"index":0' in data and '"created":' in data and self._model_marker in data
                and '"created":0' not in data  # the general path fills it in
                and ('"finish_reason"' not in data or '"finish_reason":null' in data)
                and not any(key in data for key in _KEYS_TO_ACT_ON) and data[:1] == "{")

    def end(self):
        """The held-back finish (merged choices) and usage chunks, then [DONE]."""
        items = []
        if self.merge and self.finish_reason:
            items.append(chat_chunk(self, {}, self.finish_reason))
        if self.include_usage and self.raw_usage is not None:
            cost = {} if self.copilot_usage is None else {"copilot_usage": self.copilot_usage}
            items.append(chat_chunk(self, usage=self.raw_usage, **cost))
        items.append((None, "[DONE]"))
        return items


# -- 9e. Anthropic Messages answers <- OpenAI chat ------------------------------------------

_STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use",
                 "function_call": "tool_use", "content_filter": "refusal"}


def _anthropic_usage(usage):
    """Chat usage as Anthropic's: input_tokens without the cached part, which
    Anthropic reports on its own."""
    cached = _count(usage, "prompt_tokens_details", "cached_tokens")
    out = {"input_tokens": max(0, _count(usage, "prompt_tokens") - cached),
           "output_tokens": _count(usage, "completion_tokens")}
    if cached:
        out["cache_read_input_tokens"] = cached
    return out


#: A thinking block as it opens: Anthropic's schema requires ``signature`` ("" until its delta).
THINKING_BLOCK_START = {"type": "thinking", "thinking": "", "signature": ""}


class ChatToAnthropic(ChatReader):
    """OpenAI chat chunks in, Anthropic Messages stream items out, in Anthropic's exact order:
    message_start, then per block content_block_start/delta.../stop, then message_delta (with
    usage, held back until the upstream ends because Copilot sends usage last) and message_stop."""

    def __init__(self, model, estimated_input_tokens=0):
        self.model = model
        self.estimated_input_tokens = estimated_input_tokens
        self.started = False
        self.index = -1
        self.open_type = None
        self.tool_blocks = {}

    def _item(self, data):
        return (data["type"], data)

    def _start(self, chunk_id=None):
        if self.started:
            return []
        self.started = True
        return [self._item({"type": "message_start", "message": {
            "id": (chunk_id if isinstance(chunk_id, str) and chunk_id.startswith("msg_")
                   else "msg_" + (chunk_id if isinstance(chunk_id, str) and chunk_id
                                  else random_id())),
            "type": "message", "role": "assistant", "content": [], "model": self.model,
            "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": self.estimated_input_tokens, "output_tokens": 0}}})]

    def _close(self):
        if self.open_type is None:
            return []
        self.open_type = None
        return [self._item({"type": "content_block_stop", "index": self.index})]

    def _open(self, block):
        out = self._close()
        self.index += 1
        self.open_type = block["type"]
        out.append(self._item({"type": "content_block_start", "index": self.index,
                               "content_block": block}))
        return out

    def _delta(self, delta, index=None):
        return self._item({"type": "content_block_delta",
                           "index": self.index if index is None else index, "delta": delta})

    def read_choice(self, chunk, choice, delta):
        """A chat choice's pieces as Anthropic blocks: thinking (and its signature, which closes
        the block), text, and tool calls (see _tool_use). A new kind of piece closes the open
        block and opens its own: Anthropic's blocks do not interleave."""
        if not self.started:  # the model Copilot names, as the non-stream answer has it
            self.model = _string(chunk, "model") or self.model
        out = self._start(chunk.get("id"))
        reasoning = _string(delta, "reasoning_text")
        signature = _string(delta, "reasoning_opaque")
        if (reasoning or signature) and self.open_type != "thinking":
            out.extend(self._open(dict(THINKING_BLOCK_START)))
        if reasoning:
            out.append(self._delta({"type": "thinking_delta", "thinking": reasoning}))
        if signature:  # it closes the block: a thinking block ends with its signature
            out.append(self._delta({"type": "signature_delta", "signature": signature}))
            out.extend(self._close())
        content = self.said(delta)
        if content:
            if self.open_type != "text":
                out.extend(self._open({"type": "text", "text": ""}))
            out.append(self._delta({"type": "text_delta", "text": content}))
        for call in get_typed(delta, "tool_calls", list, []):
            if isinstance(call, dict):
                out.extend(self._tool_use((_index(choice), _index(call)), call))
        self.note_finish(choice.get("finish_reason"))
        return out

    def _tool_use(self, key, call):
        """A tool call piece: a tool_use block when the call is new (or names its id again),
        its arguments as input_json_delta on that call's block (``key``: choice and call
        index), which need not be the open one."""
        out = []
        function = get_typed(call, "function", dict, {})
        if key not in self.tool_blocks or call.get("id"):
            name = get_typed(function, "name", str, "")
            block_id = call.get("id") or "toolu_" + random_id(24)
            out.extend(self._open({"type": "tool_use", "id": block_id, "name": name, "input": {}}))
            self.tool_blocks[key] = self.index
        if _string(function, "arguments"):
            out.append(self._delta({"type": "input_json_delta",
                                    "partial_json": function["arguments"]},
                                   self.tool_blocks[key]))
        return out

    def end(self):
        """The open block closed, then message_delta with the stop reason and usage
        (the estimate when Copilot sent none) and message_stop."""
        out = self._start() + self._close()
        # str(): Copilot's finish_reason is unchecked and may be any JSON
        stop_reason = ("tool_use" if self.tool_blocks
                       else _STOP_REASONS.get(str(self.finish_reason), "end_turn"))
        usage = _anthropic_usage(self.raw_usage)
        if not self.raw_usage:
            usage["input_tokens"] = self.estimated_input_tokens
        out.append(self._item({"type": "message_delta",
                               "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                               "usage": usage}))
        out.append(self._item({"type": "message_stop"}))
        return out


def event_type(event, data):
    """An event's type: its SSE event name, else the ``type`` field at the start of its JSON."""
    if event:
        return event
    if isinstance(data, dict):
        return data.get("type")
    match = re.search(r'"type"\s*:\s*"([^"]+)"', data[:200])
    return match.group(1) if match else None


class Passthrough(Translator):
    """Copilot's own events for a client of the same API, passed on as they come (re-framed one
    event per frame, so a ping never lands inside one). Complete at one of ``final`` events; the
    usage is read from the few events that carry it."""

    def __init__(self, final, usage_events, read_usage):
        self.final = final
        self.usage_events = usage_events
        self.read_usage = read_usage

    def feed(self, event, data):
        if self.complete:
            return []
        self.next_sequence_number += 1  # Responses streams number their events from 0
        kind = event_type(event, data)
        if kind in self.final:
            self.complete = True
        if kind in self.usage_events:
            parsed = parse_event_json(data)
            if isinstance(parsed, dict):
                self.usage = merge_usage(self.usage, self.read_usage(parsed))
        return [(event, data)]


def _anthropic_event_usage(data):
    usage = (_dig(data, "message", "usage") if data.get("type") == "message_start"
             else data.get("usage"))
    return usage_from_anthropic(usage, data.get("copilot_usage"))


def _responses_event_usage(data):
    return usage_from_responses(_dig(data, "response").get("usage"),
                                data.get("copilot_usage")
                                or _dig(data, "response").get("copilot_usage"))


def anthropic_passthrough():
    return Passthrough(("message_stop", "error"), ("message_start", "message_delta"),
                       _anthropic_event_usage)


# -- 9f. OpenAI Responses answers: passthrough, chat <-> Responses, compaction --------------

def _responses_usage(usage):
    """A Responses usage object as chat-completions usage."""
    out = {"prompt_tokens": _count(usage, "input_tokens"),
           "completion_tokens": _count(usage, "output_tokens")}
    out["total_tokens"] = (_count(usage, "total_tokens")
                           or out["prompt_tokens"] + out["completion_tokens"])
    cached = _count(usage, "input_tokens_details", "cached_tokens")
    if cached:
        out["prompt_tokens_details"] = {"cached_tokens": cached}
    reasoning = _count(usage, "output_tokens_details", "reasoning_tokens")
    if reasoning:
        out["completion_tokens_details"] = {"reasoning_tokens": reasoning}
    return out


def _responses_finish(response, saw_tool):
    """Chat's finish_reason for a Responses answer."""
    if saw_tool:
        return "tool_calls"
    if response.get("status") == "incomplete":
        reason = _dig(response, "incomplete_details").get("reason")
        return "length" if reason == "max_output_tokens" else "content_filter"
    return "stop"


def responses_answer_items(data):
    """A whole Response as its stream (see translate_whole), as far as its readers look:
    response.created, each item whole in output_item.done (a message's text or refusal first
    as output_text.delta), then the end event its status names."""
    items = [("response.created", {"type": "response.created", "response": data})]
    for position, item in enumerate(get_typed(data, "output", list, [])):
        if not isinstance(item, dict):
            continue
        for part in get_typed(item, "content", list, []) if item.get("type") == "message" else []:
            text = part.get("text") or part.get("refusal") if isinstance(part, dict) else None
            if isinstance(text, str):
                items.append(("response.output_text.delta", {
                    "type": "response.output_text.delta", "output_index": position, "delta": text}))
        items.append(("response.output_item.done", {
            "type": "response.output_item.done", "output_index": position, "item": item}))
    status = data.get("status") or ("failed" if data.get("error") else "completed")
    end = {"incomplete": "response.incomplete", "failed": "response.failed"}.get(
        status, "response.completed")
    return items + [(end, {"type": end, "response": data})]


class ResponsesToChat(Translator):
    """Responses stream events in, OpenAI chat.completion.chunk items out (ending with a finish
    chunk, the usage chunk when asked, and ``[DONE]`` at response.completed)."""

    def __init__(self, model, include_usage, now):
        self.model = model
        self.include_usage = include_usage
        self.created = int(now)
        self.id = "chatcmpl-" + random_id()
        self.started = False
        self.tools = {}
        self.arguments_seen = set()

    def _tool_delta(self, position, **call):
        return chat_chunk(self, {"tool_calls": [dict(call, index=self.tools[position])]})

    def feed(self, event, data):
        """One Responses event as chat chunks: the first opens the assistant's message, text
        and function call pieces become deltas, the end a finish chunk; events chat has no
        form for (reasoning, item bookkeeping) say nothing."""
        if self.complete:
            return []
        data = parse_event_json(data)
        if not isinstance(data, dict):
            return [data] if data is not None else []
        kind = data.get("type") or event
        out = []
        if not self.started:
            self.started = True
            # response.created names the model that answers: the chunks say it, as
            # ChatNormalize's do
            self.model = _string(_dig(data, "response"), "model") or self.model
            out.append(chat_chunk(self, {"role": "assistant", "content": ""}))
        position = get_typed(data, "output_index", (int, str))
        if kind == "response.output_text.delta" and isinstance(data.get("delta"), str):
            out.append(chat_chunk(self, {"content": data["delta"]}))
        elif kind in ("response.output_item.added", "response.output_item.done"):
            item = _dig(data, "item")
            if item.get("type") == "function_call":
                out += self._call(position, item, kind == "response.output_item.done")
        elif (kind == "response.function_call_arguments.delta"
              and isinstance(data.get("delta"), str)):
            if position in self.tools:
                self.arguments_seen.add(position)
                out.append(self._tool_delta(position, function={"arguments": data["delta"]}))
        elif kind in ("response.completed", "response.incomplete"):
            out += self._finish(data)
        elif kind in ("response.failed", "error"):
            error = _dig(data, "response", "error") or _dig(data, "error") or data
            message = get_typed(error, "message", str)
            out.append(StreamError(message or "Copilot reported an error mid-stream",
                                   error.get("code")))
        return out

    def _call(self, position, item, done):
        """A function_call item: its first sight opens a tool call (id and name, no arguments
        yet); when it is ``done`` its arguments go out unless their deltas already did."""
        out = []
        if position not in self.tools:
            self.tools[position] = len(self.tools)
            out.append(self._tool_delta(position, id=item.get("call_id"), type="function",
                                        function={"name": item.get("name"), "arguments": ""}))
        if done and position not in self.arguments_seen and _string(item, "arguments"):
            out.append(self._tool_delta(position, function={"arguments": item["arguments"]}))
        return out

    def _finish(self, data):
        """The answer's end: the finish chunk, the usage chunk when the client asked, [DONE]."""
        response = _dig(data, "response")
        self.complete = True
        self.usage = _responses_event_usage(data)
        out = [chat_chunk(self, {}, _responses_finish(response, bool(self.tools)))]
        if self.include_usage:
            out.append(chat_chunk(self, usage=_responses_usage(response.get("usage"))))
        out.append((None, "[DONE]"))
        return out


def responses_passthrough():
    return Passthrough(("response.completed", "response.failed", "response.incomplete", "error"),
                       ("response.completed", "response.failed", "response.incomplete"),
                       _responses_event_usage)


def responses_usage_object(usage):
    """A Responses ``usage`` object, every count present, from the one usage shape of 9c."""
    usage = usage or {"input": 0, "cached": 0, "output": 0, "reasoning": 0}
    return {"input_tokens": usage["input"],
            "input_tokens_details": {"cached_tokens": usage["cached"], "cache_write_tokens": 0},
            "output_tokens": usage["output"],
            "output_tokens_details": {"reasoning_tokens": usage["reasoning"]},
            "total_tokens": usage["input"] + usage["output"]}

_COMPACTION_ITEMS = ("compaction", "compaction_summary")


def compaction_answer(data, payload, now):
    """What Codex expects back from /responses/compact: the new history in ``output`` (the user's
    messages, then the compaction item), in a ``response.compaction`` envelope. Without a
    compaction item from Copilot (a history too short to compact) the history stays as it was."""
    output = get_typed(data, "output", list, [])
    compaction = [i for i in output if isinstance(i, dict) and i.get("type") in _COMPACTION_ITEMS]
    history = as_output_items(payload.get("input"))
    if compaction:
        said = [i for i in history if i["type"] == "message" and i.get("role") == "user"]
        output = said + compaction[-1:]
    else:
        output = history
    created = data.get("created_at")
    return {"id": data.get("id") or "resp_" + random_id(), "object": "response.compaction",
            "created_at": int(created) if isinstance(created, (int, float)) else int(now),
            "output": output,
            "usage": responses_usage_object(usage_from_responses(data.get("usage")))}


def response_skeleton(payload, model, now):
    """A Response in progress for a translated request, its settings echoed as OpenAI does."""
    get, reasoning = payload.get, _dig(payload, "reasoning")
    return {"id": "resp_" + random_id(), "object": "response", "created_at": int(now),
            "status": "in_progress", "background": False, "error": None, "incomplete_details": None,
            "instructions": get("instructions"), "max_output_tokens": get("max_output_tokens"),
            "model": model, "output": [],
            "parallel_tool_calls": get("parallel_tool_calls") is not False,
            "previous_response_id": get("previous_response_id"),
            "reasoning": {"effort": reasoning.get("effort"), "summary": reasoning.get("summary")},
            "store": get("store") is not False, "temperature": get("temperature"),
            "text": get("text") or {"format": {"type": "text"}},
            "tool_choice": get("tool_choice") or "auto", "tools": get("tools") or [],
            "top_p": get("top_p"), "truncation": get("truncation") or "disabled",
            "usage": None, "user": get("user"), "metadata": get("metadata") or {}}


class ResponseBuilder:
    """One Response, built as its answer arrives, each step also spelled as the Responses stream
    events that announce it, numbered by ``sequence_number`` from 0. A reader of the upstream's
    format calls text(), reasoning(), signature(), call() and arguments() as the pieces come,
    then finish(); each returns the events for that step. A whole answer is read with the same
    calls and keeps only ``response``, so the two can never differ.

    Items: a text or reasoning item closes when any other item begins (a signature closes its
    reasoning); tool calls stay open until finish(), since chat streams may interleave the
    argument pieces of parallel calls. A custom tool's call arrives as a function call with one
    string argument and leaves as a ``custom_tool_call`` with that string as its input."""

    def __init__(self, payload, model, now, on_done=None):
        self.response = response_skeleton(payload, model, now)
        summary = _dig(payload, "reasoning").get("summary")
        self.summaries = summary in ("auto", "concise", "detailed")  # as OpenAI: only when asked
        self.tools = client_tools(payload)
        self.on_done = on_done      # called with the finished response (the store keeps it)
        self.sequence = 0
        self.started = False
        self.open = None            # output index of the text or reasoning item being written
        self.calls = {}             # call id -> output index of a tool call not yet done
        self.pieces = {}            # output index -> the text pieces of that item so far
        self.signatures = {}        # output index -> the signature of a reasoning item

    def _event(self, kind, **fields):
        fields.update(type=kind, sequence_number=self.sequence)
        self.sequence += 1
        return (kind, fields)

    def _add(self, item):
        """Append an item to the output: its output_item.added event, the item as it starts."""
        index = len(self.response["output"])
        self.response["output"].append(item)
        self.pieces[index] = []
        added = dict(item, **{key: [] for key in ("content", "summary") if key in item})
        return index, self._event("response.output_item.added", output_index=index, item=added)

    def start(self):
        if self.started:
            return []
        self.started = True
        snapshot = dict(self.response, output=[])
        return [self._event("response.created", response=snapshot),
                self._event("response.in_progress", response=snapshot)]

    def _open_kind(self):
        return self.response["output"][self.open]["type"] if self.open is not None else None

    def text(self, delta):
        """A piece of the answer's text: a message item (with its one output_text part) opens
        unless one is open, then the piece as output_text.delta."""
        out = self.start()
        if self._open_kind() != "message":
            out += self._close_open()
            item = {"id": "msg_" + random_id(), "type": "message", "status": "in_progress",
                    "role": "assistant", "content": []}
            self.open, added = self._add(item)
            part = {"type": "output_text", "text": "", "annotations": []}
            out += [added, self._event("response.content_part.added", item_id=item["id"],
                                       output_index=self.open, content_index=0, part=part)]
        self.pieces[self.open].append(delta)
        out.append(self._event("response.output_text.delta", output_index=self.open,
                               content_index=0, item_id=self.response["output"][self.open]["id"],
                               delta=delta, logprobs=[]))
        return out

    def reasoning(self, delta):
        """A piece of the model's thinking: a reasoning item opens unless one without a
        signature is open (a signed one is finished: Claude's next thinking is a new block).
        The text is kept for Claude's ``encrypted_content``; it is shown as a summary only to
        clients that asked for one, as OpenAI does."""
        out = self.start()
        if self._open_kind() != "reasoning" or self.open in self.signatures:
            out += self._close_open()
            item = {"id": "rs_" + random_id(), "type": "reasoning", "summary": []}
            self.open, added = self._add(item)
            out.append(added)
            if self.summaries:
                out.append(self._event("response.reasoning_summary_part.added", item_id=item["id"],
                                       output_index=self.open, summary_index=0,
                                       part={"type": "summary_text", "text": ""}))
        self.pieces[self.open].append(delta)
        if self.summaries and delta:
            out.append(self._event("response.reasoning_summary_text.delta", output_index=self.open,
                                   item_id=self.response["output"][self.open]["id"],
                                   summary_index=0, delta=delta))
        return out

    def signature(self, signature):
        """Claude's signature ends its thinking block: the reasoning item closes with both."""
        out = self.reasoning("") if self._open_kind() != "reasoning" else []
        self.signatures[self.open] = signature
        return out + self._close_open()

    def call(self, call_id, name):
        """A tool call begins: a function_call item, or a custom_tool_call for a
        custom tool; a namespaced tool's call gets its own name and namespace back."""
        out = self.start() + self._close_open()
        tool, namespace = self.tools.get(name, ({}, None))
        if namespace:
            name = tool.get("name")
        if tool.get("type") == "custom":
            item = {"id": "ctc_" + random_id(), "type": "custom_tool_call", "call_id": call_id,
                    "name": name, "input": ""}
        else:
            item = {"id": "fc_" + random_id(), "type": "function_call", "status": "in_progress",
                    "call_id": call_id, "name": name, "arguments": ""}
        if namespace:
            item["namespace"] = namespace
        self.calls[call_id], added = self._add(item)
        return out + [added]

    def arguments(self, call_id, delta):
        """A piece of a call's arguments; a custom call's input is announced only
        at the end, once its JSON is whole."""
        index = self.calls.get(call_id)
        if index is None or not delta:
            return []
        self.pieces[index].append(delta)
        item = self.response["output"][index]
        if item["type"] != "function_call":  # a custom call's input is known once its JSON is whole
            return []
        return [self._event("response.function_call_arguments.delta", item_id=item["id"],
                            output_index=index, delta=delta)]

    def _close_open(self):
        """The open text or reasoning item finished: its text whole in the item (a message's
        part, a reasoning item's summary when asked, Claude's thinking packed with its
        signature) and the .done events that say so."""
        if self.open is None:
            return []
        index, self.open = self.open, None
        item = self.response["output"][index]
        text = "".join(self.pieces[index])
        out = []
        if item["type"] == "message":
            part = {"type": "output_text", "text": text, "annotations": []}
            item["content"] = [part]
            out.append(self._event("response.output_text.done", item_id=item["id"],
                                   output_index=index, content_index=0, text=text, logprobs=[]))
            out.append(self._event("response.content_part.done", item_id=item["id"],
                                   output_index=index, content_index=0, part=part))
            item["status"] = "completed"
        else:
            if self.summaries:
                part = {"type": "summary_text", "text": text}
                item["summary"] = [part]
                out.append(self._event("response.reasoning_summary_text.done", item_id=item["id"],
                                       output_index=index, summary_index=0, text=text))
                out.append(self._event("response.reasoning_summary_part.done", item_id=item["id"],
                                       output_index=index, summary_index=0, part=part))
            if index in self.signatures:
                item["encrypted_content"] = pack_thinking(text, self.signatures[index])
        out.append(self._event("response.output_item.done", output_index=index, item=item))
        return out

    def _close_call(self, index):
        """A tool call finished: its arguments whole (``{}`` when none came); a custom tool's
        input taken out of the one string argument it travelled in."""
        item = self.response["output"][index]
        text = "".join(self.pieces[index])
        where = {"item_id": item["id"], "output_index": index}
        if item["type"] == "function_call":
            item.update(arguments=text or "{}", status="completed")
            done = [self._event("response.function_call_arguments.done", name=item["name"],
                                arguments=item["arguments"], **where)]
        else:
            value = _parse_arguments(text).get(CUSTOM_TOOL_ARGUMENT)
            item["input"] = value if isinstance(value, str) else text
            done = [self._event("response.custom_tool_call_input.delta", delta=item["input"],
                                **where),
                    self._event("response.custom_tool_call_input.done", input=item["input"],
                                **where)]
        return done + [self._event("response.output_item.done", output_index=index, item=item)]

    def finish(self, incomplete_reason, usage):
        """The last events: every open item done, then response.completed (or .incomplete with its
        reason: max_output_tokens, content_filter), the response whole, with its usage."""
        out = self.start() + self._close_open()
        for index in sorted(self.calls.values()):
            out += self._close_call(index)
        self.calls = {}
        response = self.response
        response["usage"] = responses_usage_object(usage)
        if incomplete_reason:
            response.update(status="incomplete", incomplete_details={"reason": incomplete_reason})
        else:
            response["status"] = "completed"
        if self.on_done is not None:
            self.on_done(response)
        out.append(self._event("response.incomplete" if incomplete_reason else "response.completed",
                               response=response))
        return out


_CHAT_INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}

_ANTHROPIC_INCOMPLETE = {"max_tokens": "max_output_tokens", "refusal": "content_filter",
                         "model_context_window_exceeded": "max_output_tokens"}


class BuildsResponse(Translator):
    """A translator that spells its answer through a ResponseBuilder, which numbers the events:
    its ``calls`` map the upstream's way of naming a tool call to the call's id."""

    def __init__(self, builder):
        self.builder = builder
        self.calls = {}

    @property
    def next_sequence_number(self):
        return self.builder.sequence


class ChatToResponses(ChatReader, BuildsResponse):
    """Chat completion chunks in, Responses events out (see ResponseBuilder): reasoning_text and
    reasoning_opaque (Claude's thinking and signature), content, and tool calls of every choice
    (Claude may put its calls in a second choice; ``calls`` keys are (choice index, call index)).
    Complete at ``[DONE]`` or a finish_reason."""

    def read_choice(self, chunk, choice, delta):
        """One choice's delta into the builder: thinking, signature, text, tool call pieces."""
        builder = self.builder
        out = builder.start()
        if _string(delta, "reasoning_text"):
            out += builder.reasoning(delta["reasoning_text"])
        if _string(delta, "reasoning_opaque"):
            out += builder.signature(delta["reasoning_opaque"])
        if self.said(delta):
            out += builder.text(self.said(delta))
        position = _index(choice)
        for call in get_typed(delta, "tool_calls", list, []):
            if not isinstance(call, dict):
                continue
            key = (position, _index(call))
            function = _dig(call, "function")
            call_id = _string(call, "id")
            if key not in self.calls or (call_id and call_id != self.calls[key]):
                self.calls[key] = call_id or "call_" + random_id(24)
                out += builder.call(self.calls[key], _string(function, "name") or "")
            if _string(function, "arguments"):
                out += builder.arguments(self.calls[key], function["arguments"])
        self.note_finish(choice.get("finish_reason"))
        return out

    def end(self):
        return self.builder.finish(_CHAT_INCOMPLETE.get(self.finish_reason), self.usage)


class AnthropicToResponses(BuildsResponse):
    """Anthropic Messages events in, Responses events out (see ResponseBuilder): thinking blocks
    with their signatures, text, tool_use blocks and their input JSON (``calls`` keys are content
    block indexes). Complete at message_stop; an ``error`` event is the stream's failure."""

    stop_reason = None

    def feed(self, event, data):
        """One Anthropic event as ResponseBuilder steps: usage and the stop reason kept for
        end(), each block's start and deltas passed to the builder call of its kind."""
        data = parse_event_json(data)
        if not isinstance(data, dict):
            return [data] if data is not None else []
        kind, builder = data.get("type") or event, self.builder
        if kind in ("message_start", "message_delta"):
            self.usage = merge_usage(self.usage, _anthropic_event_usage(data))
            self.stop_reason = _dig(data, "delta").get("stop_reason") or self.stop_reason
            return builder.start()
        if kind == "content_block_start":
            return self._read_block(data.get("index"), _dig(data, "content_block"))
        if kind == "content_block_delta":
            delta = _dig(data, "delta")
            piece = _ANTHROPIC_DELTA_FIELDS.get(delta.get("type"))
            value = _string(delta, piece) if piece else None
            if value is None:
                return []
            step = {"text": builder.text, "thinking": builder.reasoning,
                    "signature": builder.signature}.get(piece)
            return step(value) if step else builder.arguments(self.calls.get(data.get("index")),
                                                              value)
        if kind == "message_stop":
            self.complete = True
        elif kind == "error":
            error = _dig(data, "error")
            return [StreamError(_string(error, "message") or "Copilot reported an error mid-stream",
                                _string(error, "type"))]
        return []

    def _read_block(self, index, block):
        """A content block as it starts, with what it already holds (a whole answer's blocks
        hold all of it, but a tool's input, which comes as an input_json_delta)."""
        builder, kind = self.builder, block.get("type")
        if kind == "tool_use":
            self.calls[index] = _string(block, "id") or "toolu_" + random_id(24)
            return builder.call(self.calls[index], _string(block, "name") or "")
        if kind == "thinking":
            out = builder.reasoning(_string(block, "thinking") or "")
            if _string(block, "signature"):
                out += builder.signature(block["signature"])
            return out
        if kind == "text" and _string(block, "text"):
            return builder.text(block["text"])
        return builder.start()

    def end(self):
        return self.builder.finish(_ANTHROPIC_INCOMPLETE.get(self.stop_reason), self.usage)


def anthropic_answer_items(data):
    """A whole Anthropic message as its stream (see translate_whole): message_start, each block
    whole in its content_block_start (a tool's input follows as one input_json_delta), then
    message_delta and message_stop."""
    if data.get("type") == "error":  # an error in a 200: a failure, as inside a stream
        return [("error", data)]
    items = [("message_start", {"type": "message_start", "message": data,
                                "copilot_usage": data.get("copilot_usage")})]
    for index, block in enumerate(get_typed(data, "content", list, [])):
        if not isinstance(block, dict):
            continue
        items.append(("content_block_start", {"type": "content_block_start", "index": index,
                                              "content_block": block}))
        if block.get("type") == "tool_use":
            items.append(("content_block_delta", {"type": "content_block_delta", "index": index,
                                                  "delta": {"type": "input_json_delta",
                                                            "partial_json": json.dumps(
                                                                block.get("input") or {})}}))
    return items + [("message_delta", {"type": "message_delta",
                                       "delta": {"stop_reason": data.get("stop_reason")}}),
                    ("message_stop", {"type": "message_stop"})]


#: What a translated model is asked for when Codex compacts its conversation (Copilot compacts
#: only on /responses): a summary that lets the next turn carry on without the history.
COMPACT_PROMPT = ("Summarise the conversation above for whoever continues it: the task and what "
                  "the user wants, what has been done so far (files, commands and their results, "
                  "decisions), the current state, and what is left to do. Write only the summary.")


def summary_compaction_answer(response, payload, now):
    """/responses/compact for a translated model: the user's messages, then the model's summary
    of everything (as an assistant message), in Codex's ``response.compaction`` envelope."""
    summary = "".join(part["text"] for item in response["output"] if item["type"] == "message"
                      for part in item["content"])
    kept = [i for i in as_output_items(payload.get("input"))
            if i["type"] == "message" and i.get("role") == "user"]
    message = {"id": "msg_" + random_id(), "type": "message", "role": "assistant",
               "status": "completed",
               "content": [{"type": "output_text", "annotations": [],
                            "text": "Summary of the conversation so far:\n\n" + summary}]}
    return {"id": response["id"], "object": "response.compaction", "created_at": int(now),
            "output": kept + [message], "usage": response["usage"]}


# -- 9g. Embeddings answers -----------------------------------------------------------------

def normalize_embeddings_response(data, model, encoding):
    """OpenAI's embeddings list; base64 is made here (little-endian float32, as OpenAI sends it)."""
    items = []
    for index, item in enumerate(get_typed(data, "data", list, [])):
        if not isinstance(item, dict):
            continue
        vector = item.get("embedding")
        if encoding == "base64" and isinstance(vector, list):
            vector = base64.b64encode(struct.pack("<%df" % len(vector), *vector)).decode("ascii")
        items.append({"object": "embedding", "index": item.get("index", index),
                      "embedding": vector})
    prompt = _count(data, "usage", "prompt_tokens")
    return {"object": "list", "data": items, "model": data.get("model") or model,
            "usage": {"prompt_tokens": prompt,
                      "total_tokens": _count(data, "usage", "total_tokens") or prompt}}


# -- 9h. Plans: what one request sends and how its answer comes back ------------------------
# A route parses and checks the client's body, the catalogue resolves the model, then one
# planner below decides everything else as a value: the Copilot path and body, the identity
# headers, and how the answer (whole or streamed) is translated back. Every model quirk is one
# branch here: responses-only models, Gemini schemas, max_tokens renamed, reasoning effort fitted
# to the model, Claude Code's fields Copilot refuses. The gateway (§12) only sends plans.

@dataclasses.dataclass
class Plan:
    """One proxied request, decided before anything is sent."""
    route: str                       # chat, messages, responses, compact, embeddings
    dialect: Dialect                 # the client's API: spells errors, pings and stream items
    model: str
    info: dict                       # the model's catalogue entry ({} when unknown)
    path: str                        # the Copilot path
    payload: dict = None             # the JSON body (None for a GET)
    path_label: str = None           # the path for metric labels, without ids (a series per id
    #                                  would grow forever)
    method: str = "POST"
    stream: bool = False
    initiator: str = "agent"         # X-Initiator: only a person's turn is "user"
    vision: bool = False
    intent: str = "conversation-panel"
    interaction: str = None          # X-Interaction-Type
    headers: dict = dataclasses.field(default_factory=dict)
    answer: object = None            # upstream JSON -> client JSON; None: the upstream's as it is
    what: str = "JSON"               # what a valid answer is, for the 502 when it is not
    chain: object = None             # () -> the stream translators, upstream format first
    ping: bytes = None               # the keep-alive bytes, when the dialect has none of its own
    effort_name: str = "reasoning_effort"  # the client's name for the effort field
    # what was changed to fit the model: ["reasoning_effort=xhigh->high", ...]
    adjusted: list = dataclasses.field(default_factory=list)
    removed: list = dataclasses.field(default_factory=list)   # fields taken out (logged at debug)


#: A whole answer of each Copilot path replayed as the stream it would have been.
_ANSWER_ITEMS = {"/chat/completions": chat_answer_items, "/responses": responses_answer_items,
                 "/v1/messages": anthropic_answer_items}


def translate_with(plan, chain):
    """A translated plan's ``chain`` (a function returning its stream translators) and its
    whole answer through the same translators. The answer holds the plan's parts, not the plan:
    a cycle would keep a failed request's payload until a full garbage collection."""
    items, dialect = _ANSWER_ITEMS[plan.path], plan.dialect
    plan.chain = chain
    plan.answer = lambda data: translate_whole(chain(), dialect, items(data))


#: max_tokens refused by models that want max_completion_tokens (GPT-5 and o-series on chat).
_MAX_TOKENS_REFUSED = re.compile(r"max_tokens.{0,80}max_completion_tokens"
                                 r"|unsupported parameter:? *'?max_tokens", re.I | re.S)


def allowed_efforts(info, learned):
    """The effort values a model takes: its catalogue list narrowed to what Copilot's refusals
    taught on this endpoint (values the catalogue does not list are not believed), the list
    alone, or what was taught alone when the catalogue has no list."""
    taught = learned.get("efforts")
    listed = get_typed(_dig(info, "capabilities", "supports"), "reasoning_effort", list)
    if taught and listed:
        return [value for value in taught if value in listed] or listed
    return taught or listed


def fit_to_model(plan, quirks):
    """Apply what is known about the model to the plan's upstream body: max_completion_tokens for
    models that refused max_tokens, and a reasoning effort the model takes (the nearest listed
    value). ``quirks`` maps a Copilot path to what refusals taught there (Catalogue.quirks).
    Each change is recorded in ``plan.adjusted``."""
    payload = plan.payload
    quirks = quirks.get(plan.path, {})
    chat = plan.path == "/chat/completions"
    if chat and quirks.get("max_completion_tokens") and "max_tokens" in payload:
        payload["max_completion_tokens"] = payload.pop("max_tokens")
        plan.adjusted.append("max_tokens=max_completion_tokens")
    wanted = get_effort(plan.path, payload)
    allowed = allowed_efforts(plan.info, quirks)
    if wanted and allowed:
        fitted = nearest_effort(wanted, allowed)
        if fitted and fitted != wanted:
            set_effort(plan.path, payload, fitted)
            plan.adjusted.append("%s=%s->%s" % (plan.effort_name, wanted, fitted))
    return plan


def revise_after_refusal(plan, error, quirks):
    """When Copilot refused a parameter it told us how to fix (max_tokens; an effort with its
    supported values), change the plan's body for one retry and return what to remember for the
    model on this endpoint ({"max_completion_tokens": True} or {"efforts": [...]}); else None."""
    payload = plan.payload
    quirks = quirks.get(plan.path, {})
    if payload is None or error.status != 400:
        return None
    chat = plan.path == "/chat/completions"
    if chat and "max_tokens" in payload and _MAX_TOKENS_REFUSED.search(str(error)):
        payload["max_completion_tokens"] = payload.pop("max_tokens")
        plan.adjusted.append("max_tokens=max_completion_tokens")
        return {"max_completion_tokens": True}
    wanted = get_effort(plan.path, payload)
    if wanted and is_effort_refusal(error):
        supported = supported_efforts_in(str(error))
        candidates = supported or [v for v in (allowed_efforts(plan.info, quirks) or EFFORT_SCALE)
                                   if v != wanted]
        fitted = nearest_effort(wanted, candidates)
        if fitted and fitted != wanted:
            set_effort(plan.path, payload, fitted)
            plan.adjusted.append("%s=%s->%s" % (plan.effort_name, wanted, fitted))
            return {"efforts": supported} if supported else {}
    return None


def plan_chat(payload, parsed, model, info, quirks, now):
    """POST /v1/chat/completions: as it is (normalised) to /chat/completions, or translated to
    /responses and back for models Copilot serves only there (e.g. gpt-5.x-codex)."""
    _, stream, include_usage, merge = parsed
    vision = has_image(payload)
    check_vision(model, info, vision, "messages")
    if is_gemini(model, info):
        gemini_tools(payload)
    plan = Plan("chat", OPENAI, model, info, endpoint_for(info, "/chat/completions"), stream=stream,
                initiator=chat_initiator(payload["messages"]), vision=vision,
                what="a chat completion")
    usage = include_usage or not stream  # a whole answer always has its usage
    if plan.path == "/responses":
        plan.payload = chat_to_responses_request(payload)
        translate_with(plan, lambda: [ResponsesToChat(model, usage, now)])
    else:
        plan.payload = payload
        translate_with(plan, lambda: [ChatNormalize(model, usage, merge, now)])
    return fit_to_model(plan, quirks)


#: What a client's anthropic-version or anthropic-beta value may hold to be passed on.
_HEADER_TOKEN = re.compile(r"^[A-Za-z0-9._-]{1,100}$")


#: The anthropic-beta Claude Code puts on its agent loop's requests (the person's turns and tool
#: follow-ups) and leaves off its own side work, such as the session title it asks Haiku for.
CLAUDE_CODE_LOOP_BETA = "claude-code-20250219"


def plan_messages(payload, model, info, quirks, now, header=lambda name: None):
    """POST /v1/messages: Copilot's own /v1/messages when the model has it (Claude), else
    translated to chat, or to chat and on to /responses (responses-only models), and back.
    ``header(name)``: the client's header of that (lower-case) name, or None."""
    anthropic_version, anthropic_beta = header("anthropic-version"), header("anthropic-beta")
    removed = clean_anthropic_request(payload)
    vision = has_image(payload, ("image",))
    check_vision(model, info, vision, "messages")
    stream = payload.get("stream") is True
    initiator = anthropic_initiator(payload["messages"])
    betas = [b.strip() for b in (anthropic_beta or "").split(",")]
    if header("x-claude-code-session-id") is not None and CLAUDE_CODE_LOOP_BETA not in betas:
        initiator = "agent"  # Claude Code's side work: no person's turn, so no premium request
    plan = Plan("messages", ANTHROPIC, model, info, "/v1/messages", stream=stream,
                initiator=initiator, vision=vision, what="a message",
                effort_name="output_config.effort", removed=removed)
    endpoints = get_typed(info, "supported_endpoints", list, [])
    if "/v1/messages" in endpoints:
        plan.payload, plan.intent = payload, "messages-proxy"
        if anthropic_version is not None and not _HEADER_TOKEN.match(anthropic_version):
            raise ClientError(400, "anthropic-version: not a version such as 2023-06-01",
                              param="anthropic-version")
        plan.headers["anthropic-version"] = anthropic_version or "2023-06-01"
        passed_on = [b for b in betas if b.startswith(SUPPORTED_ANTHROPIC_BETAS)
                     and _HEADER_TOKEN.match(b)]
        if passed_on:
            plan.headers["anthropic-beta"] = ",".join(passed_on)
        plan.chain = lambda: [anthropic_passthrough()]
    else:  # translated to chat, and on to /responses for a model served only there
        plan.path = endpoint_for(info, "/chat/completions")
        # the estimate is for message_start; Copilot's own /v1/messages needs none
        estimate = estimate_input_tokens(payload) if stream else 0
        plan.payload = anthropic_to_openai_request(payload, info)
        if plan.path == "/responses":
            plan.payload = chat_to_responses_request(plan.payload)
            translate_with(plan, lambda: [ResponsesToChat(model, True, now),
                                          ChatToAnthropic(model, estimate)])
        else:
            if is_gemini(model, info):
                gemini_tools(plan.payload)
            translate_with(plan, lambda: [ChatToAnthropic(model, estimate)])
    return fit_to_model(plan, quirks)


def previous_response_not_found(response_id):
    """OpenAI's answer to a previous_response_id it does not have (unknown, expired, deleted)."""
    return ClientError(400, "Previous response with id '%s' not found." % response_id[:100],
                       param="previous_response_id", code="previous_response_not_found")


def is_claude(model, info):
    vendor = get_typed(info, "vendor", str, "")
    return model.lower().startswith("claude") or vendor.lower() == "anthropic"


def _native_responses(plan, payload, store):
    """A Responses request passed through to Copilot's /responses: Claude's thinking left out
    (sent back by a client that switched models: only Claude can read it), a conversation
    begun with a translated model sent as input (Copilot never saw its responses), and a
    history ending in Codex's compaction trigger marked as the agent's compaction request."""
    items = get_typed(payload, "input", list, [])
    previous = payload.get("previous_response_id")
    if any(is_claude_thinking(i) for i in items):
        payload["input"] = [i for i in items if not is_claude_thinking(i)]
    if previous and store is not None and store.has(previous):
        # without the ids: Copilot would look them up and find nothing
        history = [{k: v for k, v in i.items() if k != "id"} for i in store.history(previous)
                   if not is_claude_thinking(i)]
        payload["input"] = history + as_output_items(payload.get("input"))
        del payload["previous_response_id"]
    plan.payload, plan.chain = payload, lambda: [responses_passthrough()]
    if items and items[-1].get("type") == "compaction_trigger":
        plan.intent, plan.interaction = "conversation-agent", "conversation-compaction"
    return plan


def _chat_for_model(chat, plan, model, info):
    """A translated Responses request as the model's chat endpoint takes it: Claude's effort
    as a thinking budget, no effort for models that list none (Codex sends its effort to every
    model, and those refuse the field), Gemini's schemas made acceptable."""
    if is_claude(model, info) and chat.get("reasoning_effort"):
        budget = thinking_budget_for(chat["reasoning_effort"], info, chat.get("max_tokens"))
        if budget:
            chat["thinking_budget"] = budget
    listed = _dig(info, "capabilities", "supports").get("reasoning_effort")
    if "reasoning_effort" in chat and not listed:
        plan.removed.append("reasoning_effort=%s" % chat.pop("reasoning_effort"))
    if is_gemini(model, info):
        gemini_tools(chat)
    return chat


def plan_responses(payload, model, info, quirks, now, store=None):
    """POST /v1/responses: passed through to /responses for the models Copilot serves there (a
    history ending in Codex's compaction trigger goes as the agent's compaction request); for
    the others translated to /v1/messages (Claude) or /chat/completions and back, the answer
    built as a Response and kept in ``store`` (see ResponseStore) unless the client said
    ``store: false``, so previous_response_id, GET and DELETE work."""
    vision = has_image(payload)
    check_vision(model, info, vision, "input")
    plan = Plan("responses", RESPONSES, model, info, responses_upstream(info, payload),
                stream=payload.get("stream") is True, initiator=responses_initiator(payload),
                vision=vision, effort_name="reasoning.effort", what="a response")
    previous = payload.get("previous_response_id")
    if plan.path == "/responses":
        return fit_to_model(_native_responses(plan, payload, store), quirks)
    check_client_tools(payload, model, plan.path)
    history = store.history(previous) if previous and store is not None else []
    if previous and store is None:
        raise previous_response_not_found(previous)
    own_items = as_output_items(payload.get("input"))
    if not own_items and not history:  # Copilot would be sent "messages": [] and fail the turn
        raise ClientError(400, "input must be a non-empty string or array of items for %s" % model,
                          param="input", code="missing_field")
    keep = None  # what the finished Response is handed to: the store, unless the client opts out
    if store is not None and payload.get("store") is not False:
        own_input = json_dumps(own_items)  # now: image inlining changes the items' parts later
        keep = functools.partial(store.put, input_items=own_input)
    chat = responses_to_chat_request(payload, history, is_claude(model, info), own_items)

    def builder():
        return ResponseBuilder(payload, model, now, keep)
    if plan.path == "/v1/messages":
        plan.payload = chat_to_anthropic_request(chat, info)
        plan.headers["anthropic-version"] = "2023-06-01"
        if "thinking" in plan.payload:  # thinking between tool calls, as Claude Code has it
            plan.headers["anthropic-beta"] = "interleaved-thinking-2025-05-14"
        translate_with(plan, lambda: [AnthropicToResponses(builder())])
    else:
        plan.payload = _chat_for_model(chat, plan, model, info)
        translate_with(plan, lambda: [ChatToResponses(builder())])
    return fit_to_model(plan, quirks)


def plan_compact(payload, model, info, quirks, now):
    """POST /v1/responses/compact (Codex's remote compaction), as the agent's compaction request:
    a compacting /responses call where Copilot serves the model there; for other models, the
    model is asked for a summary of the conversation (see summary_compaction_answer). Either
    way answered in the shape Codex reads."""
    if responses_upstream(info, payload) == "/responses":
        plan = Plan("compact", RESPONSES, model, info, "/responses",
                    payload=compact_request(payload), vision=has_image(payload),
                    effort_name="reasoning.effort", what="a response",
                    answer=lambda data: compaction_answer(data, payload, now))
    else:
        ask = {"type": "message", "role": "user",
               "content": [{"type": "input_text", "text": COMPACT_PROMPT}]}
        request = {"model": model, "instructions": payload.get("instructions"), "store": False,
                   "tools": [t for t in payload.get("tools") or []
                             if t.get("type") in _CLIENT_TOOL_TYPES],
                   "tool_choice": "none", "reasoning": payload.get("reasoning"),
                   "input": as_output_items(payload.get("input")) + [ask]}
        plan = plan_responses(request, model, info, quirks, now)
        summarise = plan.answer
        plan.route = "compact"
        plan.answer = lambda data: summary_compaction_answer(summarise(data), payload, now)
    plan.initiator, plan.intent, plan.interaction = (
        "agent", "conversation-agent", "conversation-compaction")
    return fit_to_model(plan, quirks)


def plan_embeddings(request, encoding, model, info):
    """POST /v1/embeddings: never a premium request, so always the agent's."""
    return Plan("embeddings", OPENAI, model, info, "/embeddings", payload=request,
                intent="copilot-panel",
                answer=lambda data: normalize_embeddings_response(data, model, encoding),
                what="an embeddings list")


def plan_response_get(response_id, method="GET"):
    """GET (or HEAD) or DELETE /v1/responses/{id} of a response coproxy did not build: Copilot's."""
    method = "DELETE" if method == "DELETE" else "GET"
    if response_id in (".", ".."):  # quoted or not, a path segment that would climb
        raise ClientError(404, "no response with the id %r" % response_id, code="not_found")
    return Plan("responses", RESPONSES, "-", {},
                "/responses/" + urllib.parse.quote(response_id, safe=""),
                method=method, path_label="/responses/{id}")


# -- 9i. Ollama's API: answers and plans ----------------------------------------------------
# An Ollama request (8g) is planned by plan_chat, so the model's endpoint (chat completions or
# /responses) and every quirk apply unchanged; the plan is then wrapped: its stream chain ends
# in ChatToOllama (which its whole answer goes through too), and its dialect is OLLAMA
# (NDJSON lines, ``{"error": "..."}``). Names are catalogue ids with Ollama's ``:latest``
# tag; what /api/show tells about a model comes from its catalogue entry.

#: What GET /api/version reports: VS Code's Ollama provider refuses servers older than 0.6.4.
OLLAMA_VERSION = "0.13.0"

#: Ollama's answer to GET /, which clients probe to see whether a server is there.
OLLAMA_RUNNING = b"Ollama is running"


def rfc3339(timestamp):
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


def ollama_capabilities(model):
    """Ollama's capability names for a catalogue entry, as the catalogue says."""
    caps = _dig(model, "capabilities")
    supports = _dig(caps, "supports")
    if caps.get("type") == "embeddings":
        return ["embedding"]
    return ["completion"] + [name for name, has in (("tools", supports.get("tool_calls")),
                                                    ("vision", supports.get("vision")),
                                                    ("thinking", model_thinks(supports))) if has]


def _ollama_details(model):
    family = _string(_dig(model, "capabilities"), "family") or model["id"]
    return {"parent_model": "", "format": "copilot", "family": family, "families": [family],
            "parameter_size": "", "quantization_level": ""}


def ollama_tag(model, modified_at):
    """One entry of GET /api/tags: the catalogue id with Ollama's ``:latest`` tag, no size (the
    model lives at Copilot), a digest that is stable for the id."""
    import hashlib  # only for these digests
    name = model["id"] + ":latest"
    return {"name": name, "model": name, "modified_at": modified_at, "size": 0,
            "digest": hashlib.sha256(model["id"].encode("utf-8")).hexdigest(),
            "details": _ollama_details(model)}


def ollama_show(model, modified_at):
    """POST /api/show: details, ``capabilities`` and the ``model_info`` keys clients read
    (``general.architecture``, ``general.basename``, ``<architecture>.context_length``)."""
    limits = _dig(model, "capabilities", "limits")
    details = _ollama_details(model)
    info = {"general.architecture": details["family"], "general.basename": model["id"]}
    prompt = _whole(limits.get("max_prompt_tokens"))
    output = _whole(limits.get("max_output_tokens"))
    context = _whole(limits.get("max_context_window_tokens")) or (prompt or 0) + (output or 0)
    if context:
        info[details["family"] + ".context_length"] = context
    return {"license": "", "modelfile": "", "parameters": "", "template": "{{ .Prompt }}",
            "details": details, "model_info": info, "capabilities": ollama_capabilities(model),
            "modified_at": modified_at}


def _ollama_calls(calls):
    """Chat tool calls as Ollama's: arguments as an object, not JSON text."""
    return [{"id": call.get("id") or "call_%d" % index, "function": {
        "index": index, "name": _dig(call, "function").get("name") or "",
        "arguments": _parse_arguments(_dig(call, "function").get("arguments"))}}
        for index, call in enumerate(calls)]


def ollama_object(name, kind, created_at, text="", thinking=None, calls=None):
    """One object of an Ollama answer: the text under ``message`` (/api/chat) or ``response``
    (/api/generate), with thinking and tool calls when there are any; not yet done."""
    out = {"model": name, "created_at": created_at}
    if kind == "chat":
        out["message"] = {"role": "assistant", "content": text}
        if thinking:
            out["message"]["thinking"] = thinking
        if calls:
            out["message"]["tool_calls"] = calls
    else:
        out["response"] = text
        if thinking:
            out["thinking"] = thinking
    out["done"] = False
    return out


class ChatToOllama(ChatReader):
    """Chat completion chunks in, Ollama's stream objects out: one per text or thinking delta,
    the tool calls whole in one object once their arguments are complete (Ollama sends them as
    JSON objects, never in pieces), then the ``done`` object with the counts and durations
    (``clock``/``started``: a monotonic clock and the request's arrival on it). Complete at
    ``[DONE]``."""

    def __init__(self, name, kind, created_at, started, clock):
        self.name, self.kind, self.created_at = name, kind, created_at
        self.started, self.clock = started, clock
        self.first_at = None
        self.held = {}  # the tool calls so far, joined as a whole answer's are (see 9a)

    def read_choice(self, chunk, choice, delta):
        """A chat choice's text and thinking as an Ollama object at once; tool call pieces held
        until the stream ends (end() sends the calls whole)."""
        out = []
        text = self.said(delta) or ""
        thinking = _string(delta, "reasoning_text")
        if text or thinking:
            if self.first_at is None:
                self.first_at = self.clock()
            out.append((None, ollama_object(self.name, self.kind, self.created_at, text, thinking)))
        calls = get_typed(delta, "tool_calls", list, [])
        _fold_chat_delta(self.held, {"tool_calls": [c for c in calls if isinstance(c, dict)]})
        if choice.get("finish_reason"):
            self.finish_reason = choice["finish_reason"]
        return out

    def end(self):
        """The held tool calls whole, then the ``done`` object: why it ended, the token counts,
        and the durations Ollama reports in ns (to the first token: the prompt's)."""
        out, held = [], self.held.get("tool_calls")
        if held:
            calls = _ollama_calls([held[index] for index in sorted(held)])
            out.append((None, ollama_object(self.name, self.kind, self.created_at, calls=calls)))
        total = self.clock() - self.started
        first = self.first_at - self.started if self.first_at is not None else total
        done = ollama_object(self.name, self.kind, self.created_at)
        done.update(done=True, done_reason="length" if self.finish_reason == "length" else "stop",
                    total_duration=int(total * 1e9), load_duration=0,
                    prompt_eval_count=_count(self.raw_usage, "prompt_tokens"),
                    prompt_eval_duration=int(first * 1e9),
                    eval_count=_count(self.raw_usage, "completion_tokens"),
                    eval_duration=int(max(0.0, total - first) * 1e9))
        return out + [(None, done)]


def ollama_loaded(name, kind, created_at, unload):
    """The answer to an /api/generate or /api/chat with nothing to say (Ollama loads or, with
    ``keep_alive`` 0, unloads the model): done at once, no upstream call."""
    out = ollama_object(name, kind, created_at)
    out.update(done=True, done_reason="unload" if unload else "load")
    return out


def plan_ollama(payload, kind, name, model, info, quirks, now, started, clock):
    """POST /api/chat or /api/generate: an OpenAI chat request planned by plan_chat, its answer
    turned back into Ollama's (``name``: the model as the client named it, which Ollama echoes;
    ``started`` on ``clock``: the request's arrival, for the durations)."""
    chat = ollama_to_chat_request(payload, kind, model, info)
    plan = plan_chat(chat, validate_chat_request(chat), model, info, quirks, now)
    created_at = rfc3339(now)
    chat_chain = plan.chain
    plan.dialect, plan.effort_name = OLLAMA, "think"
    translate_with(plan, lambda: chat_chain() + [ChatToOllama(name, kind, created_at, started,
                                                              clock)])
    plan.ping = encode_ndjson_item((None, ollama_object(name, kind, created_at)))  # an empty delta
    return plan


def plan_ollama_embed(payload, legacy, name, model, info, started, clock):
    """POST /api/embed (``input``: a string or strings) or the older /api/embeddings
    (``prompt``: one string) as an OpenAI embeddings call, answered in Ollama's shape."""
    text = ([check(payload, "prompt", "string", required=True)] if legacy
            else check(payload, "input", ("string", "array"), required=True))
    request, _ = prepare_embeddings_request({"model": model, "input": text,
                                             "dimensions": check(payload, "dimensions", "integer")})
    plan = plan_embeddings(request, "float", model, info)
    plan.dialect = OLLAMA

    def vectors(data):
        answer = normalize_embeddings_response(data, model, "float")
        return [item["embedding"] for item in answer["data"]]
    if legacy:
        plan.answer = lambda data: {"embedding": (vectors(data) or [[]])[0]}
    else:
        plan.answer = lambda data: {"model": name, "embeddings": vectors(data),
                                    "total_duration": int((clock() - started) * 1e9),
                                    "load_duration": 0,
                                    "prompt_eval_count": _count(data, "usage", "prompt_tokens")}
    return plan


# ------------------------------------------------------------------------------------------
# 10. Bridges between threads and the event loop
#    The only two places where the blocking world (§5-7) and the asyncio world (§11-13) meet.
#    WorkerPool runs one blocking call per job (a request up to its answer's head, a token
#    exchange, an image fetch) and resolves the loop's future. StreamHub reads every streamed
#    answer at once on one thread: a selector over non-blocking upstream sockets, and one
#    hand-over to the loop per wake-up carrying every stream's new bytes. (A thread per stream
#    woke for each chunk, and the futex and self-pipe traffic of those wake-ups was two thirds of
#    the proxy's CPU on a streamed answer.)
# ------------------------------------------------------------------------------------------

# -- Performance machinery: each piece that exists only to be faster or lighter -------------
# Where it lives and the figure it buys. Figures: `python3 test_coproxy.py --bench` (its
# --versus URL and --soak modes), on 2 shared cores; "A/B" means interleaved rounds against
# the same code without the piece, medians of 3. Everything not listed is there for
# correctness. A piece whose figure is gone goes too: this round removed UpstreamClient's
# parsed-URL cache (4 us a request), the Server's per-second Date header cache (3.5 us) and a
# module-level JSON encoder (1.2 us a call): each under 1 % of a request's CPU, below noise.
#
#   limit_malloc_arenas (here)     soak RSS with leaving clients: +13 MB a minute -> flat
#   WorkerPool (here): its own     1,000 streams opened at once, 1st chunk p50: 1.66 s vs
#     starter thread, idle         2.18 s with concurrent.futures.ThreadPoolExecutor and
#     workers first                run_in_executor (A/B); a loop->worker->loop hop 44 us vs
#                                  73 us (serial), 10 vs 27 us (16 at once)
#   WorkerPool._run_job (here):    CPU per non-stream request at 16 clients (TLS) 0.639 ->
#     jobs that finish while the   0.544 ms with the random ids below (lower in 6 of 6 A/B
#     loop is busy share one       rounds; 0.609 with the ids alone), context switches 11.2
#     wake-up of the loop          -> 7.9, requests/s +11 %
#   random_id, random_uuid [3]:    one system call (getrandom) and one GIL hand-off less per
#     a keyed BLAKE2b of a         request (X-Request-Id) and per id an answer is given; still
#     counter, not os.urandom      unguessable (a stored Response's id is its only key)
#   WorkerPool.run_alone (here)    /healthz while 24 heavy bodies are parsed: a few ms, not 2 s
#   StreamHub (here): one reader   CPU per 10,000 streamed chunks (TLS, 50 streams) 1.21 s ->
#     thread, batched hand-over    0.51 s; 1,000 streams' 1st chunk 1.75-2.54 s -> 1.02-1.13 s
#   StreamRelay._relay [12]: each  the loop's CPU per chunk (TLS, 50 streams): about 5 us less
#     batch written inside the     than waking the relay's coroutine per batch, a quarter of
#     hub's hand-over              the loop's share (A/B)
#   blocking upstream sockets,     per non-stream request at 16 clients (TLS): poll 1.15 ->
#     timed by the gateway's       0.03 and ioctl 1.09 -> 0.05 system calls, futex 49 -> 36
#     timer (AbortHandle.          (strace); worker threads' CPU 0.270 -> 0.245 ms (lower in 6
#     times_out, SilenceTimer)     of 6 A/B rounds), context switches 13.6 -> 9.6
#     [6, 12]
#   kept-alive upstream            new upstream connections per 100 sequential requests: 0
#     connections (UpstreamClient  (a TLS handshake through the tunnel is ~4 ms of wall time
#     pool, LIFO, reaper) [6]      and ~1 ms of CPU)
#   TLS session resumption         per new upstream connection with an RSA-2048 chain of two
#     (UpstreamClient._secure) [6] (as Copilot's): client CPU 1.0-1.1 ms -> 0.71 ms (none with
#                                  the bench's EC test certificate)
#   fresh catalogue on the loop,   no thread hop per request for the model list (44-75 us);
#     one refresh for all [12]     1,000 streams opening at once make one fetch, not 1,000
#   ImageInliner's cache [12]      agents resend their whole history every turn: an image
#                                  URL is fetched once, not once per turn (a fetch is a
#                                  network round trip or more, in a worker)
#   Gateway._note_windows [12]     parsing Copilot's two x-usage-ratelimit-* headers again
#                                  only when they change: 36 us an answer
#   App.work [13]: small bodies    a thread hop per request (as WorkerPool above); heavy ones
#     parsed on the loop           go to a worker so that no client waits on the loop
#   Response.send [11]: head and   one send() per answer, not two (~40 us each on loopback)
#     body in one write
#   History writer rests [5]       no thread wake-up per request: CPU per non-stream request
#                                  at 16 clients 0.67-0.88x of before (A/B)
#   Ledger._local_day [5]          local_day per quarter hour, not per record: a start reads
#                                  the last 24 hours of history (thousands of records)
#   ssl_context on first use [6]   start: ~2 MB and tens of milliseconds less without HTTPS
# --------------------------------------------------------------------------------------------

def limit_malloc_arenas():
    """One malloc arena for the whole process, on glibc (elsewhere nothing happens). glibc gives
    threads arenas of their own, and TLS buffers that one thread allocates and another frees kept
    RSS growing: the soak with clients that leave mid-request grew 13 MB a minute, and stays flat
    with one arena. Our threads mostly run under the GIL, so sharing an arena costs them little.
    Process-wide: set by `serve`, not by App (an embedding program keeps its own)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes
        return bool(ctypes.CDLL("libc.so.6").mallopt(-8, 1))  # -8: M_ARENA_MAX
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False


class WorkerPool(concurrent.futures.Executor):
    """The dedicated thread pool for blocking work (never the loop's default executor, which
    asyncio uses for DNS).

    Idle workers take jobs first; when none is idle and fewer than ``max_workers`` run, the pool's
    starter thread starts a new named worker. The caller never starts threads itself:
    Thread.start() waits until the new thread has run, and the caller is usually the event loop,
    which a burst of 1,000 streams opening at once would stall. Workers idle for ``idle_seconds``
    exit, down to MIN_WORKERS."""

    def __init__(self, max_workers, idle_seconds=IDLE_WORKER_SECONDS, name="coproxy-worker"):
        self.max_workers = max_workers
        self.idle_seconds = idle_seconds
        self.name = name
        self._jobs = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._start_wanted = threading.Condition(self._lock)
        self._idle = 0          # workers waiting for a job (each queued job takes one away)
        self._to_start = 0      # workers the starter owes
        self._threads = set()
        self._starter = None
        self._serial = 0
        self._shutdown = False
        #: loop -> [(future, result, error)] finished, for the one call that settles them all
        self._finished = {}
        self._one_at_a_time = None  # an asyncio.Lock, made on the loop that first needs it

    @property
    def workers(self):
        with self._lock:
            return len(self._threads) + self._to_start

    def _enqueue(self, job):
        """Queue a job. An idle worker takes it (counted off ``_idle`` here, so that two jobs
        never count on one worker); else, below ``max_workers``, the starter thread owes one
        more worker; at the cap the job waits in the queue for the first free worker."""
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._jobs.put(job)
            if self._idle:
                self._idle -= 1  # that worker will take this job
                return
            if len(self._threads) + self._to_start >= self.max_workers:
                return  # queued until a worker is free
            self._to_start += 1
            self._start_wanted.notify()
            if self._starter is None:  # once per pool; it waits for our lock, never we for its
                self._starter = threading.Thread(target=self._start_workers, daemon=True,
                                                 name=self.name + "-starter")
                self._starter.start()

    def _start_workers(self):
        while True:
            with self._lock:
                while not self._to_start and not self._shutdown:
                    self._start_wanted.wait()
                if not self._to_start:  # shut down, and every worker owed has been started
                    return
                self._serial += 1
                thread = threading.Thread(target=self._work, daemon=True,
                                          name="%s-%d" % (self.name, self._serial))
                self._threads.add(thread)
                self._to_start -= 1
            thread.start()

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

    async def run_alone(self, loop, fn, *args):
        """``fn(*args)`` in a worker, after the CPU-bound jobs queued before it (parsing, checking
        or planning a large request): threads share one GIL, so running them side by side is no
        faster, and each one contending makes the event loop wait longer for its turn (24 at
        once kept /healthz waiting 2 s; one at a time, a few ms)."""
        if self._one_at_a_time is None:
            self._one_at_a_time = asyncio.Lock()
        async with self._one_at_a_time:
            return await self.run(loop, fn, *args)

    @staticmethod
    def _settle(future, result, error):
        if not future.done():
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)

    def _settle_finished(self, loop):
        """On ``loop``: settle every job finished for it since the last call."""
        with self._lock:
            finished = self._finished.pop(loop, ())
        for future, result, error in finished:
            self._settle(future, result, error)

    def _work(self):
        """A worker's life: take jobs until shutdown's None, or until it has been idle for
        ``idle_seconds`` while others are idle too (down to MIN_WORKERS)."""
        try:
            while True:
                try:
                    job = self._jobs.get(timeout=self.idle_seconds)
                except queue.Empty:
                    # After a burst, give the threads back. Every waiting worker is counted in
                    # _idle or holds a queued job, so leaving while _idle > 0 strands no job.
                    with self._lock:
                        if self._idle > 0 and len(self._threads) > MIN_WORKERS:
                            self._idle -= 1
                            return
                    continue
                if job is None:
                    return
                self._run_job(*job)
                del job
                with self._lock:
                    self._idle += 1
        finally:
            with self._lock:
                self._threads.discard(threading.current_thread())

    def _run_job(self, future, loop, fn, args, kwargs):
        """Run one job and settle its future: a concurrent one here, an asyncio one on its
        loop (call_soon_threadsafe: futures of a loop are touched only on the loop)."""
        if loop is None and not future.set_running_or_notify_cancel():
            return
        result = error = None
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:  # delivered to whoever awaits the future
            error = exc
        try:
            if loop is None:
                self._settle(future, result, error)
                return
            # Jobs that finish while the loop has not yet taken the ones before join them: one
            # wake-up of the loop (a system call here, one there) for all of them.
            with self._lock:
                finished = self._finished.setdefault(loop, [])
                finished.append((future, result, error))
                if len(finished) > 1:
                    return
            try:
                loop.call_soon_threadsafe(self._settle_finished, loop)
            except RuntimeError:  # the loop has closed: nobody awaits these, so none are kept
                with self._lock:
                    self._finished.pop(loop, None)
        finally:  # the error's traceback holds this frame (and the job's arguments, a whole
            # request body): no way back to the error from here, else a cycle (error ->
            # traceback -> frame -> future or finished -> error) only the garbage collector frees
            future = result = error = finished = None

    def shutdown(self, wait=True, **_):
        """No new jobs; the queued ones still run, then the workers leave. With ``wait``, return
        only when every worker has left (threads are daemons, so an exit never waits on them)."""
        with self._lock:
            self._shutdown = True
            self._start_wanted.notify_all()
            starter, leaving = self._starter, len(self._threads) + self._to_start
        for _ in range(leaving):  # behind the queued jobs, which the workers still run
            self._jobs.put(None)
        if wait:
            if starter is not None and starter is not threading.current_thread():
                starter.join()  # it starts the workers still owed, then leaves
            with self._lock:
                threads = list(self._threads)
            for thread in threads:
                if thread is not threading.current_thread():
                    thread.join()


class HubStream:
    """One upstream answer the StreamHub reads, and who gets its bytes: ``receive(data, ended,
    error)``, called on the loop with each batch (``ended`` with the last one, ``error`` saying
    why the answer did not end cleanly). Its owner pauses and resumes the reading (backpressure),
    and closes the stream when it is done with it.

    Each field below has one writer. ``receive`` (the loop): None once closed. ``ended`` (the
    loop): the end was delivered, so the hub is done with the answer (its connection pooled or
    closed). ``paused`` (the hub thread): out of the selector and exempt from the silence limit."""

    __slots__ = ("hub", "response", "receive", "ended", "paused", "last_read")

    def __init__(self, hub, response, receive):
        self.hub = hub
        self.response = response
        self.receive = receive
        self.ended = False
        self.paused = False
        self.last_read = time.monotonic()  # the hub thread's: when bytes last came

    def pause(self):
        """Stop reading this upstream (the client is slow): TCP then slows the upstream down."""
        if not self.ended:
            self.hub.command(self, "pause")

    def resume(self):
        if not self.ended:
            self.hub.command(self, "resume")

    def close(self):
        """Nothing more is delivered. Unless the end came, the hub closes the upstream connection
        (never pooled: the answer was not read to its end)."""
        if self.receive is not None:
            self.receive = None
            if not self.ended:
                self.hub.command(self, "cancel")


class StreamHub:
    """Reads every streamed upstream answer on one thread and hands their bytes to the loop.

    The thread waits in a selector over the non-blocking upstream sockets; each wake-up it pulls
    what every ready socket has (TLS records included: ``pull`` drains the SSL buffer too), then
    schedules one call on the loop for the whole batch, and none while the loop has not taken the
    previous one (bytes that arrive meanwhile join it); on the loop, that call gives each stream
    its bytes. A finished answer's connection goes back to its pool from this thread.
    ``read_timeout`` is the longest silence tolerated per stream.

    The loop reaches the thread only through ``command`` (a queue, and a byte on a wake-up
    socket); the thread reaches the loop only through ``_pending`` and one scheduled call."""

    #: How often the thread looks for silent streams (so the longest it waits in select while
    #: any is open): the limit is minutes, a second is exact enough; a test takes less.
    SILENCE_CHECK_SECONDS = 1.0

    def __init__(self, loop, read_timeout=DEFAULT_UPSTREAM_READ_TIMEOUT_SECONDS):
        self.loop = loop
        self.read_timeout = read_timeout
        self._selector = selectors.DefaultSelector()
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._wake_reader.setblocking(False)
        self._wake_writer.setblocking(False)
        self._selector.register(self._wake_reader, selectors.EVENT_READ, None)
        self._commands = collections.deque()
        self._lock = threading.Lock()
        self._ready = []        # the hub thread's own list, handed over in _publish
        # Handed over, not yet taken by the loop: stream -> [pieces, ended, error], oldest first.
        # What one stream gets while the loop is busy elsewhere waits as one entry, and reaches
        # its client in one write.
        self._pending = collections.OrderedDict()
        self._scheduled = False  # a _deliver is due on the loop: new bytes just join _pending
        self._streams = set()    # the hub thread's: the streams it has not ended
        self._thread = None
        self._closing = False
        self._next_timeout_check = 0.0

    def attach(self, response, receive):
        """Start reading ``response``'s body (its head already read) for ``receive`` (see
        HubStream); returns its HubStream."""
        stream = HubStream(self, response, receive)
        self.command(stream, "add")
        return stream

    def command(self, stream, op):
        """Ask the hub thread to add, pause, resume or cancel ``stream`` (from the loop)."""
        self._commands.append((stream, op))
        with self._lock:
            if self._thread is None and not self._closing:
                self._thread = threading.Thread(target=self._run, name="coproxy-stream-hub",
                                                daemon=True)
                self._thread.start()
        with contextlib.suppress(OSError):  # the wake-up pipe is full: the thread is awake anyway
            self._wake_writer.send(b"\0")

    def close(self):
        """Cancel every stream and let the thread leave."""
        with self._lock:
            self._closing = True
            thread = self._thread
        if thread is None:  # never started: nothing but the wake-up pair and the selector to close
            self._selector.close()
            self._wake_reader.close()
        else:
            self.command(None, "close")
            if thread is not threading.current_thread():
                thread.join(5)
        self._wake_writer.close()

    # -- the hub thread -----------------------------------------------------------------------
    def _run(self):
        """The thread: wait for sockets or commands; apply the commands, then read what is ready
        (so that no byte is read after a pause or a cancel); enforce the silence limit (once a
        second); hand this wake-up's bytes over in one go."""
        try:
            while True:
                ready = []
                wait = self.SILENCE_CHECK_SECONDS if self._streams else None
                for key, _ in self._selector.select(wait):
                    if key.data is not None:
                        ready.append(key.data)
                    else:  # the wake-up bytes, taken before the commands they announce
                        with contextlib.suppress(OSError):
                            while self._wake_reader.recv(4096):
                                pass
                now = time.monotonic()
                if self._run_commands(now):
                    return
                for stream in ready:
                    if stream in self._streams and not stream.paused:
                        self._read(stream, now)
                if now >= self._next_timeout_check:
                    self._check_timeouts(now)
                self._publish()
        finally:
            for stream in list(self._streams):  # nobody reads them any more
                self._finish(stream, None, reuse=False, deliver=False)
            self._selector.close()
            self._wake_reader.close()

    def _run_commands(self, now):
        """Apply what the loop asked; True when the hub is to stop. A stream is in the selector
        exactly while it is in ``_streams`` and not paused."""
        while self._commands:
            stream, op = self._commands.popleft()
            if op == "close":
                return True
            if op == "add":
                self._streams.add(stream)
                try:
                    stream.response.socket.setblocking(False)
                except OSError as exc:
                    self._finish(stream, exc)
                    continue
                stream.last_read = now
                self._read(stream, now)  # bytes may already sit in our buffer or the SSL object's
                if stream in self._streams:
                    self._register(stream)
            elif stream not in self._streams:
                continue  # ended already: nothing to pause, resume or cancel
            elif op == "cancel":
                self._finish(stream, None, reuse=False, deliver=False)
            elif op == "pause" and not stream.paused:
                stream.paused = True
                self._unregister(stream)
            elif op == "resume" and stream.paused:
                stream.paused = False
                stream.last_read = now  # the silence limit counts from the resume
                self._read(stream, now)
                if stream in self._streams:
                    self._register(stream)
        return False

    def _register(self, stream):
        self._selector.register(stream.response.socket, selectors.EVENT_READ, stream)

    def _unregister(self, stream):
        with contextlib.suppress(KeyError, ValueError, OSError):  # not registered (paused, new)
            self._selector.unregister(stream.response.socket)

    def _read(self, stream, now):
        try:
            data, done = stream.response.pull()
        except Exception as exc:  # cut, broken framing, TLS failure: the stream's end, for the loop
            self._finish(stream, exc)
            return
        if data:
            stream.last_read = now
            self._ready.append((stream, data, False, None))
        if done:
            self._finish(stream, None)

    def _finish(self, stream, error, reuse=True, deliver=True):
        """The end of a stream for the hub: its connection back to the pool (only after a clean
        end, and with ``reuse``) or closed; the loop told unless nobody waits for it (a cancel)."""
        self._unregister(stream)
        self._streams.discard(stream)
        stream.response.close(reuse=reuse and error is None)
        if deliver:
            self._ready.append((stream, b"", True, error))

    def _check_timeouts(self, now):
        self._next_timeout_check = now + self.SILENCE_CHECK_SECONDS
        for stream in list(self._streams):
            if not stream.paused and now - stream.last_read > self.read_timeout:
                self._finish(stream, socket.timeout("no upstream data for %ds" % self.read_timeout))

    def _publish(self):
        """Hand this wake-up's bytes and ends to the loop: at most one scheduled call waiting."""
        if not self._ready:
            return
        with self._lock:
            pending = self._pending
            for stream, data, ended, error in self._ready:
                entry = pending.get(stream)
                if entry is None:
                    pending[stream] = [[data], ended, error]
                else:
                    entry[0].append(data)
                    if ended:
                        entry[1], entry[2] = True, error
            schedule = not self._scheduled  # else the loop has not taken the last batch: join it
            self._scheduled = True
        self._ready = []
        if schedule:
            with contextlib.suppress(RuntimeError):  # the loop has closed
                self.loop.call_soon_threadsafe(self._deliver)

    # -- on the loop ------------------------------------------------------------------------
    def _deliver(self):
        """Give up to HUB_STREAMS_PER_TURN streams their batches, the rest after whatever else is
        ready: one long batch would hold every other client up."""
        with self._lock:
            pending = self._pending
            count = min(len(pending), HUB_STREAMS_PER_TURN)
            batch = [pending.popitem(last=False) for _ in range(count)]
            more = bool(pending)
            self._scheduled = more  # while the rest waits, new bytes join it
        if more:
            self.loop.call_soon(self._deliver)
        for stream, (pieces, ended, error) in batch:
            if stream.receive is None:
                continue  # closed: nobody wants these bytes
            if ended:
                stream.ended = True  # before receive, which may close the stream
            try:
                stream.receive(pieces[0] if len(pieces) == 1 else b"".join(pieces), ended, error)
            except Exception:  # one stream's failure must not cost the others their bytes
                log.exception("stream delivery failed")
                stream.close()

# ------------------------------------------------------------------------------------------
# 11. HTTP/1.1 server (asyncio)
#    A strict, small HTTP/1.1 server on asyncio streams. Per connection: a byte buffer we
#    parse ourselves (so 414 and 431 are told apart and pipelined requests stay queued in
#    order); a timer for the head and for each silence inside a body (408), one for idle
#    keep-alive (silent close), a total limit on a body, none on an active stream. Bodies by
#    Content-Length or chunked, 413 over the cap, 100-continue when the app first reads the
#    body. Every protocol error gets a JSON envelope and a close. Knows nothing of JSON shapes
#    beyond that envelope, which the app provides.
# ------------------------------------------------------------------------------------------

class ClientDisconnected(ConnectionError):
    """The client went away while we were answering; not an error worth more than a debug line."""


class _EndOfInput(Exception):
    """The client closed its side (or a timer ended the read) before a complete request arrived."""


class Request:
    """One parsed request head; the body is read on demand with ``await read_body()``."""

    __slots__ = ("method", "path", "query", "version", "headers", "content_length", "chunked",
                 "keep_alive", "expect_continue", "body", "connection", "started")

    def __init__(self, method, path, query, version, headers):
        """``query``: the query string, without "?"; ``headers``: lower-case names."""
        self.method = method
        self.path = path
        self.query = query
        self.version = version
        self.headers = headers
        self.content_length = 0  # the framing: set by parse_request_head once it has checked it
        self.chunked = False
        connection = headers.get("connection", "").lower()
        self.keep_alive = ("close" not in connection if version == "HTTP/1.1"
                           else "keep-alive" in connection)
        self.expect_continue = headers.get("expect", "").lower() == "100-continue"
        self.body = None  # bytes once read_body has taken it off the wire
        self.connection = None
        self.started = time.monotonic()

    def header(self, name, default=None):
        return self.headers.get(name, default)

    async def read_body(self, limit):
        """The whole body as bytes; 413 over ``limit``, 400 for broken chunked framing, 408 when
        the client goes silent."""
        if self.body is None:
            self.body = await self.connection.read_body(self, limit)
        return self.body

    def on_disconnect(self, callback):
        """Call ``callback`` (on the loop) as soon as the client closes while it is answered."""
        self.connection.watch_for_disconnect(callback)


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
    if any(c in target for c in "\x00 \t\x7f") or not target.isprintable():
        raise BadRequest(400, "malformed request target")
    if target.startswith(("http://", "https://")):  # absolute-form, RFC 9112 §3.2.2
        try:
            split = urllib.parse.urlsplit(target)
        except ValueError:
            raise BadRequest(400, "malformed request target")
        path, query = split.path or "/", split.query
    elif target.startswith("/") or (target == "*" and method == "OPTIONS"):
        path, _, query = target.partition("?")
    else:
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
            if name in ("host", "content-type", "content-encoding", "origin"):
                raise BadRequest(400, "duplicate %s header" % name)
            headers[name] += ", " + value
        else:
            headers[name] = value
    if version == "HTTP/1.1" and "host" not in headers:
        raise BadRequest(400, "HTTP/1.1 request without a Host header")
    request = Request(method, path, query, version, headers)
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
    return request


class Response:
    """Writes one answer: ``send()`` a whole body, or ``start_stream()``, ``write()``/
    ``write_nowait()`` and ``end()`` for a streamed one."""

    __slots__ = ("conn", "request", "status", "started", "finished", "chunked", "keep_alive",
                 "bytes_sent", "log_fields", "extra_headers", "head_sent_at")

    def __init__(self, conn, request):
        self.conn = conn
        self.request = request
        self.status = None
        self.started = False
        self.finished = False
        self.chunked = False
        self.keep_alive = request.keep_alive if request is not None else False
        self.bytes_sent = 0
        self.log_fields = {}
        self.extra_headers = []  # added to whatever answer goes out (CORS)
        self.head_sent_at = None  # time.monotonic() of the status line: the time to first byte

    def _head(self, status, headers, content_length=None):
        """The status line and headers as bytes; marks the answer started. Adds Date,
        Server, the CORS headers kept for every answer, the framing (Content-Length or chunked)
        and the connection's fate (close while shutting down or when the client asked)."""
        if self.started:
            raise RuntimeError("response already started")
        self.status = status
        self.started = True
        self.head_sent_at = time.monotonic()
        if self.conn.server.closing:
            self.keep_alive = False
        lines = ["HTTP/1.1 %d %s" % (status, REASONS.get(status, "Unknown")),
                 "Date: " + http_date(time.time()), "Server: coproxy/" + __version__]
        lines += ["%s: %s" % item for item in list(headers) + self.extra_headers]
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
        head = self._head(status, headers, len(body))
        if self.request is not None and self.request.method == "HEAD":
            body = b""
        self.finished = True
        self.conn.write_nowait(head + body if len(body) < 65536 else head)
        if len(body) >= 65536:
            self.conn.write_nowait(body)
        self.bytes_sent += len(body)
        await self.conn.drain()

    async def start_stream(self, status, headers):
        """Status line and headers of a streamed answer (chunked; close-delimited on HTTP/1.0)."""
        if self.request is not None and self.request.version == "HTTP/1.0":
            self.keep_alive = False
        else:
            self.chunked = True
        self.conn.write_nowait(self._head(status, headers))
        await self.conn.drain()

    def write_nowait(self, data):
        """One piece of a streamed body, handed to the socket now (ClientDisconnected if the
        client is gone); ``buffered()`` says how much the socket has not taken yet."""
        if not data:
            return
        self.bytes_sent += len(data)
        self.conn.write_nowait(b"%x\r\n%s\r\n" % (len(data), data) if self.chunked else data)

    def buffered(self):
        return self.conn.transport.get_write_buffer_size()

    async def drain(self):
        await self.conn.drain()

    async def end(self):
        """Finish a streamed body cleanly."""
        if self.finished:
            return
        self.finished = True
        if self.chunked:
            self.conn.write_nowait(b"0\r\n\r\n")
            await self.conn.drain()


class ClientProtocol(asyncio.StreamReaderProtocol):
    """asyncio's stream protocol for a client socket, which also tells its Connection the moment
    the client closes or resets, so that the upstream call of an exchange in progress is cut
    short. (A task reading the socket through every exchange did it before: ~20 us of the
    loop's time per request.)"""

    connection = None  # the Connection reading this socket, once it exists

    def eof_received(self):
        keep_open = super().eof_received()
        if self.connection is not None:
            self.connection.on_client_closed()
        return keep_open

    def connection_lost(self, exc):
        super().connection_lost(exc)
        connection, self.connection = self.connection, None  # no cycle left behind
        if connection is not None:
            connection.on_client_closed()


class Connection:
    """One client socket: reads requests, hands them to the app, decides about keep-alive."""

    def __init__(self, server, reader, writer):
        """Wrap one accepted socket. TCP_NODELAY: a stream's small chunks go out at once,
        where Nagle would hold each back until the client acknowledged the one before."""
        self.server = server
        self.reader = reader
        self.writer = writer
        self.transport = writer.transport
        self.buf = bytearray()
        self.exchanging = False  # a request is being answered (not to be shed at the cap)
        #: when it began waiting for a body (shed at the cap, after idle ones)
        self.receiving_since = None
        self.waiting_since = server.loop.time()  # when it began waiting for its next request head
        self.lost = False
        self.client_closed = False  # its side is closed (EOF or reset), perhaps not yet read
        self._on_lost = []
        self.timed_out = None   # "head", "body" or "idle": what a timer cut short
        self.stalled = False    # dropped for taking none of an answer for STALLED_CLIENT_SECONDS
        self._low_water = self.transport.get_write_buffer_limits()[0]
        protocol = self.transport.get_protocol()
        if isinstance(protocol, ClientProtocol):
            protocol.connection = self
        sock = writer.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = writer.get_extra_info("peername")
        self.peer = "%s:%s" % tuple(peer[:2]) if isinstance(peer, tuple) else str(peer)

    # -- reading --------------------------------------------------------------------------
    async def _fill(self):
        try:
            data = await self.reader.read(65536)
        except (ConnectionError, OSError):  # a reset: the client is gone, as after a close
            data = b""
        if not data:
            raise _EndOfInput()
        self.buf += data

    def _arm(self, seconds, what):
        return self.server.loop.call_later(seconds, self._on_timeout, what)

    def _on_timeout(self, what):
        """A read waited too long: end it as if the client had closed (no more bytes are taken
        from the socket), and let the reading coroutine answer 408 or close."""
        if self.timed_out is None:
            self.timed_out = what
            if not self.transport.is_closing():
                self.transport.pause_reading()
            self.reader.feed_eof()

    async def _read_head(self):
        """The bytes of the next request head (up to the blank line), reading more as
        needed; 414 or 431 as soon as the request line or the head is too long, without reading
        the rest."""
        searched = 0
        while True:
            index = self.buf.find(b"\r\n\r\n", searched)
            if index >= 0:
                head = bytes(self.buf[:index])
                del self.buf[:index + 4]
                return head
            searched = max(0, len(self.buf) - 3)
            line_end = self.buf.find(b"\r\n")
            if ((line_end < 0 and len(self.buf) > MAX_REQUEST_LINE_BYTES)
                    or line_end > MAX_REQUEST_LINE_BYTES):
                raise BadRequest(414, "request line longer than %d bytes" % MAX_REQUEST_LINE_BYTES)
            if len(self.buf) > MAX_REQUEST_LINE_BYTES + MAX_HEADER_BYTES:
                raise BadRequest(431, "request headers larger than %d bytes" % MAX_HEADER_BYTES)
            await self._fill()

    async def _fill_body(self):
        """One read of a body: a silence of --header-timeout seconds ends it with 408."""
        timer = self._arm(self.server.header_timeout, "body")
        try:
            await self._fill()
        except _EndOfInput:
            if self.timed_out:
                raise BadRequest(408, "the request body stopped arriving for %gs (--header-timeout)"
                                 % self.server.header_timeout if self.timed_out == "body" else
                                 "the request body took longer than %gs" % self.server.body_timeout)
            raise
        finally:
            timer.cancel()

    async def _read_exactly(self, size):
        while len(self.buf) < size:
            await self._fill_body()
        data = bytes(self.buf[:size])
        del self.buf[:size]
        return data

    async def _read_line(self, limit, what):
        searched = 0
        while True:
            index = self.buf.find(b"\r\n", searched)
            if index > limit or (index < 0 and len(self.buf) > limit):
                raise BadRequest(400, "%s longer than %d bytes" % (what, limit))
            if index >= 0:
                line = bytes(self.buf[:index])
                del self.buf[:index + 2]
                return line
            searched = max(0, len(self.buf) - 1)
            await self._fill_body()

    async def read_body(self, request, limit):
        """Read the body announced by ``request`` (called by the app through Request.read_body)."""
        if request.content_length > limit:
            raise BadRequest(413, "request body of %d bytes is larger than the %d-byte limit "
                                  "(--max-body-mb)" % (request.content_length, limit))
        if not request.chunked and request.content_length == 0:
            return b""
        if request.expect_continue and request.version == "HTTP/1.1" and not self.buf:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        # all here: no timer, no wait
        if not request.chunked and len(self.buf) >= request.content_length:
            body = bytes(self.buf[:request.content_length])
            del self.buf[:request.content_length]
            return body
        total = self._arm(self.server.body_timeout, "body_total")
        budget = BodyBudget(self.server, limit)
        self.receiving_since = self.server.loop.time()
        try:
            if not request.chunked:
                budget.take(request.content_length)
                return await self._read_exactly(request.content_length)
            body = bytearray()
            while True:
                line = await self._read_line(MAX_CHUNK_LINE_BYTES, "chunk-size line")
                size_text = line.split(b";", 1)[0].strip()
                if (not size_text or len(size_text) > 16
                        or size_text.strip(b"0123456789abcdefABCDEF")):
                    raise BadRequest(400, "malformed chunk size")
                size = int(size_text, 16)
                if size == 0:
                    break
                if len(body) + size > limit:
                    raise BadRequest(413, "chunked request body larger than the %d-byte limit "
                                          "(--max-body-mb)" % limit)
                budget.take(size)
                body += await self._read_exactly(size)
                if await self._read_exactly(2) != b"\r\n":
                    raise BadRequest(400, "chunk not followed by CRLF")
            for _ in range(MAX_HEADER_COUNT + 1):  # trailer fields: read and ignored
                if not await self._read_line(MAX_HEADER_BYTES, "trailer line"):
                    return bytes(body)
            raise BadRequest(431, "too many trailer fields")
        finally:
            total.cancel()
            budget.release()
            self.receiving_since = None

    # -- noticing a client that leaves while we answer ----------------------------------------
    def watch_for_disconnect(self, callback):
        """Call ``callback`` as soon as the client closes (now, if it has); bytes it pipelines
        meanwhile stay in the reader. ClientProtocol tells us, so no task waits on a read."""
        if self.client_closed:
            self._mark_lost()
        if self.lost:
            callback()
            return
        self._on_lost.append(callback)

    def on_client_closed(self):
        """From ClientProtocol: the client closed its side or reset. An exchange being watched
        is lost now; a connection between requests learns it from its next read, and a client
        that half-closes after its request still gets answers from routes that do not watch."""
        self.client_closed = True
        if self._on_lost:
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

    def abort(self):
        """Drop the connection now, unsent bytes and all (a client that stopped reading)."""
        self.transport.abort()
        self._mark_lost()

    # -- writing --------------------------------------------------------------------------
    def write_nowait(self, data):
        if self.lost or self.transport.is_closing():
            self._mark_lost()
            raise ClientDisconnected("client went away")
        self.transport.write(data)

    async def drain(self):
        """Wait while the client is slower than we are. A client that takes nothing for
        STALLED_CLIENT_SECONDS is dropped: it would hold its slot (and upstream) as long as it
        liked."""
        try:
            if self.transport.get_write_buffer_size() <= self._low_water:
                await self.writer.drain()  # not paused: returns at once, no timer needed
            else:
                await asyncio.wait_for(self.writer.drain(), STALLED_CLIENT_SECONDS)
        except asyncio.TimeoutError:
            self.stalled = True
            self.abort()
            raise ClientDisconnected("client stopped reading")
        except (ConnectionError, OSError):
            self._mark_lost()
            raise ClientDisconnected("client went away")

    # -- the request loop ---------------------------------------------------------------------
    async def run(self):
        """Serve requests on this connection until it closes: wait for a head (the header
        timeout for the first, the idle timeout between requests, 408 when a head stops
        arriving), parse it, answer it, and go on while keep-alive allows."""
        first = True
        while not (self.server.closing and not first):
            self.waiting_since = self.server.loop.time()
            timer = None
            try:
                if not self.buf:  # the first byte: --header-timeout, or --idle-timeout after one
                    timer = self._arm(self.server.header_timeout if first
                                      else self.server.idle_timeout, "head" if first else "idle")
                    await self._fill()
                    timer.cancel()
                first = False
                # RFC 9112 §2.2: ignore a stray CRLF between requests
                while self.buf[:2] == b"\r\n":
                    del self.buf[:2]
                # A head that is already buffered (the usual case) needs no timer.
                if b"\r\n\r\n" not in self.buf:
                    timer = self._arm(self.server.header_timeout, "head")
                request = parse_request_head(await self._read_head())
            except (_EndOfInput, ConnectionError, OSError):
                if self.timed_out == "head":
                    await self._answer_bad_request(BadRequest(408, "request not received in time"))
                return
            except BadRequest as exc:
                await self._answer_bad_request(exc)
                return
            finally:
                if timer is not None:
                    timer.cancel()
            request.connection = self
            if not await self._handle(request):
                return

    async def _handle(self, request):
        """Run one exchange; True if the connection may carry another request."""
        response = Response(self, request)
        self.exchanging = True
        try:
            await self.server.app.dispatch(request, response)
        except (ClientDisconnected, _EndOfInput):
            return False
        except Exception:  # the app answers its own errors; this is the last line of defence
            log.exception("unhandled error answering %s %s", request.method,
                          escape_controls(request.path))
            if not response.started:
                response.keep_alive = False
                with contextlib.suppress(ConnectionError):
                    await response.send(500, [("Content-Type", "application/json")],
                                        self.server.app.protocol_error_body(
                                            500, "internal error in coproxy; see its log"))
            return False
        finally:
            self.exchanging = False
            self._on_lost = []  # the next exchange watches for itself
            self.server.app.log_exchange(request, response)
        # an unread body is still on the wire: the next request cannot be found after it
        unread = request.body is None and (request.chunked or request.content_length)
        return not (self.timed_out or unread) and response.finished and response.keep_alive

    async def _answer_bad_request(self, exc):
        response = Response(self, None)  # no request: the connection closes after it
        with contextlib.suppress(ConnectionError):
            if not self.transport.is_closing():
                await response.send(exc.status, [("Content-Type", "application/json")],
                                    self.server.app.protocol_error_body(exc.status, str(exc)))
        log.debug("bad request from %s: %d %s", self.peer, exc.status, exc)


def raise_descriptor_limit():
    """Raise the soft limit on open descriptors to the hard one (the soft one is often 1,024, or
    256 on macOS, with a far higher hard one); returns the limit in force, None where there is
    no such limit (Windows)."""
    try:
        import resource  # POSIX only
    except ImportError:
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else 1 << 20
    for target in (wanted, 1 << 16, 10240):  # macOS refuses more than kern.maxfilesperproc
        if target <= soft:
            break
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            continue
        soft = target
        break
    return soft if soft != resource.RLIM_INFINITY else None


def accept_backlog(descriptors):
    """The listen backlog, which is also how many connections asyncio accepts in one go before
    any of them reaches our code (and so before the cap is checked): kept to an eighth of the
    descriptors, so that a burst cannot run out of them first."""
    return 1024 if descriptors is None else max(8, min(1024, descriptors // 8))


def connection_cap(descriptors):
    """Client connections served at once with ``descriptors`` (None: no limit): what is left
    after RESERVED_DESCRIPTORS and one accept burst, halved (each may hold an upstream socket)."""
    if descriptors is None:
        return MAX_CLIENT_CONNECTIONS
    spare = descriptors - RESERVED_DESCRIPTORS - accept_backlog(descriptors)
    return max(8, min(MAX_CLIENT_CONNECTIONS, spare // 2))


class BodyBudget:
    """What one request body holds of the server's budget for bodies being received: taken as
    the body's size becomes known (its Content-Length, or chunk by chunk), given back when the
    body is in or has failed. Past the budget: 503 with Retry-After, in the route's dialect."""

    def __init__(self, server, limit):
        """For one body that may be ``limit`` bytes (--max-body-mb): the budget is
        ``server.max_body_bytes_in_flight`` when set (tests lower it), else BODIES_IN_FLIGHT such
        bodies up to MAX_BODY_BYTES_IN_FLIGHT."""
        self.server = server
        self.cap = (server.max_body_bytes_in_flight
                    or min(MAX_BODY_BYTES_IN_FLIGHT, BODIES_IN_FLIGHT * limit))
        self.held = 0

    def take(self, size):
        server = self.server
        if server.body_bytes_in_flight + size > self.cap:
            server._over_body_budget.warn(
                "request bodies being received come to %s: answering 503 to more (a client sending "
                "many large bodies slowly?)", format_size(server.body_bytes_in_flight))
            raise ClientError(503, "coproxy is receiving %s of request bodies at once, its most; "
                                   "try again shortly" % format_size(self.cap),
                              code="overloaded", headers=[("Retry-After", "2")])
        server.body_bytes_in_flight += size
        self.held += size

    def release(self):
        self.server.body_bytes_in_flight -= self.held
        self.held = 0


class Server:
    """Accepts connections, runs a Connection per socket, and shuts down gracefully."""

    def __init__(self, app, header_timeout=DEFAULT_HEADER_TIMEOUT_SECONDS,
                 idle_timeout=DEFAULT_IDLE_TIMEOUT_SECONDS,
                 body_timeout=DEFAULT_BODY_TIMEOUT_SECONDS):
        """``app`` answers requests; the timeouts are --header-timeout, --idle-timeout
        and --body-timeout. The connection cap and the body budget are set when it starts
        (they follow the descriptor limit)."""
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
        self.descriptor_limit = None
        self.max_connections = None   # set at start from the descriptor limit (tests lower it)
        self._out_of_descriptors = ThrottledWarning(RESOURCE_WARNING_SECONDS)
        self._at_cap = ThrottledWarning(RESOURCE_WARNING_SECONDS)
        self.max_body_bytes_in_flight = None  # None: see BodyBudget (tests lower it)
        self.body_bytes_in_flight = 0
        self._over_body_budget = ThrottledWarning(RESOURCE_WARNING_SECONDS)

    async def start(self, host, port):
        """Bind and start accepting; ``self.port`` holds the real port (``port=0`` allowed)."""
        self.loop = asyncio.get_running_loop()
        self.descriptor_limit = raise_descriptor_limit()
        if self.max_connections is None:
            self.max_connections = connection_cap(self.descriptor_limit)
        self.loop.set_exception_handler(self._on_loop_error)
        loop = self.loop

        def client_protocol():  # what asyncio.start_server makes, with ClientProtocol
            return ClientProtocol(asyncio.StreamReader(loop=loop), self._on_connection, loop=loop)
        self._server = await loop.create_server(client_protocol, host, port,
                                                backlog=accept_backlog(self.descriptor_limit))
        sockname = self._server.sockets[0].getsockname()
        self.host, self.port = sockname[0], sockname[1]

    def _on_loop_error(self, loop, context):
        """asyncio reports a failed accept() once per attempt, traceback and all: out of
        descriptors, that is thousands of lines a second. One line a minute says it."""
        error = context.get("exception")
        if isinstance(error, OSError) and error.errno in (errno.EMFILE, errno.ENFILE):
            self._out_of_descriptors.warn(
                "out of descriptors (limit %s, %d client connections): new connections wait; "
                "raise the limit (ulimit -n, LimitNOFILE=) or find what holds them",
                self.descriptor_limit or "none", len(self._connections))
            return
        if self.closing and isinstance(error, ValueError) and "file descriptor" in str(error):
            return  # asyncio's accept retry after such an error, run after the socket closed
        loop.default_exception_handler(context)

    def _make_room(self):
        """At the connection cap: close the connection that has waited longest for a request head
        (idle, or still sending one), else the one that has been sending its body longest
        (nothing of theirs runs yet); False when every connection is in an exchange past that."""
        open_ones = [conn for conn in self._connections.values() if not conn.transport.is_closing()]
        waiting = [conn for conn in open_ones if not conn.exchanging]
        receiving = [conn for conn in open_ones if conn.receiving_since is not None]
        if waiting:
            shed = min(waiting, key=lambda conn: conn.waiting_since)
        elif receiving:
            shed = min(receiving, key=lambda conn: conn.receiving_since)
        else:
            return False
        self._at_cap.warn("at the connection cap (%d): closing connections that have not sent a "
                          "whole request (the oldest first)", self.max_connections)
        shed.transport.abort()
        return True

    async def _on_connection(self, reader, writer):
        """One accepted client: at the connection cap, make room by shedding one that has
        not sent a whole request, else answer 503 at once; then run its Connection to the end."""
        if len(self._connections) >= self.max_connections and not self._make_room():
            self._at_cap.warn("at the connection cap (%d), every connection in an exchange: "
                              "answering 503", self.max_connections)
            body = self.app.protocol_error_body(
                503, "coproxy is serving its most connections at once (%d); try again shortly"
                % self.max_connections)
            writer.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                         b"Retry-After: 1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
                         % (len(body), body))
            writer.transport.close()
            return
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
            if not conn.exchanging:  # idle, or still sending a head: nothing of theirs is running
                conn.transport.close()
        busy = [task for task, conn in self._connections.items() if conn.exchanging]
        if busy:
            log.info("waiting up to %ss for %d in-flight request(s)", grace, len(busy))
            await asyncio.wait(busy, timeout=grace)
        for conn in list(self._connections.values()):
            conn.transport.abort()
        if self._connections:
            await asyncio.wait(list(self._connections), timeout=2)
        if self._server is not None:
            # (asyncio.TimeoutError is the builtin one only from 3.11)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 2)

# ------------------------------------------------------------------------------------------
# 12. Catalogue, gateway and stream relay
#    The asyncio side of a proxied request, after the route has parsed and planned it.
#    Metrics count what happened. The Catalogue owns Copilot's model list (cached, refreshed
#    once however many ask) and what refusals taught about each model. The ResponseStore keeps
#    the Responses coproxy builds for translated models. The ImageInliner fetches
#    images given by URL, within the request's budget. The Gateway sends a plan: concurrency
#    slot, pacing, images, the call in a worker (one token refresh on 401), one retry after a
#    refusal it can fix or a short transient error, then the answer whole or as a stream, and
#    what it cost. The StreamRelay writes a stream to its client as the hub delivers it.
# ------------------------------------------------------------------------------------------

JSON_HEADERS = [("Content-Type", "application/json")]
#: gen_ai.provider.name for Copilot: OpenTelemetry lists no value for it, and allows our own.
GEN_AI_PROVIDER = "github.copilot"
_DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48,
                     40.96, 81.92)
_TOKEN_BUCKETS = tuple(4 ** n for n in range(14))  # 1, 4, 16 ... 67,108,864
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                    120.0)


class Metrics:
    """Counters and histograms for GET /metrics, in Prometheus' text format (0.0.4). The gen_ai_*
    series follow OpenTelemetry's GenAI conventions as an OTel->Prometheus pipeline names them,
    so dashboards built for other LLM gateways read them as they are. Touched only on the loop;
    label values are bounded (routes, statuses, catalogue ids, token types)."""

    #: name -> (kind, help text, histogram buckets or None)
    METRICS = {
        "coproxy_requests_total": (
            "counter", "Requests answered, by route, status, model and initiator.", None),
        "coproxy_request_bytes_total": (
            "counter", "Request body bytes received from clients.", None),
        "coproxy_response_bytes_total": (
            "counter", "Response body bytes sent to clients.", None),
        "coproxy_premium_requests_total": (
            "counter", "Premium requests spent on request-billed plans (the model's multiplier "
                       "per user turn).", None),
        "coproxy_ai_credits_total": (
            "counter", "AI credits spent, as Copilot reported them (or estimated from the "
                       "catalogue's token prices), by model.", None),
        "coproxy_tokens_total": (
            "counter", "Tokens by model and type (input includes cached).", None),
        "coproxy_limit_hits_total": (
            "counter", "Copilot 429s for a usage window (5-hour session, weekly).", None),
        "coproxy_upstream_latency_seconds": (
            "histogram", "Time from a request's arrival to Copilot's answer headers.",
            _LATENCY_BUCKETS),
        "gen_ai_client_operation_duration_seconds": (
            "histogram", "Duration of a model call, request to last byte.", _DURATION_BUCKETS),
        "gen_ai_client_operation_time_to_first_chunk_seconds": (
            "histogram", "Time from a streamed request's arrival to its first chunk.",
            _DURATION_BUCKETS),
        "gen_ai_client_token_usage": (
            "histogram", "Tokens per model call by type (input, output).", _TOKEN_BUCKETS),
    }

    def __init__(self):
        self.counters = collections.Counter()
        self.histograms = {}
        self.active_streams = 0

    def inc(self, name, labels=(), value=1):
        self.counters[(name, labels)] += value

    def observe(self, name, value, labels=()):
        """Count ``value`` in its bucket (made cumulative when rendered), the count and the sum."""
        buckets = self.METRICS[name][2]
        histogram = self.histograms.setdefault((name, labels), [[0] * len(buckets), 0, 0.0])
        index = bisect.bisect_left(buckets, value)
        if index < len(buckets):
            histogram[0][index] += 1
        histogram[1] += 1
        histogram[2] += value

    @staticmethod
    def _labels(pairs):
        if not pairs:
            return ""
        return "{%s}" % ",".join(
            '%s="%s"' % (k, str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", " "))
            for k, v in pairs)

    def render(self, auth, client, started_at):
        """The exposition text. Histogram buckets are kept per bucket and made cumulative here
        (le="..."), as the format wants; the gauges and the counters kept elsewhere (token
        exchanges, upstream connections) are read now, at scrape time."""
        gauges = [("coproxy_active_streams", "Streams being relayed now.", "gauge",
                   self.active_streams),
                  ("coproxy_token_refreshes_total", "Copilot token exchanges.", "counter",
                   auth.exchanges),
                  ("coproxy_token_refresh_failures_total", "Copilot token exchanges that failed.",
                   "counter", auth.exchange_failures),
                  ("coproxy_upstream_connections_opened_total",
                   "Connections opened to GitHub and Copilot.", "counter",
                   client.connections_opened),
                  ("coproxy_upstream_idle_connections",
                   "Kept-alive upstream connections waiting for reuse.", "gauge",
                   client.idle_connections()),
                  ("coproxy_start_time_seconds", "When this coproxy started (unix time).", "gauge",
                   started_at)]
        lines = []
        labelled = self._labels
        for name, (kind, text, buckets) in sorted(self.METRICS.items()):
            lines += ["# HELP %s %s" % (name, text), "# TYPE %s %s" % (name, kind)]
            if kind == "counter":
                for (metric, labels), value in sorted(self.counters.items()):
                    if metric == name:
                        lines.append("%s%s %s" % (name, labelled(labels), format(value, ".10g")))
                continue
            for (metric, labels), (counts, count, total) in sorted(self.histograms.items()):
                if metric != name:
                    continue
                # the last bucket, +Inf, holds every observation: the count
                bounds = [format(bound, "g") for bound in buckets] + ["+Inf"]
                for bound, cumulative in zip(bounds, list(itertools.accumulate(counts)) + [count]):
                    lines.append("%s_bucket%s %d" % (name, labelled(labels + (("le", bound),)),
                                                     cumulative))
                lines += ["%s_sum%s %s" % (name, labelled(labels), format(total, ".6f")),
                          "%s_count%s %d" % (name, labelled(labels), count)]
        for name, text, kind, value in gauges:
            lines += ["# HELP %s %s" % (name, text), "# TYPE %s %s" % (name, kind),
                      "%s %s" % (name, format(value, ".15g"))]
        return ("\n".join(lines) + "\n").encode("utf-8")

    def since_start(self):
        """/usage's counters, read off the metrics: requests by initiator and by model, premium
        requests, AI credits and tokens per model."""
        by_initiator, models, premium, credits = collections.Counter(), {}, 0.0, 0.0

        def model_entry(name):
            return models.setdefault(name, {"requests": 0, "credits": 0.0, "tokens": {}})
        for (name, labels), value in self.counters.items():
            labels = dict(labels)
            if name == "coproxy_requests_total" and labels.get("initiator"):
                by_initiator[labels["initiator"]] += value
                model_entry(labels["model"])["requests"] += value
            elif name == "coproxy_premium_requests_total":
                premium += value
            elif name == "coproxy_ai_credits_total":
                credits += value
                entry = model_entry(labels["model"])
                entry["credits"] = round(entry["credits"] + value, 6)
            elif name == "coproxy_tokens_total":
                tokens = model_entry(labels["model"])["tokens"]
                tokens[labels["type"]] = tokens.get(labels["type"], 0) + value
        return {"requests": sum(by_initiator.values()), "by_initiator": dict(by_initiator),
                "premium_requests": round(premium, 2), "credits": round(credits, 6),
                "models": models}


class Catalogue:
    """Copilot's model list as the proxy uses it. Fetched in a worker and cached (a fresh copy is
    answered from the loop without a thread hop: it is on every request's path); a stale one is
    refreshed once however many requests ask at that moment (1,000 streams opening at once must
    not send 1,000 threads to fetch it); the built-in list stands in while Copilot cannot be
    reached. Resolves client model names; remembers what refusals taught per model."""

    def __init__(self, config, auth, pool, on_auth_result):
        self.config = config
        self.auth = auth
        self.pool = pool
        self.on_auth_result = on_auth_result   # called with None (fine) or the AuthError message
        self.models = None
        self.source = None
        self.by_id = {}
        self._fetched_at = 0.0
        self._refresh = None
        self._quirks = {}

    async def current(self):
        """(models, source): Copilot's list ("copilot"), or the built-in one ("fallback")."""
        if self.models is not None and time.monotonic() - self._fetched_at < self.config.models_ttl:
            return self.models, self.source
        if self._refresh is None:
            self._refresh = asyncio.get_running_loop().create_task(self._fetch())
        return await asyncio.shield(self._refresh)

    async def _fetch(self):
        """Fetch Copilot's list in a worker; on failure keep serving the cached list, or the
        built-in fallback when there is none. Tells the App whether auth worked (for /healthz)."""
        try:
            try:
                models = await self.pool.run(asyncio.get_running_loop(), self.auth.fetch_models)
                self.on_auth_result(None)
                source = "copilot"
            except (AuthError, UpstreamUnreachable) as exc:
                if isinstance(exc, AuthError):
                    self.on_auth_result(str(exc))
                if self.models is not None and self.source == "copilot":
                    log.warning("refreshing the model list failed (%s); serving the cached one",
                                exc)
                    self._fetched_at = time.monotonic()
                    return self.models, self.source
                log.warning("model list unavailable (%s); serving the built-in fallback list", exc)
                models, source = FALLBACK_MODELS, "fallback"
            if source == "copilot" and not any(m["id"] == AUTO_MODEL_ID for m in models):
                models = models + [AUTO_MODEL_ENTRY]  # so every list drawn from it shows auto
            self.models, self.source, self.by_id = models, source, {m["id"]: m for m in models}
            self._fetched_at = time.monotonic() if source == "copilot" else 0.0
            return models, source
        finally:
            self._refresh = None

    async def resolve(self, name):
        """(catalogue id, entry) for a client's model name: --model-alias first, then the names
        resolve_model understands; an unknown name is a 404 with close matches before any upstream
        call, unless the catalogue is the fallback list (then Copilot decides)."""
        _, source = await self.current()
        aliases = self.config.model_aliases
        name = aliases.get(name) or aliases.get(without_tag(name)) or name
        if without_tag(name) == AUTO_MODEL_ID:  # auto:latest too (Ollama clients)
            return await self._resolve_auto()
        model = name if name in self.by_id else resolve_model(name, list(self.by_id))
        if model is None:
            if source == "copilot":
                raise unknown_model_error(name, list(self.by_id))
            return without_tag(name), {}
        return model, self.by_id[model]

    async def listing(self):
        """(entries, source): every model a client may name, as catalogue entries: Copilot's, then
        each --model-alias as its target's entry under the alias's id (with ``alias_of``). The
        OpenAI, Anthropic and Ollama model lists are all drawn from this one list."""
        models, source = await self.current()
        entries = list(models)
        for alias, target in sorted(self.config.model_aliases.items()):
            entries.append(dict(self.by_id.get(target) or {"name": alias}, id=alias,
                                alias_of=target))
        return entries, source

    async def _resolve_auto(self):
        """The model Copilot picked for ``auto``, with its own catalogue entry (the plan routes by
        that model's endpoints) and the session to send along."""
        session = self.auth.auto.fresh()
        if session is None:
            session = await self.pool.run(asyncio.get_running_loop(), self.auth.auto.session)
        model = session["model"]
        entry = self.by_id.get(model) or session["entry"] or {}
        # billing.auto_discount: on the chosen model's entry, else on Copilot's own "auto" entry
        discount = auto_discount(entry) or auto_discount(self.by_id.get(AUTO_MODEL_ID))
        return model, dict(entry, **{AUTO_SESSION_KEY: dict(session, discount=discount)})

    def label(self, model):
        """The model as a metric label: catalogue ids and aliases only (label values stay
        bounded)."""
        known = model in self.by_id or model in self.config.model_aliases
        return model if model and known else "other"

    def quirks(self, model):
        """{Copilot path: what refusals taught} for ``model``, lessons older than QUIRK_TTL_SECONDS
        left out. Keyed by endpoint as well: a model may take other values on another API."""
        now = time.monotonic()
        return {path: lesson for (name, path), (at, lesson) in self._quirks.items()
                if name == model and now - at < QUIRK_TTL_SECONDS}

    def learn(self, model, path, lesson):
        """Remember ``lesson`` for ``model`` on ``path`` for QUIRK_TTL_SECONDS."""
        if not lesson:
            return
        now = time.monotonic()
        self._quirks = {key: entry for key, entry in self._quirks.items()
                        if now - entry[0] < QUIRK_TTL_SECONDS}
        known = self._quirks.get((model, path), (now, {}))[1]
        self._quirks[(model, path)] = (now, dict(known, **lesson))


class ResponseStore:
    """The Responses coproxy built itself (for models it translates), kept in memory so that
    previous_response_id, GET /v1/responses/{id} and DELETE work as on OpenAI. Each entry holds
    a response, its own input items and the id it followed; a conversation is the chain of them.

    An entry is kept as compact JSON bytes, decoded when used: its size is what it costs in
    memory (parsed, a 720 KB list of empty objects takes ~70 MB), and nothing a later request
    does to what it decoded (images inlined, items copied) can grow it after it was counted.
    Bounded four ways: RESPONSE_STORE_COUNT entries, RESPONSE_STORE_BYTES in all, one entry at
    most 1/RESPONSE_STORE_ENTRY_SHARE of that (a larger one is not kept), and
    RESPONSE_STORE_SECONDS since an entry was last used (the least recently used go first;
    expired ones are dropped on every put). Used on the loop and by workers planning large
    requests: a lock guards it."""

    def __init__(self):
        self.count = RESPONSE_STORE_COUNT
        self.size = RESPONSE_STORE_BYTES
        self.seconds = RESPONSE_STORE_SECONDS
        self.clock = time.monotonic  # (a test moves it on)
        self.bytes = 0
        self._lock = threading.Lock()
        #: id -> (response JSON, input items JSON, previous response id, last used)
        self._entries = collections.OrderedDict()

    def put(self, response, input_items):
        """Keep ``response`` and the input it answered (items, or their JSON bytes already
        encoded: the planner encodes them before image inlining can touch them)."""
        response_json = json_dumps(response)
        input_json = input_items if isinstance(input_items, bytes) else json_dumps(input_items)
        size = len(response_json) + len(input_json)
        with self._lock:
            self._delete(response["id"])
            now = self.clock()
            while self._entries:  # least recently used first: the expired ones lead
                oldest_id, oldest = next(iter(self._entries.items()))
                if now - oldest[3] <= self.seconds:
                    break
                self._delete(oldest_id)
            if size > self.size // RESPONSE_STORE_ENTRY_SHARE:
                return
            self._entries[response["id"]] = (response_json, input_json,
                                             response.get("previous_response_id"), now)
            self.bytes += size
            while len(self._entries) > self.count or self.bytes > self.size:
                self._delete(next(iter(self._entries)))

    def _delete(self, response_id):
        entry = self._entries.pop(response_id, None)
        if entry is not None:
            self.bytes -= len(entry[0]) + len(entry[1])
        return entry is not None

    def _get(self, response_id):
        """The entry (marked as used now), or None (never kept, expired or deleted); lock held."""
        entry = self._entries.get(response_id)
        if entry is None:
            return None
        now = self.clock()
        if now - entry[3] > self.seconds:
            self._delete(response_id)
            return None
        self._entries[response_id] = entry[:3] + (now,)
        self._entries.move_to_end(response_id)
        return entry

    def has(self, response_id):
        with self._lock:
            return self._get(response_id) is not None

    def answer(self, method, response_id):
        """The answer to GET or DELETE /v1/responses/{id} when the response is kept here, else
        None."""
        if method == "DELETE":
            with self._lock:
                if not self._delete(response_id):
                    return None
            return {"id": response_id, "object": "response.deleted", "deleted": True}
        with self._lock:
            entry = self._get(response_id)
        return json.loads(entry[0]) if entry is not None else None

    def history(self, response_id):
        """The items of a conversation up to and including ``response_id`` (each response's input,
        then its output), oldest first, decoded afresh (the caller may change them); 400
        previous_response_not_found when any link is gone."""
        chain = []
        with self._lock:
            while response_id:
                entry = self._get(response_id)
                if entry is None or len(chain) > self.count:
                    raise previous_response_not_found(response_id)
                chain.append(entry)
                response_id = entry[2]
        items = []
        for response_json, input_json, _, _ in reversed(chain):
            items += json.loads(input_json) + json.loads(response_json)["output"]
        return items


class FetchBatch:
    """The image fetches of one request: what they may still take (bytes, shared by parallel
    fetches), and the means to stop them all when the client leaves or one of them fails."""

    def __init__(self, total):
        self.left = total
        self.stopped = False
        self.aborts = []
        self._lock = threading.Lock()

    def take(self, count):
        with self._lock:
            self.left -= count
            if self.left < 0:
                raise ImageNotFetched("the request's images are larger than %s in all"
                                      % format_size(MAX_IMAGE_BYTES_PER_REQUEST))

    def stop(self):
        self.stopped = True
        for handle in self.aborts:
            handle.abort()


class ImageInliner:
    """Images given by URL, fetched and put into the request (Copilot refuses most external image
    URLs). Per request: at most MAX_IMAGES_PER_REQUEST new URLs and MAX_IMAGE_BYTES_PER_REQUEST
    bytes; IMAGE_FETCHES_AT_ONCE for the whole server; all of a request's fetches stop when its
    client leaves or one fails. A small cache spares agents, which resend the whole history."""

    def __init__(self, config, client, pool):
        self.fetcher = ImageFetcher(client, config.image_fetch_allow_private)
        self.pool = pool
        self._slots = None
        self._cache = collections.OrderedDict()  # url -> (media type, bytes, when), oldest first
        self._cache_bytes = 0

    async def inline(self, plan, request):
        """Replace every image given by URL in ``plan``'s payload with its data: cached
        ones at once, the others fetched side by side (at most IMAGE_FETCHES_AT_ONCE; the first
        failure stops the rest), then the request's limits on count and total size, counting
        every use of a URL. 400 with the reason when any step fails."""
        found = remote_images(plan.payload) if plan.payload is not None else []
        if not found:
            return
        urls = list(dict.fromkeys(url for _, _, url in found))
        images = {url: self._cached(url) for url in urls}
        wanted = [url for url, image in images.items() if image is None]
        if len(wanted) > MAX_IMAGES_PER_REQUEST:
            raise ClientError(400, "the request gives %d images by URL; coproxy fetches at most %d "
                                   "per request (send the others as base64)"
                                   % (len(wanted), MAX_IMAGES_PER_REQUEST),
                              code="too_many_images")
        if wanted:
            if self._slots is None:
                self._slots = asyncio.Semaphore(IMAGE_FETCHES_AT_ONCE)
            batch = FetchBatch(MAX_IMAGE_BYTES_PER_REQUEST)
            request.on_disconnect(batch.stop)
            tasks = [asyncio.ensure_future(self._fetch(url, batch)) for url in wanted]
            done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            if pending:  # one failed: the others stop too, and are waited for
                batch.stop()
                await asyncio.wait(pending)
            # result() raises the failure of the first task that failed
            images.update(zip(wanted, [task.result() for task in tasks]))
        check_image_limits(images, plan.model, plan.info)
        total = sum(len(images[url][1]) for _, _, url in found)  # each use of a URL is sent again
        if total > MAX_IMAGE_BYTES_PER_REQUEST:
            raise ClientError(400, "the request's images come to %s, counting every use of each "
                                   "URL; coproxy sends at most %s of images per request"
                                   % (format_size(total), format_size(MAX_IMAGE_BYTES_PER_REQUEST)),
                              code="images_too_large")
        prepared = {}
        for url, (media_type, data) in images.items():
            encoded = base64.b64encode(data).decode("ascii")
            prepared[url] = (media_type, encoded, "data:%s;base64,%s" % (media_type, encoded))
        for node, kind, url in found:
            inline_image(node, kind, *prepared[url])
        plan.vision = True

    async def _fetch(self, url, batch):
        """One image in a worker, within IMAGE_FETCH_SECONDS (the deadline shuts the
        socket down, so a server dripping bytes cannot hold a worker), then cached."""
        async with self._slots:
            abort = AbortHandle()
            batch.aborts.append(abort)
            loop = asyncio.get_running_loop()
            # The deadline holds for every step, also a server that drips its answer byte by byte:
            # the socket is shut down then. Only a name lookup cannot be cut short; the slot is
            # given back a moment later all the same.
            deadline = loop.call_later(IMAGE_FETCH_SECONDS, abort.abort)
            try:
                if batch.stopped:
                    raise ImageNotFetched("the request was given up")
                fetching = self.pool.run(loop, self._fetch_blocking, url, batch, abort)
                try:
                    media_type, data = await asyncio.wait_for(fetching, IMAGE_FETCH_SECONDS + 1)
                except asyncio.TimeoutError:
                    raise ImageNotFetched("no answer within %gs" % IMAGE_FETCH_SECONDS)
            except ImageNotFetched as exc:
                log.debug("image %s not fetched: %s", url_for_message(url), exc)
                raise ClientError(400, "could not fetch the image at %s: no image could be had "
                                       "from there (coproxy fetches public http(s) images only; "
                                       "--log-level debug says why)" % url_for_message(url),
                                  code="image_fetch_failed")
            finally:
                deadline.cancel()
        log.debug("fetched %s: %s, %d bytes", url_for_message(url), media_type, len(data))
        self._remember(url, (media_type, data, time.monotonic()))
        return media_type, data

    def _fetch_blocking(self, url, batch, abort):
        media_type, data = self.fetcher.fetch(url, abort=abort)
        batch.take(len(data))
        return media_type, data

    def _cached(self, url):
        entry = self._cache.get(url)
        if entry is None or time.monotonic() - entry[2] >= IMAGE_CACHE_SECONDS:
            return None
        self._cache.move_to_end(url)
        return entry[0], entry[1]

    def _remember(self, url, entry):
        old = self._cache.pop(url, None)
        if old is not None:
            self._cache_bytes -= len(old[1])
        self._cache[url] = entry
        self._cache_bytes += len(entry[1])
        while self._cache_bytes > IMAGE_CACHE_BYTES:
            _, (_, data, _) = self._cache.popitem(last=False)
            self._cache_bytes -= len(data)


class Wakeup:
    """What a coroutine waits on between events: ``wait(deadline)`` returns at the next
    ``wake()``, or once the loop's clock reaches ``deadline``. One loop timer, armed again only
    once it has fired: the deadline moves on with every batch of a stream, and a timer per wait
    would cost a heap push and a cancel each. A timer that fires early makes a wait end early."""

    __slots__ = ("loop", "_waiter", "_timer")

    def __init__(self, loop):
        self.loop = loop
        self._waiter = None
        self._timer = None

    async def wait(self, deadline=None):
        if deadline is not None:
            timer = self._timer
            if timer is None or not self.loop.time() < timer.when() <= deadline:
                if timer is not None:
                    timer.cancel()
                self._timer = self.loop.call_at(deadline, self.wake)
        self._waiter = self.loop.create_future()
        await self._waiter

    def wake(self):
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def close(self):
        if self._timer is not None:
            self._timer.cancel()


class StreamRelay:
    """Writes one streamed answer to its client, in the client's dialect, as the StreamHub reads
    it. The states of a stream:

        opened → relaying ⇄ paused → ended: normal | failed | upstream cut | timed out
                                            | client left

    opened     the 200 head goes out; the hub starts reading the upstream body.
    relaying   each batch the hub hands over is translated and written; after --ping-seconds of
               upstream silence, the dialect's ping keeps the client's connection alive.
    paused     more than STREAM_HIGH_WATER_BYTES wait for the client: the hub stops reading this
               upstream (TCP then slows Copilot down) until the client has taken them.
    ended      normal: the body ended and every translator saw its end marker; the dialect's
                 closing events and the body's end go out; the upstream connection is pooled.
               failed: the body ended without its end marker (incomplete_stream), Copilot sent
                 an error inside the stream, or a translator raised (internal_error): one error
                 event in the client's dialect, then the body's end.
               upstream cut: the upstream connection or its framing broke: the error event
                 upstream_cut, "the connection to Copilot failed mid-stream (ErrorClass)".
               timed out: no upstream byte for --upstream-timeout: the same, "(timeout)".
               client left: the client closed (logged as error=client_closed), or took nothing
                 for STALLED_CLIENT_SECONDS and was dropped (error=client_stalled).

    ``run`` is the stream's life, one coroutine from the head to the ending, and its one
    ``finally`` cleans up after every ending: unless the hub ended the upstream answer, it is
    cancelled there, its connection closed (never pooled). The bytes themselves do not pass
    through ``run``: ``_relay`` translates and writes each batch inside the hub's hand-over,
    and wakes ``run`` only for what needs it (the end, a full buffer): waking a coroutine for
    every batch cost the loop about 5 µs more per chunk, a quarter more of its CPU (50 TLS
    streams, a chunk every 5 ms each)."""

    def __init__(self, gateway, plan, request, response, upstream):
        self.gateway = gateway
        self.plan = plan
        self.request = request
        self.response = response
        self.upstream = upstream
        self.translation = StreamTranslation(plan.chain(), plan.dialect)
        self.loop = asyncio.get_running_loop()
        self.wakeup = Wakeup(self.loop)
        self.first_chunk_at = None  # time.monotonic() of the first upstream bytes (a metric)
        self.last_data = None       # loop.time() of the last upstream bytes (or ping)

    async def run(self, headers):
        """The stream from its head to its ending (see the class docstring); returns normally
        also when the client left, with the access log's error field saying so."""
        metrics = self.gateway.metrics
        metrics.active_streams += 1
        stream = None
        try:
            await self.response.start_stream(200, self.plan.dialect.stream_headers + headers)
            self.last_data = self.loop.time()
            stream = self.gateway.hub.attach(self.upstream, self._relay)
            self.request.on_disconnect(self.wakeup.wake)
            self.request.on_disconnect(stream.close)  # the upstream closed now, not after a drain
            try:
                await self._supervise(stream)
            except ClientDisconnected:
                self.response.log_fields["error"] = (
                    "client_stalled" if self.request.connection.stalled else "client_closed")
                return
            await self.response.end()
        finally:
            metrics.active_streams -= 1
            self.wakeup.close()
            if stream is not None:
                stream.close()
            else:  # the client left before the stream began: the upstream answer is not read
                self.upstream.close(reuse=False)

    async def _supervise(self, stream):
        """Relaying ⇄ paused, until the translation has ended and the client has taken the
        bytes, or until the client leaves (ClientDisconnected). The upstream answer's end, clean
        or not, always ends the translation; so does a failure inside it. Wakes for a full
        buffer, the end, the client leaving, and the ping deadline."""
        loop, response, connection = self.loop, self.response, self.request.connection
        ping = self.plan.ping or self.plan.dialect.ping
        ping_seconds = self.gateway.config.ping_seconds
        while not connection.lost:
            if response.buffered() > STREAM_HIGH_WATER_BYTES:  # paused until the client catches up
                stream.pause()
                await response.drain()  # a client that takes nothing for long is dropped there
                stream.resume()
            elif self.translation.finished:
                return
            elif ping is None:
                await self.wakeup.wait()
            elif loop.time() < self.last_data + ping_seconds:
                await self.wakeup.wait(self.last_data + ping_seconds)
            else:  # the upstream is thinking: keep the client's stream alive
                response.write_nowait(ping)
                self.last_data = loop.time()
        raise ClientDisconnected("client went away")

    def _relay(self, data, ended, error):
        """Relaying: one batch from the hub (``ended`` with the last), translated and written,
        on the loop inside the hub's hand-over. Should any of it raise (a bug), the client gets
        the dialect's error event and the stream ends, instead of pings until it leaves."""
        translation = self.translation
        out = b""
        try:
            if data:
                self.last_data = self.loop.time()
                if self.first_chunk_at is None:
                    self.first_chunk_at = time.monotonic()
                out = translation.feed(data)
            if ended:
                out += self._ending(error)
        except Exception:
            log.exception("translating the stream for %s failed", self.plan.model)
            out += translation.fail("internal error in coproxy; see its log", "internal_error")
        try:
            self.response.write_nowait(out)
        except ClientDisconnected:
            return  # which wakes run, through the connection's on_disconnect
        if translation.finished or self.response.buffered() > STREAM_HIGH_WATER_BYTES:
            self.wakeup.wake()

    def _ending(self, error):
        """The client bytes of the upstream answer's end: clean (``error`` None) or broken."""
        if error is None:
            return self.translation.end()
        kind = "timeout" if isinstance(error, socket.timeout) else error.__class__.__name__
        log.warning("upstream stream failed model=%s: %s", self.plan.model, kind)
        return self.translation.fail("the connection to Copilot failed mid-stream (%s)" % kind,
                                     "upstream_cut")


class SilenceTimer:
    """Expires an AbortHandle once its upstream has been silent for ``seconds`` (the upstream
    reads note ``abort.last_progress``): one loop timer per call, armed again from the last byte
    when it fires while bytes still come, rather than a socket timeout (see AbortHandle) or a
    timer per read. Stop it with cancel()."""

    def __init__(self, loop, seconds, abort):
        self.loop, self.seconds, self.abort = loop, seconds, abort
        abort.last_progress = time.monotonic()
        self._timer = loop.call_later(seconds, self._check)

    def _check(self):
        silent = time.monotonic() - self.abort.last_progress
        if silent >= self.seconds:
            self.abort.expire()
        else:
            self._timer = self.loop.call_later(self.seconds - silent, self._check)

    def cancel(self):
        self._timer.cancel()


class Gateway:
    """Sends plans to Copilot and their answers back (see the section banner). Also keeps what
    the last upstream exchange said (for /healthz) and the usage windows Copilot reports in its
    ``x-usage-ratelimit-*`` headers (for /usage)."""

    def __init__(self, config, auth, client, pool, catalogue, metrics):
        """Pieces bound to the event loop (slots, hub) are made in start()."""
        self.config = config
        self.auth = auth
        self.client = client
        self.pool = pool
        self.catalogue = catalogue
        self.metrics = metrics
        self.images = ImageInliner(config, client, pool)
        self.hub = None
        self.loop = None
        self._slots = None
        #: the pacing gate (--rate-limit); clock and sleep are replaceable so tests take no time
        self.clock = time.monotonic
        self.sleep = asyncio.sleep
        self._next_upstream_at = 0.0
        #: {"ok": bool, "class", "message", "at"} of the last Copilot exchange
        self.last_outcome = None
        #: "session"/"weekly" -> {"percent_remaining", "resets_at", "seen_at"}
        self.windows = {}
        self._window_headers = {}  # the header values they were read from

    async def start(self):
        """Create the loop-bound pieces (asyncio primitives must be born inside the running
        loop)."""
        self.loop = asyncio.get_running_loop()
        self._slots = asyncio.Semaphore(self.config.max_concurrency)
        self.hub = StreamHub(self.loop, self.config.upstream_timeout)

    def close(self):
        if self.hub is not None:
            self.hub.close()

    def outcome(self, ok, kind=None, message=None):
        self.last_outcome = {"ok": ok, "class": kind, "message": message, "at": int(time.time())}

    @contextlib.asynccontextmanager
    async def slot(self):
        """One of --max-concurrency slots; waits up to --queue-timeout, then 503."""
        if self._slots.locked():
            try:
                await asyncio.wait_for(self._slots.acquire(), self.config.queue_timeout)
            except asyncio.TimeoutError:
                raise ClientError(503, "coproxy is at its concurrency limit (--max-concurrency "
                                       "%d); try again shortly" % self.config.max_concurrency,
                                  code="overloaded", headers=[("Retry-After", "1")])
        else:
            await self._slots.acquire()
        try:
            yield
        finally:
            self._slots.release()

    async def pace(self):
        """--rate-limit: one upstream request per interval; the excess waits (--wait) or gets
        429."""
        gap = self.config.rate_limit
        if not gap:
            return
        now = self.clock()
        if now >= self._next_upstream_at:
            self._next_upstream_at = now + gap
            return
        delay = self._next_upstream_at - now
        if not self.config.wait:
            raise ClientError(429, "coproxy's own rate limit: one request to Copilot every "
                                   "%gs (--rate-limit); retry in %.1fs, or start coproxy with "
                                   "--wait to queue instead" % (gap, delay), code="rate_limited",
                              headers=[("Retry-After", str(max(1, int(delay + 0.999))))])
        self._next_upstream_at += gap  # this request's turn is reserved before it sleeps
        await self.sleep(delay)

    # -- the call itself, in a worker thread ----------------------------------------------------
    def _call(self, plan, abort):
        """Send the plan with the identity headers; a 401 forces one token refresh and one retry.
        Returns (response, raw): raw is the body for errors and whole answers, None for a stream."""
        body = json_dumps(plan.payload) if plan.payload is not None else None

        def attempt(first):
            """One try with the current token; a 401/403 that a new token may fix raises
            RetryOnce (retry_once then calls again with ``first`` false)."""
            record = self.auth.copilot_token()
            headers = copilot_headers(self.config, record["token"], plan.initiator, plan.vision,
                                      plan.intent, plan.interaction, record.get("integration_id"))
            if plan.stream:
                headers["Accept"] = "text/event-stream"
            auto = plan.info.get(AUTO_SESSION_KEY)
            if auto:
                headers["Copilot-Session-Token"] = auto["token"]
            headers.update(plan.headers)
            response = self.client.request(plan.method, self.auth.api_base(record) + plan.path,
                                           headers, body, abort)
            if response.status in (401, 403) and first:
                raw = response.read_all(MAX_UPSTREAM_ERROR_BODY_BYTES)
                if self.auth.retry_after_refusal(record, response.status, raw):
                    log.info("copilot answered %d; getting a new token and retrying once",
                             response.status)
                    raise RetryOnce("copilot answered %d" % response.status)
                return response, raw
            if not 200 <= response.status < 300:
                return response, response.read_all(MAX_UPSTREAM_ERROR_BODY_BYTES)
            self.auth.worked(record)
            if plan.stream:
                return response, None
            return response, response.read_all(MAX_UPSTREAM_JSON_BYTES)
        return retry_once(attempt)

    async def _send(self, plan, request):
        """The call, with one retry when Copilot refused something it said how to fix, or answered
        a short transient 429/503; a final non-2xx answer becomes a ClientError."""
        abort = AbortHandle(times_out=True)
        request.on_disconnect(abort.abort)  # a client that leaves cuts the upstream call short
        retried = False
        while True:
            started = time.monotonic()
            # The upstream socket blocks with no timeout of its own (AbortHandle): this timer is
            # --upstream-timeout, the longest silence up to a stream's head or a whole answer's
            # end (never a limit on a long answer that keeps coming).
            timer = SilenceTimer(self.loop, self.config.upstream_timeout, abort)
            try:
                upstream, raw = await self.pool.run(self.loop, self._call, plan, abort)
            except (UpstreamUnreachable, AuthError) as exc:
                if abort.aborted and not abort.expired:  # the client left: no fault of Copilot's
                    raise ClientDisconnected("client went away") from None
                self.outcome(False, "auth" if isinstance(exc, AuthError) else exc.kind, str(exc))
                raise
            finally:
                timer.cancel()
            self.metrics.observe("coproxy_upstream_latency_seconds", time.monotonic() - started,
                                 (("route", plan.path_label or plan.path),))
            if 200 <= upstream.status < 300:
                self.outcome(True)
                self._note_windows(upstream.headers)
                return upstream, raw
            verdict = client_error_from_upstream(
                upstream.status, raw, upstream.headers, time.time(),
                (self.config.editor_version, self.config.editor_plugin_version))
            error = with_policy_hint(verdict.error, plan.model, plan.info)
            error = explain_refusal(error, plan.model, self.auth.describe(),
                                    self.config.integration_id)
            self.outcome(False, "http_%d" % upstream.status, str(error))
            if verdict.window:
                self.metrics.inc("coproxy_limit_hits_total", (("window", verdict.window),))
            if not retried:
                lesson = revise_after_refusal(plan, error, self.catalogue.quirks(plan.model))
                if lesson is not None:
                    self.catalogue.learn(plan.model, plan.path, lesson)
                    log.info("model %s refused %s; retrying as %s", plan.model,
                             error.code or "a parameter", plan.adjusted[-1])
                    retried = True
                    continue
                if verdict.transient:
                    wait = verdict.wait if verdict.wait is not None else 1
                    log.info("copilot answered %d; retrying once in %ss", upstream.status, wait)
                    await self.sleep(wait)
                    retried = True
                    continue
            log.warning("upstream status=%d model=%s code=%s retry_after=%s", upstream.status,
                        plan.model, error.code, upstream.header("retry-after", "-"))
            try:
                raise error
            finally:  # its traceback holds this frame (and the plan): no way back to it from here
                error = verdict = None

    def _note_windows(self, headers):
        for name in ("session", "weekly"):
            raw = headers.get("x-usage-ratelimit-" + name)
            if raw is None:
                continue
            if raw != self._window_headers.get(name):  # it changes seldom; parsing it costs
                window = parse_ratelimit_header(raw)
                if window is None:
                    continue
                self._window_headers[name] = raw
                self.windows[name] = window
            self.windows[name]["seen_at"] = int(time.time())

    # -- a whole request ------------------------------------------------------------------
    async def run(self, plan, request, response):
        """Send ``plan`` and answer ``response`` with its result (raises ClientError & co.)."""
        self._count_request(plan, response)
        async with self.slot():
            await self.pace()
            if not self.config.no_image_fetch:
                await self.images.inline(plan, request)
            if plan.removed:
                log.debug("removed from the request for %s: %s", plan.model,
                          ", ".join(plan.removed))
            upstream, raw = await self._send(plan, request)
            headers = [("X-Coproxy-Adjusted", ", ".join(plan.adjusted))] if plan.adjusted else []
            if plan.adjusted:
                response.log_fields["adjusted"] = ", ".join(plan.adjusted)
            if plan.stream:
                relay = StreamRelay(self, plan, request, response, upstream)
                try:
                    await relay.run(headers)
                finally:  # also when its client went away at the end: what was relayed was paid for
                    if relay.first_chunk_at is not None:
                        self.metrics.observe("gen_ai_client_operation_time_to_first_chunk_seconds",
                                             relay.first_chunk_at - request.started,
                                             self._gen_ai_labels(plan))
                    self._account(plan, response, relay.translation.source.usage,
                                  relay.translation.failure)
                return
            try:
                data = json.loads(raw)
                if not isinstance(data, dict):
                    raise ValueError("not an object")
                body = raw if plan.answer is None else json_dumps(plan.answer(data))
            except (ValueError, TypeError, KeyError, AttributeError, RecursionError, struct.error):
                raise ClientError(502, "Copilot sent an answer that is not %s" % plan.what,
                                  code="bad_upstream_response")
            try:
                await response.send(200, JSON_HEADERS + headers, body)
            finally:  # once the answer is on its way (also if its client has gone: it was paid)
                self._account(plan, response, usage_of_answer(plan.path, data))

    def _count_request(self, plan, response):
        """Access-log fields, and the premium request a user turn costs on a request-billed plan."""
        model = plan.model
        if AUTO_SESSION_KEY in plan.info:
            model = "%s->%s" % (AUTO_MODEL_ID, plan.model)
        response.log_fields.update(model=model, stream=plan.stream, initiator=plan.initiator,
                                   upstream=plan.path)
        multiplier = _dig(plan.info, "billing").get("multiplier")
        if isinstance(multiplier, (int, float)) and not isinstance(multiplier, bool):
            cost = multiplier if plan.initiator == "user" else 0
            response.log_fields["premium"] = cost
            self.metrics.inc("coproxy_premium_requests_total",
                             (("model", self.catalogue.label(plan.model)),), cost)

    def _gen_ai_labels(self, plan):
        """OpenTelemetry GenAI attributes as Prometheus labels."""
        return (("gen_ai_operation_name", "embeddings" if plan.route == "embeddings" else "chat"),
                ("gen_ai_provider_name", GEN_AI_PROVIDER),
                ("gen_ai_request_model", self.catalogue.label(plan.model)))

    def _account(self, plan, response, usage, failure=None):
        """What the answer used and cost: log fields, /metrics and /usage counters."""
        fields = response.log_fields
        if failure:
            fields["error"] = failure
        duration = time.monotonic() - response.request.started
        model = self.catalogue.label(plan.model)
        gen_ai = self._gen_ai_labels(plan)
        self.metrics.observe("gen_ai_client_operation_duration_seconds", duration,
                             gen_ai + ((("error_type", "stream_error"),) if failure else ()))
        if usage is None:
            return
        fields.update(input_tokens=usage["input"], cached_tokens=usage["cached"],
                      output_tokens=usage["output"], reasoning_tokens=usage["reasoning"])
        for kind in ("input", "cached", "output", "reasoning"):
            if usage[kind]:
                self.metrics.inc("coproxy_tokens_total", (("model", model), ("type", kind)),
                                 usage[kind])
        for kind in ("input", "output"):
            self.metrics.observe("gen_ai_client_token_usage", usage[kind],
                                 gen_ai + (("gen_ai_token_type", kind),))
        credits = None
        if usage["nano_aiu"] is not None:
            credits = usage["nano_aiu"] / NANO_AIU_PER_CREDIT
        if credits is None:
            credits = estimate_credits(usage, plan.info)
            if credits is not None:
                fields["credits_estimated"] = True
                if AUTO_SESSION_KEY in plan.info:  # Copilot's own figure has the discount already
                    credits *= 1.0 - plan.info[AUTO_SESSION_KEY]["discount"]
        if credits is not None:
            fields["credits"] = round(credits, 6)
            self.metrics.inc("coproxy_ai_credits_total", (("model", model),), credits)

# ------------------------------------------------------------------------------------------
# 13. App and routes
#     The route table, the checks every request passes (Host, Origin, CORS, API key), error
#     envelopes in the caller's dialect, the access log, and handlers that parse, plan and
#     hand plans to the gateway. Without an API key coproxy answers only requests addressed
#     to this machine's loopback names (or --allowed-host) and from no web page it was not told
#     to trust (--cors-origin): a page on any site could otherwise spend the user's plan, and
#     with DNS rebinding read the answers.
# ------------------------------------------------------------------------------------------

#: error.code for each status the HTTP layer answers by itself (malformed or oversized input)
PROTOCOL_ERROR_CODES = {400: "bad_request", 408: "request_timeout", 413: "request_too_large",
                        414: "uri_too_long", 431: "headers_too_large", 500: "internal_error",
                        501: "not_implemented", 505: "http_version_not_supported"}

CORS_ALLOWED_HEADERS = ("authorization, content-type, content-encoding, x-api-key, "
                        "anthropic-version, anthropic-beta, openai-organization, openai-project, "
                        "x-stainless-arch, x-stainless-lang, x-stainless-os, "
                        "x-stainless-package-version, x-stainless-runtime, "
                        "x-stainless-runtime-version, x-stainless-retry-count, x-stainless-timeout")

Route = collections.namedtuple("Route", "path surface dialect handlers public")


def route_takes_id(route):
    """A route whose path ends in / takes one more path segment as its parameter (not / itself)."""
    return route.path.endswith("/") and route.path != "/"


def route_label(route):
    return route.path + "{id}" if route_takes_id(route) else route.path


def dialect_for(route, request):
    """The dialect errors are answered in: the route's; the caller's on a route every API shares
    (/models) or on none: Anthropic's when it sends anthropic-version; Ollama's for /api/ paths."""
    if (route is None or route.surface is None) and request.header("anthropic-version"):
        return ANTHROPIC
    if route is None:
        return OLLAMA if request.path.startswith("/api/") else OPENAI
    return route.dialect


async def refuse_websocket(request, response, _):
    """GET /v1/responses: Codex first tries Responses over a WebSocket (a GET with Upgrade) and
    falls back to HTTP + SSE on a 426, answered at once so that no attempt waits for anything."""
    if "websocket" not in (request.header("upgrade") or "").lower():
        raise ClientError(405, "GET /v1/responses is only a WebSocket attempt; send Responses "
                               "requests as POST", code="method_not_allowed",
                          headers=[("Allow", "POST")])
    response.keep_alive = False  # what the client meant to send next were WebSocket frames
    raise ClientError(426, "coproxy serves the Responses API over HTTP + SSE, not WebSocket. For "
                           "Codex, set supports_websockets = false in its [model_providers.<id>] "
                           "table (the README's Codex recipe does) and it will not try again",
                      code="websocket_not_supported")


#: Routes whose requests go to the history (with anything else that reached a model).
HISTORY_ROUTES = frozenset(["/chat/completions", "/responses", "/responses/compact", "/embeddings",
                            "/messages"])
#: Headers that name an agent's session: Claude Code sends the first on every request, Codex
#: the second (with conversation_id, the same value).
SESSION_HEADERS = ("x-claude-code-session-id", "session_id")
#: Log fields copied into a history record under these names (numbers and short codes only).
HISTORY_FIELDS = (("requested", "requested"), ("initiator", "initiator"), ("stream", "stream"),
                  ("input_tokens", "input"), ("cached_tokens", "cached"),
                  ("output_tokens", "output"), ("reasoning_tokens", "reasoning"),
                  ("credits", "credits"), ("credits_estimated", "credits_estimated"),
                  ("premium", "premium"), ("adjusted", "adjusted"), ("error", "error"))
#: Seconds the plan and quota the dashboard shows are kept before GitHub is asked again.
QUOTA_CACHE_SECONDS = 60


class Guard:
    """Who may use this coproxy (see §13): the Host, Origin and API-key checks of every request
    but /healthz."""

    def __init__(self, config):
        self.config = config
        self.bound_host = None  # the address the server listens on, also a name of this machine

    def check_host(self, request):
        """Without an API key, only requests addressed to this machine: a web page that rebinds its
        own name to 127.0.0.1 still sends that name as Host, and is refused here."""
        if self.config.api_key:
            return
        value = request.header("host")
        if value is None and request.version == "HTTP/1.0":
            return
        host = host_without_port(value or "")
        if (is_loopback_host(host) or host.rstrip(".") in self.config.allowed_hosts
                or host == self.bound_host):
            return
        raise ClientError(403, "requests addressed to %r are refused: without --api-key "
                               "coproxy answers only its loopback names (127.0.0.1, localhost, "
                               "[::1]); start it with --allowed-host %s if you reach it by that "
                               "name"
                               % (host[:100], host[:100] or "NAME"), code="host_not_allowed")

    def check_origin(self, request, response):
        """Requests from web pages (they carry Origin; CLIs and SDKs do not) only from --cors-origin
        origins, which get CORS headers. True when this was a preflight, now to be answered 204.
        A page's no-cors GET (an <img> pointed at /usage) has no Origin, but browsers mark it with
        Sec-Fetch-Site; only "none" (typed into the address bar) and "same-origin" are let
        through."""
        origin = request.header("origin")
        if origin is None:
            site = request.header("sec-fetch-site")
            if site is not None and site not in ("none", "same-origin"):
                raise ClientError(403, "requests a web page makes without an Origin "
                                       "(Sec-Fetch-Site: %s) are refused; pages listed with "
                                       "--cors-origin must call coproxy with fetch() in cors mode"
                                  % site[:40], code="origin_not_allowed")
            return False
        origins = self.config.cors_origins
        if not ("*" in origins or origin.strip().lower().rstrip("/") in origins):
            raise ClientError(403, "requests from the web page at %s are refused; start coproxy "
                                   "with --cors-origin %s to let pages from there use it"
                                   % (origin[:200], origin[:200]),
                              code="origin_not_allowed")
        response.extra_headers = [
            ("Access-Control-Allow-Origin", origin), ("Vary", "Origin"),
            ("Access-Control-Expose-Headers",
             "Retry-After, X-Coproxy-Models-Source, X-Coproxy-Adjusted")]
        if request.method != "OPTIONS" or request.header("access-control-request-method") is None:
            return False
        response.log_fields["route"] = "preflight"
        response.extra_headers += [
            ("Access-Control-Allow-Methods", "GET, POST, DELETE, OPTIONS"),
            ("Access-Control-Allow-Headers",
             request.header("access-control-request-headers") or CORS_ALLOWED_HEADERS),
            ("Access-Control-Max-Age", "600")]
        # preflights carry no credentials, by the CORS rules: the real request needs the key
        return True

    def admits(self, request, response):
        """True when ``request`` passes all three checks (for a route that is open to all, such
        as /healthz, but tells more to those the API would serve)."""
        try:
            self.check_host(request)
            self.check_origin(request, response)
            self.check_api_key(request)
        except ClientError:
            return False
        return True

    def check_api_key(self, request):
        """Constant-time check of Authorization: Bearer K or x-api-key: K (when a key is set)."""
        key = self.config.api_key
        if not key:
            return
        import hmac  # loaded once, on the first request that has to be checked
        expected = key.encode("utf-8")
        authorization = request.header("authorization", "")
        bearer = authorization[7:].strip() if authorization[:7].lower() == "bearer " else ""
        by_header = hmac.compare_digest(request.header("x-api-key", "").encode("latin-1"), expected)
        by_bearer = hmac.compare_digest(bearer.encode("latin-1"), expected)
        if not (by_header or by_bearer):
            raise ClientError(401, "missing or wrong API key: send Authorization: Bearer <key> or "
                                   "x-api-key: <key> (the key coproxy was started with)",
                              code="invalid_api_key", headers=[("WWW-Authenticate", "Bearer")])


#: The dashboard: one document, its style and script inline (allowed by a nonce made for each
#: answer), its charts drawn as SVG by the script, nothing loaded from anywhere. Everything it
#: shows comes from /dashboard/data, fetched every 2 s with the key this tab was given; data is
#: only ever put into the page as text (model names and user agents come from clients).
DASHBOARD_PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="color-scheme" content="light dark">
<meta name="referrer" content="no-referrer">
<link rel="icon" href="data:,">
<title>coproxy</title>
<style nonce="__NONCE__">
:root { --bg: #f5f6f8; --card: #fff; --fg: #1c2230; --muted: #586174; --line: #d8dce4;
  --ok: #1a7f37; --bad: #c62828; --warn: #9a5b00; }
@media (prefers-color-scheme: dark) {
  :root { --bg: #0f1217; --card: #171b22; --fg: #e6e9ef; --muted: #9aa3b2; --line: #2d333e;
    --ok: #4ac26b; --bad: #ff7070; --warn: #e3a33b; }
}
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--fg);
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; }
header { display: flex; flex-wrap: wrap; gap: .3rem 1rem; align-items: baseline;
  padding: .8rem 1rem; border-bottom: 1px solid var(--line); }
h1 { font-size: 1.25rem; margin: 0; }
h2 { font-size: 1rem; margin: 0 0 .6rem; }
main { display: grid; gap: 1rem; padding: 1rem;
  grid-template-columns: repeat(auto-fit, minmax(min(100%, 460px), 1fr)); }
section { background: var(--card); border: 1px solid var(--line); border-radius: 8px;
  padding: .9rem; min-width: 0; }
.wide { grid-column: 1 / -1; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: .25rem .8rem; margin: 0; }
dt { color: var(--muted); }
dd { margin: 0; overflow-wrap: anywhere; }
.meter { height: 8px; background: var(--line); border-radius: 4px; overflow: hidden;
  margin: .25rem 0 .7rem; }
.meter > i { display: block; height: 100%; background: var(--ok); }
.meter.low > i { background: var(--warn); }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; width: 100%; font-size: 13px; }
th, td { text-align: left; padding: .3rem .5rem; border-bottom: 1px solid var(--line);
  white-space: nowrap; }
th { color: var(--muted); font-weight: 600; }
.num { text-align: right; font-variant-numeric: tabular-nums; }
.ok { color: var(--ok); } .bad { color: var(--bad); } .muted { color: var(--muted); }
svg { width: 100%; height: auto; display: block; }
svg text { fill: var(--muted); font-size: 11px; }
svg line { stroke: var(--line); }
.legend { display: flex; flex-wrap: wrap; gap: .2rem .9rem; margin: .5rem 0 0; padding: 0;
  list-style: none; font-size: 12px; }
.sw { display: inline-block; width: 10px; height: 10px; border-radius: 2px; margin-right: .3rem; }
input, select, button { font: inherit; color: inherit; background: var(--card);
  border: 1px solid var(--line); border-radius: 6px; padding: .3rem .5rem; }
button { cursor: pointer; }
.tools { display: flex; flex-wrap: wrap; gap: .5rem; align-items: center; margin-bottom: .6rem; }
.tools input[type=search] { flex: 1 1 12rem; min-width: 0; }
#key-form { display: flex; flex-wrap: wrap; gap: .5rem; }
#key-form input { flex: 1 1 14rem; }
[hidden] { display: none !important; }
</style>
</head>
<body>
<header>
  <h1>coproxy</h1>
  <span id="state" class="muted">loading…</span>
  <span id="live" class="muted"></span>
</header>
<main>
  <section id="key" class="wide" hidden>
    <h2>API key</h2>
    <p>This coproxy was started with <code>--api-key</code>. Enter the key once: this tab keeps
    it (sessionStorage) and sends it as a bearer header.</p>
    <p id="key-error" class="bad" hidden></p>
    <form id="key-form">
      <input id="key-input" type="password" autocomplete="off" placeholder="API key" required>
      <button type="submit">Open the dashboard</button>
    </form>
  </section>
  <section id="status"><h2>Status</h2><dl id="status-list"></dl></section>
  <section id="quota"><h2>Quota</h2><div id="quota-body"></div></section>
  <section id="hours" class="wide">
    <div class="tools"><h2>Last 24 hours, per hour</h2>
      <select id="metric" aria-label="what the charts count">
        <option value="credits">AI credits</option>
        <option value="premium">premium requests</option>
        <option value="tokens">tokens</option>
        <option value="requests">requests</option>
      </select></div>
    <div id="chart-hours"></div>
  </section>
  <section id="days" class="wide"><h2>Last 30 days, per day</h2><div id="chart-days"></div>
    <ul id="legend" class="legend"></ul></section>
  <section id="latency"><h2>Latency per route (24 h)</h2><div class="scroll">
    <table><thead><tr><th>route</th><th class="num">requests</th>
      <th class="num">first byte p50 / p90 / p99</th><th class="num">total p50 / p90 / p99</th>
    </tr></thead><tbody id="latency-rows"></tbody></table></div></section>
  <section id="sessions"><h2>Agent sessions</h2><div class="scroll">
    <table><thead><tr><th>session</th><th>client</th><th class="num">requests</th>
      <th class="num">cost</th><th>models</th><th>first</th><th>last</th>
    </tr></thead><tbody id="session-rows"></tbody></table></div></section>
  <section id="requests" class="wide">
    <div class="tools"><h2>Last requests</h2>
      <input id="filter" type="search" placeholder="filter: model, route, client, status…"
        aria-label="filter the requests">
      <label><input id="errors-only" type="checkbox"> errors only</label>
      <span id="shown" class="muted"></span></div>
    <div class="scroll"><table><thead><tr><th>time</th><th>route</th><th>client</th>
      <th>model</th><th class="num">status</th><th class="num">first byte</th>
      <th class="num">total</th><th class="num">tokens in / out</th><th class="num">cost</th>
      <th>adjusted</th><th>error</th></tr></thead><tbody id="request-rows"></tbody></table></div>
  </section>
</main>
<noscript><p>The dashboard needs JavaScript; the same data is at /dashboard/data.</p></noscript>
<script nonce="__NONCE__">
"use strict";
const KEY = "coproxy-api-key";
const PALETTE = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1",
  "#ff9da7", "#9c755f", "#8cd17d"];
const SVG = "http://www.w3.org/2000/svg";
const $ = (id) => document.getElementById(id);
const state = { data: null, count: -1, skew: 0, timer: null, resized: null, colors: {},
  metric: null };

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}
function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const name in attrs) node.setAttribute(name, attrs[name]);
  if (text !== undefined) node.textContent = text;
  return node;
}
function row(cells) {
  const tr = el("tr");
  for (const cell of cells) {
    const td = cell instanceof Node ? cell : el("td", cell);
    tr.appendChild(td.tagName === "TD" ? td : wrap(td));
  }
  return tr;
}
function wrap(node) { const td = el("td"); td.appendChild(node); return td; }
function num(text) { return el("td", text, "num"); }
function now() { return Date.now() / 1000 - state.skew; }
function duration(seconds) {
  seconds = Math.max(0, Math.floor(seconds));
  const d = Math.floor(seconds / 86400), h = Math.floor(seconds % 86400 / 3600);
  const m = Math.floor(seconds % 3600 / 60), s = seconds % 60;
  if (d) return d + "d " + h + "h";
  if (h) return h + "h " + String(m).padStart(2, "0") + "m";
  if (m) return m + "m " + String(s).padStart(2, "0") + "s";
  return s + "s";
}
function ms(value) {
  if (value === null || value === undefined) return "–";
  return value < 1000 ? Math.round(value) + " ms" : (value / 1000).toFixed(1) + " s";
}
function amount(value) {
  if (!value) return "0";
  return value >= 100 ? value.toFixed(0) : value >= 1 ? value.toFixed(2) : value.toPrecision(2);
}
function when(t) {
  const date = new Date(t * 1000), today = new Date(now() * 1000);
  return date.toDateString() === today.toDateString() ? date.toLocaleTimeString()
    : date.toLocaleDateString() + " " + date.toLocaleTimeString();
}
function countdown(until) {
  if (!(until > now())) return el("span", new Date(until * 1000).toLocaleDateString());
  const span = el("span", "in " + duration(until - now()));
  span.dataset.until = until;
  return span;
}
function billed() {
  const quota = state.data && state.data.quota;
  return quota && quota.billing === "requests" ? "premium" : "credits";
}
function cost(record) {
  return billed() === "premium" ? amount(record.premium || 0) + " PR"
    : amount(record.credits || 0) + (record.credits_estimated ? " cr*" : " cr");
}
function value(totals, metric) {
  if (metric === "tokens") return (totals.input || 0) + (totals.output || 0);
  return totals[metric] || 0;
}
function color(model) {
  if (!(model in state.colors)) {
    state.colors[model] = PALETTE[Object.keys(state.colors).length % PALETTE.length];
  }
  return state.colors[model];
}

// -- fetching: every 2 s, with the key this tab was given ------------------------------------
function headers() {
  const key = sessionStorage.getItem(KEY);
  return key ? { Authorization: "Bearer " + key } : {};
}
async function load() {
  clearTimeout(state.timer);
  let answer;
  try {
    answer = await fetch("/dashboard/data", { headers: headers(), cache: "no-store" });
  } catch (error) {
    $("live").textContent = "coproxy does not answer; retrying";
    state.timer = setTimeout(load, 2000);
    return;
  }
  if (answer.status === 401) {
    const refused = sessionStorage.getItem(KEY) !== null;
    sessionStorage.removeItem(KEY);
    askKey(refused ? "coproxy refused that key." : "");
    return;
  }
  if (!answer.ok) {
    let message = "error " + answer.status;
    try { message = (await answer.json()).error.message; } catch (error) { /* not JSON */ }
    $("live").textContent = message;
    state.timer = setTimeout(load, 5000);
    return;
  }
  const data = await answer.json();
  state.skew = Date.now() / 1000 - data.now;
  state.data = data;
  $("key").hidden = true;
  render(data);
  $("live").textContent = "live · updated " + new Date().toLocaleTimeString();
  state.timer = setTimeout(load, 2000);
}
function askKey(message) {
  $("key").hidden = false;
  $("key-error").hidden = !message;
  $("key-error").textContent = message;
  $("state").textContent = "API key needed";
  $("key-input").focus();
}
$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(KEY, $("key-input").value.trim());
  $("key-input").value = "";
  load();
});

// -- rendering --------------------------------------------------------------------------------
function render(data) {
  renderStatus(data);
  renderQuota(data);
  if (state.metric === null) {
    state.metric = billed();
    $("metric").value = state.metric;
  }
  if (data.count !== state.count) {
    state.count = data.count;
    renderCharts(data);
    renderLatency(data);
    renderSessions(data);
    renderRequests();
  }
}
function pairs(list, items) {
  list.replaceChildren();
  for (const [name, content] of items) {
    list.appendChild(el("dt", name));
    const dd = el("dd");
    dd.append(content instanceof Node ? content : String(content));
    list.appendChild(dd);
  }
}
function renderStatus(data) {
  const health = data.health, login = data.login, quota = data.quota;
  const ready = health.auth.ready, upstream = health.upstream;
  $("state").textContent = ready ? "ready" : "not ready: " + (health.auth.error || "no login");
  $("state").className = ready ? "ok" : "bad";
  const uptime = el("span", duration(health.uptime_seconds));
  uptime.dataset.since = data.now - health.uptime_seconds;
  const expiry = login.copilot_token_expires_at
    ? countdown(login.copilot_token_expires_at) : "not fetched yet";
  const outcome = upstream.ok === null ? el("span", upstream.message, "muted")
    : upstream.ok ? el("span", "ok", "ok")
    : el("span", (upstream.class || "error") + ": " + (upstream.message || ""), "bad");
  const items = [["listening", data.url || "?"], ["version", health.version],
    ["uptime", uptime],
    ["login", (login.user || "?") + (login.token_kind ? " · " + login.token_kind : "")
      + (login.token_source ? " (" + login.token_source + ")" : "")],
    ["Copilot token", expiry], ["upstream", outcome]];
  for (const [name, extra] of Object.entries(login.extra || {})) items.push([name, extra]);
  if (quota) {
    items.push(["plan", (quota.plan || "?") + " · billed by "
      + (quota.billing === "tokens" ? "AI credits" : "premium requests")]);
  } else if (data.quota_error) {
    items.push(["plan", el("span", data.quota_error, "bad")]);
  }
  items.push(["history", data.history.enabled ? "kept " + data.history.days + " days"
    : "off (this run only)"]);
  pairs($("status-list"), items);
}
function meter(percent) {
  const bar = el("div", null, "meter" + (percent < 20 ? " low" : ""));
  const fill = el("i");
  fill.style.width = Math.max(0, Math.min(100, percent)) + "%";
  bar.appendChild(fill);
  return bar;
}
function renderQuota(data) {
  const body = $("quota-body"), quota = data.quota;
  body.replaceChildren();
  if (quota) {
    const pool = quota.billing === "tokens" ? quota.credits : quota.premium_requests;
    const unit = quota.billing === "tokens" ? "AI credits" : "premium requests";
    const line = el("div");
    if (!pool) line.textContent = unit + ": not reported";
    else if (pool.unlimited) line.textContent = unit + ": unlimited";
    else {
      line.textContent = unit + ": " + amount(pool.remaining) + " left of "
        + amount(pool.entitlement);
    }
    if (quota.reset_date) {
      line.append(" · resets ", countdown(Date.parse(quota.reset_date) / 1000));
    }
    body.appendChild(line);
    if (pool && !pool.unlimited && pool.percent_remaining !== null) {
      body.appendChild(meter(pool.percent_remaining));
    }
  }
  for (const [name, label] of [["session", "5-hour session"], ["weekly", "weekly"]]) {
    const seen = data.windows[name];
    const line = el("div", label + ": ");
    if (!seen) {
      line.append(el("span", "not seen yet (Copilot reports it with answers)", "muted"));
      body.appendChild(line);
      continue;
    }
    line.append(seen.percent_remaining.toFixed(1) + "% left");
    if (seen.resets_at) line.append(" · resets ", countdown(Date.parse(seen.resets_at) / 1000));
    body.append(line, meter(seen.percent_remaining));
  }
}
function chart(place, buckets, label) {
  // drawn at the width it is shown at, so that its text keeps its size on a phone
  const width = Math.max(300, Math.round(place.clientWidth)), height = 190;
  const left = 46, bottom = 22, top = 8;
  const metric = state.metric;
  const sums = buckets.map((b) => Object.values(b.models)
    .reduce((sum, totals) => sum + value(totals, metric), 0));
  const max = Math.max(...sums, 0) || 1;
  const plot = svg("svg", { viewBox: "0 0 " + width + " " + height, role: "img",
    "aria-label": label(buckets[0]) + " to " + label(buckets[buckets.length - 1]) });
  const step = (width - left) / buckets.length, every = Math.ceil(44 / step);
  for (const fraction of [0, 0.5, 1]) {
    const y = top + (height - top - bottom) * (1 - fraction);
    plot.appendChild(svg("line", { x1: left, x2: width, y1: y, y2: y }));
    plot.appendChild(svg("text", { x: left - 4, y: y + 4, "text-anchor": "end" },
      metric === "tokens" || metric === "requests" ? compact(max * fraction)
        : amount(max * fraction)));
  }
  buckets.forEach((bucket, index) => {
    let y = height - bottom;
    const x = left + index * step + step * 0.15;
    for (const model of Object.keys(bucket.models).sort()) {
      const amountHere = value(bucket.models[model], metric);
      if (!amountHere) continue;
      const h = (height - top - bottom) * amountHere / max;
      y -= h;
      const bar = svg("rect", { x: x, y: y, width: step * 0.7, height: Math.max(h, 0.5),
        fill: color(model), "data-model": model });
      bar.appendChild(svg("title", {}, label(bucket) + " · " + model + ": "
        + (metric === "tokens" || metric === "requests" ? amountHere : amount(amountHere))));
      plot.appendChild(bar);
    }
    if (index % every === 0) {
      plot.appendChild(svg("text", { x: left + index * step + step / 2, y: height - 6,
        "text-anchor": "middle" }, label(bucket)));
    }
  });
  return plot;
}
function compact(number) {
  return number >= 1e6 ? (number / 1e6).toFixed(1) + "M" : number >= 1e3
    ? (number / 1e3).toFixed(1) + "k" : String(Math.round(number));
}
function renderCharts(data) {
  const hour = (b) => String(new Date(b.start * 1000).getHours()).padStart(2, "0") + ":00";
  const day = (b) => b.day.slice(5);
  for (const bucket of data.daily) for (const model of Object.keys(bucket.models)) color(model);
  $("chart-hours").replaceChildren(chart($("chart-hours"), data.hourly, hour));
  $("chart-days").replaceChildren(chart($("chart-days"), data.daily, day));
  const legend = $("legend");
  legend.replaceChildren();
  for (const model of Object.keys(state.colors).sort()) {
    const item = el("li"), swatch = el("span", null, "sw");
    swatch.style.background = color(model);
    item.append(swatch, model === "-" ? "no model (refused first)" : model);
    legend.appendChild(item);
  }
}
function triple(p) { return p ? ms(p.p50) + " / " + ms(p.p90) + " / " + ms(p.p99) : "–"; }
function renderLatency(data) {
  const rows = $("latency-rows");
  rows.replaceChildren();
  for (const [route, entry] of Object.entries(data.latency)) {
    rows.appendChild(row([route, num(entry.requests), num(triple(entry.ttfb_ms)),
      num(triple(entry.ms))]));
  }
  if (!rows.children.length) rows.appendChild(row([el("td", "no requests yet", "muted")]));
}
function renderSessions(data) {
  const rows = $("session-rows");
  rows.replaceChildren();
  for (const session of data.sessions) {
    const id = el("td", session.id.length > 14 ? session.id.slice(0, 13) + "…" : session.id);
    id.title = session.id;
    const models = Object.entries(session.models).map(([m, n]) => m + " ×" + n).join(", ");
    rows.appendChild(row([id, session.client || "", num(session.requests), num(cost(session)),
      models, when(session.first), when(session.last)]));
  }
  if (!rows.children.length) {
    rows.appendChild(row([el("td", "none yet (X-Claude-Code-Session-Id, session_id)", "muted")]));
  }
}
function renderRequests() {
  const data = state.data;
  if (!data) return;
  const rows = $("request-rows"), terms = $("filter").value.toLowerCase().split(/\s+/)
    .filter(Boolean);
  const errorsOnly = $("errors-only").checked;
  rows.replaceChildren();
  let shown = 0;
  for (const r of data.requests) {
    const failed = r.status >= 400 || !!r.error;
    const model = (r.model || "–") + (r.requested ? " ← " + r.requested : "");
    const cells = [when(r.t), r.route || "", r.client || "", model, String(r.status),
      ms(r.ttfb_ms), ms(r.ms), (r.input || 0) + " / " + (r.output || 0), cost(r),
      r.adjusted || "", r.error || ""];
    const text = cells.join(" ").toLowerCase() + " " + (r.session || "").toLowerCase();
    if ((errorsOnly && !failed) || !terms.every((term) => text.includes(term))) continue;
    const tr = row(cells.slice(0, 4));
    const status = num(r.status);
    if (failed) status.className = "num bad";
    tr.append(status, num(cells[5]), num(cells[6]), num(cells[7]), num(cells[8]),
      el("td", cells[9]), el("td", cells[10], "bad"));
    rows.appendChild(tr);
    shown += 1;
  }
  $("shown").textContent = shown + " of " + data.requests.length;
}
$("filter").addEventListener("input", renderRequests);
$("errors-only").addEventListener("change", renderRequests);
window.addEventListener("resize", () => {
  clearTimeout(state.resized);
  state.resized = setTimeout(() => state.data && renderCharts(state.data), 150);
});
$("metric").addEventListener("change", () => {
  state.metric = $("metric").value;
  if (state.data) renderCharts(state.data);
});
setInterval(() => {
  for (const node of document.querySelectorAll("[data-until]")) {
    const left = Number(node.dataset.until) - now();
    node.textContent = left > 0 ? "in " + duration(left) : "now";
  }
  for (const node of document.querySelectorAll("[data-since]")) {
    node.textContent = duration(now() - Number(node.dataset.since));
  }
}, 1000);
load();
</script>
</body>
</html>
"""

#: What the page may do: its own inline style and script, fetch from coproxy, nothing else.
DASHBOARD_CSP = ("default-src 'none'; script-src 'nonce-{0}'; style-src 'nonce-{0}'; "
                 "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; "
                 "frame-ancestors 'none'")


class Dashboard:
    """The request history as the page at ``GET /``, ``/dashboard/data`` and ``/usage?by=``
    show it: a Ledger of what finished requests used and cost (fed after each exchange), the
    History files it survives restarts in, and the plan and quota from GitHub, cached a minute
    (the page asks every few seconds). ``health`` is the App's /healthz answer."""

    def __init__(self, config, auth, gateway, pool, health, guard):
        self.config = config
        self.guard = guard
        self.auth = auth
        self.gateway = gateway
        self.pool = pool
        self.health = health
        self.url = None  # where the server listens, once it does
        self.ledger = Ledger()
        self.history = None if config.no_history else History(config.state_dir, config.history_days)
        self._quota = (0.0, None, None)  # (fetched at, summarize_quota() or None, error or None)
        self._quota_fetch = None         # the call in flight, shared by everyone who asks meanwhile

    def start(self):
        """Read the history back (30 days of a heavy user: ~40 ms of CPU; --bench --history)."""
        if self.history is None:
            return
        started = time.perf_counter()
        try:
            read = self.history.load(self.ledger, time.time())
        except (OSError, ConfigError) as exc:
            log.warning("cannot read the request history in %s: %s", self.history.dir, exc)
            return
        log.debug("history: %d records of the last 24 hours and %d days read in %.1f ms", read,
                  len(self.ledger.daily), (time.perf_counter() - started) * 1000)

    def close(self):
        if self.history is not None:
            self.history.close()

    def note(self, request, response):
        """One finished exchange, if it reached a model or a model route (callers the guard refused
        leave nothing on disk): counted now, written to the history by its own thread."""
        fields = response.log_fields
        if "model" not in fields and (fields.get("route") not in HISTORY_ROUTES
                                      or response.status in (401, 403)):
            return
        record = self.history_record(request, response)
        self.ledger.add(record)
        if self.history is not None:
            self.history.append(record)

    @staticmethod
    def history_record(request, response):
        """What the history keeps of one exchange: when, where, which model, how it went, how
        long, what it used and cost, and which client and agent session asked. Never a prompt,
        an answer or a key; empty fields are left out."""
        fields = response.log_fields
        now = time.monotonic()
        record = {"t": round(time.time() - (now - request.started), 3),
                  "route": fields.get("route"), "status": response.status or 0,
                  "model": fields.get("model")}
        record.update((name, fields.get(field)) for field, name in HISTORY_FIELDS)
        if "->" in (record["model"] or ""):  # the log's "auto->gpt-5.4": asked, then answered
            record["requested"], record["model"] = record["model"].split("->", 1)
        if response.head_sent_at is not None:
            record["ttfb_ms"] = round((response.head_sent_at - request.started) * 1000, 1)
        record["ms"] = round((now - request.started) * 1000, 1)
        record["client"] = (request.header("user-agent") or "")[:120]
        record["session"] = next((request.header(name)[:100] for name in SESSION_HEADERS
                                  if request.header(name)), None)
        return {k: v for k, v in record.items() if v is not None and v != "" and v is not False}

    async def quota(self, max_age=0):
        """(summarize_quota() or None, error or None) from GitHub, at most ``max_age`` seconds old,
        but fetched no more often than every ACCOUNT_CACHE_SECONDS (after an error, every
        ACCOUNT_RETRY_SECONDS), and once for everyone who asks meanwhile: any local client could
        otherwise spend the account's GitHub API quota (50 requests to /usage, 50 calls)."""
        fetched_at, summary, error = self._quota
        floor = ACCOUNT_RETRY_SECONDS if error else ACCOUNT_CACHE_SECONDS
        if fetched_at and time.monotonic() - fetched_at < max(max_age, floor):
            return summary, error
        if self._quota_fetch is None:
            self._quota_fetch = self.gateway.loop.create_task(self._fetch_quota())
        return await asyncio.shield(self._quota_fetch)

    async def _fetch_quota(self):
        try:
            try:
                summary, error = summarize_quota(await self.pool.run(
                    self.gateway.loop, self.auth.github_json, "/copilot_internal/user")), None
            except (AuthError, UpstreamUnreachable) as exc:
                summary, error = None, str(exc)
            self._quota = (time.monotonic(), summary, error)
            return summary, error
        finally:
            self._quota_fetch = None

    def usage_view(self, query):
        """GET /usage?by=hour|day|model|session|route|request[&since=]: the history, one view."""
        now = time.time()
        by = query["by"][-1]
        try:
            since = parse_since((query.get("since") or [None])[-1], now)
        except ValueError as exc:
            raise ClientError(400, str(exc), code="invalid_query", param="since")
        ledger = self.ledger
        views = {"hour": lambda: ledger.by_hour(now, since),
                 "day": lambda: ledger.by_day(now, since=since),
                 "model": lambda: ledger.by_model(now, since),
                 "session": lambda: ledger.by_session(since),
                 "route": lambda: ledger.by_route(now, since),
                 "request": lambda: ledger.requests(since)}
        if by not in views:
            raise ClientError(400, "by must be one of %s, got %r" % (", ".join(views), by[:40]),
                              code="invalid_query", param="by")
        return {"by": by, "since": since, "now": now, "history": self.history is not None,
                "data": views[by]()}

    #: Facts of CopilotAuth.describe() the page shows as rows of their own, with their labels.
    CREDENTIAL_ROWS = (("mode", "token mode"), ("payer", "billed to"),
                       ("app_permission", "App permission"))

    def login_status(self):
        """What the dashboard shows of the login: never a token, only what kind it is, where it
        came from and when the Copilot token expires; ``extra``: more rows (label -> text)."""
        kind, source = peek_github_token(self.auth)
        facts = self.auth.describe()
        record = self.auth.record or {}
        return {"logged_in": bool(kind), "token_kind": kind or facts.get("token_kind"),
                "token_source": ("flag or environment" if source and not os.path.isabs(source) else
                                 "state dir" if source else None),
                "copilot_token_expires_at": facts.get("expires_at", record.get("expires_at")),
                "extra": {label: str(facts[name])
                          for name, label in self.CREDENTIAL_ROWS if facts.get(name)}}

    async def handle_root(self, request, response, _):
        """GET /: the dashboard for a browser (an Accept that asks for HTML), Ollama's probe
        answer ("Ollama is running", which clients read to find a server) for the others. The
        route is public so that the page loads without the API key (it holds no data;
        /dashboard/data needs the key); the Host and Origin checks apply to both answers, and
        the key to the probe's."""
        self.guard.check_host(request)
        self.guard.check_origin(request, response)
        if "text/html" in request.header("accept", "").lower() and not self.config.no_dashboard:
            return await self.handle_page(request, response)
        if "ollama" not in self.config.api_surface:  # no probe answer for an API that is not served
            raise ClientError(404, "/ is Ollama's probe, and the Ollama API is not enabled: "
                                   "start coproxy with --api-surface all (or a list that includes "
                                   "ollama)",
                              code="api_surface_disabled")
        self.guard.check_api_key(request)
        await response.send(200, [("Content-Type", "text/plain; charset=utf-8")], OLLAMA_RUNNING)

    async def handle_page(self, request, response):
        nonce = base64.b64encode(os.urandom(18)).decode("ascii")
        headers = [("Content-Type", "text/html; charset=utf-8"),
                   ("Content-Security-Policy", DASHBOARD_CSP.format(nonce)),
                   ("X-Content-Type-Options", "nosniff"), ("Referrer-Policy", "no-referrer"),
                   ("X-Frame-Options", "DENY"), ("Cache-Control", "no-store"), ("Vary", "Accept")]
        page = DASHBOARD_PAGE.replace("__NONCE__", nonce)
        await response.send(200, headers, page.encode("utf-8"))

    async def handle_data(self, request, response, _):
        """Everything the dashboard page shows, in one JSON document (the page is a view of it)."""
        if self.config.no_dashboard:
            raise ClientError(404, "the dashboard is turned off (--no-dashboard); "
                                   "GET /usage?by=... still answers", code="dashboard_disabled")
        quota, quota_error = await self.quota(QUOTA_CACHE_SECONDS)
        now = time.time()
        ledger = self.ledger
        payload = {"now": now, "url": self.url, "health": self.health(),
                   "login": dict(self.login_status(), user=(quota or {}).get("login")),
                   "quota": quota, "quota_error": quota_error,
                   "windows": self.gateway.windows,
                   "history": {"enabled": self.history is not None,
                               "days": self.config.history_days},
                   "count": ledger.count, "hourly": ledger.by_hour(now),
                   "daily": ledger.by_day(now), "latency": ledger.by_route(now),
                   "sessions": ledger.by_session(limit=50), "requests": ledger.requests()}
        await response.send(200, JSON_HEADERS + [("Cache-Control", "no-store")],
                            json_dumps(payload))


def unknown_path_error(request, dialect, route_list, port):
    """404 for a path no route serves. For /v1/v1/... the client adds /v1 to a base URL that
    already ends in it (Anthropic clients always add it, so their base URL must not have it): the
    message says which base URL to use instead of listing the routes."""
    if not request.path.startswith("/v1/v1/"):
        return ClientError(404, "no such endpoint: %s %s (coproxy serves %s)"
                           % (request.method, request.path, route_list), code="unknown_url")
    host = (request.header("host") or "%s:%d" % (DEFAULT_HOST, port))[:100]
    if dialect is ANTHROPIC:
        fix = "ANTHROPIC_BASE_URL=http://%s (Anthropic clients add /v1 themselves)" % host
    else:
        fix = "http://%s/v1 as the base URL (OPENAI_BASE_URL), once" % host
    return ClientError(404, "%s %s has /v1 twice: the base URL ends in /v1 and the client adds "
                            "another; drop the /v1 from the end of the base URL: %s"
                            % (request.method, request.path[:200], fix), code="unknown_url")


class OllamaRoutes:
    """Ollama's API (8g, 9i) on coproxy's port: handlers the App mounts like its own, so they pass
    the same checks, slots, pacing, accounting and access log as every other route."""

    def __init__(self, app):
        self.app = app

    def routes(self):
        return [Route(path, "ollama", OLLAMA, {method: handler}, False)
                for path, method, handler in (
            ("/api/version", "GET", self.version), ("/api/tags", "GET", self.tags),
            ("/api/ps", "GET", self.ps), ("/api/show", "POST", self.show),
            ("/api/chat", "POST", self.chat),
            ("/api/generate", "POST", functools.partial(self.chat, kind="generate")),
            ("/api/embed", "POST", self.embed),
            ("/api/embeddings", "POST", functools.partial(self.embed, legacy=True)))]

    async def version(self, request, response, _):
        await self.app.send_json(response, {"version": OLLAMA_VERSION})

    async def entries(self):
        """The catalogue listing's chat and embeddings models (the ones Ollama clients can use)."""
        entries, _ = await self.app.catalogue.listing()
        return [e for e in entries
                if (_dig(e, "capabilities").get("type") or "chat") in ("chat", "embeddings")]

    async def tags(self, request, response, _):
        modified_at = rfc3339(self.app.started_at)
        tags = [ollama_tag(entry, modified_at) for entry in await self.entries()]
        await self.app.send_json(response, {"models": tags})

    async def ps(self, request, response, _):
        await self.app.send_json(response, {"models": []})  # nothing runs here: Copilot does

    async def model(self, payload):
        """(name as sent, catalogue id, entry) of an Ollama request (``model``, or ``name`` as older
        clients send it); aliases and tags resolve as on every route."""
        if payload.get("model") is None and isinstance(payload.get("name"), str):
            payload["model"] = payload["name"]
        name = check(payload, "model", "string", required=True)
        model, info = await self.app.catalogue.resolve(name)
        return name, model, info

    async def show(self, request, response, _):
        _, model, _ = await self.model(await self.app.read_json(request))
        entry = next((e for e in await self.entries() if e["id"] == model), {"id": model})
        await self.app.send_json(response, ollama_show(entry, rfc3339(self.app.started_at)))

    async def chat(self, request, response, _, kind="chat"):
        payload = await self.app.read_json(request)
        name, model, info = await self.model(payload)
        await self.app.work(request, validate_ollama_request, payload, kind)
        said = payload.get("messages") if kind == "chat" else (
            payload.get("prompt") or payload.get("images"))
        if not said:  # Ollama loads the model (or with keep_alive 0 unloads it) and answers at once
            unload = payload.get("keep_alive") in (0, "0", "0s")
            return await self.app.send_json(
                response, ollama_loaded(name, kind, rfc3339(time.time()), unload))
        await self.app.run_plan(request, response, plan_ollama, payload, kind, name, model, info,
                                self.app.catalogue.quirks(model), time.time(), request.started,
                                time.monotonic)

    async def embed(self, request, response, _, legacy=False):
        payload = await self.app.read_json(request)
        name, model, info = await self.model(payload)
        await self.app.run_plan(request, response, plan_ollama_embed, payload, legacy, name, model,
                                info, request.started, time.monotonic)


class ExchangeLog:
    """What every finished exchange leaves behind: the request metrics, the dashboard's ledger
    and history (Dashboard.note), and one access-log line. Called by the server's Connection
    after each exchange, errors and refusals included."""

    def __init__(self, config, metrics, catalogue, dashboard):
        self.config = config
        self.metrics = metrics
        self.catalogue = catalogue
        self.dashboard = dashboard

    def __call__(self, request, response):
        """Record one exchange. The access line is text with key=value fields, or with
        --log-format json the fields as JSON numbers and booleans."""
        fields = response.log_fields
        status = response.status or 0
        model = self.catalogue.label(fields.get("model")) if fields.get("model") else ""
        self.metrics.inc("coproxy_requests_total", (
            ("route", fields.get("route", "other")), ("status", status), ("model", model),
            ("initiator", fields.get("initiator", ""))))
        if request.body:
            self.metrics.inc("coproxy_request_bytes_total", (), len(request.body))
        self.metrics.inc("coproxy_response_bytes_total", (), response.bytes_sent)
        self.dashboard.note(request, response)
        # an open dashboard page asks every 2 s: its polls are debug lines
        quiet = status == 200 and fields.get("route") == "/dashboard/data"
        if not access_log.isEnabledFor(logging.DEBUG if quiet else logging.INFO):
            return
        duration = round((time.monotonic() - request.started) * 1000, 1)
        shown = [(k, v) for k, v in fields.items() if k != "route"]
        extra = "".join(" %s=%s" % (k, str(v).lower() if isinstance(v, bool)
                                    else "%g" % v if isinstance(v, float) else v)
                        for k, v in shown)
        record = None
        if self.config.log_format == "json":  # numbers and booleans; text lines have them already
            record = {"fields": dict(shown, method=request.method, path=request.path,
                                     status=status, duration_ms=duration)}
        access_log.log(logging.DEBUG if quiet else logging.INFO, "%s %s %s %.1fms%s",
                       request.method, request.path, status or "-", duration, extra, extra=record)


class App:
    """Routes, checks and envelopes; everything else is delegated: the catalogue (models), the
    gateway (sending plans), the pool and hub (threads), the ExchangeLog (metrics, history and
    the access log of each exchange)."""

    def __init__(self, config, store=None, client=None, auth=None):
        """Build the app's parts; ``store``, ``client`` and ``auth`` can be given (tests,
        embedders). The route table maps canonical paths (each also answered with /v1) to
        handlers per method; the Ollama routes join it when that surface is on."""
        self.config = config
        self.store = store or TokenStore(config.state_dir)
        self.client = client or UpstreamClient(config.ca_file, config.connect_timeout,
                                               config.upstream_timeout, config.environ)
        self.auth = auth or CopilotAuth(config, self.store, self.client)
        self.pool = WorkerPool(config.max_concurrency + 16)
        self.metrics = Metrics()
        self.catalogue = Catalogue(config, self.auth, self.pool, self._auth_result)
        self.gateway = Gateway(config, self.auth, self.client, self.pool, self.catalogue,
                               self.metrics)
        self.responses = ResponseStore()
        self.started_at = time.time()
        self.auth_error = None
        self.guard = Guard(config)
        self.dashboard = Dashboard(config, self.auth, self.gateway, self.pool, self.health,
                                   self.guard)
        self.log_exchange = ExchangeLog(config, self.metrics, self.catalogue, self.dashboard)
        self._max_body = config.max_body_bytes
        # Canonical paths, without /v1 (every route answers with and without the prefix); a path
        # ending in / takes one more segment as its parameter.
        self.routes = [
            Route("/chat/completions", "chat", OPENAI, {"POST": self.handle_chat}, False),
            Route("/responses", "responses", RESPONSES,
                  {"POST": self.handle_responses, "GET": refuse_websocket}, False),
            Route("/responses/compact", "responses", RESPONSES, {"POST": self.handle_compact},
                  False),
            Route("/responses/", "responses", RESPONSES,
                  {"GET": self.handle_response_id, "DELETE": self.handle_response_id}, False),
            Route("/embeddings", "embeddings", OPENAI, {"POST": self.handle_embeddings}, False),
            Route("/messages", "messages", ANTHROPIC, {"POST": self.handle_messages}, False),
            Route("/messages/count_tokens", "messages", ANTHROPIC,
                  {"POST": self.handle_count_tokens}, False),
            Route("/models", None, OPENAI, {"GET": self.handle_models}, False),
            Route("/models/", None, OPENAI, {"GET": self.handle_model}, False),
            Route("/usage", None, OPENAI, {"GET": self.handle_usage}, False),
            Route("/dashboard/data", None, OPENAI, {"GET": self.dashboard.handle_data}, False),
            Route("/metrics", None, OPENAI, {"GET": self.handle_metrics}, False),
            Route("/", None, OLLAMA, {"GET": self.dashboard.handle_root}, True),
            Route("/healthz", None, OPENAI, {"GET": self.handle_health}, True),
            Route("/health", None, OPENAI, {"GET": self.handle_health}, True),
        ] + OllamaRoutes(self).routes()

    async def start(self):
        await self.gateway.start()
        self.dashboard.start()

    def close(self):
        self.dashboard.close()
        self.gateway.close()
        self.pool.shutdown(wait=False)
        self.client.close()

    def _auth_result(self, error):
        self.auth_error = error

    def find_route(self, path):
        """(Route, parameter) for a request path, or (None, None)."""
        canonical = path[3:] if path.startswith("/v1/") else path
        for route in self.routes:
            if route_takes_id(route):
                if canonical.startswith(route.path) and "/" not in canonical[len(route.path):] \
                        and len(canonical) > len(route.path) and not route.public:
                    return route, urllib.parse.unquote(canonical[len(route.path):])
            elif canonical == route.path and (not route.public or path == route.path):
                return route, None
        return None, None

    def route_list(self):
        return ", ".join(("" if r.public or r.dialect is OLLAMA else "/v1") + route_label(r)
                         for r in self.routes
                         if r.surface is None or r.surface in self.config.api_surface)

    # -- dispatch and the checks every request passes ------------------------------------------
    def protocol_error_body(self, status, message):
        return json_dumps(openai_error_body(message, error_type_for_status(status),
                                            PROTOCOL_ERROR_CODES.get(status, "bad_request")))

    async def dispatch(self, request, response):
        """Answer one request: find its route, pass the Guard's checks (Host and Origin before
        anything is said about routes, the key before the handler), run the handler, and turn
        every failure into an error envelope in the route's dialect (a traceback only in the
        log). Public routes (/healthz, the dashboard page) skip the Guard."""
        route, param = self.find_route(request.path)
        # /v1/v1/...: a base URL ending in /v1, plus the client's own; answered as the route meant
        meant = route
        if meant is None and request.path.startswith("/v1/v1/"):
            meant = self.find_route(request.path[3:])[0]
        dialect = dialect_for(meant, request)
        response.log_fields["route"] = route_label(route) if route else "other"
        try:
            if request.method not in KNOWN_METHODS:
                response.keep_alive = False  # we cannot know how this method frames its body
                raise ClientError(501, "method %s is not implemented" % request.method,
                                  code="not_implemented")
            if route is None or not route.public:
                self.guard.check_host(request)
                if self.guard.check_origin(request, response):
                    return await response.send(204, [])
            if route is None:
                raise unknown_path_error(request, dialect, self.route_list(), self.config.port)
            if route.surface is not None and route.surface not in self.config.api_surface:
                raise ClientError(404, "%s is not enabled: start coproxy with --api-surface all "
                                       "(or a list that includes %s)"
                                       % (request.path, route.surface),
                                  code="api_surface_disabled")
            handler = route.handlers.get("GET" if request.method == "HEAD" else request.method)
            methods = set(route.handlers) | ({"HEAD"} if "GET" in route.handlers else set())
            allow = ", ".join(sorted(methods))
            if request.method == "OPTIONS":
                return await response.send(204, [("Allow", allow + ", OPTIONS")])
            if handler is None:
                raise ClientError(405, "%s does not accept %s (allowed: %s)"
                                  % (request.path, request.method, allow),
                                  code="method_not_allowed", headers=[("Allow", allow)])
            if not route.public:
                self.guard.check_api_key(request)
            await handler(request, response, param)
        except ClientError as exc:
            await self.send_error(response, exc, dialect)
        except BadRequest as exc:  # from reading the body: in the route's dialect, then closed
            response.keep_alive = False
            code = PROTOCOL_ERROR_CODES.get(exc.status, "bad_request")
            await self.send_error(response, ClientError(exc.status, str(exc), code=code), dialect)
        except AuthError as exc:
            self.auth_error = str(exc)
            status = 502 if exc.code == "network" else 503
            await self.send_error(response, ClientError(status, str(exc), kind="api_error",
                                                        code=exc.code), dialect)
        except UpstreamUnreachable as exc:
            status, code = ((504, "upstream_timeout") if exc.timeout
                            else (502, "upstream_unreachable"))
            await self.send_error(response, ClientError(status, str(exc), kind="api_error",
                                                        code=code), dialect)
        except (ClientDisconnected, _EndOfInput):
            response.log_fields.setdefault("error", "client_stalled" if request.connection.stalled
                                           else "client_closed")
            raise
        except Exception:  # a bug: logged with its traceback, answered as an internal error
            log.exception("unhandled error answering %s %s", request.method, request.path)
            response.keep_alive = False
            await self.send_error(response, ClientError(
                500, "internal error in coproxy; see its log", code="internal_error"), dialect)

    async def send_error(self, response, exc, dialect=OPENAI):
        """An error in the route's envelope; nothing if the answer has started."""
        response.log_fields["error"] = exc.code or exc.kind
        if response.started:
            return
        if exc.status >= 500 or exc.status == 429:
            log.warning("answered %d %s: %s", exc.status, exc.code or exc.kind, exc)
        await response.send(exc.status, JSON_HEADERS + list(exc.headers), dialect.envelope(exc))

    async def send_json(self, response, payload, headers=()):
        await response.send(200, JSON_HEADERS + list(headers), json_dumps(payload))

    async def read_json(self, request):
        """The request body as a JSON object, decompressed (a heavy one in a worker: see work)."""
        raw, encoding = await request.read_body(self._max_body), request.header("content-encoding")
        return await self.work(request, decode_json_body, raw, encoding, self._max_body)

    async def work(self, request, fn, *args):
        """``fn(*args)``: parsing, checking, planning; in a worker for a heavy body (heavy_body)."""
        if not heavy_body(request.body, request.header("content-encoding")):
            return fn(*args)
        return await self.pool.run_alone(self.gateway.loop, fn, *args)

    async def run_plan(self, request, response, planner, *args):
        """``planner(*args)`` made through ``work``, then sent (Gateway.run)."""
        await self.gateway.run(await self.work(request, planner, *args), request, response)

    # -- proxied routes: parse, resolve, plan, send ------------------------------------------
    async def resolve(self, response, name):
        """The catalogue's (model, entry) for a client's name; the name asked for is logged (and
        kept in the history) when it differs from the model that answers."""
        model, info = await self.catalogue.resolve(name)
        if model != name:
            response.log_fields["requested"] = str(name)[:100]
        return model, info

    async def handle_chat(self, request, response, _):
        payload = await self.read_json(request)
        parsed = await self.work(request, validate_chat_request, payload, self.config.default_model)
        model, info = await self.resolve(response, payload["model"])
        payload["model"] = model
        await self.run_plan(request, response, plan_chat, payload, parsed, model, info,
                            self.catalogue.quirks(model), time.time())

    async def handle_messages(self, request, response, _):
        payload = await self.read_json(request)
        await self.work(request, validate_anthropic_request, payload)
        model, info = await self.resolve(response, payload["model"])
        payload["model"] = model
        await self.run_plan(request, response, plan_messages, payload, model, info,
                            self.catalogue.quirks(model), time.time(), request.header)

    async def handle_count_tokens(self, request, response, _):
        tokens = await self.work(request, count_tokens_of_request, await self.read_json(request))
        await self.send_json(response, {"input_tokens": tokens})

    async def handle_responses(self, request, response, _):
        payload = await self.read_json(request)
        model, info = await self.resolve(response, await self.work(
            request, validate_responses_request, payload, self.config.default_model))
        payload["model"] = model
        await self.run_plan(request, response, plan_responses, payload, model, info,
                            self.catalogue.quirks(model), time.time(), self.responses)

    async def handle_compact(self, request, response, _):
        payload = await self.read_json(request)
        model, info = await self.resolve(response, await self.work(
            request, validate_responses_request, payload, self.config.default_model))
        check(payload, "input", "array", required=True)
        payload["model"] = model
        await self.run_plan(request, response, plan_compact, payload, model, info,
                            self.catalogue.quirks(model), time.time())

    async def handle_response_id(self, request, response, response_id):
        answer = self.responses.answer(request.method, response_id)  # GET, HEAD or DELETE
        if answer is not None:
            return await self.send_json(response, answer)
        await self.gateway.run(plan_response_get(response_id, request.method), request, response)

    async def handle_embeddings(self, request, response, _):
        upstream_request, encoding = prepare_embeddings_request(await self.read_json(request))
        model, info = await self.resolve(response, upstream_request["model"])
        upstream_request["model"] = model
        await self.gateway.run(plan_embeddings(upstream_request, encoding, model, info), request,
                               response)

    # -- local routes -------------------------------------------------------------------------
    async def handle_models(self, request, response, _):
        entries, source = await self.catalogue.listing()
        if request.header("anthropic-version"):  # an Anthropic client (Claude Code's discovery)
            listing = anthropic_model_list(
                entries, urllib.parse.parse_qs(request.query, keep_blank_values=True))
        else:
            listing = {"object": "list", "data": [copilot_model_to_openai(e) for e in entries],
                       "has_more": False}
        await self.send_json(response, listing, [("X-Coproxy-Models-Source", source)])

    async def handle_model(self, request, response, model_id):
        entries, source = await self.catalogue.listing()
        anthropic = request.header("anthropic-version") is not None  # then claude-sonnet-4-5 too
        model = resolve_model(model_id, [e["id"] for e in entries]) if anthropic else model_id
        entry = next((e for e in entries if e["id"] == model), None)
        if entry is None:
            raise ClientError(404, "model %r is not in the Copilot catalog (GET /v1/models lists "
                                   "them)" % model_id, code="model_not_found", param="model")
        shown = anthropic_model_info(entry) if anthropic else copilot_model_to_openai(entry)
        await self.send_json(response, shown, [("X-Coproxy-Models-Source", source)])

    def health(self):
        """/healthz for callers the Guard admits: login state, the last errors, uptime."""
        token = self.auth.has_credentials()
        record = self.auth.record
        copilot_token = ("valid" if record and record["expires_at"] > time.time()
                         else "not yet fetched" if token else "missing")
        never = {"ok": None, "class": None, "message": "no request sent to Copilot yet", "at": None}
        return {"status": "ok", "version": __version__,
                "auth": {"github_token": bool(token), "credentials": self.auth.describe(),
                         "copilot_token": copilot_token,
                         "ready": bool(token) and self.auth_error is None,
                         "error": self.auth_error},
                "upstream": self.gateway.last_outcome or never,
                "uptime_seconds": int(time.time() - self.started_at)}

    async def handle_health(self, request, response, _):
        """Liveness for anyone (a container's health check sends no key); the login state and the
        last errors only to callers the API itself would serve."""
        body = self.health() if self.guard.admits(request, response) else {"status": "ok"}
        await self.send_json(response, body, [("Cache-Control", "no-store")])

    async def handle_metrics(self, request, response, _):
        await response.send(200, [("Content-Type", "text/plain; version=0.0.4; charset=utf-8")],
                            self.metrics.render(self.auth, self.client, self.started_at))

    async def handle_usage(self, request, response, _):
        query = urllib.parse.parse_qs(request.query)
        if "by" in query:
            return await self.send_json(response, self.dashboard.usage_view(query),
                                        [("Cache-Control", "no-store")])
        payload = {"since_start": dict(self.metrics.since_start(), started_at=int(self.started_at)),
                   "windows": self.gateway.windows}
        payload["copilot"], error = await self.dashboard.quota()
        if error:
            payload["error"] = error
        await self.send_json(response, payload, [("Cache-Control", "no-store")])


#: Settings the banner's claude-code line leaves out: how coproxy logs, and the GitHub token,
#: a secret (claude-code asks the running coproxy first, which has it).
_NOT_FOR_CLAUDE_CODE = ("log_level", "log_format", "github_token")


def claude_code_command(config, url, script):
    """The `claude-code` command line that reaches this server and, should it not answer, GitHub
    the same way `serve` does: every shared setting given to serve (flags and variables alike,
    as `service` carries them), --host/--port of ``url``, the key by its variable's name, and the
    proxy variables as a prefix (one holding a password is left to the shell). SSL_CERT_FILE and
    SSL_CERT_DIR are left out: set system-wide more often than not, they would only add noise."""
    words, _ = settings_argv(config, scope=("shared",), leave_out=_NOT_FOR_CLAUDE_CODE)
    if config.state_dir_option == "":
        words = words[2:]  # the default state dir goes without saying
    host = url.split("://", 1)[1].rsplit(":", 1)[0].strip("[]")
    if host not in (DEFAULT_HOST, "0.0.0.0", "::"):
        words += ["--host", host]
    port = int(url.rsplit(":", 1)[1])
    if port != DEFAULT_PORT:
        words += ["--port", str(port)]
    import shlex  # only for the banner
    line = " ".join(shlex.quote(word) for word in words)
    if config.api_key:
        line += ' --api-key "$%s"' % config.api_key_variable
    plain, _ = connection_environment(config.environ)
    prefix = "".join("%s=%s " % (name, shlex.quote(value)) for name, value in sorted(plain.items())
                     if name.upper().endswith("_PROXY"))
    return "%spython3 %s claude-code%s" % (prefix, shlex.quote(script),
                                           " " + line if line.strip() else "")


def script_as_run():
    """This file as the user ran it (a relative path stays relative), for printed command lines."""
    ran = sys.argv[0] if sys.argv else ""
    return ran if os.path.basename(ran) == os.path.basename(__file__) else __file__


def start_banner(config, url, script=None):
    """What `serve` prints once listening: where it is, and exact lines to point clients at it
    (``script``: this file as the user ran it)."""
    base = local_url(url)
    script = script or script_as_run()
    variable = "$" + config.api_key_variable
    key = '"%s"' % variable if config.api_key else "unused"
    ollama = ["  Ollama clients:     %s (JetBrains AI Assistant, VS Code's Ollama provider)" % base
              ] if "ollama" in config.api_surface else []
    return "\n".join([
        "listening on %s" % url,
        "  OpenAI clients:     OPENAI_BASE_URL=%s/v1 OPENAI_API_KEY=%s" % (base, key),
        "  Anthropic clients:  ANTHROPIC_BASE_URL=%s" % base] + ollama + [
        "  Claude Code:        eval \"$(%s)\" && claude" % claude_code_command(config, url, script),
        "  try it:             curl -s %s/v1/chat/completions "
        "-H 'Content-Type: application/json'%s -d '{\"model\": \"gpt-4.1\", "
        "\"messages\": [{\"role\": \"user\", \"content\": \"Say hi\"}]}'" % (
            base, " -H \"Authorization: Bearer %s\"" % variable if config.api_key else "")])


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
        raise ConfigError("cannot listen on %s:%s: %s"
                          % (config.host, config.port, exc.strerror or exc))
    app.guard.bound_host = server.host
    stop_event = stop_event or asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        # Windows, or not the main thread: Ctrl-C arrives as KeyboardInterrupt instead
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signum, stop_event.set)
    url = http_url(server.host, server.port)
    app.dashboard.url = url
    if on_ready is not None:
        on_ready(server)
    if announce and config.log_format == "json":  # every stderr line: one JSON object, one shape
        logging.getLogger("coproxy.announce").info("listening on %s", url,
                                                   extra={"fields": {"url": url}})
    elif announce:
        sys.stderr.write(start_banner(config, url) + "\n")
        sys.stderr.flush()
    try:
        await stop_event.wait()
        log.info("shutting down")
    finally:
        await server.shutdown(config.shutdown_grace)
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.remove_signal_handler(signum)
        app.close()
    return 0

# ------------------------------------------------------------------------------------------
# 14. CLI
#     argparse subcommands generated from OPTIONS (§4): shared options work before or after
#     the subcommand. Each ``cmd_*`` returns an exit code; results go to stdout, diagnostics
#     and prompts to stderr. Every `serve` records itself in its state dir (a pid file that
#     names the process, and a lock it holds), so `status` and `stop` find it and never
#     signal a stranger; a command line coproxy writes never carries a secret.
# ------------------------------------------------------------------------------------------

class UsageError(CoproxyError):
    """The command line asks for something that cannot be done as given (exit 2)."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one clear line for a usage error instead of the whole usage text, and what a
    misspelled flag needs: the flags each (sub)command takes."""

    def __init__(self, *args, **kwargs):
        self.long_flags = []  # every --flag this parser takes, hidden ones included
        self.commands = {}  # name: the parser of each subcommand built (see build_parser)
        self.argv = []  # the command line, for messages about it (set by main)
        super().__init__(*args, **kwargs)

    def add_argument(self, *args, **kwargs):
        """argparse's, also noting each long flag for unrecognized()'s did-you-mean."""
        action = super().add_argument(*args, **kwargs)
        self.long_flags += [flag for flag in action.option_strings if flag.startswith("--")]
        return action

    def unrecognized(self, names, extra):
        """The UsageError for arguments no parser took: the closest flag of the subcommand
        ``names`` (["auth", "login"]) they were given to (argparse would blame the top-level
        parser, whose help lacks serve's flags)."""
        parser = self
        for name in names:
            parser = parser.commands.get(name, parser)
        wrong = next((word for word in extra if word.startswith("-")), extra[0])
        import difflib  # only for this message
        flag = wrong.split("=", 1)[0]
        close = difflib.get_close_matches(flag.replace("_", "-"), parser.long_flags, n=1,
                                          cutoff=0.6)
        if not close:
            hint = ""
        elif close[0] != flag:
            hint = "; did you mean %s?" % close[0]
        else:  # a flag of the command given before it, where the top-level parser looks
            hint = "; %s goes after the command: python3 coproxy.py %s %s" % (
                flag, " ".join(names), flag)
        return UsageError("unrecognized argument %s%s (see: python3 coproxy.py %s--help)" % (
            wrong, hint, "".join(name + " " for name in names)))

    def error(self, message):
        """argparse's usage error as one line and exit 2 (through UsageError), pointing at the
        command's --help instead of printing the whole usage text."""
        if message.startswith("argument COMMAND: invalid choice"):
            # `--prot 8080 serve`: an unknown flag before the command made its value look like one
            wrong = [word for word in self.argv if word.startswith("--")
                     and word.split("=", 1)[0] not in self.long_flags]
            if wrong:
                command = [word for word in self.argv if word in self.commands][:1]
                raise self.unrecognized(command, wrong)
        # "coproxy auth login" -> "auth login ": the help to point at is the subcommand's
        command = self.prog.partition(" ")[2] + " " if " " in self.prog else ""
        raise UsageError("%s (see: python3 coproxy.py %s--help)" % (message, command))


def _flag_type(flag, convert):
    """An argparse type: ``convert``, with its ValueError shown as a usage error naming the
    flag (argparse names a type by its __name__)."""
    def parse(text):
        try:
            return convert(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError("%s" % exc)
    parse.__name__ = flag
    return parse


def _add_options(parser, scope, only=None, hidden=False, help_overrides=None):
    """The options of ``scope`` (or ``only`` those) on ``parser``; ``help_overrides`` {dest: text}
    for a command where an option means something else than for serve."""
    for option in OPTIONS:
        if option.scope != scope or (only is not None and option.dest not in only):
            continue
        option = option._replace(help=(help_overrides or {}).get(option.dest, option.help))
        shown_default = ("" if option.default in (None, False)
                         else " [default: %s]" % option.default)
        variables = option.env + "".join(", or %s when that is unset" % alias
                                         for alias in ENV_ALIASES.get(option.dest, ()))
        help_text = (argparse.SUPPRESS if hidden
                     else "%s (env %s)%s" % (option.help, variables, shown_default))
        flags = ("-d", option.flag) if option.dest == "detach" else (option.flag,)
        # SUPPRESS: a flag not given leaves no attribute, so Config.resolve can tell it from a
        # flag given with its default value (a flag beats the environment only when given).
        common = dict(dest=option.dest, default=argparse.SUPPRESS, help=help_text)
        if option.type is bool:
            parser.add_argument(*flags, action="store_true", **common)
        else:
            repeated = isinstance(option.type, Repeatable)
            convert = _flag_type(option.flag, option.type.item if repeated else option.type)
            parser.add_argument(option.flag, type=convert, metavar=option.metavar,
                                action="append" if repeated else "store", **common)


#: (the line in the command list, the description atop its --help) of each command; argparse
#: prints the description as written (RawDescriptionHelpFormatter), line breaks included.
COMMAND_HELP = {
    "serve": ("run the proxy server",
              "Serve the OpenAI and Anthropic APIs on HOST:PORT, backed by Copilot."),
    "auth": ("log in, inspect or forget the GitHub login",
             "Manage the GitHub login and the Copilot token."),
    "auth login": ("log in with GitHub's device flow",
                   "Show a code and a URL; approve on GitHub; the token is saved (0600) in the "
                   "state directory."),
    "auth status": ("show login, plan, token expiry and API base",
                    "Exit status 0 when a Copilot token can be had, 1 otherwise."),
    "auth logout": ("delete the saved tokens",
                    "Remove auth/github-access-token and auth/ghcp-token.json."),
    "auth refresh": ("fetch a new Copilot token now",
                     "Exchange the GitHub token for a fresh Copilot token and save it."),
    "models": ("list the models Copilot offers you",
               "Table of id, vendor, context window, output limit, tools/vision."),
    "stop": ("stop the coproxy serving from this state dir",
             "Send SIGTERM to the coproxy recorded in <state-dir>/coproxy.pid (only if it is "
             "still that process), wait for its graceful drain, and report."),
    "status": ("is a coproxy serving from this state dir? pid, address, uptime, auth, last "
               "upstream answer",
               "Exit status 0 when a coproxy is serving from this state dir, 1 otherwise."),
    "service": ("print a systemd user unit or a launchd plist",
                "Print a service definition that runs `serve` with this Python, this file and "
                "every setting you give (flags and environment alike); secrets go to "
                "<state-dir>/service.env (0600), never into the unit."),
    "usage": ("show your Copilot plan, AI credits or premium requests, and limits",
              "Plan, AI credits (token-billed plans) or premium requests (request-billed "
              "plans), chat quota, reset date, the session and weekly windows a running coproxy "
              "has seen, and from the history: the last 7 days as a chart, the top models and "
              "sessions."),
    "claude-code": (
        "print the environment that points Claude Code at coproxy",
        "Print ANTHROPIC_* settings for Claude Code: base URL, auth token, and model choices "
        "from\nyour live Copilot catalog, asked of the running coproxy first, then of GitHub "
        "(exit 1\nwhen neither answers). Use:  eval \"$(python3 coproxy.py claude-code)\"  then "
        "run `claude`\n(serve's banner prints this line with the options your serve needs)."),
}
#: Every subcommand's help ends with this. It names a few shared options, not all: a full list
#: here went stale whenever one was added.
SHARED_NOTE = ("Options for every command, such as --state-dir, --github-token, --log-level and "
               "--ca-file,\nare listed by `python3 coproxy.py --help`.")


def build_parser(command=None):
    """The CLI. With ``command``, only that subcommand's parser is built: argparse spends ~0.4 ms
    per subparser (gettext lookups included), which ``serve`` would pay before listening."""
    formatter = argparse.RawDescriptionHelpFormatter
    parser = ArgumentParser(
        prog="coproxy", formatter_class=formatter, allow_abbrev=False,
        description="Your GitHub Copilot subscription as a local OpenAI- and Anthropic-compatible "
                    "API.",
        epilog="first run:  python3 coproxy.py serve        (logs in with GitHub's device flow, "
               "then serves)\n"
               "then:       point clients at http://127.0.0.1:8080/v1 (any API key unless "
               "--api-key is set)\n"
               "more:       python3 coproxy.py COMMAND --help")
    _add_options(parser, "shared")
    parser.add_argument("--version", action="version", version="coproxy " + __version__)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)

    def sub(name, parent=commands):
        """The parser of subcommand ``name`` (None when another command is being built); it
        takes the shared options too, hidden from its help, so they work after the command."""
        if command not in (None, name) and parent is commands:
            return None
        parent_parser = parser if parent is commands else auth
        help_line, description = COMMAND_HELP[name if parent is commands else "auth " + name]
        made = parent.add_parser(name, allow_abbrev=False, formatter_class=formatter,
                                 epilog=SHARED_NOTE, help=help_line, description=description)
        parent_parser.commands[name] = made
        _add_options(made, "shared", hidden=True)
        return made

    serve = sub("serve")
    if serve:
        _add_options(serve, "serve")
    auth = sub("auth")
    if auth:
        auth_commands = auth.add_subparsers(dest="auth_command", metavar="ACTION",
                                            parser_class=ArgumentParser)
        sub("login", auth_commands).add_argument("--no-browser", action="store_true",
                                                 help="do not try to open a web browser")
        for action in ("status", "logout", "refresh"):
            sub(action, auth_commands)
    models = sub("models")
    if models:
        models.add_argument("--json", action="store_true",
                            help="print OpenAI-shaped JSON instead of a table")
        _add_options(models, "serve", only=("model_aliases",))
    sub("stop")
    sub("status")
    service = sub("service")
    if service:
        service.add_argument("kind", nargs="?", choices=("systemd", "launchd"),
                             help="systemd or launchd")
        # every serve option but --detach: a service manager runs the server in the foreground
        _add_options(service, "serve", only=[o.dest for o in OPTIONS
                                             if o.scope == "serve" and o.dest != "detach"])
    usage = sub("usage")
    if usage:
        usage.add_argument("--json", action="store_true",
                           help="print JSON (GET /usage's copilot part, and the last 7 days of "
                                "history)")
    claude = sub("claude-code")
    if claude:
        _add_options(claude, "serve", only=("host", "port", "api_key"), help_overrides={
            "host": "address where the coproxy for Claude Code listens, as given to serve: "
                    "nothing is bound here. Without --host and --port, the coproxy serving from "
                    "this state dir, if one is",
            "port": "port where that coproxy listens, as given to serve",
            "api_key": "the key that coproxy was started with; sent by Claude Code, and used to "
                       "ask that coproxy for the model catalogue"})
        claude.add_argument("--shell", choices=("sh", "fish", "powershell"), default="sh",
                            help="syntax of the lines printed [default: sh, for bash/zsh]")
        claude.add_argument("--model",
                            help="main model (default: the newest Sonnet in your catalog)")
    return parser


def _say(text):
    """A line for the person at the terminal, on stderr: stdout carries only a command's
    result (`models --json | jq` must stay JSON)."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def _interactive():
    """True when a person can answer: stdin and stderr are terminals. A service, a pipe or a
    CI job would otherwise wait on a device-flow code no one sees."""
    return sys.stdin is not None and sys.stdin.isatty() and sys.stderr.isatty()


def _auth_for(config):
    """The CopilotAuth of a command, with its token store and an upstream client of its own."""
    client = UpstreamClient(config.ca_file, config.connect_timeout, config.upstream_timeout,
                            config.environ)
    return CopilotAuth(config, TokenStore(config.state_dir), client)


@contextlib.contextmanager
def _session(config):
    """The auth of one CLI command (see _auth_for); its pooled sockets are closed after."""
    auth = _auth_for(config)
    try:
        yield auth
    finally:
        auth.client.close()


def run_device_login(auth, open_browser=True):
    """The interactive part of ``auth login`` (also used by ``serve`` on a TTY); returns the
    Copilot token record the new login gave."""
    flow = DeviceFlow(auth.client, auth.config)
    code = flow.start()
    uri = code.get("verification_uri_complete") or code["verification_uri"]
    _say("To log in, open %s and enter the code:  %s"
         % (code["verification_uri"], code["user_code"]))
    tty = sys.stderr.isatty()
    if open_browser and _interactive():
        with contextlib.suppress(Exception):  # no browser is fine: the URL is on screen
            import webbrowser  # only here: it costs start-up time and memory every serve would pay
            webbrowser.open(uri)

    def on_wait(remaining, interval):  # a countdown that rewrites its own line
        sys.stderr.write("\rwaiting for approval (code expires in %s, checking every %ds)  " % (
            format_duration(remaining), interval))
        sys.stderr.flush()

    if not tty:
        _say("waiting for approval (the code expires in %s)" % format_duration(code["expires_in"]))
    try:
        token = flow.poll(code, on_wait if tty else None)
    finally:
        if tty:
            sys.stderr.write("\n")
    auth.store.save_github_token(token)
    _say("GitHub login saved to %s" % auth.store.github_token_path)
    return auth.copilot_token(force=True)  # the proof that the login gives Copilot access


# -- the record of a running server: <state-dir>/coproxy.pid and coproxy.lock -------------------

PID_FILE = "coproxy.pid"
LOCK_FILE = "coproxy.lock"
LOG_FILE = "coproxy.log"
SERVICE_ENV_FILE = "service.env"


def process_start_time(pid):
    """When ``pid`` started, from /proc/PID/stat (clock ticks since boot); None without /proc. A
    pid the kernel has reused for another program has another start time."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as handle:
            return int(handle.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def read_pid_file(path):
    """(pid, url, start time or None) from a pid file, or (None, None, None)."""
    try:
        with open(path, "r", encoding="utf-8") as handle:
            lines = handle.read().split()
        url = lines[1] if len(lines) > 1 else None
        started = int(lines[2]) if len(lines) > 2 and lines[2].isdigit() else None
        return int(lines[0]), url, started
    except (OSError, ValueError, IndexError):
        return None, None, None


def _lock_held(path):
    """True if another process holds the server lock at ``path``; None where there are no locks."""
    try:
        import fcntl
    except ImportError:  # Windows
        return None
    try:
        fd = open_private(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    except OSError:
        return None
    # A shared lock is refused only while a server holds its exclusive one; taken and
    # dropped at once, it never stands in a starting server's way for long.
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def process_alive(pid):
    """True if ``pid`` is a live process (Windows: asked of the kernel; os.kill would kill it)."""
    if os.name == "nt":
        import ctypes
        query_limited_information = 0x1000  # the least right that reads an exit code
        handle = ctypes.windll.kernel32.OpenProcess(query_limited_information, False, pid)
        if not handle:
            return False
        code = ctypes.c_ulong()
        ctypes.windll.kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
        ctypes.windll.kernel32.CloseHandle(handle)
        return code.value == 259  # STILL_ACTIVE
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the pid exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's process
        return True
    return True


def running_instance(config, quiet=False):
    """(pid, url) of the coproxy serving from this state dir, or (None, None). It must hold the
    state dir's lock and, where /proc tells, still be the process that wrote the pid file; a
    pid file that fails either check is stale, is removed, and its pid is never signalled."""
    if os.path.isdir(config.state_dir):
        secure_dir(config.state_dir)  # a pid file is trusted no more than the token files beside it
    path = os.path.join(config.state_dir, PID_FILE)
    pid, url, started = read_pid_file(path)
    if pid is None:
        return None, None
    held = _lock_held(os.path.join(config.state_dir, LOCK_FILE))
    live = held if held is not None else process_alive(pid)
    if live and started is not None and process_start_time(pid) not in (None, started):
        live = False
    if live:
        return pid, url
    if not quiet:
        _say("removing a stale pid file (pid %d is no longer that coproxy): %s" % (pid, path))
    with contextlib.suppress(OSError):
        os.unlink(path)
    return None, None


class InstanceRecord:
    """This process's claim on its state dir while it serves: the lock (held until exit, gone
    with the process however it ends) and the pid file (pid, address, start time)."""

    def __init__(self, config):
        self.config = config
        self.pid_path = os.path.join(config.state_dir, PID_FILE)
        self._lock_fd = None

    def claim(self):
        """Take the state dir for this process, or CoproxyError naming who has it. The pid
        file is checked first for a clear message; the lock then settles a race between two
        starts, which both passed that check."""
        pid, url = running_instance(self.config)
        if pid is not None and pid != os.getpid():
            raise CoproxyError("coproxy is already running for %s (pid %d, %s); `python3 "
                               "coproxy.py stop%s` first, or use another --state-dir"
                               % (self.config.state_dir, pid, url, self.config.state_dir_option))
        try:
            import fcntl
        except ImportError:  # Windows: the pid file alone
            return self
        self._lock_fd = open_private(os.path.join(self.config.state_dir, LOCK_FILE),
                                     os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._lock_fd)
            self._lock_fd = None
            raise CoproxyError("another coproxy is starting or running for %s"
                               % self.config.state_dir)
        return self

    def write(self, url):
        """The pid file, once listening: pid, URL and this process's start time, by which a
        reader tells this process from another that has been given the same pid since."""
        started = process_start_time(os.getpid())
        write_file_atomic(self.pid_path, "%d\n%s\n%s\n"
                          % (os.getpid(), url, "" if started is None else started))

    def release(self):
        """At exit: the pid file goes only while it still names this process."""
        if read_pid_file(self.pid_path)[0] == os.getpid():
            with contextlib.suppress(OSError):
                os.unlink(self.pid_path)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


# -- commands ---------------------------------------------------------------------------------

def require_key_for_public_bind(config, what="listen on"):
    """Settings that let others use the subscription need a key (or --allow-unauthenticated)."""
    if config.api_key or config.allow_unauthenticated:
        return
    if not is_loopback_host(config.host):
        problem = ("refusing to %s %s without an API key: anyone who can reach it"
                   % (what, config.host))
    elif "*" in config.cors_origins:
        problem = "refusing --cors-origin '*' without an API key: every web page you visit"
    else:
        return
    raise UsageError("%s would use your Copilot subscription. Set COPROXY_API_KEY or "
                     "GHCP_PROXY_API_KEY (or --api-key), or pass --allow-unauthenticated if you "
                     "really mean it" % problem)


def cmd_serve(config, args):
    """Check the settings, log in if needed (on a terminal), claim the state dir, and serve
    until a signal. Settings, credentials and the state dir are checked before the port is
    bound: a refusal is a one-line error, not a server that half starts. ``-d`` hands over to
    start_detached once they pass."""
    for flag, variable in config.secret_flags:
        log.warning("%s was given on the command line, where other users of this machine can "
                    "read it (ps); set %s in the environment instead", flag, variable)
    require_key_for_public_bind(config)
    auth = _auth_for(config)
    auth.store.check_dirs()
    if not auth.has_credentials():
        if config.no_auto_login:
            log.warning("not logged in; requests get 503 until `%s` has run", auth.login_command())
        elif _interactive():
            run_device_login(auth)
        else:
            raise CoproxyError("not logged in to GitHub: run `%s` first, set GHCP_GITHUB_TOKEN, "
                               "or pass --no-auto-login to start anyway" % auth.login_command())
    if config.detach:
        return start_detached(config)
    record = InstanceRecord(config).claim()
    # process-wide, so set here by the command and not by App (embedders keep their own)
    with contextlib.suppress(ValueError, RuntimeError):
        threading.stack_size(WORKER_STACK_BYTES)
    limit_malloc_arenas()
    app = App(config, auth.store, auth.client, auth)

    def on_ready(server):
        # written once listening: `serve -d` waits for this file to name the child
        record.write(http_url(server.host, server.port))
        if auth.has_credentials():  # fetch the Copilot token now, not on the first request
            def check():
                try:
                    auth.copilot_token()
                except (AuthError, UpstreamUnreachable) as exc:
                    app.auth_error = str(exc)
                    log.error("%s", exc)
            app.pool.submit(check)

    try:
        return asyncio.run(run_server(config, app, on_ready=on_ready))
    except KeyboardInterrupt:  # Windows: no signal handlers in the loop
        return 0
    finally:
        record.release()


def start_detached(config):
    """serve -d: run this same configuration as a background process (a new process, not a fork,
    so it also works on Windows), wait until it listens, and report where. Secrets go to the
    child through its environment, never its command line."""
    pid, url = running_instance(config)
    if pid is not None:
        raise CoproxyError("coproxy is already running (pid %d, %s); `python3 coproxy.py stop%s` "
                           "first" % (pid, url, config.state_dir_option))
    pid_path = os.path.join(config.state_dir, PID_FILE)
    log_path = os.path.join(config.state_dir, LOG_FILE)
    flags, secrets = settings_argv(config)
    # --no-auto-login: the child has no terminal to show a device code on (cmd_serve logged
    # in, if it had to, before coming here)
    argv = [sys.executable, os.path.abspath(__file__), "serve"] + flags + ["--no-auto-login"]
    environ = dict(os.environ, **secrets)
    environ.pop("COPROXY_DETACH", None)  # or the child would detach again, and again
    try:
        log_fd = open_private(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    except OSError as exc:
        why = "a symbolic link" if exc.errno == errno.ELOOP else exc.strerror or exc
        raise CoproxyError("cannot open the log file %s (%s); it must be a plain file of yours"
                           % (log_path, why))
    offset = os.fstat(log_fd).st_size  # a failure report shows this start's lines, not older ones
    # Its own session (Windows: DETACHED_PROCESS | CREATE_NEW_PROCESS_GROUP): a Ctrl-C or
    # hang-up of this terminal does not reach the server.
    options = ({"creationflags": 0x00000008 | 0x00000200} if os.name == "nt"
               else {"start_new_session": True})
    import subprocess  # only here: the background child is the one place coproxy starts a process
    try:
        child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_fd, stderr=log_fd,
                                 env=environ, close_fds=True, **options)
    finally:
        os.close(log_fd)
    # The pid file names the child once it listens (see cmd_serve's on_ready); a child that
    # exits first failed, and its log says why. 15 s is far more than a start takes, even on
    # a loaded machine (the first Copilot token is fetched after listening).
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        pid, url, _ = read_pid_file(pid_path)
        if pid == child.pid:
            print("coproxy is running in the background: pid %d, %s, log %s" % (pid, url, log_path))
            # the lines the foreground banner shows, for the clients; then how to check on it
            print("\n".join(start_banner(config, url).splitlines()[1:]))
            import shlex  # only for these lines
            script = shlex.quote(script_as_run())  # the same path as the Claude Code line's
            print("  status, stop:       python3 %s status%s, python3 %s stop%s" % (
                script, config.state_dir_option, script, config.state_dir_option))
            return 0
        if child.poll() is not None:
            break
        time.sleep(0.05)
    with open(log_path, "rb") as handle:
        handle.seek(offset)
        tail = handle.read().decode("utf-8", "replace").strip().splitlines()[-8:]
    if child.poll() is None:
        child.terminate()
    raise CoproxyError("the background server did not start; its log (%s) says:\n  %s"
                       % (log_path, "\n  ".join(tail) or "(nothing)"))


def cmd_auth_login(config, args):
    """The device flow, then a Copilot token as proof that the login gives access. A token
    given some other way still wins over the saved login, so the user hears of it first."""
    source = token_source_before_login(config)
    if source:
        _say("note: a token from %s is set and will be used instead of the one saved here" % source)
    with _session(config) as auth:
        record = run_device_login(auth, open_browser=not args.no_browser)
        try:
            login = auth.github_json("/user").get("login", "?")
        except AuthError:
            login = "?"
        print("logged in as %s; Copilot token valid for %s"
              % (login, format_duration(record["expires_at"] - time.time())))
        return 0


def credential_lines(facts):
    """`auth status` and `status` lines about the credentials in use (never the token)."""
    if not facts:
        return []
    mode = ("exchanged for a Copilot token" if facts["mode"] == "exchange"
            else "sent to Copilot directly")
    expires = facts.get("expires_at")
    when = "not known (the token is used as it is)"
    if expires:
        when = "in %s (%s)" % (format_duration(expires - time.time()),
                               time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(expires)))
    permission = " (permission %s)" % facts["app_permission"] if facts.get("app_permission") else ""
    return ["token kind:     %s, %s" % (facts["token_kind"], mode),
            "integration:    %s" % facts["integration_id"],
            "billed to:      %s%s" % (facts["payer"], permission),
            "token expires:  %s" % when]


def cmd_auth_status(config, args):
    """Exit 0 only when Copilot would take the credentials: an exchanged token proves it by
    the exchange, a token sent directly only by an answer from Copilot (its model list)."""
    with _session(config) as auth:
        print("state dir:      %s" % config.state_dir)
        try:
            token, source = auth.github_token()
        except AuthError as exc:
            print("GitHub:         no token: %s" % exc)
            return 1
        if not token:
            print("GitHub:         not logged in (run `%s`)" % auth.login_command())
            return 1
        if auth.app is not None:  # an installation token is no user's: GET /user refuses it
            login = "installation %s" % auth.app.installation_id
        else:
            try:
                login = auth.github_json("/user").get("login", "?")
            except AuthError as exc:
                login = "unknown (%s)" % exc
        print("GitHub:         %s (token from %s)" % (login, source))
        try:
            record = auth.copilot_token()
            if record.get("mode") == "direct":  # nothing was exchanged: does Copilot take it?
                models = auth.fetch_models()
        except (AuthError, UpstreamUnreachable) as exc:
            print("Copilot:        refused: %s" % exc)
            return 1
        print("\n".join(credential_lines(auth.describe(record))))  # a record: never empty
        if record.get("mode") == "direct":
            print("Copilot:        accepts the token (%d models)" % len(models))
        else:
            try:
                plan = auth.github_json("/copilot_internal/user").get("copilot_plan") or "?"
            except (AuthError, UpstreamUnreachable):
                plan = "?"
            print("Copilot plan:   %s (sku %s)" % (plan, record.get("sku", "?")))
        print("API base:       %s" % auth.api_base(record))
        return 0


def cmd_auth_logout(config, args):
    """Deletes the saved tokens only: a token from a flag, variable or file is the user's to
    unset, so they are told that it still applies."""
    store = TokenStore(config.state_dir)
    removed = store.clear()
    print("removed %s" % ", ".join(removed) if removed else "no saved login in %s" % store.auth_dir)
    source = token_source_before_login(config)
    if source:
        _say("note: %s is still set and will keep being used" % source)
    return 0


def cmd_auth_refresh(config, args):
    """A new Copilot token now, whatever the cached one's expiry: a cached token keeps what
    the account had when it was minted (its sku, its API endpoint) until it expires."""
    with _session(config) as auth:
        record = auth.copilot_token(force=True)
        print("new Copilot token valid for %s; API base %s" % (
            format_duration(record["expires_at"] - time.time()), auth.api_base(record)))
        return 0


def cmd_models(config, args):
    """Copilot's model list as this account sees it (it differs by plan and policy), with the
    --model-alias names a server with the same options would answer to."""
    with _session(config) as auth:
        entries = [copilot_model_to_openai(m) for m in auth.fetch_models()]
        if args.json:
            entries += [{"id": a, "object": "model", "owned_by": "coproxy-alias", "alias_of": t}
                        for a, t in sorted(config.model_aliases.items())]
            print(json.dumps({"object": "list", "data": entries}, indent=2))
            return 0
        rows = [("ID", "VENDOR", "CONTEXT", "OUTPUT", "TOOLS", "VISION")]
        for entry in entries:
            capabilities = entry["capabilities"]
            rows.append((entry["id"], entry["vendor"], str(entry["context_window"] or "-"),
                         str(entry["max_output_tokens"] or "-"),
                         "yes" if capabilities["tool_calls"] else "no",
                         "yes" if capabilities["vision"] else "no"))
        widths = [max(map(len, column)) for column in zip(*rows)]
        for row in rows:
            print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
        for alias, target in sorted(config.model_aliases.items()):
            print("alias %s -> %s" % (alias, target))
        return 0


def ask_running_server(config, path, url=None):
    """GET ``path`` from the coproxy serving from this state dir, at ``url`` when the caller has
    looked it up already (with the API key if one is configured); None when none runs or it
    does not answer."""
    url = url or running_instance(config, quiet=True)[1]
    if url is None:
        return None
    try:
        status, data, _ = get_from_coproxy(config, url + path)
    except UpstreamUnreachable:
        return None
    return data if status == 200 and isinstance(data, dict) else None


def get_from_coproxy(config, url, read_timeout=5):
    """(status, JSON, response) of a GET to a coproxy on this machine, with the API key when
    one is configured. Its own short-lived client: no proxy (the server is local, whatever
    HTTPS_PROXY says) and short timeouts (a command must not hang on a wedged server)."""
    client = UpstreamClient(connect_timeout=3, read_timeout=read_timeout, environ={})
    headers = {"Accept": "application/json"}
    if config.api_key:
        headers["Authorization"] = "Bearer " + config.api_key
    try:
        status, data, _, response = client.request_json("GET", url, headers)
        return status, data, response
    finally:
        client.close()


def cmd_stop(config, args):
    """SIGTERM to the recorded server, then wait for its drain (the grace period and 10 s for
    the rest). Only a pid that passes running_instance's checks is signalled: a stale pid file
    may name a process that is not ours."""
    pid, url = running_instance(config)
    if pid is None:
        print("coproxy is not running (no live coproxy recorded in %s)"
              % os.path.join(config.state_dir, PID_FILE))
        return 1
    os.kill(pid, signal.SIGTERM)  # graceful: in-flight requests get --shutdown-grace to finish
    deadline = time.monotonic() + config.shutdown_grace + 10
    while time.monotonic() < deadline and running_instance(config, quiet=True)[0] == pid:
        time.sleep(0.05)
    if running_instance(config, quiet=True)[0] == pid:
        print("coproxy (pid %d) has not stopped yet; check %s"
              % (pid, os.path.join(config.state_dir, LOG_FILE)))
        return 1
    print("stopped coproxy (pid %d, %s)" % (pid, url))
    return 0


def cmd_status(config, args):
    """What a running server says about itself (/healthz), for a person: exit 1 when none
    runs or it does not answer."""
    pid, url = running_instance(config)
    if pid is None:
        print("coproxy is not running")
        return 1
    started = os.path.getmtime(os.path.join(config.state_dir, PID_FILE))
    print("running:  pid %d, %s, up %s" % (pid, url, format_duration(time.time() - started)))
    health = ask_running_server(config, "/healthz", url)
    if health is None:
        print("health:   /healthz did not answer; see %s"
              % os.path.join(config.state_dir, LOG_FILE))
        return 1
    if "auth" not in health:  # /healthz tells details only to callers with the server's API key
        print("details: this coproxy has an API key and none was given here (or another one): set "
              "GHCP_PROXY_API_KEY to the server's key to see its login and upstream state")
        return 0
    auth = get_typed(health, "auth", dict, {})
    print("auth:     %s" % ("ready" if auth.get("ready") else "not ready: %s" % (
        auth.get("error") or ("no GitHub login" if not auth.get("github_token")
                              else "no Copilot token yet"))))
    facts = get_typed(auth, "credentials", dict, {})
    for line in credential_lines(facts) if facts.get("token_kind") else []:
        print(line)
    upstream = get_typed(health, "upstream", dict, {})
    print("upstream: " + ("no request sent to Copilot yet" if upstream.get("ok") is None
                          else "the last request to Copilot succeeded" if upstream["ok"]
                          else "the last request to Copilot failed (%s): %s"
                          % (upstream.get("class"), upstream.get("message"))))
    return 0


def _quote_systemd(arg, command=False):
    """One word of a unit file: ``%`` doubled (systemd expands specifiers such as %h everywhere),
    ``$`` doubled in a ``command`` line (ExecStart= expands $VAR), quoted when it holds a space,
    a quote, a backslash or a semicolon."""
    arg = arg.replace("%", "%%")
    if command:
        arg = arg.replace("$", "$$")
    if not re.search(r'[\s"\\\';]', arg):
        return arg
    return '"%s"' % arg.replace("\\", "\\\\").replace('"', '\\"')


def _env_line(name, value):
    """NAME=value for an environment file read by systemd and by a POSIX shell alike."""
    if "\n" in value or "'" in value or "\r" in value:
        raise UsageError("%s holds a line break or a single quote, which no environment file "
                         "can carry" % name)
    plain = re.match(r"^[A-Za-z0-9_@%+=:,./-]*$", value)
    return "%s=%s" % (name, value if plain else "'%s'" % value)


def cmd_service(config, args):
    """Print a service definition for this exact configuration: every setting that differs from
    its default (flags and environment variables alike), the proxy and TLS variables, and the
    secrets in a 0600 environment file next to the tokens, never in the unit itself."""
    if args.kind is None:
        raise UsageError("service needs a kind: `python3 coproxy.py service systemd` (Linux) or "
                         "`python3 coproxy.py service launchd` (macOS)")
    require_key_for_public_bind(config, "serve a service on")
    if not os.path.isdir(config.state_dir):
        _say("creating the state directory %s (0700): the service needs it to exist"
             % config.state_dir)
    secure_dir(config.state_dir)
    flags, secrets = settings_argv(config)
    argv = [sys.executable, os.path.abspath(__file__), "serve", "--no-auto-login"] + flags
    plain_env, secret_env = connection_environment(config.environ)
    secrets.update(secret_env)
    env_path = None
    if secrets:
        env_path = os.path.join(config.state_dir, SERVICE_ENV_FILE)
        write_file_atomic(env_path, "# secrets for the coproxy service (read by %s)\n" % args.kind
                          + "".join(_env_line(k, v) + "\n" for k, v in sorted(secrets.items())))
        _say("wrote %s (0600) with %s; the unit refers to it"
             % (env_path, ", ".join(sorted(secrets))))
    render = systemd_unit if args.kind == "systemd" else launchd_plist
    print("\n".join(render(config, argv, plain_env, env_path)))
    return 0


def systemd_unit(config, argv, plain_env, env_path):
    """The lines of a systemd user unit that runs ``argv``: ``plain_env`` in Environment=
    lines, the secrets through EnvironmentFile= ``env_path``, and the sandboxing a user service
    can have (the server needs no more than its state dir and the network)."""
    lines = ["# coproxy as a systemd user service. Install:",
             "#   python3 coproxy.py service systemd [your serve options]"
             " > ~/.config/systemd/user/coproxy.service",
             "#   systemctl --user daemon-reload && systemctl --user enable --now coproxy",
             "#   journalctl --user -u coproxy -f",
             "[Unit]", "Description=coproxy: GitHub Copilot as a local OpenAI/Anthropic API",
             "After=network-online.target", "Wants=network-online.target", "",
             "[Service]", "Type=simple",
             "ExecStart=" + " ".join(_quote_systemd(a, command=True) for a in argv),
             "Restart=on-failure", "RestartSec=5", "KillSignal=SIGTERM",
             "TimeoutStopSec=%d" % int(config.shutdown_grace + 5)]
    lines += ["Environment=%s" % _quote_systemd("%s=%s" % kv) for kv in sorted(plain_env.items())]
    if env_path:
        lines.append("EnvironmentFile=%s" % _quote_systemd(env_path))
    # PrivateTmp gives the service an empty /tmp and /var/tmp of its own: a file it needs there
    # (this script, tried out from a download in /tmp, or the state dir or CA bundle) would vanish.
    needed = [sys.executable, os.path.abspath(__file__), config.state_dir, config.ca_file,
              config.github_token_file, config.github_app_key_file] + [
        config.environ.get(name) for name in ("SSL_CERT_FILE", "SSL_CERT_DIR")]
    in_tmp = sorted({path for path in needed
                     if path and re.match(r"^/(var/)?tmp(/|$)", os.path.realpath(path))})
    if in_tmp:
        one = len(in_tmp) == 1
        _say("note: %s %s under /tmp, which PrivateTmp=yes would hide from the service; the unit "
             "leaves PrivateTmp off. Move %s out of /tmp to keep it"
             % (", ".join(in_tmp), "is" if one else "are", "it" if one else "them"))
        private_tmp = ["# PrivateTmp=yes left off: the service needs %s" % ", ".join(in_tmp)]
    else:
        private_tmp = ["PrivateTmp=yes"]
    lines += ["# hardening: no new privileges, read-only system and home except the state "
              "directory", "NoNewPrivileges=yes", "UMask=0077"] + private_tmp + [
              "ProtectSystem=strict",
              "ProtectHome=read-only", "ReadWritePaths=%s" % _quote_systemd(config.state_dir),
              "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX", "RestrictRealtime=yes",
              "RestrictSUIDSGID=yes", "LockPersonality=yes", "SystemCallArchitectures=native", "",
              "[Install]", "WantedBy=default.target"]
    return lines


def launchd_plist(config, argv, plain_env, env_path):
    """The lines of a launchd agent's plist that runs ``argv``. launchd has no environment
    file: with secrets, a shell loads ``env_path`` and then becomes coproxy (exec)."""
    def escape(text):  # XML's three, as a plist string needs them
        return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    if env_path:
        argv = ["/bin/sh", "-c", 'set -a && . "$0" && set +a && exec "$@"', env_path] + argv
    log_path = os.path.join(config.state_dir, LOG_FILE)
    lines = ['<?xml version="1.0" encoding="UTF-8"?>',
             "<!-- coproxy as a launchd agent. Install:",
             "       python3 coproxy.py service launchd [your serve options]"
             " > ~/Library/LaunchAgents/com.github.coproxy.plist",
             "       launchctl load -w ~/Library/LaunchAgents/com.github.coproxy.plist -->",
             '<!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST 1.0//EN"'
             ' "http://www.apple.com/DTDs/PropertyList-1.0.dtd">',
             '<plist version="1.0">', "<dict>",
             "  <key>Label</key><string>com.github.coproxy</string>",
             "  <key>ProgramArguments</key>", "  <array>"]
    lines += ["    <string>%s</string>" % escape(a) for a in argv]
    lines += ["  </array>", "  <key>RunAtLoad</key><true/>",
              "  <key>KeepAlive</key><dict><key>SuccessfulExit</key><false/></dict>",
              "  <key>ProcessType</key><string>Background</string>",
              "  <key>StandardOutPath</key><string>%s</string>" % escape(log_path),
              "  <key>StandardErrorPath</key><string>%s</string>" % escape(log_path)]
    if plain_env:
        lines += (["  <key>EnvironmentVariables</key><dict>"]
                  + ["    <key>%s</key><string>%s</string>" % (escape(k), escape(v))
                     for k, v in sorted(plain_env.items())] + ["  </dict>"])
    lines += ["</dict>", "</plist>"]
    return lines


def _describe_bucket(bucket, reset, unit):
    """One quota of summarize_quota as `usage` prints it: ``12 used of 300 requests, 288 left
    (96.0% left), resets 2026-12-31``; any part GitHub did not report is left out."""
    if bucket is None:
        return "not reported"
    if bucket["unlimited"]:
        return "unlimited"
    percent, over = bucket.get("percent_remaining"), bucket.get("overage_count")
    return "".join([
        "%s used" % ("?" if bucket["used"] is None else "%g" % bucket["used"]),
        " of %g %s" % (bucket["entitlement"], unit) if bucket["entitlement"] is not None else "",
        ", %g left" % bucket["remaining"] if bucket["remaining"] is not None else "",
        " (%.1f%% left)" % percent if percent is not None else "",
        ", %s over quota" % over if over else "",
        ", resets %s" % reset[:10] if reset else ""])


def _describe_window(window):
    """A rate-limit window (5-hour session, weekly) as a running server last saw it in
    Copilot's answers; GitHub's account API does not report them."""
    if not isinstance(window, dict):
        return "not seen yet (a running coproxy reports it after a request)"
    resets = window.get("resets_at")
    return "%.1f%% left%s" % (window.get("percent_remaining") or 0,
                              ", resets %s" % resets if resets else "")


def text_bars(rows, width=32, encoding=None):
    """[(label, value, note)] as lines of a bar chart, bars scaled to the largest value; eighths
    of a block where the terminal (``encoding``: stdout's) can show them, # where it cannot."""
    try:
        "\u2588\u258f".encode(encoding or getattr(sys.stdout, "encoding", None) or "ascii")
        full, parts = "\u2588", " \u258f\u258e\u258d\u258c\u258b\u258a\u2589"
    except (UnicodeEncodeError, LookupError):
        full, parts = "#", " " * 8
    top = max([value for _, value, _ in rows] + [0]) or 1
    lines = []
    for label, value, note in rows:
        blocks, eighths = divmod(int(round(value / top * width * 8)), 8)
        bar = full * blocks + parts[eighths]  # parts[0] is a space, as the padding after it
        lines.append("  %s  %s  %s" % (label, bar.ljust(width + 1), note))
    return lines


def history_lines(ledger, now, billing, days=7):
    """``usage``'s history part: the cost per day of the last ``days`` days as a text chart, then
    the top models and agent sessions of those days."""
    # what the plan bills by: AI credits (token-billed plans) or premium requests
    metric, unit = (("credits", "AI credits") if billing == "tokens"
                    else ("premium", "premium requests"))
    rows = []
    for day in ledger.by_day(now, days):
        spent = sum(t[metric] for t in day["models"].values())
        requests = sum(t["requests"] for t in day["models"].values())
        label = time.strftime("%m-%d %a", time.strptime(day["day"], "%Y-%m-%d"))
        rows.append((label, spent, "%8.2f  (%d requests)" % (spent, requests)))
    lines = ["last %d days, %s per day:" % (days, unit)] + text_bars(rows)
    since = now - days * 86400
    models = sorted(ledger.by_model(now, since).items(),
                    key=lambda item: (-item[1][metric], item[0]))
    if models:
        lines.append("top models:")
        lines += ["  %-28s %9.2f  %6d requests, %s tokens" % (
            model, t[metric], t["requests"], "{:,}".format(t["input"] + t["output"]))
            for model, t in models[:5]]
    sessions = sorted(ledger.by_session(since, limit=HISTORY_MAX_SESSIONS),
                      key=lambda session: -session[metric])

    def minute(t):
        return time.strftime("%m-%d %H:%M", time.localtime(t))
    if sessions:
        lines.append("top sessions:")
        lines += ["  %-14s %9.2f  %6d requests, %s to %s  %s" % (
            session["id"][:14], session[metric], session["requests"], minute(session["first"]),
            minute(session["last"]), (session.get("client") or "")[:40])
            for session in sessions[:5]]
    return lines


def cmd_usage(config, args):
    """The account's quotas from GitHub, the rate-limit windows only a running coproxy has
    seen (in Copilot's answers), and the history read from disk: it works with no server."""
    with _session(config) as auth:
        summary = summarize_quota(auth.github_json("/copilot_internal/user"))
        # not every account's answer names the login; /user does, as `auth status` shows
        if not summary["login"]:
            with contextlib.suppress(AuthError, UpstreamUnreachable):
                summary["login"] = get_typed(auth.github_json("/user"), "login", str)
    served = ask_running_server(config, "/usage") or {}
    windows = get_typed(served, "windows", dict, {})
    history, ledger, now = History(config.state_dir), Ledger(), time.time()
    history.load(ledger, now, days=7, prune=False)
    if args.json:
        week = {"days": ledger.by_day(now, 7), "models": ledger.by_model(now, now - 7 * 86400),
                "sessions": ledger.by_session(now - 7 * 86400)}
        print(json.dumps(dict(summary, windows=windows, history=week), indent=2))
        return 0
    print("account:           %s" % (summary["login"] or "?"))
    # what the plan bills by: AI credits (token-billed plans) or premium requests
    label, bucket, unit = (("AI credits", "credits", "credits") if summary["billing"] == "tokens"
                           else ("premium requests", "premium_requests", "requests"))
    print("plan:              %s (sku %s), billed by %s"
          % (summary["plan"] or "?", summary["sku"] or "?", label))
    print("%-19s%s" % (label + ":", _describe_bucket(summary[bucket], summary["reset_date"], unit)))
    print("chat:              %s" % _describe_bucket(summary["chat"], None, "messages"))
    print("completions:       %s" % _describe_bucket(summary["completions"], None, "completions"))
    print("5-hour session:    %s" % _describe_window(windows.get("session")))
    print("weekly:            %s" % _describe_window(windows.get("weekly")))
    since = get_typed(served, "since_start", dict)
    if since:
        print("this coproxy:      %d requests, %g AI credits, %g premium requests since it "
              "started" % (since.get("requests", 0), since.get("credits", 0),
                           since.get("premium_requests", 0)))
    if history.days():
        print("\n".join(history_lines(ledger, now, summary["billing"])))
    else:
        print("history:           none yet in %s (serve keeps one unless --no-history)"
              % history.dir)
    return 0


def claude_code_environment(config, model_ids, main_model, base_url):
    """(name, value) pairs that make Claude Code talk to the coproxy at ``base_url``, models
    from the live catalog: the main one asked for (else the newest Sonnet), and the newest of
    each family for Claude Code's opus/sonnet/haiku choices."""
    opus, sonnet, haiku = (resolve_model(family, model_ids)
                           for family in ("opus", "sonnet", "haiku"))
    if main_model:
        main = resolve_model(main_model, model_ids) or main_model
    else:
        main = sonnet or opus or (model_ids or [None])[0]
    # Anthropic's spelling, which Claude Code reads right (see anthropic_model_id)
    opus, sonnet, haiku, main = (anthropic_model_id(m) if m else m
                                 for m in (opus, sonnet, haiku, main))
    pairs = [("ANTHROPIC_BASE_URL", local_url(base_url)),
             ("ANTHROPIC_AUTH_TOKEN", config.api_key or "coproxy"),
             ("ANTHROPIC_MODEL", main), ("ANTHROPIC_DEFAULT_OPUS_MODEL", opus),
             ("ANTHROPIC_DEFAULT_SONNET_MODEL", sonnet),
             ("ANTHROPIC_DEFAULT_HAIKU_MODEL", haiku or main),
             # the attribution line changes every turn and would defeat prompt caching
             ("CLAUDE_CODE_ATTRIBUTION_HEADER", "0"),
             # no telemetry or error reports to Anthropic; not
             # CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC, which also turns the model discovery
             # below off (seen in Claude Code 2.1.197)
             ("DISABLE_TELEMETRY", "1"), ("DISABLE_ERROR_REPORTING", "1"),
             # /model then lists the catalogue's Claude models, read from GET /v1/models (2.1.126+)
             ("CLAUDE_CODE_ENABLE_GATEWAY_MODEL_DISCOVERY", "1")]
    return [(name, value) for name, value in pairs if value]


def claude_code_target(config):
    """The coproxy Claude Code should use: --host/--port (or their variables) when given, else
    the one serving from this state dir (it may have picked its port), else the default."""
    given = "host" in config.sources or "port" in config.sources
    return ((not given and running_instance(config, quiet=True)[1])
            or http_url(config.host, config.port))


def catalogue_from_coproxy(config, url):
    """(chat model ids, its --model-alias names, None) from the coproxy at ``url``, which knows the
    live catalogue, or (None, None, why not). A coproxy serving its built-in fallback list does not
    know it either."""
    url = local_url(url)
    try:
        status, data, response = get_from_coproxy(config, url + "/v1/models", read_timeout=10)
    except UpstreamUnreachable as exc:
        detail = "" if exc.kind == "refused" else " (%s)" % exc
        return None, None, "no coproxy answers at %s%s" % (url, detail)
    if status == 401:  # Claude Code would get the same refusal on every request
        given = "none" if not config.api_key else config.source_of("api_key")
        raise CoproxyError("the coproxy at %s refuses the key given to claude-code (%s): give it "
                           "the key serve was started with (--api-key, or COPROXY_API_KEY / "
                           "GHCP_PROXY_API_KEY)" % (url, given))
    if status != 200 or get_typed(data, "data", list) is None:
        message = _dig(data, "error").get("message")
        return None, None, "the coproxy at %s answered %d%s" % (
            url, status, ": %s" % message if message else "")
    if response.header("x-coproxy-models-source") == "fallback":
        return None, None, ("the coproxy at %s cannot read the catalogue from GitHub either (its "
                            "log says why)" % url)
    entries = [m for m in data["data"] if get_typed(m, "id", str) is not None]
    aliases = [m["id"] for m in entries if m.get("owned_by") == "coproxy-alias"]
    chat = [m["id"] for m in entries
            if m.get("type", "chat") == "chat" and m.get("owned_by") != "coproxy-alias"]
    return chat, aliases, None


def cmd_claude_code(config, args):
    """Models from the running coproxy, else from GitHub; with neither, no models at all: names
    that may not exist on this account would only make Claude Code fail later, with 404s."""
    url = claude_code_target(config)
    # The running coproxy knows the live catalogue and its --model-alias names; GitHub knows
    # only the catalogue, so falling back to it is said (the note below).
    ids, aliases, problem = catalogue_from_coproxy(config, url)
    if ids is None:
        with _session(config) as auth:
            try:
                models = auth.fetch_models()
            except (AuthError, UpstreamUnreachable) as exc:
                raise CoproxyError("cannot learn your Copilot model catalogue, so no settings are "
                                   "printed: %s; and GitHub: %s. Start coproxy (`python3 "
                                   "coproxy.py serve`), then run claude-code as its banner prints "
                                   "it (the same --state-dir, --port, --ca-file ...)"
                                   % (problem, exc))
        ids = [m["id"] for m in models
               if (_dig(m, "capabilities").get("type") or "chat") == "chat"]
        aliases = []
        _say("note: %s; the models are from GitHub. Start coproxy there before running claude"
             % problem)
    if args.model and args.model not in aliases and resolve_model(args.model, ids) is None:
        import difflib  # only for this message
        close = difflib.get_close_matches(args.model, ids, n=3, cutoff=0.4)
        hint = "; did you mean %s?" % ", ".join(close) if close else ""
        raise CoproxyError("--model %s is not in your Copilot catalogue%s, so Claude Code would "
                           "get 404s (`python3 coproxy.py models` lists the ids)"
                           % (args.model, hint))
    import shlex  # this command only
    for name, value in claude_code_environment(config, ids, args.model, url):
        if args.shell == "fish":
            print("set -gx %s %s" % (name, shlex.quote(value)))
        elif args.shell == "powershell":
            # PowerShell's escape character is the backtick; "$" would expand a variable
            quoted = value.replace("`", "``").replace('"', '`"').replace("$", "`$")
            print('$env:%s = "%s"' % (name, quoted))
        else:
            print("export %s=%s" % (name, shlex.quote(value)))
    return 0


#: (command, auth action) -> what runs it; each returns the exit code.
COMMANDS = {("serve", None): cmd_serve, ("claude-code", None): cmd_claude_code,
            ("usage", None): cmd_usage,
            ("stop", None): cmd_stop, ("status", None): cmd_status, ("service", None): cmd_service,
            ("auth", "login"): cmd_auth_login, ("auth", "status"): cmd_auth_status,
            ("auth", "logout"): cmd_auth_logout, ("auth", "refresh"): cmd_auth_refresh,
            ("models", None): cmd_models}


# ------------------------------------------------------------------------------------------
# 15. Entry
#     Parse, configure logging, dispatch. Domain errors become one ``coproxy: error:`` line
#     and exit 1; usage errors exit 2; Ctrl-C exits 130. Tracebacks only at --log-level debug.
# ------------------------------------------------------------------------------------------

def setup_logging(config, command):
    """One handler on stderr for the ``coproxy`` loggers: info for serve, warnings otherwise."""
    level = (config.log_level or ("info" if command == "serve" else "warning")).upper()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogFormatter(json_lines=config.log_format == "json"))
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False
    # "listening on" is shown at any level: a server quiet at warning still says where it is
    logging.getLogger("coproxy.announce").setLevel(logging.INFO)
    return level


def _flush_stdout():
    """Flush what the command printed. A reader that has gone (`models | head -c 5`) has what it
    wanted: stdout then points at the null device, so no later write (the interpreter's own flush
    at exit included) reports the closed pipe."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        with contextlib.suppress(Exception):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def main(argv=None):
    """The command line: exit 0 on success, 1 on an error of ours (one ``coproxy: error:``
    line, redacted), 2 on a usage error, 130 on Ctrl-C. An unexpected exception is one line
    too, unless --log-level debug asks for the traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = False
    try:
        # Only the named command's parser is built when the first word names one (see
        # build_parser); a shared flag before the command builds them all.
        parser = build_parser(argv[0] if argv and argv[0] in {name for name, _ in COMMANDS}
                              else None)
        parser.argv = argv
        args, extra = parser.parse_known_args(argv)
        command = (args.command, getattr(args, "auth_command", None))
        if extra:
            raise parser.unrecognized([name for name in command if name], extra)
        if command not in COMMANDS:
            if args.command is None:
                parser.print_help(sys.stderr)
            else:
                parser.parse_args([args.command, "--help"])
            return 2
        config = Config.resolve({o.dest: getattr(args, o.dest) for o in OPTIONS
                                 if hasattr(args, o.dest)})
        debug = setup_logging(config, args.command) == "DEBUG"
        for warning in config.warnings:
            log.warning("%s", warning)
        return COMMANDS[command](config, args)
    except BrokenPipeError:  # mid-command: the output outgrew the pipe's buffer, its reader gone
        return 0
    except CoproxyError as exc:
        _say("coproxy: error: %s" % redact(exc))
        return 2 if isinstance(exc, UsageError) else 1
    except KeyboardInterrupt:
        _say("interrupted")
        return 130
    except Exception as exc:
        if debug:
            raise
        _say("coproxy: error: unexpected %s: %s (run with --log-level debug for details)" % (
            exc.__class__.__name__, redact(exc)))
        return 1
    finally:  # whatever ended the command (--help and --version leave by SystemExit)
        _flush_stdout()


if __name__ == "__main__":
    sys.exit(main())
