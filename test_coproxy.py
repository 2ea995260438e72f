#!/usr/bin/env python3
"""Tests for coproxy.py: ``python3 test_coproxy.py`` (``-v`` lists each test, ``-k PATTERN`` picks).

Everything runs over real sockets on 127.0.0.1: the real coproxy server and, written here, a
fake GitHub + Copilot upstream (plain HTTP and TLS, with a test CA embedded below), a fake
CONNECT proxy and a raw scripted upstream for framing edge cases. Nothing reaches the network.
Needs only the standard library; the optional checks with the official ``openai``,
``anthropic`` and ``ollama`` clients run when they are importable (``.ci/run`` installs them in a
throwaway venv), and the dashboard's test in headless Chromium when ``playwright`` and a
``chromium`` are there. The everyday run takes 17-19 s (10-12 s of CPU) on 2 cores; keep it < 20:
await events, shorten a timer through its option rather than wait it out, run a command
in-process (main_in_process) unless it needs a process of its own, and start those as
COPROXY_MODULE. The last line printed is ``N passed, N failed, N skipped``. Variables:
``TEST_COPROXY_FUZZ=full`` gives the fuzz tests their full counts (.ci/run sets it);
``TEST_COPROXY_SCREENSHOTS=DIR`` keeps the browser test's screenshots (README's picture).
``python3 test_coproxy.py --bench`` prints the performance figures instead (Linux: CPU and
memory from /proc); its code is the marked section at the end of this file.

Where each feature is tested (classes in coproxy.py's section order, so a failure points at one):
  options, variables, state files, history .. TestConfig, TestTokenStore, TestHistory
  redaction, JSON bounds, compressed bodies . TestUtilities, TestBodies
  field types checked (400, never a crash) .. TestFieldChecks
  upstream client: pool, retries, framing .... TestUpstreamClient, TestUpstreamFraming
  TLS, CA file, HTTPS proxies (CONNECT) ...... TestUpstreamTLS, TestEndToEndTLS
  image URLs (public addresses only) ......... TestImageFetcher, TestImageURLs, TestTrust
  GitHub login, Copilot token, token kinds ... TestDeviceFlow, TestCopilotAuth, TestTokenKinds,
                                               TestTokensEndToEnd
  GitHub App (organisation billing) .......... TestRS256, TestGitHubApp
  the auto model ............................. TestAutoSession, TestAutoModel
  Chat Completions <-> Messages, streams ..... TestSSECodec, TestTranslateOpenAI,
                                               TestTranslateAnthropic, TestStreamEnds
  Responses for every model, Codex ........... TestTranslateResponses, TestResponsesForEveryModel,
                                               TestCodex
  fitting requests to each model ............. TestModelQuirks, TestGeminiSchemas
  usage, cost, credits, upstream limits ...... TestUsageAndCost, TestUpstreamVerdicts,
                                               TestCostAndLimits
  Ollama API ................................. TestTranslateOllama, TestOllamaAPI
  worker threads, the stream hub ............. TestWorkerPool, TestStreamHub
  our HTTP/1.1 server ........................ TestRequestParsing, TestServerFraming
  OpenAI routes end to end ................... TestEndToEnd, TestOpenAISurface
  Anthropic routes end to end ................ TestAnthropicEndToEnd
  Host/Origin/key guard, CORS, aliases ....... TestTrust, TestOperations
  rate limit, metrics ........................ TestOperations
  load, churned connections, leaving clients . TestLoadWithChurn
  hostile clients, fuzzed bodies and answers . TestAbuse, TestFuzz
  dashboard and /usage views ................. TestDashboard, TestDashboardBrowser
  commands, exit codes, help ................. TestCLI
  serve -d, status, stop; service units ...... TestDaemon, TestService
  claude-code and the start banner ........... TestClaudeCodeCommand, TestClaudeCodeCatalogue
  Python versions, stdlib only, size limits .. TestPortability
  the official SDKs, answers' schemas ........ TestOpenAISDK, TestAnthropicSDK, TestOllamaSDK,
                                               TestSchemas
  the benchmark's verdicts ................... TestBenchJudging
"""
import ast
import asyncio
import base64
import collections
import contextlib
import copy
import http.client
import gc
import gzip
import http.server
import importlib
import io
import json
import logging
import math
import os
import pathlib
import plistlib
import py_compile
import queue
import random
import re
import select
import shlex
import shutil
import signal
import socket
import socketserver
import ssl
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import tokenize
import unittest
import weakref
import zlib

import coproxy

try:
    import openai
except ImportError:
    openai = None

try:
    import anthropic
except ImportError:
    anthropic = None

try:  # the dashboard's browser test (.ci/run installs playwright and chromium)
    sync_playwright = importlib.import_module("playwright.sync_api").sync_playwright
except ImportError:
    sync_playwright = None

try:  # the official Ollama client (by name: only openai, anthropic and httpx are imported plainly)
    ollama = importlib.import_module("ollama")
except ImportError:
    ollama = None

HERE = os.path.dirname(os.path.abspath(__file__))
COPROXY_PY = os.path.join(HERE, "coproxy.py")
#: coproxy as a process, the way most tests start one (with cwd=HERE and child_env); a few
#: start ``python3 coproxy.py`` itself, as the README says, and coproxy starts its background
#: server that way too.
COPROXY_MODULE = [sys.executable, "-m", "coproxy"]

# ------------------------------------------------------------------------------------------
# Wire constants: a throwaway test CA and a leaf for 127.0.0.1/localhost, valid to 2126.
# ------------------------------------------------------------------------------------------

TEST_CA_PEM = """-----BEGIN CERTIFICATE-----
MIIBejCCASCgAwIBAgIUJp+EaXSe6CjgN63dKRJCVx2AfXgwCgYIKoZIzj0EAwIw
GjEYMBYGA1UEAwwPY29wcm94eSB0ZXN0IENBMCAXDTI2MTEyMTExMDgxOVoYDzIx
MjYxMDI4MTEwODE5WjAaMRgwFgYDVQQDDA9jb3Byb3h5IHRlc3QgQ0EwWTATBgcq
hkjOPQIBBggqhkjOPQMBBwNCAATip2tkxQeMKaEotpKt3dgg1s2sPZK2RVr91d5u
93Qs86FjFOrRt5mPOOgevAhjSf3r8tplOOKARutAvPIZSqSUo0IwQDAPBgNVHRMB
Af8EBTADAQH/MA4GA1UdDwEB/wQEAwIBBjAdBgNVHQ4EFgQU3woAj/duNCTuESm3
txrkf2Snf3QwCgYIKoZIzj0EAwIDSAAwRQIhAKFHxwIwQyeCazJJIK7jlIV5nw5r
/cqlyKV6jd2jWCpiAiAbxVVnolY1JU6egaMd99FE3mvhEntDcqYuMUjPCOv0hg==
-----END CERTIFICATE-----
"""
TEST_LEAF_PEM = """-----BEGIN CERTIFICATE-----
MIIBxjCCAWugAwIBAgIUdlQ+8rtQFjPldjYQTDd5YjwMgeEwCgYIKoZIzj0EAwIw
GjEYMBYGA1UEAwwPY29wcm94eSB0ZXN0IENBMCAXDTI2MTEyMTExMDgxOVoYDzIx
MjYxMDI4MTEwODE5WjAUMRIwEAYDVQQDDAlsb2NhbGhvc3QwWTATBgcqhkjOPQIB
BggqhkjOPQMBBwNCAASKOU3LviZUhlyB3FI0gbUrrqu0LKyjs3AUvRKWgp5Wo51f
tO5hKUDzpzJaL6YXjze/O9HDgrSGc8jGUNNV5jBpo4GSMIGPMAwGA1UdEwEB/wQC
MAAwDgYDVR0PAQH/BAQDAgWgMBMGA1UdJQQMMAoGCCsGAQUFBwMBMBoGA1UdEQQT
MBGHBH8AAAGCCWxvY2FsaG9zdDAdBgNVHQ4EFgQU/icoGpKuddXozqh8Ls4AnAEJ
34swHwYDVR0jBBgwFoAU3woAj/duNCTuESm3txrkf2Snf3QwCgYIKoZIzj0EAwID
SQAwRgIhAPx38vp8xSBxR8nIyPhYVj9Iqoplnx7BN13YAZzcuVwVAiEA6aTC089O
m3KaI2NDKdxWcjJx7TMufHsG3PyNi2WSNuM=
-----END CERTIFICATE-----
"""
TEST_LEAF_KEY = """-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgz80+Jbn9xnKdVJ3+
FYw4Il9Pp6InW91jCQ0z2clEJ3OhRANCAASKOU3LviZUhlyB3FI0gbUrrqu0LKyj
s3AUvRKWgp5Wo51ftO5hKUDzpzJaL6YXjze/O9HDgrSGc8jGUNNV5jBp
-----END PRIVATE KEY-----
"""

CATALOG = [
    {"id": "gpt-4.1", "name": "GPT-4.1", "vendor": "Azure OpenAI", "object": "model",
     "billing": {"token_prices": {"batch_size": 1000000, "default": {"input_price": 200, "cache_price": 50,
                                                                      "output_price": 800}}},
     "capabilities": {"type": "chat", "family": "gpt-4.1",
                      "limits": {"max_context_window_tokens": 128000, "max_output_tokens": 16384},
                      "supports": {"tool_calls": True, "vision": True, "streaming": True}}},
    {"id": "claude-sonnet-4.5", "name": "Claude Sonnet 4.5", "vendor": "Anthropic", "object": "model",
     "supported_endpoints": ["/chat/completions", "/v1/messages"], "billing": {"multiplier": 1},
     "capabilities": {"type": "chat",
                      "limits": {"max_context_window_tokens": 200000, "max_output_tokens": 32000},
                      "supports": {"tool_calls": True, "vision": True, "streaming": True,
                                   "reasoning_effort": ["low", "medium", "high"]}}},
    {"id": "gpt-4.1", "name": "GPT-4.1 (duplicate entry)", "vendor": "Azure OpenAI"},
    {"id": "claude-haiku-4.5", "name": "Claude Haiku 4.5", "vendor": "Anthropic", "supported_endpoints": ["/chat/completions"],
     "capabilities": {"type": "chat", "limits": {"max_output_tokens": 8000},
                      "supports": {"tool_calls": True, "vision": True, "min_thinking_budget": 1024,
                                   "max_thinking_budget": 4000}}},
    {"id": "claude-opus-4.6", "name": "Claude Opus 4.6", "vendor": "Anthropic",
     "supported_endpoints": ["/chat/completions", "/v1/messages"], "capabilities": {"type": "chat"}},
    {"id": "gpt-5.1-codex", "name": "GPT-5.1-Codex", "vendor": "OpenAI",
     "supported_endpoints": ["/responses", "ws:/responses"],
     "billing": {"multiplier": 1}, "capabilities": {"type": "chat", "supports": {
         "tool_calls": True, "vision": True, "reasoning_effort": ["low", "medium", "high", "xhigh"]}}},
    {"id": "o3-mini", "name": "o3-mini", "vendor": "Azure OpenAI", "billing": {"multiplier": 0.33},
     "capabilities": {"type": "chat", "supports": {"tool_calls": True, "vision": False,
                                                   "reasoning_effort": ["low", "medium", "high"]}}},
    {"id": "gpt-5-mini", "name": "GPT-5 mini", "vendor": "Azure OpenAI", "billing": {"multiplier": 0},
     "capabilities": {"type": "chat", "supports": {"tool_calls": True, "vision": True}}},
    {"id": "text-embedding-3-small", "name": "Embedding", "vendor": "Azure OpenAI",
     "capabilities": {"type": "embeddings", "limits": {"max_inputs": 512}}},
]
CATALOG_IDS = ["gpt-4.1", "claude-sonnet-4.5", "claude-haiku-4.5", "claude-opus-4.6", "gpt-5.1-codex", "o3-mini",
               "gpt-5-mini", "text-embedding-3-small"]
#: /copilot_internal/user of a request-billed (annual) account and of a token-billed one
REQUEST_BILLED_USER = {
    "login": "octocat", "copilot_plan": "individual", "access_type_sku": "yearly_subscriber",
    "quota_reset_date_utc": "2026-12-01T00:00:00Z", "quota_snapshots": {
        "premium_interactions": {"entitlement": 300, "remaining": 135, "percent_remaining": 45.0,
                                 "unlimited": False, "overage_count": 0, "overage_permitted": False},
        "chat": {"entitlement": 0, "remaining": 0, "unlimited": True, "percent_remaining": 100.0}}}
TOKEN_BILLED_USER = {
    "login": "octocat", "copilot_plan": "individual_pro", "access_type_sku": "monthly_subscriber",
    "token_based_billing": True, "quota_reset_date_utc": "2026-12-01T00:00:00Z", "quota_snapshots": {
        "premium_interactions": {"entitlement": 1500, "remaining": 1377.5, "credits_used": 122.5,
                                 "percent_remaining": 91.8, "unlimited": False, "token_based_billing": True},
        "chat": {"entitlement": -1, "remaining": -1, "unlimited": False},
        "completions": {"entitlement": -1, "remaining": -1, "unlimited": False}}}


def _jwk_int(text):
    return int.from_bytes(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)), "big")


#: The RSA key of RFC 7515 Appendix A.2 (a JWK there), its JWS signing input and the exact
#: RS256 signature the RFC gives for it. The fake GitHub App is keyed with it too.
RFC7515_KEY = {name: _jwk_int(value) for name, value in dict(
    n="ofgWCuLjybRlzo0tZWJjNiuSfb4p4fAkd_wWJcyQoTbji9k0l8W26mPddxHmfHQp-Vaw-4qPCJrcS2mJPMEzP1Pt0Bm"
      "4d4QlL-yRT-SFd2lZS-pCgNMsD1W_YpRPEwOWvG6b32690r2jZ47soMZo9wGzjb_7OMg0LOL-bSf63kpaSHSXndS5z5"
      "rexMdbBYUsLA9e-KXBdQOS-UTo7WTBEMa2R2CapHg665xsmtdVMTBQY4uDZlxvb3qCo5ZwKh9kG4LT6_I5IhlJH7aGh"
      "yxXFvUK-DWNmoudF8NAco9_h9iaGNj8q2ethFkMLs91kzk2PAcDTW9gb54h4FRWyuXpoQ",
    e="AQAB",
    d="Eq5xpGnNCivDflJsRQBXHx1hdR1k6Ulwe2JZD50LpXyWPEAeP88vLNO97IjlA7_GQ5sLKMgvfTeXZx9SE-7YwVol2NX"
      "OoAJe46sui395IW_GO-pWJ1O0BkTGoVEn2bKVRUCgu-GjBVaYLU6f3l9kJfFNS3E0QbVdxzubSu3Mkqzjkn439X0M_V"
      "51gfpRLI9JYanrC4D4qAdGcopV_0ZHHzQlBjudU2QvXt4ehNYTCBr6XCLQUShb1juUO1ZdiYoFaFQT5Tw8bGUl_x_jT"
      "j3ccPDVZFD9pIuhLhBOneufuBiB4cS98l2SR_RQyGWSeWjnczT0QU91p1DhOVRuOopznQ",
    p="4BzEEOtIpmVdVEZNCqS7baC4crd0pqnRH_5IB3jw3bcxGn6QLvnEtfdUdiYrqBdss1l58BQ3KhooKeQTa9AB0Hw_Py5"
      "PJdTJNPY8cQn7ouZ2KKDcmnPGBY5t7yLc1QlQ5xHdwW1VhvKn-nXqhJTBgIPgtldC-KDV5z-y2XDwGUc",
    q="uQPEfgmVtjL0Uyyx88GZFF1fOunH3-7cepKmtH4pxhtCoHqpWmT8YAmZxaewHgHAjLYsp1ZSe7zFYHj7C6ul7TjeLQe"
      "ZD_YwD66t62wDmpe_HlB-TnBA-njbglfIsRLtXlnDzQkv5dTltRJ11BKBBypeeF6689rjcJIDEz9RWdc",
    dp="BwKfV3Akq5_MFZDFZCnW-wzl-CCo83WoZvnLQwCTeDv8uzluRSnm71I3QCLdhrqE2e9YkxvuxdBfpT_PI7Yz-FOKnu"
       "1R6HsJeDCjn12Sk3vmAktV2zb34MCdy7cpdTh_YVr7tss2u6vneTwrA86rZtu5Mbr1C1XsmvkxHQAdYo0",
    dq="h_96-mK1R_7glhsum81dZxjTnYynPbZpHziZjeeHcXYsXaaMwkOlODsWa7I9xXDoRwbKgB719rrmI2oKr6N3Do9U0a"
       "jaHF-NKJnwgjMd2w9cjz3_-kyNlxAr2v4IKhGNpmM5iIgOS1VZnOZ68m6_pbLBSp3nssTdlqvd0tIiTHU",
    qi="IYd7DHOhrWvxkwPQsRM2tOgrjbcrfvtQJipd-DlcxyVuuM9sQLdgjVk2oy26F0EmpScGLq2MowX7fhd_QJQ3ydy5cY"
       "7YIBi87w93IKLEdfnbJtoOPLUW0ITrJReOgo1cq9SbsxYawBgfp_gh6A5603k2-ZQwVK0JKSHuLFkuQ3U").items()}
RFC7515_SIGNING_INPUT = (
    b"eyJhbGciOiJSUzI1NiJ9.eyJpc3MiOiJqb2UiLA0KICJleHAiOjEzMDA4MTkzODAsDQogImh0dHA6Ly9leGFtcGxlLmN"
    b"vbS9pc19yb290Ijp0cnVlfQ")
RFC7515_SIGNATURE = (
    "cC4hiUPoj9Eetdgtv3hF80EGrhuB__dzERat0XF9g2VtQgr9PJbu3XOiZj5RZmh7AAuHIm4Bh-0Qc_lF5YKt_O8W2Fp5"
    "jujGbds9uJdbF9CUAr7t1dnZcAcQjbKBYNX4BAynRFdiuB--f_nZLgrnbyTyWzO75vRK5h6xBArLIARNPvkSjtQBMHlb"
    "1L07Qe7K0GarZRmB_eSN9383LcOLn6_dO--xi12jzDwusC-eOkHWEsqtFZESc6BfI7noOPqvhJ1phCnvWh6IeYI2w9QO"
    "YEUipUTI8np6LbgGY9Fs98rqVt5AXLIhWkWywlVmtVrBp0igcN_IoypGlUPQGe77Rw")


def der(tag, contents):
    """One DER element (the test writes its own keys to check coproxy's parser)."""
    size = len(contents)
    width = (size.bit_length() + 7) // 8
    length = bytes([size]) if size < 0x80 else bytes([0x80 | width]) + size.to_bytes(width, "big")
    return bytes([tag]) + length + contents


def rsa_key_pem(key, pkcs8=False):
    """The key as PEM: PKCS#1 (BEGIN RSA PRIVATE KEY) or PKCS#8 (BEGIN PRIVATE KEY)."""
    numbers = [0] + [key[name] for name in ("n", "e", "d", "p", "q", "dp", "dq", "qi")]
    integers = [der(0x02, v.to_bytes(v.bit_length() // 8 + 1, "big")) for v in numbers]
    body = der(0x30, b"".join(integers))
    label = "RSA PRIVATE KEY"
    if pkcs8:
        algorithm = der(0x30, der(0x06, bytes.fromhex("2a864886f70d010101")) + der(0x05, b""))
        body, label = der(0x30, der(0x02, b"\x00") + algorithm + der(0x04, body)), "PRIVATE KEY"
    text = base64.b64encode(body).decode()
    lines = [text[i:i + 64] for i in range(0, len(text), 64)]
    return "-----BEGIN %s-----\n%s\n-----END %s-----\n" % (label, "\n".join(lines), label)


def sse(obj):
    """One SSE event as the upstream sends it."""
    return b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n"


def chunk(content=None, finish=None, index=0, tool_calls=None, **extra):
    delta = {}
    if content is not None:
        delta["content"] = content
    if tool_calls is not None:
        delta["tool_calls"] = tool_calls
    body = {"id": "chatcmpl-up", "model": "gpt-4.1", "created": 1764500000,
            "choices": [{"index": index, "delta": delta, "finish_reason": finish}]}
    body.update(extra)
    return sse(body)


USAGE_CHUNK = sse({"id": "chatcmpl-up", "model": "gpt-4.1", "choices": [],
                   "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}})
COST_CHUNK = sse({"id": "chatcmpl-up", "model": "gpt-4.1", "choices": [],
                  "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
                  "copilot_usage": {"total_nano_aiu": 4500000000, "token_details": []}})
DONE = b"data: [DONE]\n\n"


def anthropic_event(name, data):
    return b"event: " + name.encode() + b"\ndata: " + json.dumps(data).encode() + b"\n\n"


def sse_events(body):
    """(event name, parsed data) pairs of an Anthropic- or Responses-style SSE body."""
    return [(name, json.loads(data)) for name, data in coproxy.SSEDecoder().feed(body + b"\n\n")]


def sse_data(body):
    """The data: payloads of an SSE body, parsed as JSON where they are JSON."""
    return [data if data == "[DONE]" else json.loads(data) for _, data in coproxy.SSEDecoder().feed(body + b"\n\n")]


PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4

# ------------------------------------------------------------------------------------------
# Fixtures: the fake upstream, the fake proxy, the proxy harness, HTTP helpers.
# ------------------------------------------------------------------------------------------


def stop_server(server):
    """shutdown() and close a socketserver whose serve_forever() runs in another thread, without
    waiting out its poll_interval: serve_forever looks for the request only when its select()
    returns, so connections to the listener wake it (50 ms saved per test, 10 s per run)."""
    stopper = threading.Thread(target=server.shutdown)
    stopper.start()
    while stopper.is_alive():
        with contextlib.suppress(OSError):
            socket.create_connection(server.server_address[:2], timeout=1).close()
        stopper.join(0.01)
    server.server_close()


_BYTECODE_WRITTEN = []


def child_env(base=None, **variables):
    """The environment for an interpreter that runs coproxy (COPROXY_MODULE, or ``-c "import
    coproxy"``): ``base`` (os.environ by default) and ``variables``, with coproxy.py on
    PYTHONPATH and its bytecode written beside it once a run (in __pycache__, as Python does
    wherever this environment's PYTHONDONTWRITEBYTECODE is not set). ``python3 coproxy.py``
    compiles the whole file at every start, more than half the CPU of a start; ``-m coproxy``
    runs the same file as __main__, with the same __file__ and argv[0], from that bytecode
    (0.09 s of CPU a start instead of 0.2 s). Start them with cwd=HERE: ``-m`` and ``-c`` look
    in the working directory first, where another coproxy.py may be."""
    if not _BYTECODE_WRITTEN:
        with contextlib.suppress(OSError):  # a read-only checkout: each child compiles, slower
            py_compile.compile(COPROXY_PY, doraise=True)
        _BYTECODE_WRITTEN.append(COPROXY_PY)
    env = dict(os.environ if base is None else base, **variables)
    env["PYTHONPATH"] = HERE
    return env


def wait_for(predicate, timeout=5.0):
    """Poll a cheap condition (for state set by another thread) until true or timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return predicate()


_TLS_SERVER_CONTEXT = []


def tls_server_context():
    """The fake servers' TLS context (the test leaf and its key), made once: 5 ms each time."""
    if not _TLS_SERVER_CONTEXT:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        with tempfile.TemporaryDirectory() as tmp:
            cert, key = os.path.join(tmp, "c.pem"), os.path.join(tmp, "k.pem")
            with open(cert, "w") as f:
                f.write(TEST_LEAF_PEM)
            with open(key, "w") as f:
                f.write(TEST_LEAF_KEY)
            context.load_cert_chain(cert, key)
        _TLS_SERVER_CONTEXT.append(context)
    return _TLS_SERVER_CONTEXT[0]


class FakeHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out as two writes: without this, a delayed ACK costs 40 ms

    def log_message(self, *args):
        pass

    def handle(self):
        try:
            super().handle()
        except (ConnectionError, ssl.SSLError):  # coproxy hung up first (a test of just that); nothing to report
            pass

    @property
    def fake(self):
        return self.server.fake

    def send_body(self, status, body, content_type, headers=()):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def end_headers(self):
        if getattr(self, "last_on_connection", False):  # FakeUpstream.churn: "Connection: close"
            self.send_header("Connection", "close")
        super().end_headers()

    def send_json(self, status, obj, headers=()):
        self.send_body(status, obj if isinstance(obj, bytes) else json.dumps(obj).encode(), "application/json", headers)

    def send_text(self, status, text, headers=()):
        # Copilot sends many errors as text/plain, JSON or not
        self.send_body(status, text.encode(), "text/plain; charset=utf-8", headers)

    def start_chunked(self, status=200, content_type="text/event-stream"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def write_chunk(self, data):
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def end_chunked(self):
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def wait_until_client_closes(self, timeout=5.0):
        """True once the peer (coproxy) has closed this connection."""
        sock = self.connection
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            readable, _, _ = select.select([sock], [], [], 0.02)
            if readable:
                try:
                    if not sock.recv(1, socket.MSG_PEEK):
                        return True
                except OSError:
                    return True
        return False

    def _dispatch(self, method):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        path = self.path.split("?")[0]
        with self.fake.lock:
            self.fake.requests.append((method, path, {k.lower(): v for k, v in self.headers.items()}, body))
        refusal = self.fake.copilot_refusal(path, self.headers) if path in COPILOT_PATHS else None
        if refusal is not None:
            status, answer = refusal
            (self.send_json if isinstance(answer, dict) else self.send_text)(status, answer)
            return
        route = self.fake.routes.get((method, path))
        if route is None:
            self.send_json(404, {"message": "Not Found"})
            return
        payload = json.loads(body) if body[:1] in (b"{", b"[") else body
        if path in ("/chat/completions", "/v1/messages", "/responses") and isinstance(payload, dict):
            # as Copilot: a model only on the endpoints its catalogue entry lists
            entry = next((m for m in CATALOG if m["id"] == payload.get("model")), {})
            if entry and path not in (entry.get("supported_endpoints") or ["/chat/completions"]):
                message = 'model "%s" is not accessible via the %s endpoint' % (entry["id"], path)
                self.send_json(400, {"error": {"message": message, "code": "unsupported_api_for_model"}})
                return
        route(self, payload)

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_HEAD(self):
        self._dispatch("HEAD")


#: Copilot API paths: the fake checks the bearer token and integration id on them as Copilot does.
COPILOT_PATHS = frozenset(["/models", "/chat/completions", "/v1/messages", "/responses",
                           "/embeddings", "/auto", "/models/session"])
#: The GitHub App the fake GitHub knows: its id, its installation on the organisation "acme".
FAKE_APP_ID, FAKE_INSTALLATION_ID = 4242, 77


def emsa_pkcs1_sha256(message, size):
    """EMSA-PKCS1-v1_5 of SHA-256(message), written out here to check coproxy's signatures."""
    import hashlib
    prefix = bytes.fromhex("3031300d060960864801650304020105000420")
    digest_info = prefix + hashlib.sha256(message).digest()
    return b"\x00\x01" + b"\xff" * (size - len(digest_info) - 3) + b"\x00" + digest_info


def b64url_decode(text):
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class FakeUpstream:
    """GitHub (device flow, /user, token exchange) and Copilot (/models, /chat/completions).

    Tests change ``routes`` or the scripted fields; every request is recorded in ``requests``."""

    def __init__(self, tls=False):
        self.lock = threading.Lock()
        self.requests = []
        self.exchanges = 0
        self.exchange_gate = None
        self.token_status = 200
        self.token_body = None
        self.token_lifetime = 1800
        self.refresh_in = 1500
        self.poll_answers = []
        self.chat_script = None
        self.client_closed = threading.Event()
        self.user = REQUEST_BILLED_USER
        self.answer_headers = []     # added to every JSON answer of /chat/completions, /v1/messages, /responses
        self.cost = None             # copilot_usage.total_nano_aiu put into those answers when set
        self.app_tokens = set()      # installation tokens minted here (Copilot takes them)
        self.mints = 0
        self.app_direct_refusal = None  # (status, answer) to every ghs_ token sent directly
        self.grant_new_permission_form = True
        self.jwt_claims = []         # the claims of every App JWT that was accepted
        self.mint_gate = None        # an Event a mint waits for (single-flight tests)
        self.auto_model = "claude-sonnet-4.5"  # what POST /auto and /models/session pick
        self.auto_calls = 0
        self.routes = {
            ("POST", "/login/device/code"): self.device_code,
            ("POST", "/login/oauth/access_token"): self.access_token,
            ("GET", "/user"): lambda h, b: h.send_json(200, {"login": "octocat", "id": 1}),
            ("GET", "/copilot_internal/v2/token"): self.token,
            ("GET", "/copilot_internal/user"): lambda h, b: h.send_json(200, self.user),
            ("GET", "/models"): lambda h, b: h.send_json(200, {"object": "list", "data": CATALOG}),
            ("POST", "/chat/completions"): self.chat,
            ("POST", "/v1/messages"): self.messages,
            ("POST", "/embeddings"): self.embeddings,
            ("POST", "/responses"): self.responses,
            ("GET", "/responses/resp_1"): lambda h, b: h.send_json(200, {"id": "resp_1", "object": "response",
                                                                         "status": "completed", "output": []}),
            ("GET", "/orgs/acme/installation"): self.installation,
            ("POST", "/app/installations/%d/access_tokens" % FAKE_INSTALLATION_ID): self.mint,
            ("POST", "/auto"): self.auto,
            ("POST", "/models/session"): self.models_session,
        }
        self.clock = time.time
        http.server.ThreadingHTTPServer.request_queue_size = 1024  # 50 concurrent connections in tests
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeHandler)
        self.httpd.daemon_threads = True
        self.httpd.fake = self
        if tls:
            self.httpd.socket = tls_server_context().wrap_socket(self.httpd.socket,
                                                                 server_side=True)
        self.port = self.httpd.server_address[1]
        self.url = "%s://127.0.0.1:%d" % ("https" if tls else "http", self.port)
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self):
        stop_server(self.httpd)

    def churn(self, path, seed):
        """Make the route for ``path`` end kept-alive connections at random, as servers and
        load balancers do: ``Connection: close`` after a few requests, a close after a short
        idle time, or a reset (RST, no TLS close_notify) after it."""
        route = self.routes[("POST", path)]
        rng = random.Random(seed)
        lock = threading.Lock()

        def churning(handler, payload):
            with lock:
                if not hasattr(handler, "requests_left"):
                    handler.requests_left = rng.randint(1, 6)
                idle, reset = rng.uniform(0.001, 0.03), rng.random() < 0.3
            handler.requests_left -= 1
            handler.last_on_connection = handler.requests_left <= 0
            route(handler, payload)
            handler.wfile.flush()
            if reset:
                handler.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            handler.connection.settimeout(idle)  # the wait for the next request: its end closes
        self.routes[("POST", path)] = churning

    def requests_to(self, path):
        with self.lock:
            return [r for r in self.requests if r[1] == path]

    # -- GitHub ------------------------------------------------------------------------------
    def device_code(self, handler, body):
        handler.send_json(200, {"device_code": "dc-123", "user_code": "ABCD-1234",
                                "verification_uri": "https://github.com/login/device",
                                "expires_in": 900, "interval": 5})

    def access_token(self, handler, body):
        with self.lock:
            answer = self.poll_answers.pop(0) if self.poll_answers else (200, {"error": "authorization_pending"})
        status, payload = answer
        if isinstance(payload, str):
            handler.send_text(status, payload)
        else:
            handler.send_json(status, payload)

    def token(self, handler, body):
        if handler.headers.get("Authorization", "").startswith("token github_pat_"):
            handler.send_json(403, {"message": "Resource not accessible by personal access token"})
            return
        with self.lock:
            self.exchanges += 1
            number = self.exchanges
        if self.exchange_gate is not None:
            self.exchange_gate.wait(5)
        if self.token_body is not None:
            handler.send_json(self.token_status, self.token_body)
            return
        expires = int(self.clock()) + self.token_lifetime
        handler.send_json(200, {
            "token": "tid=test%d;exp=%d;sku=monthly_subscriber;proxy-ep=proxy.example.test:mac" % (number, expires),
            "expires_at": expires, "refresh_in": self.refresh_in, "sku": "monthly_subscriber",
            "endpoints": {"api": self.url}})

    def app_jwt_refusal(self, handler):
        """Why the App JWT of this request is refused (GitHub's own words), or None: the RS256
        signature is checked against the App's public key, and the claims' times and issuer."""
        try:
            jwt = handler.headers.get("Authorization", "")[len("Bearer "):]
            header, claims, signature = jwt.split(".")
            size = (RFC7515_KEY["n"].bit_length() + 7) // 8
            number = int.from_bytes(b64url_decode(signature), "big")
            signed = pow(number, RFC7515_KEY["e"], RFC7515_KEY["n"]).to_bytes(size, "big")
            good = signed == emsa_pkcs1_sha256((header + "." + claims).encode(), size)
            alg = json.loads(b64url_decode(header))["alg"]
            claims = json.loads(b64url_decode(claims))
        except (ValueError, KeyError):
            return "A JSON web token could not be decoded"
        if not good or alg != "RS256":
            return "A JSON web token could not be decoded"
        now = self.clock()
        if claims["exp"] - claims["iat"] > 600 or claims["exp"] > now + 600:
            return "'Expiration time' claim ('exp') is too far in the future"
        if claims["iat"] > now or claims["exp"] <= now:
            return "'Issued at' claim ('iat') must be an Integer representing a time in the past"
        if claims["iss"] != FAKE_APP_ID:
            return "Integration not found"
        with self.lock:
            self.jwt_claims.append(claims)
        return None

    def refused_jwt(self, handler):
        """True after answering a refused App JWT as GitHub does (401; 404: unknown App)."""
        refusal = self.app_jwt_refusal(handler)
        if refusal:
            status = 404 if refusal == "Integration not found" else 401
            handler.send_json(status, {"message": refusal})
        return refusal is not None

    def installation(self, handler, body):
        if not self.refused_jwt(handler):
            handler.send_json(200, {"id": FAKE_INSTALLATION_ID, "account": {"login": "acme"},
                                    "app_id": FAKE_APP_ID})

    def mint(self, handler, body):
        if self.refused_jwt(handler):
            return
        if self.mint_gate is not None:
            self.mint_gate.wait(5)
        permissions = body.get("permissions", {})
        if "organization_copilot_requests" in permissions and not self.grant_new_permission_form:
            handler.send_json(422, {"message": "The permissions requested are not granted to this "
                                               "installation."})
            return
        with self.lock:
            self.mints += 1
            token = "ghs_minted%d_%s" % (self.mints, "x" * 40)  # longer than 40 since 2026-04
            self.app_tokens.add(token)
        expires = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.clock() + 3600))
        handler.send_json(201, {"token": token, "expires_at": expires, "permissions": permissions,
                                "repository_selection": "all"})

    # -- Copilot -----------------------------------------------------------------------------
    def copilot_refusal(self, path, headers):
        """(status, answer) Copilot gives to this bearer token and integration id, or None: PATs
        only with copilot-developer-cli and with their permission; App tokens only if minted here
        (and accepted directly); a narrow model list for unknown integration ids (chat only)."""
        token = headers.get("Authorization", "")[len("Bearer "):]
        integration = headers.get("Copilot-Integration-Id")
        if token.startswith("github_pat_"):
            if integration != "copilot-developer-cli":
                return 400, ("bad request: Personal Access Tokens are not supported for this "
                             "endpoint")
            if "noperm" in token:
                return 401, ("unauthorized: Personal Access Token does not have Copilot Requests "
                             "permission")
        elif token.startswith("ghs_"):
            if self.app_direct_refusal is not None:
                return self.app_direct_refusal
            if token not in self.app_tokens:
                return 401, "unauthorized: token expired"
        known = (None, "vscode-chat", "copilot-developer-cli")
        if path == "/chat/completions" and integration not in known:
            message = "The requested model is not supported for this integrator"
            code = "model_not_available_for_integrator"
            return 400, {"error": {"code": code, "message": message}}
        return None

    def auto(self, handler, body):
        version = handler.headers.get("X-GitHub-Api-Version", "")
        if version < "2026-08-01" or self.auto_model is None:
            handler.send_json(404, {"error": {"message": "invalid apiVersion"}})
            return
        with self.lock:
            self.auto_calls += 1
            number = self.auto_calls
        entry = next(m for m in CATALOG if m["id"] == self.auto_model)
        handler.send_json(200, {"session_token": "sess-%d" % number, "selected_model": entry,
                                "expires_at": int(self.clock()) + 86400, "hydra_scores": {}})

    def models_session(self, handler, body):
        if body.get("auto_mode") != {"model_hints": ["auto"]}:
            handler.send_json(400, {"message": "bad auto_mode"})
            return
        with self.lock:
            self.auto_calls += 1
            number = self.auto_calls
        handler.send_json(200, {"available_models": CATALOG_IDS, "selected_model": "gpt-4.1",
                                "expires_at": int(self.clock()) + 86400,
                                "discounted_costs": {"gpt-4.1": 0.9},
                                "session_token": "legacy-%d" % number})

    def answer(self, handler, body):
        """A JSON answer with the scripted extras: cost and headers."""
        if self.cost is not None:
            body["copilot_usage"] = {"total_nano_aiu": self.cost, "token_details": []}
        handler.send_json(200, body, self.answer_headers)

    def chat(self, handler, payload):
        if self.chat_script is not None:
            self.chat_script(handler, payload)
            return
        last = payload["messages"][-1].get("content")
        self.answer(handler, {"id": "chatcmpl-up", "model": payload["model"],
                                "choices": [{"index": 0, "finish_reason": "stop",
                                             "message": {"role": "assistant", "content": "echo: %s" % last,
                                                         "padding": "xxxx"}}],
                                "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}})

    def messages(self, handler, payload):
        if self.chat_script is not None:
            self.chat_script(handler, payload)
            return
        self.answer(handler, {"id": "msg_native", "type": "message", "role": "assistant", "model": payload["model"],
                                "content": [{"type": "text", "text": "native: %d messages" % len(payload["messages"])}],
                                "stop_reason": "end_turn", "stop_sequence": None,
                                "usage": {"input_tokens": 9, "output_tokens": 3}})

    def embeddings(self, handler, payload):
        vectors = [[0.5, -1.25, float(len(text))][:payload.get("dimensions", 3)] for text in payload["input"]]
        handler.send_json(200, {"object": "list", "model": payload["model"],
                                "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)],
                                "usage": {"prompt_tokens": 4, "total_tokens": 4}})

    def responses(self, handler, payload):
        if self.chat_script is not None:
            self.chat_script(handler, payload)
            return
        if payload.get("context_management"):  # a compaction request: Copilot returns the compacted history
            self.answer(handler, {"id": "resp_cmp", "object": "response", "created_at": 1700000001,
                                  "status": "completed", "model": payload["model"], "output": [
                                      {"id": "cmp_1", "type": "compaction", "encrypted_content": "ENC"},
                                      {"type": "message", "role": "assistant", "content": [
                                          {"type": "output_text", "text": "ok"}]}],
                                  "usage": {"input_tokens": 900, "output_tokens": 40}})
            return
        self.answer(handler, {"id": "resp_1", "object": "response", "created_at": 1700000000, "status": "completed",
                              "model": payload["model"], "output": [
                                    {"type": "reasoning", "id": "rs_1", "summary": []},
                                    {"type": "message", "role": "assistant", "content": [
                                        {"type": "output_text", "text": "codex says hi"}]}],
                                "usage": {"input_tokens": 11, "output_tokens": 4, "total_tokens": 15,
                                          "input_tokens_details": {"cached_tokens": 8}}})

    def stream(self, *items):
        """Script a streamed chat answer: bytes are chunks, an Event is a pause until it is set,
        'cut' closes the connection mid-answer, 'watch' waits for coproxy to hang up."""
        def script(handler, payload):
            handler.start_chunked()
            for item in items:
                if isinstance(item, bytes):
                    handler.write_chunk(item)
                elif isinstance(item, threading.Event):
                    item.wait(10)
                elif item == "cut":
                    handler.close_connection = True
                    handler.connection.shutdown(socket.SHUT_RDWR)
                    return
                elif item == "watch":
                    if handler.wait_until_client_closes():
                        self.client_closed.set()
                    handler.close_connection = True
                    return
            handler.end_chunked()
        self.chat_script = script
        return script


class FakeConnectProxy:
    """An HTTP proxy that only does CONNECT tunnels; records the targets it was asked for."""

    def __init__(self):
        self.targets = []
        self.auth_headers = []
        #: how to fail the next tunnels, one per CONNECT: "before_answer" hangs up instead of
        #: answering, "after_answer" answers 200 and then hangs up (in the TLS handshake)
        self.drops = []
        outer = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                head = b""
                while b"\r\n\r\n" not in head:
                    data = self.request.recv(4096)
                    if not data:
                        return
                    head += data
                lines = head.split(b"\r\n")
                method, target, _ = lines[0].decode().split(" ")
                outer.auth_headers.append([l.decode() for l in lines if l.lower().startswith(b"proxy-authorization")])
                if method != "CONNECT":
                    self.request.sendall(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
                    return
                outer.targets.append(target)
                drop = outer.drops.pop(0) if outer.drops else None
                if drop == "after_answer":
                    self.request.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                if drop:
                    return
                host, port = target.rsplit(":", 1)
                upstream = socket.create_connection((host, int(port)))
                self.request.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                sockets = [self.request, upstream]
                try:
                    while True:
                        readable, _, _ = select.select(sockets, [], [], 5)
                        if not readable:
                            return
                        for sock in readable:
                            data = sock.recv(65536)
                            if not data:
                                return
                            (upstream if sock is self.request else self.request).sendall(data)
                finally:
                    upstream.close()

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        stop_server(self.server)


class ScriptedUpstream:
    """A raw TCP upstream that answers each request with the next script: a list of bytes to
    send (each its own segment), Events to wait for, and "close". For framing edge cases that
    a well-behaved HTTP server never produces."""

    def __init__(self, test):
        self.scripts = queue.Queue()
        self.heads = []
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.url = "http://127.0.0.1:%d" % self.listener.getsockname()[1]
        self.accepted = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()
        test.addCleanup(self.close)

    def _serve(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._connection, args=(conn,), daemon=True).start()

    def _connection(self, conn):
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = b""
        with conn:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                head, buf = buf.split(b"\r\n\r\n", 1)
                length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
                need = int(length.group(1)) if length else 0
                while len(buf) < need:
                    buf += conn.recv(65536)
                buf = buf[need:]
                self.heads.append(head)
                for step in self.scripts.get(timeout=10):
                    if step == "close":
                        return
                    if isinstance(step, threading.Event):
                        step.wait(10)
                    else:
                        conn.sendall(step)

    def close(self):
        self.listener.close()


class LogCapture(logging.Handler):
    """Collects coproxy's (and asyncio's) log lines so tests can check them (and that no token
    is in them); ``failures()`` are the records of errors and tracebacks."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.clear()

    def clear(self):
        self.lines, self.records = [], []

    def emit(self, record):
        self.lines.append(record.getMessage())
        self.records.append(record)

    def failures(self):
        return [r.getMessage() for r in self.records if r.exc_info or r.levelno >= logging.ERROR]



LOGS = LogCapture()


def install_log_capture():
    logger = logging.getLogger("coproxy")
    logger.handlers[:] = [LOGS]
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    if LOGS not in logging.getLogger("asyncio").handlers:  # "Task exception was never retrieved" & co.
        logging.getLogger("asyncio").addHandler(LOGS)


@contextlib.contextmanager
def without_coproxy_variables(**instead):
    """os.environ without COPROXY_*/GHCP_* variables (a developer may have real ones), and with
    those ``instead``, while coproxy.main runs in-process: it reads them, and warns about
    unknown ones."""
    saved = {k: v for k, v in os.environ.items()
             if k.startswith(("COPROXY_", "GHCP_")) or k == "COPILOT_GITHUB_TOKEN" or k in instead}
    for name in saved:
        del os.environ[name]
    os.environ.update(instead)
    try:
        yield
    finally:
        for name in instead:
            os.environ.pop(name, None)
        os.environ.update(saved)


def main_in_process(argv, env=None):
    """``python3 coproxy.py ARGV`` as coproxy.main in this process (a spawned interpreter costs
    0.1-0.2 s of CPU), its variables only ``env``, its output captured, help at the 80 columns
    a pipe gets: a CompletedProcess, as subprocess.run gives. For commands that cannot serve
    here: those that could run as processes."""
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
                without_coproxy_variables(COLUMNS="80", **(env or {})):
            code = coproxy.main(list(argv))
    except SystemExit as exc:  # --help, --version and argparse's own errors
        code = exc.code
    finally:
        install_log_capture()  # main set up its own handler, on the captured stderr
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def with_fake_upstream(test, tls=False):
    """A FakeUpstream and a temp dir for this test, both gone when it ends; logs captured."""
    install_log_capture()
    fake = FakeUpstream(tls=tls)
    test.addCleanup(fake.close)
    tmp = tempfile.mkdtemp(prefix="coproxy-test-")
    test.addCleanup(shutil.rmtree, tmp, True)
    return fake, tmp


def new_client(test, **kwargs):
    """An UpstreamClient whose pooled sockets are closed when the test ends."""
    kwargs.setdefault("environ", {})
    client = coproxy.UpstreamClient(**kwargs)
    test.addCleanup(client.close)
    return client


def make_config(fake, state_dir, **overrides):
    values = {"github_url": fake.url, "github_api_url": fake.url, "state_dir": state_dir, "port": 0,
              "github_token": "ghu_testtoken1234567890"}
    values.update({k: v for k, v in overrides.items() if k in coproxy.OPTION_BY_DEST})
    config = coproxy.Config.resolve(values, environ=overrides.get("environ", {}))
    for key, value in overrides.items():
        if key not in coproxy.OPTION_BY_DEST and key != "environ":
            setattr(config, key, value)
    return config


class ProxyHarness:
    """The real App and Server on a loop in a background thread, bound to 127.0.0.1:0."""

    def __init__(self, config, app=None):
        self.config = config
        self.app = app or coproxy.App(config)
        self.ready = threading.Event()
        self.error = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        if not self.ready.wait(5):
            raise RuntimeError("proxy did not start: %r" % self.error)

    def _run(self):
        async def main():
            self.loop = asyncio.get_running_loop()
            self.stop_event = asyncio.Event()

            def on_ready(server):
                self.server = server
                self.port = server.port
                self.ready.set()
            await coproxy.run_server(self.config, self.app, on_ready=on_ready, stop_event=self.stop_event,
                                     announce=False)
        try:
            asyncio.run(main())
        except BaseException as exc:  # surface start-up failures to the test
            self.error = exc
            self.ready.set()

    def stop(self):
        if self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.stop_event.set)
            self.thread.join(15)


def http_request(port, method, path, body=None, headers=None, timeout=5):
    """One request with the stdlib client: (status, headers, body bytes)."""
    headers = dict(headers or {})
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
        headers.setdefault("Content-Type", "application/json")
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body, headers)
        response = conn.getresponse()
        return response.status, response.headers, response.read()
    finally:
        conn.close()


def read_response(f, head_only=False):
    """Parse one HTTP response from a buffered socket file: (status, headers, body)."""
    status_line = f.readline()
    if not status_line:
        return None, {}, b""
    status = int(status_line.split()[1])
    headers = {}
    while True:
        line = f.readline()
        if line in (b"\r\n", b""):
            break
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    if head_only or status in (100, 204, 304):
        return status, headers, b""
    if headers.get("transfer-encoding") == "chunked":
        body = b""
        while True:
            size = int(f.readline().split(b";")[0], 16)
            if size == 0:
                f.readline()
                return status, headers, body
            body += f.read(size)
            f.readline()
    if "content-length" in headers:
        return status, headers, f.read(int(headers["content-length"]))
    return status, headers, f.read()


class RawClient:
    """A plain socket to the proxy, for framing tests and bytes sent in odd pieces."""

    def __init__(self, port, timeout=5):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.file = self.sock.makefile("rb")

    def send(self, data):
        self.sock.sendall(data)
        return self

    def response(self, head_only=False):
        return read_response(self.file, head_only)

    def closed_by_server(self):
        try:
            return self.file.read(1) == b""
        except (ConnectionResetError, socket.timeout):
            return True

    def close(self):
        self.file.close()
        self.sock.close()


def chat_body(content="hi", **extra):
    body = {"model": "gpt-4.1", "messages": [{"role": "user", "content": content}]}
    body.update(extra)
    return body


def read_chunk(f):
    """The next chunk of a chunked body from a buffered socket file (b"" for the last one)."""
    size = int(f.readline().split(b";")[0], 16)
    data = f.read(size)
    f.readline()
    return data


def read_rest(f):
    """Every remaining chunk of a chunked body, joined (returns after the last, empty chunk)."""
    body = b""
    while True:
        piece = read_chunk(f)
        if not piece:
            return body
        body += piece



ANTHROPIC_HEADERS = {"anthropic-version": "2023-06-01"}
HEALTH = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


def anthropic_spelling(model_id):
    """claude-sonnet-4.5 as Anthropic's list spells it: claude-sonnet-4-5 (others unchanged)."""
    return model_id.replace(".", "-") if model_id.startswith("claude-") else model_id


def post(path, body, extra=b""):
    return (b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s"
            % (path.encode(), len(body), extra, body))


def parse_metrics(text):
    """Prometheus text back into {(name, frozenset(labels)): value}."""
    values = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = re.match(r'^([a-z_]+)(?:\{(.*)\})? (\S+)$', line)
        assert match, line
        labels = frozenset(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(2) or ""))
        values[(match.group(1), labels)] = float(match.group(3))
    return values


class ProxyTestCase(unittest.TestCase):
    """A fresh fake upstream, state dir and proxy per test (each costs a few milliseconds)."""

    tls = False
    proxy_overrides = {}

    def setUp(self):
        self.fake, self.tmp = with_fake_upstream(self, tls=self.tls)
        LOGS.clear()
        overrides = dict(self.proxy_overrides)
        if self.tls:
            overrides.setdefault("ca_file", self.write_file("ca.pem", TEST_CA_PEM))
        self.proxy = self.start_proxy(**overrides)

    def start_proxy(self, **overrides):
        overrides.setdefault("ping_seconds", 5)
        overrides = dict(self.proxy_overrides, **overrides)
        state_dir = overrides.pop("state_dir", os.path.join(self.tmp, "state"))
        proxy = ProxyHarness(make_config(self.fake, state_dir, **overrides))
        self.addCleanup(proxy.stop)
        return proxy

    def write_file(self, name, text):
        path = os.path.join(self.tmp, name)
        with open(path, "w") as f:
            f.write(text)
        return path

    def request(self, method, path, body=None, headers=None, port=None):
        return http_request(port or self.proxy.port, method, path, body, headers)

    def raw(self):
        client = RawClient(self.proxy.port)
        self.addCleanup(client.close)
        return client

    def assertNoSecretsLogged(self):
        text = "\n".join(LOGS.lines)
        self.assertNotIn("ghu_testtoken", text)
        self.assertNotIn("tid=test", text)

# ------------------------------------------------------------------------------------------
# Tests, in coproxy.py's section order.
# ------------------------------------------------------------------------------------------

class TestUtilities(unittest.TestCase):
    def test_redact_removes_every_token_shape(self):
        text = ("gho_abcdefghijklmnop ghu_1234567890abcdef github_pat_11ABCDEFG0123 "
                "tid=abc;exp=1;sku=x:mac Bearer abcdefghijklmnopqrstuvwxyz token 0123456789abcdef")
        out = coproxy.redact(text)
        for secret in ("gho_abc", "ghu_123", "github_pat_11", "tid=abc", "abcdefghijklmnopqrstuvwxyz",
                       "0123456789abcdef"):
            self.assertNotIn(secret, out)
        self.assertEqual(coproxy.redact("plain words stay"), "plain words stay")
        jwt = "eyJhbGciOiJSUzI1NiJ9.eyJpc3MiOjQyfQ.c2lnbmF0dXJl"  # an App JWT or a session token
        self.assertNotIn("eyJpc3MiOjQyfQ", coproxy.redact("minting with " + jwt))

    def test_loopback_detection(self):
        for host in ("127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost"):
            self.assertTrue(coproxy.is_loopback_host(host), host)
        for host in ("0.0.0.0", "192.168.1.5", "::", "example.com", "127.1", "::ffff:127.0.0.1", "", "1.2.3.4.5"):
            self.assertFalse(coproxy.is_loopback_host(host), host)
        self.assertTrue(coproxy.is_loopback_host("0:0:0:0:0:0:0:1"))

    def test_parse_json_object_rejects_non_objects_and_bombs(self):
        self.assertEqual(coproxy.parse_json_object(b'{"a":1}'), {"a": 1})
        for raw in (b"[1]", b"nope", b"", b"[" * 100000):
            with self.assertRaises(coproxy.ClientError) as ctx:
                coproxy.parse_json_object(raw)
            self.assertEqual(ctx.exception.status, 400)

    def test_random_ids(self):
        import uuid
        ids = {coproxy.random_uuid() for _ in range(200)}
        self.assertEqual(len(ids), 200)
        for text in ids:
            self.assertEqual(str(uuid.UUID(text)), text)
            self.assertEqual((uuid.UUID(text).version, uuid.UUID(text).variant), (4, uuid.RFC_4122))
        self.assertRegex(coproxy.random_id(), r"^[0-9a-f]{32}$")
        self.assertRegex(coproxy.random_id(24), r"^[0-9a-f]{24}$")
        self.assertNotEqual(coproxy.random_id(), coproxy.random_id())
        # A stored Response's id is all a caller needs to read it: ids must not follow from a
        # generator anyone can seed or reconstruct, such as the random module's.
        state = random.getstate()
        self.addCleanup(random.setstate, state)
        random.seed(7)
        first = [coproxy.random_id(), coproxy.random_uuid()]
        random.seed(7)
        self.assertNotEqual([coproxy.random_id(), coproxy.random_uuid()], first)

    def test_http_date_matches_the_standard_library_in_any_locale(self):
        import email.utils
        for stamp in (0, 784111777, 951782400, 1700000000, 4102444800):
            self.assertEqual(coproxy.http_date(stamp), email.utils.formatdate(stamp, usegmt=True))

    def test_format_size(self):
        self.assertEqual([coproxy.format_size(n) for n in (0, 1023, 1536, 3 << 20)],
                         ["0 bytes", "1023 bytes", "1.5 KiB", "3.0 MiB"])

    def test_format_duration(self):
        self.assertEqual(coproxy.format_duration(9), "9s")
        self.assertEqual(coproxy.format_duration(845), "14m 05s")
        self.assertEqual(coproxy.format_duration(3720), "1h 02m")

    def test_redact_removes_url_credentials_and_log_lines_cannot_be_forged(self):
        self.assertEqual(coproxy.redact("proxy http://alice:s3cret@proxy.corp:3128 failed"),
                         "proxy http://[redacted]@proxy.corp:3128 failed")
        self.assertEqual(coproxy.redact("http://alice:p@ss@proxy:3128/x"), "http://[redacted]@proxy:3128/x")
        started = time.perf_counter()
        coproxy.redact("/" + "a." * 4000)  # a path any client can send: the scan stays linear
        self.assertLess(time.perf_counter() - started, 0.05)
        self.assertEqual(coproxy.escape_controls("gpt\r\nFAKE 200 line\x1b[31m"), "gpt\\x0d\\x0aFAKE 200 line\\x1b[31m")
        formatter = coproxy.LogFormatter()
        record = logging.LogRecord("coproxy.access", logging.INFO, __file__, 1, "POST /v1/x model=%s", ("a\nb",), None)
        self.assertEqual(formatter.format(record).count("\n"), 0)
        record.fields = {"status": 200, "credits": 0.5}
        entry = json.loads(coproxy.LogFormatter(json_lines=True).format(record))
        self.assertEqual((entry["status"], entry["credits"], entry["logger"], entry["message"]),
                         (200, 0.5, "coproxy.access", "POST /v1/x model=a\\x0ab"))

    def test_the_json_cost_scan_is_linear_even_on_unterminated_strings(self):
        problem = coproxy.json_cost_problem
        started = time.perf_counter()
        self.assertIsNone(problem(b"[]" * 257 + b'"' + b'\\"' * 100000))  # 5 s each 40 KB when quadratic
        self.assertLess(time.perf_counter() - started, 1.0)
        self.assertEqual(problem(b"[" * 300), "nests deeper than 256 levels")
        self.assertIsNone(problem(b'["' + b"[" * 300 + b'"]'))  # brackets inside a string do not count
        self.assertIsNone(problem(b"[" * 200 + b'"a\\\n' + b"[" * 100))  # the string runs to the end

    def test_the_json_cost_scan_counts_values_and_stops_at_the_bound(self):
        problem, bound = coproxy.json_cost_problem, coproxy.MAX_JSON_VALUES
        self.assertIsNone(problem(b"[" + b"1," * (bound - 2) + b"1]"))
        self.assertEqual(problem(b"[" + b"[]," * bound + b"[]]"), "holds more than %d arrays, objects and values" % bound)
        self.assertIsNone(problem(b'["' + b"," * (2 * bound) + b'"]'))  # commas inside a string do not count
        bomb = b"[" + b"[]," * (4 << 20) + b"[]]"  # 12 MiB, 4M arrays: the scan stops at the bound
        started = time.perf_counter()
        self.assertIsNotNone(problem(bomb))
        self.assertLess(time.perf_counter() - started, 2.0)

    def test_json_dumps_replaces_lone_surrogates(self):
        payload = json.loads('{"text": "cut \\ud83d here", "ok": "\\ud83d\\ude00"}')
        self.assertEqual(json.loads(coproxy.json_dumps(payload)), {"text": "cut \ufffd here", "ok": "\U0001f600"})

    def test_host_without_port(self):
        for value, host in (("127.0.0.1:8080", "127.0.0.1"), ("[::1]:80", "::1"), ("[::1]", "::1"),
                            ("Example.COM", "example.com"), ("::1", "::1")):
            self.assertEqual(coproxy.host_without_port(value), host)


class TestConfig(unittest.TestCase):
    def test_precedence_flag_then_env_then_default(self):
        env = {"COPROXY_PORT": "9000", "GHCP_PROXY_API_KEY": "from-env", "COPROXY_STATE_DIR": "/tmp/x"}
        config = coproxy.Config.resolve({"port": 7000}, environ=env)
        self.assertEqual((config.port, config.api_key, config.state_dir), (7000, "from-env", "/tmp/x"))
        config = coproxy.Config.resolve({}, environ=env)
        self.assertEqual(config.port, 9000)
        self.assertEqual(coproxy.Config.resolve({}, environ={}).port, 8080)

    def test_github_token_source_is_remembered(self):
        config = coproxy.Config.resolve({}, environ={"GHCP_GITHUB_TOKEN": " ghu_x \n"})
        self.assertEqual((config.github_token, config.source_of("github_token")), ("ghu_x", "GHCP_GITHUB_TOKEN"))
        config = coproxy.Config.resolve({"github_token": "ghu_y"}, environ={"GHCP_GITHUB_TOKEN": "ghu_x"})
        self.assertEqual((config.github_token, config.source_of("github_token")), ("ghu_y", "--github-token"))

    def test_bad_env_values_name_the_variable(self):
        for env in ({"COPROXY_PORT": "eighty"}, {"COPROXY_NO_AUTO_LOGIN": "maybe"},
                    {"COPROXY_COPILOT_API_URL": "ftp://x"}, {"COPROXY_LOG_LEVEL": "loud"}):
            with self.assertRaises(coproxy.ConfigError) as ctx:
                coproxy.Config.resolve({}, environ=env)
            self.assertIn(list(env)[0], str(ctx.exception))

    def test_ca_file_must_exist_and_hold_pem(self):
        with tempfile.NamedTemporaryFile("w", suffix=".pem", delete=False) as f:
            f.write("not a certificate")
        self.addCleanup(os.unlink, f.name)
        for path, fragment in ((f.name, "no PEM certificate"), ("/nonexistent/ca.pem", "cannot be read")):
            with self.assertRaises(coproxy.ConfigError) as ctx:
                coproxy.Config.resolve({"ca_file": path}, environ={})
            self.assertIn(fragment, str(ctx.exception))

    def test_defaults_point_at_real_github(self):
        config = coproxy.Config.resolve({}, environ={})
        self.assertEqual(config.github_url, "https://github.com")
        self.assertEqual(config.github_api_url, "https://api.github.com")
        self.assertIsNone(config.copilot_api_url)
        self.assertEqual(config.host, "127.0.0.1")

    def test_ghe_host_switches_hosts(self):
        config = coproxy.Config.resolve({"github_host": "Acme.ghe.com"}, environ={})
        self.assertEqual(config.github_url, "https://acme.ghe.com")
        self.assertEqual(config.github_api_url, "https://api.acme.ghe.com")
        with self.assertRaises(coproxy.ConfigError):
            coproxy.Config.resolve({"github_host": "https://acme.ghe.com"}, environ={})

    def test_state_dir_per_platform(self):
        home = os.path.expanduser("~")
        self.assertEqual(coproxy.default_state_dir("linux", {"XDG_STATE_HOME": "/x"}), "/x/coproxy")
        self.assertEqual(coproxy.default_state_dir("linux", {}), os.path.join(home, ".local", "state", "coproxy"))
        self.assertEqual(coproxy.default_state_dir("darwin", {}),
                         os.path.join(home, "Library", "Application Support", "coproxy"))
        self.assertEqual(coproxy.default_state_dir("win32", {"APPDATA": "C:\\\\AD"}),
                         os.path.join("C:\\\\AD", "coproxy", "config"))

    def test_new_option_values_are_checked(self):
        config = coproxy.Config.resolve({}, environ={"COPROXY_ALLOWED_HOSTS": "my-laptop.local:8080",
                                                     "COPROXY_CORS_ORIGIN": "https://App.example/,vscode-file://vscode-app,null"})
        self.assertEqual((config.allowed_hosts, config.cors_origins),
                         (["my-laptop.local"], ["https://app.example", "vscode-file://vscode-app", "null"]))
        for env in ({"COPROXY_CORS_ORIGIN": "not an origin"}, {"COPROXY_ALLOWED_HOSTS": "a b"},
                    {"COPROXY_EDITOR_VERSION": "vscode 1.2"}, {"GHCP_PROXY_API_KEY": "s3cr\net"}):
            with self.assertRaises(coproxy.ConfigError) as ctx:
                coproxy.Config.resolve({}, environ=env)
            self.assertIn(list(env)[0], str(ctx.exception))
        self.assertNotIn("s3cr", str(ctx.exception))  # a secret's value is never echoed

    def test_secret_flags_and_changed_settings(self):
        config = coproxy.Config.resolve({"api_key": "k", "port": 9000, "model_aliases": [("a", "b")]},
                                        environ={"GHCP_GITHUB_TOKEN": "ghu_x", "COPROXY_CA_FILE": ""})
        self.assertEqual(config.secret_flags, [("--api-key", "GHCP_PROXY_API_KEY")])
        self.assertEqual(sorted(o.dest for o, _ in config.changed_settings()),
                         ["api_key", "github_token", "model_aliases", "port"])
        self.assertEqual(config.user_agent, "GitHubCopilotChat/" + coproxy.DEFAULT_EDITOR_PLUGIN_VERSION.split("/")[1])


    def test_coproxy_api_key_is_read_and_the_older_name_wins(self):
        config = coproxy.Config.resolve({}, environ={"COPROXY_API_KEY": "k-new"})
        self.assertEqual((config.api_key, config.source_of("api_key"), config.api_key_variable),
                         ("k-new", "COPROXY_API_KEY", "COPROXY_API_KEY"))
        self.assertEqual(config.warnings, [])
        config = coproxy.Config.resolve({}, environ={"COPROXY_API_KEY": "k-new", "GHCP_PROXY_API_KEY": "k-old"})
        self.assertEqual((config.api_key, config.api_key_variable), ("k-old", "GHCP_PROXY_API_KEY"))
        self.assertEqual(config.warnings, ["GHCP_PROXY_API_KEY and COPROXY_API_KEY are set to different values; "
                                           "GHCP_PROXY_API_KEY is used"])
        same = coproxy.Config.resolve({}, environ={"COPROXY_API_KEY": "k", "GHCP_PROXY_API_KEY": "k"})
        self.assertEqual(same.warnings, [])
        flagged = coproxy.Config.resolve({"api_key": "k-flag"}, environ={"COPROXY_API_KEY": "k-new"})
        self.assertEqual((flagged.api_key, flagged.api_key_variable), ("k-flag", "GHCP_PROXY_API_KEY"))

    def test_unknown_variables_are_named_with_the_closest_known_one(self):
        config = coproxy.Config.resolve({}, environ={"COPROXY_PROT": "58104", "GHCP_PROXY_APIKEY": "x",
                                                     "COPROXY_CORS_ORIGINS": "*", "COPROXY_ZZZZZZZZZZZZ": "1",
                                                     "OTHER_PROT": "1", "COPROXY_PORT": "9000"})
        self.assertEqual(config.warnings, [
            "COPROXY_CORS_ORIGINS is set but coproxy reads no such variable (did you mean COPROXY_CORS_ORIGIN?)",
            "COPROXY_PROT is set but coproxy reads no such variable (did you mean COPROXY_PORT?)",
            "COPROXY_ZZZZZZZZZZZZ is set but coproxy reads no such variable (`python3 coproxy.py --help` lists them)",
            "GHCP_PROXY_APIKEY is set but coproxy reads no such variable (did you mean GHCP_PROXY_API_KEY?)"])
        self.assertNotIn("58104", " ".join(config.warnings))  # names only: a value may be a secret


@unittest.skipIf(os.name != "posix", "file modes are POSIX")
class TestTokenStore(unittest.TestCase):
    def setUp(self):
        install_log_capture()
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.store = coproxy.TokenStore(os.path.join(self.dir, "state"))

    def mode(self, path):
        return stat.S_IMODE(os.stat(path).st_mode)

    def test_files_0600_in_0700_dir_even_with_a_loose_umask(self):
        old = os.umask(0)
        try:
            self.store.save_github_token("ghu_abc")
            self.store.save_copilot_token({"token": "t", "expires_at": 1})
        finally:
            os.umask(old)
        self.assertEqual(self.mode(self.store.auth_dir), 0o700)
        self.assertEqual(self.mode(self.store.github_token_path), 0o600)
        self.assertEqual(self.mode(self.store.copilot_token_path), 0o600)
        self.assertEqual(self.store.load_github_token(), "ghu_abc")

    def test_atomic_replace_leaves_no_temp_files(self):
        for i in range(5):
            self.store.save_copilot_token({"token": "t%d" % i, "expires_at": i})
        self.assertEqual(sorted(os.listdir(self.store.auth_dir)), ["ghcp-token.json"])
        self.assertEqual(self.store.load_copilot_token()["token"], "t4")

    def test_corrupt_empty_or_partial_files_read_as_absent(self):
        os.makedirs(self.store.auth_dir)
        for text in ("", "   \n", "{not json", "[1,2]", '{"token": 5, "expires_at": 1}', '{"token": "x"}'):
            with open(self.store.copilot_token_path, "w") as f:
                f.write(text)
            self.assertIsNone(self.store.load_copilot_token(), text)
        with open(self.store.github_token_path, "w") as f:
            f.write("\n")
        self.assertIsNone(self.store.load_github_token())
        with open(self.store.github_token_path, "wb") as f:
            f.write(b"\xff\xfe\x00")
        self.assertIsNone(self.store.load_github_token())

    def test_reads_files_written_by_the_rust_coproxy(self):
        os.makedirs(self.store.auth_dir)
        with open(self.store.github_token_path, "w") as f:
            f.write("gho_fromrust\n")
        with open(self.store.copilot_token_path, "w") as f:
            json.dump({"token": "tid=1;exp=2", "expires_at": 4102444800,
                       "api_endpoint": "https://api.individual.githubcopilot.com"}, f)
        os.chmod(self.store.github_token_path, 0o600)
        os.chmod(self.store.copilot_token_path, 0o600)
        self.assertEqual(self.store.load_github_token(), "gho_fromrust")
        record = self.store.load_copilot_token()
        self.assertEqual(record["api_endpoint"], "https://api.individual.githubcopilot.com")

    def test_loose_permissions_are_tightened_with_a_warning(self):
        self.store.save_github_token("ghu_abc")
        os.chmod(self.store.github_token_path, 0o644)
        LOGS.clear()
        self.assertEqual(self.store.load_github_token(), "ghu_abc")
        self.assertEqual(self.mode(self.store.github_token_path), 0o600)
        self.assertTrue(any("readable by others" in line for line in LOGS.lines))

    def test_github_token_changes_by_another_process_are_seen(self):
        reader = coproxy.TokenStore(self.store.state_dir)  # the server's store; self.store is `auth login`
        self.assertIsNone(reader.load_github_token())
        self.store.save_github_token("ghu_aaaa")
        self.assertEqual(reader.load_github_token(), "ghu_aaaa")
        self.store.save_github_token("ghu_bbbb")  # same size, same second, maybe the same inode
        self.assertEqual(reader.load_github_token(), "ghu_bbbb")
        self.store.clear()
        self.assertIsNone(reader.load_github_token())

    def test_an_unchanged_old_token_file_is_not_read_again(self):
        path = self.store.github_token_path
        self.store.save_github_token("ghu_aaaa")
        past = os.stat(path).st_mtime_ns - 60 * 10 ** 9
        os.utime(path, ns=(past, past))
        self.assertEqual(self.store.load_github_token(), "ghu_aaaa")
        with open(path, "r+") as f:  # same inode, size, mode and (restored) mtime: indistinguishable
            f.write("ghu_bbbb\n")
        os.utime(path, ns=(past, past))
        self.assertEqual(self.store.load_github_token(), "ghu_aaaa")
        os.chmod(path, 0o640)  # any change to the identity means a fresh read (and a tightened mode)
        self.assertEqual(self.store.load_github_token(), "ghu_bbbb")

    def test_clear_removes_both(self):
        self.store.save_github_token("ghu_abc")
        self.store.save_copilot_token({"token": "t", "expires_at": 1})
        self.assertEqual(len(self.store.clear()), 2)
        self.assertEqual(self.store.clear(), [])

    def test_a_state_dir_others_can_write_is_refused_with_the_fix(self):
        os.makedirs(self.store.state_dir)
        os.chmod(self.store.state_dir, 0o775)
        with self.assertRaises(coproxy.ConfigError) as ctx:
            self.store.save_github_token("ghu_abc")
        self.assertIn("chmod 700 %s" % self.store.state_dir, str(ctx.exception))
        self.assertFalse(os.path.exists(self.store.github_token_path))
        os.chmod(self.store.state_dir, 0o755)  # readable but not writable by others: tightened, and used
        self.store.save_github_token("ghu_abc")
        self.assertEqual(self.mode(self.store.state_dir), 0o700)

    def test_symlinked_token_files_are_not_followed(self):
        self.store.save_github_token("ghu_mine")
        elsewhere = os.path.join(self.dir, "planted")
        with open(elsewhere, "w") as f:
            f.write("ghu_planted\n")
        os.unlink(self.store.github_token_path)
        os.symlink(elsewhere, self.store.github_token_path)
        LOGS.clear()
        self.assertIsNone(coproxy.TokenStore(self.store.state_dir).load_github_token())
        self.assertTrue(any("symbolic link" in line for line in LOGS.lines), LOGS.lines)


class TestHistory(unittest.TestCase):
    """The request history files: per local day, 0600, summaries of past days, pruning."""

    def setUp(self):
        install_log_capture()
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.state = os.path.join(self.dir, "state")
        today = time.localtime()  # 15:30 local time today
        self.now = time.mktime((today.tm_year, today.tm_mon, today.tm_mday, 15, 30, 0, 0, 0, -1))

    def history(self, keep_days=90):
        history = coproxy.History(self.state, keep_days)
        self.addCleanup(history.close)
        return history

    def record(self, hours_ago, model="gpt-4.1", credits=0.5, session=None):
        record = {"t": self.now - hours_ago * 3600, "route": "/chat/completions", "status": 200,
                  "model": model, "input": 10, "output": 2, "credits": credits,
                  "ttfb_ms": 100.0 + hours_ago, "ms": 900.0}
        if session:
            record["session"] = session
        return record

    def totals(self, buckets, name="requests"):
        return sum(t[name] for bucket in buckets for t in bucket["models"].values())

    def test_records_go_to_their_days_files_0600_by_the_writer_thread(self):
        history = self.history()
        old = os.umask(0)
        try:
            for hours in (0, 1, 20, 40):
                history.append(self.record(hours))
            history.flush()
        finally:
            os.umask(old)
        self.assertNotEqual(history._thread, threading.current_thread())
        days = history.days()
        expected = {coproxy.local_day(self.now - h * 3600) for h in (0, 1, 20, 40)}
        self.assertEqual(days, sorted(expected))
        self.assertEqual(stat.S_IMODE(os.stat(history.dir).st_mode), 0o700)
        for day in days:
            self.assertEqual(stat.S_IMODE(os.stat(history.path(day)).st_mode), 0o600)
        today = history.records(coproxy.local_day(self.now))
        self.assertEqual([r["ttfb_ms"] for r in today], [100.0, 101.0])

    def test_a_start_counts_each_record_once_from_summaries_and_the_last_24_hours(self):
        history = self.history()
        records = [self.record(h, model="claude-sonnet-4.5" if h % 2 else "gpt-4.1",
                               session="s1" if h < 30 else "s2")
                   for h in (0, 3, 14, 16, 20, 30, 50, 75)]
        history.write(records)
        ledger = coproxy.Ledger(clock=lambda: self.now)
        # the last 24 h: today's 3 (15:30, 12:30, 01:30) and yesterday's 2 (23:30, 19:30)
        self.assertEqual(history.load(ledger, self.now), 5)
        days = ledger.by_day(self.now)
        self.assertEqual(self.totals(days), len(records))
        self.assertEqual(round(self.totals(days, "credits"), 6), 4.0)
        hourly = ledger.by_hour(self.now)
        self.assertEqual((len(hourly), self.totals(hourly)), (24, 5))
        self.assertEqual(ledger.by_route(self.now)["/chat/completions"]["requests"], 5)
        sessions = {s["id"]: s for s in ledger.by_session()}
        self.assertEqual((sessions["s1"]["requests"], sessions["s2"]["requests"]), (5, 3))
        self.assertEqual(sessions["s1"]["models"], {"gpt-4.1": 4, "claude-sonnet-4.5": 1})
        self.assertEqual(len(ledger.requests()), 5)
        past = [d for d in history.days() if d < coproxy.local_day(self.now)]
        self.assertTrue(past)
        self.assertTrue(all(os.path.exists(history.path(d, ".sum.json")) for d in past))
        # a summary that no longer matches its records file (appended since) is counted again
        history.write([self.record(75, credits=1.0)])
        again = coproxy.Ledger(clock=lambda: self.now)
        history.load(again, self.now)
        self.assertEqual(self.totals(again.by_day(self.now)), 9)

    def test_old_days_are_removed_and_a_torn_line_is_skipped(self):
        history = self.history(keep_days=3)
        history.write([self.record(h) for h in (0, 24 * 5, 24 * 10)])
        with open(history.path(coproxy.local_day(self.now)), "a") as handle:
            handle.write('{"t": %s, "route": "/mess' % self.now)  # a crash mid-write
        ledger = coproxy.Ledger(clock=lambda: self.now)
        self.assertEqual(history.load(ledger, self.now), 1)
        self.assertEqual(history.days(), [coproxy.local_day(self.now)])

    def test_views_percentiles_and_since(self):
        self.assertEqual(coproxy.percentiles([5, 1, 4, 2, 3, None]), {"p50": 3, "p90": 5, "p99": 5})
        self.assertIsNone(coproxy.percentiles([None]))
        self.assertEqual(coproxy.parse_since("24h", 100000.0), 100000.0 - 86400)
        self.assertEqual(coproxy.parse_since("1765000000", 0), 1765000000.0)
        self.assertIsNone(coproxy.parse_since(None, 0))
        with self.assertRaises(ValueError):
            coproxy.parse_since("yesterday", 0)
        ledger = coproxy.Ledger(clock=lambda: self.now)
        for hours in (0, 2, 5):
            ledger.add(self.record(hours, session="s"), now=self.now)
        recent = ledger.requests(since=self.now - 3 * 3600)
        self.assertEqual([r["ttfb_ms"] for r in recent], [102.0, 100.0])
        self.assertEqual(ledger.by_model(self.now)["gpt-4.1"]["requests"], 3)
        self.assertEqual(len(ledger.by_hour(self.now, since=self.now - 3600)), 2)

    def test_a_ledger_nobody_looks_at_trims_itself(self):
        ledger = coproxy.Ledger(clock=lambda: self.now)
        for hours in (0, 2, 5, 24 * 29):
            ledger.add(self.record(hours), now=self.now)
        self.assertEqual((len(ledger.hourly), len(ledger.latency), len(ledger.daily)), (3, 3, 2))
        later = self.now + 3 * 86400  # three days on; every 1,024th record trims
        while ledger.count % 1024:
            ledger.add(self.record(-72), now=later)
        self.assertEqual(list(ledger.hourly), [int(later // 3600) * 3600])
        self.assertEqual({t for t, _, _, _ in ledger.latency}, {later})
        self.assertNotIn(coproxy.local_day(self.now - 24 * 29 * 3600), ledger.daily)
        self.assertIn(coproxy.local_day(self.now), ledger.daily)


class TestUpstreamClient(unittest.TestCase):
    def setUp(self):
        install_log_capture()
        self.fake = FakeUpstream()
        self.addCleanup(self.fake.close)

    def test_keep_alive_one_connection_for_many_requests(self):
        client = new_client(self)
        for _ in range(20):
            status, data, _, _ = client.request_json("GET", self.fake.url + "/user", {})
            self.assertEqual((status, data["login"]), (200, "octocat"))
        self.assertEqual(client.connections_opened, 1)

    def test_stale_pooled_connection_is_retried_once(self):
        def answer_then_hang_up(handler, body):  # keep-alive promised, then closed (as an edge proxy may)
            handler.send_json(200, {"login": "first"})
            handler.close_connection = True
        self.fake.routes[("GET", "/user")] = answer_then_hang_up
        client = new_client(self)
        self.assertEqual(client.request_json("GET", self.fake.url + "/user", {})[1]["login"], "first")
        with client._lock:
            conn = client._pools[("http", "127.0.0.1", self.fake.port)][0][0]
        self.assertTrue(select.select([conn.sock], [], [], 5)[0])  # the server's FIN has arrived
        self.fake.routes[("GET", "/user")] = lambda h, b: h.send_json(200, {"login": "again"})
        status, data, _, _ = client.request_json("GET", self.fake.url + "/user", {})
        self.assertEqual((status, data["login"]), (200, "again"))
        self.assertEqual(client.connections_opened, 2)
        self.assertEqual(len(self.fake.requests_to("/user")), 2)

    def test_a_retry_never_takes_a_second_stale_connection(self):
        gate, arrived = threading.Event(), []
        self.addCleanup(gate.set)

        def answer_then_hang_up(handler, body):  # two at once: two pooled connections, both closed after
            arrived.append(1)
            gate.wait(5)
            handler.send_json(200, {"login": "first"})
            handler.close_connection = True
        self.fake.routes[("GET", "/user")] = answer_then_hang_up
        client = new_client(self)
        threads = [threading.Thread(target=client.request_json, args=("GET", self.fake.url + "/user", {}))
                   for _ in range(2)]
        for thread in threads:
            thread.start()
        self.assertTrue(wait_for(lambda: len(arrived) == 2))
        gate.set()
        for thread in threads:
            thread.join(5)
        with client._lock:
            pooled = [conn for conn, _ in client._pools[("http", "127.0.0.1", self.fake.port)]]
        self.assertEqual(len(pooled), 2)
        for conn in pooled:
            self.assertTrue(select.select([conn.sock], [], [], 5)[0])  # both FINs have arrived
        self.fake.routes[("GET", "/user")] = lambda h, b: h.send_json(200, {"login": "again"})
        status, data, _, _ = client.request_json("GET", self.fake.url + "/user", {})
        self.assertEqual((status, data["login"]), (200, "again"))
        self.assertEqual(client.connections_opened, 3)  # the retry dialled, it did not take the other stale one

    def test_a_client_leaving_after_its_answer_leaves_the_pooled_connection_alone(self):
        client = new_client(self)
        abort = coproxy.AbortHandle()
        self.assertEqual(client.request_json("GET", self.fake.url + "/user", {}, abort_handle=abort)[0], 200)
        abort.abort()  # the client left after its answer was read (the connection is pooled by now)
        with client._lock:
            conn = client._pools[("http", "127.0.0.1", self.fake.port)][0][0]
        self.assertFalse(select.select([conn.sock], [], [], 0)[0])  # not shut down: nothing to read
        self.assertEqual(client.request_json("GET", self.fake.url + "/user", {})[0], 200)
        self.assertEqual(client.connections_opened, 1)
        aborted = coproxy.AbortHandle()  # aborted while its answer is read: never pooled
        response = client.request("GET", self.fake.url + "/user", {}, abort_handle=aborted)
        aborted.abort()
        with contextlib.suppress(coproxy.UpstreamUnreachable):  # the small answer may be in already
            response.read_all(10000)
        self.assertEqual(client.idle_connections(), 0)

    def test_no_retry_once_response_bytes_arrived(self):
        def half_answer(handler, body):
            handler.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
            handler.close_connection = True
            handler.connection.shutdown(socket.SHUT_RDWR)
        self.fake.routes[("POST", "/chat/completions")] = half_answer
        client = new_client(self)
        client.request_json("GET", self.fake.url + "/user", {})  # a pooled connection exists
        with self.assertRaises(coproxy.UpstreamUnreachable):
            client.request_json("POST", self.fake.url + "/chat/completions", {}, {"x": 1})
        self.assertEqual(len(self.fake.requests_to("/chat/completions")), 1)

    def test_a_pooled_connection_that_began_answering_is_never_retried(self):
        # A status line then a reset, or "100 Continue" then EOF: Copilot has the request, so
        # sending it again would run (and bill) it twice.
        def status_line_then_reset(handler, body):
            handler.wfile.write(b"HTTP/1.1 200 OK\r\n")
            handler.wfile.flush()
            handler.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            handler.connection.close()
            handler.close_connection = True

        def continue_then_eof(handler, body):
            handler.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            handler.wfile.flush()
            handler.close_connection = True
            handler.connection.shutdown(socket.SHUT_RDWR)
        for answer in (continue_then_eof, status_line_then_reset):
            self.fake.requests.clear()
            self.fake.routes[("POST", "/chat/completions")] = answer
            client = new_client(self)
            client.request_json("GET", self.fake.url + "/user", {})  # a pooled connection exists
            with self.assertRaises(coproxy.UpstreamUnreachable) as ctx:
                client.request_json("POST", self.fake.url + "/chat/completions", {}, {"x": 1})
            self.assertEqual(ctx.exception.kind, "cut", answer.__name__)
            self.assertEqual(len(self.fake.requests_to("/chat/completions")), 1, answer.__name__)
            self.assertEqual(client.connections_opened, 1, answer.__name__)

    def test_unreachable_host_names_the_cause(self):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()
        client = new_client(self, connect_timeout=2)
        with self.assertRaises(coproxy.UpstreamUnreachable) as ctx:
            client.request("GET", "http://127.0.0.1:%d/x" % port, {})
        self.assertIn("refused", str(ctx.exception))

    def test_no_proxy_rules(self):
        match = coproxy._no_proxy_matches
        self.assertTrue(match("api.github.com", 443, "github.com"))
        self.assertTrue(match("api.github.com", 443, ".github.com"))
        self.assertTrue(match("x.y", 443, "*"))
        self.assertTrue(match("127.0.0.1", 8080, "localhost, 127.0.0.1:8080"))
        self.assertFalse(match("127.0.0.1", 9090, "127.0.0.1:8080"))
        self.assertFalse(match("notgithub.com", 443, "github.com"))
        env = {"HTTPS_PROXY": "http://user:p%40ss@proxy.local:3128", "NO_PROXY": "internal"}
        host, port, auth = coproxy.proxy_for("https://api.github.com/x", env)
        self.assertEqual((host, port), ("proxy.local", 3128))
        self.assertEqual(auth, "Basic dXNlcjpwQHNz")
        self.assertIsNone(coproxy.proxy_for("https://svc.internal/x", env))
        self.assertIsNone(coproxy.proxy_for("http://api.github.com/x", env))
        self.assertEqual(coproxy.proxy_for("https://x/", {"HTTPS_PROXY": "proxy.local:3128"})[:2], ("proxy.local", 3128))
        with self.assertRaises(coproxy.ConfigError) as ctx:  # it would get the password in clear
            coproxy.proxy_for("https://x/", {"HTTPS_PROXY": "https://u:p@proxy.local:3128"})
        self.assertIn("only http:// proxies are supported", str(ctx.exception))
        self.assertNotIn(":p@", str(ctx.exception))
        with self.assertRaises(coproxy.ConfigError):  # at start, not as a failure of every request
            coproxy.UpstreamClient(environ={"HTTPS_PROXY": "https://u:p@proxy.local:3128"})

    def test_idle_connections_are_closed_by_a_timer_and_capped(self):
        for name, value in (("IDLE_UPSTREAM_SECONDS", 0.15), ("IDLE_UPSTREAM_TOTAL", 2)):
            self.addCleanup(setattr, coproxy, name, getattr(coproxy, name))
            setattr(coproxy, name, value)
        client = new_client(self)
        others = [FakeUpstream() for _ in range(3)]
        for fake in others:
            self.addCleanup(fake.close)
        for fake in [self.fake] + others:
            self.assertEqual(client.request_json("GET", fake.url + "/user", {})[0], 200)
        self.assertEqual(client.idle_connections(), 2)  # the global cap
        self.assertTrue(wait_for(lambda: client.idle_connections() == 0, 5))  # the reaper, not a new request

    def test_request_targets_cannot_split_a_request(self):
        up = ScriptedUpstream(self)
        up.scripts.put([b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"])
        client = new_client(self)
        evil = up.url + "/x HTTP/1.1\r\nHost: evil\r\n\r\nGET /poison?\u00e9 \t"
        client.request("GET", evil, {}).read_all(10)
        self.assertEqual(len(up.heads), 1)
        self.assertTrue(up.heads[0].startswith(b"GET /x%20HTTP/1.1%0D%0AHost:%20evil%0D%0A%0D%0AGET%20/poison?%C3%A9%20%09 "
                                               b"HTTP/1.1\r\n"), up.heads[0])
        for bad in ("http://ho st/", "http://h\u00e9:x/", "ftp://h/", "http:///nohost", "http://[zz]/"):
            with self.assertRaises(coproxy.UpstreamUnreachable):
                client.request("GET", bad, {})


class TestUpstreamFraming(unittest.TestCase):
    """Our HTTP/1.1 reader against hostile or unusual framing, over real sockets."""

    def setUp(self):
        install_log_capture()
        self.up = ScriptedUpstream(self)
        self.client = new_client(self, read_timeout=10)

    def request(self, *script):
        self.up.scripts.put(list(script))
        return self.client.request("POST", self.up.url + "/chat/completions", {"X-Test": "1"}, b"{}")

    def test_chunks_split_anywhere_and_trailers_then_the_connection_is_reused(self):
        wire = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-T: 1\r\n\r\n"
        response = self.request(*[wire[i:i + 1] for i in range(len(wire))])
        self.assertEqual(response.read_all(1000), b"hello world")
        again = self.request(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.assertEqual(again.read_all(1000), b"ok")
        self.assertEqual((self.client.connections_opened, self.up.accepted), (1, 1))
        self.assertTrue(self.up.heads[0].endswith(b"\r\nX-Test: 1\r\nAccept-Encoding: identity\r\nContent-Length: 2"),
                        self.up.heads[0])
        self.assertIn(b"Host: 127.0.0.1:", self.up.heads[0])

    def test_a_burst_of_chunks_is_one_read_and_an_event_never_waits_for_its_crlf(self):
        later, end = threading.Event(), threading.Event()
        response = self.request(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                                b"3\r\none\r\n3\r\ntwo\r\n5\r\nthree", later, b"\r\n4\r\nfour", end,
                                b"\r\n0\r\n\r\n")
        got = b""
        while got != b"onetwothree":  # arrives together or in parts, never needs `later`
            got += response.read1()
        later.set()
        self.assertEqual(response.read1(), b"four")
        end.set()
        self.assertEqual(response.read1(), b"")
        self.assertEqual(len(self.client._pools[("http", "127.0.0.1", int(self.up.url.rsplit(":", 1)[1]))]), 1)

    def test_cut_short_bodies_raise_and_are_never_pooled(self):
        response = self.request(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial", "close")
        with self.assertRaises(coproxy.UpstreamUnreachable) as ctx:
            response.read_all(1000)
        self.assertIn("mid-answer", str(ctx.exception))
        response = self.request(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\ndata\r\n", "close")
        self.assertEqual(response.read1(), b"data")
        with self.assertRaises(coproxy.UpstreamCutShort):
            response.read1()
        response.close(reuse=False)
        self.assertEqual(self.client._pools, {})

    def test_interim_answers_repeated_and_folded_headers_and_a_body_until_close(self):
        response = self.request(b"HTTP/1.1 100 Continue\r\n\r\n",
                                b"HTTP/1.1 200 OK\r\nX-A: 1\r\nx-a: 2\r\nX-Folded: a\r\n  b\r\n\r\nuntil ", b"close",
                                "close")
        self.assertEqual((response.status, response.header("X-A"), response.header("x-folded")), (200, "1, 2", "a b"))
        self.assertEqual(response.read_all(1000), b"until close")
        self.assertEqual(self.client._pools, {})

    def test_bare_lf_heads_and_repeated_equal_lengths_are_accepted(self):
        response = self.request(b"HTTP/1.1 200 OK\nContent-Length: 6\nContent-Length: 6\n\nab\r\n\r\n")
        self.assertEqual((response.status, response.read_all(100)), (200, b"ab\r\n\r\n"))

    def test_connection_close_and_oversized_answers_are_not_pooled(self):
        self.request(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok").read_all(10)
        with self.assertRaises(coproxy.UpstreamUnreachable) as ctx:
            self.request(b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n0123456789a").read_all(10)
        self.assertIn("larger than 10", str(ctx.exception))
        self.assertEqual(self.client._pools, {})
        self.assertEqual(self.client.connections_opened, 2)

    def test_malformed_answers_are_named(self):
        for wire, words in ((b"HTPT/1.1 200 OK\r\n\r\n", "malformed status line"),
                            (b"HTTP/1.1 200 OK\r\nContent-Length: 1x\r\n\r\n", "invalid Content-Length"),
                            (b"HTTP/1.1 200 OK\r\nContent-Length: 1, 2\r\n\r\n", "invalid Content-Length"),
                            (b"HTTP/1.1 200 OK\r\nContent-Length: \xb2\r\n\r\n", "invalid Content-Length")):
            with self.assertRaises(coproxy.UpstreamUnreachable) as ctx:
                self.request(wire, "close")
            self.assertIn(words, str(ctx.exception))
        response = self.request(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "close")
        with self.assertRaises(coproxy.UpstreamUnreachable) as ctx:
            response.read_all(100)
        self.assertIn("ValueError", str(ctx.exception))

    def test_header_values_with_line_breaks_are_never_sent(self):
        with self.assertRaises(coproxy.UpstreamUnreachable) as ctx:
            self.client.request("GET", self.up.url + "/x", {"X-Model": "gpt\r\nEvil: 1"})
        self.assertIn("line break", str(ctx.exception))
        self.assertEqual(self.up.accepted, 0)

    def test_a_silent_upstream_times_out_before_its_head_and_in_its_body(self):
        client = new_client(self, read_timeout=0.2)
        silence = threading.Event()
        self.addCleanup(silence.set)
        for script, read in (([silence], None), ([b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nfour", silence],
                                                 lambda response: response.read_all(100))):
            self.up.scripts.put(script)
            started = time.monotonic()
            with self.assertRaises(coproxy.UpstreamUnreachable) as ctx:
                response = client.request("POST", self.up.url + "/chat/completions", {}, b"{}")
                read(response)
            self.assertTrue(ctx.exception.timeout, ctx.exception)
            self.assertLess(time.monotonic() - started, 5)
        self.assertEqual(client._pools, {})

    def test_pull_hands_over_what_arrived_without_blocking(self):
        later = threading.Event()
        response = self.request(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nab", later,
                                b"cd\r\n0\r\n\r\n")
        response._sock.setblocking(False)
        got, done = b"", False
        while not done:
            data, done = response.pull()
            got += data
            if got == b"ab":
                later.set()
        self.assertEqual(got, b"abcd")
        cut = self.request(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nfour", "close")
        cut._sock.setblocking(False)
        got = b""
        with self.assertRaises(coproxy.UpstreamCutShort):
            for _ in range(500):
                data, _ = cut.pull()
                got += data
                time.sleep(0.002)
        self.assertEqual(got, b"four")  # the bytes before the cut are handed over first
        response.close(reuse=False)
        cut.close(reuse=False)


class TestUpstreamTLS(unittest.TestCase):
    def setUp(self):
        self.fake, self.tmp = with_fake_upstream(self, tls=True)
        self.ca = os.path.join(self.tmp, "ca.pem")
        with open(self.ca, "w") as f:
            f.write(TEST_CA_PEM)

    def test_ca_file_is_trusted_and_one_handshake_serves_many_requests(self):
        client = new_client(self, ca_file=self.ca)
        for _ in range(10):
            status, data, _, _ = client.request_json("GET", self.fake.url + "/user", {})
            self.assertEqual(status, 200)
        self.assertEqual(client.connections_opened, 1)

    def test_untrusted_certificate_message_names_ca_file(self):
        client = new_client(self)
        with self.assertRaises(coproxy.UpstreamUnreachable) as ctx:
            client.request("GET", self.fake.url + "/user", {})
        self.assertIn("--ca-file", str(ctx.exception))

    def test_https_proxy_connect_tunnel(self):
        proxy = FakeConnectProxy()
        self.addCleanup(proxy.close)
        env = {"HTTPS_PROXY": "http://u:pw@127.0.0.1:%d" % proxy.port}
        client = new_client(self, ca_file=self.ca, environ=env)
        for _ in range(3):
            status, data, _, _ = client.request_json("GET", self.fake.url + "/user", {})
            self.assertEqual((status, data["login"]), (200, "octocat"))
        self.assertEqual(proxy.targets, ["127.0.0.1:%d" % self.fake.port])  # one tunnel, kept alive
        self.assertEqual(proxy.auth_headers[0], ["Proxy-Authorization: Basic dTpwdw=="])
        bypass = new_client(self, ca_file=self.ca, environ=dict(env, NO_PROXY="127.0.0.1"))
        bypass.request_json("GET", self.fake.url + "/user", {})
        self.assertEqual(len(proxy.targets), 1)

    def test_a_pooled_tls_connection_cut_without_close_notify_is_retried(self):
        def answer_then_cut(handler, body):  # no TLS close_notify: the client reads "EOF occurred
            handler.send_json(200, {"login": "first"})  # in violation of protocol"
            handler.wfile.flush()
            handler.close_connection = True
            socket.socket.shutdown(handler.connection, socket.SHUT_RDWR)
        self.fake.routes[("GET", "/user")] = answer_then_cut
        client = new_client(self, ca_file=self.ca)
        self.assertEqual(client.request_json("GET", self.fake.url + "/user", {})[1]["login"], "first")
        with client._lock:
            conn = client._pools[("https", "127.0.0.1", self.fake.port)][0][0]
        self.assertTrue(select.select([conn.sock], [], [], 5)[0])  # the cut has arrived
        self.fake.routes[("GET", "/user")] = lambda h, b: h.send_json(200, {"login": "again"})
        status, data, _, _ = client.request_json("GET", self.fake.url + "/user", {})
        self.assertEqual((status, data["login"]), (200, "again"))
        self.assertEqual(client.connections_opened, 2)

    def test_a_silent_tls_upstream_times_out(self):
        silence = threading.Event()
        self.addCleanup(silence.set)
        self.fake.routes[("GET", "/user")] = lambda handler, body: silence.wait(10)
        client = new_client(self, ca_file=self.ca, read_timeout=0.2)
        with self.assertRaises(coproxy.UpstreamUnreachable) as ctx:
            client.request("GET", self.fake.url + "/user", {})
        self.assertTrue(ctx.exception.timeout, ctx.exception)
        self.assertIn("timed out", str(ctx.exception))

    def test_a_tunnel_or_handshake_hung_up_on_is_retried_once(self):
        proxy = FakeConnectProxy()
        self.addCleanup(proxy.close)
        client = new_client(self, ca_file=self.ca, environ={"HTTPS_PROXY": "http://127.0.0.1:%d" % proxy.port})
        for drops in (["before_answer"], ["after_answer"]):
            client.close()
            client._closed = False
            proxy.drops[:] = drops
            status, data, _, _ = client.request_json("GET", self.fake.url + "/user", {})
            self.assertEqual((status, data["login"]), (200, "octocat"), drops)
            self.assertEqual(proxy.drops, [])
        client.close()
        client._closed = False
        proxy.drops[:] = ["before_answer", "after_answer"]  # only once: the second failure is the answer
        with self.assertRaises(coproxy.UpstreamUnreachable):
            client.request_json("GET", self.fake.url + "/user", {})

    def test_new_connections_resume_the_tls_session(self):
        client = new_client(self, ca_file=self.ca)
        self.assertEqual(client.request_json("GET", self.fake.url + "/user", {})[0], 200)
        client.close()
        client._closed = False
        held = list(client._tls_sessions.values())
        for _ in range(3):
            response = client.request("GET", self.fake.url + "/user", {})
            self.assertTrue(response._sock.session_reused)
            response.read_all(1000)
            client.close()
            client._closed = False
        # A resumed connection's session is not read again: the getter leaks a copy on CPython
        # 3.10-3.12 / 3.13.0 (gh-116810), ~6 KB per new upstream connection.
        self.assertEqual(len(held), 1)
        self.assertIs(list(client._tls_sessions.values())[0], held[0])


class TestImageFetcher(unittest.TestCase):
    """Images given by URL: public addresses only, checked on every hop, fresh connections."""

    def setUp(self):
        self.fake, self.tmp = with_fake_upstream(self)
        self.fake.routes[("GET", "/img.png")] = lambda h, b: h.send_body(200, PNG, "image/png")
        self.fake.routes[("GET", "/to-other")] = lambda h, b: h.send_body(
            302, b"", "text/plain", [("Location", "http://127.0.0.2:%d/img.png" % self.fake.port)])
        self.client = new_client(self)

    def test_what_is_public(self):
        for address in ("127.0.0.1", "10.1.2.3", "172.16.0.9", "192.168.1.1", "169.254.169.254", "100.64.0.1",
                        "0.0.0.0", "224.0.0.1", "255.255.255.255", "::1", "::", "fe80::1", "fc00::5", "fd12::1",
                        "ff02::1", "::ffff:127.0.0.1", "::ffff:10.0.0.1", "::127.0.0.1", "64:ff9b::a00:1",
                        "2002:c0a8:101::1", "2001:db8::1", "::ffff:0:127.0.0.1", "not an address"):
            self.assertFalse(coproxy.address_is_public(address), address)
        for address in ("8.8.8.8", "140.82.112.3", "2606:4700::1111", "::ffff:8.8.8.8", "2002:808:808::1"):
            self.assertTrue(coproxy.address_is_public(address), address)

    def test_loopback_and_names_that_resolve_to_it_are_refused_before_connecting(self):
        for url in (self.fake.url + "/img.png", "http://localhost:%d/img.png" % self.fake.port,
                    "http://[::ffff:127.0.0.1]:%d/img.png" % self.fake.port):
            with self.assertRaises(coproxy.ImageNotFetched) as ctx:
                coproxy.ImageFetcher(self.client).fetch(url)
            self.assertIn("non-public", str(ctx.exception))
        self.assertEqual(self.fake.requests_to("/img.png"), [])

    def test_every_redirect_hop_is_checked_and_the_pool_is_never_used(self):
        fetcher = coproxy.ImageFetcher(self.client)
        fetcher_allows = lambda address: address == "127.0.0.1"  # this test's "public internet"
        original = coproxy.address_is_public
        self.addCleanup(setattr, coproxy, "address_is_public", original)
        coproxy.address_is_public = fetcher_allows
        self.assertEqual(fetcher.fetch(self.fake.url + "/img.png"), ("image/png", PNG))
        with self.assertRaises(coproxy.ImageNotFetched) as ctx:
            fetcher.fetch(self.fake.url + "/to-other")
        self.assertIn("127.0.0.2", str(ctx.exception))
        self.assertEqual(len(self.fake.requests_to("/img.png")), 1)
        self.assertEqual((self.client._pools, self.client.connections_opened), ({}, 0))
        self.assertEqual(self.fake.requests_to("/img.png")[0][2].get("connection"), "close")

    def test_an_abort_cuts_a_tls_handshake_short(self):
        silent = socket.socket()  # accepts, then never answers the ClientHello
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        self.addCleanup(silent.close)
        abort = coproxy.AbortHandle()
        fetcher = coproxy.ImageFetcher(self.client, allow_private=True)
        result = []
        worker = threading.Thread(target=lambda: result.append(self._fails(
            fetcher.fetch, "https://127.0.0.1:%d/x.png" % silent.getsockname()[1], abort=abort)))
        started = time.monotonic()
        worker.start()
        conn, _ = silent.accept()
        self.addCleanup(conn.close)
        self.assertTrue(select.select([conn], [], [], 5)[0])  # the ClientHello is in: the handshake waits
        abort.abort()
        worker.join(5)
        self.assertLess(time.monotonic() - started, 3.0)  # not the 15 s connect timeout
        self.assertIsInstance(result[0], coproxy.ImageNotFetched)

    @staticmethod
    def _fails(call, *args, **kwargs):
        try:
            call(*args, **kwargs)
        except Exception as exc:
            return exc
        return None

    def test_allow_private_lifts_the_address_check_not_the_rest(self):
        fetcher = coproxy.ImageFetcher(self.client, allow_private=True)
        self.assertEqual(fetcher.fetch(self.fake.url + "/img.png")[1], PNG)
        self.fake.routes[("GET", "/page")] = lambda h, b: h.send_body(200, b"<html>", "text/html")
        for url, words in ((self.fake.url + "/page", "Content-Type text/html"),
                           ("gopher://x/", "not a usable"),
                           (self.fake.url + "/x\r\nEvil: 1", "HTTP 404")):
            with self.assertRaises(coproxy.ImageNotFetched) as ctx:
                fetcher.fetch(url)
            self.assertIn(words, str(ctx.exception))
        self.assertEqual(self.fake.requests_to("/x"), [])  # the CR/LF went out percent-encoded
        slow = threading.Event()
        self.addCleanup(slow.set)
        self.fake.routes[("GET", "/slow.png")] = lambda h, b: (slow.wait(5),
                                                               h.send_body(200, PNG, "image/png"))
        started = time.monotonic()
        with self.assertRaises(coproxy.ImageNotFetched):
            fetcher.fetch(self.fake.url + "/slow.png", timeout=0.1)
        self.assertLess(time.monotonic() - started, 2)


class TestDeviceFlow(unittest.TestCase):
    def setUp(self):
        install_log_capture()
        self.fake = FakeUpstream()
        self.addCleanup(self.fake.close)
        self.sleeps = []
        self.now = [0.0]

        def sleep(seconds):
            self.sleeps.append(seconds)
            self.now[0] += seconds
        self.flow = coproxy.DeviceFlow(new_client(self), coproxy.Config.resolve({"github_url": self.fake.url}, {}),
                                       sleep=sleep,
                                       clock=lambda: self.now[0])

    def run_flow(self, *answers):
        self.fake.poll_answers = list(answers)
        return self.flow.poll(self.flow.start())

    def test_pending_then_success(self):
        self.assertEqual(self.flow.start()["user_code"], "ABCD-1234")
        token = self.run_flow((400, {"error": "authorization_pending"}), (200, {"error": "authorization_pending"}),
                              (200, {"access_token": "ghu_new", "token_type": "bearer"}))
        self.assertEqual(token, "ghu_new")
        self.assertEqual(self.sleeps, [5, 5, 5])
        body = json.loads(self.fake.requests_to("/login/oauth/access_token")[0][3])
        self.assertEqual(body["grant_type"], "urn:ietf:params:oauth:grant-type:device_code")
        self.assertEqual(body["client_id"], "Iv1.b507a08c87ecfe98")

    def test_slow_down_adds_five_seconds_for_good(self):
        self.run_flow((200, {"error": "slow_down"}), (200, {"error": "authorization_pending"}),
                      (200, {"error": "slow_down", "interval": 20}), (200, {"error": "authorization_pending"}),
                      (200, {"access_token": "ghu_x"}))
        self.assertEqual(self.sleeps, [5, 10, 10, 20, 20])

    def test_expired_denied_and_unknown_errors_stop(self):
        for answer, code in (({"error": "expired_token"}, "expired_token"),
                             ({"error": "access_denied"}, "access_denied"),
                             ({"error": "device_flow_disabled", "error_description": "nope"}, "device_flow_disabled")):
            with self.assertRaises(coproxy.AuthError) as ctx:
                self.run_flow((400, answer))
            self.assertEqual(ctx.exception.code, code)

    def test_deadline_stops_polling(self):
        self.fake.routes[("POST", "/login/device/code")] = lambda h, b: h.send_json(200, {
            "device_code": "d", "user_code": "U-1", "verification_uri": "https://x", "expires_in": 12, "interval": 5})
        with self.assertRaises(coproxy.AuthError) as ctx:
            self.run_flow()
        self.assertEqual(ctx.exception.code, "expired_token")
        self.assertLessEqual(sum(self.sleeps), 12.01)

    def test_form_encoded_answer_is_understood(self):
        self.assertEqual(self.run_flow((200, "access_token=ghu_form&token_type=bearer")), "ghu_form")

    def test_refused_start_is_reported(self):
        self.fake.routes[("POST", "/login/device/code")] = lambda h, b: h.send_json(
            404, {"error": "Not Found", "error_description": "client unknown"})
        with self.assertRaises(coproxy.AuthError) as ctx:
            self.flow.start()
        self.assertIn("404", str(ctx.exception))


class TestCopilotAuth(unittest.TestCase):
    def setUp(self):
        self.fake, self.tmp = with_fake_upstream(self)
        self.now = [time.time()]
        self.fake.clock = lambda: self.now[0]
        self.auth = self.make_auth()

    def make_auth(self, **overrides):
        config = make_config(self.fake, self.tmp, **overrides)
        store = coproxy.TokenStore(self.tmp)
        return coproxy.CopilotAuth(config, store, new_client(self), clock=lambda: self.now[0])

    def test_exchange_is_cached_in_memory_and_on_disk(self):
        record = self.auth.copilot_token()
        self.assertTrue(record["token"].startswith("tid=test1"))
        self.assertEqual(self.auth.copilot_token()["token"], record["token"])
        self.assertEqual(self.fake.exchanges, 1)
        headers = self.fake.requests_to("/copilot_internal/v2/token")[0][2]
        self.assertEqual(headers["authorization"], "token ghu_testtoken1234567890")
        self.assertTrue(headers["editor-version"].startswith("vscode/"))
        self.assertIn("user-agent", headers)
        # A second process (new CopilotAuth) reuses the saved token.
        self.assertEqual(self.make_auth().copilot_token()["token"], record["token"])
        self.assertEqual(self.fake.exchanges, 1)
        self.assertEqual(self.auth.api_base(record), self.fake.url)

    def test_saved_token_of_another_github_token_is_not_reused(self):
        self.auth.copilot_token()
        other = self.make_auth(github_token="ghu_someoneelse123456")
        other.copilot_token()
        self.assertEqual(self.fake.exchanges, 2)

    def test_refresh_margin_and_refresh_in(self):
        self.auth.copilot_token()
        self.now[0] += 1499  # refresh_in is 1500
        self.auth.copilot_token()
        self.assertEqual(self.fake.exchanges, 1)
        self.now[0] += 2
        self.auth.copilot_token()
        self.assertEqual(self.fake.exchanges, 2)
        # Without refresh_in, the 5-minute margin before expires_at decides.
        self.fake.refresh_in = 0
        self.auth.copilot_token(force=True)
        self.now[0] += 1800 - 301
        self.auth.copilot_token()
        self.assertEqual(self.fake.exchanges, 3)
        self.now[0] += 2
        self.auth.copilot_token()
        self.assertEqual(self.fake.exchanges, 4)

    def test_single_flight_under_50_threads(self):
        self.auth.copilot_token()
        self.now[0] += 3600  # expired
        gate = self.fake.exchange_gate = threading.Event()
        results = []
        threads = [threading.Thread(target=lambda: results.append(self.auth.copilot_token()["token"]))
                   for _ in range(50)]
        for t in threads:
            t.start()
        self.assertTrue(wait_for(lambda: self.fake.exchanges == 2))
        gate.set()
        for t in threads:
            t.join(10)
        self.assertEqual(self.fake.exchanges, 2)
        self.assertEqual(len(set(results)), 1)
        self.assertEqual(len(results), 50)

    def test_invalidate_only_drops_the_failed_token(self):
        first = self.auth.copilot_token()["token"]
        second = self.auth.copilot_token(force=True)["token"]
        self.auth.invalidate(first)  # a late 401 for an old token changes nothing
        self.assertEqual(self.auth.copilot_token()["token"], second)
        self.auth.invalidate(second)
        self.assertNotEqual(self.auth.copilot_token()["token"], second)
        self.assertEqual(self.fake.exchanges, 3)

    def exchange_error(self, status, body, token="ghu_testtoken1234567890"):
        self.fake.token_status, self.fake.token_body = status, body
        with self.assertRaises(coproxy.AuthError) as ctx:
            self.make_auth(github_token=token).copilot_token()
        self.assertNotIn(token, str(ctx.exception))
        return ctx.exception

    def test_exchange_errors_name_cause_and_fix(self):
        exc = self.exchange_error(403, {"message": "x", "error_details": {
            "notification_id": "no_copilot_access", "url": "https://github.com/features/copilot"}})
        self.assertEqual(exc.code, "no_copilot_access")
        self.assertIn("no Copilot subscription", str(exc))
        self.assertIn("https://github.com/features/copilot", str(exc))
        exc = self.exchange_error(404, {"message": "Not Found"}, token="ghp_classicpat1234567890")
        self.assertEqual(exc.code, "personal_access_token")
        self.assertIn("auth login", str(exc))
        exc = self.exchange_error(404, {"message": "Not Found"})
        self.assertIn("no Copilot seat", str(exc))
        exc = self.exchange_error(401, {"message": "Bad credentials"})
        self.assertEqual(exc.code, "github_token_invalid")
        exc = self.exchange_error(403, {"message": "API rate limit exceeded for user ID 1."})
        self.assertEqual(exc.code, "rate_limited")

    def test_network_error_during_exchange(self):
        self.fake.close()
        with self.assertRaises(coproxy.AuthError) as ctx:
            self.auth.copilot_token()
        self.assertEqual(ctx.exception.code, "network")

    def test_not_logged_in(self):
        auth = self.make_auth(github_token=None)
        auth.config.github_token = None
        with self.assertRaises(coproxy.AuthError) as ctx:
            auth.copilot_token()
        self.assertIn("auth login", str(ctx.exception))

    def test_api_base_fallbacks(self):
        self.assertEqual(coproxy.exchanged_api_base(self.auth.config, {"token": "tid=1;proxy-ep=proxy.business.githubcopilot.com;x=1"}),
                         "https://api.business.githubcopilot.com")
        self.assertEqual(coproxy.exchanged_api_base(self.auth.config, {"token": "tid=1"}), "https://api.githubcopilot.com")
        ghe = self.make_auth(github_host="acme.ghe.com")
        self.assertEqual(coproxy.exchanged_api_base(ghe.config, {"token": "tid=1"}), "https://copilot-api.acme.ghe.com")
        override = self.make_auth(copilot_api_url="http://127.0.0.1:1/")
        self.assertEqual(override.api_base({"token": "t", "api_endpoint": "https://x"}), "http://127.0.0.1:1")

    def test_login_hints_name_the_state_dir_and_the_variable(self):
        auth = self.make_auth(github_token=None)
        auth.config.github_token = None
        with self.assertRaises(coproxy.AuthError) as ctx:
            auth.copilot_token()
        self.assertIn("auth login --state-dir %s" % self.tmp, str(ctx.exception))
        self.fake.token_status, self.fake.token_body = 401, {"message": "Bad credentials"}
        config = coproxy.Config.resolve({"github_url": self.fake.url, "github_api_url": self.fake.url,
                                         "state_dir": self.tmp}, environ={"GHCP_GITHUB_TOKEN": "ghu_expired123456789"})
        with self.assertRaises(coproxy.AuthError) as ctx:
            coproxy.CopilotAuth(config, coproxy.TokenStore(self.tmp), new_client(self)).copilot_token()
        self.assertIn("unset GHCP_GITHUB_TOKEN", str(ctx.exception))
        self.assertNotIn("ghu_expired", str(ctx.exception))

class TestTokenKinds(unittest.TestCase):
    """Each kind of GitHub token reaches Copilot its own way; where the token comes from."""

    def setUp(self):
        self.fake, self.tmp = with_fake_upstream(self)
        self.now = [time.time()]
        self.fake.clock = lambda: self.now[0]

    def make_auth(self, token, **overrides):
        overrides.setdefault("copilot_api_url", self.fake.url)  # direct mode's host: the fake
        config = make_config(self.fake, self.tmp, github_token=token, **overrides)
        return coproxy.CopilotAuth(config, coproxy.TokenStore(self.tmp), new_client(self),
                                   clock=lambda: self.now[0])

    def models_call(self):
        return self.fake.requests_to("/models")[-1][2]

    def test_each_kind_takes_its_path(self):
        pat = self.make_auth("github_pat_11AAfinegrained")
        self.assertEqual(len(pat.fetch_models()), len(CATALOG_IDS))
        headers = self.models_call()
        self.assertEqual(headers["authorization"], "Bearer github_pat_11AAfinegrained")
        self.assertEqual(headers["copilot-integration-id"], "copilot-developer-cli")
        # a PAT never reaches the exchange
        self.assertEqual(self.fake.requests_to("/copilot_internal/v2/token"), [])
        self.assertEqual(pat.describe()["mode"], "direct")
        self.assertEqual(pat.describe()["payer"], "user (the token's account)")
        self.assertIsNone(pat.describe()["expires_at"])
        oauth = self.make_auth("gho_oauthtoken123456")
        oauth.fetch_models()
        self.assertTrue(self.models_call()["authorization"].startswith("Bearer tid=test1"))
        self.assertEqual(self.models_call()["copilot-integration-id"], "vscode-chat")
        self.assertEqual((self.fake.exchanges, oauth.describe()["mode"]), (1, "exchange"))
        classic = self.make_auth("ghp_classictoken123456")
        with self.assertRaises(coproxy.AuthError) as ctx:
            classic.fetch_models()
        self.assertEqual(ctx.exception.code, "personal_access_token")
        self.assertIn("github_pat_", str(ctx.exception))
        self.assertEqual(self.fake.exchanges, 1)  # refused before any call

    def test_app_tokens_go_directly_first_then_through_the_exchange_and_it_is_remembered(self):
        self.fake.app_tokens.add("ghs_installation1234567890")
        direct = self.make_auth("ghs_installation1234567890")
        direct.fetch_models()
        self.assertEqual(self.models_call()["authorization"], "Bearer ghs_installation1234567890")
        self.assertEqual((direct.app_token_path, self.fake.exchanges), ("direct", 0))
        self.assertEqual(direct.describe()["payer"], "organisation (GitHub App installation)")
        self.fake.app_direct_refusal = (403, "forbidden")
        exchanged = self.make_auth("ghs_installation1234567890")
        exchanged.fetch_models()
        self.assertTrue(self.models_call()["authorization"].startswith("Bearer tid=test1"))
        self.assertEqual((exchanged.app_token_path, self.fake.exchanges), ("exchange", 1))
        calls = len(self.fake.requests_to("/models"))
        exchanged.fetch_models()
        self.assertEqual(len(self.fake.requests_to("/models")), calls + 1)  # no direct try again
        logged = "\n".join(LOGS.lines)
        self.assertIn("refused the App installation token sent directly", logged)

    def test_auth_mode_and_integration_id_override_the_rules(self):
        pat = self.make_auth("github_pat_11AAfinegrained", auth_mode="exchange")
        with self.assertRaises(coproxy.AuthError) as ctx:
            pat.fetch_models()
        self.assertIn("--auth-mode direct", str(ctx.exception))
        self.assertIn("Resource not accessible by personal access token", str(ctx.exception))
        self.assertNotIn("github_pat_11", str(ctx.exception))
        oauth = self.make_auth("ghu_testtoken1234567890", auth_mode="direct")
        oauth.fetch_models()
        self.assertEqual(self.models_call()["authorization"], "Bearer ghu_testtoken1234567890")
        self.assertEqual(self.models_call()["copilot-integration-id"], "vscode-chat")
        self.assertEqual(self.fake.exchanges, 0)
        chosen = self.make_auth("ghu_testtoken1234567890", integration_id="my-tool",
                                api_version="2026-09-01")
        chosen.fetch_models()
        self.assertEqual(self.models_call()["copilot-integration-id"], "my-tool")
        self.assertEqual(self.models_call()["x-github-api-version"], "2026-09-01")

    def test_direct_hosts(self):
        def base(**values):
            config = coproxy.Config.resolve(dict(values, state_dir=self.tmp), environ={})
            return coproxy.direct_api_base(config)
        self.assertEqual(base(), "https://api.githubcopilot.com")
        self.assertEqual(base(github_host="acme.ghe.com"), "https://copilot-api.acme.ghe.com")
        self.assertEqual(base(github_host="ghes.example.com"),
                         "https://api.enterprise.githubcopilot.com")
        self.assertEqual(base(copilot_api_url="http://127.0.0.1:9/"), "http://127.0.0.1:9")

    def test_token_sources_in_order_and_never_github_token(self):
        def auth(values, environ):
            values = dict({"github_url": self.fake.url, "github_api_url": self.fake.url,
                           "state_dir": self.tmp}, **values)
            return coproxy.CopilotAuth(coproxy.Config.resolve(values, environ=environ),
                                       coproxy.TokenStore(self.tmp), new_client(self))
        coproxy.TokenStore(self.tmp).save_github_token("ghu_savedlogin123456")
        saved = auth({}, {"GITHUB_TOKEN": "ghs_repositorytoken1"}).github_token()[0]
        self.assertEqual(saved, "ghu_savedlogin123456")
        environ = {"COPILOT_GITHUB_TOKEN": "github_pat_11cli", "GITHUB_TOKEN": "x"}
        self.assertEqual(auth({}, environ).github_token(),
                         ("github_pat_11cli", "COPILOT_GITHUB_TOKEN"))
        path = os.path.join(self.tmp, "token")
        coproxy.write_file_atomic(path, "github_pat_11fromfile\n")
        from_file = auth({"github_token_file": path}, {"COPILOT_GITHUB_TOKEN": "github_pat_11cli"})
        self.assertEqual(from_file.github_token(), ("github_pat_11fromfile", path))
        coproxy.write_file_atomic(path, "github_pat_11rotated\n")  # a secret manager rotates it
        self.assertEqual(from_file.github_token()[0], "github_pat_11rotated")
        flag = auth({"github_token": "ghu_flag1234567890"}, {"COPILOT_GITHUB_TOKEN": "x"})
        self.assertEqual(flag.github_token()[0], "ghu_flag1234567890")
        os.chmod(path, 0o644)
        with self.assertRaises(coproxy.AuthError) as ctx:
            from_file.github_token()
        self.assertIn("chmod 600 %s" % path, str(ctx.exception))
        os.unlink(path)
        with self.assertRaises(coproxy.AuthError) as ctx:
            from_file.copilot_token()
        self.assertIn("the token file %s is missing or empty" % path, str(ctx.exception))
        self.assertTrue(from_file.has_credentials())
        # what `auth login` and `auth logout` warn about: a source that wins over a saved login
        def ahead(environ, **values):
            config = coproxy.Config.resolve(dict(values, state_dir=self.tmp), environ=environ)
            return coproxy.token_source_before_login(config)
        self.assertIsNone(ahead({"GITHUB_TOKEN": "ghs_repositorytoken1"}))
        self.assertEqual(ahead({"COPILOT_GITHUB_TOKEN": "x"}), "COPILOT_GITHUB_TOKEN")
        self.assertEqual(ahead({}, github_token_file=path), "--github-token-file %s" % path)
        if hasattr(os, "mkfifo"):  # a FIFO planted at the path is refused at once, not waited on
            os.mkfifo(path, 0o600)
            with self.assertRaises(coproxy.AuthError) as ctx:
                from_file.github_token()
            self.assertIn("not a regular file", str(ctx.exception))


class TestRS256(unittest.TestCase):
    """The App JWT's signature, in the standard library only."""

    def test_rfc_7515_appendix_a2_from_pkcs1_and_pkcs8(self):
        for pkcs8 in (False, True):
            key = coproxy.parse_rsa_private_key(rsa_key_pem(RFC7515_KEY, pkcs8))
            self.assertEqual(key, tuple(RFC7515_KEY[name] for name in ("n", "e", "d", "p", "q")))
            signature = coproxy.rs256_sign(key, RFC7515_SIGNING_INPUT)
            self.assertEqual(coproxy.b64url(signature), RFC7515_SIGNATURE)

    def test_app_jwt_claims_and_signature(self):
        key = coproxy.parse_rsa_private_key(rsa_key_pem(RFC7515_KEY))
        token = coproxy.app_jwt(4242, key, 1700000000)
        header, claims, signature = token.split(".")
        self.assertEqual(json.loads(b64url_decode(header)), {"alg": "RS256", "typ": "JWT"})
        self.assertEqual(json.loads(b64url_decode(claims)),
                         {"iat": 1699999940, "exp": 1700000540, "iss": 4242})
        size = RFC7515_KEY["n"].bit_length() // 8
        number = int.from_bytes(b64url_decode(signature), "big")
        signed = pow(number, RFC7515_KEY["e"], RFC7515_KEY["n"]).to_bytes(size, "big")
        self.assertEqual(signed, emsa_pkcs1_sha256((header + "." + claims).encode(), size))

    def test_unusable_keys_say_why(self):
        pem = rsa_key_pem(RFC7515_KEY)
        pkcs8_without_key = "-----BEGIN PRIVATE KEY-----\nMAMCAQA=\n-----END PRIVATE KEY-----"
        pkcs1_cut = "-----BEGIN RSA PRIVATE KEY-----\nMAUCAQACAQ==\n-----END RSA PRIVATE KEY-----"
        cases = [("hello", "no PEM private key"),
                 (pem.replace("RSA PRIVATE KEY", "ENCRYPTED PRIVATE KEY"), "passphrase"),
                 (pem.replace("MII", "M!I", 1), "not valid base64"),
                 (rsa_key_pem(dict(RFC7515_KEY, n=RFC7515_KEY["n"] + 2)), "do not fit together"),
                 (pkcs8_without_key, "PKCS#8 key is malformed"), (pkcs1_cut, "cut short")]
        for text, reason in cases:
            with self.assertRaises(ValueError) as ctx:
                coproxy.parse_rsa_private_key(text)
            self.assertIn(reason, str(ctx.exception), text[:40])

    def test_a_faulty_crt_half_is_caught_before_the_signature_leaves(self):
        # A wrong q^-1-style fault: d that does not match e gives a signature that fails
        # verification; it must raise, never return bytes from which the key can be factored.
        key = tuple(RFC7515_KEY[name] for name in ("n", "e", "d", "p", "q"))
        faulty = key[:2] + (key[2] + 2,) + key[3:]
        with self.assertRaises(coproxy.ConfigError):
            coproxy.rs256_sign(faulty, RFC7515_SIGNING_INPUT)


MINT_PATH = "/app/installations/%d/access_tokens" % FAKE_INSTALLATION_ID


class TestGitHubApp(unittest.TestCase):
    """Minting organisation-billed installation tokens against the fake GitHub, and using them."""

    def setUp(self):
        self.fake, self.tmp = with_fake_upstream(self)
        self.now = [time.time()]
        self.fake.clock = lambda: self.now[0]
        self.key_file = os.path.join(self.tmp, "app.pem")
        coproxy.write_file_atomic(self.key_file, rsa_key_pem(RFC7515_KEY, pkcs8=True))

    def make_auth(self, **overrides):
        values = dict(github_token=None, github_app_id=FAKE_APP_ID, github_app_org="acme",
                      github_app_key_file=self.key_file, copilot_api_url=self.fake.url)
        values.update(overrides)
        config = make_config(self.fake, self.tmp, **values)
        return coproxy.CopilotAuth(config, coproxy.TokenStore(self.tmp), new_client(self),
                                   clock=lambda: self.now[0])

    def bearer(self):
        return self.fake.requests_to("/models")[-1][2]["authorization"]

    def test_mints_uses_and_mints_again_before_the_hour_ends(self):
        auth = self.make_auth()
        self.assertEqual(len(auth.fetch_models()), len(CATALOG_IDS))
        self.assertEqual(len(self.fake.requests_to("/orgs/acme/installation")), 1)
        mint = self.fake.requests_to(MINT_PATH)[0]
        self.assertEqual(json.loads(mint[3]),
                         {"permissions": {"organization_copilot_requests": "read"}})
        claims = self.fake.jwt_claims[0]
        self.assertEqual((claims["iss"], claims["exp"] - claims["iat"]), (FAKE_APP_ID, 600))
        headers = self.fake.requests_to("/models")[-1][2]
        self.assertEqual(headers["authorization"], "Bearer ghs_minted1_" + "x" * 40)
        self.assertEqual(headers["copilot-integration-id"], "copilot-developer-cli")
        facts = auth.describe()
        self.assertEqual((facts["token_kind"], facts["mode"], facts["app_permission"]),
                         ("app-installation", "direct", "organization_copilot_requests=read"))
        self.assertAlmostEqual(facts["expires_at"], self.now[0] + 3600, delta=2)
        self.now[0] += 3600 - 299  # in the last five minutes: a new token, same installation id
        auth.fetch_models()
        self.assertEqual(self.bearer(), "Bearer ghs_minted2_" + "x" * 40)
        self.assertEqual(len(self.fake.requests_to("/orgs/acme/installation")), 1)
        self.fake.app_tokens.clear()  # Copilot no longer takes it (revoked): 401, a new token
        auth.fetch_models()
        self.assertEqual(self.bearer(), "Bearer ghs_minted3_" + "x" * 40)
        self.assertEqual(auth.app.mints, 3)
        self.assertEqual(self.fake.exchanges, 0)
        text = "\n".join(LOGS.lines)
        self.assertNotIn("ghs_minted", text)
        self.assertIn("minted an installation token", text)

    def test_what_the_dashboard_reads_of_the_login_never_mints(self):
        # the dashboard asks from the event loop: a mint there (network, RS256) would stall it
        auth = self.make_auth()
        self.assertEqual(coproxy.peek_github_token(auth), ("GitHub App installation token", auth.app.source))
        self.assertEqual((auth.app.mints, len(self.fake.requests_to(MINT_PATH))), (0, 0))

    def test_older_permission_form_when_the_new_one_is_refused_and_single_flight(self):
        self.fake.grant_new_permission_form = False
        auth = self.make_auth(github_app_org=None, github_app_installation_id=FAKE_INSTALLATION_ID)
        gate = self.fake.mint_gate = threading.Event()
        results = []
        threads = [threading.Thread(target=lambda: results.append(auth.github_token()[0]))
                   for _ in range(20)]
        for thread in threads:
            thread.start()
        self.assertTrue(wait_for(lambda: len(self.fake.requests_to(MINT_PATH)) == 1))
        gate.set()
        for thread in threads:
            thread.join(10)
        self.assertEqual(len(set(results)), 1)
        self.assertEqual(len(results), 20)
        forms = [json.loads(r[3]) for r in self.fake.requests_to(MINT_PATH)]
        self.assertEqual(forms, [{"permissions": {"organization_copilot_requests": "read"}},
                                 {"permissions": {"copilot_requests": "write"}}])
        facts = auth.describe(auth.copilot_token())
        self.assertEqual(facts["app_permission"], "copilot_requests=write")

    def test_refusals_say_what_to_check(self):
        def refusal(auth):
            with self.assertRaises(coproxy.AuthError) as ctx:
                auth.copilot_token()
            return str(ctx.exception)
        message = refusal(self.make_auth(github_app_org="other-org"))
        self.assertIn("not installed on other-org", message)
        self.assertIn("Integration not found", refusal(self.make_auth(github_app_id=1)))
        message = refusal(self.make_auth(github_app_org=None, github_app_installation_id=78))
        self.assertIn("--github-app-installation-id 78", message)
        self.fake.clock = lambda: self.now[0] - 3600  # this machine's clock is an hour ahead
        message = refusal(self.make_auth())
        self.assertIn("'Expiration time' claim ('exp') is too far in the future", message)
        self.fake.clock = lambda: self.now[0]
        refused = {"message": "The permissions requested are not granted to this installation."}
        self.fake.routes[("POST", MINT_PATH)] = lambda h, b: h.send_json(422, refused)
        message = refusal(self.make_auth())
        self.assertIn("not granted the Copilot Requests permission", message)
        self.assertIn("organization_copilot_requests=read and copilot_requests=write", message)
        self.assertEqual(len(self.fake.requests_to(MINT_PATH)), 2)
        undecodable = {"message": "A JSON web token could not be decoded"}
        self.fake.routes[("POST", MINT_PATH)] = lambda h, b: h.send_json(401, undecodable)
        message = refusal(self.make_auth())
        self.assertIn("HTTP 401", message)
        self.assertIn("clock", message)

    def test_the_key_file_follows_the_state_dirs_rules(self):
        os.chmod(self.key_file, 0o640)
        with self.assertRaises(coproxy.ConfigError) as ctx:
            self.make_auth()
        self.assertIn("chmod 600 %s" % self.key_file, str(ctx.exception))
        coproxy.write_file_atomic(self.key_file, "not a key")
        with self.assertRaises(coproxy.ConfigError) as ctx:
            self.make_auth()
        self.assertIn("no PEM private key", str(ctx.exception))
        for values, message in (({"github_app_id": 1}, "needs --github-app-key-file"),
                                ({"github_app_id": 1, "github_app_key_file": "k"}, "needs one of"),
                                ({"github_app_org": "acme"}, "needs --github-app-id"),
                                ({"github_token": "ghu_x", "github_token_file": "f"}, "keep one")):
            with self.assertRaises(coproxy.ConfigError) as ctx:
                coproxy.Config.resolve(dict(values, state_dir=self.tmp), environ={})
            self.assertIn(message, str(ctx.exception))


class TestAutoSession(unittest.TestCase):
    """The Auto model's session: asked once, kept until shortly before it expires, renewed."""

    def setUp(self):
        self.fake, self.tmp = with_fake_upstream(self)
        self.now = [time.time()]
        self.fake.clock = lambda: self.now[0]
        config = make_config(self.fake, self.tmp)
        self.auth = coproxy.CopilotAuth(config, coproxy.TokenStore(self.tmp), new_client(self),
                                        clock=lambda: self.now[0])

    def test_single_flight_then_kept_then_renewed_with_the_old_token(self):
        gate = self.fake.exchange_gate = threading.Event()  # the first caller waits in the exchange
        results = []
        def ask():
            results.append(self.auth.auto.session()["token"])
        threads = [threading.Thread(target=ask) for _ in range(20)]
        for thread in threads:
            thread.start()
        self.assertTrue(wait_for(lambda: self.fake.exchanges == 1))
        gate.set()
        for thread in threads:
            thread.join(10)
        self.assertEqual((results, self.fake.auto_calls), (["sess-1"] * 20, 1))
        first = self.fake.requests_to("/auto")[0]
        self.assertEqual(first[2]["x-github-api-version"], "2026-08-01")
        self.assertNotIn("copilot-session-token", first[2])
        self.now[0] += 86400 - 301
        self.assertEqual(self.auth.auto.session()["model"], "claude-sonnet-4.5")
        self.assertEqual(self.fake.auto_calls, 1)
        self.now[0] += 2  # within five minutes of its end
        self.assertEqual(self.auth.auto.session()["token"], "sess-2")
        self.assertEqual(self.fake.requests_to("/auto")[1][2]["copilot-session-token"], "sess-1")

    def test_legacy_endpoint_when_auto_is_refused_and_errors(self):
        not_found = {"message": "Not Found"}
        self.fake.routes[("POST", "/auto")] = lambda h, b: h.send_json(404, not_found)
        session = self.auth.auto.session()
        self.assertEqual((session["model"], session["token"], session["entry"]),
                         ("gpt-4.1", "legacy-1", None))
        legacy = self.fake.requests_to("/models/session")[0]
        self.assertEqual(legacy[2]["x-github-api-version"], "2025-07-16")
        self.auth.auto.current = None
        self.auth.auto.session()
        self.assertEqual(len(self.fake.requests_to("/auto")), 1)  # not asked again
        boom = {"message": "boom"}
        self.fake.routes[("POST", "/models/session")] = lambda h, b: h.send_json(500, boom)
        self.auth.auto.current = None
        with self.assertRaises(coproxy.ClientError) as ctx:
            self.auth.auto.session()
        self.assertEqual((ctx.exception.status, ctx.exception.code), (502, "auto_unavailable"))
        self.assertIn("/models/session answered HTTP 500: boom", str(ctx.exception))


def translate(chain, dialect, *pieces, end=True):
    """Upstream SSE bytes through a StreamTranslation; the client bytes, and the translation."""
    translation = coproxy.StreamTranslation(chain, dialect)
    out = b"".join(translation.feed(piece) for piece in pieces)
    return out + (translation.end() if end else b""), translation


def whole_chat(data, model, now):
    """A whole chat completion from Copilot as coproxy answers it (choices merged)."""
    return coproxy.translate_whole([coproxy.ChatNormalize(model, True, True, now)], coproxy.OPENAI,
                                   coproxy.chat_answer_items(data))


def whole_anthropic(data, model):
    """A whole chat completion from Copilot as an Anthropic message."""
    return coproxy.translate_whole([coproxy.ChatToAnthropic(model)], coproxy.ANTHROPIC,
                                   coproxy.chat_answer_items(data))


def whole_chat_from_responses(data, model, now):
    """A whole Response from Copilot as a chat completion."""
    return coproxy.translate_whole([coproxy.ResponsesToChat(model, True, now)], coproxy.OPENAI,
                                   coproxy.responses_answer_items(data))


class TestBodies(unittest.TestCase):
    """Request bodies as clients compress them (Codex sends zstd or gzip)."""

    def test_gzip_deflate_and_identity(self):
        body = b'{"model":"m"}' * 100
        self.assertEqual(coproxy.decode_body(gzip.compress(body), "gzip", 10000), body)
        self.assertEqual(coproxy.decode_body(zlib.compress(body), "deflate", 10000), body)
        raw_deflate = zlib.compressobj(wbits=-15)
        self.assertEqual(coproxy.decode_body(raw_deflate.compress(body) + raw_deflate.flush(), "deflate", 10000), body)
        self.assertEqual(coproxy.decode_body(body, None, 10), body)  # the body cap is the reader's job

    def test_bombs_truncation_and_unknown_encodings(self):
        bomb = gzip.compress(b"a" * (10 << 20))
        for raw, encoding, status, code in ((bomb, "gzip", 413, "request_too_large"),
                                            (gzip.compress(b"{}")[:-6], "gzip", 400, "invalid_encoding"),
                                            (b"not gzip", "gzip", 400, "invalid_encoding"),
                                            (b"{}", "br", 415, "unsupported_content_encoding")):
            with self.assertRaises(coproxy.ClientError) as ctx:
                coproxy.decode_body(raw, encoding, 1 << 20)
            self.assertEqual((ctx.exception.status, ctx.exception.code), (status, code))

    def test_zstd_names_codex_switch_where_python_lacks_it(self):
        try:
            zstd = importlib.import_module("compression.zstd")  # standard library from Python 3.14
        except ImportError:
            zstd = None
        if zstd is None:
            with self.assertRaises(coproxy.ClientError) as ctx:
                coproxy.decode_body(b"\x28\xb5\x2f\xfd", "zstd", 100)
            self.assertEqual(ctx.exception.status, 415)
            self.assertIn("features.enable_request_compression=false", str(ctx.exception))
        else:
            self.assertEqual(coproxy.decode_body(zstd.compress(b"{}"), "zstd", 100), b"{}")


class TestFieldChecks(unittest.TestCase):
    """Every field coproxy reads has its type checked: a 400 naming it, never a crash later."""

    def refused(self, check, payload, field):
        with self.assertRaises(coproxy.ClientError) as ctx:
            check(payload)
        self.assertEqual(ctx.exception.status, 400)
        self.assertIn(field, str(ctx.exception))

    def test_chat(self):
        ok = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
        check = lambda p: coproxy.validate_chat_request(p)
        for extra, field in (({"stream": "yes"}, "stream"), ({"tools": "none"}, "tools"), ({"n": [1]}, "n"),
                             ({"n": True}, "n"), ({"max_tokens": "9"}, "max_tokens"),
                             ({"stream_options": []}, "stream_options"), ({"tool_choice": 3}, "tool_choice"),
                             ({"reasoning_effort": {}}, "reasoning_effort"), ({"tools": [{"function": "x"}]}, "tools[0].function"),
                             ({"messages": [{"role": "user", "content": [{"type": {"a": 1}}]}]}, "messages[0].content[0].type"),
                             ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
                             ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": 3}]}]},
                              "image_url"),
                             ({"messages": "x"}, "messages"), ({"messages": [3]}, "messages[0]"), ({"model": 4}, "model")):
            self.refused(check, dict(ok, **extra), field)
        self.assertEqual(check(dict(ok, stream=True, n=2, stream_options={"include_usage": True})), ("m", True, True, False))
        self.assertEqual(coproxy.validate_chat_request({"messages": ok["messages"]}, "dflt")[0], "dflt")

    def test_anthropic_responses_and_embeddings(self):
        ok = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}
        for extra, field in (({"system": 5}, "system"), ({"tools": [{"name": 1}]}, "tools.0.name"),
                             ({"thinking": {"budget_tokens": "x"}}, "thinking.budget_tokens"),
                             ({"output_config": {"effort": 1}}, "output_config.effort"), ({"stream": 1}, "stream"),
                             ({"max_tokens": True}, "max_tokens"), ({"stop_sequences": [1]}, "stop_sequences[0]"),
                             ({"messages": [{"role": "user", "content": [{"type": "tool_result", "content": [{}]}]}]},
                              "type")):
            self.refused(coproxy.validate_anthropic_request, dict(ok, **extra), field)
        for payload, field in (({"model": "m", "input": 3}, "input"), ({"model": "m", "input": [{"type": 1}]}, "type"),
                               ({"model": "m", "reasoning": {"effort": 2}}, "reasoning.effort"), ({}, "model")):
            self.refused(coproxy.validate_responses_request, payload, field)
        self.refused(coproxy.prepare_embeddings_request, {"model": "m", "input": "x", "dimensions": "2"}, "dimensions")


class TestSSECodec(unittest.TestCase):
    TRANSCRIPT = (b": comment\r\ndata: {\"a\": 1}\r\n\r\nevent: message_start\ndata: line one\ndata: line two\n\n"
                  b"data: caf\xc3\xa9 \xe2\x82\xac\r\rdata: [DONE]\n\n")
    EXPECTED = [(None, '{"a": 1}'), ("message_start", "line one\nline two"), (None, "caf\u00e9 \u20ac"),
                (None, "[DONE]")]

    def decode(self, pieces):
        decoder = coproxy.SSEDecoder()
        events = []
        for piece in pieces:
            events.extend(decoder.feed(piece))
        events.extend(decoder.finish())
        return events

    def test_every_split_point(self):
        data = self.TRANSCRIPT
        for cut in range(len(data) + 1):
            self.assertEqual(self.decode([data[:cut], data[cut:]]), self.EXPECTED, cut)

    def test_random_splits_and_single_bytes(self):
        rng = random.Random(1234)
        data = self.TRANSCRIPT
        for _ in range(200):
            cuts = sorted(rng.sample(range(1, len(data)), 5))
            pieces = [data[a:b] for a, b in zip([0] + cuts, cuts + [len(data)])]
            self.assertEqual(self.decode(pieces), self.EXPECTED)
        self.assertEqual(self.decode([bytes([b]) for b in data]), self.EXPECTED)

    def test_stream_without_final_blank_line(self):
        self.assertEqual(self.decode([b"data: x"]), [(None, "x")])
        self.assertEqual(self.decode([b"data: x\r"]), [(None, "x")])

    def test_encode(self):
        self.assertEqual(coproxy.encode_sse(b"{}"), b"data: {}\n\n")
        self.assertEqual(coproxy.encode_sse(b"{}", "ping"), b"event: ping\ndata: {}\n\n")

    def test_encode_keeps_multi_line_data_as_data(self):
        self.assertEqual(coproxy.encode_sse(b"a\nb"), b"data: a\ndata: b\n\n")


class TestTranslateOpenAI(unittest.TestCase):
    def test_initiator_follows_the_last_message(self):
        user = {"role": "user", "content": "q"}
        self.assertEqual(coproxy.chat_initiator([user]), "user")
        self.assertEqual(coproxy.chat_initiator([user, {"role": "assistant", "content": "a"}, user]), "user")
        self.assertEqual(coproxy.chat_initiator([user, {"role": "assistant", "tool_calls": []}]), "agent")
        self.assertEqual(coproxy.chat_initiator([user, {"role": "tool", "content": "r"}]), "agent")

    def test_vision_anywhere_in_history(self):
        image = {"role": "user", "content": [{"type": "text", "text": "see"},
                                             {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}]}
        self.assertTrue(coproxy.has_image({"messages": [image, {"role": "assistant", "content": "ok"},
                                                        {"role": "user", "content": "more"}]}))
        self.assertFalse(coproxy.has_image({"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}]}))
        tool_output = {"input": [{"type": "function_call_output", "call_id": "c", "output": [
            {"type": "input_image", "image_url": "data:image/png;base64,AA"}]}]}  # a Responses tool's screenshot
        self.assertTrue(coproxy.has_image(tool_output))

    def test_split_claude_choices_are_merged(self):
        data = {"id": "x", "model": "claude-sonnet-4.5", "choices": [
            {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "Let me look."}},
            {"index": 1, "finish_reason": "tool_calls", "message": {"role": "assistant", "tool_calls": [
                {"id": "t1", "type": "function", "function": {"name": "ls", "arguments": "{}"}}]}}]}
        out = whole_chat(data, "claude-sonnet-4.5", 1700000000)
        self.assertEqual(len(out["choices"]), 1)
        choice = out["choices"][0]
        self.assertEqual(choice["finish_reason"], "tool_calls")
        self.assertEqual(choice["message"]["content"], "Let me look.")
        self.assertEqual(choice["message"]["tool_calls"][0]["id"], "t1")
        self.assertEqual((out["object"], out["created"]), ("chat.completion", 1700000000))
        self.assertEqual(out["usage"], {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0})

    def stream(self, include_usage, merge, *events):
        out, translation = translate([coproxy.ChatNormalize("gpt-4.1", include_usage, merge, 1700000000)],
                                     coproxy.OPENAI, *events)
        return sse_data(out), translation

    def test_one_model_name_per_answer_the_one_copilot_names(self):
        dated = "gpt-4.1-2025-04-14"

        def compact(**fields):  # as Copilot writes chunks: the pass-through path takes these
            body = {"id": "chatcmpl-up", "model": dated, "created": 1764500000,
                    "choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": None}]}
            body.update(fields)
            return sse(json.dumps(body, separators=(",", ":")).encode())
        usage = sse({"id": "chatcmpl-up", "model": "gpt-4.1", "choices": [],
                     "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}})
        for merge in (False, True):
            data, _ = self.stream(True, merge, compact(), compact(), compact(model="gpt-4.1"),
                                  compact(choices=[{"index": 0, "delta": {}, "finish_reason": "stop"}]), usage, DONE)
            chunks = [d for d in data if d != "[DONE]"]
            self.assertEqual({c["model"] for c in chunks}, {dated}, merge)
            self.assertIn("usage", chunks[-1])
        answer = whole_chat({"model": dated, "choices": []}, "gpt-4.1", 1700000000)
        self.assertEqual(answer["model"], dated)  # the same rule without a stream
        self.assertEqual(whole_chat({"choices": []}, "gpt-4.1", 0)["model"], "gpt-4.1")
        out, _ = translate([coproxy.ChatToAnthropic("claude-sonnet-4.5")], coproxy.ANTHROPIC,
                           chunk("hi", model="claude-sonnet-4.5-20250929"), chunk(None, "stop"), DONE)
        self.assertEqual(sse_events(out)[0][1]["message"]["model"], "claude-sonnet-4.5-20250929")
        out, _ = translate([coproxy.ResponsesToChat("gpt-5.1-codex", True, 0)], coproxy.OPENAI,
                           sse({"type": "response.created", "response": {"id": "r", "model": "gpt-5.1-codex-1113"}}),
                           sse({"type": "response.output_text.delta", "delta": "yo"}),
                           sse({"type": "response.completed", "response": {"id": "r", "status": "completed", "usage": {
                               "input_tokens": 1, "output_tokens": 1, "total_tokens": 2}}}))
        chunks = [d for d in sse_data(out) if d != "[DONE]"]
        self.assertEqual(({c["model"] for c in chunks}, "usage" in chunks[-1]), ({"gpt-5.1-codex-1113"}, True))

    def test_stream_usage_only_when_asked_with_copilots_cost(self):
        for include in (False, True):
            data, translation = self.stream(include, True, chunk("Hi"), chunk(None, "stop"), COST_CHUNK, DONE)
            self.assertEqual(data[-1], "[DONE]")
            usage_chunks = [d for d in data[:-1] if d.get("usage")]
            self.assertEqual(len(usage_chunks), 1 if include else 0)
            if include:
                self.assertEqual((usage_chunks[0]["choices"], usage_chunks[0]["usage"]["total_tokens"]), ([], 7))
                self.assertEqual(usage_chunks[0]["copilot_usage"]["total_nano_aiu"], 4500000000)
            for d in data[:-1]:
                self.assertEqual((d["object"], d["id"]), ("chat.completion.chunk", "chatcmpl-up"))
            self.assertEqual(translation.source.usage, {"input": 5, "cached": 0, "output": 2, "reasoning": 0,
                                                         "nano_aiu": 4500000000})

    def test_plain_deltas_pass_as_they_are_and_the_rest_is_rewritten(self):
        plain = b'data: {"choices":[{"index":0,"delta":{"content":"x \\"usage\\" is text"}}],"created":5,"id":"c1","model":"m"}\n\n'
        out, _ = translate([coproxy.ChatNormalize("m", False, True, 7)], coproxy.OPENAI, chunk("first", id="c1", model="m"),
                           plain, chunk(None, "stop", id="c1"), DONE)
        frames = out.split(b"\n\n")
        self.assertEqual(frames[1], b'data: {"object":"chat.completion.chunk",' + plain[7:-2])
        data = sse_data(out)
        self.assertEqual([d["choices"][0].get("finish_reason") for d in data[:-1] if d["choices"]], [None, None, "stop"])
        self.assertEqual(data[1]["choices"][0]["delta"]["content"], 'x "usage" is text')

    def test_stream_split_choices_merged_with_one_finish(self):
        data, _ = self.stream(False, True, chunk("Looking", index=0), chunk(None, "stop", index=0),
                              chunk(None, index=1, tool_calls=[{"index": 0, "id": "t1", "type": "function",
                                                                "function": {"name": "ls", "arguments": ""}}]),
                              chunk(None, index=1, tool_calls=[{"index": 0, "function": {"arguments": "{}"}}]),
                              chunk(None, "tool_calls", index=1), DONE)
        finishes = [c["finish_reason"] for d in data[:-1] for c in d["choices"] if c.get("finish_reason")]
        self.assertEqual(finishes, ["tool_calls"])
        self.assertTrue(all(c["index"] == 0 for d in data[:-1] for c in d["choices"]))

    def test_stream_error_chunk(self):
        data, translation = self.stream(False, True, chunk("a"), sse({"error": {"message": "boom", "code": "server_error"}}),
                                        chunk("never"))
        self.assertEqual((data[-1]["error"]["message"], data[-1]["error"]["code"]), ("boom", "server_error"))
        self.assertEqual(len(data), 2)
        self.assertEqual(translation.failure, "boom")

    def test_upstream_error_unwrapping(self):
        message, fields = coproxy.upstream_error_message(
            b'{"error":{"message":"prompt token count of 139639 exceeds the limit of 128000",'
            b'"code":"model_max_prompt_tokens_exceeded"}}')
        self.assertEqual(message, "prompt token count of 139639 exceeds the limit of 128000")
        self.assertEqual(fields["code"], "model_max_prompt_tokens_exceeded")
        self.assertEqual(coproxy.upstream_error_message(b"unauthorized: token expired\n")[0],
                         "unauthorized: token expired")
        self.assertEqual(coproxy.upstream_error_message(b'{"message":"rate limit exceeded","code":"rate_limited"}')[0],
                         "rate limit exceeded")


class TestTranslateAnthropic(unittest.TestCase):
    def test_whole_answers_keep_copilots_id_and_created_and_give_empty_arguments_as_an_object(self):
        answer = {"id": "msg_01abc", "created": 123, "model": "claude-sonnet-4.5", "choices": [
            {"index": 0, "finish_reason": "tool_calls", "message": {"role": "assistant",
             "tool_calls": [{"id": "t1", "type": "function",
                             "function": {"name": "now", "arguments": ""}}]}}]}
        chat = whole_chat(answer, "claude-sonnet-4.5", 999)
        self.assertEqual((chat["id"], chat["created"]), ("msg_01abc", 123))
        self.assertEqual(chat["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"],
                         "{}")
        self.assertEqual(whole_anthropic(answer, "claude-sonnet-4.5")["id"], "msg_01abc")

    def test_a_refusal_keeps_its_words_in_every_dialect(self):
        # Copilot's chat refusal ({"refusal": "..."}, finish_reason content_filter) reaches an
        # Anthropic, Responses or Ollama client as text, and Anthropic's stop_reason says so.
        answer = {"id": "c1", "model": "gpt-4.1", "choices": [{"index": 0, "finish_reason":
                  "content_filter", "message": {"role": "assistant", "content": None,
                                                "refusal": "I can't help with that."}}]}
        message = whole_anthropic(answer, "gpt-4.1")
        self.assertEqual((message["content"], message["stop_reason"]),
                         ([{"type": "text", "text": "I can't help with that."}], "refusal"))
        ollama = coproxy.translate_whole(
            [coproxy.ChatToOllama("gpt-4.1", "chat", "T", 0.0, time.monotonic)], coproxy.OLLAMA,
            coproxy.chat_answer_items(answer))
        self.assertEqual(ollama["message"]["content"], "I can't help with that.")
        builder = coproxy.ResponseBuilder({"model": "gpt-4.1"}, "gpt-4.1", 0, None)
        response = coproxy.translate_whole([coproxy.ChatToResponses(builder)], coproxy.RESPONSES,
                                           coproxy.chat_answer_items(answer))
        texts = [part.get("text") for item in response["output"] for part in item["content"]]
        self.assertEqual(texts, ["I can't help with that."])

    def test_model_names_resolve_to_catalog_ids(self):
        ids = ["claude-sonnet-4", "claude-sonnet-4.5", "claude-opus-4.5", "claude-opus-4.6", "claude-opus-4.6-1m",
               "claude-haiku-4.5", "gpt-4.1"]
        cases = {"claude-sonnet-4-5": "claude-sonnet-4.5", "claude-sonnet-4-5-20250929": "claude-sonnet-4.5",
                 "claude-sonnet-4-20250514": "claude-sonnet-4", "claude-opus-4-6": "claude-opus-4.6",
                 "claude-opus-4-6[1m]": "claude-opus-4.6-1m", "claude-haiku-4-5-20251001": "claude-haiku-4.5",
                 "opus": "claude-opus-4.6", "sonnet": "claude-sonnet-4.5", "haiku": "claude-haiku-4.5",
                 "claude-opus-4": "claude-opus-4.6", "GPT-4.1": "gpt-4.1", "gpt-4.1": "gpt-4.1",
                 "claude-sonnet-4-5-latest": "claude-sonnet-4.5"}
        for name, expected in cases.items():
            self.assertEqual(coproxy.resolve_model(name, ids), expected, name)
        self.assertIsNone(coproxy.resolve_model("gpt-9", ids))
        self.assertIsNone(coproxy.resolve_model("opus", ["gpt-4.1"]))

    def test_initiator_rules(self):
        user = {"role": "user", "content": "fix the bug"}
        tool_turn = {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": "ok"}]}
        reminder = {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": "ok"},
                                                {"type": "text", "text": "<system-reminder>x</system-reminder>"}]}
        self.assertEqual(coproxy.anthropic_initiator([user]), "user")
        self.assertEqual(coproxy.anthropic_initiator([user, {"role": "assistant", "content": "a"}, tool_turn]), "agent")
        self.assertEqual(coproxy.anthropic_initiator([user, reminder]), "agent")
        self.assertEqual(coproxy.anthropic_initiator([user, {"role": "assistant", "content": "prefill"}]), "agent")
        self.assertEqual(coproxy.anthropic_initiator([{"role": "user", "content": [{"type": "text", "text": " "}]}]),
                         "agent")
        warmup = {"role": "user", "content": [{"type": "text", "text": "Warmup", "cache_control": {"type": "ephemeral"}}]}
        self.assertEqual(coproxy.anthropic_initiator([warmup]), "agent")  # Claude Code's start-up probe
        self.assertEqual(coproxy.anthropic_initiator([{"role": "user", "content": "Warmup"}]), "agent")
        self.assertEqual(coproxy.anthropic_initiator([{"role": "user", "content": "Warmup the oven"}]), "user")
        self.assertEqual(coproxy.anthropic_initiator([user, {"role": "assistant", "content": "a"},
                                                      {"role": "user", "content": "Warmup"}]), "user")

    def test_request_translation_golden(self):
        payload = {
            "model": "claude-haiku-4.5", "max_tokens": 1000, "stream": True, "temperature": 0.2, "top_p": 0.9,
            "stop_sequences": ["END"], "metadata": {"user_id": "u1"},
            "system": [{"type": "text", "text": "You are terse."}, {"type": "text", "text": "Be kind."}],
            "thinking": {"type": "enabled", "budget_tokens": 50000},
            "tools": [{"name": "read", "description": "read a file", "input_schema": {"type": "object"}}],
            "tool_choice": {"type": "any"},
            "messages": [
                {"role": "user", "content": "look at a.ts"},
                {"role": "assistant", "content": [
                    {"type": "thinking", "thinking": "need it", "signature": "sig1"},
                    {"type": "text", "text": "Reading."},
                    {"type": "tool_use", "id": "toolu_1", "name": "read", "input": {"path": "a.ts"}}]},
                {"role": "system", "content": "mid-conversation system note"},
                {"role": "user", "content": [
                    {"type": "text", "text": "and this screenshot"},
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "code"}]},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAA"}},
                    {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}}]},
            ]}
        info = {"capabilities": {"limits": {"max_output_tokens": 8000},
                                 "supports": {"min_thinking_budget": 1024, "max_thinking_budget": 4000}}}
        out = coproxy.anthropic_to_openai_request(payload, info)
        self.assertEqual(out["messages"], [
            {"role": "system", "content": "You are terse.\n\nBe kind."},
            {"role": "user", "content": "look at a.ts"},
            {"role": "assistant", "content": "Reading.", "reasoning_text": "need it", "reasoning_opaque": "sig1",
             "tool_calls": [{"id": "toolu_1", "type": "function",
                             "function": {"name": "read", "arguments": "{\"path\": \"a.ts\"}"}}]},
            {"role": "system", "content": "mid-conversation system note"},
            {"role": "tool", "tool_call_id": "toolu_1", "content": "code"},
            {"role": "user", "content": [{"type": "text", "text": "and this screenshot"},
                                         {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAA"}},
                                         {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]},
        ])
        self.assertEqual(out["tools"], [{"type": "function", "function": {
            "name": "read", "description": "read a file", "parameters": {"type": "object"}}}])
        self.assertEqual((out["tool_choice"], out["stop"], out["user"], out["temperature"], out["top_p"]),
                         ("required", ["END"], "u1", 0.2, 0.9))
        self.assertEqual(out["thinking_budget"], 4000)
        self.assertEqual(out["stream_options"], {"include_usage": True})
        for choice, expected in (({"type": "auto"}, "auto"), ({"type": "none"}, "none"),
                                 ({"type": "tool", "name": "read"}, {"type": "function", "function": {"name": "read"}})):
            self.assertEqual(coproxy.anthropic_to_openai_request(dict(payload, tool_choice=choice))["tool_choice"],
                             expected)
        effort = coproxy.anthropic_to_openai_request(dict(payload, output_config={"effort": "high"}))
        self.assertEqual(effort["reasoning_effort"], "high")

    def test_response_translation_reads_all_choices(self):
        data = {"id": "chatcmpl-1", "model": "claude-haiku-4.5", "choices": [
            {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "Let me check.",
                                                              "reasoning_text": "hmm", "reasoning_opaque": "sig"}},
            {"index": 1, "finish_reason": "tool_calls", "message": {"role": "assistant", "tool_calls": [
                {"id": "toolu_9", "type": "function", "function": {"name": "ls", "arguments": "{\"d\":\".\"}"}}]}}],
            "usage": {"prompt_tokens": 100, "completion_tokens": 7, "prompt_tokens_details": {"cached_tokens": 60}}}
        out = whole_anthropic(data, "claude-haiku-4.5")
        self.assertEqual(out["content"], [{"type": "thinking", "thinking": "hmm", "signature": "sig"},
                                          {"type": "text", "text": "Let me check."},
                                          {"type": "tool_use", "id": "toolu_9", "name": "ls", "input": {"d": "."}}])
        self.assertEqual(out["stop_reason"], "tool_use")
        self.assertEqual(out["usage"], {"input_tokens": 40, "output_tokens": 7, "cache_read_input_tokens": 60})
        self.assertEqual((out["type"], out["role"]), ("message", "assistant"))
        plain = whole_anthropic({"choices": [{"finish_reason": "length", "message": {
            "content": "cut"}}]}, "m")
        self.assertEqual(plain["stop_reason"], "max_tokens")

    def test_stream_translation_exact_sequence(self):
        chunks = [
            {"id": "1", "choices": [{"index": 0, "delta": {"role": "assistant", "content": "", "reasoning_text": "Need "}}]},
            {"id": "1", "choices": [{"index": 0, "delta": {"reasoning_text": "the file."}}]},
            {"id": "1", "choices": [{"index": 0, "delta": {"content": "", "reasoning_opaque": "SIG"}}]},
            {"id": "1", "choices": [{"index": 0, "delta": {"content": "Reading it."}}]},
            {"id": "1", "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "toolu_01", "type": "function",
                                                                            "function": {"name": "read", "arguments": ""}}]}}]},
            {"id": "1", "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{\"p\":"}}]}}]},
            {"id": "1", "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]}}]},
            {"id": "1", "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
            {"id": "1", "choices": [], "usage": {"prompt_tokens": 5120, "completion_tokens": 48,
                                                 "prompt_tokens_details": {"cached_tokens": 4096}}},
        ]
        out, _ = translate([coproxy.ChatToAnthropic("claude-sonnet-4.5", estimated_input_tokens=77)], coproxy.ANTHROPIC,
                           *[sse(c) for c in chunks] + [DONE])
        events = sse_events(out)
        self.assertEqual([name for name, _ in events], [
            "message_start", "content_block_start", "content_block_delta", "content_block_delta",
            "content_block_delta", "content_block_stop", "content_block_start", "content_block_delta",
            "content_block_stop", "content_block_start", "content_block_delta", "content_block_delta",
            "content_block_stop", "message_delta", "message_stop"])
        self.assertTrue(all(name == data["type"] for name, data in events))
        self.assertEqual(events[0][1]["message"]["usage"], {"input_tokens": 77, "output_tokens": 0})
        self.assertEqual(events[1][1]["content_block"], {"type": "thinking", "thinking": "", "signature": ""})
        self.assertEqual(events[4][1]["delta"], {"type": "signature_delta", "signature": "SIG"})
        self.assertEqual(events[6][1], {"type": "content_block_start", "index": 1,
                                        "content_block": {"type": "text", "text": ""}})
        self.assertEqual(events[9][1]["content_block"], {"type": "tool_use", "id": "toolu_01", "name": "read", "input": {}})
        self.assertEqual("".join(e[1]["delta"]["partial_json"] for e in events[10:12]), "{\"p\":1}")
        self.assertEqual(events[13][1], {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                                         "usage": {"input_tokens": 1024, "output_tokens": 48,
                                                   "cache_read_input_tokens": 4096}})

    def test_copilots_cost_in_a_chunk_of_its_own_is_kept(self):
        cost_alone = sse({"id": "chatcmpl-up", "choices": [], "copilot_usage": {"total_nano_aiu": 4500000000}})
        for order in ((USAGE_CHUNK, cost_alone), (cost_alone, USAGE_CHUNK)):
            _, translation = translate([coproxy.ChatToAnthropic("m")], coproxy.ANTHROPIC, chunk("hi"),
                                       chunk(None, "stop"), *order, DONE)
            self.assertEqual((translation.source.usage["nano_aiu"], translation.source.usage["input"]),
                             (4500000000, 5))

    def test_stream_error_and_empty(self):
        out, _ = translate([coproxy.ChatToAnthropic("m")], coproxy.ANTHROPIC, sse({"error": {"message": "overloaded"}}))
        self.assertEqual(sse_events(out), [("error", {"type": "error", "error": {"type": "api_error",
                                                                                   "message": "overloaded"}})])
        out, _ = translate([coproxy.ChatToAnthropic("m")], coproxy.ANTHROPIC, DONE)
        self.assertEqual([n for n, _ in sse_events(out)], ["message_start", "message_delta", "message_stop"])

    def test_claude_code_fields_copilot_refuses_are_taken_out(self):
        payload = {"model": "m", "max_tokens": 5, "anthropic_beta": ["advisor-tool-2026-03-01"], "tools": [
            {"name": "read", "input_schema": {}, "eager_input_streaming": True},
            {"type": "advisor_20260301", "name": "advisor", "model": "claude-opus-4.7"}],
            "messages": [{"role": "user", "content": "x"}]}
        removed = coproxy.clean_anthropic_request(payload)
        self.assertEqual(removed, ["anthropic_beta", "tools[read].eager_input_streaming", "tools[advisor_20260301]"])
        self.assertEqual(payload["tools"], [{"name": "read", "input_schema": {}}])
        with self.assertRaises(coproxy.ClientError) as ctx:
            coproxy.clean_anthropic_request({"tools": [{"type": "web_search_20250305", "name": "web_search"}]})
        self.assertEqual(ctx.exception.code, "web_search_not_supported")
        self.assertIn("Copilot has no web search", str(ctx.exception))

    def test_token_estimate_errs_high(self):
        english = "The quick brown fox jumps over the lazy dog. " * 200     # ~2,000 tokens in o200k/cl100k
        code = "def handler(request):\n    return {'status': request.args.get('x', 0)}\n" * 100  # ~2,100
        cjk = "\u4eca\u65e5\u306f\u826f\u3044\u5929\u6c17\u3067\u3059\u3002" * 100             # ~1,000+
        for text, at_least in ((english, 2000 * 1.1), (code, 2100 * 1.1), (cjk, 1000 * 1.1)):
            estimate = coproxy.estimate_input_tokens({"messages": [{"role": "user", "content": text}]})
            self.assertGreaterEqual(estimate, at_least)
        with_tools = coproxy.estimate_input_tokens({"messages": [{"role": "user", "content": "hi"}],
                                                    "tools": [{"name": "t", "input_schema": {"type": "object"}}]})
        self.assertGreater(with_tools, 350)
        image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "A" * 100000}}
        self.assertLess(coproxy.estimate_input_tokens({"messages": [{"role": "user", "content": [image]}]}), 2000)


class TestTranslateResponses(unittest.TestCase):
    def test_chat_request_to_responses(self):
        payload = {"model": "gpt-5.1-codex", "stream": True, "max_tokens": 200, "temperature": 0.1,
                   "reasoning_effort": "high", "tool_choice": {"type": "function", "function": {"name": "ls"}},
                   "response_format": {"type": "json_schema", "json_schema": {"name": "r", "schema": {"type": "object"},
                                                                              "strict": True}},
                   "tools": [{"type": "function", "function": {"name": "ls", "description": "list",
                                                               "parameters": {"type": "object"}}}],
                   "messages": [
                       {"role": "system", "content": "be terse"},
                       {"role": "user", "content": [{"type": "text", "text": "what is this"},
                                                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}]},
                       {"role": "assistant", "content": None, "tool_calls": [
                           {"id": "call_1", "type": "function", "function": {"name": "ls", "arguments": "{}"}}]},
                       {"role": "tool", "tool_call_id": "call_1", "content": "a.txt"}]}
        out = coproxy.chat_to_responses_request(payload)
        self.assertEqual(out["input"], [
            {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "be terse"}]},
            {"type": "message", "role": "user", "content": [
                {"type": "input_text", "text": "what is this"},
                {"type": "input_image", "image_url": "data:image/png;base64,AA", "detail": "auto"}]},
            {"type": "function_call", "call_id": "call_1", "name": "ls", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "call_1", "output": "a.txt"}])
        self.assertEqual((out["max_output_tokens"], out["reasoning"], out["tool_choice"], out["store"], out["stream"]),
                         (200, {"effort": "high"}, {"type": "function", "name": "ls"}, False, True))
        self.assertEqual(out["tools"], [{"type": "function", "name": "ls", "description": "list",
                                         "parameters": {"type": "object"}}])
        self.assertEqual(out["text"], {"format": {"type": "json_schema", "name": "r", "schema": {"type": "object"},
                                                  "strict": True}})
        self.assertEqual(coproxy.responses_initiator(out), "agent")
        self.assertTrue(coproxy.has_image(out))

    def test_responses_answer_to_chat(self):
        data = {"id": "resp_9", "created_at": 1700000000, "status": "completed", "model": "gpt-5.1-codex", "output": [
            {"type": "reasoning", "summary": []},
            {"type": "message", "content": [{"type": "output_text", "text": "Running "}, {"type": "output_text", "text": "ls"}]},
            {"type": "function_call", "call_id": "call_7", "name": "ls", "arguments": "{\"d\":1}"}],
            "usage": {"input_tokens": 10, "output_tokens": 3, "input_tokens_details": {"cached_tokens": 4},
                      "output_tokens_details": {"reasoning_tokens": 2}}}
        out = whole_chat_from_responses(data, "m", 1)
        choice = out["choices"][0]
        self.assertEqual(choice["message"]["content"], "Running ls")
        self.assertEqual(choice["message"]["tool_calls"], [{"id": "call_7", "type": "function",
                                                            "function": {"name": "ls", "arguments": "{\"d\":1}"}}])
        self.assertEqual(choice["finish_reason"], "tool_calls")
        self.assertEqual(out["usage"], {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13,
                                        "prompt_tokens_details": {"cached_tokens": 4},
                                        "completion_tokens_details": {"reasoning_tokens": 2}})
        cut = whole_chat_from_responses({"status": "incomplete", "incomplete_details": {
            "reason": "max_output_tokens"}, "output": []}, "m", 1)
        self.assertEqual(cut["choices"][0]["finish_reason"], "length")
        with self.assertRaises(coproxy.ClientError) as failed:  # as the stream ends: an error
            whole_chat_from_responses({"status": "failed", "output": [], "error": {
                "code": "server_error", "message": "the model broke"}}, "m", 1)
        self.assertEqual((failed.exception.status, str(failed.exception)), (502, "the model broke"))

    def test_responses_stream_to_chat_chunks(self):
        events = [
            ("response.created", {"type": "response.created", "response": {"id": "r"}}),
            ("response.output_text.delta", {"type": "response.output_text.delta", "delta": "Hi"}),
            ("response.output_item.added", {"type": "response.output_item.added", "output_index": 1,
                                            "item": {"type": "function_call", "call_id": "call_2", "name": "ls"}}),
            ("response.function_call_arguments.delta", {"type": "response.function_call_arguments.delta",
                                                        "output_index": 1, "delta": "{}"}),
            ("response.output_item.done", {"type": "response.output_item.done", "output_index": 1,
                                           "item": {"type": "function_call", "call_id": "call_2", "name": "ls",
                                                    "arguments": "{}"}}),
            ("response.completed", {"type": "response.completed", "response": {"status": "completed", "usage": {
                "input_tokens": 3, "output_tokens": 1}}}),
        ]
        out, _ = translate([coproxy.ResponsesToChat("gpt-5.1-codex", True, 1)], coproxy.OPENAI,
                           *[anthropic_event(name, data) for name, data in events])
        data = sse_data(out)
        self.assertEqual(data[0]["choices"][0]["delta"], {"role": "assistant", "content": ""})
        self.assertEqual(data[1]["choices"][0]["delta"], {"content": "Hi"})
        self.assertEqual(data[2]["choices"][0]["delta"]["tool_calls"][0]["id"], "call_2")
        self.assertEqual(data[3]["choices"][0]["delta"]["tool_calls"][0]["function"], {"arguments": "{}"})
        self.assertEqual(data[4]["choices"][0]["finish_reason"], "tool_calls")  # no repeated arguments from .done
        self.assertEqual(data[5]["usage"]["total_tokens"], 4)
        self.assertEqual(data[6], "[DONE]")
        self.assertEqual(len(data), 7)

    def test_compaction_request_and_answer(self):
        payload = {"model": "gpt-5.1-codex", "instructions": "be Codex", "stream": True, "tools": [],
                   "input": [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "fix it"}]},
                             {"type": "function_call", "call_id": "c", "name": "sh", "arguments": "{}"},
                             {"type": "compaction_trigger"}]}
        request = coproxy.compact_request(payload)
        self.assertEqual((request["store"], "stream" in request, request["instructions"], len(request["input"])),
                         (False, False, "be Codex", 2))
        self.assertEqual(request["context_management"][0]["type"], "compaction")
        answer = coproxy.compaction_answer({"id": "r", "output": [{"type": "compaction", "encrypted_content": "E"},
                                                                  {"type": "message", "role": "assistant"}]}, payload, 9)
        self.assertEqual(answer["object"], "response.compaction")
        self.assertEqual(answer["output"], [payload["input"][0], {"type": "compaction", "encrypted_content": "E"}])
        unchanged = coproxy.compaction_answer({"output": []}, payload, 9)
        self.assertEqual(unchanged["output"], payload["input"])
        self.assertEqual(unchanged["usage"]["input_tokens_details"],
                         {"cached_tokens": 0, "cache_write_tokens": 0})
        # nothing to compact: the client's items come back as valid items, never a string content
        short = coproxy.compaction_answer({"output": []}, {"input": [
            {"role": "user", "content": "hi"},
            {"type": "message", "role": "assistant", "content": "hello"}]}, 9)
        self.assertEqual([item["content"] for item in short["output"]], [
            [{"type": "input_text", "text": "hi"}],
            [{"type": "output_text", "text": "hello", "annotations": []}]])
        self.assertEqual([item["type"] for item in short["output"]], ["message", "message"])

    def test_embeddings_shapes(self):
        request, encoding = coproxy.prepare_embeddings_request({"model": "e", "input": "one", "dimensions": 2,
                                                                "encoding_format": "base64"})
        self.assertEqual((request, encoding), ({"model": "e", "input": ["one"], "dimensions": 2}, "base64"))
        for bad in ({"model": "e", "input": [1, 2]}, {"model": "e", "input": []}, {"input": "x"},
                    {"model": "e", "input": "x", "encoding_format": "hex"}, {"model": "e", "input": "x", "dimensions": 0}):
            with self.assertRaises(coproxy.ClientError):
                coproxy.prepare_embeddings_request(bad)
        out = coproxy.normalize_embeddings_response({"data": [{"embedding": [0.5, -1.25]}]}, "e", "base64")
        raw = __import__("base64").b64decode(out["data"][0]["embedding"])
        self.assertEqual(__import__("struct").unpack("<2f", raw), (0.5, -1.25))
        self.assertEqual(out["usage"], {"prompt_tokens": 0, "total_tokens": 0})

    def test_api_surface_values(self):
        self.assertEqual(coproxy._api_surface("chat-responses"), frozenset(["chat", "responses"]))
        self.assertEqual(coproxy._api_surface("chat, messages"), frozenset(["chat", "messages"]))
        self.assertEqual(coproxy._api_surface("all"), frozenset(coproxy.API_SURFACES))
        for bad in ("", "chat,nope"):
            with self.assertRaises(ValueError):
                coproxy._api_surface(bad)

class TestStreamEnds(unittest.TestCase):
    """One rule for every route and translation: a stream is normal only when its upstream sent its
    own end marker; a clean early end and a cut are both an error event in the client's dialect."""

    RESPONSES_DELTA = anthropic_event("response.output_text.delta", {"type": "response.output_text.delta", "delta": "x"})
    RESPONSES_DONE = anthropic_event("response.completed", {"type": "response.completed", "response": {
        "status": "completed", "usage": {"input_tokens": 1, "output_tokens": 1}}})
    ANTHROPIC_START = anthropic_event("message_start", {"type": "message_start", "message": {"usage": {"input_tokens": 1}}})
    ANTHROPIC_STOP = anthropic_event("message_stop", {"type": "message_stop"})

    def cases(self):
        """(name, chain factory, dialect, body before the end, end marker, normal end seen by the client)"""
        return [
            ("chat", lambda: [coproxy.ChatNormalize("m", False, True, 1)], coproxy.OPENAI, [chunk("x")],
             [chunk(None, "stop"), DONE], b"data: [DONE]"),
            ("chat from responses", lambda: [coproxy.ResponsesToChat("m", False, 1)], coproxy.OPENAI,
             [self.RESPONSES_DELTA], [self.RESPONSES_DONE], b"data: [DONE]"),
            ("messages native", lambda: [coproxy.anthropic_passthrough()], coproxy.ANTHROPIC, [self.ANTHROPIC_START],
             [self.ANTHROPIC_STOP], b"event: message_stop"),
            ("messages from chat", lambda: [coproxy.ChatToAnthropic("m")], coproxy.ANTHROPIC, [chunk("x")],
             [chunk(None, "stop"), DONE], b"event: message_stop"),
            ("messages from responses", lambda: [coproxy.ResponsesToChat("m", True, 1), coproxy.ChatToAnthropic("m")],
             coproxy.ANTHROPIC, [self.RESPONSES_DELTA], [self.RESPONSES_DONE], b"event: message_stop"),
            ("responses", lambda: [coproxy.responses_passthrough()], coproxy.RESPONSES, [self.RESPONSES_DELTA],
             [self.RESPONSES_DONE], b"event: response.completed"),
        ]

    @staticmethod
    def error_of(dialect, body):
        events = coproxy.SSEDecoder().feed(body + b"\n\n")
        name, data = events[-1]
        data = json.loads(data)
        return data["error"]["message"] if dialect is not coproxy.RESPONSES else data["message"], name

    def test_each_route_ends_normally_only_after_its_end_marker(self):
        for name, chain, dialect, body, end, normal in self.cases():
            with self.subTest(name, ending="complete"):
                out, translation = translate(chain(), dialect, *(body + end))
                self.assertIn(normal, out)
                self.assertIsNone(translation.failure)
            with self.subTest(name, ending="clean but early"):
                out, translation = translate(chain(), dialect, *body)
                self.assertNotIn(normal, out)
                message, event = self.error_of(dialect, out)
                self.assertIn("before the answer was complete", message)
                self.assertEqual(event, None if dialect is coproxy.OPENAI else "error")
            with self.subTest(name, ending="cut"):
                translation = coproxy.StreamTranslation(chain(), dialect)
                out = b"".join(translation.feed(piece) for piece in body) + translation.fail("the connection was cut")
                self.assertNotIn(normal, out)
                self.assertEqual(self.error_of(dialect, out)[0], "the connection was cut")
                if dialect is coproxy.RESPONSES:  # the error event is numbered after the others
                    self.assertEqual(sse_events(out)[-1][1]["sequence_number"], len(body))
                self.assertEqual((translation.end(), translation.fail("again")), (b"", b""))  # one ending only


class TestModelQuirks(unittest.TestCase):
    def test_nearest_effort_on_the_scale(self):
        for wanted, allowed, fitted in (("xhigh", ["low", "medium", "high"], "high"), ("max", ["medium"], "medium"),
                                        ("minimal", ["low", "medium", "high"], "low"), ("medium", ["low", "high"], "high"),
                                        ("high", ["high"], "high"), ("turbo", ["low"], None), ("low", [], None)):
            self.assertEqual(coproxy.nearest_effort(wanted, allowed), fitted, (wanted, allowed))

    def test_supported_values_are_read_from_refusals(self):
        for message, values in (('output_config.effort "high" is not supported by model claude-opus-4.7; supported '
                                 'values: [medium]', ["medium"]),
                                ("Unsupported value: 'reasoning_effort' does not support 'xhigh' with this model. "
                                 "Supported values are: 'minimal', 'low', 'medium', and 'high'.",
                                 ["minimal", "low", "medium", "high"]),
                                ("Unsupported value: 'xhigh' is not supported with the 'gpt-5-mini' model.", [])):
            self.assertEqual(coproxy.supported_efforts_in(message), values)

    def test_plans_fit_effort_and_max_tokens_to_the_model(self):
        info = {"id": "o3-mini", "capabilities": {"supports": {"reasoning_effort": ["low", "medium", "high"]}}}
        payload = {"model": "o3-mini", "max_tokens": 9, "reasoning_effort": "xhigh", "messages": [{"role": "user", "content": "x"}]}
        plan = coproxy.plan_chat(payload, ("o3-mini", False, False, True), "o3-mini", info,
                                 {"/chat/completions": {"max_completion_tokens": True}}, 1)
        self.assertEqual((plan.payload["reasoning_effort"], plan.payload.get("max_tokens"), plan.payload["max_completion_tokens"]),
                         ("high", None, 9))
        self.assertEqual(plan.adjusted, ["max_tokens=max_completion_tokens", "reasoning_effort=xhigh->high"])
        anthropic = {"model": "claude", "max_tokens": 9, "output_config": {"effort": "max"},
                     "messages": [{"role": "user", "content": "x"}]}
        plan = coproxy.plan_messages(anthropic, "claude", dict(info, supported_endpoints=["/v1/messages"]), {}, 1)
        self.assertEqual((plan.payload["output_config"], plan.adjusted), ({"effort": "high"}, ["output_config.effort=max->high"]))
        native = dict(info, supported_endpoints=["/responses"])
        request = {"model": "g", "reasoning": {"effort": "minimal"}, "input": "x"}
        plan = coproxy.plan_responses(dict(request), "g", native, {}, 1)
        self.assertEqual(plan.payload["reasoning"]["effort"], "low")
        plan = coproxy.plan_responses(dict(request), "g", info, {}, 1)
        self.assertEqual((plan.path, plan.payload["reasoning_effort"]),
                         ("/chat/completions", "low"))

    def test_a_refusal_that_says_how_to_fix_revises_the_plan_once(self):
        plan = coproxy.plan_chat({"model": "m", "reasoning_effort": "high", "max_tokens": 3, "messages": [
            {"role": "user", "content": "x"}]}, ("m", False, False, True), "m", {}, {}, 1)
        refusal = coproxy.ClientError(400, 'reasoning_effort "high" is not supported by model m; supported values: '
                                           '[medium]', code="invalid_reasoning_effort")
        self.assertEqual(coproxy.revise_after_refusal(plan, refusal, {}), {"efforts": ["medium"]})
        self.assertEqual(plan.payload["reasoning_effort"], "medium")
        self.assertIsNone(coproxy.revise_after_refusal(plan, refusal, {}))  # nothing more it could change
        refusal = coproxy.ClientError(400, "Unsupported parameter: 'max_tokens' is not supported with this model. "
                                           "Use 'max_completion_tokens' instead.", code="invalid_request_body")
        self.assertEqual(coproxy.revise_after_refusal(plan, refusal, {}), {"max_completion_tokens": True})
        self.assertIsNone(coproxy.revise_after_refusal(plan, coproxy.ClientError(400, "other"), {}))


    def test_what_a_refusal_taught_is_narrowed_by_the_catalogue(self):
        info = {"capabilities": {"supports": {"reasoning_effort": ["low", "medium", "high"]}}}
        self.assertEqual(coproxy.allowed_efforts(info, {"efforts": ["low", "minimal"]}), ["low"])
        self.assertEqual(coproxy.allowed_efforts(info, {"efforts": ["minimal"]}), ["low", "medium", "high"])
        self.assertEqual(coproxy.allowed_efforts({}, {"efforts": ["minimal"]}), ["minimal"])
        payload = {"model": "m", "reasoning_effort": "high", "messages": [{"role": "user", "content": "x"}]}
        taught_elsewhere = {"/responses": {"efforts": ["low"]}}  # another endpoint's lesson does not apply
        plan = coproxy.plan_chat(payload, ("m", False, False, True), "m", info, taught_elsewhere, 1)
        self.assertEqual((plan.payload["reasoning_effort"], plan.adjusted), ("high", []))


class TestUsageAndCost(unittest.TestCase):
    def test_usage_of_each_api(self):
        self.assertEqual(coproxy.usage_of_answer("/chat/completions", {
            "usage": {"prompt_tokens": 10, "completion_tokens": 4, "prompt_tokens_details": {"cached_tokens": 6},
                      "completion_tokens_details": {"reasoning_tokens": 2}},
            "copilot_usage": {"total_nano_aiu": 1500000000}}),
            {"input": 10, "cached": 6, "output": 4, "reasoning": 2, "nano_aiu": 1500000000})
        self.assertEqual(coproxy.usage_of_answer("/v1/messages", {"usage": {
            "input_tokens": 3, "cache_read_input_tokens": 100, "cache_creation_input_tokens": 7, "output_tokens": 9}}),
            {"input": 110, "cached": 100, "output": 9, "reasoning": 0, "nano_aiu": None})
        self.assertEqual(coproxy.usage_of_answer("/responses", {"usage": {"input_tokens": "x", "output_tokens": -1}}),
                         {"input": 0, "cached": 0, "output": 0, "reasoning": 0, "nano_aiu": None})

    def test_credits_estimated_from_catalogue_prices(self):
        usage = {"input": 1000000, "cached": 400000, "output": 100000, "reasoning": 0, "nano_aiu": None}
        flat = {"billing": {"token_prices": {"batch_size": 1000000, "input_price": 300, "cache_price": 30,
                                             "output_price": 1500}}}
        self.assertAlmostEqual(coproxy.estimate_credits(usage, flat), 0.6 * 300 + 0.4 * 30 + 0.1 * 1500)
        tiers = {"billing": {"token_prices": {"batch_size": 1000000, "default": {
            "input_price": 300, "output_price": 1500, "context_max": 200000}, "long_context": {
            "input_price": 600, "output_price": 2250}}}}
        self.assertAlmostEqual(coproxy.estimate_credits(usage, tiers), 1.0 * 600 + 0.1 * 2250)  # over context_max
        camel = {"billing": {"tokenPrices": {"batchSize": 1000, "inputPrice": 1, "outputPrice": 2}}}
        self.assertAlmostEqual(coproxy.estimate_credits(dict(usage, cached=0), camel), 1000 + 200)
        self.assertIsNone(coproxy.estimate_credits(usage, {"billing": {"multiplier": 1}}))
        renamed = {"billing": {"auto_discount": 0.1, "token_prices": {  # 2026-08-01's names
            "batch_size": 1000000, "default": {"input_price": 300, "cache_read_price": 30,
                                               "cache_write_price": 375, "output_price": 1500}}}}
        self.assertAlmostEqual(coproxy.estimate_credits(usage, renamed),
                               0.6 * 300 + 0.4 * 30 + 0.1 * 1500)
        percent = {"billing": {"auto_discount": 10}}
        self.assertEqual([coproxy.auto_discount(d) for d in (renamed, percent, flat)],
                         [0.1, 0.1, 0.0])

    def test_ratelimit_headers_and_quota_views(self):
        self.assertEqual(coproxy.parse_ratelimit_header("ent=0&ov=0.0&ovPerm=false&rem=99.6&rst=2026-04-22T14%3A30%3A56Z"),
                         {"percent_remaining": 99.6, "resets_at": "2026-04-22T14:30:56Z"})
        self.assertIsNone(coproxy.parse_ratelimit_header("garbage"))
        requests = coproxy.summarize_quota(REQUEST_BILLED_USER)
        self.assertEqual((requests["billing"], requests["premium_requests"]["used"], requests["credits"]),
                         ("requests", 165, None))
        tokens = coproxy.summarize_quota(TOKEN_BILLED_USER)
        self.assertEqual((tokens["billing"], tokens["credits"]["used"], tokens["credits"]["remaining"]),
                         ("tokens", 122.5, 1377.5))
        self.assertTrue(tokens["chat"]["unlimited"])
        self.assertIsNone(tokens["premium_requests"])


class TestUpstreamVerdicts(unittest.TestCase):
    NOW = 1764500000

    def verdict(self, status, body, headers=None):
        return coproxy.client_error_from_upstream(status, json.dumps(body).encode(), headers or {}, self.NOW)

    def test_session_and_weekly_limits_name_their_window_and_end(self):
        verdict = self.verdict(429, {"error": {"message": "Sorry, you've exceeded your 5 hour session limits. Please "
                                                          "retry after 2733 seconds.", "code": "user_global_rate_limited:pro"}})
        self.assertEqual((verdict.window, verdict.wait, verdict.transient), ("5-hour session", 2733, False))
        self.assertIn(("Retry-After", "2733"), verdict.error.headers)
        ends = time.strftime("%Y-%m-%d %H:%M", time.localtime(self.NOW + 2733))
        self.assertIn("Copilot's 5-hour session limit is reached", str(verdict.error))
        self.assertIn("It ends at %s" % ends, str(verdict.error))
        weekly = self.verdict(429, {"error": {"message": "Sorry, you've exceeded your weekly rate limit.",
                                              "code": "user_weekly_rate_limited"}}, {"retry-after": "86400"})
        self.assertEqual((weekly.window, weekly.wait, weekly.error.code), ("weekly", 86400, "user_weekly_rate_limited"))
        self.assertEqual(weekly.error.headers, [("Retry-After", "86400")])

    def test_short_transient_errors_are_worth_one_retry(self):
        self.assertTrue(self.verdict(429, {"error": {"message": "rate limit exceeded"}}, {"retry-after": "2"}).transient)
        self.assertFalse(self.verdict(429, {"error": {"message": "rate limit exceeded"}}, {"retry-after": "60"}).transient)
        self.assertFalse(self.verdict(429, {"error": {"message": "rate limit exceeded"}}).transient)
        self.assertTrue(self.verdict(503, {"message": "upstream busy"}).transient)
        self.assertFalse(self.verdict(500, {"message": "boom"}).transient)

    def test_466_names_the_identity_options(self):
        verdict = coproxy.client_error_from_upstream(466, b"bad request: the specified API version is no longer "
                                                          b"supported. You may need to update your client to a newer "
                                                          b"version.\n", {}, self.NOW, ("vscode/1.2", "copilot-chat/0.3"))
        self.assertEqual((verdict.error.status, verdict.error.code), (466, "client_version_refused"))
        for words in ("--editor-version", "--editor-plugin-version", "vscode/1.2", "no longer supported"):
            self.assertIn(words, str(verdict.error))


class TestGeminiSchemas(ProxyTestCase):
    """Gemini behind Copilot refuses type lists and non-string enums in tool schemas."""

    SCHEMA = {"type": "object", "required": ["duration"], "properties": {
        "duration": {"type": "integer", "enum": [60, 1440, 4320], "description": "Archive after"},
        "since": {"type": ["number", "string"]},
        "note": {"type": ["string", "null"], "enum": ["a", "b", None]},
        "rows": {"type": "array", "items": {"type": ["object", "null"], "properties": {"on": {"enum": [True, False]}}}},
        "choice": {"anyOf": [{"type": "integer", "enum": [1, 2]}, {"type": "string", "enum": ["x"]}]},
        "mode": {"type": "string", "enum": ["fast", "slow"]}}}

    def test_schema_rules(self):
        original = copy.deepcopy(self.SCHEMA)
        out = coproxy.gemini_schema(self.SCHEMA)
        self.assertEqual(self.SCHEMA, original)  # a copy: the client's request is not edited in place
        props = out["properties"]
        self.assertEqual(props["duration"], {"type": "integer", "description": "Archive after. One of: 60, 1440, 4320."})
        self.assertEqual(props["since"], {"type": "string", "description": "Any of these types: number, string."})
        self.assertEqual(props["note"], {"type": "string", "nullable": True, "enum": ["a", "b"]})
        self.assertEqual(props["rows"]["items"]["type"], "object")
        self.assertTrue(props["rows"]["items"]["nullable"])
        self.assertEqual(props["rows"]["items"]["properties"]["on"], {"type": "boolean", "description": "One of: true, false."})
        self.assertEqual(props["choice"]["anyOf"][0], {"type": "integer", "description": "One of: 1, 2."})
        self.assertEqual(props["mode"], self.SCHEMA["properties"]["mode"])
        self.assertEqual(out["required"], ["duration"])

    def test_only_gemini_requests_are_rewritten_on_chat_and_messages(self):
        catalog = copy.deepcopy(CATALOG) + [{"id": "gemini-3.5-flash", "name": "Gemini 3.5 Flash", "vendor": "Google",
                                             "capabilities": {"type": "chat", "supports": {"tool_calls": True}}}]
        self.fake.routes[("GET", "/models")] = lambda h, b: h.send_json(200, {"object": "list", "data": catalog})
        proxy = self.start_proxy()
        tool = {"type": "function", "function": {"name": "archive", "parameters": self.SCHEMA}}
        for model, rewritten in (("gemini-3.5-flash", True), ("gpt-4.1", False)):
            status, _, body = self.request("POST", "/v1/chat/completions", {
                "model": model, "tools": [tool], "messages": [{"role": "user", "content": "hi"}]}, port=proxy.port)
            self.assertEqual(status, 200, body)
            sent = json.loads(self.fake.requests_to("/chat/completions")[-1][3])["tools"][0]["function"]["parameters"]
            self.assertEqual(sent == coproxy.gemini_schema(self.SCHEMA), rewritten, model)
            self.assertEqual(sent == self.SCHEMA, not rewritten, model)
        status, _, body = self.request("POST", "/v1/messages", {
            "model": "gemini-3.5-flash", "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}],
            "tools": [{"name": "archive", "input_schema": self.SCHEMA}]}, port=proxy.port)
        self.assertEqual(status, 200, body)
        sent = json.loads(self.fake.requests_to("/chat/completions")[-1][3])["tools"][0]["function"]["parameters"]
        self.assertEqual(sent["properties"]["since"]["type"], "string")

class TestTranslateOllama(unittest.TestCase):
    CLAUDE = CATALOG[3]  # claude-haiku-4.5: thinking budget, no effort list

    def test_names_tags_and_what_show_says(self):
        self.assertEqual(coproxy.resolve_model("gpt-4.1:latest", CATALOG_IDS), "gpt-4.1")
        self.assertEqual(coproxy.resolve_model("claude-sonnet-4-5:latest", CATALOG_IDS), "claude-sonnet-4.5")
        tag = coproxy.ollama_tag(CATALOG[1], "2026-12-01T00:00:00Z")
        self.assertEqual((tag["name"], tag["model"], len(tag["digest"]), tag["details"]["family"]),
                         ("claude-sonnet-4.5:latest", "claude-sonnet-4.5:latest", 64, "claude-sonnet-4.5"))
        show = coproxy.ollama_show(CATALOG[0], "2026-12-01T00:00:00Z")
        self.assertEqual(show["model_info"], {"general.architecture": "gpt-4.1", "general.basename": "gpt-4.1",
                                              "gpt-4.1.context_length": 128000})
        self.assertEqual(show["capabilities"], ["completion", "tools", "vision"])
        self.assertEqual(coproxy.ollama_show(self.CLAUDE, "")["capabilities"],
                         ["completion", "tools", "vision", "thinking"])
        self.assertEqual(coproxy.ollama_show(CATALOG[6], "")["capabilities"], ["completion", "tools", "thinking"])
        self.assertEqual(coproxy.ollama_show(CATALOG[-1], "")["capabilities"], ["embedding"])

    def test_chat_request_translation(self):
        png = base64.b64encode(PNG).decode()
        payload = {"model": "gpt-4.1:latest", "messages": [
            {"role": "system", "content": "terse"},
            {"role": "user", "content": "what is this?", "images": [png]},
            {"role": "assistant", "content": "", "tool_calls": [
                {"function": {"name": "look", "arguments": {"x": 1}}},
                {"function": {"name": "read", "arguments": {}}}]},
            {"role": "tool", "content": "read it", "tool_name": "read"},
            {"role": "tool", "content": "looked"},
            {"role": "tool", "content": "stray", "tool_name": "ls"}],
            "tools": [{"type": "function", "function": {"name": "look", "parameters": {"type": "object"}}}],
            "options": {"temperature": 0.2, "top_p": 0.9, "num_predict": 50, "stop": "END", "seed": 7, "top_k": 3},
            "format": {"type": "object"}, "stream": False}
        coproxy.validate_ollama_request(payload, "chat")
        request = coproxy.ollama_to_chat_request(payload, "chat", "gpt-4.1", CATALOG[0])
        messages = request.pop("messages")
        self.assertEqual(messages[1]["content"], [{"type": "text", "text": "what is this?"}, {
            "type": "image_url", "image_url": {"url": "data:image/png;base64," + png}}])
        self.assertEqual(messages[2]["tool_calls"][0], {"id": "call_2_0", "type": "function", "function": {
            "name": "look", "arguments": '{"x": 1}'}})
        self.assertEqual([(m["role"], m.get("tool_call_id"), m["content"]) for m in messages[3:]],
                         [("tool", "call_2_1", "read it"), ("tool", "call_2_0", "looked"),
                          ("user", None, "Result of the ls tool: stray")])
        self.assertEqual(request, {"model": "gpt-4.1", "stream": False, "temperature": 0.2, "top_p": 0.9, "seed": 7,
                                   "max_tokens": 50, "stop": ["END"], "tools": payload["tools"],
                                   "response_format": {"type": "json_schema", "json_schema": {
                                       "name": "response", "schema": {"type": "object"}}}})
        generate = coproxy.ollama_to_chat_request({"model": "m", "prompt": "p", "system": "s", "format": "json"},
                                                  "generate", "gpt-4.1", CATALOG[0])
        self.assertEqual((generate["messages"], generate["response_format"], generate["stream_options"]),
                         ([{"role": "system", "content": "s"}, {"role": "user", "content": "p"}],
                          {"type": "json_object"}, {"include_usage": True}))

    def test_think_becomes_an_effort_or_a_budget_or_a_400(self):
        def sent(model_entry, think):
            return coproxy.ollama_to_chat_request({"messages": [], "think": think}, "chat", model_entry["id"],
                                                  model_entry)
        self.assertEqual(sent(CATALOG[1], "high")["reasoning_effort"], "high")
        self.assertEqual(sent(CATALOG[1], True)["reasoning_effort"], "medium")
        self.assertEqual(sent(self.CLAUDE, "max")["thinking_budget"], 4000)   # its max_thinking_budget
        self.assertEqual(sent(self.CLAUDE, "low")["thinking_budget"], 1024)
        self.assertNotIn("reasoning_effort", sent(CATALOG[1], False))
        with self.assertRaises(coproxy.ClientError) as ctx:
            sent(CATALOG[0], True)
        self.assertEqual((ctx.exception.status, ctx.exception.param), (400, "think"))
        for bad, param in (({"model": "m", "think": "lots"}, "think"), ({"model": "m", "options": {"stop": 3}},
                                                                         "options.stop"),
                           ({"model": "m", "messages": [{"role": "user", "images": "x"}]}, "messages[0].images"),
                           ({"model": "m", "messages": [{"role": "assistant", "tool_calls": [{"function": {
                               "name": "f", "arguments": "{}"}}]}]}, "messages[0].tool_calls[0].function.arguments")):
            with self.assertRaises(coproxy.ClientError) as ctx:
                coproxy.validate_ollama_request(bad, "chat")
            self.assertEqual(ctx.exception.param, param)
        with self.assertRaises(coproxy.ClientError) as ctx:
            coproxy.ollama_image_part(base64.b64encode(b"not an image at all").decode(), "images[0]")
        self.assertEqual(ctx.exception.code, "invalid_image")

    def test_stream_objects_tool_calls_whole_and_done_with_durations(self):
        ticks = iter([10.25, 11.0])
        translator = coproxy.ChatToOllama("gpt-4.1:latest", "chat", "T", 10.0, lambda: next(ticks))
        items, _ = translate([coproxy.ChatNormalize("gpt-4.1", True, True, 0), translator], coproxy.OLLAMA,
                          sse({"id": "chatcmpl-up", "model": "gpt-4.1", "created": 1, "choices": [
                              {"index": 0, "delta": {"reasoning_text": "hmm"}, "finish_reason": None}]}),
                          chunk("Hi"),
                          chunk(None, tool_calls=[{"index": 0, "id": "call_1", "type": "function",
                                                   "function": {"name": "ls", "arguments": "{\"p\":"}}]),
                          chunk(None, tool_calls=[{"index": 0, "function": {"arguments": "1}"}}]),
                          chunk(None, "tool_calls"), USAGE_CHUNK, DONE)
        lines = [json.loads(line) for line in items.decode().splitlines()]
        self.assertEqual([line["message"] for line in lines[:3]], [
            {"role": "assistant", "content": "", "thinking": "hmm"}, {"role": "assistant", "content": "Hi"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": "call_1", "function": {"index": 0, "name": "ls", "arguments": {"p": 1}}}]}])
        self.assertEqual(lines[-1], {"model": "gpt-4.1:latest", "created_at": "T",
                                     "message": {"role": "assistant", "content": ""}, "done": True,
                                     "done_reason": "stop", "total_duration": 1000000000, "load_duration": 0,
                                     "prompt_eval_count": 5, "prompt_eval_duration": 250000000, "eval_count": 2,
                                     "eval_duration": 750000000})
        self.assertTrue(items.endswith(b"}\n"))
        cut, _ = translate([coproxy.ChatNormalize("gpt-4.1", True, True, 0),
                         coproxy.ChatToOllama("m", "generate", "T", 0.0, time.monotonic)], coproxy.OLLAMA,
                        chunk("par"), end=True)
        lines = [json.loads(line) for line in cut.decode().splitlines()]
        self.assertEqual((lines[0]["response"], list(lines[-1])), ("par", ["error"]))


class TestWorkerPool(unittest.TestCase):

    @unittest.skipUnless(sys.platform.startswith("linux"), "glibc's malloc")
    def test_serve_can_limit_glibc_to_one_malloc_arena(self):
        result = subprocess.run([sys.executable, "-c",
                                 "import coproxy; print(coproxy.limit_malloc_arenas())"],
                                capture_output=True, text=True, cwd=HERE, env=child_env(),
                                timeout=20)
        libc = os.confstr("CS_GNU_LIBC_VERSION") if "CS_GNU_LIBC_VERSION" in os.confstr_names else ""
        self.assertEqual(result.stdout.strip(), "True" if libc.startswith("glibc") else "False", result.stderr)
    def test_results_errors_reuse_and_concurrency(self):
        pool = coproxy.WorkerPool(8)
        self.addCleanup(pool.shutdown)
        self.assertEqual(pool.submit(lambda a, b=0: a + b, 2, b=3).result(5), 5)
        with self.assertRaises(ZeroDivisionError):
            pool.submit(lambda: 1 / 0).result(5)
        for i in range(20):  # sequential jobs reuse the idle worker
            self.assertEqual(pool.submit(lambda: i).result(5), i)
        self.assertEqual(pool.workers, 1)
        gate, running = threading.Event(), []
        futures = [pool.submit(lambda: (running.append(1), gate.wait(5))) for _ in range(8)]
        self.assertTrue(wait_for(lambda: len(running) == 8))  # all eight run at once
        queued = pool.submit(lambda: "ninth")  # over the limit: waits for a free worker
        self.assertFalse(wait_for(queued.done, 0.2))
        gate.set()
        self.assertEqual(queued.result(5), "ninth")
        self.assertTrue(all(f.result(5)[1] for f in futures))
        self.assertEqual(pool.workers, 8)

    def test_run_resolves_an_asyncio_future(self):
        pool = coproxy.WorkerPool(4)
        self.addCleanup(pool.shutdown)

        async def main():
            loop = asyncio.get_running_loop()
            threads = await asyncio.gather(*[pool.run(loop, threading.get_ident) for _ in range(4)])
            with self.assertRaises(KeyError):
                await pool.run(loop, {}.__getitem__, "missing")
            return threads
        threads = asyncio.run(main())
        self.assertNotIn(threading.get_ident(), threads)  # ran in workers, not on the loop's thread
        self.assertLessEqual(pool.workers, 4)

    def test_jobs_that_finish_while_the_loop_is_busy_wake_it_once(self):
        pool = coproxy.WorkerPool(8)
        self.addCleanup(pool.shutdown)
        go = threading.Event()

        async def main():
            loop = asyncio.get_running_loop()
            wakeups = []
            wake = loop.call_soon_threadsafe
            loop.call_soon_threadsafe = lambda *args: (wakeups.append(args), wake(*args))
            futures = [pool.run(loop, lambda i=i: (go.wait(5), i)[1]) for i in range(8)]
            go.set()  # the loop stays busy here until all eight have finished
            self.assertTrue(wait_for(lambda: len(pool._finished.get(loop, ())) == 8))
            self.assertEqual(await asyncio.gather(*futures), list(range(8)))
            self.assertEqual(len(wakeups), 1)
            self.assertEqual(await pool.run(loop, lambda: "later"), "later")  # a new hand-over
            self.assertEqual(len(wakeups), 2)
        asyncio.run(main())

    def test_idle_workers_exit_after_a_burst(self):
        pool = coproxy.WorkerPool(16, idle_seconds=0.05)
        self.addCleanup(pool.shutdown)
        gate = threading.Event()
        futures = [pool.submit(gate.wait, 5) for _ in range(10)]
        self.assertTrue(wait_for(lambda: pool.workers == 10))
        gate.set()
        self.assertTrue(all(f.result(5) for f in futures))
        self.assertTrue(wait_for(lambda: pool.workers == coproxy.MIN_WORKERS), pool.workers)
        self.assertEqual(pool.submit(lambda: "still works").result(5), "still works")

    def test_shutdown_refuses_new_work(self):
        pool = coproxy.WorkerPool(2)
        pool.submit(lambda: None).result(5)
        pool.shutdown()
        with self.assertRaises(RuntimeError):
            pool.submit(lambda: None)

    def test_workers_are_named_and_shutdown_waits_for_them(self):
        pool = coproxy.WorkerPool(4, name="coproxy-test")
        gate, names = threading.Event(), []
        futures = [pool.submit(lambda: (names.append(threading.current_thread().name), gate.wait(5))) for _ in range(3)]
        self.assertTrue(wait_for(lambda: len(names) == 3))
        self.assertEqual(sorted(names), ["coproxy-test-1", "coproxy-test-2", "coproxy-test-3"])
        threading.Timer(0.1, gate.set).start()
        pool.shutdown(wait=True)
        self.assertTrue(all(f.done() for f in futures))
        self.assertFalse(any(t.name.startswith("coproxy-test-") and t.name[-1].isdigit() for t in threading.enumerate()))

    def test_shutdown_right_after_submitting_runs_every_queued_job(self):
        for _ in range(100):  # the workers may not have been started yet when shutdown begins
            pool = coproxy.WorkerPool(8)
            futures = [pool.submit(time.sleep, 0) for _ in range(3)]
            pool.shutdown(wait=True)
            self.assertTrue(all(f.done() for f in futures))


class Sink:
    """Collects what the StreamHub delivers for one stream (on the loop)."""

    def __init__(self, loop):
        self.data, self.error, self.ended = b"", None, loop.create_future()

    def receive(self, data, ended, error):
        self.data += data
        if ended:
            self.error = error
            self.ended.set_result(None)


class TestStreamHub(unittest.TestCase):
    """One thread reads every stream; the loop gets batches; pause, cancel and silence work."""

    def setUp(self):
        install_log_capture()
        self.up = ScriptedUpstream(self)
        self.client = new_client(self, read_timeout=10)
        self.head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"

    def open(self, *script):
        self.up.scripts.put(list(script))
        return self.client.request("POST", self.up.url + "/chat/completions", {}, b"{}")

    def run_hub(self, body, read_timeout=10):
        async def main():
            loop = asyncio.get_running_loop()
            hub = coproxy.StreamHub(loop, read_timeout)
            hub.SILENCE_CHECK_SECONDS = 0.05  # the silence test waits for a check, not a second
            try:
                return await body(loop, hub)
            finally:
                hub.close()
        return asyncio.run(main())

    def test_many_streams_on_one_thread_with_their_ends(self):
        async def body(loop, hub):
            sinks = []
            for i in range(20):
                response = await loop.run_in_executor(None, self.open, self.head,
                                                      b"3\r\nab%d\r\n" % (i % 10),
                                                      b"2\r\nzz\r\n0\r\n\r\n")
                sink = Sink(loop)
                hub.attach(response, sink.receive)
                sinks.append(sink)
            await asyncio.wait_for(asyncio.gather(*[s.ended for s in sinks]), 5)
            return sinks, [t.name for t in threading.enumerate()].count("coproxy-stream-hub")
        sinks, hub_threads = self.run_hub(body)
        self.assertEqual([s.data for s in sinks], [b"ab%dzz" % (i % 10) for i in range(20)])
        self.assertEqual([s.error for s in sinks], [None] * 20)
        self.assertEqual(hub_threads, 1)
        # all back in the pool
        self.assertEqual(self.client.idle_connections(), self.client.connections_opened)

    def test_pause_resume_cancel_and_silence(self):
        gate, watch = threading.Event(), threading.Event()

        async def body(loop, hub):
            async def attach(sink, *script):
                response = await loop.run_in_executor(None, self.open, self.head, *script)
                return hub.attach(response, sink.receive)
            paused = Sink(loop)
            stream = await attach(paused, b"1\r\na\r\n", gate, b"1\r\nb\r\n0\r\n\r\n")
            await asyncio.wait_for(self._until(lambda: paused.data == b"a"), 5)
            stream.pause()
            gate.set()
            await asyncio.sleep(0.1)
            held = paused.data
            stream.resume()
            await asyncio.wait_for(paused.ended, 5)
            cancelled = Sink(loop)
            stream = await attach(cancelled, b"1\r\nc\r\n", watch)
            await asyncio.wait_for(self._until(lambda: cancelled.data == b"c"), 5)
            stream.close()
            silent = Sink(loop)
            hub.read_timeout = 0.2
            await attach(silent, b"1\r\nd\r\n", watch)
            await asyncio.wait_for(silent.ended, 5)
            return held, paused, cancelled, silent
        held, paused, cancelled, silent = self.run_hub(body)
        watch.set()
        self.assertEqual((held, paused.data, paused.error), (b"a", b"ab", None))
        self.assertFalse(cancelled.ended.done())  # nothing is delivered after a cancel
        self.assertIsInstance(silent.error, socket.timeout)

    @staticmethod
    async def _until(predicate):
        while not predicate():
            await asyncio.sleep(0.005)

class TestRequestParsing(ProxyTestCase):
    proxy_overrides = {"max_body_mb": 1.0 / 1024}  # 1 KiB

    CASES = [
        ("HTTP/2 request", b"GET /healthz HTTP/2.0\r\nHost: 127.0.0.1\r\n\r\n", 505),
        ("no Host", b"GET /healthz HTTP/1.1\r\n\r\n", 400),
        ("bad version", b"GET /healthz FOO/1.1\r\nHost: 127.0.0.1\r\n\r\n", 400),
        ("double space", b"GET  /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 400),
        ("bad method chars", b"G@T /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 400),
        ("unknown method", b"BREW /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 501),
        ("bad target", b"GET healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 400),
        ("long request line", b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 414),
        ("huge headers", b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"b" * 40000 + b"\r\n\r\n", 431),
        ("too many headers", b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"X-A: 1\r\n" * 101 + b"\r\n", 431),
        ("obs-fold", b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-A: 1\r\n  folded\r\n\r\n", 400),
        ("space in name", b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nBad Name: 1\r\n\r\n", 400),
        ("space before colon", b"GET /healthz HTTP/1.1\r\nHost : t\r\n\r\n", 400),
        ("duplicate Host", b"GET /healthz HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        ("TE and CL", b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 3\r\n"
                      b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
        ("conflicting CL", b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\n"
                           b"Content-Length: 6\r\n\r\nhello", 400),
        ("non-numeric CL", b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5x\r\n\r\n", 400),
        ("negative CL", b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: -1\r\n\r\n", 400),
        ("21-digit CL", b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1" + b"0" * 20
                        + b"\r\n\r\n", 400),
        ("gzip TE", b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
        ("TE on 1.0", b"POST /v1/chat/completions HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
        ("CL over the cap", b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 52428800\r\n\r\n", 413),
        ("bad chunk size", b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                           b"zz\r\n", 400),
        ("chunk without CRLF", b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                               b"2\r\nabXX", 400),
        ("long chunk line", b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                            b"1;" + b"x" * 2000 + b"\r\n", 400),
        ("chunked over the cap", b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                                 + b"200\r\n" + b"a" * 512 + b"\r\n" + b"200\r\n" + b"a" * 512 + b"\r\n"
                                 + b"1\r\na\r\n0\r\n\r\n", 413),
        ("control char in value", b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-A: a\x00b\r\n\r\n", 400),
    ]

    def test_malformed_requests_get_exact_status_json_and_close(self):
        for name, data, status in self.CASES:
            with self.subTest(name):
                client = self.raw().send(data)
                got, headers, body = client.response()
                self.assertEqual(got, status)
                self.assertEqual(headers.get("connection"), "close")
                self.assertIn("message", json.loads(body)["error"])
                self.assertTrue(client.closed_by_server())
        # the server is unharmed
        self.assertEqual(self.request("GET", "/healthz")[0], 200)

    def test_json_errors_in_the_body(self):
        for body, fragment in ((b"{bad", "not valid JSON"), (b"[]", "JSON object"),
                               (b'{"model":"m","messages":"x"}', "messages")):
            status, _, data = self.request("POST", "/v1/chat/completions", body)
            self.assertEqual(status, 400)
            error = json.loads(data)["error"]
            self.assertEqual(error["type"], "invalid_request_error")
            self.assertIn(fragment, error["message"])

    def test_a_body_that_stops_arriving_gets_408_and_a_slow_one_goes_through(self):
        # Short, as it is waited out; long enough that the head, sent with the first bytes of
        # the body, is always read before its own timer (which answers in other words) fires.
        proxy = self.start_proxy(header_timeout=0.2)
        payload = json.dumps(chat_body("slow but moving")).encode()
        client = RawClient(proxy.port)
        self.addCleanup(client.close)
        client.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload[:5]))
        status, headers, body = client.response()
        self.assertEqual((status, json.loads(body)["error"]["code"]), (408, "request_timeout"))
        self.assertIn("--header-timeout", json.loads(body)["error"]["message"])
        self.assertTrue(client.closed_by_server())
        client = RawClient(proxy.port)
        self.addCleanup(client.close)
        client.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                    b"Content-Length: %d\r\n\r\n" % len(payload))
        step = len(payload) // 6 + 1
        for start in range(0, len(payload), step):  # 0.05 s apart: 0.3 s in all, over the 0.2 s
            time.sleep(0.05)
            client.send(payload[start:start + step])
        status, _, body = client.response()
        self.assertEqual(status, 200, body)

    def test_an_internal_error_says_so_in_the_callers_dialect(self):
        original = coproxy.plan_messages
        self.addCleanup(setattr, coproxy, "plan_messages", original)
        coproxy.plan_messages = lambda *a, **k: {}["a bug"]
        status, _, body = self.request("POST", "/v1/messages", {"model": "claude-haiku-4.5", "max_tokens": 5,
                                                                "messages": [{"role": "user", "content": "x"}]})
        self.assertEqual((status, json.loads(body)), (500, {"type": "error", "error": {
            "type": "api_error", "message": "internal error in coproxy; see its log"}}))
        self.assertTrue(any("unhandled error" in line for line in LOGS.lines))
        original_chat = coproxy.plan_chat
        self.addCleanup(setattr, coproxy, "plan_chat", original_chat)
        coproxy.plan_chat = lambda *a, **k: {}["a bug"]
        status, _, body = self.request("POST", "/v1/chat/completions", chat_body())
        self.assertEqual((status, json.loads(body)["error"]["code"], json.loads(body)["error"]["type"]),
                         (500, "internal_error", "api_error"))
        self.assertEqual(self.request("GET", "/healthz")[0], 200)


class TestServerFraming(ProxyTestCase):
    proxy_overrides = {"header_timeout": 0.3, "idle_timeout": 0.3}

    def test_keep_alive_and_pipelining_in_order(self):
        client = self.raw()
        client.send(HEALTH + post("/v1/chat/completions", json.dumps(chat_body("one")).encode())
                    + b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
                    + post("/chat/completions", json.dumps(chat_body("two")).encode()))
        statuses = []
        for expected in ("status", "one", "object", "two"):
            status, headers, body = client.response()
            statuses.append(status)
            self.assertIn(expected, body.decode())
        self.assertEqual(statuses, [200, 200, 200, 200])
        client.send(HEALTH)
        self.assertEqual(client.response()[0], 200)

    def test_a_client_that_resets_while_sending_its_body_is_no_internal_error(self):
        body = json.dumps(chat_body()).encode()
        client = self.raw().send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                 b"Content-Length: %d\r\n\r\n%s" % (len(body) + 10, body))
        connections = self.proxy.server._connections
        self.assertTrue(wait_for(lambda: any(c.receiving_since for c in connections.values())))
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()  # a reset, not a close: before, a traceback and a 500 internal_error
        self.assertTrue(wait_for(lambda: any("error=client_closed" in l for l in LOGS.lines)))
        self.assertFalse([l for l in LOGS.lines if "unhandled" in l or "internal" in l])

    def test_one_byte_at_a_time(self):
        client = self.raw()
        for byte in post("/v1/chat/completions", json.dumps(chat_body("slow")).encode()):
            client.sock.sendall(bytes([byte]))
        status, _, body = client.response()
        self.assertEqual(status, 200)
        self.assertIn("echo: slow", body.decode())

    def test_chunked_request_body(self):
        payload = json.dumps(chat_body("chunky")).encode()
        pieces = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(p), p) for p in (payload[:10], payload[10:]))
        client = self.raw().send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                                 + pieces + b"0\r\nX-Trailer: 1\r\n\r\n" + HEALTH)
        status, _, body = client.response()
        self.assertEqual(status, 200)
        self.assertIn("echo: chunky", body.decode())
        self.assertEqual(client.response()[0], 200)

    def test_expect_100_continue(self):
        payload = json.dumps(chat_body("cont")).encode()
        client = self.raw().send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nExpect: 100-continue\r\n"
                                 b"Content-Length: %d\r\n\r\n" % len(payload))
        self.assertEqual(client.response()[0], 100)
        client.send(payload)
        status, _, body = client.response()
        self.assertEqual(status, 200)
        self.assertIn("echo: cont", body.decode())

    def test_expect_100_continue_not_sent_when_rejected(self):
        proxy = self.start_proxy(api_key="k")
        client = RawClient(proxy.port)
        self.addCleanup(client.close)
        client.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nExpect: 100-continue\r\nContent-Length: 10\r\n\r\n")
        self.assertEqual(client.response()[0], 401)
        self.assertTrue(client.closed_by_server())

    def test_head_and_errors(self):
        client = self.raw().send(b"HEAD /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        status, headers, body = client.response(head_only=True)
        self.assertEqual(status, 200)
        self.assertGreater(int(headers["content-length"]), 10)
        client.send(HEALTH)
        self.assertEqual(client.response()[0], 200)  # nothing stray was sent after the HEAD answer
        status, _, body = self.request("GET", "/v2/nothing")
        self.assertEqual(status, 404)
        self.assertEqual(json.loads(body)["error"]["code"], "unknown_url")
        status, headers, body = self.request("GET", "/v1/chat/completions")
        self.assertEqual(status, 405)
        self.assertEqual(headers["Allow"], "POST")
        self.assertEqual(self.request("OPTIONS", "/v1/models")[0], 204)

    def test_header_timeout_answers_408(self):
        proxy = self.start_proxy(header_timeout=0.05)  # waited out: short
        client = RawClient(proxy.port).send(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        self.addCleanup(client.close)
        status, headers, body = client.response()
        self.assertEqual(status, 408)
        self.assertTrue(client.closed_by_server())

    def test_idle_keep_alive_connection_is_closed_silently(self):
        proxy = self.start_proxy(idle_timeout=0.05)  # waited out: short
        client = RawClient(proxy.port).send(HEALTH)
        self.addCleanup(client.close)
        self.assertEqual(client.response()[0], 200)
        self.assertEqual(client.file.read(1), b"")  # closed, no 408 for an idle connection

    def test_http_1_0_closes_unless_keep_alive(self):
        client = self.raw().send(b"GET /healthz HTTP/1.0\r\n\r\n")
        status, headers, _ = client.response()
        self.assertEqual((status, headers.get("connection")), (200, "close"))
        self.assertTrue(client.closed_by_server())
        client = self.raw().send(b"GET /healthz HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        status, headers, _ = client.response()
        self.assertEqual(headers.get("connection"), "keep-alive")
        client.send(b"GET /healthz HTTP/1.0\r\n\r\n")
        self.assertEqual(client.response()[0], 200)

    def test_connection_close_is_honoured(self):
        client = self.raw().send(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        self.assertEqual(client.response()[1].get("connection"), "close")
        self.assertTrue(client.closed_by_server())

class TestEndToEnd(ProxyTestCase):
    def chat(self, body=None, headers=None, port=None):
        status, response_headers, data = self.request("POST", "/v1/chat/completions", body or chat_body(), headers,
                                                       port=port)
        return status, response_headers, json.loads(data)

    def open_stream(self, body):
        client = self.raw()
        client.send(post("/v1/chat/completions", json.dumps(body).encode()))
        status, headers, _ = client.response(head_only=True)
        self.assertEqual(status, 200)
        self.assertEqual(headers["content-type"], "text/event-stream; charset=utf-8")
        self.assertEqual(headers["transfer-encoding"], "chunked")
        return client

    def test_non_stream_answer_is_a_complete_openai_response(self):
        status, _, data = self.chat()
        self.assertEqual(status, 200)
        self.assertEqual(data["object"], "chat.completion")
        self.assertIsInstance(data["created"], int)
        self.assertEqual(data["choices"][0]["message"], {"role": "assistant", "content": "echo: hi", "refusal": None})
        self.assertEqual(data["usage"]["total_tokens"], 5)
        self.assertNoSecretsLogged()

    def test_identity_initiator_and_vision_headers_upstream(self):
        self.chat()
        headers = self.fake.requests_to("/chat/completions")[-1][2]
        self.assertTrue(headers["authorization"].startswith("Bearer tid=test1;"))
        expected = {"copilot-integration-id": "vscode-chat", "editor-version": coproxy.DEFAULT_EDITOR_VERSION,
                    "editor-plugin-version": coproxy.DEFAULT_EDITOR_PLUGIN_VERSION,
                    "user-agent": "GitHubCopilotChat/" + coproxy.DEFAULT_EDITOR_PLUGIN_VERSION.split("/")[1],
                    "openai-intent": "conversation-panel", "x-github-api-version": coproxy.COPILOT_CHAT_API_VERSION,
                    "x-initiator": "user"}
        for name, value in expected.items():
            self.assertEqual(headers.get(name), value, name)
        self.assertRegex(headers["x-request-id"], r"^[0-9a-f-]{36}$")
        self.assertNotIn("copilot-vision-request", headers)
        image = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}]}
        self.chat({"model": "gpt-4.1", "messages": [image, {"role": "assistant", "content": "a cat"},
                                                     {"role": "tool", "tool_call_id": "1", "content": "x"}]})
        headers = self.fake.requests_to("/chat/completions")[-1][2]
        self.assertEqual((headers["x-initiator"], headers["copilot-vision-request"]), ("agent", "true"))

    def test_default_model_and_tools_pass_through(self):
        proxy = self.start_proxy(default_model="gpt-4.1")
        tools = [{"type": "function", "function": {"name": "ls", "parameters": {"type": "object"}}}]
        self.fake.routes[("POST", "/chat/completions")] = lambda h, b: h.send_json(200, {
            "id": "c", "model": b["model"], "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
                "role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "ls", "arguments": "{}"}}]}}]})
        status, _, data = self.chat({"messages": [{"role": "user", "content": "x"}], "tools": tools,
                                     "tool_choice": "auto"}, port=proxy.port)
        self.assertEqual(status, 200)
        sent = json.loads(self.fake.requests_to("/chat/completions")[-1][3])
        self.assertEqual((sent["model"], sent["tools"], sent["tool_choice"]), ("gpt-4.1", tools, "auto"))
        self.assertEqual(data["choices"][0]["message"]["tool_calls"][0]["id"], "call_1")

    def test_stream_chunks_arrive_as_they_are_sent(self):
        gate = threading.Event()
        self.fake.stream(chunk("Hel"), gate, chunk("lo"), chunk(None, "stop"), USAGE_CHUNK, DONE)
        client = self.open_stream(chat_body(stream=True))
        started = time.monotonic()
        first = read_chunk(client.file)  # while the upstream is paused: only if coproxy did not buffer
        self.assertLess(time.monotonic() - started, 2.0)  # (a buffering proxy would hit the 5 s timeout)
        self.assertEqual(sse_data(first)[0]["choices"][0]["delta"]["content"], "Hel")
        gate.set()
        rest = read_rest(client.file)
        data = sse_data(first + rest)
        self.assertEqual(data[-1], "[DONE]")
        self.assertEqual("".join(c["choices"][0]["delta"].get("content", "") for c in data[:-1] if c["choices"]),
                         "Hello")
        self.assertFalse(any("usage" in c for c in data[:-1]))
        self.assertEqual([c["choices"][0]["finish_reason"] for c in data[:-1]][-1], "stop")
        client.send(HEALTH)  # the connection is still good for the next request
        self.assertEqual(client.response()[0], 200)

    def test_stream_include_usage(self):
        self.fake.stream(chunk("x"), chunk(None, "stop"), USAGE_CHUNK, DONE)
        _, _, body = self.request("POST", "/v1/chat/completions",
                                  chat_body(stream=True, stream_options={"include_usage": True}))
        data = sse_data(body)
        self.assertEqual(data[-2]["usage"]["total_tokens"], 7)
        self.assertEqual(data[-2]["choices"], [])

    def test_keep_alive_pings_during_upstream_silence(self):
        proxy = self.start_proxy(ping_seconds=0.05)
        gate = threading.Event()
        self.fake.stream(chunk("a"), gate, chunk(None, "stop"), DONE)
        client = RawClient(proxy.port)
        self.addCleanup(client.close)
        client.send(post("/v1/chat/completions", json.dumps(chat_body(stream=True)).encode()))
        client.response(head_only=True)
        read_chunk(client.file)
        self.assertEqual(read_chunk(client.file), b": ping\n\n")
        self.assertEqual(read_chunk(client.file), b": ping\n\n")
        gate.set()
        tail = read_rest(client.file)
        self.assertTrue(tail.endswith(b"data: [DONE]\n\n"))

    def test_stream_to_an_http_1_0_client_is_close_delimited(self):
        self.fake.stream(chunk("old"), chunk(None, "stop"), DONE)
        body = json.dumps(chat_body(stream=True)).encode()
        client = self.raw().send(b"POST /v1/chat/completions HTTP/1.0\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        status, headers, data = client.response()  # no Content-Length, no chunking: read to the close
        self.assertEqual((status, headers.get("connection")), (200, "close"))
        self.assertNotIn("transfer-encoding", headers)
        self.assertEqual(sse_data(data)[0]["choices"][0]["delta"]["content"], "old")
        self.assertEqual(sse_data(data)[-1], "[DONE]")

    def test_upstream_cut_mid_stream_becomes_an_error_event(self):
        self.fake.stream(chunk("par"), "cut")
        status, _, body = self.request("POST", "/v1/chat/completions", chat_body(stream=True))
        self.assertEqual(status, 200)
        data = sse_data(body)
        self.assertEqual(data[0]["choices"][0]["delta"]["content"], "par")
        self.assertEqual(data[-1]["error"]["type"], "api_error")
        self.assertIn("mid-stream", data[-1]["error"]["message"])

    def test_client_disconnect_frees_the_upstream_connection(self):
        self.fake.stream(chunk("a"), "watch")
        client = self.open_stream(chat_body(stream=True))
        read_chunk(client.file)
        client.close()
        self.assertTrue(self.fake.client_closed.wait(5), "upstream connection was not closed")
        self.fake.chat_script = None
        self.assertEqual(self.request("GET", "/healthz")[0], 200)
        self.assertEqual(self.chat()[0], 200)

    def test_a_client_that_stops_reading_a_stream_is_let_go(self):
        self.addCleanup(setattr, coproxy, "STALLED_CLIENT_SECONDS", coproxy.STALLED_CLIENT_SECONDS)
        coproxy.STALLED_CLIENT_SECONDS = 0.1  # waited out: short
        # 10 MB: more than the sockets between can hold (coproxy's send buffer grows to 4 MB),
        # with this client's receive buffer held small (it could grow to 32 MB)
        self.fake.stream(*[chunk("x" * 65536)] * 160 + [chunk(None, "stop"), DONE])
        client = self.raw()
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        client.send(post("/v1/chat/completions", json.dumps(chat_body(stream=True)).encode()))
        self.assertEqual(client.response(head_only=True)[0], 200)  # ... and then reads nothing
        self.assertTrue(wait_for(
            lambda: any("error=client_stalled" in line for line in LOGS.lines), 10))
        self.assertTrue(wait_for(lambda: self.proxy.app.metrics.active_streams == 0))
        client.close()
        self.fake.chat_script = None
        self.assertEqual(self.chat()[0], 200)

    def test_a_client_that_stops_reading_a_whole_answer_gives_its_slot_back(self):
        self.addCleanup(setattr, coproxy, "STALLED_CLIENT_SECONDS", coproxy.STALLED_CLIENT_SECONDS)
        coproxy.STALLED_CLIENT_SECONDS = 0.1  # waited out: short
        proxy = self.start_proxy(max_concurrency=1, queue_timeout=10)
        big = {"id": "c", "object": "chat.completion", "model": "gpt-4.1", "choices": [{
            "index": 0, "finish_reason": "stop",
            "message": {"role": "assistant", "content": "x" * (10 << 20)}}]}  # as in the test above
        self.fake.routes[("POST", "/chat/completions")] = lambda h, p: h.send_json(200, big)
        client = RawClient(proxy.port)
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        self.addCleanup(client.close)
        # ... and reads nothing
        client.send(post("/v1/chat/completions", json.dumps(chat_body()).encode()))
        self.assertTrue(wait_for(lambda: self.fake.requests_to("/chat/completions")))
        small = dict(big, choices=[{"index": 0, "finish_reason": "stop", "message": {
            "role": "assistant", "content": "ok"}}])
        self.fake.routes[("POST", "/chat/completions")] = lambda h, p: h.send_json(200, small)
        # the one slot is free again once that client is dropped, not in 10 s
        started = time.monotonic()
        self.assertEqual(self.request("POST", "/v1/chat/completions", chat_body(),
                                      port=proxy.port)[0], 200)
        self.assertLess(time.monotonic() - started, 5)

    def test_a_client_that_leaves_a_whole_answer_cuts_its_upstream_call_short(self):
        hung = threading.Event()
        self.addCleanup(hung.set)

        def hang(handler, payload):
            if handler.wait_until_client_closes():
                self.fake.client_closed.set()
            handler.close_connection = True
        self.fake.routes[("POST", "/chat/completions")] = hang
        client = self.raw()
        client.send(post("/v1/chat/completions", json.dumps(chat_body()).encode()))
        self.assertTrue(wait_for(lambda: self.fake.requests_to("/chat/completions")))
        client.close()
        self.assertTrue(self.fake.client_closed.wait(5), "the upstream call went on after the client left")
        # logged as the client's leaving, not as Copilot unreachable (502), which /healthz showed
        self.assertTrue(wait_for(lambda: any("error=client_closed" in l for l in LOGS.lines)))
        self.assertIsNone(self.proxy.app.gateway.last_outcome)

    def test_a_stream_cut_cleanly_before_its_end_is_an_error_not_a_finish(self):
        self.fake.stream(chunk("half an ans"))  # the body ends cleanly: no finish_reason, no [DONE]
        status, _, body = self.request("POST", "/v1/chat/completions", chat_body(stream=True))
        data = sse_data(body)
        self.assertEqual((status, data[-1]["error"]["code"]), (200, "incomplete_stream"))
        self.assertNotIn("[DONE]", data)
        self.assertTrue(wait_for(lambda: any("error=Copilot closed the stream" in l for l in LOGS.lines)), LOGS.lines)

    def test_a_failing_translation_ends_the_stream_with_an_error_not_pings(self):
        original = coproxy.ChatNormalize.feed

        def feed(translator, event, data):  # a bug in a translator, on the second chunk
            if "boom" in data:
                raise KeyError("boom")
            return original(translator, event, data)
        self.addCleanup(setattr, coproxy.ChatNormalize, "feed", original)
        coproxy.ChatNormalize.feed = feed
        proxy = self.start_proxy(ping_seconds=0.05)
        gate = threading.Event()
        self.addCleanup(gate.set)
        self.fake.stream(chunk("a"), chunk("boom"), gate, chunk(None, "stop"), DONE)
        status, _, body = self.request("POST", "/v1/chat/completions", chat_body(stream=True), port=proxy.port)
        data = sse_data(body)
        self.assertEqual((status, data[-1]["error"]["code"]), (200, "internal_error"))  # ended, not pinged for ever
        self.assertNotIn("[DONE]", data)
        self.assertTrue(wait_for(lambda: proxy.app.metrics.active_streams == 0))
        self.assertTrue(any("translating the stream for gpt-4.1 failed" in line for line in LOGS.lines))

    def test_a_relay_that_raises_on_the_streams_end_ends_it_with_an_error_not_pings(self):
        original = coproxy.StreamRelay._ending

        def ending(relay, error):  # a bug where the relay writes an upstream cut
            raise KeyError("boom")
        self.addCleanup(setattr, coproxy.StreamRelay, "_ending", original)
        coproxy.StreamRelay._ending = ending
        self.fake.stream(chunk("par"), "cut")
        # before: the stream stayed open with pings every 5 s, and this read timed out
        status, _, body = self.request("POST", "/v1/chat/completions", chat_body(stream=True))
        data = sse_data(body)
        self.assertEqual(data[0]["choices"][0]["delta"]["content"], "par")
        self.assertEqual((status, data[-1]["error"]["code"]), (200, "internal_error"))
        self.assertTrue(wait_for(lambda: self.proxy.app.metrics.active_streams == 0))

    def test_an_error_object_in_a_200_whole_answer_is_a_502_with_its_message(self):
        # as it is inside a stream; before, the client got an empty answer with 200
        error = {"error": {"message": "model overloaded", "code": "overloaded"}}
        for path in ("/chat/completions", "/responses"):
            self.fake.routes[("POST", path)] = lambda h, p: h.send_json(200, error)
        for model in ("gpt-4.1", "gpt-5.1-codex"):  # a chat answer, a Responses one
            status, _, data = self.chat(chat_body(model=model))
            self.assertEqual((status, data["error"]["message"], data["error"]["code"]),
                             (502, "model overloaded", "overloaded"), model)
            status, _, body = self.request("POST", "/v1/messages", {
                "model": model, "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]})
            self.assertEqual((status, json.loads(body)["error"]["message"]),
                             (502, "model overloaded"), model)
        self.fake.routes[("POST", "/v1/messages")] = lambda h, p: h.send_json(200, {
            "type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
        status, _, body = self.request("POST", "/v1/responses", {  # an Anthropic answer
            "model": "claude-sonnet-4.5", "input": "hi"})
        self.assertEqual((status, json.loads(body)["error"]["message"]), (502, "Overloaded"))

    def test_upstream_errors_keep_status_and_message(self):
        def rate_limited(handler, body):
            handler.send_json(429, {"error": {"message": "rate limit exceeded", "code": "rate_limited"}},
                              [("Retry-After", "17")])
        self.fake.routes[("POST", "/chat/completions")] = rate_limited
        status, headers, data = self.chat()
        self.assertEqual((status, headers["Retry-After"]), (429, "17"))
        self.assertEqual(data["error"], {"message": "rate limit exceeded", "type": "rate_limit_error",
                                         "param": None, "code": "rate_limited"})
        self.fake.routes[("POST", "/chat/completions")] = lambda h, b: h.send_text(400, json.dumps({"error": {
            "message": "The requested model is not supported.", "code": "model_not_supported", "param": "model",
            "type": "invalid_request_error"}}))
        status, _, data = self.chat()
        self.assertEqual(status, 400)
        self.assertEqual(data["error"]["message"], "The requested model is not supported.")
        self.assertEqual((data["error"]["code"], data["error"]["param"]), ("model_not_supported", "model"))
        catalog = copy.deepcopy(CATALOG)
        catalog[4]["policy"] = {"state": "requires_consent", "terms": "Enable access to Claude Opus 4.6."}
        self.fake.routes[("GET", "/models")] = lambda h, b: h.send_json(200, {"object": "list", "data": catalog})
        proxy = self.start_proxy()
        status, _, body = self.request("POST", "/v1/chat/completions", {"model": "claude-opus-4.6", "messages": [
            {"role": "user", "content": "hi"}]}, port=proxy.port)
        self.assertEqual((status, json.loads(body)["error"]["message"]), (400, (
            "The requested model is not supported: claude-opus-4.6 is not enabled for your account (policy: "
            "requires_consent); enable it at https://github.com/settings/copilot/features or once in VS Code's "
            "model picker")))
        self.fake.routes[("POST", "/chat/completions")] = lambda h, b: h.send_text(
            500, "upstream exploded for Bearer tid=secretstuff;exp=1")
        status, _, data = self.chat()
        self.assertEqual(status, 500)
        self.assertNotIn("secretstuff", data["error"]["message"])

    def test_401_refreshes_the_token_and_retries_once(self):
        calls = []

        def first_401(handler, body):
            calls.append(handler.headers["Authorization"])
            if len(calls) == 1:
                handler.send_text(401, "unauthorized: token expired")
            else:
                handler.send_json(200, {"id": "x", "choices": [{"index": 0, "finish_reason": "stop",
                                                               "message": {"role": "assistant", "content": "ok"}}]})
        self.fake.routes[("POST", "/chat/completions")] = first_401
        status, _, data = self.chat()
        self.assertEqual((status, data["choices"][0]["message"]["content"]), (200, "ok"))
        self.assertEqual(self.fake.exchanges, 2)
        self.assertNotEqual(calls[0], calls[1])
        self.fake.routes[("POST", "/chat/completions")] = lambda h, b: (calls.append(1), h.send_text(401, "no"))
        del calls[:]
        self.assertEqual(self.chat()[0], 401)  # refreshed and retried once, then the 401 is the answer
        self.assertEqual((len(calls), self.fake.exchanges), (2, 3))

    def test_single_flight_through_the_proxy(self):
        gate = self.fake.exchange_gate = threading.Event()
        fetches, fetch_models = [], self.proxy.app.auth.fetch_models
        self.proxy.app.auth.fetch_models = lambda *a: (fetches.append(1), fetch_models(*a))[1]
        results = []
        threads = [threading.Thread(target=lambda: results.append(self.chat()[0])) for _ in range(50)]
        for t in threads:
            t.start()
        self.assertTrue(wait_for(lambda: self.fake.exchanges >= 1))
        gate.set()
        for t in threads:
            t.join(15)
        self.assertEqual(results, [200] * 50)
        self.assertEqual(self.fake.exchanges, 1)
        self.assertEqual(len(fetches), 1)  # one catalog refresh for 50 requests, not 50 queued threads

    def test_concurrency_limit_queues_then_503(self):
        proxy = self.start_proxy(max_concurrency=1, queue_timeout=0.05)  # waited out: short
        gate = threading.Event()
        self.fake.stream(chunk("a"), gate, chunk(None, "stop"), DONE)
        client = RawClient(proxy.port)
        self.addCleanup(client.close)
        client.send(post("/v1/chat/completions", json.dumps(chat_body(stream=True)).encode()))
        client.response(head_only=True)
        read_chunk(client.file)  # the one slot is taken by this stream
        status, headers, data = self.chat(port=proxy.port)
        self.assertEqual((status, headers["Retry-After"]), (503, "1"))
        self.assertEqual(data["error"]["code"], "overloaded")
        proxy.app.config.queue_timeout = 5  # now a request waits for the slot instead of failing
        waiting = []
        second = threading.Thread(target=lambda: waiting.append(self.chat(port=proxy.port)[0]))
        self.fake.chat_script = None
        second.start()
        second.join(0.3)
        self.assertTrue(second.is_alive())  # queued behind the stream: no slot until it ends
        gate.set()
        second.join(5)
        self.assertEqual(waiting, [200])

    def test_api_key(self):
        proxy = self.start_proxy(api_key="sekrit-key")
        status, headers, data = self.chat(port=proxy.port)
        self.assertEqual((status, data["error"]["code"]), (401, "invalid_api_key"))
        self.assertEqual(self.chat(headers={"Authorization": "Bearer sekrit-key"}, port=proxy.port)[0], 200)
        self.assertEqual(self.chat(headers={"x-api-key": "sekrit-key"}, port=proxy.port)[0], 200)
        self.assertEqual(self.chat(headers={"Authorization": "Bearer wrong"}, port=proxy.port)[0], 401)
        self.assertEqual(self.request("GET", "/v1/models", port=proxy.port)[0], 401)
        self.assertEqual(self.request("GET", "/healthz", port=proxy.port)[0], 200)

    def test_not_logged_in_gives_503_with_the_fix(self):
        proxy = self.start_proxy(github_token=None, state_dir=os.path.join(self.tmp, "empty"))
        proxy.config.github_token = None
        status, _, data = self.chat(port=proxy.port)
        self.assertEqual(status, 503)
        self.assertIn("auth login", data["error"]["message"])
        health = json.loads(self.request("GET", "/healthz", port=proxy.port)[2])
        self.assertEqual(health["auth"]["ready"], False)
        self.assertEqual(health["upstream"]["class"], "auth")

    def test_models_list_get_and_fallback(self):
        status, headers, body = self.request("GET", "/v1/models")
        data = json.loads(body)
        ids = [m["id"] for m in data["data"]]
        self.assertEqual(ids, CATALOG_IDS + ["auto"])  # the Auto model after Copilot's own
        self.assertEqual(data["data"][1]["vendor"], "Anthropic")
        self.assertEqual(data["data"][1]["context_window"], 200000)
        self.assertEqual(headers["X-Coproxy-Models-Source"], "copilot")
        self.assertEqual(json.loads(self.request("GET", "/models")[2])["data"][0]["id"], "gpt-4.1")
        self.assertEqual(len(self.fake.requests_to("/models")), 1)  # cached
        status, _, body = self.request("GET", "/v1/models/claude-sonnet-4.5")
        self.assertEqual((status, json.loads(body)["object"]), (200, "model"))
        codex = json.loads(self.request("GET", "/v1/models/gpt-5.1-codex")[2])
        self.assertEqual(codex["supported_endpoints"], ["/responses"])  # no WebSocket here
        status, _, body = self.request("GET", "/v1/models/gpt-9")
        self.assertEqual((status, json.loads(body)["error"]["code"]), (404, "model_not_found"))
        self.fake.routes[("GET", "/models")] = lambda h, b: h.send_text(500, "down")
        proxy = self.start_proxy()
        status, headers, body = self.request("GET", "/v1/models", port=proxy.port)
        self.assertEqual((status, headers["X-Coproxy-Models-Source"]), (200, "fallback"))
        self.assertIn("gpt-4.1", [m["id"] for m in json.loads(body)["data"]])

    def test_graceful_shutdown_finishes_in_flight_streams(self):
        gate = threading.Event()
        self.fake.stream(chunk("a"), gate, chunk("b"), chunk(None, "stop"), DONE)
        idle = self.raw().send(HEALTH)
        self.assertEqual(idle.response()[0], 200)
        client = self.open_stream(chat_body(stream=True))
        read_chunk(client.file)
        stopper = threading.Thread(target=self.proxy.stop)
        stopper.start()
        self.assertEqual(idle.file.read(1), b"")  # the idle keep-alive connection is closed at once
        gate.set()
        body = read_rest(client.file)
        self.assertTrue(body.endswith(b"data: [DONE]\n\n"))
        stopper.join(10)
        self.assertFalse(stopper.is_alive())

    def test_healthz_says_what_copilot_last_answered(self):
        health = json.loads(self.request("GET", "/healthz")[2])
        self.assertEqual(health["upstream"]["ok"], None)
        self.chat()
        self.assertEqual(json.loads(self.request("GET", "/healthz")[2])["upstream"]["ok"], True)
        self.fake.routes[("POST", "/chat/completions")] = lambda h, b: h.send_text(401, "unauthorized: token expired")
        self.chat()
        upstream = json.loads(self.request("GET", "/healthz")[2])["upstream"]
        self.assertEqual((upstream["ok"], upstream["class"]), (False, "http_401"))
        closed = socket.socket()
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        closed.close()
        proxy = self.start_proxy(copilot_api_url="http://127.0.0.1:%d" % port)
        self.assertEqual(self.chat(port=proxy.port)[0], 502)
        upstream = json.loads(self.request("GET", "/healthz", port=proxy.port)[2])["upstream"]
        self.assertEqual((upstream["ok"], upstream["class"]), (False, "refused"))
        self.assertIn("refused", upstream["message"])


class TestEndToEndTLS(ProxyTestCase):
    tls = True

    def test_chat_and_stream_over_tls_with_ca_file(self):
        status, _, body = self.request("POST", "/v1/chat/completions", chat_body())
        self.assertEqual(status, 200)
        self.fake.stream(chunk("t"), chunk(None, "stop"), DONE)
        status, _, body = self.request("POST", "/v1/chat/completions", chat_body(stream=True))
        self.assertEqual(sse_data(body)[-1], "[DONE]")
        self.assertEqual(self.proxy.app.client.connections_opened, 1)

    def test_a_silent_upstream_is_a_504_after_upstream_timeout_and_the_next_request_works(self):
        """The upstream socket blocks with no timeout: the gateway's timer cuts the call off."""
        proxy = self.start_proxy(upstream_timeout=0.3, ca_file=self.write_file("ca.pem", TEST_CA_PEM))
        silence = threading.Event()
        self.addCleanup(silence.set)
        answer = self.fake.routes[("POST", "/chat/completions")]
        self.fake.routes[("POST", "/chat/completions")] = lambda handler, body: silence.wait(10)
        for stream in (False, True):
            started = time.monotonic()
            status, _, body = self.request("POST", "/v1/chat/completions", chat_body(stream=stream),
                                           port=proxy.port)
            self.assertEqual((status, json.loads(body)["error"]["code"]), (504, "upstream_timeout"), body)
            self.assertIn("--upstream-timeout", json.loads(body)["error"]["message"])
            self.assertLess(time.monotonic() - started, 5)
        self.fake.routes[("POST", "/chat/completions")] = answer
        self.assertEqual(self.request("POST", "/v1/chat/completions", chat_body(), port=proxy.port)[0], 200)

    def test_upstream_timeout_bounds_silence_not_a_long_answer_that_keeps_coming(self):
        proxy = self.start_proxy(upstream_timeout=0.3, ca_file=self.write_file("ca.pem", TEST_CA_PEM))
        answer = json.dumps({"id": "c1", "object": "chat.completion", "created": 1, "model": "gpt-4.1",
                             "choices": [{"index": 0, "finish_reason": "stop", "message": {
                                 "role": "assistant", "content": "slow but steady"}}]}).encode()

        def slowly(handler, body):  # 0.6 s in all, never more than 0.15 s without a byte
            handler.send_response(200)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(answer)))
            handler.end_headers()
            for start in range(0, len(answer), len(answer) // 4 + 1):
                time.sleep(0.15)
                handler.wfile.write(answer[start:start + len(answer) // 4 + 1])
                handler.wfile.flush()
        self.fake.routes[("POST", "/chat/completions")] = slowly
        status, _, body = self.request("POST", "/v1/chat/completions", chat_body(), port=proxy.port)
        self.assertEqual((status, json.loads(body)["choices"][0]["message"]["content"]),
                         (200, "slow but steady"), body)


class TestLoadWithChurn(ProxyTestCase):
    """Many clients at once over TLS while the upstream drops kept-alive connections at random
    and some clients leave mid-request: no request that stayed may see an error."""

    tls = True

    def _script(self, handler, payload):
        if payload.get("stream"):
            handler.start_chunked()
            for piece in (chunk("a"), chunk("b"), chunk(None, "stop"), DONE):
                handler.write_chunk(piece)
            handler.end_chunked()
        else:
            self.fake.answer(handler, {"id": "c", "model": payload["model"], "choices": [
                {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "ok"}}]})

    def test_no_client_sees_an_error_while_connections_churn_and_clients_leave(self):
        self.fake.chat_script = self._script
        self.fake.churn("/chat/completions", seed=19)
        port = self.proxy.port
        plain = post("/v1/chat/completions", json.dumps(chat_body()).encode())
        streamed = post("/v1/chat/completions", json.dumps(chat_body(stream=True)).encode())
        # a count of answers, not a time: a loaded machine (CI under -X dev) takes longer, not fewer
        deadline, wanted = time.monotonic() + 30, 150
        errors, served = [], collections.Counter()

        def going():
            return served["plain"] + served["stream"] < wanted and time.monotonic() < deadline

        def client(number):
            rng = random.Random(number)
            while going():
                with socket.create_connection(("127.0.0.1", port), timeout=10) as sock, sock.makefile("rb") as reader:
                    while going():
                        stream = rng.random() < 0.4
                        sock.sendall(streamed if stream else plain)
                        if rng.random() < 0.1:  # leaves mid-request: before or after the answer's head
                            if rng.random() < 0.5:
                                reader.readline()
                            served["left"] += 1
                            break
                        status, _, body = read_response(reader)
                        if status != 200 or (stream and sse_data(body)[-1] != "[DONE]"):
                            errors.append((status, body[:300]))
                        served["stream" if stream else "plain"] += 1
                    else:
                        sock.sendall(plain)  # and all leave at once at the end, answers unread
        threads = [threading.Thread(target=client, args=(n,)) for n in range(12)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(40)
        self.assertEqual(errors, [])
        self.assertGreaterEqual(served["plain"] + served["stream"], wanted, served)
        for body in (chat_body(), chat_body(stream=True)):  # and right after they all left
            status, _, answer = self.request("POST", "/v1/chat/completions", body)
            self.assertEqual(status, 200, answer)
        self.assertGreater(self.proxy.app.client.connections_opened, 10)  # the upstream did churn


class TestTrust(ProxyTestCase):
    """No web page and no DNS-rebound name can use the default (loopback, no key) setup."""

    def raw_request(self, head, port=None, body=b""):
        client = RawClient(port or self.proxy.port)
        self.addCleanup(client.close)
        client.send(head + b"\r\n" + body)
        return client.response()

    def test_only_loopback_names_and_allowed_hosts_without_a_key(self):
        body = json.dumps(chat_body()).encode()
        for host in (b"127.0.0.1", b"127.0.0.1:%d" % self.proxy.port, b"localhost:1", b"[::1]:8080", b"LOCALHOST"):
            status, _, _ = self.raw_request(b"POST /v1/chat/completions HTTP/1.1\r\nHost: %s\r\nContent-Length: %d\r\n"
                                            % (host, len(body)), body=body)
            self.assertEqual(status, 200, host)
        for path in (b"/v1/chat/completions", b"/v1/models", b"/usage", b"/nothing"):
            status, _, answer = self.raw_request(b"GET %s HTTP/1.1\r\nHost: evil.example:8080\r\n" % path)
            error = json.loads(answer)["error"]
            self.assertEqual((status, error["code"]), (403, "host_not_allowed"), path)
            self.assertIn("--allowed-host evil.example", error["message"])
        self.assertEqual(self.raw_request(b"GET /healthz HTTP/1.1\r\nHost: evil.example\r\n")[0], 200)
        named = self.start_proxy(allowed_hosts=["my-laptop.local"])
        self.assertEqual(self.raw_request(b"GET /v1/models HTTP/1.1\r\nHost: my-laptop.local:80\r\n", named.port)[0], 200)
        self.assertEqual(self.raw_request(b"GET /v1/models HTTP/1.1\r\nHost: my-laptop.local.\r\n", named.port)[0], 200)
        keyed = self.start_proxy(api_key="k")
        self.assertEqual(self.raw_request(b"GET /v1/models HTTP/1.1\r\nHost: 192.168.1.9:8080\r\nAuthorization: "
                                          b"Bearer k\r\n", keyed.port)[0], 200)
        self.assertEqual(self.fake.requests_to("/chat/completions").__len__(), 5)

    def test_web_pages_are_refused_unless_their_origin_is_allowed(self):
        # what any page can send without a preflight: a "simple" POST with text/plain
        body = json.dumps(chat_body()).encode()
        head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nOrigin: https://evil.example\r\n"
                b"Content-Type: text/plain\r\nContent-Length: %d\r\n" % len(body))
        status, headers, answer = self.raw_request(head, body=body)
        error = json.loads(answer)["error"]
        self.assertEqual((status, error["code"]), (403, "origin_not_allowed"))
        self.assertIn("--cors-origin https://evil.example", error["message"])
        self.assertNotIn("access-control-allow-origin", headers)
        self.assertEqual(self.fake.requests_to("/chat/completions"), [])
        status, headers, _ = self.raw_request(b"OPTIONS /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nOrigin: "
                                              b"https://evil.example\r\nAccess-Control-Request-Method: POST\r\n")
        self.assertEqual((status, headers.get("access-control-allow-origin")), (403, None))
        self.assertEqual(self.raw_request(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nOrigin: https://evil.example\r\n")[0],
                         200)
        keyed = self.start_proxy(api_key="k")  # a key does not let unlisted pages in either
        status, _, _ = self.raw_request(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nOrigin: https://evil.example\r\n"
                                        b"Authorization: Bearer k\r\n", keyed.port)
        self.assertEqual(status, 403)
        allowed = self.start_proxy(cors_origins=["https://app.example"])
        status, headers, _ = self.raw_request(head.replace(b"evil", b"app"), allowed.port, body)
        self.assertEqual((status, headers["access-control-allow-origin"]), (200, "https://app.example"))

    def test_a_pages_no_cors_requests_are_refused_by_their_fetch_metadata(self):
        # <img src="http://127.0.0.1:8080/usage">: no Origin, but Sec-Fetch-Site says a page sent it
        usage_calls = len(self.fake.requests_to("/copilot_internal/user"))
        for site in (b"cross-site", b"same-site"):
            status, _, answer = self.raw_request(b"GET /usage HTTP/1.1\r\nHost: 127.0.0.1\r\nSec-Fetch-Site: %s\r\n"
                                                 b"Sec-Fetch-Mode: no-cors\r\n" % site)
            self.assertEqual((status, json.loads(answer)["error"]["code"]), (403, "origin_not_allowed"), site)
        self.assertEqual(len(self.fake.requests_to("/copilot_internal/user")), usage_calls)
        typed = self.raw_request(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nSec-Fetch-Site: none\r\n")
        self.assertEqual(typed[0], 200)  # the user typed the address: fine

    def test_response_ids_cannot_climb_or_grow_the_metrics(self):
        for index in range(3):
            self.request("GET", "/v1/responses/resp_%d" % index)
        status, _, _ = self.request("GET", "/v1/responses/%2e%2e")
        self.assertEqual(status, 404)
        self.assertFalse(any(r[1].startswith("/responses/..") or r[1] == "/" for r in self.fake.requests))
        metrics = self.request("GET", "/metrics")[2].decode()
        self.assertIn('route="/responses/{id}"', metrics)
        self.assertNotIn("resp_1", metrics)

    def test_image_urls_of_this_machine_are_refused_without_telling_what_is_there(self):
        self.fake.routes[("GET", "/img.png")] = lambda h, b: h.send_body(200, PNG, "image/png")
        answers = []
        for path in ("/img.png", "/missing.png"):
            status, _, body = self.request("POST", "/v1/chat/completions", chat_body([
                {"type": "image_url", "image_url": {"url": self.fake.url + path}}]))
            error = json.loads(body)["error"]
            self.assertEqual((status, error["code"]), (400, "image_fetch_failed"))
            answers.append(error["message"].replace(path, "PATH"))
        self.assertEqual(answers[0], answers[1])  # an image there or nothing: the same answer
        self.assertNotIn("404", answers[1])
        self.assertEqual(self.fake.requests_to("/img.png") + self.fake.requests_to("/chat/completions"), [])
        self.assertTrue(any("non-public address" in line for line in LOGS.lines))

    def test_a_smuggled_image_url_cannot_poison_a_later_answer(self):
        proxy = self.start_proxy(image_fetch_allow_private=True)
        poison = ("/x HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\nGET /poison HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        self.fake.routes[("GET", "/poison")] = lambda h, b: h.send_json(200, {"choices": [{"message": {
            "content": "attacker's text"}}]})
        self.request("POST", "/v1/chat/completions", chat_body([{"type": "image_url", "image_url": {
            "url": self.fake.url + poison}}]), port=proxy.port)
        self.assertEqual(self.fake.requests_to("/poison"), [])
        status, _, body = self.request("POST", "/v1/chat/completions", chat_body("honest"), port=proxy.port)
        self.assertEqual(json.loads(body)["choices"][0]["message"]["content"], "echo: honest")

    def test_a_client_cannot_forge_log_lines(self):
        self.fake.routes[("GET", "/models")] = lambda h, b: h.send_text(500, "down")  # names then go as given
        written = io.StringIO()  # what serve's own handler would write (setup_logging's formatter)
        handler = logging.StreamHandler(written)
        handler.setFormatter(coproxy.LogFormatter())
        logging.getLogger("coproxy").addHandler(handler)
        self.addCleanup(logging.getLogger("coproxy").removeHandler, handler)
        proxy = self.start_proxy()
        self.request("POST", "/v1/chat/completions", chat_body(model="gpt\r\n2026-01-01 INFO FAKE line"),
                     port=proxy.port)
        self.assertTrue(wait_for(lambda: "FAKE" in written.getvalue()))
        self.assertIn("gpt\\x0d\\x0a2026-01-01 INFO FAKE line", written.getvalue())
        self.assertFalse([line for line in written.getvalue().splitlines() if line.startswith("2026-01-01 INFO FAKE")])
        self.assertNoSecretsLogged()
class TestImageURLs(ProxyTestCase):
    """Images given by URL are fetched by coproxy and sent to Copilot as data, in every dialect.
    (The fake image host is this machine, so these tests allow private addresses.)"""

    proxy_overrides = {"image_fetch_allow_private": True}

    def setUp(self):
        super().setUp()
        routes = self.fake.routes
        routes[("GET", "/img.png")] = lambda h, b: h.send_body(200, PNG, "image/png")
        routes[("GET", "/moved")] = lambda h, b: h.send_body(302, b"", "text/plain", [("Location", "/img.png")])
        routes[("GET", "/page")] = lambda h, b: h.send_body(200, b"<html>", "text/html; charset=utf-8")
        self.data_url = "data:image/png;base64," + base64.b64encode(PNG).decode()

    def sent(self, path):
        request = self.fake.requests_to(path)[-1]
        return json.loads(request[3]), request[2]

    def test_chat_image_url_is_fetched_once_and_sent_inline(self):
        body = {"model": "gpt-4.1", "messages": [{"role": "user", "content": [
            {"type": "text", "text": "what is this?"},
            {"type": "image_url", "image_url": {"url": self.fake.url + "/moved?sig=s3cret", "detail": "low"}}]}]}
        for _ in range(2):  # an agent resends the history: the second turn is served from the cache
            status, _, answer = self.request("POST", "/v1/chat/completions", body)
            self.assertEqual(status, 200, answer)
            sent, headers = self.sent("/chat/completions")
            self.assertEqual(sent["messages"][0]["content"][1]["image_url"], {"url": self.data_url, "detail": "low"})
            self.assertEqual(headers["copilot-vision-request"], "true")
        self.assertEqual((len(self.fake.requests_to("/moved")), len(self.fake.requests_to("/img.png"))), (1, 1))
        self.assertEqual(self.fake.requests_to("/img.png")[0][2]["accept"], "image/*")

    def test_anthropic_url_sources_become_base64_in_native_and_translated_calls(self):
        image = {"type": "image", "source": {"type": "url", "url": self.fake.url + "/img.png"}}
        messages = [{"role": "user", "content": [{"type": "text", "text": "look"}, image]},
                    {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "shot", "input": {}}]},
                    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": [image]}]}]
        status, _, answer = self.request("POST", "/v1/messages", {"model": "claude-sonnet-4.5", "max_tokens": 50,
                                                                  "messages": messages})
        self.assertEqual(status, 200, answer)
        sent, _ = self.sent("/v1/messages")
        inline = {"type": "base64", "media_type": "image/png", "data": base64.b64encode(PNG).decode()}
        self.assertEqual(sent["messages"][0]["content"][1]["source"], inline)
        self.assertEqual(sent["messages"][2]["content"][0]["content"][0]["source"], inline)
        status, _, answer = self.request("POST", "/v1/messages", {"model": "claude-haiku-4.5", "max_tokens": 50,
                                                                  "messages": messages[:1]})
        self.assertEqual(status, 200, answer)
        sent, _ = self.sent("/chat/completions")
        self.assertEqual(sent["messages"][-1]["content"][1]["image_url"]["url"], self.data_url)

    def test_responses_input_image_url_is_inlined(self):
        status, _, answer = self.request("POST", "/v1/responses", {"model": "gpt-5.1-codex", "input": [
            {"type": "message", "role": "user", "content": [{"type": "input_image", "image_url": self.fake.url + "/img.png"}]}]})
        self.assertEqual(status, 200, answer)
        self.assertEqual(self.sent("/responses")[0]["input"][0]["content"][0]["image_url"], self.data_url)

    def test_images_that_cannot_be_had_fail_clearly_in_the_callers_dialect(self):
        chat = lambda url: {"model": "gpt-4.1", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}]}]}
        status, _, body = self.request("POST", "/v1/chat/completions", chat(self.fake.url + "/gone?token=s3cret"))
        error = json.loads(body)["error"]
        self.assertEqual((status, error["code"], error["type"]), (400, "image_fetch_failed", "invalid_request_error"))
        self.assertIn("could not fetch the image at %s/gone?...: no image could be had from there" % self.fake.url,
                      error["message"])
        self.assertNotIn("s3cret", body.decode())
        self.assertTrue(any("HTTP 404" in line for line in LOGS.lines))  # the detail is for the log only
        status, _, body = self.request("POST", "/v1/messages", {"model": "claude-sonnet-4.5", "max_tokens": 5, "messages": [
            {"role": "user", "content": [{"type": "image", "source": {"type": "url", "url": self.fake.url + "/page"}}]}]})
        self.assertEqual((status, json.loads(body)["type"], json.loads(body)["error"]["type"]),
                         (400, "error", "invalid_request_error"))
        self.assertEqual(self.fake.requests_to("/chat/completions") + self.fake.requests_to("/v1/messages"), [])

    def test_what_one_request_can_make_coproxy_fetch_is_bounded(self):
        for name, value in (("MAX_IMAGES_PER_REQUEST", 3), ("MAX_IMAGE_BYTES_PER_REQUEST", 2 * len(PNG) + 10)):
            self.addCleanup(setattr, coproxy, name, getattr(coproxy, name))
            setattr(coproxy, name, value)
        many = [{"type": "image_url", "image_url": {"url": self.fake.url + "/img.png?n=%d" % i}} for i in range(4)]
        status, _, body = self.request("POST", "/v1/chat/completions", chat_body(many))
        self.assertEqual((status, json.loads(body)["error"]["code"]), (400, "too_many_images"))
        self.assertEqual(self.fake.requests_to("/img.png"), [])
        status, _, body = self.request("POST", "/v1/chat/completions", chat_body(many[:3]))
        self.assertEqual((status, json.loads(body)["error"]["code"]), (400, "image_fetch_failed"))  # over the bytes
        again = [many[0]] * 3  # one fetch, but three copies would go to Copilot
        status, _, body = self.request("POST", "/v1/chat/completions", chat_body(again))
        error = json.loads(body)["error"]
        self.assertEqual((status, error["code"]), (400, "images_too_large"), body)
        self.assertIn("counting every use of each URL", error["message"])
        self.assertEqual(self.fake.requests_to("/chat/completions"), [])

    def test_cached_images_do_not_count_toward_the_limit(self):
        self.addCleanup(setattr, coproxy, "MAX_IMAGES_PER_REQUEST", coproxy.MAX_IMAGES_PER_REQUEST)
        coproxy.MAX_IMAGES_PER_REQUEST = 2
        image = lambda n: {"type": "image_url", "image_url": {"url": self.fake.url + "/img.png?n=%d" % n}}
        self.assertEqual(self.request("POST", "/v1/chat/completions", chat_body([image(1), image(2)]))[0], 200)
        status, _, body = self.request("POST", "/v1/chat/completions", chat_body([image(1), image(2), image(3)]))
        self.assertEqual(status, 200, body)  # an agent's next turn: two of its three images are cached
        self.assertEqual(len(self.fake.requests_to("/img.png")), 3)

    def test_image_fetches_hold_the_requests_concurrency_slot(self):
        proxy = self.start_proxy(max_concurrency=1, queue_timeout=0.05)  # waited out: short
        gate = threading.Event()
        self.addCleanup(gate.set)
        self.fake.routes[("GET", "/slow.png")] = lambda h, b: (gate.wait(5),
                                                               h.send_body(200, PNG, "image/png"))
        client = RawClient(proxy.port)
        self.addCleanup(client.close)
        client.send(post("/v1/chat/completions", json.dumps(chat_body([
            {"type": "image_url", "image_url": {"url": self.fake.url + "/slow.png"}}])).encode()))
        self.assertTrue(wait_for(lambda: self.fake.requests_to("/slow.png")))
        status, _, body = self.request("POST", "/v1/chat/completions", chat_body(), port=proxy.port)
        # the fetch holds the slot
        self.assertEqual((status, json.loads(body)["error"]["code"]), (503, "overloaded"))
        gate.set()
        self.assertEqual(client.response()[0], 200)

    def test_an_image_server_that_drips_its_answer_is_cut_off_at_the_deadline(self):
        self.addCleanup(setattr, coproxy, "IMAGE_FETCH_SECONDS", coproxy.IMAGE_FETCH_SECONDS)
        coproxy.IMAGE_FETCH_SECONDS = 0.2  # waited out, so short; a byte every 0.02 s meanwhile
        released = threading.Event()
        self.addCleanup(released.set)

        def drip(handler, body):  # every read gets a byte at once; the head never ends
            handler.wfile.write(b"HTTP/1.1 200 OK\r\nX-Drip: ")
            while not released.wait(0.02):
                try:
                    handler.wfile.write(b"a")
                    handler.wfile.flush()
                except OSError:
                    return
        self.fake.routes[("GET", "/drip.png")] = drip
        started = time.monotonic()
        status, _, body = self.request("POST", "/v1/chat/completions", chat_body([
            {"type": "image_url", "image_url": {"url": self.fake.url + "/drip.png"}}]))
        self.assertEqual((status, json.loads(body)["error"]["code"]), (400, "image_fetch_failed"))
        self.assertLess(time.monotonic() - started, 3.0)

    def test_fetches_run_inside_the_request_slot_four_at_a_time_and_stop_with_the_client(self):
        gate, running, most = threading.Event(), [0], [0]
        self.addCleanup(gate.set)
        lock = threading.Lock()

        def slow(handler, body):
            with lock:
                running[0] += 1
                most[0] = max(most[0], running[0])
            if handler.wait_until_client_closes(5 if not gate.is_set() else 0):
                self.fake.client_closed.set()
            with lock:
                running[0] -= 1
        self.fake.routes[("GET", "/slow.png")] = slow
        images = [{"type": "image_url", "image_url": {"url": self.fake.url + "/slow.png?%d" % i}} for i in range(6)]
        clients = [self.raw(), self.raw()]  # three images each: the limit is the server's, not a request's
        for client, mine in zip(clients, (images[:3], images[3:])):
            client.send(post("/v1/chat/completions", json.dumps(chat_body(mine)).encode()))
        self.assertTrue(wait_for(lambda: running[0] == 4))
        self.assertEqual(most[0], 4)  # the server-wide limit
        for client in clients:
            client.close()  # the clients go: their fetches are cut off
        self.assertTrue(self.fake.client_closed.wait(5))
        self.assertTrue(wait_for(lambda: running[0] == 0))
        self.assertEqual(self.fake.requests_to("/chat/completions"), [])

    def test_what_the_catalogue_says_a_model_cannot_take_is_refused_with_the_reason(self):
        catalog = copy.deepcopy(CATALOG)
        catalog[0]["capabilities"]["limits"]["vision"] = {
            "max_prompt_images": 5, "max_prompt_image_size": 1000, "supported_media_types": ["image/jpeg", "image/png"]}
        self.fake.routes[("GET", "/models")] = lambda h, b: h.send_json(200, {"object": "list", "data": catalog})
        self.fake.routes[("GET", "/anim.gif")] = lambda h, b: h.send_body(200, b"GIF89a", "image/gif")
        proxy = self.start_proxy()
        for path, code, words in (("/img.png", "image_too_large", "is 1.0 KiB; gpt-4.1 accepts at most 1000 bytes"),
                                  ("/anim.gif", "image_not_supported", "is image/gif; gpt-4.1 accepts image/jpeg, image/png")):
            status, _, body = self.request("POST", "/v1/chat/completions", {"model": "gpt-4.1", "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": self.fake.url + path}}]}]},
                port=proxy.port)
            error = json.loads(body)["error"]
            self.assertEqual((status, error["code"]), (400, code))
            self.assertIn("the image at %s%s %s" % (self.fake.url, path, words), error["message"])
        self.assertEqual(self.fake.requests_to("/chat/completions"), [])

    def test_only_content_is_searched_never_tool_inputs_or_schemas(self):
        image = lambda url: {"type": "image", "source": {"type": "url", "url": url}}
        payload = {"tools": [{"name": "t", "input_schema": {"properties": {"x": image("https://schema/")}}}],
                   "messages": [{"role": "assistant", "content": [{"type": "tool_use", "id": "1", "name": "t",
                                                                    "input": {"x": image("https://model-said/")}}]},
                                {"role": "user", "content": [image("https://a/1.png"), image("ftp://b/2.png"),
                                                             {"type": "tool_result", "content": [image("https://c/3")]}]}],
                   "input": [{"type": "message", "content": [{"type": "input_image", "image_url": "http://d/4"},
                                                             {"type": "input_image", "image_url": "data:,x"}]}]}
        self.assertEqual(sorted(url for _, _, url in coproxy.remote_images(payload)),
                         ["http://d/4", "https://a/1.png", "https://c/3"])

    def test_no_image_fetch_sends_urls_on_untouched(self):
        proxy = self.start_proxy(no_image_fetch=True)
        url = self.fake.url + "/img.png"
        status, _, answer = self.request("POST", "/v1/chat/completions", {"model": "gpt-4.1", "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]}, port=proxy.port)
        self.assertEqual(status, 200, answer)
        self.assertEqual(self.sent("/chat/completions")[0]["messages"][0]["content"][0]["image_url"]["url"], url)
        self.assertEqual(self.fake.requests_to("/img.png"), [])


class TestOpenAISurface(ProxyTestCase):
    def test_embeddings_float_base64_and_errors(self):
        status, _, body = self.request("POST", "/v1/embeddings", {"model": "text-embedding-3-small", "input": "hello"})
        data = json.loads(body)
        self.assertEqual((status, data["object"], data["data"][0]["embedding"]), (200, "list", [0.5, -1.25, 5.0]))
        sent = json.loads(self.fake.requests_to("/embeddings")[-1][3])
        self.assertEqual(sent, {"model": "text-embedding-3-small", "input": ["hello"]})
        status, _, body = self.request("POST", "/embeddings", {"model": "text-embedding-3-small", "input": ["a", "bb"],
                                                               "encoding_format": "base64", "dimensions": 2})
        data = json.loads(body)
        self.assertEqual(__import__("struct").unpack("<2f", __import__("base64").b64decode(data["data"][1]["embedding"])),
                         (0.5, -1.25))
        self.assertEqual(json.loads(self.fake.requests_to("/embeddings")[-1][3])["dimensions"], 2)
        status, _, body = self.request("POST", "/v1/embeddings", {"model": "text-embedding-3-small", "input": [[1, 2]]})
        self.assertEqual((status, json.loads(body)["error"]["code"]), (400, "token_arrays_not_supported"))

    def test_a_doubled_v1_is_answered_in_the_callers_dialect_with_the_fix(self):
        status, _, body = self.request("POST", "/v1/v1/messages", json.dumps({"model": "claude-sonnet-4.5",
                                       "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}).encode(),
                                       {"anthropic-version": "2023-06-01", "Content-Type": "application/json"})
        data = json.loads(body)
        self.assertEqual((status, data["type"], data["error"]["type"]), (404, "error", "not_found_error"))
        self.assertEqual(data["error"]["message"], "POST /v1/v1/messages has /v1 twice: the base URL ends in /v1 and "
                         "the client adds another; drop the /v1 from the end of the base URL: ANTHROPIC_BASE_URL="
                         "http://127.0.0.1:%d (Anthropic clients add /v1 themselves)" % self.proxy.port)
        status, _, body = self.request("POST", "/v1/v1/chat/completions", chat_body())
        data = json.loads(body)
        self.assertEqual((status, data["error"]["code"]), (404, "unknown_url"))
        self.assertIn("has /v1 twice", data["error"]["message"])
        self.assertIn("http://127.0.0.1:%d/v1 as the base URL (OPENAI_BASE_URL), once" % self.proxy.port,
                      data["error"]["message"])
        self.assertEqual(self.fake.requests_to("/chat/completions"), [])
        status, _, body = self.request("GET", "/v1/nowhere", headers={"anthropic-version": "2023-06-01"})
        self.assertEqual((status, json.loads(body)["type"]), (404, "error"))  # any unknown path, in its dialect
        status, _, _ = self.request("POST", "/v1/v1/messages", b"{}", {"Host": "evil.example"})
        self.assertEqual(status, 403)  # the checks come first, as on every route

    def test_responses_passthrough_stream_and_get(self):
        status, _, body = self.request("POST", "/v1/responses", {"model": "gpt-5.1-codex", "input": "hi"})
        self.assertEqual((status, json.loads(body)["output"][1]["content"][0]["text"]), (200, "codex says hi"))
        gate = threading.Event()
        self.fake.stream(sse({"type": "response.created", "response": {"id": "r"}}), gate,
                         sse({"type": "response.output_text.delta", "delta": "yo"}),
                         sse({"type": "response.completed", "response": {"id": "r", "status": "completed"}}))
        client = self.raw()
        client.send(post("/v1/responses", json.dumps({"model": "gpt-5.1-codex", "stream": True, "input": [
            {"type": "message", "role": "user", "content": [{"type": "input_image", "image_url": "data:,"}]},
            {"type": "function_call_output", "call_id": "c", "output": "ok"}]}).encode()))
        client.response(head_only=True)
        self.assertEqual(sse_data(read_chunk(client.file))[0]["type"], "response.created")
        gate.set()
        rest = read_rest(client.file)
        self.assertEqual([d["type"] for d in sse_data(rest)], ["response.output_text.delta", "response.completed"])
        headers = self.fake.requests_to("/responses")[-1][2]
        self.assertEqual((headers["x-initiator"], headers["copilot-vision-request"]), ("agent", "true"))
        self.fake.chat_script = None
        status, _, body = self.request("GET", "/v1/responses/resp_1")
        self.assertEqual((status, json.loads(body)["id"]), (200, "resp_1"))
        self.assertEqual(self.request("GET", "/v1/responses/resp_404")[0], 404)

    def test_api_surface_mounts_routes(self):
        proxy = self.start_proxy(api_surface=coproxy._api_surface("chat"))
        status, _, body = self.request("POST", "/v1/responses", {"model": "gpt-4.1", "input": "x"}, port=proxy.port)
        error = json.loads(body)["error"]
        self.assertEqual((status, error["code"]), (404, "api_surface_disabled"))
        self.assertIn("--api-surface", error["message"])
        self.assertEqual(self.request("POST", "/v1/embeddings", {"model": "x", "input": "x"}, port=proxy.port)[0], 404)
        status, _, body = self.request("POST", "/v1/messages", {"model": "x"}, port=proxy.port)
        self.assertEqual((status, json.loads(body)["type"]), (404, "error"))
        self.assertEqual(self.request("POST", "/v1/chat/completions", chat_body(), port=proxy.port)[0], 200)

    def test_model_names_resolve_and_unknown_models_fail_early(self):
        status, _, body = self.request("POST", "/v1/chat/completions", chat_body(model="claude-sonnet-4-5-20250929"))
        self.assertEqual(status, 200)
        self.assertEqual(json.loads(self.fake.requests_to("/chat/completions")[-1][3])["model"], "claude-sonnet-4.5")
        calls = len(self.fake.requests_to("/chat/completions"))
        status, _, body = self.request("POST", "/v1/chat/completions", chat_body(model="gpt-4.2"))
        error = json.loads(body)["error"]
        self.assertEqual((status, error["code"]), (404, "model_not_found"))
        self.assertIn("gpt-4.1", error["message"])
        self.assertEqual(len(self.fake.requests_to("/chat/completions")), calls)

    def test_max_tokens_refusal_is_learnt_once(self):
        def picky(handler, payload):
            if "max_tokens" in payload:
                handler.send_json(400, {"error": {"message": "Unsupported parameter: 'max_tokens' is not supported "
                                                             "with this model. Use 'max_completion_tokens' instead.",
                                                  "code": "invalid_request_body"}})
            else:
                self.fake.chat(handler, payload)
        self.fake.routes[("POST", "/chat/completions")] = picky
        for _ in range(2):
            status, _, body = self.request("POST", "/v1/chat/completions", chat_body(model="o3-mini", max_tokens=50))
            self.assertEqual(status, 200)
        sent = [json.loads(r[3]) for r in self.fake.requests_to("/chat/completions")]
        self.assertEqual(["max_tokens" in s for s in sent], [True, False, False])
        self.assertEqual(sent[-1]["max_completion_tokens"], 50)

    def test_capability_checks_before_upstream(self):
        image = [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}]
        status, _, body = self.request("POST", "/v1/chat/completions", chat_body(image, model="o3-mini"))
        error = json.loads(body)["error"]
        self.assertEqual((status, error["code"]), (400, "model_without_vision"))
        self.assertIn("o3-mini", error["message"])
        self.assertEqual(self.fake.requests_to("/chat/completions"), [])
        status, headers, _ = self.request("POST", "/v1/chat/completions", chat_body(model="o3-mini", reasoning_effort="max"))
        self.assertEqual((status, headers["X-Coproxy-Adjusted"]), (200, "reasoning_effort=max->high"))
        self.assertEqual(json.loads(self.fake.requests_to("/chat/completions")[-1][3])["reasoning_effort"], "high")
        self.assertTrue(wait_for(lambda: any("adjusted=reasoning_effort=max->high" in l for l in LOGS.lines)))

    def test_chat_for_a_responses_only_model(self):
        status, _, body = self.request("POST", "/v1/chat/completions", chat_body(model="gpt-5.1-codex", max_tokens=9))
        answer = json.loads(body)
        self.assertEqual((status, answer["choices"][0]["message"]["content"]), (200, "codex says hi"))
        self.assertEqual(answer["usage"]["prompt_tokens_details"], {"cached_tokens": 8})
        sent = json.loads(self.fake.requests_to("/responses")[-1][3])
        self.assertEqual((sent["max_output_tokens"], sent["input"][0]["role"]), (9, "user"))
        self.assertEqual(self.fake.requests_to("/chat/completions"), [])
        self.fake.stream(sse({"type": "response.output_text.delta", "delta": "str"}),
                         sse({"type": "response.output_text.delta", "delta": "eam"}),
                         sse({"type": "response.completed", "response": {"status": "completed"}}))
        status, _, body = self.request("POST", "/v1/chat/completions", chat_body(model="gpt-5.1-codex", stream=True))
        data = sse_data(body)
        self.assertEqual("".join(c["choices"][0]["delta"].get("content") or "" for c in data[:-1]), "stream")
        self.assertEqual((data[-2]["choices"][0]["finish_reason"], data[-1]), ("stop", "[DONE]"))

    def test_usage_route_counters_and_premium_log(self):
        self.request("POST", "/v1/chat/completions", chat_body(model="claude-sonnet-4.5"))
        self.request("POST", "/v1/chat/completions", chat_body(model="claude-sonnet-4.5", messages=[
            {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, {"role": "tool", "content": "r",
                                                                                      "tool_call_id": "t"}]))
        # the access line is written just after the answer went out
        self.assertTrue(wait_for(lambda: any("initiator=user" in line and "premium=1" in line for line in LOGS.lines)),
                        LOGS.lines)
        self.assertTrue(wait_for(lambda: any("initiator=agent" in line and "premium=0" in line for line in LOGS.lines)),
                        LOGS.lines)
        status, _, body = self.request("GET", "/usage")
        data = json.loads(body)
        self.assertEqual(status, 200)
        self.assertEqual(data["copilot"]["premium_requests"]["used"], 165)
        self.assertEqual(data["copilot"]["plan"], "individual")
        self.assertEqual(data["since_start"]["by_initiator"], {"user": 1, "agent": 1})
        self.assertEqual(data["since_start"]["models"]["claude-sonnet-4.5"]["requests"], 2)
        self.assertEqual(data["since_start"]["premium_requests"], 1)
        proxy = self.start_proxy(api_key="k")
        self.assertEqual(self.request("GET", "/usage", port=proxy.port)[0], 401)

    def test_usage_survives_a_reset_time_past_year_9999(self):
        user = copy.deepcopy(REQUEST_BILLED_USER)
        del user["quota_reset_date_utc"]
        user["quota_snapshots"]["premium_interactions"]["quota_reset_at"] = 1e300
        self.fake.user = user
        for _ in range(2):  # the answer is cached: GitHub is asked once
            status, _, body = self.request("GET", "/usage")
            self.assertEqual(status, 200, body[:300])
            copilot = json.loads(body)["copilot"]
            self.assertEqual((copilot["reset_date"], copilot["premium_requests"]["used"]), (None, 165))
        self.assertEqual(len(self.fake.requests_to("/copilot_internal/user")), 1)

    def test_unknown_urls_list_the_routes_from_the_table(self):
        status, _, body = self.request("GET", "/v2/nothing")
        message = json.loads(body)["error"]["message"]
        for route in ("/v1/chat/completions", "/v1/responses", "/v1/responses/compact", "/v1/embeddings", "/v1/messages",
                      "/v1/messages/count_tokens", "/v1/models", "/v1/models/{id}", "/v1/usage", "/v1/metrics", "/healthz"):
            self.assertIn(route, message)
        proxy = self.start_proxy(api_surface=coproxy._api_surface("chat"))
        message = json.loads(self.request("GET", "/v2/nothing", port=proxy.port)[2])["error"]["message"]
        self.assertNotIn("/v1/messages", message)

    def test_anthropic_clients_get_anthropics_model_list(self):
        started = time.monotonic()
        status, headers, body = self.request("GET", "/v1/models?limit=1000", headers=ANTHROPIC_HEADERS)
        listing = json.loads(body)
        chat_ids = [anthropic_spelling(i) for i in CATALOG_IDS if i != "text-embedding-3-small"] + ["auto"]
        self.assertEqual((status, [m["id"] for m in listing["data"]]), (200, chat_ids))
        self.assertEqual((listing["first_id"], listing["last_id"], listing["has_more"]),
                         ("gpt-4.1", "auto", False))
        sonnet = listing["data"][1]
        self.assertEqual((sonnet["type"], sonnet["display_name"], sonnet["max_input_tokens"], sonnet["max_tokens"],
                          sonnet["line"], sonnet["created_at"]),
                         ("model", "Claude Sonnet 4.5", 200000, 32000, "sonnet", "1970-01-01T00:00:00Z"))
        self.assertEqual(sonnet["capabilities"]["effort"]["high"], {"supported": True})
        self.assertEqual(sonnet["capabilities"]["image_input"], {"supported": True})
        self.assertTrue(listing["data"][2]["capabilities"]["thinking"]["types"]["enabled"]["supported"])
        self.assertNotIn("object", sonnet)  # Anthropic's shape, not OpenAI's with extras
        # answered from the cached catalogue: no second upstream call, and well under 3 s
        self.request("GET", "/v1/models", headers=ANTHROPIC_HEADERS)
        self.assertEqual(len(self.fake.requests_to("/models")), 1)
        self.assertLess(time.monotonic() - started, 1.0)

    def test_anthropic_model_list_pages_like_anthropics(self):
        def page(query):
            status, _, body = self.request("GET", "/v1/models" + query, headers=ANTHROPIC_HEADERS)
            return status, json.loads(body)
        chat_ids = [anthropic_spelling(i) for i in CATALOG_IDS if i != "text-embedding-3-small"] + ["auto"]
        _, first = page("?limit=3")
        self.assertEqual(([m["id"] for m in first["data"]], first["has_more"], first["last_id"]),
                         (chat_ids[:3], True, chat_ids[2]))
        _, second = page("?limit=3&after_id=" + chat_ids[2])
        self.assertEqual([m["id"] for m in second["data"]], chat_ids[3:6])
        _, last = page("?limit=3&after_id=" + chat_ids[5])
        self.assertEqual(([m["id"] for m in last["data"]], last["has_more"]), (chat_ids[6:], False))
        _, back = page("?limit=2&before_id=" + chat_ids[3])
        self.assertEqual(([m["id"] for m in back["data"]], back["has_more"], back["first_id"]),
                         (chat_ids[1:3], True, chat_ids[1]))
        _, default = page("")
        self.assertEqual(len(default["data"]), len(chat_ids))  # fewer than the default 20
        for query, param in (("?limit=0", "limit"), ("?limit=1001", "limit"), ("?limit=x", "limit"),
                             ("?limit=%C2%B2", "limit"), ("?limit=" + "9" * 5000, "limit"),
                             ("?after_id=gpt-9", "after_id"), ("?after_id=a&before_id=b", "before_id")):
            status, error = page(query)
            self.assertEqual((status, error["type"], error["error"]["type"]), (400, "error", "invalid_request_error"),
                             query)
            self.assertIn(param, error["error"]["message"])
        status, _, body = self.request("GET", "/v1/models/claude-sonnet-4-5-20250929", headers=ANTHROPIC_HEADERS)
        self.assertEqual((status, json.loads(body)["id"], json.loads(body)["type"]), (200, "claude-sonnet-4-5", "model"))
        status, _, body = self.request("GET", "/v1/models/gpt-9", headers=ANTHROPIC_HEADERS)
        self.assertEqual((status, json.loads(body)["error"]["type"]), (404, "not_found_error"))
        proxy = self.start_proxy(api_key="k")
        status, _, body = self.request("GET", "/v1/models", headers=ANTHROPIC_HEADERS, port=proxy.port)
        self.assertEqual((status, json.loads(body)["error"]["type"]), (401, "authentication_error"))

class TestAnthropicEndToEnd(ProxyTestCase):
    def messages(self, body, headers=None, port=None, path="/v1/messages"):
        headers = dict({"anthropic-version": "2023-06-01"}, **(headers or {}))
        status, response_headers, data = self.request("POST", path, body, headers, port=port)
        return status, response_headers, data

    def body(self, model, **extra):
        body = {"model": model, "max_tokens": 100, "messages": [{"role": "user", "content": "hello"}]}
        body.update(extra)
        return body

    def test_translated_path_non_stream(self):
        status, _, data = self.messages(self.body("claude-haiku-4-5-20251001", system="be brief"))
        self.assertEqual(status, 200)
        answer = json.loads(data)
        self.assertEqual(answer["content"], [{"type": "text", "text": "echo: hello"}])
        self.assertEqual((answer["type"], answer["stop_reason"]), ("message", "end_turn"))
        self.assertEqual(answer["usage"], {"input_tokens": 3, "output_tokens": 2})
        method, path, headers, raw = self.fake.requests_to("/chat/completions")[-1]
        sent = json.loads(raw)
        self.assertEqual(sent["model"], "claude-haiku-4.5")
        self.assertEqual(sent["messages"][0], {"role": "system", "content": "be brief"})
        self.assertEqual(headers["x-initiator"], "user")

    def test_translated_path_stream_event_order(self):
        gate = threading.Event()
        self.fake.stream(chunk("Hi"), gate, chunk(" there"), chunk(None, "stop"), USAGE_CHUNK, DONE)
        client = self.raw()
        client.send(post("/v1/messages", json.dumps(self.body("claude-haiku-4.5", stream=True)).encode()))
        status, headers, _ = client.response(head_only=True)
        self.assertEqual(status, 200)
        first = read_chunk(client.file)
        self.assertEqual([n for n, _ in sse_events(first)], ["message_start", "content_block_start", "content_block_delta"])
        gate.set()
        body = first + read_rest(client.file)
        events = sse_events(body)
        self.assertEqual([n for n, _ in events], ["message_start", "content_block_start", "content_block_delta",
                                                  "content_block_delta", "content_block_stop", "message_delta",
                                                  "message_stop"])
        self.assertEqual(events[-2][1]["usage"], {"input_tokens": 5, "output_tokens": 2})
        self.assertEqual(events[-2][1]["delta"]["stop_reason"], "end_turn")

    def test_translated_tool_round_trip_is_agent_initiated(self):
        self.fake.stream(chunk(None, tool_calls=[{"index": 0, "id": "toolu_7", "type": "function",
                                                  "function": {"name": "ls", "arguments": "{}"}}]),
                         chunk(None, "tool_calls"), DONE)
        tools = [{"name": "ls", "input_schema": {"type": "object"}}]
        status, _, body = self.messages(self.body("claude-haiku-4.5", stream=True, tools=tools))
        events = sse_events(body)
        self.assertEqual(events[1][1]["content_block"]["type"], "tool_use")
        self.assertEqual(events[-2][1]["delta"]["stop_reason"], "tool_use")
        self.fake.chat_script = None
        follow_up = self.body("claude-haiku-4.5", tools=tools, messages=[
            {"role": "user", "content": "list files"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_7", "name": "ls", "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_7", "content": "a.txt"}]}])
        status, _, body = self.messages(follow_up)
        self.assertEqual(status, 200)
        method, path, headers, raw = self.fake.requests_to("/chat/completions")[-1]
        self.assertEqual(headers["x-initiator"], "agent")
        self.assertEqual(json.loads(raw)["messages"][-1], {"role": "tool", "tool_call_id": "toolu_7", "content": "a.txt"})

    def test_structured_output_reaches_translated_models(self):
        # Claude Code 2.1.197 asks for its session title this way
        schema = {"type": "object", "properties": {"title": {"type": "string"}},
                  "required": ["title"], "additionalProperties": False}
        config = {"effort": "high", "format": {"type": "json_schema", "schema": schema}}
        status, _, body = self.messages(self.body("claude-haiku-4.5", output_config=config))
        self.assertEqual(status, 200, body)
        sent = json.loads(self.fake.requests_to("/chat/completions")[-1][3])
        wanted = {"type": "json_schema", "json_schema": {"name": "response", "schema": schema}}
        self.assertEqual(sent["response_format"], wanted)
        status, _, body = self.messages(self.body("gpt-5.1-codex", output_config=config))
        self.assertEqual(status, 200, body)
        sent = json.loads(self.fake.requests_to("/responses")[-1][3])
        text_format = sent["text"]["format"]
        self.assertEqual((text_format["type"], text_format["schema"]), ("json_schema", schema))
        status, _, body = self.messages(self.body("claude-haiku-4.5", output_config={"format": {
            "type": "json_schema", "schema": "{}"}}))
        error = json.loads(body)["error"]
        self.assertEqual((status, error["type"]), (400, "invalid_request_error"))
        self.assertIn("output_config.format.schema", error["message"])

    def test_claude_codes_side_work_is_the_agents(self):
        # Claude Code 2.1.197 marks its agent loop with the claude-code beta and asks for a session
        # title without it; a client that is not Claude Code sends neither header
        session = {"X-Claude-Code-Session-Id": "34bf9a21-0af2-4663-af4e-6b7510a1b3ca"}
        loop_betas = "claude-code-20250219,interleaved-thinking-2025-05-14"
        cases = ((dict(session, **{"anthropic-beta": loop_betas}), "user"),
                 (dict(session, **{"anthropic-beta": "interleaved-thinking-2025-05-14"}), "agent"),
                 (session, "agent"), ({"anthropic-beta": "interleaved-thinking-2025-05-14"}, "user"),
                 ({}, "user"))
        for headers, initiator in cases:
            for model in ("claude-haiku-4.5", "claude-sonnet-4.5"):  # translated, native
                status, _, body = self.messages(self.body(model), headers)
                self.assertEqual(status, 200, body)
                path = "/v1/messages" if model == "claude-sonnet-4.5" else "/chat/completions"
                sent = self.fake.requests_to(path)[-1][2]
                self.assertEqual(sent["x-initiator"], initiator, (model, headers))

    def test_a_prompt_followed_by_claude_codes_system_attachment_is_the_users_turn(self):
        # Claude Code 2.1.197 with Haiku: the prompt, then a system-role message listing agent types
        attachment = {"role": "system", "content": "Available agent types for the Agent tool: ..."}
        prompt = {"role": "user", "content": [{"type": "text", "text": "say hi"}]}
        tool_turn = [{"role": "user", "content": "list files"},
                     {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "ls",
                                                        "input": {}}]},
                     {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1",
                                                   "content": "a.txt"}]}]
        for messages, initiator in (([prompt, attachment], "user"), (tool_turn + [attachment], "agent"),
                                    ([attachment], "agent")):
            for model in ("claude-haiku-4.5", "claude-sonnet-4.5"):  # translated, native
                status, _, body = self.messages(self.body(model, messages=messages))
                self.assertEqual(status, 200, body)
                path = "/v1/messages" if model == "claude-sonnet-4.5" else "/chat/completions"
                headers = self.fake.requests_to(path)[-1][2]
                self.assertEqual(headers["x-initiator"], initiator, (model, messages))

    def test_native_path_non_stream_with_headers(self):
        status, _, data = self.messages(self.body("claude-opus-4-6"), headers={
            "anthropic-beta": "interleaved-thinking-2025-05-14,some-unknown-beta-2030-01-01",
            "x-api-key": "ignored-without-a-key"})
        self.assertEqual(status, 200)
        self.assertEqual(json.loads(data)["content"][0]["text"], "native: 1 messages")
        method, path, headers, raw = self.fake.requests_to("/v1/messages")[-1]
        self.assertEqual(json.loads(raw)["model"], "claude-opus-4.6")
        self.assertEqual(headers["anthropic-version"], "2023-06-01")
        self.assertEqual(headers["anthropic-beta"], "interleaved-thinking-2025-05-14")
        self.assertEqual(headers["openai-intent"], "messages-proxy")
        self.assertEqual(headers["copilot-integration-id"], "vscode-chat")
        for bad in ("2023-06\t01", "2023\x0b06", "x" * 101):  # a 400 of ours, not a 502 blamed on Copilot
            status, _, data = self.messages(self.body("claude-opus-4-6"), headers={"anthropic-version": bad})
            self.assertEqual((status, json.loads(data)["error"]["type"]), (400, "invalid_request_error"), bad)
        self.assertEqual(len(self.fake.requests_to("/v1/messages")), 1)
        self.assertTrue(self.request("GET", "/healthz")[2].find(b'"ok":true') > 0)

    def test_native_path_stream_passes_events_and_pings(self):
        proxy = self.start_proxy(ping_seconds=0.05)
        gate = threading.Event()
        start = anthropic_event("message_start", {"type": "message_start", "message": {"id": "msg_1", "usage": {
            "input_tokens": 12, "output_tokens": 1}}})
        self.fake.stream(start, gate,
                         anthropic_event("content_block_start", {"type": "content_block_start", "index": 0,
                                                                 "content_block": {"type": "text", "text": ""}}),
                         anthropic_event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                                 "delta": {"type": "text_delta", "text": "yo"}}),
                         anthropic_event("content_block_stop", {"type": "content_block_stop", "index": 0}),
                         anthropic_event("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                                                           "usage": {"output_tokens": 2}}),
                         anthropic_event("message_stop", {"type": "message_stop"}))
        client = RawClient(proxy.port)
        self.addCleanup(client.close)
        client.send(post("/v1/messages", json.dumps(self.body("claude-opus-4.6", stream=True)).encode()))
        client.response(head_only=True)
        ping = b'event: ping\ndata: {"type":"ping"}\n\n'
        first = read_chunk(client.file)
        while first == ping:  # a slow machine may ping before the upstream's first event arrives
            first = read_chunk(client.file)
        self.assertEqual(sse_events(first)[0][0], "message_start")
        self.assertEqual(read_chunk(client.file), ping)  # the upstream is silent: pings keep it alive
        gate.set()
        body = read_rest(client.file)
        names = [n for n, _ in sse_events(body) if n != "ping"]
        self.assertEqual(names, ["content_block_start", "content_block_delta", "content_block_stop", "message_delta",
                                 "message_stop"])

    def test_native_stream_cut_gives_error_event(self):
        self.fake.stream(anthropic_event("message_start", {"type": "message_start", "message": {}}), "cut")
        status, _, body = self.messages(self.body("claude-opus-4.6", stream=True))
        events = sse_events(body)
        self.assertEqual(events[-1][0], "error")
        self.assertEqual(events[-1][1]["error"]["type"], "api_error")

    def test_errors_in_anthropic_shape(self):
        self.fake.routes[("POST", "/chat/completions")] = lambda h, b: h.send_json(
            429, {"error": {"message": "rate limit exceeded", "code": "rate_limited"}}, [("Retry-After", "9")])
        status, headers, data = self.messages(self.body("claude-haiku-4.5"))
        self.assertEqual((status, headers["Retry-After"]), (429, "9"))
        self.assertEqual(json.loads(data), {"type": "error", "error": {"type": "rate_limit_error",
                                                                       "message": "rate limit exceeded"}})
        self.fake.routes[("POST", "/chat/completions")] = self.fake.chat
        status, _, data = self.messages({"model": "claude-haiku-4.5", "messages": [{"role": "user", "content": "x"}]})
        self.assertEqual((status, json.loads(data)["error"]["type"]), (400, "invalid_request_error"))
        self.assertIn("max_tokens", json.loads(data)["error"]["message"])
        status, _, data = self.messages(b"{oops")
        self.assertEqual((status, json.loads(data)["type"]), (400, "error"))
        proxy = self.start_proxy(api_key="k2", max_body_mb=1.0 / 1024)
        status, _, data = self.messages(self.body("claude-haiku-4.5"), port=proxy.port)
        self.assertEqual((status, json.loads(data)["error"]["type"]), (401, "authentication_error"))
        status, _, data = self.messages(self.body("claude-haiku-4.5", system="x" * 4000), headers={"x-api-key": "k2"},
                                        port=proxy.port)
        self.assertEqual((status, json.loads(data)["error"]["type"]), (413, "request_too_large"))
        self.assertEqual(self.messages(self.body("claude-haiku-4.5"), headers={"Authorization": "Bearer k2"},
                                       port=proxy.port)[0], 200)

    def test_responses_only_model_through_messages(self):
        status, _, data = self.messages(self.body("gpt-5.1-codex", system="terse"))
        answer = json.loads(data)
        self.assertEqual((status, answer["content"]), (200, [{"type": "text", "text": "codex says hi"}]))
        self.assertEqual(answer["usage"], {"input_tokens": 3, "output_tokens": 4, "cache_read_input_tokens": 8})
        sent = json.loads(self.fake.requests_to("/responses")[-1][3])
        self.assertEqual([i["role"] for i in sent["input"]], ["developer", "user"])
        self.assertEqual(sent["max_output_tokens"], 100)
        self.assertEqual(self.fake.requests_to("/chat/completions"), [])
        self.fake.stream(sse({"type": "response.output_text.delta", "delta": "Hi"}),
                         sse({"type": "response.output_item.added", "output_index": 1, "item": {
                             "type": "function_call", "call_id": "call_9", "name": "ls"}}),
                         sse({"type": "response.function_call_arguments.delta", "output_index": 1, "delta": "{}"}),
                         sse({"type": "response.completed", "response": {"status": "completed", "usage": {
                             "input_tokens": 6, "output_tokens": 2}}}))
        status, _, body = self.messages(self.body("gpt-5.1-codex", stream=True))
        events = sse_events(body)
        self.assertEqual([n for n, _ in events], [
            "message_start", "content_block_start", "content_block_delta", "content_block_stop",
            "content_block_start", "content_block_delta", "content_block_stop", "message_delta", "message_stop"])
        self.assertEqual(events[4][1]["content_block"], {"type": "tool_use", "id": "call_9", "name": "ls", "input": {}})
        self.assertEqual(events[-2][1]["delta"]["stop_reason"], "tool_use")
        self.assertEqual(events[-2][1]["usage"], {"input_tokens": 6, "output_tokens": 2})
        self.fake.stream(sse({"type": "response.output_text.delta", "delta": "cut"}), "cut")
        status, _, body = self.messages(self.body("gpt-5.1-codex", stream=True))
        self.assertEqual(sse_events(body)[-1][0], "error")

    def test_count_tokens(self):
        body = {"model": "claude-sonnet-4-5", "messages": [{"role": "user", "content": "hello world " * 300}]}
        status, _, data = self.messages(body, path="/v1/messages/count_tokens")
        self.assertEqual(status, 200)
        self.assertGreaterEqual(json.loads(data)["input_tokens"], 600)
        self.assertEqual(len(self.fake.requests), 0)  # answered locally
        self.assertEqual(self.messages({"model": "m"}, path="/v1/messages/count_tokens")[0], 400)

    def test_a_translated_stream_that_ends_early_is_an_error_not_a_message_stop(self):
        self.fake.stream(chunk("I was cut "))  # Copilot's body ends cleanly: no finish_reason, no [DONE]
        status, _, body = self.messages(self.body("claude-haiku-4.5", stream=True))
        names = [n for n, _ in sse_events(body)]
        self.assertEqual((status, names[-1]), (200, "error"))
        self.assertNotIn("message_stop", names)

    def test_what_copilot_refuses_from_claude_code_is_taken_out_or_explained(self):
        tools = [{"name": "read", "input_schema": {"type": "object"}, "eager_input_streaming": True},
                 {"type": "advisor_20260301", "name": "advisor", "model": "claude-opus-4.7"}]
        status, _, _ = self.messages(self.body("claude-opus-4.6", tools=tools, anthropic_beta=["advisor-tool-2026-03-01"]),
                                     headers={"anthropic-beta": "advisor-tool-2026-03-01,interleaved-thinking-2025-05-14"})
        self.assertEqual(status, 200)
        method, path, headers, raw = self.fake.requests_to("/v1/messages")[-1]
        sent = json.loads(raw)
        self.assertEqual((sent["tools"], "anthropic_beta" in sent), ([{"name": "read", "input_schema": {"type": "object"}}],
                                                                     False))
        self.assertEqual(headers["anthropic-beta"], "interleaved-thinking-2025-05-14")
        self.assertTrue(any("removed from the request" in line and "eager_input_streaming" in line for line in LOGS.lines))
        status, _, body = self.messages(self.body("claude-opus-4.6", tools=[{"type": "web_search_20250305",
                                                                              "name": "web_search"}]))
        self.assertEqual((status, json.loads(body)["error"]["type"]), (400, "invalid_request_error"))
        self.assertIn("Copilot has no web search", json.loads(body)["error"]["message"])


class TestCodex(ProxyTestCase):
    """Codex on the Responses API: compressed bodies, remote compaction, cut streams."""

    def test_compressed_bodies(self):
        body = json.dumps({"model": "gpt-5.1-codex", "input": "hi"}).encode()
        for encoding, data in (("gzip", gzip.compress(body)), ("deflate", zlib.compress(body))):
            status, _, answer = self.request("POST", "/v1/responses", data, {"Content-Encoding": encoding,
                                                                             "Content-Type": "application/json"})
            self.assertEqual(status, 200, answer)
        self.assertEqual(json.loads(self.fake.requests_to("/responses")[-1][3])["input"], "hi")
        status, _, answer = self.request("POST", "/v1/responses", body, {"Content-Encoding": "br"})
        self.assertEqual((status, json.loads(answer)["error"]["code"]), (415, "unsupported_content_encoding"))
        proxy = self.start_proxy(max_body_mb=1.0 / 1024)
        status, _, answer = self.request("POST", "/v1/responses", gzip.compress(b" " * 5000 + body),
                                         {"Content-Encoding": "gzip"}, port=proxy.port)
        self.assertEqual((status, json.loads(answer)["error"]["code"]), (413, "request_too_large"))

    def test_remote_compaction(self):
        payload = {"model": "gpt-5.1-codex", "instructions": "be Codex", "tools": [], "parallel_tool_calls": False,
                   "input": [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "fix it"}]},
                             {"type": "function_call", "call_id": "c", "name": "sh", "arguments": "{}"},
                             {"type": "function_call_output", "call_id": "c", "output": "done"}]}
        status, _, body = self.request("POST", "/v1/responses/compact", payload)
        answer = json.loads(body)
        self.assertEqual((status, answer["object"]), (200, "response.compaction"))
        self.assertEqual(answer["output"], [payload["input"][0], {"id": "cmp_1", "type": "compaction",
                                                                  "encrypted_content": "ENC"}])
        method, path, headers, raw = self.fake.requests_to("/responses")[-1]
        sent = json.loads(raw)
        self.assertEqual((sent["context_management"][0]["type"], sent["store"], sent["instructions"]),
                         ("compaction", False, "be Codex"))
        self.assertEqual((headers["x-initiator"], headers["x-interaction-type"]), ("agent", "conversation-compaction"))
        proxy = self.start_proxy(api_surface=coproxy._api_surface("chat"))
        self.assertEqual(self.request("POST", "/v1/responses/compact", payload, port=proxy.port)[0], 404)

    def test_a_compaction_trigger_in_a_stream_goes_as_the_agents_compaction(self):
        self.fake.stream(sse({"type": "response.output_item.done", "item": {"type": "compaction", "encrypted_content": "E"}}),
                         sse({"type": "response.completed", "response": {"status": "completed"}}))
        status, _, body = self.request("POST", "/v1/responses", {"model": "gpt-5.1-codex", "stream": True, "input": [
            {"type": "message", "role": "user", "content": "hi"}, {"type": "compaction_trigger"}]})
        self.assertEqual([e["type"] for e in sse_data(body)], ["response.output_item.done", "response.completed"])
        headers = self.fake.requests_to("/responses")[-1][2]
        self.assertEqual((headers["x-initiator"], headers["x-interaction-type"]), ("agent", "conversation-compaction"))

    def test_a_websocket_attempt_gets_426_at_once(self):
        client = self.raw()
        started = time.monotonic()
        client.send(b"GET /v1/responses HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\n"
                    b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
                    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                    b"OpenAI-Beta: responses_websockets=2026-02-06\r\n\r\n")  # as Codex 0.171 sends it
        status, _, body = client.response()
        self.assertLess(time.monotonic() - started, 0.5)
        error = json.loads(body)["error"]
        self.assertEqual((status, error["code"]), (426, "websocket_not_supported"))
        self.assertIn("supports_websockets = false", error["message"])
        self.assertTrue(client.closed_by_server())
        self.assertEqual(self.request("GET", "/v1/responses")[0], 405)
        self.assertEqual(self.fake.requests_to("/responses"), [])
        proxy = self.start_proxy(api_key="k")  # the key is checked first, as on every route
        status, _, _ = self.request("GET", "/v1/responses", headers={"Upgrade": "websocket"},
                                    port=proxy.port)
        self.assertEqual(status, 401)

    def test_a_responses_stream_without_completed_is_an_error(self):
        for ending in ([], ["cut"]):
            self.fake.stream(sse({"type": "response.output_text.delta", "delta": "x"}), *ending)
            status, _, body = self.request("POST", "/v1/responses", {"model": "gpt-5.1-codex", "stream": True, "input": "x"})
            events = sse_events(body)
            self.assertEqual((status, events[-1][0], events[-1][1]["type"]), (200, "error", "error"))
            self.assertNotIn("response.completed", [e[1].get("type") for e in events])

def anthropic_block(index, block, *deltas):
    """The events of one Anthropic content block: its start, each delta, its stop."""
    def event(kind, **fields):
        return anthropic_event(kind, dict(fields, type=kind, index=index))
    return ([event("content_block_start", content_block=block)]
            + [event("content_block_delta", delta=delta) for delta in deltas]
            + [event("content_block_stop")])


def claude_thinking_stream(*tail, text="Done.", tool=None):
    """An Anthropic stream as Copilot's /v1/messages sends it: thinking with its signature, text,
    optionally a tool_use block (name, input JSON), then the end (``tail`` replaces it: "cut")."""
    usage = {"input_tokens": 20, "cache_read_input_tokens": 100, "output_tokens": 1}
    events = [anthropic_event("message_start", {"type": "message_start", "message": {
        "id": "msg_up", "type": "message", "role": "assistant", "content": [],
        "model": "claude-sonnet-4.5", "usage": usage}})]
    events += anthropic_block(0, {"type": "thinking", "thinking": "", "signature": ""},
                              {"type": "thinking_delta", "thinking": "Need the file."},
                              {"type": "signature_delta", "signature": "SIG-1"})
    events += anthropic_block(1, {"type": "text", "text": ""}, {"type": "text_delta", "text": text})
    if tool:
        use = {"type": "tool_use", "id": "toolu_1", "name": tool[0], "input": {}}
        events += anthropic_block(2, use,
                                  {"type": "input_json_delta", "partial_json": tool[1][:5]},
                                  {"type": "input_json_delta", "partial_json": tool[1][5:]})
    stop = {"stop_reason": "tool_use" if tool else "end_turn"}
    end = [anthropic_event("message_delta", {"type": "message_delta", "delta": stop,
                                             "usage": {"output_tokens": 30}}),
           anthropic_event("message_stop", {"type": "message_stop"})]
    return events + (list(tail) or end)


def tool_call_chunk(index, call_id=None, name=None, arguments=""):
    """A chat chunk with one tool call piece (the first piece of a call names it)."""
    call = {"index": index, "function": {"arguments": arguments}}
    if call_id:
        call.update(id=call_id, type="function")
        call["function"]["name"] = name
    return chunk(None, tool_calls=[call])


class TestResponsesForEveryModel(ProxyTestCase):
    """/v1/responses for models Copilot serves only on chat completions or Messages: translated
    there and back, whole and streamed, with a response store for previous_response_id."""

    APPLY_PATCH = {"type": "custom", "name": "apply_patch", "description": "Apply a patch.",
                   "format": {"type": "grammar", "syntax": "lark", "definition": "start: /.+/"}}
    SHELL = {"type": "function", "name": "shell", "description": "Run a command", "strict": False,
             "parameters": {"type": "object", "properties": {"cmd": {"type": "string"}}}}

    def sent(self, path):
        return json.loads(self.fake.requests_to(path)[-1][3])

    def respond(self, body):
        status, _, answer = self.request("POST", "/v1/responses", body)
        return status, json.loads(answer)

    def stream_events(self, body):
        status, _, raw = self.request("POST", "/v1/responses", dict(body, stream=True))
        self.assertEqual(status, 200, raw)
        events = sse_events(raw)
        self.assertEqual([e[1]["sequence_number"] for e in events], list(range(len(events))))
        for name, data in events:
            self.assertEqual(name, data["type"])
        return events

    def logged(self, *parts):
        return wait_for(lambda: any(all(p in line for p in parts) for line in LOGS.lines))

    def test_namespace_tools_and_refusal_parts_of_the_wrong_type_are_400s(self):
        refusal = [{"type": "message", "role": "assistant",
                    "content": [{"type": "refusal", "refusal": 1}]}]
        cases = [("/v1/responses", {"tools": [{"type": "namespace", "name": "ns", "tools": 1}]},
                  "tools[0].tools"),
                 ("/v1/responses", {"tools": [{"type": "namespace", "name": "ns", "tools": [
                     {"type": "function", "name": "f", "description": 5}]}]},
                  "tools[0].tools[0].description"),
                 ("/v1/responses", {"input": refusal}, "input[0].content[0].refusal"),
                 ("/v1/responses/compact", {"input": refusal}, "input[0].content[0].refusal")]
        for model in ("gpt-4.1", "claude-sonnet-4.5"):
            for path, fields, param in cases:
                status, _, raw = self.request("POST", path, dict({"model": model, "input": "hi"}, **fields))
                self.assertEqual((status, json.loads(raw)["error"]["param"]), (400, param), raw)

    def test_an_empty_input_for_a_translated_model_is_a_local_400(self):
        for model in ("gpt-4.1", "claude-sonnet-4.5"):
            for empty in (None, []):
                status, answer = self.respond({"model": model, "input": empty})
                self.assertEqual((status, answer["error"]["param"]), (400, "input"), answer)
                self.assertIn("input must be a non-empty", answer["error"]["message"])
        self.assertEqual(self.fake.requests_to("/chat/completions") + self.fake.requests_to("/v1/messages"), [])

    def test_non_stream_through_chat_with_get_and_delete(self):
        status, answer = self.respond({
            "model": "gpt-4.1", "instructions": "be brief", "input": "hello", "temperature": 0.2,
            "reasoning": {"effort": "medium"},
            "max_output_tokens": 50, "metadata": {"k": "v"},
            "text": {"format": {"type": "json_object"}}})
        self.assertEqual(status, 200, answer)
        sent = self.sent("/chat/completions")
        self.assertEqual(sent["messages"], [{"role": "system", "content": "be brief"},
                                            {"role": "user", "content": "hello"}])
        self.assertEqual((sent["max_tokens"], sent["temperature"], sent["response_format"]),
                         (50, 0.2, {"type": "json_object"}))
        self.assertNotIn("reasoning_effort", sent)  # gpt-4.1 lists no effort: it would refuse one
        self.assertTrue(answer["id"].startswith("resp_"))
        self.assertEqual((answer["object"], answer["status"], answer["model"], answer["metadata"]),
                         ("response", "completed", "gpt-4.1", {"k": "v"}))
        message = answer["output"][0]
        self.assertEqual((message["type"], message["role"], message["status"]),
                         ("message", "assistant", "completed"))
        self.assertEqual(message["content"], [{"type": "output_text", "text": "echo: hello",
                                               "annotations": []}])
        self.assertEqual(answer["usage"], {
            "input_tokens": 3, "output_tokens": 2, "total_tokens": 5,
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens_details": {"reasoning_tokens": 0}})
        self.assertTrue(self.logged("upstream=/chat/completions", "input_tokens=3"), LOGS.lines)
        status, _, body = self.request("GET", "/v1/responses/" + answer["id"])
        self.assertEqual((status, json.loads(body)), (200, answer))
        status, _, body = self.request("DELETE", "/v1/responses/" + answer["id"])
        self.assertEqual((status, json.loads(body)),
                         (200, {"id": answer["id"], "object": "response.deleted", "deleted": True}))
        self.assertEqual(self.request("GET", "/v1/responses/" + answer["id"])[0], 404)  # Copilot's
        status, error = self.respond({"model": "gpt-4.1", "input": "again",
                                      "previous_response_id": answer["id"]})
        self.assertEqual((status, error["error"]["code"], error["error"]["param"]),
                         (400, "previous_response_not_found", "previous_response_id"))

    def test_stream_with_function_and_custom_tools_and_a_follow_up(self):
        self.fake.stream(chunk("Let me look."), tool_call_chunk(0, "call_sh", "shell"),
                         tool_call_chunk(0, arguments='{"cmd":'),
                         tool_call_chunk(1, "call_ap", "apply_patch", '{"input":'),
                         tool_call_chunk(0, arguments='"ls"}'),
                         tool_call_chunk(1, arguments='"*** Begin"}'),
                         chunk(None, "tool_calls"), USAGE_CHUNK, DONE)
        events = self.stream_events({"model": "gpt-4.1", "input": "fix it", "tool_choice": "auto",
                                     "tools": [self.SHELL, self.APPLY_PATCH],
                                     "parallel_tool_calls": True})
        sent = self.sent("/chat/completions")
        functions = [tool["function"] for tool in sent["tools"]]
        self.assertEqual([f["name"] for f in functions], ["shell", "apply_patch"])
        self.assertEqual(functions[1]["parameters"]["properties"]["input"]["type"], "string")
        self.assertIn("start: /.+/", functions[1]["description"])
        self.assertEqual((sent["tool_choice"], sent["parallel_tool_calls"], sent["stream_options"]),
                         ("auto", True, {"include_usage": True}))
        self.assertEqual([name[9:] for name, _ in events], [  # the names without "response."
            "created", "in_progress", "output_item.added", "content_part.added",
            "output_text.delta",
            "output_text.done", "content_part.done", "output_item.done",
            "output_item.added", "function_call_arguments.delta",
            "output_item.added", "function_call_arguments.delta",
            "function_call_arguments.done", "output_item.done",
            "custom_tool_call_input.delta", "custom_tool_call_input.done", "output_item.done",
            "completed"])
        final = events[-1][1]["response"]
        self.assertEqual((final["status"], final["usage"]["total_tokens"]), ("completed", 7))
        call, custom = final["output"][1], final["output"][2]
        self.assertEqual((call["type"], call["call_id"], call["name"], call["arguments"]),
                         ("function_call", "call_sh", "shell", '{"cmd":"ls"}'))
        self.assertEqual((custom["type"], custom["call_id"], custom["name"], custom["input"]),
                         ("custom_tool_call", "call_ap", "apply_patch", "*** Begin"))
        self.assertEqual(events[0][1]["response"]["output"], [])
        # the next turn: only the tool outputs, the rest comes from the stored response
        self.fake.chat_script = None
        image = {"type": "input_image", "image_url": "data:image/png;base64,AA"}
        status, _ = self.respond({
            "model": "gpt-4.1", "previous_response_id": final["id"],
            "tools": [self.SHELL, self.APPLY_PATCH],
            "input": [{"type": "function_call_output", "call_id": "call_sh", "output": "a.txt"},
                      {"type": "custom_tool_call_output", "call_id": "call_ap",
                       "output": [{"type": "input_text", "text": "patched"}, image]}]})
        self.assertEqual(status, 200)
        messages = self.sent("/chat/completions")["messages"]
        self.assertEqual(messages[0], {"role": "user", "content": "fix it"})
        self.assertEqual(messages[1]["content"], "Let me look.")
        self.assertEqual([(c["id"], c["function"]) for c in messages[1]["tool_calls"]], [
            ("call_sh", {"name": "shell", "arguments": '{"cmd":"ls"}'}),
            ("call_ap", {"name": "apply_patch", "arguments": '{"input": "*** Begin"}'})])
        self.assertEqual(messages[2:], [
            {"role": "tool", "tool_call_id": "call_sh", "content": "a.txt"},
            {"role": "tool", "tool_call_id": "call_ap", "content": "patched"},
            {"role": "user", "content": [{"type": "image_url",
                                          "image_url": {"url": image["image_url"]}}]}])
        headers = self.fake.requests_to("/chat/completions")[-1][2]
        self.assertEqual((headers["x-initiator"], headers["copilot-vision-request"]),
                         ("agent", "true"))

    def test_namespaced_tools_as_codex_sends_them(self):
        spawn = {"type": "function", "name": "spawn_agent", "description": "Start one.",
                 "strict": False, "parameters": {"type": "object", "properties": {}}}
        agents = {"type": "namespace", "name": "multi_agent_v1", "description": "Sub-agents.",
                  "tools": [spawn]}
        flat = "multi_agent_v1__spawn_agent"
        self.fake.routes[("POST", "/chat/completions")] = lambda h, b: h.send_json(200, {
            "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
                "role": "assistant", "content": None, "tool_calls": [{
                    "id": "call_a", "type": "function",
                    "function": {"name": flat, "arguments": '{"task": "t"}'}}]}}]})
        status, answer = self.respond({"model": "gpt-4.1", "input": "go",
                                       "tools": [self.SHELL, agents]})
        call = answer["output"][0]
        self.assertEqual((status, call["name"], call["namespace"]),
                         (200, "spawn_agent", "multi_agent_v1"))
        sent = self.sent("/chat/completions")["tools"][1]["function"]
        self.assertEqual((sent["name"], sent["description"]), (flat, "Sub-agents.\n\nStart one."))
        self.respond({"model": "gpt-4.1", "tools": [agents], "input": [
            call, {"type": "function_call_output", "call_id": "call_a", "output": "started"}]})
        sent_call = self.sent("/chat/completions")["messages"][0]["tool_calls"][0]
        self.assertEqual(sent_call["function"]["name"], flat)
        status, answer = self.respond({"model": "gpt-4.1", "input": "x", "tools": [
            {"type": "namespace", "name": "n", "tools": [{"type": "web_search"}]}]})
        self.assertEqual((status, answer["error"]["code"]), (400, "hosted_tool_not_supported"))

    def test_claude_goes_to_messages_and_its_thinking_comes_back(self):
        self.fake.stream(*claude_thinking_stream(tool=("shell", '{"cmd": "cat a.ts"}')))
        events = self.stream_events({
            "model": "claude-sonnet-4.5", "instructions": "You are Codex.", "input": "read a.ts",
            "tools": [self.SHELL], "reasoning": {"effort": "high", "summary": "auto"},
            "store": False, "include": ["reasoning.encrypted_content"]})
        method, path, headers, raw = self.fake.requests_to("/v1/messages")[-1]
        sent = json.loads(raw)
        cached = {"cache_control": {"type": "ephemeral"}}
        self.assertEqual(sent["system"], [dict(cached, type="text", text="You are Codex.")])
        self.assertEqual(sent["messages"], [{"role": "user", "content": [
            dict(cached, type="text", text="read a.ts")]}])
        self.assertEqual((sent["thinking"], sent["tools"][0]["name"], sent["tool_choice"]),
                         ({"type": "enabled", "budget_tokens": 16384}, "shell", {"type": "auto"}))
        self.assertGreater(sent["max_tokens"], 16384)
        self.assertEqual((headers["anthropic-version"], headers["anthropic-beta"]),
                         ("2023-06-01", "interleaved-thinking-2025-05-14"))
        self.assertEqual([name[9:] for name, _ in events[2:8]], [
            "output_item.added", "reasoning_summary_part.added", "reasoning_summary_text.delta",
            "reasoning_summary_text.done", "reasoning_summary_part.done", "output_item.done"])
        final = events[-1][1]["response"]
        reasoning, message, call = final["output"]
        self.assertEqual(reasoning["summary"], [{"type": "summary_text", "text": "Need the file."}])
        self.assertEqual(coproxy.unpack_thinking(reasoning["encrypted_content"]),
                         ("Need the file.", "SIG-1"))
        self.assertEqual((message["content"][0]["text"], call["arguments"]),
                         ("Done.", '{"cmd": "cat a.ts"}'))
        usage = final["usage"]
        self.assertEqual((usage["input_tokens"], usage["input_tokens_details"]["cached_tokens"],
                          usage["output_tokens"]), (120, 100, 30))
        self.assertTrue(self.logged("upstream=/v1/messages", "cached_tokens=100"), LOGS.lines)
        # store: false, so the client sends the whole history back, thinking included
        self.assertEqual(self.request("GET", "/v1/responses/" + final["id"])[0], 404)
        self.fake.chat_script = None
        history = [{"role": "user", "content": "read a.ts"}] + final["output"] + [
            {"type": "function_call_output", "call_id": call["call_id"], "output": "export {}"}]
        status, answer = self.respond({"model": "claude-sonnet-4.5", "input": history,
                                       "tools": [self.SHELL], "reasoning": {"effort": "high"}})
        self.assertEqual(status, 200, answer)
        messages = self.sent("/v1/messages")["messages"]
        self.assertEqual(messages[1], {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "Need the file.", "signature": "SIG-1"},
            {"type": "text", "text": "Done."},
            {"type": "tool_use", "id": "toolu_1", "name": "shell", "input": {"cmd": "cat a.ts"}}]})
        self.assertEqual(messages[2], {"role": "user", "content": [dict(
            cached, type="tool_result", tool_use_id="toolu_1", content="export {}")]})
        self.assertEqual(answer["output"][0]["content"][0]["text"], "native: 3 messages")
        self.assertEqual(answer["usage"]["input_tokens"], 9)

    def test_a_conversation_can_move_on_to_a_native_model(self):
        self.fake.stream(*claude_thinking_stream())
        events = self.stream_events({"model": "claude-sonnet-4.5", "input": "start"})
        first = events[-1][1]["response"]
        self.fake.chat_script = None
        status, _ = self.respond({"model": "gpt-5.1-codex", "input": "go on",
                                  "previous_response_id": first["id"]})
        sent = self.sent("/responses")
        self.assertEqual((status, "previous_response_id" in sent), (200, False))
        self.assertEqual([(i["type"], i.get("role")) for i in sent["input"]], [
            ("message", "user"), ("message", "assistant"), ("message", "user")])  # no thinking
        self.assertEqual(sent["input"][1]["content"][0]["text"], "Done.")
        self.assertNotIn("id", sent["input"][1])  # Copilot would look it up, and not find it
        # a client that keeps the history itself (Codex) sends Claude's thinking back: left out too
        self.respond({"model": "gpt-5.1-codex", "input": first["output"] + [
            {"type": "reasoning", "summary": [], "encrypted_content": "gAAAA-openai"}]})
        self.assertEqual([i["type"] for i in self.sent("/responses")["input"]],
                         ["message", "reasoning"])

    def test_whole_claude_answers_with_thinking_and_incomplete_chat_answers(self):
        self.fake.routes[("POST", "/v1/messages")] = lambda h, b: h.send_json(200, {
            "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-opus-4.6",
            "content": [{"type": "thinking", "thinking": "Hmm.", "signature": "S"},
                        {"type": "text", "text": "Hi"},
                        {"type": "tool_use", "id": "toolu_9", "name": "apply_patch",
                         "input": {"input": "*** P"}}],
            "stop_reason": "tool_use", "usage": {"input_tokens": 4, "output_tokens": 6}})
        status, answer = self.respond({"model": "claude-opus-4.6", "input": "hi",
                                       "tools": [self.APPLY_PATCH]})
        output = answer["output"]
        self.assertEqual([i["type"] for i in output], ["reasoning", "message", "custom_tool_call"])
        self.assertEqual((output[0]["summary"], output[2]["input"]), ([], "*** P"))
        self.assertEqual(coproxy.unpack_thinking(output[0]["encrypted_content"]), ("Hmm.", "S"))
        self.assertNotIn("thinking", self.sent("/v1/messages"))  # no effort asked, no thinking
        self.fake.routes[("POST", "/chat/completions")] = lambda h, b: h.send_json(200, {
            "choices": [{"index": 0, "finish_reason": "length",
                         "message": {"role": "assistant", "content": "cut sh"}}],
            "usage": {"prompt_tokens": 2, "completion_tokens": 9}})
        status, answer = self.respond({"model": "gpt-5-mini", "input": "x", "max_output_tokens": 9})
        self.assertEqual((status, answer["status"], answer["incomplete_details"]),
                         (200, "incomplete", {"reason": "max_output_tokens"}))
        self.fake.routes[("POST", "/chat/completions")] = self.fake.chat
        self.fake.stream(chunk("cut sh"), chunk(None, "length"), DONE)
        events = self.stream_events({"model": "gpt-4.1", "input": "x"})
        self.assertEqual((events[-1][0], events[-1][1]["response"]["status"]),
                         ("response.incomplete", "incomplete"))

    def test_refusals_before_any_upstream_call(self):
        for tool in ("web_search", "file_search", "code_interpreter", "computer_use_preview",
                     "mcp"):
            status, answer = self.respond({"model": "claude-sonnet-4.5", "input": "x",
                                           "tools": [self.SHELL, {"type": tool}]})
            error = answer["error"]
            self.assertEqual((status, error["code"], error["param"]),
                             (400, "hosted_tool_not_supported", "tools[1].type"))
            self.assertIn(tool, error["message"])
            self.assertIn("claude-sonnet-4.5", error["message"])
            codex_setting = 'web_search = "disabled"' in error["message"]
            self.assertEqual(codex_setting, tool == "web_search")
        status, answer = self.respond({"model": "gpt-4.1", "input": "x",
                                       "previous_response_id": "resp_no"})
        self.assertEqual((status, answer["error"]["code"]), (400, "previous_response_not_found"))
        status, answer = self.respond({"model": "gpt-4.1", "input": [{"role": "user", "content": [
            {"type": "input_file", "file_id": "f"}]}]})
        self.assertEqual((status, answer["error"]["code"]), (400, "unsupported_content"))
        self.assertEqual(self.fake.requests_to("/chat/completions"), [])
        self.assertEqual(self.fake.requests_to("/v1/messages"), [])
        # a native model still goes to Copilot's /responses, hosted tools and all
        hosted = [{"type": "web_search"}]
        status, _ = self.respond({"model": "gpt-5.1-codex", "input": "x", "tools": hosted})
        self.assertEqual((status, self.sent("/responses")["tools"]), (200, hosted))

    def test_a_cut_stream_ends_with_a_numbered_error_event(self):
        for upstream, model in ((claude_thinking_stream("cut"), "claude-sonnet-4.5"),
                                ([chunk("partial"), "cut"], "gpt-4.1"),
                                ([chunk("partial")], "gpt-4.1")):
            self.fake.stream(*upstream)
            events = self.stream_events({"model": model, "input": "x"})
            code = "upstream_cut" if "cut" in upstream else "incomplete_stream"
            self.assertEqual((events[-1][0], events[-1][1]["code"]), ("error", code))
            self.assertNotIn("response.completed", [name for name, _ in events])
        self.assertEqual(self.proxy.app.responses.bytes, 0)  # a cut answer is not kept

    def test_compact_for_a_translated_model_summarises(self):
        self.fake.routes[("POST", "/v1/messages")] = lambda h, b: h.send_json(200, {
            "type": "message", "role": "assistant",
            "content": [{"type": "text", "text": "We fixed a.ts."}],
            "stop_reason": "end_turn", "usage": {"input_tokens": 40, "output_tokens": 5}})
        payload = {"model": "claude-sonnet-4.5", "instructions": "be Codex",
                   "tools": [self.SHELL, {"type": "web_search"}],
                   "input": [{"type": "message", "role": "user", "content": "fix a.ts"},
                             {"type": "function_call", "call_id": "c", "name": "shell",
                              "arguments": "{}"},
                             {"type": "function_call_output", "call_id": "c", "output": "done"}]}
        status, _, body = self.request("POST", "/v1/responses/compact", payload)
        answer = json.loads(body)
        self.assertEqual((status, answer["object"]), (200, "response.compaction"))
        self.assertEqual(answer["output"][0], {"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "fix a.ts"}]})
        self.assertEqual(answer["output"][1]["content"][0]["text"],
                         "Summary of the conversation so far:\n\nWe fixed a.ts.")
        self.assertEqual(answer["usage"]["input_tokens"], 40)
        method, path, headers, raw = self.fake.requests_to("/v1/messages")[-1]
        sent = json.loads(raw)
        self.assertIn("Summarise the conversation", sent["messages"][-1]["content"][-1]["text"])
        self.assertEqual(([t["name"] for t in sent["tools"]], sent["tool_choice"]),
                         (["shell"], {"type": "none"}))
        self.assertEqual((headers["x-initiator"], headers["x-interaction-type"]),
                         ("agent", "conversation-compaction"))
        self.assertEqual(self.proxy.app.responses.bytes, 0)


    def test_the_store_holds_what_it_counted(self):
        # Each entry is kept as its JSON bytes: a later turn that inlines images or copies the
        # history cannot grow it; one entry larger than 1/16 of the store is not kept; expired
        # entries go on the next put.
        proxy = self.start_proxy(image_fetch_allow_private=True)
        store = proxy.app.responses
        self.fake.routes[("GET", "/img.png")] = lambda h, b: h.send_body(200, PNG, "image/png")
        content = [{"type": "input_text", "text": "look"},
                   {"type": "input_image", "image_url": self.fake.url + "/img.png"}]
        body = {"model": "gpt-4.1", "input": [{"role": "user", "content": content}]}
        status, _, raw = self.request("POST", "/v1/responses", body, port=proxy.port)
        first = json.loads(raw)["id"]
        counted = store.bytes
        status, _, raw = self.request("POST", "/v1/responses", {
            "model": "gpt-5.1-codex", "input": "and now?", "previous_response_id": first},
            port=proxy.port)
        self.assertEqual(status, 200, raw)
        self.assertIn("data:image/png;base64,", self.fake.requests_to("/responses")[-1][3].decode())
        self.assertEqual(store.bytes, counted)
        kept = json.dumps(store.history(first)[0])  # the user's turn (the fake echoes images)
        self.assertIn(self.fake.url + "/img.png", kept)
        self.assertNotIn("data:image", kept)
        huge = "x" * (store.size // 16)
        status, _, raw = self.request("POST", "/v1/responses", {"model": "gpt-4.1", "input": huge},
                                      port=proxy.port)
        self.assertEqual(status, 200)
        self.assertEqual(self.request("GET", "/v1/responses/" + json.loads(raw)["id"],
                                      port=proxy.port)[0], 404)
        self.assertEqual(store.bytes, counted)
        now = [time.monotonic()]
        store.clock = lambda: now[0]
        now[0] += store.seconds + 1  # the first entry has expired
        self.request("POST", "/v1/responses", {"model": "gpt-4.1", "input": "hi"}, port=proxy.port)
        self.assertEqual(len(store._entries), 1)
        self.assertLess(store.bytes, counted)

class TestCostAndLimits(ProxyTestCase):
    """What Copilot costs, per request, and the limits a user runs into."""

    def test_reported_cost_reaches_the_log_metrics_and_usage(self):
        self.fake.cost = 12300000000  # 12.3 credits
        self.request("POST", "/v1/chat/completions", chat_body())
        self.fake.stream(chunk("x"), chunk(None, "stop"), COST_CHUNK, DONE)
        self.request("POST", "/v1/chat/completions", chat_body(stream=True))
        self.fake.stream(anthropic_event("message_start", {"type": "message_start", "message": {"usage": {
            "input_tokens": 20, "cache_read_input_tokens": 100}}}),
            anthropic_event("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {
                "output_tokens": 8}, "copilot_usage": {"total_nano_aiu": 2000000000}}),
            anthropic_event("message_stop", {"type": "message_stop"}))
        self.request("POST", "/v1/messages", {"model": "claude-opus-4.6", "max_tokens": 5, "stream": True,
                                              "messages": [{"role": "user", "content": "x"}]})
        self.assertTrue(wait_for(lambda: sum("credits=" in line for line in LOGS.lines) >= 3), LOGS.lines)
        lines = [line for line in LOGS.lines if "credits=" in line]
        self.assertIn("credits=12.3", lines[0])
        self.assertIn("input_tokens=3 cached_tokens=0 output_tokens=2", lines[0])
        self.assertIn("credits=4.5", lines[1])
        self.assertIn("input_tokens=120 cached_tokens=100 output_tokens=8", lines[2])
        values = parse_metrics(self.request("GET", "/metrics")[2].decode())
        self.assertAlmostEqual(values[("coproxy_ai_credits_total", frozenset([("model", "gpt-4.1")]))], 16.8)
        self.assertEqual(values[("coproxy_tokens_total", frozenset([("model", "claude-opus-4.6"), ("type", "cached")]))], 100)
        labels = frozenset([("gen_ai_operation_name", "chat"), ("gen_ai_provider_name", "github.copilot"),
                            ("gen_ai_request_model", "gpt-4.1"), ("gen_ai_token_type", "input")])
        self.assertEqual(values[("gen_ai_client_token_usage_count", labels)], 2)
        first_chunk = [k for k in values if k[0] == "gen_ai_client_operation_time_to_first_chunk_seconds_count"]
        self.assertEqual(sum(values[k] for k in first_chunk), 2)
        since = json.loads(self.request("GET", "/usage")[2])["since_start"]
        self.assertAlmostEqual(since["credits"], 18.8)
        self.assertEqual(since["models"]["claude-opus-4.6"]["tokens"], {"input": 120, "cached": 100, "output": 8})

    def test_responses_cost_from_the_answer_and_from_response_completed(self):
        self.fake.cost = 2500000000
        self.assertEqual(self.request("POST", "/v1/responses", {"model": "gpt-5.1-codex", "input": "hi"})[0], 200)
        self.fake.stream(sse({"type": "response.created", "response": {"id": "r"}}),
                         sse({"type": "response.output_text.delta", "delta": "yo"}),
                         sse({"type": "response.completed", "copilot_usage": {"total_nano_aiu": 1500000000},
                              "response": {"id": "r", "status": "completed", "usage": {"input_tokens": 7,
                                                                                       "output_tokens": 2}}}))
        self.request("POST", "/v1/responses", {"model": "gpt-5.1-codex", "stream": True, "input": "hi"})
        self.assertTrue(wait_for(lambda: sum("credits=" in line for line in LOGS.lines) >= 2), LOGS.lines)
        lines = [line for line in LOGS.lines if "credits=" in line]
        self.assertIn("credits=2.5", lines[0])
        self.assertIn("input_tokens=7 cached_tokens=0 output_tokens=2", lines[1])
        self.assertIn("credits=1.5", lines[1])

    def test_cost_is_estimated_from_the_catalogues_prices_when_not_reported(self):
        self.request("POST", "/v1/chat/completions", chat_body())  # 3 input, 2 output tokens of gpt-4.1
        self.assertTrue(wait_for(lambda: any("credits_estimated=true" in line for line in LOGS.lines)), LOGS.lines)
        line = [l for l in LOGS.lines if "credits_estimated" in l][0]
        self.assertIn("credits=%g" % ((3 * 200 + 2 * 800) / 1e6), line)

    def test_session_and_weekly_limits_are_answered_with_their_end_and_not_retried(self):
        calls = []

        def limited(handler, payload):
            calls.append(1)
            handler.send_json(429, {"error": {"message": "Sorry, you've exceeded your 5 hour session limits. Please "
                                                         "retry after 2733 seconds.", "code": "user_global_rate_limited:pro"}})
        self.fake.routes[("POST", "/chat/completions")] = limited
        status, headers, body = self.request("POST", "/v1/chat/completions", chat_body())
        error = json.loads(body)["error"]
        self.assertEqual((status, headers["Retry-After"], error["type"]), (429, "2733", "rate_limit_error"))
        self.assertIn("5-hour session limit is reached", error["message"])
        self.assertEqual(len(calls), 1)
        status, headers, body = self.request("POST", "/v1/messages", {"model": "claude-haiku-4.5", "max_tokens": 5,
                                                                      "messages": [{"role": "user", "content": "x"}]})
        self.assertEqual((status, json.loads(body)["error"]["type"], headers["Retry-After"]), (429, "rate_limit_error", "2733"))
        self.fake.routes[("POST", "/chat/completions")] = lambda h, p: h.send_json(429, {"error": {
            "message": "Sorry, you've exceeded your weekly rate limit.", "code": "user_weekly_rate_limited"}},
            [("Retry-After", "86400")])
        status, headers, body = self.request("POST", "/v1/chat/completions", chat_body())
        error = json.loads(body)["error"]
        self.assertEqual((status, headers["Retry-After"], error["code"]), (429, "86400", "user_weekly_rate_limited"))
        self.assertIn("Copilot's weekly limit is reached", error["message"])
        values = parse_metrics(self.request("GET", "/metrics")[2].decode())
        self.assertEqual(values[("coproxy_limit_hits_total", frozenset([("window", "5-hour session")]))], 2)
        self.assertEqual(values[("coproxy_limit_hits_total", frozenset([("window", "weekly")]))], 1)
        self.assertEqual(len(calls), 2)  # never retried: one call per request

    def test_a_short_transient_429_or_503_is_retried_once(self):
        answers, slept = [(429, [("Retry-After", "2")]), None, (503, [])], []

        def flaky(handler, payload):
            answer = answers.pop(0) if answers else None
            if answer:
                handler.send_json(answer[0], {"error": {"message": "busy"}}, answer[1])
            else:
                self.fake.chat(handler, payload)

        async def no_sleep(seconds):
            slept.append(seconds)
        self.proxy.app.gateway.sleep = no_sleep
        self.fake.routes[("POST", "/chat/completions")] = flaky
        self.assertEqual(self.request("POST", "/v1/chat/completions", chat_body())[0], 200)  # 429, then fine
        self.assertEqual(self.request("POST", "/v1/chat/completions", chat_body())[0], 200)  # 503, then fine
        self.assertEqual(slept, [2, 1])
        self.assertEqual(len(self.fake.requests_to("/chat/completions")), 4)
        answers[:] = [(503, []), (503, [])]
        self.assertEqual(self.request("POST", "/v1/chat/completions", chat_body())[0], 503)  # one retry, not two

    def test_effort_refusals_are_retried_with_the_nearest_value_and_remembered(self):
        def picky(handler, payload):
            if payload.get("reasoning_effort") not in (None, "medium"):
                handler.send_json(400, {"error": {"message": 'reasoning_effort "%s" is not supported by model gpt-5-mini;'
                                                             ' supported values: [medium]' % payload["reasoning_effort"],
                                                  "code": "invalid_reasoning_effort"}})
            else:
                self.fake.chat(handler, payload)
        self.fake.routes[("POST", "/chat/completions")] = picky
        for _ in range(2):
            status, headers, body = self.request("POST", "/v1/chat/completions", chat_body(model="gpt-5-mini",
                                                                                           reasoning_effort="high"))
            self.assertEqual((status, headers["X-Coproxy-Adjusted"]), (200, "reasoning_effort=high->medium"), body)
        sent = [json.loads(r[3])["reasoning_effort"] for r in self.fake.requests_to("/chat/completions")]
        self.assertEqual(sent, ["high", "medium", "medium"])  # learnt after the first refusal
        catalogue = self.proxy.app.catalogue
        self.assertEqual(catalogue.quirks("gpt-5-mini"), {"/chat/completions": {"efforts": ["medium"]}})
        self.assertEqual(catalogue.quirks("gpt-4.1"), {})  # one model's lesson, not every model's
        self.addCleanup(setattr, coproxy, "QUIRK_TTL_SECONDS", coproxy.QUIRK_TTL_SECONDS)
        coproxy.QUIRK_TTL_SECONDS = 0  # and lessons expire
        self.assertEqual(catalogue.quirks("gpt-5-mini"), {})

    def test_identity_options_and_the_466_refusal(self):
        proxy = self.start_proxy(editor_version="vscode/1.999.0", editor_plugin_version="copilot-chat/0.99.1")
        self.request("POST", "/v1/chat/completions", chat_body(), port=proxy.port)
        headers = self.fake.requests_to("/chat/completions")[-1][2]
        self.assertEqual((headers["editor-version"], headers["editor-plugin-version"], headers["user-agent"]),
                         ("vscode/1.999.0", "copilot-chat/0.99.1", "GitHubCopilotChat/0.99.1"))
        self.assertEqual(self.fake.requests_to("/copilot_internal/v2/token")[-1][2]["editor-version"], "vscode/1.999.0")
        self.fake.routes[("POST", "/chat/completions")] = lambda h, b: h.send_text(
            466, "bad request: the specified API version is no longer supported. You may need to update your client "
                 "to a newer version.\n")
        status, _, body = self.request("POST", "/v1/chat/completions", chat_body(), port=proxy.port)
        error = json.loads(body)["error"]
        self.assertEqual((status, error["code"]), (466, "client_version_refused"))
        self.assertIn("--editor-version and --editor-plugin-version (now vscode/1.999.0", error["message"])

    def test_usage_windows_seen_in_answers(self):
        self.fake.answer_headers = [("x-usage-ratelimit-session", "ent=0&ov=0.0&ovPerm=false&rem=42.5&rst=2026-12-01T03%3A00%3A00Z"),
                                    ("x-usage-ratelimit-weekly", "rem=88&rst=2026-12-07T00%3A00%3A00Z")]
        self.fake.user = TOKEN_BILLED_USER
        self.request("POST", "/v1/chat/completions", chat_body())
        usage = json.loads(self.request("GET", "/usage")[2])
        self.assertEqual(usage["windows"]["session"]["percent_remaining"], 42.5)
        self.assertEqual(usage["windows"]["weekly"]["resets_at"], "2026-12-07T00:00:00Z")
        self.assertEqual((usage["copilot"]["billing"], usage["copilot"]["credits"]["used"]), ("tokens", 122.5))


class TestTokensEndToEnd(ProxyTestCase):
    """Tokens sent directly through the whole proxy, and the refusals that say what to do."""

    def chat(self, proxy, model="gpt-4.1"):
        status, _, body = self.request("POST", "/v1/chat/completions", chat_body(model=model),
                                       port=proxy.port)
        return status, json.loads(body)

    def direct_proxy(self, **overrides):
        return self.start_proxy(copilot_api_url=self.fake.url, **overrides)

    def test_a_fine_grained_pat_is_sent_directly(self):
        proxy = self.direct_proxy(github_token="github_pat_11AAfinegrained")
        self.assertEqual(self.chat(proxy)[0], 200)
        headers = self.fake.requests_to("/chat/completions")[-1][2]
        self.assertEqual((headers["authorization"], headers["copilot-integration-id"]),
                         ("Bearer github_pat_11AAfinegrained", "copilot-developer-cli"))
        self.assertEqual(self.fake.requests_to("/copilot_internal/v2/token"), [])
        health = json.loads(self.request("GET", "/healthz", port=proxy.port)[2])
        self.assertEqual(health["auth"]["credentials"], {
            "token_kind": "fine-grained-pat", "mode": "direct", "expires_at": None,
            "integration_id": "copilot-developer-cli", "payer": "user (the token's account)"})
        self.assertNotIn("github_pat_11", "\n".join(LOGS.lines))

    def test_each_refusal_says_what_to_do(self):
        proxy = self.direct_proxy(github_token="github_pat_11AAfinegrained",
                                  integration_id="vscode-chat")
        status, data = self.chat(proxy)
        message = data["error"]["message"]
        self.assertEqual((status, data["error"]["code"]), (400, "pat_integration_refused"))
        self.assertIn("--integration-id copilot-developer-cli", message)
        self.assertIn("Copilot-Integration-Id vscode-chat (--integration-id)", message)
        status, data = self.chat(self.direct_proxy(github_token="github_pat_11noperm"))
        self.assertEqual((status, data["error"]["code"]), (401, "pat_missing_permission"))
        self.assertIn('Account permissions > "Copilot Requests"', data["error"]["message"])
        status, data = self.chat(self.direct_proxy(auth_mode="direct", integration_id="my-tool"))
        message = data["error"]["message"]
        self.assertEqual((status, data["error"]["code"]),
                         (400, "model_not_available_for_integrator"))
        self.assertIn("gpt-4.1 is not available to my-tool", message)
        self.assertIn("another --integration-id", message)
        self.assertNotIn("ghu_testtoken", json.dumps(data))

    def test_an_organisation_that_has_not_enabled_app_tokens_is_named(self):
        key_file = os.path.join(self.tmp, "app.pem")
        coproxy.write_file_atomic(key_file, rsa_key_pem(RFC7515_KEY))
        app = dict(github_token=None, github_app_id=FAKE_APP_ID, github_app_key_file=key_file,
                   github_app_installation_id=FAKE_INSTALLATION_ID)
        refusal = ("Copilot requests with GitHub App installation access tokens are not enabled "
                   "for this organization")
        self.fake.app_direct_refusal = (403, refusal)
        status, data = self.chat(self.direct_proxy(auth_mode="direct", **app))
        message = data["error"]["message"]
        self.assertEqual((status, data["error"]["code"]), (403, "app_copilot_requests_disabled"))
        self.assertIn('has not enabled "Copilot requests from GitHub App installations"', message)
        self.assertIn("organization_copilot_requests=read permission form", message)
        self.fake.token_status, self.fake.token_body = 403, {"message": "Forbidden"}
        status, data = self.chat(self.direct_proxy(**app))  # auto: directly, then the exchange
        message = data["error"]["message"]
        self.assertEqual(status, 503)
        self.assertIn("sent directly (HTTP 403: %s), and the token exchange refused it too"
                      % refusal, message)
        self.assertIn("an owner turns it on", message)
        self.assertNotIn("ghs_minted", "\n".join(LOGS.lines) + json.dumps(data))

    def test_auth_status_and_status_show_the_credentials_never_the_token(self):
        self.fake.app_tokens.add("ghs_fromthecli123456")
        args = ["--state-dir", self.tmp, "--github-url", self.fake.url, "--github-api-url",
                self.fake.url, "--copilot-api-url", self.fake.url, "auth", "status"]
        with contextlib.redirect_stdout(io.StringIO()) as out:
            self.assertEqual(coproxy.main(args + ["--github-token", "ghs_fromthecli123456"]), 0)
        text = out.getvalue()
        for line in ("token kind:     app-installation, sent to Copilot directly",
                     "integration:    copilot-developer-cli",
                     "billed to:      organisation (GitHub App installation)",
                     "token expires:  not known",
                     "Copilot:        accepts the token (%d models)" % len(CATALOG_IDS)):
            self.assertIn(line, text)
        self.assertNotIn("ghs_fromthecli", text)
        with contextlib.redirect_stdout(io.StringIO()) as out:
            self.assertEqual(coproxy.main(args + ["--github-token", "github_pat_11noperm"]), 1)
        self.assertIn("Copilot Requests", out.getvalue())
        self.assertNotIn("github_pat_11noperm", out.getvalue())
        lines = coproxy.credential_lines({
            "token_kind": "oauth", "mode": "exchange", "integration_id": "vscode-chat",
            "payer": "user (monthly_subscriber)", "expires_at": time.time() + 1500})
        self.assertIn("token kind:     oauth, exchanged for a Copilot token", lines)
        self.assertTrue(lines[-1].startswith("token expires:  in 2"), lines)


class TestAutoModel(ProxyTestCase):
    """`auto`: Copilot picks the model; coproxy routes, logs and bills by the pick."""

    def chat(self, model, proxy=None):
        port = (proxy or self.proxy).port
        status, _, body = self.request("POST", "/v1/chat/completions", chat_body(model=model),
                                       port=port)
        return status, json.loads(body)

    def test_auto_is_listed_resolves_and_routes_by_the_chosen_model(self):
        for headers in ({}, {"anthropic-version": "2023-06-01"}):
            listed = json.loads(self.request("GET", "/v1/models", headers=headers)[2])["data"]
            self.assertEqual(listed[-1]["id"], "auto")
        status, data = self.chat("auto")
        self.assertEqual((status, data["model"]), (200, "claude-sonnet-4.5"))
        sent = self.fake.requests_to("/chat/completions")[-1]
        self.assertEqual((json.loads(sent[3])["model"], sent[2]["copilot-session-token"]),
                         ("claude-sonnet-4.5", "sess-1"))
        status, _, body = self.request("POST", "/v1/messages", {
            "model": "auto", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]})
        self.assertEqual(status, 200)
        native = self.fake.requests_to("/v1/messages")[-1]  # claude-sonnet-4.5 lists /v1/messages
        self.assertEqual((json.loads(native[3])["model"], native[2]["copilot-session-token"]),
                         ("claude-sonnet-4.5", "sess-1"))
        tags = json.loads(self.request("GET", "/api/tags")[2])["models"]
        self.assertIn("auto:latest", [tag["name"] for tag in tags])
        ollama_chat = {"model": "auto:latest", "stream": False,
                       "messages": [{"role": "user", "content": "x"}]}
        status, _, body = self.request("POST", "/api/chat", ollama_chat)
        self.assertEqual(status, 200, body)
        self.assertEqual(json.loads(self.fake.requests_to("/v1/messages")[-1][3])["model"],
                         "claude-sonnet-4.5")
        self.assertEqual(self.fake.auto_calls, 1)
        logged = lambda: sum("model=auto->claude-sonnet-4.5" in line for line in LOGS.lines)
        self.assertTrue(wait_for(lambda: logged() == 3), LOGS.lines)
        self.fake.auto_model = "gpt-5.1-codex"  # a model Copilot serves only on /responses
        status, data = self.chat("auto", self.start_proxy())
        self.assertEqual(status, 200, data)
        self.assertEqual(json.loads(self.fake.requests_to("/responses")[-1][3])["model"],
                         "gpt-5.1-codex")

    def test_auto_bills_with_its_discount(self):
        catalog = copy.deepcopy(CATALOG)
        catalog[0]["billing"] = {"auto_discount": 0.1, "token_prices": {
            "batch_size": 1000000,
            "default": {"input_price": 200, "cache_read_price": 50, "output_price": 800}}}
        listing = {"object": "list", "data": catalog}
        self.fake.routes[("GET", "/models")] = lambda h, b: h.send_json(200, listing)
        self.fake.auto_model = "gpt-4.1"
        proxy = self.start_proxy()
        for model in ("gpt-4.1", "auto"):
            self.assertEqual(self.chat(model, proxy)[0], 200)
        estimated = lambda: [line for line in LOGS.lines if "credits_estimated=true" in line]
        self.assertTrue(wait_for(lambda: len(estimated()) == 2), LOGS.lines)
        plain, auto = estimated()
        full = (3 * 200 + 2 * 800) / 1e6
        self.assertIn("model=gpt-4.1 ", plain)
        self.assertIn("credits=%g" % full, plain)
        self.assertIn("model=auto->gpt-4.1 ", auto)
        self.assertIn("credits=%g" % round(full * 0.9, 6), auto)

    def test_a_refused_auto_session_is_a_clear_error(self):
        down = {"message": "router down"}
        self.fake.routes[("POST", "/auto")] = lambda h, b: h.send_json(500, down)
        status, data = self.chat("auto")
        self.assertEqual((status, data["error"]["code"]), (502, "auto_unavailable"))
        self.assertIn("router down", data["error"]["message"])


class TestOperations(ProxyTestCase):
    def test_rate_limit_429_then_wait_with_an_injected_clock(self):
        now, slept = [1000.0], []

        async def fake_sleep(seconds):
            slept.append(seconds)
            now[0] += seconds
        proxy = self.start_proxy(rate_limit=10.0)
        proxy.app.gateway.clock, proxy.app.gateway.sleep = (lambda: now[0]), fake_sleep
        self.assertEqual(self.request("POST", "/v1/chat/completions", chat_body(), port=proxy.port)[0], 200)
        now[0] += 4
        status, headers, body = self.request("POST", "/v1/chat/completions", chat_body(), port=proxy.port)
        self.assertEqual((status, headers["Retry-After"], json.loads(body)["error"]["code"]), (429, "6", "rate_limited"))
        self.assertIn("--rate-limit", json.loads(body)["error"]["message"])
        now[0] += 6
        self.assertEqual(self.request("POST", "/v1/chat/completions", chat_body(), port=proxy.port)[0], 200)
        waiting = self.start_proxy(rate_limit=10.0, wait=True)
        waiting.app.gateway.clock, waiting.app.gateway.sleep = (lambda: now[0]), fake_sleep
        statuses = [self.request("POST", "/v1/chat/completions", chat_body(), port=waiting.port)[0] for _ in range(3)]
        self.assertEqual((statuses, slept), ([200, 200, 200], [10.0, 10.0]))
        self.assertEqual(len(self.fake.requests_to("/chat/completions")), 5)

    def test_metrics_parsed_back(self):
        proxy = self.start_proxy(api_key="k")
        auth = {"Authorization": "Bearer k"}
        self.request("POST", "/v1/chat/completions", chat_body(), auth, port=proxy.port)
        self.fake.stream(chunk("x"), chunk(None, "stop"), DONE)
        self.request("POST", "/v1/chat/completions", chat_body(model="claude-sonnet-4.5", stream=True), auth, port=proxy.port)
        self.request("POST", "/v1/chat/completions", chat_body(model="nope"), auth, port=proxy.port)
        self.assertEqual(self.request("GET", "/metrics", port=proxy.port)[0], 401)
        self.assertTrue(wait_for(lambda: proxy.app.metrics.counters))
        status, headers, body = self.request("GET", "/metrics", headers=auth, port=proxy.port)
        self.assertEqual((status, headers["Content-Type"]), (200, "text/plain; version=0.0.4; charset=utf-8"))
        values = parse_metrics(body.decode())
        def value(name, **labels):
            return values.get((name, frozenset((k, str(v)) for k, v in labels.items())))
        self.assertEqual(value("coproxy_requests_total", route="/chat/completions", status=200, model="gpt-4.1",
                               initiator="user"), 1)
        self.assertEqual(value("coproxy_requests_total", route="/chat/completions", status=404, model="", initiator=""), 1)
        self.assertEqual(value("coproxy_upstream_latency_seconds_count", route="/chat/completions"), 2)
        self.assertEqual(value("gen_ai_client_operation_time_to_first_chunk_seconds_count", gen_ai_operation_name="chat",
                               gen_ai_provider_name="github.copilot", gen_ai_request_model="claude-sonnet-4.5"), 1)
        self.assertEqual(value("coproxy_premium_requests_total", model="claude-sonnet-4.5"), 1)
        self.assertEqual((value("coproxy_active_streams"), value("coproxy_token_refreshes_total")), (0, 1))
        self.assertLess(abs(value("coproxy_start_time_seconds") - proxy.app.started_at), 0.01)  # not rounded to 1e+09
        self.assertGreater(value("coproxy_response_bytes_total"), 100)
        buckets = [v for (n, l), v in values.items() if n == "coproxy_upstream_latency_seconds_bucket"]
        self.assertEqual(max(buckets), 2)

    def test_cors_preflight_and_headers(self):
        proxy = self.start_proxy(api_key="k", cors_origins=["https://app.example"])
        client = RawClient(proxy.port)
        self.addCleanup(client.close)
        client.send(b"OPTIONS /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nOrigin: https://app.example\r\n"
                    b"Access-Control-Request-Method: POST\r\nAccess-Control-Request-Headers: authorization, content-type\r\n\r\n")
        status, headers, _ = client.response()
        self.assertEqual(status, 204)
        self.assertEqual(headers["access-control-allow-origin"], "https://app.example")
        self.assertEqual(headers["access-control-allow-headers"], "authorization, content-type")
        self.assertIn("POST", headers["access-control-allow-methods"])
        self.assertEqual(headers["vary"], "Origin")
        status, headers, _ = self.request("POST", "/v1/chat/completions", chat_body(), {
            "Origin": "https://app.example", "Authorization": "Bearer k"}, port=proxy.port)
        self.assertEqual((status, headers["Access-Control-Allow-Origin"]), (200, "https://app.example"))
        status, headers, _ = self.request("POST", "/v1/chat/completions", chat_body(), {
            "Origin": "https://evil.example", "Authorization": "Bearer k"}, port=proxy.port)
        self.assertEqual((status, headers.get("Access-Control-Allow-Origin")), (403, None))
        status, headers, _ = self.request("OPTIONS", "/v1/models", headers={"Origin": "https://app.example",
                                                                            "Access-Control-Request-Method": "GET"})
        self.assertEqual((status, headers.get("Access-Control-Allow-Origin")), (403, None))  # none unless --cors-origin

    def test_model_aliases_on_every_route(self):
        proxy = self.start_proxy(model_aliases={"gpt-4": "gpt-4.1", "fast": "claude-haiku-4.5"})
        self.assertEqual(self.request("POST", "/v1/chat/completions", chat_body(model="gpt-4"), port=proxy.port)[0], 200)
        self.assertEqual(json.loads(self.fake.requests_to("/chat/completions")[-1][3])["model"], "gpt-4.1")
        status, _, _ = self.request("POST", "/v1/messages", {"model": "fast", "max_tokens": 5,
                                                             "messages": [{"role": "user", "content": "x"}]}, port=proxy.port)
        self.assertEqual((status, json.loads(self.fake.requests_to("/chat/completions")[-1][3])["model"]),
                         (200, "claude-haiku-4.5"))
        listed = json.loads(self.request("GET", "/v1/models", port=proxy.port)[2])["data"]
        self.assertIn({"id": "gpt-4", "object": "model", "created": 0, "owned_by": "coproxy-alias", "alias_of": "gpt-4.1"},
                      listed)
        self.assertEqual(json.loads(self.request("GET", "/v1/models/fast", port=proxy.port)[2])["alias_of"],
                         "claude-haiku-4.5")



def ndjson(body):
    """The objects of an NDJSON body (each line one JSON object)."""
    return [json.loads(line) for line in body.decode().split("\n") if line]


class TestOllamaAPI(ProxyTestCase):
    def test_probe_version_tags_show_and_ps(self):
        status, headers, body = self.request("GET", "/")
        self.assertEqual((status, headers["Content-Type"], body), (200, "text/plain; charset=utf-8",
                                                                   b"Ollama is running"))
        self.assertEqual(self.raw().send(b"HEAD / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").response(head_only=True)[0],
                         200)
        version = json.loads(self.request("GET", "/api/version")[2])["version"]
        self.assertGreaterEqual(tuple(map(int, version.split("."))), (0, 6, 4))
        tags = json.loads(self.request("GET", "/api/tags")[2])["models"]
        self.assertEqual([t["model"] for t in tags], [i + ":latest" for i in CATALOG_IDS + ["auto"]])
        status, _, body = self.request("POST", "/api/show", {"model": "claude-sonnet-4.5:latest"},
                                       headers={"Authorization": "Bearer "})  # VS Code's empty key
        show = json.loads(body)
        self.assertEqual((status, show["capabilities"], show["model_info"]["claude-sonnet-4.5.context_length"]),
                         (200, ["completion", "tools", "vision", "thinking"], 200000))
        self.assertEqual(json.loads(self.request("POST", "/api/show", {"name": "gpt-4.1"})[2])["details"]["family"],
                         "gpt-4.1")
        self.assertEqual(json.loads(self.request("GET", "/api/ps")[2]), {"models": []})
        # VS Code's Ollama provider chats on /v1/chat/completions with the listed name, tag and all
        self.assertEqual(self.request("POST", "/v1/chat/completions", chat_body(model="gpt-4.1:latest"))[0], 200)
        self.assertEqual(len(self.fake.requests_to("/models")), 1)
        proxy = self.start_proxy(model_aliases={"fast": "claude-haiku-4.5"})
        tags = json.loads(self.request("GET", "/api/tags", port=proxy.port)[2])["models"]
        self.assertEqual(tags[-1]["model"], "fast:latest")
        self.assertEqual(self.request("POST", "/api/chat", {"model": "fast:latest", "stream": False, "messages": [
            {"role": "user", "content": "x"}]}, port=proxy.port)[0], 200)
        self.assertEqual(json.loads(self.fake.requests_to("/chat/completions")[-1][3])["model"], "claude-haiku-4.5")

    def test_chat_whole_and_streamed_with_the_usual_accounting(self):
        status, headers, body = self.request("POST", "/api/chat", {"model": "gpt-4.1:latest", "stream": False,
                                                                   "messages": [{"role": "user", "content": "hi"}]})
        answer = json.loads(body)
        self.assertEqual((status, headers["Content-Type"], answer["model"], answer["message"], answer["done"],
                          answer["done_reason"], answer["prompt_eval_count"], answer["eval_count"]),
                         (200, "application/json", "gpt-4.1:latest", {"role": "assistant", "content": "echo: hi"},
                          True, "stop", 3, 2))
        self.assertIsInstance(answer["total_duration"], int)
        sent = self.fake.requests_to("/chat/completions")[-1]
        self.assertEqual((sent[2]["x-initiator"], json.loads(sent[3])["model"]), ("user", "gpt-4.1"))
        self.fake.stream(chunk("Hel"), chunk("lo"), chunk(None, "length"), COST_CHUNK, DONE)
        status, headers, body = self.request("POST", "/api/generate", {"model": "gpt-4.1", "prompt": "hi"})
        lines = ndjson(body)
        self.assertEqual((status, headers["Content-Type"]), (200, "application/x-ndjson"))
        self.assertEqual([line["response"] for line in lines], ["Hel", "lo", ""])
        self.assertEqual([line["done"] for line in lines], [False, False, True])
        self.assertEqual((lines[-1]["done_reason"], lines[-1]["eval_count"]), ("length", 2))
        self.assertTrue(json.loads(self.fake.requests_to("/chat/completions")[-1][3])["stream"])
        self.assertTrue(wait_for(lambda: any("POST /api/generate 200" in l and "credits=4.5" in l for l in LOGS.lines)))
        credits = self.proxy.app.metrics.counters[("coproxy_ai_credits_total", (("model", "gpt-4.1"),))]
        self.assertAlmostEqual(credits, 4.5 + 0.0022)  # as reported, plus the first answer's estimate
        self.assertEqual(self.proxy.app.metrics.counters[("coproxy_requests_total", (
            ("route", "/api/generate"), ("status", 200), ("model", "gpt-4.1"), ("initiator", "user")))], 1)
        status, _, body = self.request("POST", "/api/generate", {"model": "gpt-4.1", "keep_alive": 0})
        self.assertEqual((json.loads(body)["done_reason"], len(self.fake.requests_to("/chat/completions"))),
                         ("unload", 2))

    def test_responses_only_models_go_to_responses(self):
        body = {"model": "gpt-5.1-codex:latest", "stream": False, "messages": [{"role": "user", "content": "hi"}]}
        status, _, data = self.request("POST", "/api/chat", body)
        self.assertEqual((status, json.loads(data)["message"]["content"]), (200, "codex says hi"))
        self.fake.stream(sse({"type": "response.output_text.delta", "delta": "Hi"}),
                         sse({"type": "response.output_item.added", "output_index": 1, "item": {
                             "type": "function_call", "call_id": "call_9", "name": "ls"}}),
                         sse({"type": "response.function_call_arguments.delta", "output_index": 1,
                              "delta": "{\"d\": \".\"}"}),
                         sse({"type": "response.completed", "response": {"status": "completed", "usage": {
                             "input_tokens": 6, "output_tokens": 2}}}))
        lines = ndjson(self.request("POST", "/api/chat", dict(body, stream=True))[2])
        self.assertEqual(lines[1]["message"]["tool_calls"], [{"id": "call_9", "function": {
            "index": 0, "name": "ls", "arguments": {"d": "."}}}])
        self.assertEqual((lines[-1]["done"], lines[-1]["prompt_eval_count"]), (True, 6))
        self.assertEqual(len(self.fake.requests_to("/responses")), 2)
        self.assertEqual(self.fake.requests_to("/chat/completions"), [])

    def test_embed_and_the_older_embeddings(self):
        answer = json.loads(self.request("POST", "/api/embed", {"model": "text-embedding-3-small",
                                                                "input": ["a", "bb"]})[2])
        self.assertEqual((answer["embeddings"], answer["prompt_eval_count"]), ([[0.5, -1.25, 1.0], [0.5, -1.25, 2.0]], 4))
        answer = json.loads(self.request("POST", "/api/embeddings", {"model": "text-embedding-3-small:latest",
                                                                     "prompt": "abc"})[2])
        self.assertEqual(answer, {"embedding": [0.5, -1.25, 3.0]})
        self.assertEqual(json.loads(self.fake.requests_to("/embeddings")[-1][3])["input"], ["abc"])

    def test_errors_are_ollamas_and_the_guard_still_applies(self):
        def error(method, path, body=None, headers=None, port=None):
            status, headers, data = self.request(method, path, body, headers, port)
            self.assertEqual(list(json.loads(data)), ["error"], data)
            return status, json.loads(data)["error"]
        status, message = error("POST", "/api/chat", {"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]})
        self.assertEqual(status, 404)
        self.assertIn("gpt-9", message)
        self.assertEqual(error("POST", "/api/chat", {"model": "gpt-4.1", "messages": "hi"})[0], 400)
        self.assertEqual(error("POST", "/api/show", {})[0], 400)
        self.assertEqual(error("GET", "/api/pull")[0], 404)
        self.assertEqual(error("GET", "/api/chat")[0], 405)
        self.fake.routes[("POST", "/chat/completions")] = lambda h, b: h.send_json(
            429, {"error": {"message": "slow down", "code": "rate_limited"}}, [("Retry-After", "30")])
        self.assertEqual(error("POST", "/api/chat", {"model": "gpt-4.1", "messages": [
            {"role": "user", "content": "x"}]}), (429, "slow down"))
        self.assertEqual(error("GET", "/api/tags", headers={"Host": "evil.example"})[0], 403)
        proxy = self.start_proxy(api_key="k")
        self.assertEqual(error("GET", "/api/tags", headers={"Authorization": "Bearer "}, port=proxy.port)[0], 401)
        self.assertEqual(self.request("GET", "/api/tags", headers={"Authorization": "Bearer k"}, port=proxy.port)[0],
                         200)
        proxy = self.start_proxy(api_surface=coproxy._api_surface("chat"))
        self.assertEqual(error("GET", "/api/tags", port=proxy.port)[0], 404)
        # no "Ollama is running" probe answer either, or a client would find a server and fail
        self.assertEqual(error("GET", "/", port=proxy.port)[0], 404)

    def test_a_cut_stream_ends_with_an_error_line_and_silence_with_empty_objects(self):
        self.fake.stream(chunk("par"), "cut")
        lines = ndjson(self.request("POST", "/api/chat", {"model": "gpt-4.1", "messages": [
            {"role": "user", "content": "x"}]})[2])
        self.assertEqual((lines[0]["message"]["content"], list(lines[-1])), ("par", ["error"]))
        self.assertIn("mid-stream", lines[-1]["error"])
        proxy = self.start_proxy(ping_seconds=0.05)
        gate = threading.Event()
        self.fake.stream(chunk("a"), gate, chunk(None, "stop"), DONE)
        client = RawClient(proxy.port)
        self.addCleanup(client.close)
        client.send(post("/api/chat", json.dumps({"model": "gpt-4.1", "messages": [
            {"role": "user", "content": "x"}]}).encode()))
        client.response(head_only=True)
        read_chunk(client.file)
        ping = json.loads(read_chunk(client.file))
        self.assertEqual((ping["message"], ping["done"]), ({"role": "assistant", "content": ""}, False))
        gate.set()
        self.assertTrue(ndjson(read_rest(client.file))[-1]["done"])


class TestAbuse(ProxyTestCase):
    """What one hostile local client can do, bounded: no stall of the others, no unbounded memory,
    no burnt GitHub quota, no details for callers the API would refuse."""

    def _healthz_latencies_while(self, attack):
        """Max seconds /healthz took, polled on a kept-alive connection while ``attack`` runs."""
        done = threading.Event()
        results = []

        def run():
            try:
                results.append(attack())
            finally:
                done.set()
        client = self.raw()
        client.send(HEALTH).response()
        thread = threading.Thread(target=run)
        thread.start()
        worst = 0.0
        while not done.is_set():
            started = time.monotonic()
            self.assertEqual(client.send(HEALTH).response()[0], 200)
            worst = max(worst, time.monotonic() - started)
            done.wait(0.01)
        thread.join(10)
        return worst, results

    def test_a_small_gzip_bomb_stalls_no_other_client(self):
        bomb = gzip.compress(b'{"model": "gpt-4.1", "messages": [' + b"[]," * (4 << 20) + b"[]]}", 9)  # 12 KB -> 12 MiB
        self.assertLess(len(bomb), 64 << 10)

        def attack():
            answers = []
            for _ in range(2):
                client = RawClient(self.proxy.port, timeout=30)
                client.send(post("/v1/chat/completions", bomb, b"Content-Encoding: gzip\r\n"))
                answers.append(client.response())
                client.close()
            return answers
        worst, (answers,) = self._healthz_latencies_while(attack)
        self.assertLess(worst, 0.5)  # 3 s here (10-14 s at 33 MB) when the scan ran on the event loop
        for status, _, body in answers:
            self.assertEqual(status, 400, body[:300])
            self.assertIn("more than 500000 arrays, objects and values", json.loads(body)["error"]["message"])

    def test_checking_and_planning_large_requests_stalls_no_other_client(self):
        # Parsing, checking and planning of a heavy body run in a worker on every route; a
        # Responses input past 20,000 items is refused before any of it.
        parts = [{"type": "input_text", "text": "x"}] * 8
        heavy = json.dumps({"model": "gpt-4.1", "store": False,
                            "input": [{"role": "user", "content": parts}] * 15000}).encode()
        too_many = json.dumps({"model": "gpt-4.1", "input": [{}] * 20001}).encode()
        many = json.dumps({"model": "gpt-4.1", "store": False, "input": [{}] * 19999}).encode()

        def attack():  # all at once: the heavy ones are worked on one at a time
            answers = {}

            def send(index, body):
                client = RawClient(self.proxy.port, timeout=30)
                client.send(post("/v1/responses", body))
                answers[index] = client.response()
                client.close()
            threads = [threading.Thread(target=send, args=item)
                       for item in enumerate([too_many, heavy] + [many] * 6)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(30)
            return [answers.get(index) for index in range(len(threads))]
        worst, (answers,) = self._healthz_latencies_while(attack)
        # 0.27-0.43 s with checking and planning on the loop, or in workers side by side
        # (contending for the GIL); 0.03-0.07 s one at a time, and up to 0.155 s on Python 3.8
        # under -X dev in CI, which a 0.15 s bound failed once
        self.assertLess(worst, 0.25)
        self.assertEqual([status for status, _, _ in answers], [400] + [200] * 7, answers[0][2][:300])
        error = json.loads(answers[0][2])["error"]
        self.assertEqual((error["param"], error["code"]), ("input", "too_many_items"))
        self.assertIn("input holds 20001 items; at most 20000", error["message"])

    def test_bodies_in_flight_share_one_budget_and_slow_ones_are_shed_at_the_cap(self):
        server = self.proxy.server
        server.max_body_bytes_in_flight = 3 << 20
        size = 2 << 20
        body = json.dumps(chat_body("hi")).encode()
        body += b" " * (size - len(body))
        slow = RawClient(self.proxy.port)
        self.addCleanup(slow.close)
        whole = post("/v1/chat/completions", body)
        slow.send(whole[:len(whole) - size + 65536])  # the head and 64 KiB of the body
        self.assertTrue(wait_for(lambda: server.body_bytes_in_flight == size))
        second = RawClient(self.proxy.port)
        self.addCleanup(second.close)
        second.send(post("/v1/messages", body)[:-size].replace(b"Host:", b"anthropic-version: 2023-06-01\r\nHost:"))
        status, headers, answer = second.response()
        self.assertEqual((status, headers.get("retry-after")), (503, "2"), answer[:300])
        error = json.loads(answer)["error"]
        self.assertEqual(error["type"], "overloaded_error")  # in the caller's dialect
        self.assertIn("request bodies at once", error["message"])
        slow.send(whole[len(whole) - size + 65536:])
        self.assertEqual(slow.response()[0], 200)
        self.assertEqual(server.body_bytes_in_flight, 0)
        # At the connection cap, one still sending its body is closed to make room for a newcomer.
        slow.close()
        trickling = RawClient(self.proxy.port)
        self.addCleanup(trickling.close)
        trickling.send(whole[:len(whole) - size + 1024])
        self.assertTrue(wait_for(lambda: server.body_bytes_in_flight == size and len(server._connections) == 1))
        server.max_connections = 1
        self.assertEqual(self.request("GET", "/healthz")[0], 200)
        self.assertTrue(trickling.closed_by_server())
        self.assertTrue(wait_for(lambda: server.body_bytes_in_flight == 0))

    def connect_past_a_full_backlog(self, port):
        """A connection to a server whose accept queue may be full: the kernel drops a SYN it
        has no room for and sends it again only a second later (3-8 s a test), so a connect not
        done in 20 ms starts over on a new socket (meanwhile the server empties its queue)."""
        deadline = time.monotonic() + 10
        while True:
            sock = socket.socket()
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", port))
            _, writable, _ = select.select([], [sock], [], 0.02)
            if writable and not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                sock.setblocking(True)
                return sock
            sock.close()
            self.assertLess(time.monotonic(), deadline, "the server accepts no connection")

    @unittest.skipUnless(sys.platform.startswith("linux"), "descriptor limits as Linux has them")
    def test_idle_connections_past_the_descriptor_limit_cannot_lock_out_a_client(self):
        import resource
        env = child_env(GHCP_GITHUB_TOKEN="ghu_testtoken1234567890", GHCP_PROXY_API_KEY="k")
        process = subprocess.Popen(
            COPROXY_MODULE + ["serve", "--port", "0", "--github-url", self.fake.url,
                              "--github-api-url", self.fake.url,
                              "--state-dir", os.path.join(self.tmp, "limited")],
            stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=HERE, env=env,
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128)))
        self.addCleanup(process.stderr.close)
        self.addCleanup(lambda: process.poll() is None and (process.kill(), process.wait()))
        line = ""
        while "listening on" not in line and line is not None:  # warnings may come first
            line = process.stderr.readline() or None
        port = int(re.search(r"listening on http://127.0.0.1:(\d+)", line or "").group(1))
        idle = []
        for number in range(150):  # past its 128 descriptors: idle, or a head never finished
            sock = self.connect_past_a_full_backlog(port)
            self.addCleanup(sock.close)
            if number % 2:
                sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            idle.append(sock)
        status, _, body = http_request(port, "POST", "/v1/chat/completions", chat_body(),
                                       {"Authorization": "Bearer k"}, timeout=5)
        self.assertEqual(status, 200, body[:300])
        process.send_signal(signal.SIGTERM)
        log = process.communicate(timeout=10)[1]
        self.assertEqual(process.returncode, 0, log[-3000:])
        self.assertNotIn("Traceback", log)
        # once a minute, not per accept
        self.assertLessEqual(log.count("at the connection cap"), 1, log[-2000:])
        self.assertLessEqual(log.count("out of descriptors"), 1, log[-2000:])

    @unittest.skipUnless(sys.platform.startswith("linux"), "descriptor limits as Linux has them")
    def test_the_soft_descriptor_limit_is_raised_to_the_hard_one(self):
        import resource
        result = subprocess.run([sys.executable, "-c",
                                 "import coproxy, resource; coproxy.raise_descriptor_limit(); "
                                 "print(resource.getrlimit(resource.RLIMIT_NOFILE))"],
                                capture_output=True, text=True, cwd=HERE, env=child_env(),
                                timeout=20,
                                preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (64, 256)))
        self.assertEqual(result.stdout.strip(), "(256, 256)", result.stderr)
        self.assertEqual((coproxy.connection_cap(256), coproxy.connection_cap(1 << 20), coproxy.connection_cap(None)),
                         (80, 10000, 10000))

    def test_usage_asks_github_once_for_many_callers(self):
        gate = threading.Event()
        self.addCleanup(gate.set)
        original = self.fake.routes[("GET", "/copilot_internal/user")]

        def slow_user(handler, body):  # every caller arrives while the first call is out
            gate.wait(5)
            original(handler, body)
        self.fake.routes[("GET", "/copilot_internal/user")] = slow_user
        results = []
        threads = [threading.Thread(target=lambda method=method: results.append(self.request(method, "/usage")))
                   for method in ["GET"] * 40 + ["HEAD"] * 10]
        for thread in threads:
            thread.start()
        self.assertTrue(wait_for(lambda: len(self.fake.requests_to("/copilot_internal/user")) >= 1))
        gate.set()
        for thread in threads:
            thread.join(10)
        self.assertEqual([status for status, _, _ in results], [200] * 50)
        self.assertEqual(self.request("GET", "/usage")[0], 200)  # and one more, a moment later
        self.assertEqual(len(self.fake.requests_to("/copilot_internal/user")), 1)

    def test_a_failed_upstream_call_frees_its_payload_without_the_garbage_collector(self):
        plans = []
        original = coproxy.plan_chat
        self.addCleanup(setattr, coproxy, "plan_chat", original)
        coproxy.plan_chat = lambda *args: plans.append(original(*args)) or plans[-1]
        self.fake.routes[("POST", "/chat/completions")] = lambda h, b: h.send_json(
            400, {"error": {"message": "prompt too long", "code": "model_max_prompt_tokens_exceeded"}})
        self.assertEqual(self.request("POST", "/v1/chat/completions", chat_body())[0], 400)  # token and catalogue in place
        gc.collect()  # what earlier tests left; from here on only reference counts free anything
        gc.disable()
        self.addCleanup(gc.enable)
        refs = []
        for answer in ("refused", "unreachable"):
            if answer == "unreachable":  # a hang-up before any answer: a network error in the worker
                self.fake.routes[("POST", "/chat/completions")] = lambda h, b: (
                    setattr(h, "close_connection", True), h.connection.shutdown(socket.SHUT_RDWR))
            status, _, body = self.request("POST", "/v1/chat/completions", chat_body("x" * 100000))
            self.assertEqual(status, 400 if answer == "refused" else 502, body[:300])
            refs.append(weakref.ref(plans.pop()))
        self.assertTrue(wait_for(lambda: all(ref() is None for ref in refs), 2),
                        [gc.get_referrers(ref()) for ref in refs if ref() is not None][:1])

    def test_healthz_tells_details_only_to_callers_the_api_would_serve(self):
        def health(port, headers):
            status, _, body = http_request(port, "GET", "/healthz", headers=headers)
            self.assertEqual(status, 200)
            return json.loads(body)
        bare = {"status": "ok"}
        for headers in ({"Host": "rebound.example"}, {"Origin": "https://page.example"},
                        {"Sec-Fetch-Site": "cross-site"}):
            self.assertEqual(health(self.proxy.port, headers), bare, headers)
        self.assertIn("auth", health(self.proxy.port, {}))
        keyed = self.start_proxy(api_key="k")
        self.assertEqual(health(keyed.port, {}), bare)
        self.assertEqual(health(keyed.port, {"Authorization": "Bearer wrong"}), bare)
        detailed = health(keyed.port, {"Authorization": "Bearer k"})
        self.assertEqual((detailed["status"], detailed["auth"]["ready"]), ("ok", True))

    def test_a_compressed_body_has_its_own_lower_cap(self):
        # 20 MiB, under --max-body-mb
        inflated = b'{"model": "gpt-4.1", "messages": [], "pad": "' + b"x" * (20 << 20) + b'"}'
        status, _, body = self.raw().send(post("/v1/chat/completions", gzip.compress(inflated, 1),
                                               b"Content-Encoding: gzip\r\n")).response()
        self.assertEqual(status, 413, body[:300])
        self.assertIn("once decompressed (the lower of --max-body-mb and 16 MiB)",
                      json.loads(body)["error"]["message"])


class Mutator:
    """Seeded mutations of a JSON document: values of another type, keys removed or added with
    names coproxy reads, deep nesting, lone surrogates, control characters, and broken bytes."""

    FIELDS = ("model", "messages", "content", "role", "type", "text", "image_url", "url", "source", "stream",
              "stream_options", "include_usage", "n", "tools", "function", "name", "parameters", "tool_choice",
              "tool_calls", "arguments", "input", "output", "reasoning", "effort", "output_config", "thinking",
              "budget_tokens", "max_tokens", "max_completion_tokens", "system", "tool_result", "tool_use_id",
              "encoding_format", "dimensions", "metadata", "user_id", "response_format", "json_schema",
              "reasoning_effort", "anthropic_beta", "eager_input_streaming", "context_management", "instructions")
    VALUES = (None, True, False, 0, -1, 2 ** 70, 1e308, 0.5, "", "x", "\ud800", "\udfff tail", "a\x00\r\nb",
              [], {}, [None], [1, 2], {"type": {}}, {"type": 7}, {"type": "image_url", "image_url": "http://[::1"},
              {"type": "image_url", "image_url": {"url": "http://127.0.0.1:1/x.png"}},
              {"type": "image", "source": {"type": "url", "url": "https://[bad"}}, "data:image/png;base64,AA",
              [{"role": {}}], [{"role": "user", "content": [{"type": "text"}]}], "high", "xhigh", "gpt-5.1-codex",
              "claude-opus-4.6", "gemini-9", {"effort": ["max"]})

    #: Values of the wrong type (or null) that every field gets in turn, besides the random ones.
    REPLACEMENTS = (None, {}, [], 7, "x")

    def __init__(self, seed):
        self.rng = random.Random(seed)

    @staticmethod
    def _places(node, out):
        if isinstance(node, dict):
            for key in list(node):
                out.append((node, key))
                Mutator._places(node[key], out)
        elif isinstance(node, list):
            for index in range(len(node)):
                out.append((node, index))
                Mutator._places(node[index], out)
        return out

    @classmethod
    def each_field_replaced(cls, document, values_per_field=len(REPLACEMENTS)):
        """Bodies with one field, any field, set to each of REPLACEMENTS: the systematic part.
        With fewer ``values_per_field``, each field gets that many, in turn, so that every value
        still meets many fields."""
        kinds = len(cls.REPLACEMENTS)
        for place in range(len(cls._places(document, []))):
            for step in range(values_per_field):
                value = cls.REPLACEMENTS[(place + step) % kinds]
                doc = copy.deepcopy(document)
                container, key = cls._places(doc, [])[place]
                container[key] = copy.deepcopy(value)
                yield json.dumps(doc).encode()

    def mutate(self, document):
        rng, doc = self.rng, copy.deepcopy(document)
        for _ in range(rng.randint(1, 4)):
            places = self._places(doc, [])
            if not places:
                break
            container, key = rng.choice(places)
            roll = rng.random()
            if roll < 0.45:
                container[key] = copy.deepcopy(rng.choice(self.VALUES))
            elif roll < 0.6 and isinstance(container, dict):
                del container[key]
            elif roll < 0.7:
                container[key] = [container[key]] if rng.random() < 0.5 else {rng.choice(self.FIELDS): container[key]}
            elif isinstance(container, dict):
                container[rng.choice(self.FIELDS)] = copy.deepcopy(rng.choice(self.VALUES))
            else:
                container.append(copy.deepcopy(rng.choice(self.VALUES + tuple(container))))
        raw = json.dumps(doc).encode()
        roll = rng.random()
        if roll < 0.03:
            raw = b"[" * 400 + raw + b"]" * 400
        elif roll < 0.06:
            raw = raw[:rng.randint(0, len(raw))]
        elif roll < 0.08:
            raw = raw.replace(b'"', b"'", 1)
        return raw


FUZZ_SEEDS = {
    "/v1/chat/completions": [
        {"model": "gpt-4.1", "stream": False, "n": 1, "max_tokens": 5, "reasoning_effort": "high", "tool_choice": "auto",
         "stream_options": {"include_usage": True}, "response_format": {"type": "json_object"},
         "tools": [{"type": "function", "function": {"name": "ls", "parameters": {"type": "object"}}}],
         "messages": [{"role": "system", "content": "s"},
                      {"role": "user", "content": [{"type": "text", "text": "hi"},
                                                   {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}]},
                      {"role": "assistant", "content": None, "tool_calls": [
                          {"id": "c", "type": "function", "function": {"name": "ls", "arguments": "{}"}}]},
                      {"role": "tool", "tool_call_id": "c", "content": "x"}]}],
    "/v1/messages": [
        {"model": "claude-haiku-4.5", "max_tokens": 50, "system": [{"type": "text", "text": "s"}], "stream": False,
         "tools": [{"name": "ls", "input_schema": {"type": "object"}}], "tool_choice": {"type": "auto"},
         "thinking": {"type": "enabled", "budget_tokens": 2000}, "output_config": {"effort": "high"},
         "metadata": {"user_id": "u"}, "stop_sequences": ["x"], "temperature": 0.5,
         "messages": [{"role": "user", "content": [{"type": "text", "text": "t"}, {"type": "image", "source": {
             "type": "base64", "media_type": "image/png", "data": "AA"}}]},
                      {"role": "assistant", "content": [{"type": "thinking", "thinking": "x", "signature": "s"},
                                                        {"type": "tool_use", "id": "t", "name": "ls", "input": {}}]},
                      {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": [
                          {"type": "text", "text": "r"}]}]}]}],
    "/v1/responses": [
        {"model": "gpt-5.1-codex", "stream": False, "reasoning": {"effort": "high"}, "instructions": "i",
         "tools": [{"type": "function", "name": "f", "parameters": {}}],
         "input": [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "x"},
                                                                   {"type": "input_image", "image_url": "data:,"}]},
                   {"type": "function_call_output", "call_id": "c", "output": "o"}]}],
    "/v1/embeddings": [{"model": "text-embedding-3-small", "input": ["a", "b"], "encoding_format": "base64",
                        "dimensions": 2}],
    "/v1/messages/count_tokens": [{"model": "claude", "system": "s", "tools": [{"name": "t", "input_schema": {}}],
                                   "messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}]}],
}
FUZZ_SEEDS["/v1/responses"] += [dict(
    FUZZ_SEEDS["/v1/responses"][0], model=model,
    tools=[{"type": "function", "name": "f", "parameters": {}}, {"type": "custom", "name": "apply_patch"}],
    input=[{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "x"}]},
           {"type": "reasoning", "summary": [], "encrypted_content": coproxy.pack_thinking("t", "s")},
           {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
           {"type": "custom_tool_call", "call_id": "d", "name": "apply_patch", "input": "p"},
           {"type": "function_call_output", "call_id": "c", "output": [{"type": "input_text", "text": "o"}]}])
    for model in ("gpt-4.1", "claude-sonnet-4.5")]  # translated to chat and to Messages
FUZZ_SEEDS["/v1/responses/compact"] = FUZZ_SEEDS["/v1/responses"]
for _seed in list(FUZZ_SEEDS["/v1/chat/completions"]):
    FUZZ_SEEDS["/v1/chat/completions"].append(dict(_seed, model="gpt-5.1-codex"))
FUZZ_SEEDS["/v1/messages"] += [dict(FUZZ_SEEDS["/v1/messages"][0], model=m) for m in ("claude-opus-4.6", "gpt-5.1-codex")]
FUZZ_SEEDS["/api/chat"] = [
    {"model": model, "stream": False, "think": "high", "format": {"type": "object"},
     "options": {"temperature": 0.1, "top_p": 0.5, "num_predict": 9, "stop": ["x"], "seed": 1},
     "tools": [{"type": "function", "function": {"name": "ls", "parameters": {"type": "object"}}}],
     "messages": [{"role": "system", "content": "s"},
                  {"role": "user", "content": "hi", "images": [base64.b64encode(PNG[:24]).decode()]},
                  {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "ls", "arguments": {}}}]},
                  {"role": "tool", "content": "x", "tool_name": "ls"}]}
    for model in ("claude-sonnet-4.5:latest", "gpt-5.1-codex")]
FUZZ_SEEDS["/api/generate"] = [{"model": "gpt-4.1", "prompt": "p", "system": "s", "stream": False, "format": "json",
                                "images": [base64.b64encode(PNG[:24]).decode()], "options": {"num_predict": 3}}]
FUZZ_SEEDS["/api/embed"] = [{"model": "text-embedding-3-small", "input": ["a", "b"], "dimensions": 2}]


def robust_upstream(fake):
    """Copilot routes that answer every request well, whatever its body: a 5xx in the fuzz test
    is then coproxy's own."""
    def answer(kind):
        def route(handler, payload):
            stream = isinstance(payload, dict) and payload.get("stream") is True
            if kind == "chat":
                if stream:
                    return fake.stream(chunk("x"), chunk(None, "stop"), USAGE_CHUNK, DONE)(handler, payload)
                handler.send_json(200, {"id": "c", "choices": [{"index": 0, "finish_reason": "stop", "message": {
                    "role": "assistant", "content": "ok"}}], "usage": {"prompt_tokens": 1, "completion_tokens": 1}})
            elif kind == "messages":
                if stream:
                    return fake.stream(anthropic_event("message_start", {"type": "message_start", "message": {}}),
                                       anthropic_event("message_stop", {"type": "message_stop"}))(handler, payload)
                handler.send_json(200, {"id": "m", "type": "message", "content": [], "usage": {}})
            elif kind == "responses":
                if stream:
                    return fake.stream(sse({"type": "response.completed", "response": {"status": "completed"}}))(
                        handler, payload)
                handler.send_json(200, {"id": "r", "object": "response", "status": "completed", "output": []})
            else:
                handler.send_json(200, {"data": [{"embedding": [0.5, 1.5]}], "usage": {"prompt_tokens": 1}})
        return route
    for path, kind in (("/chat/completions", "chat"), ("/v1/messages", "messages"), ("/responses", "responses"),
                       ("/embeddings", "embeddings")):
        fake.routes[("POST", path)] = answer(kind)


class TestFuzz(ProxyTestCase):
    """Seeded mutations of valid bodies on every route: never a 5xx, never a traceback."""

    # The full counts (about a second per route on this project's 2-core machines) when
    # TEST_COPROXY_FUZZ=full, as .ci/run sets it; the everyday run takes a fortieth of the random
    # bodies, one wrong-typed value per field (not all five) and a third of the upstream answers.
    FULL = os.environ.get("TEST_COPROXY_FUZZ") == "full"
    COUNT = 2000 if FULL else 50                                # random bodies per route
    VALUES_PER_FIELD = len(Mutator.REPLACEMENTS) if FULL else 1
    UPSTREAM_ANSWERS = 300 if FULL else 100     # mutated answers per route, half of them streamed

    def setUp(self):
        super().setUp()
        robust_upstream(self.fake)

    def test_mutated_bodies_get_4xx_or_an_answer(self):
        started, statuses, by_route = time.monotonic(), collections.Counter(), {}
        for number, (path, seeds) in enumerate(sorted(FUZZ_SEEDS.items())):
            mutator = Mutator(2026 + number)
            conn = http.client.HTTPConnection("127.0.0.1", self.proxy.port, timeout=10)
            self.addCleanup(conn.close)
            bodies = [mutator.mutate(seeds[index % len(seeds)]) for index in range(self.COUNT)]
            bodies += [body for seed in seeds
                       for body in Mutator.each_field_replaced(seed, self.VALUES_PER_FIELD)]
            for body in bodies:
                conn.request("POST", path, body, {"Content-Type": "application/json"})
                response = conn.getresponse()
                data = response.read()
                statuses[response.status] += 1
                by_route.setdefault(path, collections.Counter())[response.status] += 1
                self.assertLess(response.status, 500, (path, body[:300], data[:300]))
                # an envelope: OpenAI's or Anthropic's, or Ollama's {"error": "..."}
                if response.status >= 400:
                    self.assertIn(b'{"error":"' if path.startswith("/api/") else b'"message"', data)
                if response.getheader("Connection") == "close":
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", self.proxy.port, timeout=10)
                    self.addCleanup(conn.close)
        self.assertEqual(LOGS.failures(), [])
        for path, counts in by_route.items():  # each route saw both answers and refusals
            refused = sum(v for k, v in counts.items() if k >= 400)
            self.assertTrue(counts[200] and refused, (path, counts))
        FUZZ_FIGURES.update(inputs=sum(statuses.values()), statuses=dict(statuses),
                            seconds=round(time.monotonic() - started, 1))

    def test_mutated_upstream_answers_give_200_or_502(self):
        mutator, answers = Mutator(7), []
        call = {"id": "t", "function": {"name": "f", "arguments": "{}"}}
        good = {"id": "c", "model": "gpt-4.1", "choices": [{
            "index": 0, "finish_reason": "stop",
            "message": {"role": "assistant", "content": "ok", "tool_calls": [call]}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1,
                      "prompt_tokens_details": {"cached_tokens": 0}}}
        stream_chunk = {"id": "c", "created": 1, "model": "m", "choices": [{
            "index": 0, "delta": {"content": "x", "tool_calls": [
                {"index": 0, "id": "t", "function": {"name": "f", "arguments": "{"}}]},
            "finish_reason": None}]}
        self.fake.routes[("POST", "/chat/completions")] = lambda h, p: (
            h.send_body(200, answers.pop(0), "application/json") if not p.get("stream") else
            self.fake.stream(b"data: " + answers.pop(0) + b"\n\n", chunk(None, "stop"), DONE)(h, p))
        for index in range(self.UPSTREAM_ANSWERS):
            messages = {"max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}
            for model, route, body in (("gpt-4.1", "/v1/chat/completions", chat_body()),
                                       ("claude-haiku-4.5", "/v1/messages", messages)):
                stream = index % 2 == 1
                answers.append(mutator.mutate(stream_chunk if stream else good))
                status, _, data = self.request("POST", route,
                                               dict(body, model=model, stream=stream))
                self.assertIn(status, (200, 502), data[:300])
        self.assertEqual(LOGS.failures(), [])


FUZZ_FIGURES = {}
class TestDashboard(ProxyTestCase):
    """History of proxied requests, /usage?by= views, /dashboard/data and the page at GET /."""

    def wait_count(self, proxy, count):
        ledger = proxy.app.dashboard.ledger
        self.assertTrue(wait_for(lambda: ledger.count >= count), ledger.count)

    def data(self, proxy, headers=None):
        status, _, body = self.request("GET", "/dashboard/data", headers=headers, port=proxy.port)
        self.assertEqual(status, 200, body)
        return json.loads(body)

    def access_lines(self):
        return [r for r in LOGS.records if r.name == "coproxy.access"]

    def test_finished_requests_are_kept_without_their_text_and_survive_a_restart(self):
        state = os.path.join(self.tmp, "kept")
        proxy = self.start_proxy(state_dir=state, api_key="sekrit-key-123")
        client = "claude-cli/2.1.126 (external, cli)"
        auth = {"Authorization": "Bearer sekrit-key-123", "User-Agent": client}
        session = dict(auth, **{"X-Claude-Code-Session-Id": "sess-1"})
        port = proxy.port
        wrong = {"Authorization": "Bearer wrong"}  # refused callers leave nothing on disk
        self.request("POST", "/v1/chat/completions", chat_body(), wrong, port=port)
        secret = chat_body("the secret prompt")
        self.request("POST", "/v1/chat/completions", secret, session, port=port)
        message = {"model": "claude-sonnet-4.5", "max_tokens": 10,
                   "messages": [{"role": "user", "content": "hello"}]}
        self.request("POST", "/v1/messages", message, session, port=port)
        unknown = chat_body(model="no-such-model")
        self.request("POST", "/v1/chat/completions", unknown, auth, port=port)
        self.request("GET", "/v1/models", headers=auth, port=port)  # not a model call: not kept
        self.wait_count(proxy, 3)
        status, _, body = self.request("GET", "/usage?by=request", headers=auth, port=port)
        listed = json.loads(body)["data"]
        self.assertEqual([(r["route"], r["status"]) for r in listed],
                         [("/chat/completions", 404), ("/messages", 200),
                          ("/chat/completions", 200)])
        first = listed[-1]
        self.assertEqual((first["model"], first["session"], first["client"], first["input"]),
                         ("gpt-4.1", "sess-1", client, 3))
        self.assertTrue(0 <= first["ttfb_ms"] <= first["ms"])
        self.assertEqual(listed[0]["error"], "model_not_found")
        proxy.stop()
        folder = os.path.join(state, "history")
        files = [os.path.join(folder, name) for name in os.listdir(folder)]
        text = "".join(pathlib.Path(path).read_text() for path in files)
        self.assertEqual(text.count("\n"), 3)
        for secret in ("the secret prompt", "hello", "sekrit-key-123", "ghu_testtoken", "tid=test"):
            self.assertNotIn(secret, text)
        self.assertTrue(all(stat.S_IMODE(os.stat(path).st_mode) == 0o600 for path in files))
        again = self.start_proxy(state_dir=state, api_key="sekrit-key-123")
        data = self.data(again, auth)
        self.assertEqual([r["route"] for r in data["requests"]], [r["route"] for r in listed])
        self.assertEqual(data["sessions"][0]["id"], "sess-1")
        self.assertEqual(data["sessions"][0]["requests"], 2)
        hours = {m: t["requests"] for h in data["hourly"] for m, t in h["models"].items()}
        self.assertEqual(hours, {"gpt-4.1": 1, "claude-sonnet-4.5": 1, "-": 1})
        self.assertEqual(data["login"]["token_kind"], "GitHub App user token")
        self.assertNotIn("ghu_testtoken", json.dumps(data))
        self.assertNotIn("sekrit", json.dumps(data))

    def test_no_history_keeps_this_run_only_and_views_check_their_parameters(self):
        proxy = self.start_proxy(no_history=True)
        self.request("POST", "/v1/chat/completions", chat_body(), port=proxy.port)
        status, _, body = self.request("POST", "/v1/chat/completions", chat_body(model="auto"),
                                       port=proxy.port)
        self.wait_count(proxy, 2)
        chosen = proxy.app.dashboard.ledger.requests()[0]  # what auto chose, and that it was asked
        self.assertEqual((status, chosen["requested"], chosen["model"]),
                         (200, "auto", json.loads(body)["model"]))
        proxy.app.close()
        self.assertFalse(os.path.exists(os.path.join(self.tmp, "state", "history")))
        for query, param in (("by=week", "by"), ("by=hour&since=yesterday", "since"),
                             ("by=day&since=nan", "since"), ("by=model&since=inf", "since"),
                             ("by=day&since=1e300", "since")):
            status, _, body = self.request("GET", "/usage?" + query, port=proxy.port)
            error = json.loads(body)["error"]
            self.assertEqual((status, error["code"], error["param"]), (400, "invalid_query", param))
        status, _, body = self.request("GET", "/usage?by=model&since=1h", port=proxy.port)
        view = json.loads(body)
        self.assertEqual(view["data"]["gpt-4.1"]["requests"], 1)
        self.assertEqual(sum(t["requests"] for t in view["data"].values()), 2)
        self.assertFalse(view["history"])

    def get(self, path, headers, port):
        client = RawClient(port)
        self.addCleanup(client.close)
        lines = "".join("%s: %s\r\n" % item for item in headers.items())
        client.send(("GET %s HTTP/1.1\r\n%s\r\n" % (path, lines)).encode("latin-1"))
        return client.response()

    def test_get_root_is_the_page_for_browsers_with_a_fresh_nonce_and_the_probe_for_others(self):
        browser = {"Host": "127.0.0.1", "Accept": "text/html,application/xhtml+xml,*/*;q=0.8",
                   "Sec-Fetch-Site": "none"}
        port = self.proxy.port
        nonces = []
        for _ in range(2):
            status, headers, body = self.get("/", browser, port)
            self.assertEqual((status, headers["content-type"]), (200, "text/html; charset=utf-8"))
            policy = headers["content-security-policy"]
            nonce = re.search(r"'nonce-([A-Za-z0-9+/=]+)'", policy).group(1)
            nonces.append(nonce)
            self.assertIn("default-src 'none'", policy)
            self.assertNotIn("unsafe", policy)
            page = body.decode("utf-8")
            self.assertEqual(page.count('nonce="%s"' % nonce), 2)  # the one style, the one script
            self.assertEqual(len(re.findall(r"<script|<style", page)), 2)
            for outside in (" src=", "@import", "url(", "https://", "stylesheet"):
                self.assertNotIn(outside, page)
            self.assertEqual((headers["x-frame-options"], headers["cache-control"]),
                             ("DENY", "no-store"))
        self.assertNotEqual(nonces[0], nonces[1])
        status, headers, body = self.get("/", {"Host": "127.0.0.1", "Accept": "*/*"}, port)
        self.assertEqual((status, body), (200, b"Ollama is running"))
        # the Host and Origin checks of every route apply to the page (errors in Ollama's shape)
        status, _, body = self.get("/", dict(browser, Host="evil.example"), port)
        self.assertEqual(status, 403)
        self.assertIn("--allowed-host", json.loads(body)["error"])
        status, _, body = self.get("/", dict(browser, **{"Sec-Fetch-Site": "cross-site"}), port)
        self.assertEqual(status, 403)
        self.assertIn("Sec-Fetch-Site: cross-site", json.loads(body)["error"])

    def test_with_a_key_the_page_loads_but_its_data_needs_the_key(self):
        keyed = self.start_proxy(api_key="k-123")
        page, host = {"Host": "127.0.0.1", "Accept": "text/html"}, {"Host": "127.0.0.1"}
        self.assertEqual(self.get("/", page, keyed.port)[0], 200)
        self.assertEqual(self.get("/", host, keyed.port)[0], 401)  # Ollama's probe needs it
        self.assertTrue(wait_for(lambda: len(self.access_lines()) == 2))
        LOGS.clear()  # the page and the probe are logged: from here on, only the data requests
        status, _, body = self.get("/dashboard/data", host, keyed.port)
        self.assertEqual((status, json.loads(body)["error"]["code"]), (401, "invalid_api_key"))
        status, _, body = self.get("/dashboard/data", dict(host, Authorization="Bearer k-123"),
                                   keyed.port)
        self.assertEqual(status, 200)
        self.assertNotIn("k-123", body.decode())
        # an open page asks every 2 s: answered polls are access-logged at debug, refusals at info
        self.assertTrue(wait_for(lambda: len(self.access_lines()) == 2))
        levels = [(r.getMessage().split()[2], r.levelno) for r in self.access_lines()]
        self.assertEqual(levels, [("401", logging.INFO), ("200", logging.DEBUG)])

    def test_no_dashboard_turns_the_page_and_its_data_off(self):
        off = self.start_proxy(no_dashboard=True)
        self.assertEqual(self.get("/", {"Host": "127.0.0.1", "Accept": "text/html"}, off.port)[2],
                         b"Ollama is running")
        status, _, body = self.get("/dashboard/data", {"Host": "127.0.0.1"}, off.port)
        self.assertEqual((status, json.loads(body)["error"]["code"]), (404, "dashboard_disabled"))


def chromium_path():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


#: What a page's script reads back: the rows of the request table, its body's background.
ROWS_SCRIPT = "() => document.querySelectorAll('#request-rows tr').length"
BACKGROUND_SCRIPT = "getComputedStyle(document.body).backgroundColor"


@unittest.skipUnless(sync_playwright is not None and chromium_path(),
                     "needs playwright and a chromium browser (.ci/run installs both)")
class TestDashboardBrowser(ProxyTestCase):
    """The dashboard in headless Chromium against the fake upstream: charts and tables show the
    requests made, updates arrive live, the key prompt works, no console errors or CSP
    violations, on a wide and a phone-sized window, light and dark."""

    @classmethod
    def setUpClass(cls):
        cls.playwright = sync_playwright().start()
        cls.browser = cls.playwright.chromium.launch(
            executable_path=chromium_path(), headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"])

    @classmethod
    def tearDownClass(cls):
        cls.browser.close()
        cls.playwright.stop()

    def open(self, proxy, width=1280, height=900, scheme="light", allowed=()):
        """A page in a fresh context; console errors and CSP violations are checked at cleanup."""
        context = self.browser.new_context(viewport={"width": width, "height": height},
                                           color_scheme=scheme)
        self.addCleanup(context.close)
        context.add_init_script(
            "document.addEventListener('securitypolicyviolation', (e) => "
            "(window.cspViolations = window.cspViolations || []).push(e.violatedDirective));")
        page = context.new_page()
        problems = []

        def console(message):
            if message.type == "error" and not any(a in message.text for a in allowed):
                problems.append(message.text)
        page.on("console", console)
        page.on("pageerror", lambda error: problems.append(str(error)))
        page.goto("http://127.0.0.1:%d/" % proxy.port)

        def check():
            self.assertEqual((problems, page.evaluate("window.cspViolations || []")), ([], []))
        self.addCleanup(check)
        return page

    def rows(self, page):
        return page.evaluate(ROWS_SCRIPT)

    def wait_rows(self, page, count=None, timeout=5000):
        """Until the request table has ``count`` rows, or any (the page asks every 2 s)."""
        test = "(count) => (%s)() %s" % (ROWS_SCRIPT, "> 0" if count is None else "=== count")
        try:
            page.wait_for_function(test, arg=count, timeout=timeout)
        except Exception:
            self.fail("the page shows %d requests, not %s (%s)" % (
                self.rows(page), count, page.text_content("#live")))

    def seed_history(self, state):
        """A month of an agent's requests (a few a day) so the day chart has something to draw."""
        now = time.time()
        records = []
        for back in range(1, 30 * 24, 7):
            records.append({
                "t": now - back * 3600, "route": "/messages", "status": 200,
                "model": ("claude-sonnet-4.5", "gpt-4.1", "gpt-5.1-codex")[back % 3],
                "initiator": "agent", "stream": True, "ttfb_ms": 300.0 + back % 500,
                "ms": 2000.0 + back * 37 % 9000, "input": 2000 + back * 13, "output": 300 + back,
                "credits": 0.05 + back % 11 / 40.0, "client": "claude-cli/2.1.126 (external, cli)",
                "session": "0e5f%04d-6a1b-4c3d-9e8f-seeded" % (back // 100)})
        coproxy.History(state).write(records)

    def test_requests_show_in_charts_and_tables_live_wide_and_narrow_light_and_dark(self):
        state = os.path.join(self.tmp, "browser")
        self.seed_history(state)
        self.fake.user = TOKEN_BILLED_USER
        self.fake.cost = 420000000  # 0.42 credits per answer
        reset = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 3 * 3600))
        self.fake.answer_headers = [
            ("x-usage-ratelimit-session", "rem=62.5&rst=" + reset),
            ("x-usage-ratelimit-weekly", "rem=88&rst=2026-12-14T00%3A00%3A00Z")]
        proxy = self.start_proxy(state_dir=state)
        ledger = proxy.app.dashboard.ledger
        seeded = ledger.count  # the records of the last 24 hours, read at start
        agent = {"X-Claude-Code-Session-Id": "browser-session-1",
                 "User-Agent": "claude-cli/2.1.126 (external, cli)"}
        message = {"model": "claude-sonnet-4.5", "max_tokens": 50,
                   "messages": [{"role": "user", "content": "hi"}]}
        self.request("POST", "/v1/messages", message, agent, port=proxy.port)
        self.request("POST", "/v1/chat/completions", chat_body(), {"User-Agent": "aider/0.86"},
                     port=proxy.port)
        self.assertTrue(wait_for(lambda: ledger.count == seeded + 2))
        page = self.open(proxy)
        self.wait_rows(page, seeded + 2)
        self.assertEqual(page.text_content("#state"), "ready")
        self.assertIn("GitHub App user token", page.text_content("#status-list"))
        self.assertNotIn("ghu_", page.content())
        self.assertIn("1378 left of 1500", page.text_content("#quota"))
        self.assertIn("62.5% left", page.text_content("#quota"))
        for model in ("gpt-4.1", "claude-sonnet-4.5"):
            bars = page.locator("#chart-hours rect[data-model='%s']" % model)
            self.assertGreater(bars.count(), 0, model)
        self.assertGreater(page.locator("#chart-days rect").count(), 20)
        first_session = page.get_attribute("#session-rows tr:first-child td:first-child", "title")
        self.assertEqual(first_session, "browser-session-1")
        self.assertIn("/messages", page.text_content("#latency-rows"))
        # live: a new request appears without a reload
        self.request("POST", "/v1/messages", dict(message, model="claude-haiku-4.5"), agent,
                     port=proxy.port)
        self.wait_rows(page, seeded + 3)
        haiku = page.locator("#chart-hours rect[data-model='claude-haiku-4.5']")
        self.assertGreater(haiku.count(), 0)
        page.fill("#filter", "haiku")
        self.assertEqual(self.rows(page), 1)
        page.fill("#filter", "")
        self.assertEqual(page.evaluate(BACKGROUND_SCRIPT), "rgb(245, 246, 248)")
        page.screenshot(path=os.path.join(self.tmp, "dashboard-wide-light.png"), full_page=True)
        narrow = self.open(proxy, width=390, height=844, scheme="dark")
        self.wait_rows(narrow)
        self.assertEqual(narrow.evaluate(BACKGROUND_SCRIPT), "rgb(15, 18, 23)")
        self.assertLessEqual(narrow.evaluate("document.documentElement.scrollWidth"), 390)
        shots = os.environ.get("TEST_COPROXY_SCREENSHOTS")  # a directory: README's picture
        if shots:
            wide = self.open(proxy, width=1280, height=900, scheme="dark")
            self.wait_rows(wide)
            wide.screenshot(path=os.path.join(shots, "dashboard.png"), full_page=True)
            narrow.screenshot(path=os.path.join(shots, "dashboard-phone.png"), full_page=False)

    def test_the_key_is_asked_once_kept_in_the_tab_and_never_shown(self):
        proxy = self.start_proxy(api_key="page-key-42")
        self.request("POST", "/v1/chat/completions", chat_body(),
                     {"Authorization": "Bearer page-key-42"}, port=proxy.port)
        self.assertTrue(wait_for(lambda: proxy.app.dashboard.ledger.count >= 1))
        # the refused fetches are logged by Chromium as errors: expected here
        page = self.open(proxy, allowed=("status of 401",))
        page.wait_for_selector("#key-input", state="visible", timeout=5000)
        page.fill("#key-input", "wrong-key")
        page.click("#key-form button")
        page.wait_for_function(
            "() => document.getElementById('key-error').textContent.includes('refused')",
            timeout=5000)
        page.fill("#key-input", "page-key-42")
        page.click("#key-form button")
        self.wait_rows(page, 1)
        self.assertEqual(page.evaluate("sessionStorage.getItem('coproxy-api-key')"), "page-key-42")
        self.assertNotIn("page-key-42", page.content())
        self.assertNotIn("page-key-42", page.evaluate("document.body.innerText"))
        page.reload()  # the tab keeps the key: no second prompt
        self.wait_rows(page, 1)
        self.assertTrue(page.locator("#key").is_hidden())


class TestCLI(unittest.TestCase):
    def setUp(self):
        self.fake, self.tmp = with_fake_upstream(self)
        self.addCleanup(install_log_capture)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("COPROXY_", "GHCP_"))}

    def run_main(self, *argv, token=True):
        """coproxy.main in-process, aimed at the fake upstream: (exit code, stdout, stderr)."""
        args = list(argv) + ["--state-dir", self.tmp, "--github-url", self.fake.url,
                             "--github-api-url", self.fake.url]
        if token:
            args += ["--github-token", "ghu_testtoken1234567890"]
        result = main_in_process(args)
        return result.returncode, result.stdout, result.stderr

    def run_process(self, *argv, literally=False):
        """coproxy ARGV as a process; ``literally``: ``python3 coproxy.py ARGV`` as the README
        writes it, not COPROXY_MODULE."""
        command = [sys.executable, COPROXY_PY] if literally else COPROXY_MODULE
        return subprocess.run(command + list(argv), stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=20, cwd=HERE, env=child_env(self.env))

    def test_version(self):
        result = main_in_process(["--version"])
        self.assertEqual((result.returncode, result.stdout.strip()),
                         (0, "coproxy " + coproxy.__version__))

    def test_usage_errors_exit_2_with_one_clear_line(self):
        # as a user runs it: the process's exit code and all it says
        result = self.run_process("serve", "--port", "abc", literally=True)
        self.assertEqual((result.returncode, result.stderr.strip()), (
            2, "coproxy: error: argument --port: 'abc' is not a port number (0-65535) (see: "
               "python3 coproxy.py serve --help)"))
        # The rest in-process; the serves have no login, so a refusal that went would exit 1.
        self.assertEqual(main_in_process(["frobnicate"]).returncode, 2)
        self.assertEqual(main_in_process([]).returncode, 2)
        result = main_in_process(["service"])
        self.assertEqual(result.returncode, 2)
        self.assertIn("service needs a kind: `python3 coproxy.py service systemd` (Linux) or",
                      result.stderr)
        result = main_in_process(["serve", "--host", "0.0.0.0", "--state-dir", self.tmp])
        self.assertEqual(result.returncode, 2)
        self.assertIn("GHCP_PROXY_API_KEY", result.stderr)
        result = main_in_process(["serve", "--cors-origin", "*", "--state-dir", self.tmp])
        self.assertEqual(result.returncode, 2)
        self.assertIn("refusing --cors-origin '*' without an API key: every web page you visit",
                      result.stderr)

    def test_a_misspelled_variable_is_warned_about_once_and_the_new_key_name_keys_serve(self):
        result = main_in_process(["status", "--state-dir", self.tmp], env={"COPROXY_PROT": "58104"})
        warning = ("COPROXY_PROT is set but coproxy reads no such variable (did you mean "
                   "COPROXY_PORT?)")
        self.assertEqual(result.stderr.count(warning), 1, result.stderr)
        text = " ".join(main_in_process(["serve", "--help"]).stdout.split())
        self.assertIn("(env GHCP_PROXY_API_KEY, or COPROXY_API_KEY when that is unset)", text)
        config = make_config(self.fake, os.path.join(self.tmp, "keyed"),
                             environ={"COPROXY_API_KEY": "n3w-key"})
        proxy = ProxyHarness(config)
        self.addCleanup(proxy.stop)
        self.assertEqual(http_request(proxy.port, "GET", "/v1/models")[0], 401)
        self.assertEqual(http_request(proxy.port, "GET", "/v1/models",
                                      headers={"x-api-key": "n3w-key"})[0], 200)

    def test_a_flag_typo_names_the_closest_flag_of_its_subcommand(self):
        for argv, expected in ((["serve", "--prot", "8080"], "unrecognized argument --prot; did you mean --port? "
                                                              "(see: python3 coproxy.py serve --help)"),
                               (["serve", "--api_key=k"], "unrecognized argument --api_key=k; did you mean --api-key? "
                                                          "(see: python3 coproxy.py serve --help)"),
                               (["auth", "login", "--no-brower"], "did you mean --no-browser? (see: python3 coproxy.py "
                                                                  "auth login --help)"),
                               (["models", "--stat-dir", "x"], "did you mean --state-dir? (see: python3 coproxy.py "
                                                               "models --help)"),
                               (["status", "now"], "unrecognized argument now (see: python3 coproxy.py status --help)"),
                               (["--prot", "8080", "serve"], "unrecognized argument --prot; did you mean --port? "
                                                             "(see: python3 coproxy.py serve --help)"),
                               (["--port", "8080", "serve"], "unrecognized argument --port; --port goes after the "
                                                             "command: python3 coproxy.py serve --port (see:")):
            code, out, err = self.run_main(*argv, token=False)
            self.assertEqual(code, 2, argv)
            self.assertIn(expected, err, argv)

    @unittest.skipIf(os.name != "posix", "closed pipes are POSIX")
    def test_a_closed_pipe_ends_every_command_quietly(self):
        env = {k: v for k, v in self.env.items() if k != "PYTHONUNBUFFERED"}
        # buffered, the pipe breaks at the last flush (or the interpreter's at exit, after --help);
        # unbuffered, at the first print, in the middle of the command
        closed = socket.socket()  # bound, never listening: no coproxy answers there
        closed.bind(("127.0.0.1", 0))
        self.addCleanup(closed.close)
        processes = []
        for argv, unbuffered in ((["models"], False), (["models"], True), (["--help"], False),
                                 (["claude-code", "--port", str(closed.getsockname()[1])], True)):
            process = subprocess.Popen(COPROXY_MODULE + argv + [
                "--state-dir", self.tmp, "--github-url", self.fake.url, "--github-api-url",
                self.fake.url], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, text=True, cwd=HERE,
                env=child_env(env, GHCP_GITHUB_TOKEN="ghu_testtoken1234567890",
                              **({"PYTHONUNBUFFERED": "1"} if unbuffered else {})))
            process.stdout.close()  # the reader is gone before the first byte is written
            processes.append((argv, process))  # side by side, on both cores
        for argv, process in processes:
            err = process.stderr.read()
            process.stderr.close()
            self.assertEqual(process.wait(20), 0, (argv, err))
            self.assertEqual([line for line in err.splitlines() if not line.startswith("note: ")],
                             [], argv)

    def test_usage_names_the_account_as_auth_status_does(self):
        self.fake.user = {k: v for k, v in REQUEST_BILLED_USER.items() if k != "login"}
        code, out, _ = self.run_main("usage")
        self.assertEqual(code, 0)
        self.assertIn("account:           octocat\n", out)
        self.assertEqual(json.loads(self.run_main("usage", "--json")[1])["login"], "octocat")

    def test_help_is_truthful_and_short(self):
        top = main_in_process(["--help"]).stdout
        self.assertIn("default: info for serve, warning for the other commands",
                      " ".join(top.split()))
        self.assertIn("python3 coproxy.py serve", top)
        for command in ("serve", "models", "usage", "status"):
            text = main_in_process([command, "--help"]).stdout
            # shared options are listed once, at the top
            self.assertNotIn("--github-api-url URL", text, command)
            self.assertIn("listed by `python3 coproxy.py --help`", " ".join(text.split()), command)

    def test_serve_without_login_and_without_tty_exits_1(self):
        result = self.run_process("serve", "--state-dir", self.tmp, "--port", "0")
        self.assertEqual(result.returncode, 1)
        self.assertIn("auth login", result.stderr)
        self.assertIn("--no-auto-login", result.stderr)

    def test_auth_status_refresh_and_shared_options_either_side(self):
        code, out, err = self.run_main("auth", "status")
        self.assertEqual(code, 0, err)
        self.assertIn("octocat", out)
        self.assertIn("individual", out)
        self.assertIn("API base:       %s" % self.fake.url, out)
        self.assertIn("--github-token", out)
        code, out, _ = self.run_main("auth", "refresh")
        self.assertEqual(code, 0)
        self.assertEqual(self.fake.exchanges, 2)
        args = ["--state-dir", self.tmp, "--github-url", self.fake.url, "--github-api-url", self.fake.url,
                "--github-token", "ghu_testtoken1234567890"]
        with contextlib.redirect_stdout(io.StringIO()) as out:
            self.assertEqual(coproxy.main(args + ["auth", "status"]), 0)
        self.assertIn("octocat", out.getvalue())
        self.assertNotIn("ghu_testtoken", out.getvalue())

    def test_auth_status_not_logged_in(self):
        code, out, _ = self.run_main("auth", "status", token=False)
        self.assertEqual(code, 1)
        self.assertIn("not logged in", out)

    def test_exchange_failure_is_one_line_exit_1(self):
        self.fake.token_status, self.fake.token_body = 404, {"message": "Not Found"}
        code, out, err = self.run_main("auth", "refresh")
        self.assertEqual(code, 1)
        self.assertTrue(err.startswith("coproxy: error: "), err)
        self.assertNotIn("Traceback", err)

    def test_login_logout(self):
        self.fake.routes[("POST", "/login/device/code")] = lambda h, b: h.send_json(200, {
            "device_code": "d", "user_code": "WXYZ-0000",
            "verification_uri": "https://github.com/login/device", "expires_in": 60, "interval": 1})
        self.fake.poll_answers = [(200, {"access_token": "ghu_fromdeviceflow123"})]
        waits, flow = [], coproxy.DeviceFlow  # GitHub's interval is honoured, not waited out here
        self.addCleanup(setattr, coproxy, "DeviceFlow", flow)
        coproxy.DeviceFlow = lambda client, config: flow(client, config, sleep=waits.append)
        code, out, err = self.run_main("auth", "login", "--no-browser", token=False)
        self.assertEqual((code, waits), (0, [1]), err)
        self.assertIn("WXYZ-0000", err)
        self.assertIn("logged in as octocat", out)
        store = coproxy.TokenStore(self.tmp)
        self.assertEqual(store.load_github_token(), "ghu_fromdeviceflow123")
        self.assertIsNotNone(store.load_copilot_token())
        code, out, _ = self.run_main("auth", "logout", token=False)
        self.assertEqual(code, 0)
        self.assertIsNone(store.load_github_token())
        self.assertIn("removed", out)

    def test_usage_command(self):
        code, out, _ = self.run_main("usage")
        self.assertEqual(code, 0)
        self.assertIn("billed by premium requests", out)
        self.assertIn("premium requests:  165 used of 300 requests, 135 left (45.0% left), resets 2026-12-01", out)
        self.assertIn("chat:              unlimited", out)
        self.assertIn("5-hour session:    not seen yet", out)
        code, out, _ = self.run_main("usage", "--json")
        self.assertEqual(json.loads(out)["premium_requests"]["remaining"], 135)
        self.fake.user = TOKEN_BILLED_USER
        code, out, _ = self.run_main("usage")
        self.assertIn("billed by AI credits", out)
        self.assertIn("AI credits:        122.5 used of 1500 credits, 1377.5 left (91.8% left), resets 2026-12-01", out)
        self.assertIn("completions:       unlimited", out)

    def test_usage_charts_the_last_7_days_and_names_top_models_and_sessions(self):
        self.fake.user = TOKEN_BILLED_USER
        code, out, _ = self.run_main("usage")
        self.assertIn("history:           none yet in %s" % os.path.join(self.tmp, "history"), out)
        now = time.time()

        def day(back, model, credits, session):
            return {"t": now - back * 86400, "route": "/messages", "status": 200, "model": model,
                    "credits": credits, "input": 100, "output": 20, "session": session,
                    "client": "claude-cli/2.1.126"}
        coproxy.History(self.tmp).write([
            day(0, "claude-sonnet-4.5", 4.0, "sess-today"), day(2, "gpt-4.1", 1.0, "sess-old"),
            day(2, "gpt-4.1", 1.0, "sess-old"), day(10, "claude-opus-4.6", 50.0, "sess-gone")])
        code, out, _ = self.run_main("usage")  # into a StringIO, which has no encoding: # blocks
        lines = out.splitlines()
        start = lines.index("last 7 days, AI credits per day:")
        bars = lines[start + 1:start + 8]
        self.assertEqual(len(bars), 7)
        # the largest day has the full bar
        self.assertEqual(bars[-1].split()[2:], ["#" * 32, "4.00", "(1", "requests)"])
        self.assertEqual(bars[-3].split()[2:], ["#" * 16, "2.00", "(2", "requests)"])
        self.assertEqual(bars[0].split()[2:], ["0.00", "(0", "requests)"])
        top = lines[lines.index("top models:") + 1:lines.index("top sessions:")]
        # not the 10-day-old opus
        self.assertEqual([line.split()[0] for line in top], ["claude-sonnet-4.5", "gpt-4.1"])
        self.assertIn("sess-today", lines[lines.index("top sessions:") + 1])
        code, out, _ = self.run_main("usage", "--json")
        week = json.loads(out)["history"]
        self.assertEqual((len(week["days"]), sorted(week["models"])),
                         (7, ["claude-sonnet-4.5", "gpt-4.1"]))
        bars = coproxy.text_bars([("a", 1.0, ""), ("b", 0.3, "")], 4, "utf-8")
        # 1.2 blocks of 4: one and a quarter (in eighths)
        self.assertEqual([line.split()[1] for line in bars], ["\u2588" * 4, "\u2588\u258e"])

    def test_models_table_and_json(self):
        code, out, _ = self.run_main("models")
        self.assertEqual(code, 0)
        lines = out.splitlines()
        self.assertEqual(lines[0].split(), ["ID", "VENDOR", "CONTEXT", "OUTPUT", "TOOLS", "VISION"])
        self.assertTrue(any(line.startswith("claude-sonnet-4.5") and "200000" in line for line in lines))
        code, out, _ = self.run_main("models", "--json")
        self.assertEqual(json.loads(out)["data"][0]["id"], "gpt-4.1")
        code, out, _ = self.run_main("models", "--model-alias", "gpt-4=gpt-4.1")
        self.assertEqual(out.splitlines()[-1], "alias gpt-4 -> gpt-4.1")
        code, out, _ = self.run_main("models", "--json", "--model-alias", "gpt-4=gpt-4.1")
        self.assertEqual(json.loads(out)["data"][-1]["alias_of"], "gpt-4.1")

    @unittest.skipIf(os.name != "posix", "SIGINT delivery is POSIX")
    def test_serve_subprocess_answers_and_stops_on_sigint(self):
        process = subprocess.Popen(
            COPROXY_MODULE + ["serve", "--port", "0", "--state-dir", self.tmp,
                              "--github-url", self.fake.url, "--github-api-url", self.fake.url],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            cwd=HERE, env=child_env(self.env, GHCP_GITHUB_TOKEN="ghu_testtoken1234567890"))
        self.addCleanup(lambda: process.poll() is None and process.kill())
        port = None
        for line in process.stderr:
            match = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
            if match:
                port = int(match.group(1))
                break
        self.assertIsNotNone(port)
        status, _, body = http_request(port, "POST", "/v1/chat/completions", chat_body("sub"))
        self.assertEqual((status, json.loads(body)["choices"][0]["message"]["content"]), (200, "echo: sub"))
        process.send_signal(signal.SIGINT)
        self.assertEqual(process.wait(10), 0)
        rest = process.stderr.read()
        self.assertIn("POST /v1/chat/completions 200", rest)
        self.assertIn("shutting down", rest)
        self.assertNotIn("ghu_testtoken", rest)
        self.assertNotIn("tid=test", rest)
        process.stderr.close()
        process.stdout.close()

    def test_json_log_lines_all_have_one_shape(self):
        fake = self.fake
        fake.stream(chunk("cut sho"))
        process = subprocess.Popen(
            COPROXY_MODULE + ["serve", "--port", "0", "--state-dir", self.tmp, "--log-format",
                              "json", "--github-url", fake.url, "--github-api-url", fake.url],
            stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=HERE,
            env=child_env(self.env, GHCP_GITHUB_TOKEN="ghu_testtoken1234567890"))
        self.addCleanup(lambda: process.poll() is None and process.kill())
        announced = json.loads(process.stderr.readline())
        self.assertTrue(announced["message"].startswith("listening on http://127.0.0.1:"))
        port = int(announced["url"].rsplit(":", 1)[1])
        self.assertEqual(http_request(port, "POST", "/v1/chat/completions", chat_body(stream=True))[0], 200)
        fake.chat_script = None
        fake.cost = 12300000000
        self.assertEqual(http_request(port, "POST", "/v1/chat/completions", chat_body(model="claude-sonnet-4.5"))[0], 200)
        process.send_signal(signal.SIGINT)
        self.assertEqual(process.wait(10), 0)
        records = [json.loads(line) for line in process.stderr.read().splitlines() if line.strip()]
        process.stderr.close()
        self.assertTrue(all(list(r)[:4] == ["ts", "level", "logger", "message"] for r in records + [announced]))
        access = [r for r in records if r.get("path") == "/v1/chat/completions"]
        self.assertEqual(len(access), 2)
        self.assertEqual((access[0]["status"], access[0]["stream"], access[0]["error"]),
                         (200, True, "Copilot closed the stream before the answer was complete"))
        self.assertEqual((access[1]["premium"], access[1]["input_tokens"], access[1]["initiator"], access[1]["credits"]),
                         (1, 3, "user", 12.3))  # numbers, not strings
        self.assertIsInstance(access[1]["duration_ms"], float)

@unittest.skipIf(os.name != "posix", "the background server tests use POSIX signals and /proc")
class TestDaemon(unittest.TestCase):
    """serve -d, stop and status, as real processes."""

    def setUp(self):
        self.tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("COPROXY_", "GHCP_"))}
        self.addCleanup(self.command, "stop")

    def cli(self, *argv, env=None):
        """A command as its own process: the first serve -d, and each serve that would stay in
        the foreground if its refusal went (a timeout then, not a suite that hangs)."""
        return subprocess.run(COPROXY_MODULE + list(argv) + ["--state-dir", self.tmp],
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30,
                              cwd=HERE, env=child_env(self.env, **(env or {})))

    def command(self, *argv, env=None):
        """status, stop and the other serve -d in-process: they read the pid file, ask, signal
        or start the background server (its own process still) and return."""
        return main_in_process(list(argv) + ["--state-dir", self.tmp], env)

    def test_start_status_refuse_second_stop_and_no_secret_on_a_command_line(self):
        fake = FakeUpstream()
        self.addCleanup(fake.close)
        started = self.cli("serve", "-d", "--port", "0", "--no-auto-login", "--api-key",
                           "s3cret-key", "--github-token", "ghu_flagtoken1234567890",
                           "--github-url", fake.url, "--github-api-url", fake.url,
                           env={"GHCP_GITHUB_TOKEN": "ghu_envtoken1234567890"})
        self.assertEqual(started.returncode, 0, started.stderr)
        self.assertIn("--api-key was given on the command line", started.stderr)
        self.assertIn("set GHCP_GITHUB_TOKEN in the environment instead", started.stderr)
        match = re.search(r"pid (\d+), (http://127\.0\.0\.1:\d+), log (\S+)", started.stdout)
        self.assertIsNotNone(match, started.stdout)
        pid, url = int(match.group(1)), match.group(2)
        # the client lines of the foreground banner (whatever it lists), then status and stop
        config = coproxy.Config.resolve({"state_dir": self.tmp, "api_key": "k",
                                         "github_url": fake.url, "github_api_url": fake.url},
                                        environ={})
        banner = coproxy.start_banner(config, url, COPROXY_PY).splitlines()[1:]
        lines = started.stdout.splitlines()
        self.assertEqual(lines[1:-1], banner)
        claude = [line for line in banner if line.strip().startswith("Claude Code:")][0]
        self.assertIn('claude-code --state-dir %s --github-url %s --github-api-url %s --port %s '
                      '--api-key "$GHCP_PROXY_API_KEY")" && claude'
                      % (self.tmp, fake.url, fake.url, url.rsplit(":", 1)[1]), claude)
        script = claude.split("python3 ", 1)[1].split(" ", 1)[0]  # status/stop name the same file
        self.assertTrue(lines[-1].endswith(
            "python3 %s status --state-dir %s, python3 %s stop --state-dir %s"
            % (script, self.tmp, script, self.tmp)), lines[-1])
        self.assertNotIn("s3cret-key", started.stdout)
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            cmdline = f.read()
        self.assertNotIn(b"s3cret-key", cmdline)
        self.assertNotIn(b"ghu_envtoken", cmdline)
        self.assertNotIn(b"ghu_flagtoken", cmdline)
        argv = cmdline.split(b"\0")
        # itself, no re-execution
        self.assertEqual((argv[1].endswith(b"coproxy.py"), argv[2]), (True, b"serve"))
        with open(os.path.join(self.tmp, "coproxy.pid")) as f:
            self.assertEqual(f.read().split()[:2], [str(pid), url])
        port = int(url.rsplit(":", 1)[1])
        keyed = {"GHCP_PROXY_API_KEY": "s3cret-key"}  # /healthz gives details only with the key
        bearer = {"Authorization": "Bearer s3cret-key"}
        self.assertEqual(http_request(port, "GET", "/v1/models", headers=bearer)[0], 200)
        status = self.command("status", env=keyed)
        self.assertEqual(status.returncode, 0)
        self.assertIn("running:  pid %d, %s" % (pid, url), status.stdout)
        self.assertTrue(wait_for(
            lambda: "auth:     ready" in self.command("status", env=keyed).stdout), status.stdout)
        self.assertIn("set GHCP_PROXY_API_KEY to the server's key", self.command("status").stdout)
        self.assertEqual(http_request(port, "POST", "/v1/chat/completions", chat_body(),
                                      headers=bearer)[0], 200)
        self.assertIn("upstream: the last request to Copilot succeeded",
                      self.command("status", env=keyed).stdout)
        second = self.command("serve", "-d", "--port", "0", "--no-auto-login")
        self.assertEqual(second.returncode, 1)
        self.assertIn("already running (pid %d" % pid, second.stderr)
        stopped = self.command("stop")
        self.assertEqual((stopped.returncode, stopped.stdout.strip()),
                         (0, "stopped coproxy (pid %d, %s)" % (pid, url)))
        self.assertFalse(os.path.exists(os.path.join(self.tmp, "coproxy.pid")))
        self.assertEqual(self.command("status").returncode, 1)

    def test_stop_never_signals_a_process_that_is_not_this_coproxy(self):
        stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
        self.addCleanup(stranger.wait)
        self.addCleanup(stranger.kill)
        with open(os.path.join(self.tmp, "coproxy.pid"), "w") as f:  # a stale file naming a live pid
            f.write("%d\nhttp://127.0.0.1:1\n%d\n" % (stranger.pid, 12345))
        stopped = self.command("stop")
        self.assertEqual(stopped.returncode, 1)
        self.assertIn("stale pid file", stopped.stderr)
        self.assertIsNone(stranger.poll())  # still alive: never signalled
        started = self.command("serve", "-d", "--port", "0", "--no-auto-login")
        self.assertEqual(started.returncode, 0, started.stderr)
        self.assertEqual(self.command("stop").returncode, 0)

    def test_a_foreground_serve_is_seen_by_status_and_stop(self):
        process = subprocess.Popen(COPROXY_MODULE + ["serve", "--port", "0", "--no-auto-login",
                                                     "--state-dir", self.tmp],
                                   stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                   cwd=HERE, env=child_env(self.env))
        self.addCleanup(lambda: process.poll() is None and process.kill())
        line = process.stderr.readline()
        while "listening on" not in line:
            self.assertTrue(line, "serve ended before listening")
            line = process.stderr.readline()
        self.assertTrue(wait_for(lambda: os.path.exists(os.path.join(self.tmp, "coproxy.pid"))))
        self.assertIn("running:  pid %d" % process.pid, self.command("status").stdout)
        self.assertIn("already running", self.cli("serve", "--port", "0", "--no-auto-login").stderr)
        self.assertEqual(self.command("stop").returncode, 0)
        self.assertEqual(process.wait(10), 0)
        process.stderr.close()

    def test_a_failed_start_shows_only_its_own_log_lines(self):
        with open(os.path.join(self.tmp, "coproxy.log"), "w") as f:
            f.write("an old line from yesterday\n")
        os.chmod(os.path.join(self.tmp, "coproxy.log"), 0o600)
        busy = socket.socket()
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        self.addCleanup(busy.close)
        failed = self.command("serve", "-d", "--port", str(busy.getsockname()[1]),
                              "--no-auto-login")
        self.assertEqual(failed.returncode, 1)
        self.assertIn("address already in use", failed.stderr)
        self.assertNotIn("yesterday", failed.stderr)

    def test_state_dir_and_log_file_are_not_followed_elsewhere(self):
        os.chmod(self.tmp, 0o777)
        result = self.command("status")
        self.assertEqual(result.returncode, 1)
        self.assertIn("chmod 700 %s" % self.tmp, result.stderr)  # refused, not merely "not running"
        result = self.cli("serve", "--port", "0", "--no-auto-login")
        self.assertEqual(result.returncode, 1)
        self.assertIn("chmod 700 %s" % self.tmp, result.stderr)
        os.chmod(self.tmp, 0o700)
        target = os.path.join(self.tmp, "elsewhere")
        os.symlink(target, os.path.join(self.tmp, "coproxy.log"))
        result = self.command("serve", "-d", "--port", "0", "--no-auto-login")
        self.assertEqual(result.returncode, 1)
        self.assertFalse(os.path.exists(target))


class TestService(unittest.TestCase):
    """service systemd|launchd: the exact configuration, secrets only in a 0600 file."""

    def setUp(self):
        self.tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.state = os.path.join(self.tmp, "state")
        self.ca = os.path.join(self.tmp, "ca.pem")
        with open(self.ca, "w") as f:
            f.write(TEST_CA_PEM)

    def run_main(self, argv, env):
        out, err = io.StringIO(), io.StringIO()
        original = os.environ.copy()
        os.environ.clear()
        os.environ.update(env)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = coproxy.main(argv)
        finally:
            os.environ.clear()
            os.environ.update(original)
            install_log_capture()
        return code, out.getvalue(), err.getvalue()

    def test_systemd_unit_carries_every_setting_and_no_secret(self):
        env = {"HOME": self.tmp, "COPROXY_CA_FILE": self.ca, "HTTPS_PROXY": "http://bob:pr0xy-pass@proxy.corp:3128",
               "NO_PROXY": "localhost", "GHCP_PROXY_API_KEY": "k3y-from-env", "COPILOT_GITHUB_TOKEN": "github_pat_11cli",
               "HTTP_PROXY": "bob:pr0xy-pass@proxy.corp:3128"}  # without a scheme: still a password
        code, unit, err = self.run_main(["service", "systemd", "--state-dir", self.state, "--github-host", "acme.ghe.com",
                                         "--port", "9001", "--host", "0.0.0.0", "--model-alias", "fast=gpt-4.1",
                                         "--github-token", "ghu_flagtoken1234567890"], env)
        self.assertEqual(code, 0, err)
        execstart = [line for line in unit.splitlines() if line.startswith("ExecStart=")][0]
        for part in ("serve --no-auto-login --state-dir %s" % self.state, "--github-host acme.ghe.com",
                     "--ca-file %s" % self.ca, "--host 0.0.0.0", "--port 9001", "--model-alias fast=gpt-4.1"):
            self.assertIn(part, execstart)
        for secret in ("k3y-from-env", "ghu_flagtoken", "pr0xy-pass", "github_pat_11cli"):
            self.assertNotIn(secret, unit)
        env_file = os.path.join(self.state, "service.env")
        self.assertIn("EnvironmentFile=%s" % env_file, unit)
        self.assertIn("Environment=NO_PROXY=localhost", unit)
        self.assertEqual(stat.S_IMODE(os.stat(env_file).st_mode), 0o600)
        with open(env_file) as f:
            self.assertEqual(sorted(l for l in f.read().splitlines() if not l.startswith("#")), [
                "COPILOT_GITHUB_TOKEN=github_pat_11cli", "GHCP_GITHUB_TOKEN=ghu_flagtoken1234567890",
                "GHCP_PROXY_API_KEY=k3y-from-env",
                "HTTPS_PROXY=http://bob:pr0xy-pass@proxy.corp:3128", "HTTP_PROXY=bob:pr0xy-pass@proxy.corp:3128"])
        self.assertEqual(stat.S_IMODE(os.stat(self.state).st_mode), 0o700)
        self.assertIn("ReadWritePaths=%s" % self.state, unit)

    def test_credentialled_urls_are_secrets_and_nothing_in_the_unit_is_expanded_by_systemd(self):
        state = os.path.join(self.tmp, "st$HOME%h")
        code, unit, err = self.run_main(["service", "systemd", "--state-dir", state,
                                         "--github-api-url", "http://u:s3cret@127.0.0.1:9"], {"HOME": self.tmp})
        self.assertEqual(code, 0, err)
        self.assertNotIn("s3cret", unit)
        with open(os.path.join(state, "service.env")) as f:
            self.assertIn("COPROXY_GITHUB_API_URL=http://u:s3cret@127.0.0.1:9", f.read().splitlines())
        execstart = [line for line in unit.splitlines() if line.startswith("ExecStart=")][0]
        self.assertIn("--state-dir %s" % state.replace("$", "$$").replace("%", "%%"), execstart)
        self.assertIn("ReadWritePaths=%s" % state.replace("%", "%%"), unit)
        settings = "\n".join(line for line in unit.splitlines() if not line.startswith("#"))
        self.assertNotIn("$HOME%h", settings)  # every $ and % doubled: systemd would expand them

    def test_private_tmp_is_left_off_when_the_service_needs_a_path_under_tmp(self):
        in_tmp = tempfile.mkdtemp(dir="/tmp")
        self.addCleanup(shutil.rmtree, in_tmp, True)
        state = os.path.join(in_tmp, "state")
        code, unit, err = self.run_main(["service", "systemd", "--state-dir", state], {"HOME": self.tmp})
        self.assertEqual(code, 0, err)
        self.assertNotIn("\nPrivateTmp=yes\n", unit)
        self.assertIn("# PrivateTmp=yes left off: the service needs ", unit)
        self.assertIn(state, [line for line in unit.splitlines() if line.startswith("# PrivateTmp")][0])
        self.assertIn("which PrivateTmp=yes would hide from the service", err)
        needed = [sys.executable, COPROXY_PY, self.ca]
        if any(re.match(r"^/(var/)?tmp(/|$)", os.path.realpath(path)) for path in needed):
            return  # this checkout itself is under /tmp: there is no setup left that keeps PrivateTmp
        outside = tempfile.mkdtemp(dir=os.path.dirname(COPROXY_PY), prefix=".service-test-")
        self.addCleanup(shutil.rmtree, outside, True)
        code, unit, err = self.run_main(["service", "systemd", "--state-dir", os.path.join(outside, "state")],
                                        {"HOME": self.tmp})
        self.assertEqual((code, err), (0, ""))
        self.assertIn("\nPrivateTmp=yes\n", unit)

    def test_api_key_given_as_a_flag_goes_to_the_environment_file(self):
        code, unit, err = self.run_main(["service", "systemd", "--state-dir", self.state, "--api-key", "fl4g-key"],
                                        {"HOME": self.tmp})
        self.assertEqual(code, 0, err)
        self.assertNotIn("fl4g-key", unit)
        env_file = os.path.join(self.state, "service.env")
        self.assertEqual(stat.S_IMODE(os.stat(env_file).st_mode), 0o600)
        with open(env_file) as f:
            self.assertIn("GHCP_PROXY_API_KEY=fl4g-key", f.read().splitlines())

    def test_launchd_plist_loads_secrets_through_a_shell_and_refusals(self):
        code, out, err = self.run_main(["service", "launchd", "--state-dir", self.state], {"HOME": self.tmp,
                                                                                           "GHCP_PROXY_API_KEY": "k3y-launchd"})
        self.assertEqual(code, 0, err)
        plist = plistlib.loads(out.encode())
        arguments = plist["ProgramArguments"]
        self.assertEqual(arguments[:4], ["/bin/sh", "-c", 'set -a && . "$0" && set +a && exec "$@"',
                                         os.path.join(self.state, "service.env")])
        self.assertEqual(arguments[4:7], [sys.executable, COPROXY_PY, "serve"])
        self.assertNotIn("k3y-launchd", out)  # anywhere in the plist, EnvironmentVariables included
        with open(os.path.join(self.state, "service.env")) as f:
            self.assertIn("GHCP_PROXY_API_KEY=k3y-launchd", f.read())
        code, _, err = self.run_main(["service", "systemd", "--state-dir", self.state, "--host", "0.0.0.0"],
                                     {"HOME": self.tmp})
        self.assertEqual(code, 2)
        self.assertIn("refusing to serve a service on 0.0.0.0 without an API key", err)


class TestClaudeCodeCommand(unittest.TestCase):
    def test_environment_for_each_shell(self):
        fake = FakeUpstream()
        self.addCleanup(fake.close)
        tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, tmp, True)
        self.addCleanup(install_log_capture)
        closed = socket.socket()  # bound, never listening: no coproxy there, so GitHub's catalogue
        closed.bind(("127.0.0.1", 0))
        self.addCleanup(closed.close)
        port = closed.getsockname()[1]
        base = ["claude-code", "--state-dir", tmp, "--github-url", fake.url, "--github-api-url", fake.url,
                "--github-token", "ghu_testtoken1234567890", "--port", str(port)]
        outputs = {}
        for shell in ("sh", "fish", "powershell"):
            out = io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()), \
                    without_coproxy_variables():
                self.assertEqual(coproxy.main(base + ["--shell", shell, "--api-key", "pa$$"]), 0)
            outputs[shell] = out.getvalue()
        sh = outputs["sh"]
        self.assertIn("export ANTHROPIC_BASE_URL=http://127.0.0.1:%d\n" % port, sh)
        self.assertIn("export ANTHROPIC_AUTH_TOKEN='pa$$'\n", sh)
        self.assertIn("export ANTHROPIC_MODEL=claude-sonnet-4-5\n", sh)  # as Claude Code reads it
        self.assertIn("export ANTHROPIC_DEFAULT_OPUS_MODEL=claude-opus-4-6\n", sh)
        self.assertIn("export ANTHROPIC_DEFAULT_HAIKU_MODEL=claude-haiku-4-5\n", sh)
        # CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC would turn the model discovery off
        self.assertNotIn("NONESSENTIAL", sh)
        self.assertIn("export DISABLE_TELEMETRY=1\n", sh)
        self.assertIn("export DISABLE_ERROR_REPORTING=1\n", sh)
        self.assertIn("export CLAUDE_CODE_ATTRIBUTION_HEADER=0\n", sh)
        self.assertIn("export CLAUDE_CODE_ENABLE_GATEWAY_MODEL_DISCOVERY=1\n", sh)
        self.assertIn("set -gx ANTHROPIC_AUTH_TOKEN 'pa$$'\n", outputs["fish"])
        self.assertIn('$env:ANTHROPIC_AUTH_TOKEN = "pa`$`$"\n', outputs["powershell"])
        self.assertNotIn("ghu_", sh)

    def test_start_banner_lines_work_when_pasted(self):
        config = coproxy.Config.resolve({"state_dir": "/srv/coproxy", "api_key": "s3cret-banner", "host": "0.0.0.0"},
                                        environ={})
        banner = coproxy.start_banner(config, "http://0.0.0.0:9090", "coproxy.py")
        self.assertIn('eval "$(python3 coproxy.py claude-code --state-dir /srv/coproxy --port 9090 '
                      '--api-key "$GHCP_PROXY_API_KEY")" && claude', banner)
        self.assertIn("curl -s http://127.0.0.1:9090/v1/chat/completions", banner)
        self.assertIn("Ollama clients:     http://127.0.0.1:9090 (JetBrains", banner)
        self.assertIn('-H "Authorization: Bearer $GHCP_PROXY_API_KEY"', banner)
        self.assertNotIn("s3cret-banner", banner)
        lan = coproxy.Config.resolve({"api_key": "s3cret-banner", "host": "192.168.1.5"}, environ={})
        self.assertIn('claude-code --host 192.168.1.5 --api-key "$GHCP_PROXY_API_KEY"',
                      coproxy.start_banner(lan, "http://192.168.1.5:8080", "coproxy.py"))
        plain = coproxy.start_banner(coproxy.Config.resolve({}, environ={}), "http://127.0.0.1:8080", "coproxy.py")
        self.assertIn('eval "$(python3 coproxy.py claude-code)" && claude', plain)

class TestClaudeCodeCatalogue(unittest.TestCase):
    """claude-code learns the catalogue from the running coproxy, then GitHub, else refuses; the
    banner's line carries what serve was given and works when pasted into another shell."""

    def setUp(self):
        self.fake, self.tmp = with_fake_upstream(self)
        self.addCleanup(install_log_capture)
        self.closed = socket.socket()  # bound, never listening: connections to it are refused
        self.closed.bind(("127.0.0.1", 0))
        self.addCleanup(self.closed.close)
        self.dead_url = "http://127.0.0.1:%d" % self.closed.getsockname()[1]

    def claude_code(self, *argv, github=None):
        args = ["claude-code", "--state-dir", os.path.join(self.tmp, "cli"), "--github-url", github or self.fake.url,
                "--github-api-url", github or self.fake.url, "--github-token", "ghu_testtoken1234567890"] + list(argv)
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), without_coproxy_variables():
            code = coproxy.main(args)
        return code, dict(re.findall(r"^export (\w+)=(\S+)$", out.getvalue(), re.M)), err.getvalue()

    def start_proxy(self, **overrides):
        proxy = ProxyHarness(make_config(self.fake, os.path.join(self.tmp, "state"), **overrides))
        self.addCleanup(proxy.stop)
        return proxy

    def test_the_running_coproxy_is_asked_first(self):
        proxy = self.start_proxy(api_key="k3y")
        code, env, err = self.claude_code("--port", str(proxy.port), "--api-key", "k3y", github=self.dead_url)
        self.assertEqual(code, 0, err)
        self.assertEqual((env["ANTHROPIC_BASE_URL"], env["ANTHROPIC_MODEL"], env["ANTHROPIC_DEFAULT_OPUS_MODEL"]),
                         ("http://127.0.0.1:%d" % proxy.port, "claude-sonnet-4-5", "claude-opus-4-6"))
        self.assertEqual(err, "")
        models = [r for r in self.fake.requests if r[1] == "/models"]
        self.assertEqual(len(models), 1)  # the proxy's own fetch; the CLI never reached GitHub

    def test_a_main_model_outside_the_catalogue_is_refused_and_aliases_are_known(self):
        proxy = self.start_proxy(model_aliases={"fast": "gpt-4.1"})
        code, env, err = self.claude_code("--port", str(proxy.port), "--model", "claude-sonet-4.5")
        self.assertEqual((code, env), (1, {}))
        self.assertIn("--model claude-sonet-4.5 is not in your Copilot catalogue; did you mean claude-sonnet-4.5", err)
        for model, main in (("fast", "fast"), ("opus", "claude-opus-4-6"), ("claude-haiku-4.5", "claude-haiku-4-5")):
            code, env, err = self.claude_code("--port", str(proxy.port), "--model", model)
            self.assertEqual((code, env.get("ANTHROPIC_MODEL")), (0, main), err)

    def test_without_a_catalogue_nothing_is_printed_and_the_exit_is_1(self):
        port = self.dead_url.rsplit(":", 1)[1]
        code, env, err = self.claude_code("--port", port, github=self.dead_url)
        self.assertEqual((code, env), (1, {}))
        self.assertIn("cannot learn your Copilot model catalogue, so no settings are printed: no coproxy answers "
                      "at %s; and GitHub: " % self.dead_url, err)
        self.fake.routes[("GET", "/models")] = lambda h, b: h.send_json(500, {"message": "down"})
        proxy = self.start_proxy()  # it serves its built-in list, which may name models this account lacks
        code, env, err = self.claude_code("--port", str(proxy.port), github=self.dead_url)
        self.assertEqual((code, env), (1, {}))
        self.assertIn("the coproxy at http://127.0.0.1:%d cannot read the catalogue from GitHub either" % proxy.port,
                      err)

    def test_github_when_no_coproxy_answers_and_a_wrong_key_is_refused(self):
        port = self.dead_url.rsplit(":", 1)[1]
        code, env, err = self.claude_code("--port", port)
        self.assertEqual((code, env["ANTHROPIC_MODEL"]), (0, "claude-sonnet-4-5"))
        self.assertIn("note: no coproxy answers at %s; the models are from GitHub" % self.dead_url, err)
        proxy = self.start_proxy(api_key="right")
        for key in (["--api-key", "wrong"], []):  # the settings would fail on every request: none printed
            code, env, err = self.claude_code("--port", str(proxy.port), *key)
            self.assertEqual((code, env), (1, {}))
            self.assertIn("the coproxy at http://127.0.0.1:%d refuses the key given to claude-code (%s): give it the "
                          "key serve was started with" % (proxy.port, "--api-key" if key else "none"), err)
            self.assertNotIn("wrong", err)

    def test_the_coproxy_of_this_state_dir_is_found_without_a_port(self):
        proxy = self.start_proxy()
        config = coproxy.Config.resolve({"state_dir": os.path.join(self.tmp, "cli")}, environ={})
        os.makedirs(config.state_dir, mode=0o700)
        record = coproxy.InstanceRecord(config).claim()
        self.addCleanup(record.release)
        record.write("http://127.0.0.1:%d" % proxy.port)
        code, env, err = self.claude_code(github=self.dead_url)
        self.assertEqual((code, env.get("ANTHROPIC_BASE_URL")), (0, "http://127.0.0.1:%d" % proxy.port), err)

    def test_help_says_host_and_port_name_where_coproxy_listens(self):
        with contextlib.redirect_stdout(io.StringIO()) as out, self.assertRaises(SystemExit):
            coproxy.main(["claude-code", "--help"])
        text = " ".join(out.getvalue().split())
        self.assertIn("--host ADDR address where the coproxy for Claude Code listens, as given to serve: nothing is "
                      "bound here", text)
        self.assertIn("when neither answers", text)

    @unittest.skipIf(os.name != "posix", "runs the banner's line in sh")
    def test_the_banner_line_works_in_a_fresh_shell_behind_a_proxy(self):
        fake = FakeUpstream(tls=True)
        self.addCleanup(fake.close)
        tunnel = FakeConnectProxy()
        self.addCleanup(tunnel.close)
        ca = os.path.join(self.tmp, "ca.pem")
        with open(ca, "w") as f:
            f.write(TEST_CA_PEM)
        state = os.path.join(self.tmp, "served")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("COPROXY_", "GHCP_")) and "PROXY" not in k.upper()}
        served_env = dict(env, HTTPS_PROXY="http://127.0.0.1:%d" % tunnel.port, COPROXY_API_KEY="b4nner-key",
                          GHCP_GITHUB_TOKEN="ghu_testtoken1234567890")
        process = subprocess.Popen(COPROXY_MODULE + ["serve", "--port", "0", "--state-dir", state,
                                                     "--ca-file", ca, "--github-url", fake.url,
                                                     "--github-api-url", fake.url],
                                   stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                   cwd=HERE, env=child_env(served_env))
        self.addCleanup(process.wait, 10)
        self.addCleanup(lambda: process.poll() is None and process.kill())
        self.addCleanup(process.stderr.close)
        line = ""
        while "Claude Code:" not in line:
            line = process.stderr.readline()
            self.assertTrue(line, "serve ended before its banner")
        command = line.split("Claude Code:", 1)[1].strip()
        for part in ("--state-dir %s" % state, "--ca-file %s" % ca, "--github-url %s" % fake.url,
                     "HTTPS_PROXY=http://127.0.0.1:%d " % tunnel.port, '--api-key "$COPROXY_API_KEY"'):
            self.assertIn(part, command)
        self.assertNotIn("b4nner-key", command)
        self.assertTrue(command.endswith("&& claude"))
        # a new terminal: the key is exported there too, nothing else; `claude` is swapped for printenv
        shell = command[:-len("claude")].replace("python3 ", shlex.quote(sys.executable) + " ", 1)
        shell += " printenv ANTHROPIC_BASE_URL ANTHROPIC_AUTH_TOKEN ANTHROPIC_MODEL"
        result = subprocess.run(["sh", "-c", shell], cwd=os.path.dirname(COPROXY_PY), capture_output=True, text=True,
                                timeout=20, env=dict(env, COPROXY_API_KEY="b4nner-key"))
        self.assertEqual(result.returncode, 0, result.stderr)
        base_url, token, model = result.stdout.split()
        self.assertEqual((token, model), ("b4nner-key", "claude-sonnet-4-5"))  # Anthropic's spelling
        status, _, body = http_request(int(base_url.rsplit(":", 1)[1]), "POST", "/v1/messages", json.dumps({
            "model": model, "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]}).encode(),
            headers={"x-api-key": token, "anthropic-version": "2023-06-01", "Content-Type": "application/json"})
        self.assertEqual(status, 200, body)
        self.assertEqual(http_request(int(base_url.rsplit(":", 1)[1]), "GET", "/v1/models")[0], 401)  # keyed
        self.assertEqual(set(tunnel.targets), {"127.0.0.1:%d" % fake.port})  # serve reached GitHub through it


class TestPortability(unittest.TestCase):
    with open(COPROXY_PY, encoding="utf-8") as _source:
        SOURCE = _source.read()
    STDLIB = {"argparse", "asyncio", "base64", "bisect", "calendar", "collections", "concurrent",
              "contextlib", "ctypes", "dataclasses", "difflib", "email", "errno", "fcntl",
              "functools", "hashlib", "hmac", "http", "importlib", "ipaddress", "itertools", "json",
              "logging", "resource", "os", "queue", "random", "re", "selectors", "shlex", "signal", "socket",
              "ssl", "stat", "struct", "subprocess", "sys", "threading", "time", "urllib",
              "webbrowser", "zlib"}

    _tree = None

    @classmethod
    def tree(cls):
        """coproxy.py parsed once for every check that walks it (0.15 s a parse), with 3.7's
        grammar (the 3.6/3.7 guard must be able to run)."""
        if cls._tree is None:
            cls._tree = ast.parse(cls.SOURCE, feature_version=(3, 7))
        return cls._tree

    def test_grammar_parses_as_python_3_7(self):
        self.assertIsInstance(self.tree(), ast.Module)

    def test_no_names_newer_than_the_floor(self):
        for name in ("to_thread", "removeprefix", "removesuffix", "TaskGroup", "asyncio.timeout(", "tomllib",
                     "from __future__ import annotations", ":=", "functools.cache(", "BooleanOptionalAction",
                     "cancel_futures", "zip(strict", "datetime.UTC", "get_event_loop()"):
            self.assertNotIn(name, self.SOURCE, name)

    def test_imports_only_the_standard_library(self):
        for node in ast.walk(self.tree()):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module]
            else:
                continue
            for name in names:
                self.assertIn(name.split(".")[0], self.STDLIB, name)

    def test_section_banners_match_the_docstring(self):
        banners = re.findall(r"^# (\d+)\. (.+)$", self.SOURCE, re.M)
        listed = re.findall(r"^\s+(\d+)\. (.+)$", coproxy.__doc__, re.M)
        self.assertEqual(banners, listed)
        self.assertEqual([int(n) for n, _ in banners], list(range(1, 16)))

    def test_readme_documents_every_option_and_subcommand(self):
        with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
            readme = f.read()
        for option in coproxy.OPTIONS:
            self.assertTrue("`%s" % option.flag in readme, "README lacks %s" % option.flag)
            self.assertTrue("`%s`" % option.env in readme, "README lacks %s" % option.env)
        for command in ("serve", "auth login", "auth status", "auth logout", "auth refresh", "models", "claude-code",
                        "usage"):
            self.assertTrue("`%s" % command in readme, "README lacks the %s command" % command)
        for line in ("python3 coproxy.py serve", "python3 test_coproxy.py"):
            self.assertIn(line, readme)
        top = readme.split("\n## ", 1)[0]
        self.assertLessEqual(top.count("\n"), 52)  # what it is, the two commands, a smoke test, pick a client

    def test_verbose_runs_print_test_names(self):
        # The runner in-process (a new interpreter compiles both files: 0.5 s); .ci/run reads
        # the last line of the real command's output
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = run_tests(["-v", "-k", "test_format_size"])
        self.assertIn("test_format_size (", err.getvalue())
        self.assertEqual((code, out.getvalue().strip().splitlines()[-1]),
                         (0, "1 passed, 0 failed, 0 skipped"))

    def test_the_index_names_every_test_class(self):
        # the index at the top of this file, from feature to test class, stays whole and true
        index = sys.modules[__name__].__doc__.split("Where each feature is tested", 1)[1]
        classes = {name for name, value in globals().items()
                   if name.startswith("Test") and isinstance(value, type)}
        self.assertEqual(set(re.findall(r"\bTest\w+", index)), classes)

    def test_import_has_no_side_effects(self):
        home = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, home, True)
        probe = ("import sys, threading, logging; sys.argv = ['coproxy.py', 'serve', '-d']; import coproxy; "
                 "print(len(logging.getLogger('coproxy').handlers), threading.active_count(), "
                 "logging.getLogger().handlers == [])")
        result = subprocess.run([sys.executable, "-c", probe], cwd=HERE, capture_output=True,
                                text=True, timeout=20, env=child_env(
                                    HOME=home, XDG_STATE_HOME=os.path.join(home, "state")))
        self.assertEqual((result.returncode, result.stdout.strip(), result.stderr), (0, "0 1 True", ""))
        self.assertEqual(os.listdir(home), [])  # no state dir, no pid file, no log: nothing was started

    def test_classes_and_functions_stay_small(self):
        for node in ast.walk(self.tree()):
            if isinstance(node, ast.ClassDef):
                self.assertLessEqual(node.end_lineno - node.lineno, 300, node.name)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                self.assertLessEqual(node.end_lineno - node.lineno, 100, node.name)

    def test_the_file_reads_as_the_issue_asks(self):
        # Lines within 100 columns; every function longer than 15 lines (constructors aside)
        # says what it does and why; comments and docstrings at least 15 % of the lines.
        lines = self.SOURCE.splitlines()
        self.assertEqual([n + 1 for n, line in enumerate(lines) if len(line) > 100], [])
        for node in ast.walk(self.tree()):
            if (isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                    and node.end_lineno - node.lineno >= 15 and node.name != "__init__"):
                self.assertTrue(ast.get_docstring(node), "%s lacks a docstring" % node.name)
        explained = set()
        previous = None
        for token in tokenize.generate_tokens(io.StringIO(self.SOURCE).readline):
            if token.type == tokenize.COMMENT:
                explained.add(token.start[0])
            elif token.type == tokenize.STRING and previous in (tokenize.INDENT, tokenize.NEWLINE,
                                                                 tokenize.DEDENT):
                explained.update(range(token.start[0], token.end[0] + 1))  # a docstring
            if token.type not in (tokenize.NL, tokenize.COMMENT):
                previous = token.type
        self.assertGreaterEqual(len(explained) / len(lines), 0.15)


@unittest.skipUnless(openai is not None, "the openai SDK is not installed (.ci/run installs it in a venv)")
class TestOpenAISDK(ProxyTestCase):
    def client(self, **kwargs):
        return openai.OpenAI(base_url="http://127.0.0.1:%d/v1" % self.proxy.port, api_key="unused",
                             max_retries=0, **kwargs)

    def test_non_stream(self):
        answer = self.client().chat.completions.create(model="gpt-4.1", messages=[{"role": "user", "content": "sdk"}])
        self.assertEqual(answer.choices[0].message.content, "echo: sdk")
        self.assertEqual(answer.usage.total_tokens, 5)

    def test_stream(self):
        self.fake.stream(chunk("Hel"), chunk("lo"), chunk(None, "stop"), USAGE_CHUNK, DONE)
        stream = self.client().chat.completions.create(model="gpt-4.1", messages=[{"role": "user", "content": "x"}],
                                                       stream=True, stream_options={"include_usage": True})
        parts, usage = [], None
        for event in stream:
            if event.choices:
                parts.append(event.choices[0].delta.content or "")
            if event.usage:
                usage = event.usage
        self.assertEqual("".join(parts), "Hello")
        self.assertEqual(usage.total_tokens, 7)

    def test_tools(self):
        self.fake.stream(chunk(None, tool_calls=[{"index": 0, "id": "call_1", "type": "function",
                                                  "function": {"name": "ls", "arguments": ""}}]),
                         chunk(None, tool_calls=[{"index": 0, "function": {"arguments": "{\"p\":1}"}}]),
                         chunk(None, "tool_calls"), DONE)
        stream = self.client().chat.completions.create(
            model="gpt-4.1", messages=[{"role": "user", "content": "x"}], stream=True,
            tools=[{"type": "function", "function": {"name": "ls", "parameters": {"type": "object"}}}])
        arguments, finish = "", None
        for event in stream:
            for call in event.choices[0].delta.tool_calls or []:
                arguments += call.function.arguments or ""
            finish = event.choices[0].finish_reason or finish
        self.assertEqual((json.loads(arguments), finish), ({"p": 1}, "tool_calls"))

    def test_models_list(self):
        self.assertIn("claude-sonnet-4.5", [m.id for m in self.client().models.list()])

    def test_embeddings_float_and_base64(self):
        vector = self.client().embeddings.create(model="text-embedding-3-small", input="hello").data[0].embedding
        self.assertEqual(vector, [0.5, -1.25, 5.0])  # the SDK asks for base64 and decodes it
        vector = self.client().embeddings.create(model="text-embedding-3-small", input=["hi"],
                                                 encoding_format="float").data[0].embedding
        self.assertEqual(vector, [0.5, -1.25, 2.0])

    def test_responses_create_and_stream(self):
        response = self.client().responses.create(model="gpt-5.1-codex", input="hi")
        self.assertEqual(response.output_text, "codex says hi")
        self.fake.stream(sse({"type": "response.output_text.delta", "item_id": "m", "output_index": 0,
                              "content_index": 0, "delta": "str", "sequence_number": 1, "logprobs": []}),
                         sse({"type": "response.output_text.delta", "item_id": "m", "output_index": 0,
                              "content_index": 0, "delta": "eam", "sequence_number": 2, "logprobs": []}))
        deltas = [e.delta for e in self.client().responses.create(model="gpt-5.1-codex", input="hi", stream=True)
                  if e.type == "response.output_text.delta"]
        self.assertEqual("".join(deltas), "stream")

    def test_responses_for_translated_models(self):
        """The SDK's Responses calls (whole, streamed with a tool, previous_response_id) for models
        Copilot serves on chat completions and on Messages; every answer and event is checked
        against the SDK's own types in strict mode."""
        types = openai.types.responses
        events_type = importlib.import_module("pydantic").TypeAdapter(types.ResponseStreamEvent)

        def check(value, kind):
            kind(value.model_dump(mode="json", exclude_unset=True), strict=True)
        client = self.client()
        self.addCleanup(client.close)
        chat_stream = [chunk("Hi"), tool_call_chunk(0, "call_1", "shell", '{"cmd":"ls"}'),
                       chunk(None, "tool_calls"), USAGE_CHUNK, DONE]
        for model, stream, text in (
                ("gpt-4.1", chat_stream, "echo: hi"),
                ("claude-sonnet-4.5", claude_thinking_stream(tool=("shell", '{"cmd": "ls"}')),
                 "native: 1 messages")):
            with self.subTest(model):
                self.fake.chat_script = None
                first = client.responses.create(model=model, input="hi")
                check(first, types.Response.model_validate)
                self.assertEqual(first.output_text, text)
                second = client.responses.create(model=model, input="and?", previous_response_id=first.id)
                self.assertEqual(second.previous_response_id, first.id)
                self.assertEqual(client.responses.retrieve(second.id).id, second.id)
                self.fake.stream(*stream)
                calls = []
                for event in client.responses.create(
                        model=model, input="go", tools=[TestResponsesForEveryModel.SHELL], stream=True,
                        reasoning={"effort": "low", "summary": "auto"}):
                    check(event, events_type.validate_python)
                    if event.type == "response.completed":
                        check(event.response, types.Response.model_validate)
                        calls = [item for item in event.response.output if item.type == "function_call"]
                self.assertEqual(json.loads(calls[0].arguments)["cmd"], "ls")
        with self.assertRaises(openai.BadRequestError) as ctx:
            client.responses.create(model="gpt-4.1", input="x", previous_response_id="resp_gone")
        self.assertEqual(ctx.exception.code, "previous_response_not_found")

    def test_error_classes(self):
        self.fake.routes[("POST", "/chat/completions")] = lambda h, b: h.send_json(
            429, {"error": {"message": "slow down", "code": "rate_limited"}}, [("Retry-After", "1")])
        with self.assertRaises(openai.RateLimitError) as ctx:
            self.client().chat.completions.create(model="gpt-4.1", messages=[{"role": "user", "content": "x"}])
        self.assertIn("slow down", str(ctx.exception))
        with self.assertRaises(openai.NotFoundError):
            self.client().models.retrieve("gpt-9")
        proxy = self.start_proxy(api_key="k")
        client = openai.OpenAI(base_url="http://127.0.0.1:%d/v1" % proxy.port, api_key="wrong", max_retries=0)
        with self.assertRaises(openai.AuthenticationError):
            client.models.list()


@unittest.skipUnless(anthropic is not None, "the anthropic SDK is not installed (.ci/run installs it in a venv)")
class TestAnthropicSDK(ProxyTestCase):
    def client(self, port=None, api_key="unused"):
        return anthropic.Anthropic(base_url="http://127.0.0.1:%d" % (port or self.proxy.port), api_key=api_key,
                                   max_retries=0)

    def test_create_translated_and_native(self):
        message = self.client().messages.create(model="claude-haiku-4-5", max_tokens=64,
                                                messages=[{"role": "user", "content": "sdk"}])
        self.assertEqual((message.content[0].text, message.stop_reason), ("echo: sdk", "end_turn"))
        message = self.client().messages.create(model="claude-opus-4-6", max_tokens=64,
                                                messages=[{"role": "user", "content": "sdk"}])
        self.assertEqual(message.content[0].text, "native: 1 messages")

    def test_stream(self):
        self.fake.stream(chunk("Hel"), chunk("lo"), chunk(None, "stop"), USAGE_CHUNK, DONE)
        with self.client().messages.stream(model="claude-haiku-4.5", max_tokens=64,
                                           messages=[{"role": "user", "content": "x"}]) as stream:
            text = "".join(stream.text_stream)
            final = stream.get_final_message()
        self.assertEqual(text, "Hello")
        self.assertEqual((final.usage.input_tokens, final.usage.output_tokens), (5, 2))

    def test_tool_round_trip(self):
        self.fake.stream(chunk(None, tool_calls=[{"index": 0, "id": "toolu_1", "type": "function",
                                                  "function": {"name": "get_weather", "arguments": "{\"city\":"}}]),
                         chunk(None, tool_calls=[{"index": 0, "function": {"arguments": "\"Paris\"}"}}]),
                         chunk(None, "tool_calls"), USAGE_CHUNK, DONE)
        tools = [{"name": "get_weather", "description": "weather", "input_schema": {
            "type": "object", "properties": {"city": {"type": "string"}}}}]
        messages = [{"role": "user", "content": "weather in Paris?"}]
        with self.client().messages.stream(model="claude-haiku-4.5", max_tokens=64, tools=tools,
                                           messages=messages) as stream:
            final = stream.get_final_message()
        self.assertEqual(final.stop_reason, "tool_use")
        call = final.content[0]
        self.assertEqual((call.type, call.name, call.input), ("tool_use", "get_weather", {"city": "Paris"}))
        self.fake.chat_script = None
        messages += [{"role": "assistant", "content": [c.model_dump() for c in final.content]},
                     {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "sunny"}]}]
        answer = self.client().messages.create(model="claude-haiku-4.5", max_tokens=64, tools=tools, messages=messages)
        self.assertEqual(answer.content[0].text, "echo: sunny")
        self.assertEqual(self.fake.requests_to("/chat/completions")[-1][2]["x-initiator"], "agent")

    def test_count_tokens(self):
        count = self.client().messages.count_tokens(model="claude-sonnet-4-5",
                                                    messages=[{"role": "user", "content": "hello " * 100}])
        self.assertGreaterEqual(count.input_tokens, 100)

    def test_error_classes(self):
        self.fake.routes[("POST", "/chat/completions")] = lambda h, b: h.send_json(
            429, {"error": {"message": "slow down", "code": "rate_limited"}}, [("Retry-After", "1")])
        with self.assertRaises(anthropic.RateLimitError) as ctx:
            self.client().messages.create(model="claude-haiku-4.5", max_tokens=8,
                                          messages=[{"role": "user", "content": "x"}])
        self.assertIn("slow down", str(ctx.exception))
        proxy = self.start_proxy(api_key="k")
        with self.assertRaises(anthropic.AuthenticationError):
            self.client(port=proxy.port, api_key="wrong").messages.create(
                model="claude-haiku-4.5", max_tokens=8, messages=[{"role": "user", "content": "x"}])



@unittest.skipUnless(ollama is not None, "the ollama client is not installed (.ci/run installs it in a venv)")
class TestOllamaSDK(ProxyTestCase):
    def client(self):
        client = ollama.Client(host="http://127.0.0.1:%d" % self.proxy.port)
        self.addCleanup(client.close)
        return client

    def test_list_show_and_ps(self):
        self.assertIn("claude-sonnet-4.5:latest", [m.model for m in self.client().list().models])
        show = self.client().show("claude-sonnet-4.5:latest")
        self.assertEqual((show.capabilities, show.modelinfo["claude-sonnet-4.5.context_length"]),
                         (["completion", "tools", "vision", "thinking"], 200000))
        self.assertEqual(self.client().ps().models, [])

    def test_chat_whole_and_streamed_with_a_tool_round_trip(self):
        answer = self.client().chat(model="gpt-4.1", messages=[{"role": "user", "content": "hi"}])
        self.assertEqual((answer.message.content, answer.done_reason, answer.eval_count), ("echo: hi", "stop", 2))
        self.fake.stream(*TOOL_STREAM)

        def ls(p: int) -> str:
            """List a directory.

            Args:
              p: which one
            """
            return "a b"
        messages = [{"role": "user", "content": "what is there?"}]
        parts = list(self.client().chat(model="gpt-4.1:latest", messages=messages, tools=[ls], stream=True))
        self.assertEqual("".join(p.message.content or "" for p in parts), "Hi")
        calls = [call for p in parts for call in p.message.tool_calls or []]
        self.assertEqual([(c.function.name, dict(c.function.arguments)) for c in calls], [("ls", {"p": 1})])
        self.assertTrue(parts[-1].done)
        sent = json.loads(self.fake.requests_to("/chat/completions")[-1][3])
        self.assertEqual(sent["tools"][0]["function"]["parameters"]["properties"]["p"]["type"], "integer")
        self.fake.chat_script = None
        messages += [p.message for p in parts if p.message.tool_calls] + [
            {"role": "tool", "content": "a b", "tool_name": "ls"}]
        answer = self.client().chat(model="gpt-4.1", messages=messages, tools=[ls])
        self.assertEqual(answer.message.content, "echo: a b")
        sent = json.loads(self.fake.requests_to("/chat/completions")[-1][3])["messages"]
        self.assertEqual(sent[-1]["tool_call_id"], sent[-2]["tool_calls"][0]["id"])

    def test_generate_embed_and_errors(self):
        self.assertEqual(self.client().generate(model="gpt-4.1", prompt="yo").response, "echo: yo")
        self.assertEqual(self.client().embed(model="text-embedding-3-small", input=["a", "bb"]).embeddings,
                         [[0.5, -1.25, 1.0], [0.5, -1.25, 2.0]])
        self.assertEqual(self.client().embeddings(model="text-embedding-3-small", prompt="abc").embedding,
                         [0.5, -1.25, 3.0])
        with self.assertRaises(ollama.ResponseError) as ctx:
            self.client().chat(model="gpt-9", messages=[{"role": "user", "content": "x"}])
        self.assertEqual(ctx.exception.status_code, 404)
        self.assertIn("gpt-9", ctx.exception.error)
        self.fake.stream(chunk("par"), "cut")
        with self.assertRaises(ollama.ResponseError) as ctx:
            list(self.client().chat(model="gpt-4.1", messages=[{"role": "user", "content": "x"}], stream=True))
        self.assertIn("mid-stream", ctx.exception.error)


def sdk_type(name):
    """An SDK type (a pydantic model or a union) by its dotted name."""
    module, _, attr = name.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def strict(type_name, value):
    """``value`` (a JSON-able object) validated by an SDK's own type in pydantic's strict mode:
    no coercion (a number in a string, a missing required field, a wrong literal all fail)."""
    pydantic = importlib.import_module("pydantic")
    return pydantic.TypeAdapter(sdk_type(type_name)).validate_json(json.dumps(value), strict=True)


def has_path(node, path):
    """Whether every node ``path`` leads to exists ("choices.*.message.refusal": each choice's)."""
    head, _, rest = path.partition(".")
    if head == "*":
        return isinstance(node, list) and all(has_path(item, rest) for item in node)
    if not isinstance(node, dict) or head not in node:
        return False
    return has_path(node[head], rest) if rest else True


def thinking_chunk(reasoning=None, opaque=None):
    delta = {k: v for k, v in (("reasoning_text", reasoning), ("reasoning_opaque", opaque)) if v}
    return sse({"id": "chatcmpl-up", "model": "claude-haiku-4.5", "created": 1764500000,
                "choices": [{"index": 0, "delta": delta, "finish_reason": None}]})


TOOL_STREAM = (chunk("Hi"), chunk(None, tool_calls=[{"index": 0, "id": "call_1", "type": "function", "function": {
    "name": "ls", "arguments": "{\"p\":"}}]), chunk(None, tool_calls=[{"index": 0, "function": {"arguments": "1}"}}]),
    chunk(None, "tool_calls"), USAGE_CHUNK, DONE)
THINKING_STREAM = (thinking_chunk("let me see"), thinking_chunk(opaque="sig=="), chunk("Hi"), chunk(None, "stop"),
                   USAGE_CHUNK, DONE)
RESPONSES_STREAM = (sse({"type": "response.output_text.delta", "delta": "Hi"}),
                    sse({"type": "response.output_item.added", "output_index": 1, "item": {
                        "type": "function_call", "call_id": "call_9", "name": "ls"}}),
                    sse({"type": "response.function_call_arguments.delta", "output_index": 1, "delta": "{}"}),
                    sse({"type": "response.completed", "response": {"status": "completed", "usage": {
                        "input_tokens": 6, "output_tokens": 2}}}))
NATIVE_STREAM = tuple(anthropic_event(name, data) for name, data in (
    ("message_start", {"type": "message_start", "message": {
        "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-opus-4.6", "content": [],
        "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 9, "output_tokens": 1}}}),
    ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
    ("ping", {"type": "ping"}),
    ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi"}}),
    ("content_block_stop", {"type": "content_block_stop", "index": 0}),
    ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                       "usage": {"output_tokens": 3}}),
    ("message_stop", {"type": "message_stop"})))
OLLAMA_CHAT = {"model": "gpt-4.1:latest", "messages": [{"role": "user", "content": "hi"}]}
MESSAGES_BODY = {"model": "claude-haiku-4.5", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]}

#: Every kind of answer coproxy gives, checked with the SDKs' own types in strict mode: one row per
#: route, dialect and path (native or translated), whole and streamed, errors included. A row:
#: name, method, path, body, request headers, the upstream's scripted stream (or None for its
#: whole answers), then what to check: "answer" (the type of a whole answer), "items" (of each
#: entry of its "data" list), "event" (of each stream event or NDJSON line), "error" (of an error
#: answer or a stream's failure event), "required" (paths OpenAI's spec requires that the SDK lets
#: be absent) and "status". A new translator adds its rows here.
#: A Responses request with a function and a custom tool, and reasoning summaries asked for.
RESPONSES_BODY = {"model": "gpt-4.1", "input": "hi", "reasoning": {"effort": "low", "summary": "auto"},
                  "tools": [dict(TestResponsesForEveryModel.SHELL, name="ls"),
                            TestResponsesForEveryModel.APPLY_PATCH]}
SCHEMA_CASES = [
    dict(name="chat", method="POST", path="/v1/chat/completions", body=chat_body(),
         answer="openai.types.chat.ChatCompletion", required=["choices.*.message.refusal"]),
    dict(name="chat, responses-only model", method="POST", path="/v1/chat/completions",
         body=chat_body(model="gpt-5.1-codex"), answer="openai.types.chat.ChatCompletion",
         required=["choices.*.message.refusal"]),
    dict(name="chat stream with a tool call", method="POST", path="/v1/chat/completions",
         body=chat_body(stream=True, stream_options={"include_usage": True}), script=TOOL_STREAM,
         event="openai.types.chat.ChatCompletionChunk"),
    dict(name="chat stream, responses-only model", method="POST", path="/v1/chat/completions",
         body=chat_body(model="gpt-5.1-codex", stream=True), script=RESPONSES_STREAM,
         event="openai.types.chat.ChatCompletionChunk"),
    dict(name="chat stream cut", method="POST", path="/v1/chat/completions", body=chat_body(stream=True),
         script=(chunk("par"), "cut"), event="openai.types.chat.ChatCompletionChunk",
         error="openai.types.shared.ErrorObject"),
    dict(name="chat error", method="POST", path="/v1/chat/completions", body=chat_body(model="gpt-9"),
         status=404, error="openai.types.shared.ErrorObject"),
    dict(name="responses error", method="POST", path="/v1/responses", body={"model": "gpt-9", "input": "x"},
         status=404, error="openai.types.shared.ErrorObject"),
    dict(name="responses, translated to chat", method="POST", path="/v1/responses",
         body=RESPONSES_BODY, answer="openai.types.responses.Response"),
    dict(name="responses, translated to Messages", method="POST", path="/v1/responses",
         body=dict(RESPONSES_BODY, model="claude-sonnet-4.5"), answer="openai.types.responses.Response"),
    dict(name="responses stream, translated to chat, tool call", method="POST", path="/v1/responses",
         body=dict(RESPONSES_BODY, stream=True), script=TOOL_STREAM,
         event="openai.types.responses.ResponseStreamEvent"),
    dict(name="responses stream, translated to Messages, thinking and a tool", method="POST",
         path="/v1/responses", body=dict(RESPONSES_BODY, model="claude-sonnet-4.5", stream=True),
         script=claude_thinking_stream(tool=("ls", '{"p": 1}')),
         event="openai.types.responses.ResponseStreamEvent"),
    dict(name="responses stream, translated, cut", method="POST", path="/v1/responses",
         body=dict(RESPONSES_BODY, stream=True), script=(chunk("par"), "cut"),
         event="openai.types.responses.ResponseStreamEvent",
         error="openai.types.responses.ResponseErrorEvent"),
    dict(name="responses, hosted tool refused", method="POST", path="/v1/responses",
         body=dict(RESPONSES_BODY, tools=[{"type": "web_search"}]), status=400,
         error="openai.types.shared.ErrorObject"),
    dict(name="embeddings", method="POST", path="/v1/embeddings",
         body={"model": "text-embedding-3-small", "input": ["a", "b"]}, answer="openai.types.CreateEmbeddingResponse"),
    dict(name="OpenAI models", method="GET", path="/v1/models", items="openai.types.Model"),
    dict(name="OpenAI model", method="GET", path="/v1/models/claude-sonnet-4.5", answer="openai.types.Model"),
    dict(name="messages, translated", method="POST", path="/v1/messages", body=MESSAGES_BODY,
         headers=ANTHROPIC_HEADERS, answer="anthropic.types.Message"),
    dict(name="messages, native", method="POST", path="/v1/messages", body=dict(MESSAGES_BODY, model="claude-opus-4.6"),
         headers=ANTHROPIC_HEADERS, answer="anthropic.types.Message"),
    dict(name="messages, responses-only model", method="POST", path="/v1/messages",
         body=dict(MESSAGES_BODY, model="gpt-5.1-codex"), headers=ANTHROPIC_HEADERS, answer="anthropic.types.Message"),
    dict(name="messages stream, translated, thinking", method="POST", path="/v1/messages",
         body=dict(MESSAGES_BODY, stream=True), headers=ANTHROPIC_HEADERS, script=THINKING_STREAM,
         event="anthropic.types.RawMessageStreamEvent"),
    dict(name="messages stream, translated, tool", method="POST", path="/v1/messages",
         body=dict(MESSAGES_BODY, stream=True), headers=ANTHROPIC_HEADERS, script=TOOL_STREAM,
         event="anthropic.types.RawMessageStreamEvent"),
    dict(name="messages stream, native", method="POST", path="/v1/messages",
         body=dict(MESSAGES_BODY, model="claude-opus-4.6", stream=True), headers=ANTHROPIC_HEADERS,
         script=NATIVE_STREAM, event="anthropic.types.RawMessageStreamEvent"),
    dict(name="messages stream, responses-only model", method="POST", path="/v1/messages",
         body=dict(MESSAGES_BODY, model="gpt-5.1-codex", stream=True), headers=ANTHROPIC_HEADERS,
         script=RESPONSES_STREAM, event="anthropic.types.RawMessageStreamEvent"),
    dict(name="messages stream cut", method="POST", path="/v1/messages", body=dict(MESSAGES_BODY, stream=True),
         headers=ANTHROPIC_HEADERS, script=(chunk("par"), "cut"), event="anthropic.types.RawMessageStreamEvent",
         error="anthropic.types.ErrorResponse"),
    dict(name="messages error", method="POST", path="/v1/messages", body=dict(MESSAGES_BODY, model="gpt-9"),
         headers=ANTHROPIC_HEADERS, status=404, error="anthropic.types.ErrorResponse"),
    dict(name="messages bad request", method="POST", path="/v1/messages", body={"model": "claude-haiku-4.5"},
         headers=ANTHROPIC_HEADERS, status=400, error="anthropic.types.ErrorResponse"),
    dict(name="count_tokens", method="POST", path="/v1/messages/count_tokens", body=MESSAGES_BODY,
         headers=ANTHROPIC_HEADERS, answer="anthropic.types.MessageTokensCount"),
    dict(name="Anthropic models", method="GET", path="/v1/models?limit=3", headers=ANTHROPIC_HEADERS,
         items="anthropic.types.ModelInfo", required=["has_more", "first_id", "last_id"]),
    dict(name="Anthropic model", method="GET", path="/v1/models/claude-sonnet-4-5", headers=ANTHROPIC_HEADERS,
         answer="anthropic.types.ModelInfo"),
    dict(name="Anthropic models error", method="GET", path="/v1/models?limit=0", headers=ANTHROPIC_HEADERS,
         status=400, error="anthropic.types.ErrorResponse"),
    dict(name="Ollama tags", method="GET", path="/api/tags", answer="ollama._types.ListResponse"),
    dict(name="Ollama ps", method="GET", path="/api/ps", answer="ollama._types.ProcessResponse"),
    dict(name="Ollama show", method="POST", path="/api/show", body={"model": "claude-sonnet-4.5"},
         answer="ollama._types.ShowResponse", required=["capabilities", "model_info", "details.family"]),
    dict(name="Ollama chat", method="POST", path="/api/chat", body=dict(OLLAMA_CHAT, stream=False),
         answer="ollama._types.ChatResponse", required=["done_reason", "eval_count", "total_duration"]),
    dict(name="Ollama chat, responses-only model", method="POST", path="/api/chat",
         body=dict(OLLAMA_CHAT, model="gpt-5.1-codex", stream=False), answer="ollama._types.ChatResponse"),
    dict(name="Ollama chat stream with a tool call", method="POST", path="/api/chat", body=OLLAMA_CHAT,
         script=TOOL_STREAM, event="ollama._types.ChatResponse"),
    dict(name="Ollama chat stream, responses-only model", method="POST", path="/api/chat",
         body=dict(OLLAMA_CHAT, model="gpt-5.1-codex"), script=RESPONSES_STREAM, event="ollama._types.ChatResponse"),
    dict(name="Ollama chat stream cut", method="POST", path="/api/chat", body=OLLAMA_CHAT, script=(chunk("p"), "cut"),
         event="ollama._types.ChatResponse", error="ollama"),
    dict(name="Ollama generate stream", method="POST", path="/api/generate", body={"model": "gpt-4.1", "prompt": "p"},
         script=THINKING_STREAM, event="ollama._types.GenerateResponse"),
    dict(name="Ollama embed", method="POST", path="/api/embed", body={"model": "text-embedding-3-small", "input": "a"},
         answer="ollama._types.EmbedResponse"),
    dict(name="Ollama embeddings", method="POST", path="/api/embeddings",
         body={"model": "text-embedding-3-small", "prompt": "a"}, answer="ollama._types.EmbeddingsResponse"),
    dict(name="Ollama error", method="POST", path="/api/chat", body=dict(OLLAMA_CHAT, model="gpt-9"), status=404,
         error="ollama"),
]


def answer_parts(body, content_type):
    """The JSON objects of an answer: one for JSON, one per SSE event (its name kept as
    "_event"; [DONE] left out), one per NDJSON line."""
    if content_type.startswith("text/event-stream"):
        parts = []
        for event, data in coproxy.SSEDecoder().feed(body + b"\n\n"):
            if data != "[DONE]":
                parts.append(dict(json.loads(data), _event=event))
        return parts
    if content_type.startswith("application/x-ndjson"):
        return [json.loads(line) for line in body.decode().splitlines() if line]
    return [json.loads(body)]


@unittest.skipUnless(openai is not None and anthropic is not None and ollama is not None,
                     "the openai, anthropic and ollama packages are not installed (.ci/run installs them)")
class TestSchemas(ProxyTestCase):
    """Every answer of SCHEMA_CASES validated by the official SDKs' types in strict mode."""

    def check_error(self, type_name, part):
        if type_name == "ollama":  # Ollama's envelope has no SDK type: {"error": "message"}
            self.assertEqual((list(part), type(part["error"])), (["error"], str))
        elif type_name.startswith("openai") and isinstance(part.get("error"), dict):
            strict(type_name, part["error"])   # the SDK types what is inside {"error": ...}
        else:
            strict(type_name, {k: v for k, v in part.items() if k != "_event"})

    def check_case(self, case):
        self.fake.chat_script = None
        if case.get("script"):
            self.fake.stream(*case["script"])
        status, headers, body = self.request(case["method"], case["path"], case.get("body"), case.get("headers"))
        self.assertEqual(status, case.get("status", 200), body[:300])
        parts = answer_parts(body, headers.get("Content-Type", ""))
        if case.get("error") and status != 200:
            return self.check_error(case["error"], parts[0])
        failed = [p for p in parts if p.get("_event") == "error" or set(p) <= {"error", "_event"}]
        if case.get("error"):
            self.assertEqual(len(failed), 1, "one failure event")
            self.check_error(case["error"], failed[0])
        else:
            self.assertEqual(failed, [])
        for part in parts:
            if part in failed or part.get("_event") == "ping":  # the SDKs read pings apart
                continue
            part.pop("_event", None)
            for path in case.get("required", ()):
                self.assertTrue(has_path(part, path), path)
            if case.get("items"):
                for item in part["data"]:
                    strict(case["items"], item)
            else:
                strict(case.get("answer") or case["event"], part)

    def test_every_answer_validates_in_strict_mode(self):
        for case in SCHEMA_CASES:
            with self.subTest(case["name"]):
                self.check_case(case)

    def test_the_check_catches_what_it_is_for(self):
        pydantic = importlib.import_module("pydantic")
        with self.assertRaises(pydantic.ValidationError):  # a thinking block opened without its signature
            strict("anthropic.types.RawMessageStreamEvent", {"type": "content_block_start", "index": 0,
                                                             "content_block": {"type": "thinking", "thinking": ""}})
        info = coproxy.anthropic_model_info(CATALOG[1])
        del info["capabilities"]["effort"]["high"]
        with self.assertRaises(pydantic.ValidationError):
            strict("anthropic.types.ModelInfo", info)
        self.assertFalse(has_path({"choices": [{"message": {"content": "x"}}]}, "choices.*.message.refusal"))


# ------------------------------------------------------------------------------------------
# Benchmark: python3 test_coproxy.py --bench  (figures for issue "lightest proxy, measured").
# A fast asyncio fake upstream (the threaded one above is correct but not fast), closed-loop
# load from separate processes, coproxy as a real `serve` subprocess; CPU and RSS from /proc.
# Everything here serves only --bench, except TestBenchJudging at the end (the verdicts).
# ------------------------------------------------------------------------------------------

BENCH_ANSWER = json.dumps({"id": "chatcmpl-bench", "model": "gpt-4.1", "choices": [{
    "index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "Hello from the bench."}}],
    "usage": {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17}}).encode()


#: One streamed chunk as Copilot sends it for a GPT model (content-filter fields included); the
#: content carries the upstream's send time, so clients can measure each chunk's delay.
BENCH_CHUNK = (b'data: {"choices":[{"index":0,"content_filter_offsets":{"check_offset":3562,"start_offset":3562,'
               b'"end_offset":3570},"content_filter_results":{"hate":{"filtered":false,"severity":"safe"},'
               b'"self_harm":{"filtered":false,"severity":"safe"},"sexual":{"filtered":false,"severity":"safe"},'
               b'"violence":{"filtered":false,"severity":"safe"}},"delta":{"content":"t%d"}}],"created":1764500000,'
               b'"id":"chatcmpl-CYx8mQ2bench","model":"gpt-4.1-2025-04-14","system_fingerprint":"fp_bench"}\n\n')


class BenchUpstream(asyncio.Protocol):
    """Minimal keep-alive HTTP/1.1 upstream: token exchange, /models, chat (JSON or a paced SSE
    stream whose shape the request sets with bench_chunks / bench_interval), /__stats."""

    stats = {"connections": 0}
    base_url = ""
    #: with N > 0 (the soak), every connection ends after N answers: "Connection: close", as
    #: servers and load balancers do, so that coproxy's pool and its retry are part of the run
    close_after = 0

    def connection_made(self, transport):
        self.transport = transport
        self.buf = b""
        self.answers_left = self.close_after
        BenchUpstream.stats["connections"] += 1
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data):
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end]
            match = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
            length = int(match.group(1)) if match else 0
            if len(self.buf) < end + 4 + length:
                return
            body = self.buf[end + 4:end + 4 + length]
            self.buf = self.buf[end + 4 + length:]
            self.handle(head.split(b" ", 2)[1], body)

    def last_answer(self):
        """True when this answer ends the connection (close_after); then it says so."""
        self.answers_left -= 1
        return self.answers_left == 0

    def send(self, body, status=b"200 OK", ctype=b"application/json"):
        last = self.last_answer()
        self.transport.write(b"HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n%s\r\n%s"
                             % (status, ctype, len(body), b"Connection: close\r\n" if last else b"", body))
        if last:
            self.transport.close()

    def handle(self, path, body):
        if path == b"/chat/completions":
            if b'"stream":true' in body or b'"stream": true' in body:
                payload = json.loads(body)
                asyncio.get_event_loop().create_task(self.stream(payload.get("bench_chunks", 20),
                                                                 payload.get("bench_interval", 0.0)))
            else:
                self.send(BENCH_ANSWER)
        elif path == b"/copilot_internal/v2/token":
            self.send(json.dumps({"token": "tid=bench;exp=9999999999", "expires_at": int(time.time()) + 3600,
                                  "refresh_in": 3000, "endpoints": {"api": self.base_url}}).encode())
        elif path == b"/models":
            self.send(json.dumps({"data": CATALOG}).encode())
        elif path == b"/__stats":
            self.send(json.dumps(BenchUpstream.stats).encode())
        else:
            self.send(b"{}", b"404 Not Found")

    async def stream(self, chunks, interval):
        write = self.transport.write
        last = self.last_answer()
        write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n%s\r\n"
              % (b"Connection: close\r\n" if last else b""))
        for _ in range(chunks):
            event = BENCH_CHUNK % time.monotonic_ns()
            write(b"%x\r\n%s\r\n" % (len(event), event))
            await asyncio.sleep(interval)
            if self.transport.is_closing():
                return
        tail = (b'data: {"id":"c","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
                b'data: {"id":"c","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}\n\n'
                b"data: [DONE]\n\n")
        write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(tail), tail))
        if last:
            self.transport.close()


def bench_upstream_process(port_queue, tmp, close_after=0):
    """The fake upstream twice: plain HTTP and TLS (what real Copilot speaks); puts both ports."""
    BenchUpstream.close_after = close_after

    async def main():
        loop = asyncio.get_running_loop()
        ports = []
        for context in (None, tls_server_context()):
            holder = {}

            def factory(holder=holder):
                protocol = BenchUpstream()
                protocol.base_url = holder["url"]
                return protocol
            server = await loop.create_server(factory, "127.0.0.1", 0, backlog=4096, ssl=context)
            port = server.sockets[0].getsockname()[1]
            holder["url"] = "%s://127.0.0.1:%d" % ("https" if context else "http", port)
            ports.append(port)
        port_queue.put(tuple(ports))
        await asyncio.Event().wait()
    asyncio.run(main())


def bench_connect_proxy_process(port_queue, upstream_port):
    """An HTTP proxy that only does CONNECT (as corporate proxies do for HTTPS), on asyncio.
    Whatever host a CONNECT names, the tunnel goes to the fake TLS upstream on loopback: the
    bench never dials out, and a proxy under test that calls api.github.com (--versus) reaches
    the same upstream as coproxy does."""
    async def pipe(reader, writer):
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def handle(reader, writer):
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"CONNECT "):
                raise ValueError("not a CONNECT")
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", upstream_port)
        except (OSError, asyncio.IncompleteReadError, ValueError):
            writer.close()
            return
        for w in (writer, up_writer):
            w.transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def main():
        server = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=4096)
        port_queue.put(server.sockets[0].getsockname()[1])
        await asyncio.Event().wait()
    asyncio.run(main())


def bench_request(path, body=None, method="POST"):
    body = json.dumps(body).encode() if body is not None else b""
    return (b"%s %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (method.encode(), path.encode(), len(body), body))


def _response_complete(buf):
    """Length of the first complete response in buf (Content-Length or chunked), or 0."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return 0
    match = re.search(rb"(?i)\r\ncontent-length: *(\d+)", buf[:end])
    if match:
        total = end + 4 + int(match.group(1))
        return total if len(buf) >= total else 0
    terminator = buf.find(b"\r\n0\r\n\r\n", end)
    return terminator + 7 if terminator >= 0 else 0


def bench_exchange(sock, request, port=None):
    """Seconds for one request and its whole answer, on ``sock`` or on a new connection to ``port``."""
    conn = sock or socket.create_connection(("127.0.0.1", port))
    try:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        start = time.perf_counter()
        conn.sendall(request)
        buf = b""
        while not _response_complete(buf):
            buf += conn.recv(65536)
        return time.perf_counter() - start
    finally:
        if sock is None:
            conn.close()


def bench_closed_loop(port, request, connections, duration, result_queue):
    """``connections`` keep-alive connections, each sending the next request when the previous
    answer is complete; reports (completed, latencies in seconds)."""
    import selectors
    sel = selectors.DefaultSelector()
    state = {}
    for _ in range(connections):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        state[sock] = [b"", 0.0]
        sel.register(sock, selectors.EVENT_READ)
    latencies = []
    done = 0
    now = time.perf_counter
    for sock, st in state.items():
        st[1] = now()
        sock.send(request)
    deadline = now() + duration
    while now() < deadline:
        for key, _ in sel.select(0.1):
            sock = key.fileobj
            st = state[sock]
            data = sock.recv(262144)
            if not data:
                raise RuntimeError("server closed a benchmark connection")
            st[0] += data
            size = _response_complete(st[0])
            if size:
                t = now()
                latencies.append(t - st[1])
                done += 1
                st[0] = st[0][size:]
                st[1] = t
                sock.send(request)
    for sock in state:
        sock.close()
    result_queue.put((done, latencies))


def bench_streams(port, request, count, result_queue, release=None):
    """Open ``count`` streams at once; report per stream (time to first chunk, completed, chunk
    delays in seconds from the upstream's timestamp to arrival here)."""
    import selectors
    sel = selectors.DefaultSelector()
    state = {}
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        state[sock] = {"buf": b"", "start": 0.0, "first": None, "seen": 0, "done": False}
        sel.register(sock, selectors.EVENT_READ)
    for sock, st in state.items():
        st["start"] = time.perf_counter()
        sock.send(request)
    delays, open_count = [], count
    pattern = re.compile(rb"t(\d{12,})")
    while open_count:
        events = sel.select(60)
        if not events:
            break
        for key, _ in events:
            sock = key.fileobj
            st = state[sock]
            data = sock.recv(262144)
            arrived = time.monotonic_ns()
            if st["first"] is None and data:
                st["first"] = time.perf_counter() - st["start"]
            for match in pattern.finditer(data):
                delays.append((arrived - int(match.group(1))) / 1e9)
            st["buf"] = (st["buf"] + data)[-16:]
            if not data or st["buf"].endswith(b"\r\n0\r\n\r\n"):
                st["done"] = bool(data)
                sel.unregister(sock)
                sock.close()
                open_count -= 1
    result_queue.put(([st["first"] for st in state.values()], sum(st["done"] for st in state.values()), delays))


def percentile(values, q):
    values = sorted(values)
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(round(q / 100.0 * (len(values) - 1))))]


class Bench:
    """Runs every figure for 'direct' (to the fake upstream) and 'via' (through coproxy)."""

    def __init__(self, repetitions, close_after=0):
        import multiprocessing
        self.mp = multiprocessing.get_context("fork")
        self.repetitions = repetitions
        self.tmp = tempfile.mkdtemp(prefix="coproxy-bench-")
        queue = self.mp.Queue()
        self.upstream = self.mp.Process(target=bench_upstream_process, args=(queue, self.tmp, close_after),
                                        daemon=True)
        self.upstream.start()
        self.upstream_port, self.upstream_tls_port = queue.get(timeout=10)
        self.connect_proxy = self.mp.Process(target=bench_connect_proxy_process,
                                             args=(queue, self.upstream_tls_port), daemon=True)
        self.connect_proxy.start()
        self.connect_proxy_port = queue.get(timeout=10)
        self.ca_file = os.path.join(self.tmp, "ca.pem")
        with open(self.ca_file, "w") as f:
            f.write(TEST_CA_PEM)
        self.proxy = self.proxy_port = None

    def launch(self, tls=False):
        """(process, port, seconds from launch to the first /healthz 200) of a new `serve`; with
        ``tls``, the upstream is the TLS one, reached through the CONNECT proxy (HTTPS_PROXY)."""
        env = dict(os.environ, GHCP_GITHUB_TOKEN="ghu_bench")
        env = {k: v for k, v in env.items() if k.lower() not in ("https_proxy", "http_proxy", "no_proxy", "all_proxy")}
        if tls:
            url = "https://127.0.0.1:%d" % self.upstream_tls_port
            env["HTTPS_PROXY"] = "http://127.0.0.1:%d" % self.connect_proxy_port
            extra = ["--ca-file", self.ca_file] + os.environ.get("BENCH_SERVE_ARGS", "").split()
        else:
            url = "http://127.0.0.1:%d" % self.upstream_port
            extra = []
        extra += ["--state-dir", tempfile.mkdtemp(dir=self.tmp)]  # one serve per state dir
        started = time.perf_counter()
        process = subprocess.Popen(
            [sys.executable, COPROXY_PY, "serve", "--port", "0", "--github-url", url,
             "--github-api-url", url] + extra,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        line = process.stderr.readline()
        found = re.search(r"listening on http://127.0.0.1:(\d+)$", line.strip())
        if not found:
            raise RuntimeError("serve did not start: %s%s" % (line, process.stderr.read()))
        port = int(found.group(1))
        while True:  # a measurement, not a test: poll until the first 200
            try:
                if http_request(port, "GET", "/healthz", timeout=1)[0] == 200:
                    break
            except OSError:
                time.sleep(0.001)
        elapsed = time.perf_counter() - started
        threading.Thread(target=process.stderr.read, daemon=True).start()
        return process, port, elapsed

    def start_proxy(self):
        self.proxy, self.proxy_port, first = self.launch()
        self.start_times = [first]

    def more_start_times(self, count):
        """Start and stop ``count`` more servers: one start is too noisy a sample to judge by."""
        for _ in range(count):
            process, _, elapsed = self.launch()
            process.send_signal(signal.SIGTERM)
            process.wait(20)
            self.start_times.append(elapsed)

    def stop(self):
        if self.proxy:
            self.proxy.send_signal(signal.SIGTERM)
            self.proxy.wait(20)
        self.upstream.terminate()
        self.connect_proxy.terminate()
        shutil.rmtree(self.tmp, True)

    def cpu_seconds(self, pid=None):
        with open("/proc/%d/stat" % (pid or self.proxy.pid)) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def thread_cpu(pid):
        """{thread id: (user + system) seconds} of every thread of ``pid`` (threads that ended
        are counted in the process total only; the bench reads both)."""
        out = {}
        for tid in os.listdir("/proc/%d/task" % pid):
            try:
                with open("/proc/%d/task/%s/stat" % (pid, tid)) as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            out[int(tid)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return out

    def rss_mb(self):
        with open("/proc/%d/status" % self.proxy.pid) as f:
            return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1)) / 1024.0

    def upstream_connections(self):
        return json.loads(http_request(self.upstream_port, "GET", "/__stats")[2])["connections"]

    def run_workers(self, target, port, request, total, workers, *extra):
        queue = self.mp.Queue()
        shares = [total // workers + (1 if i < total % workers else 0) for i in range(workers)]
        processes = [self.mp.Process(target=target, args=(port, request, n) + extra + (queue,))
                     for n in shares if n]
        for process in processes:
            process.start()
        results = [queue.get(timeout=300) for _ in processes]
        for process in processes:
            process.join(10)
        return results

    def throughput(self, port, clients, duration=2.0):
        request = bench_request("/v1/chat/completions" if port == self.proxy_port else "/chat/completions",
                                {"model": "gpt-4.1", "messages": [{"role": "user", "content": "hi"}]})
        results = self.run_workers(bench_closed_loop, port, request, clients, min(clients, 2), duration)
        done = sum(r[0] for r in results)
        latencies = [x for r in results for x in r[1]]
        return done / duration, percentile(latencies, 50) * 1000

    def stream_request(self, port, chunks, interval):
        return bench_request("/v1/chat/completions" if port == self.proxy_port else "/chat/completions",
                             {"model": "gpt-4.1", "stream": True, "bench_chunks": chunks, "bench_interval": interval,
                              "messages": [{"role": "user", "content": "hi"}]})

    def ttfb(self, port, samples=200):
        request = self.stream_request(port, 1, 0)
        return percentile([self._one_stream(port, request) for _ in range(samples)], 50) * 1000

    def _one_stream(self, port, request):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        start = time.perf_counter()
        sock.sendall(request)
        first = None
        buf = b""
        while True:
            data = sock.recv(65536)
            if not data:
                break
            buf += data
            if first is None and b"data:" in buf:
                first = time.perf_counter() - start
            if buf.endswith(b"\r\n0\r\n\r\n"):
                break
        sock.close()
        return first

    def chunk_delays(self, port):
        request = self.stream_request(port, 500, 0.002)
        (firsts, done, delays), = self.run_workers(bench_streams, port, request, 1, 1)
        return delays

    def tls_streams(self):
        """The condition real Copilot streams arrive in: TLS through an HTTPS_PROXY tunnel, 50
        simultaneous streams of 200 chunks, one chunk every 5 ms per stream. Returns (proxy CPU
        seconds per 10,000 chunks, the event-loop thread's share of it, chunks received)."""
        process, port, _ = self.launch(tls=True)
        try:
            request = self.stream_request(port, 1, 0)  # warm: token, catalogue, a few pooled tunnels
            for _ in range(3):
                self._one_stream(port, request)
            results = []
            for _ in range(self.repetitions):
                request = self.stream_request(port, 200, 0.005)
                before, threads_before = self.cpu_seconds(process.pid), self.thread_cpu(process.pid)
                runs = self.run_workers(bench_streams, port, request, 50, 2)
                total = self.cpu_seconds(process.pid) - before
                loop = self.thread_cpu(process.pid).get(process.pid, 0) - threads_before.get(process.pid, 0)
                chunks = sum(len(r[2]) for r in runs)
                results.append((total / chunks * 10000, loop / max(total, 1e-9), chunks))
            return sorted(results)[len(results) // 2]
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(20)

    def tls_probe_connection(self):
        """A kept-alive TLS connection to the fake upstream through the CONNECT proxy: the "direct" path."""
        sock = socket.create_connection(("127.0.0.1", self.connect_proxy_port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(b"CONNECT 127.0.0.1:%d HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % self.upstream_tls_port)
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(1024)
        return ssl.create_default_context(cafile=self.ca_file).wrap_socket(sock, server_hostname="127.0.0.1")

    def tls_many_streams(self):
        """1,000 simultaneous TLS streams through the tunnel (30 chunks, 500 ms apart): (first chunk
        p50 in s, completed, p50 ms of small non-stream requests sent meanwhile straight to the
        upstream through the tunnel, and through coproxy; the two interleaved, 100 of each)."""
        process, port, _ = self.launch(tls=True)
        direct_conn = self.tls_probe_connection()
        try:
            self._one_stream(port, self.stream_request(port, 1, 0))
            request = self.stream_request(port, 30, 0.5)
            queue = self.mp.Queue()
            processes = [self.mp.Process(target=bench_streams, args=(port, request, n, queue)) for n in (500, 500)]
            for p in processes:
                p.start()
            time.sleep(2.0)  # let the streams open before probing
            body = {"model": "gpt-4.1", "messages": [{"role": "user", "content": "probe"}]}
            direct_probe, via_probe = bench_request("/chat/completions", body), bench_request("/v1/chat/completions", body)
            direct, via = [], []
            for _ in range(100):
                direct.append(bench_exchange(direct_conn, direct_probe))
                via.append(bench_exchange(None, via_probe, port))
                time.sleep(0.05)
            results = [queue.get(timeout=300) for _ in processes]
            for p in processes:
                p.join(10)
            firsts = [f for r in results for f in r[0] if f is not None]
            return (percentile(firsts, 50), sum(r[1] for r in results), percentile(direct, 50) * 1000,
                    percentile(via, 50) * 1000)
        finally:
            direct_conn.close()
            process.send_signal(signal.SIGTERM)
            process.wait(30)

    def tls_rows(self):
        """The figures of the path users have: TLS upstream through an HTTPS_PROXY tunnel."""
        cpu, loop_share, chunks = self.tls_streams()
        first, completed, direct, via = self.tls_many_streams()
        return [("TLS+CONNECT: proxy CPU per 10,000 chunks, 50 streams (s)", None, cpu, "<=", 0.5, "%.3f"),
                ("TLS+CONNECT: event loop's share of that CPU (%)", None, loop_share * 100, "info", None, "%.0f"),
                ("TLS+CONNECT: 1,000 streams completed", None, completed, ">=", 1000, "%d"),
                ("TLS+CONNECT: 1,000 streams, 1st chunk p50 (s)", None, first, "<=", 2.0, "%.2f"),
                ("TLS+CONNECT: small request during 1,000 streams, p50 (ms)", direct, via, "<=", 1.5, "%.2f")]

    def run(self):
        rows = []
        reps = self.repetitions
        med = lambda xs: percentile(xs, 50)

        def both(fn, *args):
            direct = [fn(self.upstream_port, *args) for _ in range(reps)]
            via = [fn(self.proxy_port, *args) for _ in range(reps)]
            return direct, via

        self.start_proxy()
        rss_start = self.rss_mb()
        for clients in (1, 16, 64):
            direct, via = both(self.throughput, clients)
            rows.append(("non-stream req/s, %d client%s" % (clients, "s" if clients > 1 else ""),
                         med([d[0] for d in direct]), med([v[0] for v in via]), ">=", {1: 1400, 16: 1500, 64: 1500}[clients], "%.0f"))
            if clients == 1:
                p50 = (med([d[1] for d in direct]), med([v[1] for v in via]))
        rows.append(("p50 latency, 1 client (ms)", p50[0], p50[1], "<=", 0.6, "%.2f"))

        request = bench_request("/v1/chat/completions", {"model": "gpt-4.1", "messages": [{"role": "user", "content": "hi"}]})
        cpu = []
        for _ in range(reps):
            before = self.cpu_seconds()
            (done, _), = self.run_workers(bench_closed_loop, self.proxy_port, request, 1, 1, 2.0)
            cpu.append((self.cpu_seconds() - before) / done * 1000)
        rows.append(("proxy CPU per request (ms)", None, med(cpu), "<=", 0.5, "%.3f"))

        direct, via = both(self.ttfb)
        rows.append(("stream time to first byte (ms)", med(direct), med(via), "<=", 1.5, "%.2f"))

        direct_delays = [x for _ in range(reps) for x in self.chunk_delays(self.upstream_port)]
        via_delays = [x for _ in range(reps) for x in self.chunk_delays(self.proxy_port)]
        for q, target in ((50, 0.3), (99, 1.0)):
            added = (percentile(via_delays, q) - percentile(direct_delays, q)) * 1000
            rows.append(("added delay per chunk p%d (ms)" % q, percentile(direct_delays, q) * 1000,
                         percentile(via_delays, q) * 1000, "<=", target, "%.3f", added))

        cpu = []
        for _ in range(reps):
            request = self.stream_request(self.proxy_port, 1000, 0)
            before = self.cpu_seconds()
            results = self.run_workers(bench_streams, self.proxy_port, request, 10, 2)
            chunks = sum(len(r[2]) for r in results)
            cpu.append((self.cpu_seconds() - before) / chunks * 10000)
        rows.append(("proxy CPU per 10,000 streamed chunks (s)", None, med(cpu), "<=", 0.6, "%.3f"))
        rss_after_load = self.rss_mb()

        many = {}
        for name, port in (("direct", self.upstream_port), ("via", self.proxy_port)):
            request = self.stream_request(port, 40, 0.05)
            queue = self.mp.Queue()
            shares = (500, 500)
            processes = [self.mp.Process(target=bench_streams, args=(port, request, n, queue)) for n in shares]
            peak = [0.0]
            sampling = threading.Event()
            if name == "via":  # the peak over the streams' whole life, not one moment of it
                def sample():
                    while not sampling.wait(0.02):
                        peak[0] = max(peak[0], self.rss_mb())
                sampler = threading.Thread(target=sample, daemon=True)
                sampler.start()
            for process in processes:
                process.start()
            small = []
            time.sleep(1.0)  # let the streams open before probing
            probe = bench_request("/v1/chat/completions" if name == "via" else "/chat/completions",
                                  {"model": "gpt-4.1", "messages": [{"role": "user", "content": "probe"}]})
            for _ in range(20):
                small.append(bench_exchange(None, probe, port))
            results = [queue.get(timeout=300) for _ in processes]
            sampling.set()
            for process in processes:
                process.join(10)
            firsts = [f for r in results for f in r[0] if f is not None]
            many[name] = (sum(r[1] for r in results), percentile(firsts, 50), percentile(small, 50) * 1000, peak[0])
        rows.append(("1,000 concurrent streams: completed", many["direct"][0], many["via"][0], ">=", 1000, "%d"))
        rows.append(("1,000 concurrent streams: 1st chunk p50 (s)", many["direct"][1], many["via"][1], "<=", 1.0, "%.2f"))
        rows.append(("small request while 1,000 streams run, p50 (ms)", many["direct"][2], many["via"][2], "<=", 2.0, "%.2f"))
        rows.append(("RSS at start (MB)", None, rss_start, "info", None, "%.1f"))
        rows.append(("RSS growth after load (MB)", None, rss_after_load - rss_start, "<=", 10, "%.1f"))
        rows.append(("RSS with 1,000 streams, peak (MB)", None, many["via"][3], "<=", 150, "%.1f"))
        self.more_start_times(max(4, 2 * reps - 1))
        rows.append(("start to first /healthz 200 (ms), median of %d" % len(self.start_times), None,
                     percentile(self.start_times, 50) * 1000, "<=", 150, "%.0f"))
        before = self.upstream_connections()
        sequential = bench_request("/v1/chat/completions", {"model": "gpt-4.1", "messages": [{"role": "user", "content": "x"}]})
        sock = socket.create_connection(("127.0.0.1", self.proxy_port))
        for _ in range(100):
            sock.sendall(sequential)
            buf = b""
            while not _response_complete(buf):
                buf += sock.recv(65536)
        sock.close()
        rows.append(("new upstream connections per 100 sequential requests", None,
                     self.upstream_connections() - before - 1, "<=", 1, "%d"))  # -1: the /__stats probe itself
        return rows


def listening_pid(port):
    """The pid of the local process listening on TCP ``port`` (from /proc), or None: the bench
    reads another proxy's CPU by the port it was given, whatever started that proxy."""
    sockets = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = [line.split() for line in f.read().splitlines()[1:]]
        except OSError:
            continue
        sockets.update("socket:[%s]" % row[9] for row in rows
                       if row[3] == "0A" and int(row[1].rsplit(":", 1)[1], 16) == port)
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir("/proc/%s/fd" % pid)
            if any(os.readlink("/proc/%s/fd/%s" % (pid, fd)) in sockets for fd in fds):
                return int(pid)
        except OSError:
            continue
    return None


#: The four figures of `--bench --versus`: (name, what is better, goal for coproxy / other).
VERSUS_FIGURES = [("CPU per non-stream request, 16 clients (ms)", "lower", 0.5),
                  ("non-stream requests/s, 64 clients", "higher", 1.5),
                  ("p50 latency, 1 client (ms)", "lower", 0.5),
                  ("1,000 streams opened at once, 1st chunk p50 (s)", "lower", 0.5)]


def versus_figures(bench, port, pid):
    """One round of the four VERSUS_FIGURES for the proxy on ``port`` (process ``pid``)."""
    chat = bench_request("/v1/chat/completions",
                         {"model": "gpt-4.1", "messages": [{"role": "user", "content": "hi"}]})
    before = bench.cpu_seconds(pid)
    results = bench.run_workers(bench_closed_loop, port, chat, 16, 2, 2.0)
    cpu_ms = (bench.cpu_seconds(pid) - before) / max(1, sum(r[0] for r in results)) * 1000
    results = bench.run_workers(bench_closed_loop, port, chat, 64, 2, 2.0)
    per_second = sum(r[0] for r in results) / 2.0
    (_, latencies), = bench.run_workers(bench_closed_loop, port, chat, 1, 1, 2.0)
    streams = bench_request("/v1/chat/completions", {
        "model": "gpt-4.1", "stream": True, "bench_chunks": 30, "bench_interval": 0.5,
        "messages": [{"role": "user", "content": "hi"}]})
    results = bench.run_workers(bench_streams, port, streams, 1000, 2)
    firsts = [first for r in results for first in r[0] if first is not None]
    if sum(r[1] for r in results) < 1000:
        print("versus: only %d of 1,000 streams on port %d completed" % (
            sum(r[1] for r in results), port), flush=True)
    return [cpu_ms, per_second, percentile(latencies, 50) * 1000, percentile(firsts, 50)]


def run_versus(bench, url, timeout=600):
    """`--bench --versus URL`: coproxy (over TLS, through the CONNECT proxy) against another,
    already-running proxy at URL, the four VERSUS_FIGURES interleaved round by round (the medians
    and their ratios are printed). The bench prints where its CONNECT proxy and CA are, then
    waits for URL to answer /v1/models: start the other proxy with HTTPS_PROXY at that proxy;
    every host it dials reaches the fake TLS upstream, whose certificate is for 127.0.0.1."""
    other_port = int(re.match(r"^http://127\.0\.0\.1:(\d+)/?$", url).group(1))
    print("versus: HTTPS_PROXY=http://127.0.0.1:%d CA=%s UPSTREAM=https://127.0.0.1:%d; "
          "waiting for %s" % (bench.connect_proxy_port, bench.ca_file, bench.upstream_tls_port,
                              url), flush=True)
    deadline = time.monotonic() + timeout
    while True:
        try:
            if http_request(other_port, "GET", "/v1/models", timeout=5)[0] == 200:
                break
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit("versus: %s did not answer /v1/models in %d s" % (url, timeout))
        time.sleep(0.2)
    bench.proxy, port, _ = bench.launch(tls=True)
    targets = [("coproxy", port, bench.proxy.pid), ("other", other_port, listening_pid(other_port))]
    if targets[1][2] is None:
        raise SystemExit("versus: no process of this user listens on port %d" % other_port)
    for _, target_port, _ in targets:  # warm: tokens, catalogue, pooled tunnels
        bench.run_workers(bench_closed_loop, target_port, bench_request(
            "/v1/chat/completions", {"model": "gpt-4.1", "messages": [{"role": "user", "content": "w"}]}),
            16, 2, 1.0)
    rounds = {name: [] for name, _, _ in targets}
    for index in range(bench.repetitions):
        # ABBA: whichever goes second in a round meets a warmer (or busier) machine
        for name, target_port, pid in (targets if index % 2 == 0 else targets[::-1]):
            rounds[name].append(versus_figures(bench, target_port, pid))
            print("versus: %s %s" % (name, " ".join("%.3f" % x for x in rounds[name][-1])),
                  flush=True)
    print("%-50s %10s %10s %8s %8s" % ("figure (median of %d rounds)" % bench.repetitions,
                                       "coproxy", "other", "ratio", "goal"))
    misses = 0
    for index, (name, better, goal) in enumerate(VERSUS_FIGURES):
        ours = percentile([r[index] for r in rounds["coproxy"]], 50)
        theirs = percentile([r[index] for r in rounds["other"]], 50)
        ratio = ours / theirs if theirs else float("nan")
        met = ratio <= goal if better == "lower" else ratio >= goal
        misses += not met
        print("%-50s %10.3f %10.3f %8.2f %8s  %s" % (name, ours, theirs, ratio, (
            "<= " if better == "lower" else ">= ") + str(goal), "PASS" if met else "MISS"))
    return misses


def soak_client(port, stop, counts, lock, seed):
    """One soak client until ``stop`` is set: kept-alive chat requests, streams (20 chunks 10 ms
    apart) and, one time in ten, a client that leaves mid-request and comes back on a new
    connection. Counts what it did; an error is a non-200 or a stream without its end."""
    rng = random.Random(seed)
    plain = bench_request("/v1/chat/completions", {"model": "gpt-4.1", "messages": [{"role": "user", "content": "hi"}]})
    streamed = bench_request("/v1/chat/completions", {"model": "gpt-4.1", "stream": True, "bench_chunks": 20,
                                                       "bench_interval": 0.01,
                                                       "messages": [{"role": "user", "content": "hi"}]})
    while not stop.is_set():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=30) as sock, sock.makefile("rb") as reader:
                while not stop.is_set():
                    kind = "stream" if rng.random() < 0.3 else "chat"
                    sock.sendall(streamed if kind == "stream" else plain)
                    if rng.random() < 0.1:
                        if rng.random() < 0.5:
                            reader.readline()  # the answer's status line, then gone
                        kind = "left"
                    else:
                        status, _, body = read_response(reader)
                        if status != 200 or (kind == "stream" and not body.endswith(b"data: [DONE]\n\n")):
                            kind = "error"
                    with lock:
                        counts[kind] += 1
                    if kind == "left":
                        break
        except OSError:
            with lock:
                counts["error"] += 1


def run_soak(duration, clients=8):
    """`--bench --soak DURATION`: coproxy over TLS through the CONNECT proxy, with an upstream that
    ends each kept-alive connection after 50 answers, under mixed load from ``clients`` clients.
    Prints RSS and open descriptors of the server over time; returns the number of errors."""
    bench = Bench(1, close_after=50)
    stop, lock, counts = threading.Event(), threading.Lock(), collections.Counter()
    try:
        process, port, _ = bench.launch(tls=True)
        bench.proxy = process
        threads = [threading.Thread(target=soak_client, args=(port, stop, counts, lock, n), daemon=True)
                   for n in range(clients)]
        for thread in threads:
            thread.start()
        interval = min(60.0, max(5.0, duration / 30))
        started = time.monotonic()
        samples = []
        print("soak: %d clients for %s, a sample every %.0f s" % (clients, format_seconds(duration), interval))
        print("%8s %8s %6s %9s %8s %6s %6s" % ("elapsed", "RSS MB", "fds", "chat", "streams", "left", "errors"))
        while True:
            elapsed = time.monotonic() - started
            with lock:
                row = (elapsed, bench.rss_mb(), len(os.listdir("/proc/%d/fd" % process.pid)),
                       counts["chat"], counts["stream"], counts["left"], counts["error"])
            samples.append(row)
            print("%8s %8.1f %6d %9d %8d %6d %6d" % ((format_seconds(row[0]),) + row[1:]), flush=True)
            if elapsed >= duration:
                break
            time.sleep(min(interval, duration - elapsed))
        stop.set()
        for thread in threads:
            thread.join(60)
        warm = samples[min(len(samples) - 1, max(1, len(samples) // 10))]  # after the first tenth
        last = samples[-1]
        print("soak: %d chat, %d streams, %d left mid-request, %d errors; after warm-up RSS %.1f -> %.1f MB, "
              "descriptors %d -> %d; %d new upstream connections" % (
                  last[3], last[4], last[5], counts["error"], warm[1], last[1], warm[2], last[2],
                  bench.upstream_connections()))
        return counts["error"]
    finally:
        stop.set()
        bench.stop()


def format_seconds(seconds):
    return "%dm%02ds" % divmod(int(seconds), 60)


def parse_duration(text):
    """Seconds in "90", "90s", "10m" or "1h"."""
    match = re.match(r"^(\d+(?:\.\d+)?)([smh]?)$", text)
    if not match:
        raise SystemExit("--soak takes a duration such as 30m, 90s or 1h, not %r" % text)
    return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[match.group(2)]


def format_bench(rows, repetitions):
    lines = ["coproxy %s benchmark, Python %s, %d cores, median of %d runs" % (
        coproxy.__version__, sys.version.split()[0], os.cpu_count(), repetitions),
        "%-58s %10s %12s %8s %12s  %s" % ("figure", "direct", "via coproxy", "ratio", "target", "result")]
    misses = judged = 0
    for row in rows:
        name, direct, via, op, target, fmt = row[:6]
        ratio = "" if not direct or direct != direct or via is None else "%.2fx" % (via / direct)
        value = row[6] if len(row) > 6 else via   # added delay rows compare the difference
        if op == "info":  # reported, not judged
            verdict, shown_target = "", ""
        else:
            judged += 1
            ok = value is not None and value == value and (value >= target if op == ">=" else value <= target)
            misses += not ok
            verdict, shown_target = "PASS" if ok else "MISS", "%s %s" % (op, target) + (" added" if len(row) > 6 else "")
        lines.append("%-58s %10s %12s %8s %12s  %s" % (name, "—" if direct is None else fmt % direct,
                                                       fmt % via if via is not None else "—", ratio, shown_target,
                                                       verdict))
    lines.append("%d of %d figures meet their target" % (judged - misses, judged))
    return "\n".join(lines), misses


def run_history_bench(per_day=5000, starts=5):
    """`--bench --history`: a year of a heavy user's request history (``per_day`` records a day,
    about 550 MB at 5,000), then the time a start takes to read back what the dashboard needs:
    the first start (which writes each past day's summary once) and ``starts`` more."""
    tmp = tempfile.mkdtemp()
    try:
        state = os.path.join(tmp, "state")
        history = coproxy.History(state, keep_days=400)
        rng, now, step = random.Random(7), time.time(), 86400.0 / per_day
        models = ["claude-sonnet-4.5", "claude-opus-4.8", "gpt-5.4", "gpt-4.1", "gemini-2.5-pro",
                  "claude-haiku-4.5"]
        started, session, batch = time.perf_counter(), None, []
        for index in range(366 * per_day):
            if index % 150 == 0:  # an agent session every 150 requests
                session = "%08x-4c2a-4b59-9a1c-2f0b7d9c1e11" % rng.getrandbits(32)
            batch.append({
                "t": round(now - 366 * 86400 + index * step, 3), "route": "/messages",
                "status": 200, "model": rng.choice(models),
                "initiator": "agent" if index % 5 else "user", "stream": True,
                "ttfb_ms": round(rng.uniform(200, 2000), 1),
                "ms": round(rng.uniform(1000, 60000), 1),
                "input": rng.randint(1000, 150000), "cached": rng.randint(0, 100000),
                "output": rng.randint(10, 4000), "credits": round(rng.uniform(0.001, 0.3), 6),
                "client": "claude-cli/2.1.126 (external, cli)", "session": session})
            if len(batch) == per_day:
                history.write(batch)
                batch = []
        history.write(batch)
        size = sum(os.path.getsize(os.path.join(history.dir, name))
                   for name in os.listdir(history.dir))
        print("generated %d days of %d requests (%.0f MB) in %.0f s" % (
            len(history.days()), per_day, size / 1e6, time.perf_counter() - started))
        for label in ["first start (writes the summaries)"] + ["start"] * starts:
            ledger = coproxy.Ledger()
            started, cpu = time.perf_counter(), time.process_time()
            read = coproxy.History(state, keep_days=400).load(ledger, time.time())
            print("%-36s %6.1f ms (CPU %5.1f ms)  %d records of the last 24 h, %d days, "
                  "%d sessions" % (label, (time.perf_counter() - started) * 1000,
                                   (time.process_time() - cpu) * 1000, read, len(ledger.daily),
                                   len(ledger.sessions)))
    finally:
        shutil.rmtree(tmp, True)
    return 0


def run_bench(argv):
    repetitions = 3
    if "--repetitions" in argv:
        repetitions = int(argv[argv.index("--repetitions") + 1])
    if not sys.platform.startswith("linux"):
        print("the benchmark reads CPU and memory from /proc: Linux only")
        return 2
    if "--history" in argv:
        return run_history_bench()
    if "--soak" in argv:
        following = argv[argv.index("--soak") + 1:]
        duration = parse_duration(following[0]) if following and not following[0].startswith("-") else 1800
        return 1 if run_soak(duration) else 0
    bench = Bench(repetitions)
    if "--versus" in argv:
        try:
            return 1 if run_versus(bench, argv[argv.index("--versus") + 1]) else 0
        finally:
            bench.stop()
    try:
        rows = bench.tls_rows() if "--tls-only" in argv else bench.run() + bench.tls_rows()
    finally:
        bench.stop()
    text, misses = format_bench(rows, repetitions)
    print(text)
    reference = subprocess.run([sys.executable, "-c", "import asyncio, ssl, json, re; print(int(re.search("
                                "r'VmRSS:\\s+(\\d+)', open('/proc/self/status').read()).group(1)) / 1024)"],
                               capture_output=True, text=True).stdout.strip()
    print("reference: this interpreter with asyncio and ssl imported (no coproxy) has %.1f MB RSS" % float(reference))
    return 0


class TestBenchJudging(unittest.TestCase):
    """The bench's verdicts: medians, PASS/MISS per target, added-delay rows judged by the
    difference."""

    def test_percentile_and_pass_miss(self):
        self.assertEqual((percentile([5, 1, 3], 50), percentile([1, 2, 3, 4], 100)), (3, 4))
        self.assertTrue(math.isnan(percentile([], 50)))  # no samples is never a pass
        rows = [("req/s", 9000.0, 1500.0, ">=", 1400, "%.0f"),
                ("latency", 0.1, 0.7, "<=", 0.6, "%.2f"),
                ("added delay", 0.05, 0.30, "<=", 0.3, "%.3f", 0.25),
                ("rss", None, None, "<=", 30, "%.1f"),
                ("rss at start", None, 99.0, "info", None, "%.1f"),
                ("nan", None, float("nan"), "<=", 1, "%.1f")]
        text, misses = format_bench(rows, 3)
        verdicts = [line.rsplit(None, 1)[1] for line in text.splitlines()[2:-1]]
        self.assertEqual((verdicts, misses), (["PASS", "MISS", "PASS", "MISS", "99.0", "MISS"], 3))
        self.assertTrue(text.endswith("2 of 5 figures meet their target"))
        self.assertIn("0.17x", text)


# ------------------------------------------------------------------------------------------
# Runner: unittest, then one summary line that CI reads.
# ------------------------------------------------------------------------------------------

class CountingResult(unittest.TextTestResult):
    """Counts passes itself: testsRun cannot be trusted for that (3.12.1 leaves skips out of it)."""

    passes = 0

    def addSuccess(self, test):
        super().addSuccess(test)
        self.passes += 1


class CountingRunner(unittest.TextTestRunner):
    """unittest's runner with CountingResult; a class, so unittest.main passes -v on to it."""

    resultclass = CountingResult


def run_tests(argv):
    """unittest's command line on this module (run as a script or imported: TestPortability
    runs it in-process), then the summary line."""
    program = unittest.main(module=sys.modules[__name__], argv=[sys.argv[0]] + argv, exit=False,
                            testRunner=CountingRunner)
    result = program.result
    failed = (len(result.failures) + len(result.errors)
              + len(getattr(result, "unexpectedSuccesses", [])))
    if FUZZ_FIGURES:
        print("fuzz: %(inputs)d mutated request bodies in %(seconds)ss, answers by status "
              "%(statuses)s" % FUZZ_FIGURES)
    print("%d passed, %d failed, %d skipped" % (result.passes, failed, len(result.skipped)))
    return 1 if failed or result.passes == 0 else 0


if __name__ == "__main__":
    if "--bench" in sys.argv[1:]:
        sys.exit(run_bench(sys.argv[1:]))
    sys.exit(run_tests(sys.argv[1:]))
