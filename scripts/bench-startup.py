#!/usr/bin/env python3
"""Measures gateway start-up with N stored plugin versions bound, cold (empty compile cache) and warm.

Uploads N versions of a shipped translator (each with its own custom section, so its own hash),
binds one per tenant, stops the gateway, then times `tollgate serve` until it listens, first after
emptying the compile cache, then again with the cache the first start filled.

    scripts/bench-startup.py [--binary target/release/tollgate] [--plugins 20] [--runs 3]
"""

import argparse
import json
import os
import pathlib
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parent.parent
TOKEN = "bench-admin-token"


def leb128(value):
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value == 0:
            out.append(byte)
            return bytes(out)
        out.append(byte | 0x80)


def version(component, label):
    """The component with a custom section appended: another hash, the same behaviour."""
    name = b"tollgate-bench-version"
    payload = leb128(len(name)) + name + label.encode()
    return component + b"\x00" + leb128(len(payload)) + payload


def start(binary, config):
    started = time.perf_counter()
    process = subprocess.Popen(
        [binary, "serve", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "TOLLGATE_ADMIN_TOKEN": TOKEN},
        text=True,
    )
    for line in process.stdout:
        if line.startswith("tollgate listening on "):
            return process, line.split()[-1], time.perf_counter() - started
    raise SystemExit("the gateway exited before listening")


def stop(process):
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=30)


def admin(url, method, path, body=None, content_type="application/json"):
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"{url}/admin{path}", data=data, method=method)
    request.add_header("authorization", f"Bearer {TOKEN}")
    request.add_header("content-type", content_type)
    with urllib.request.urlopen(request, timeout=120) as answer:
        return json.load(answer)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--binary", default=str(ROOT / "target/release/tollgate"))
    parser.add_argument("--plugins", type=int, default=20)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--component",
        default=str(ROOT / "target/guests/wasm32-wasip2/release/tollgate_translator_anthropic.wasm"),
    )
    args = parser.parse_args()
    component = pathlib.Path(args.component).read_bytes()
    with tempfile.TemporaryDirectory() as scratch:
        scratch = pathlib.Path(scratch)
        cache = scratch / "cache"
        config = scratch / "tollgate.toml"
        config.write_text(
            f'[server]\nlisten = "127.0.0.1:0"\ndata_dir = "{scratch / "data"}"\n\n'
            f'[plugins]\ncache_dir = "{cache}"\n\n'
            '[bindings.billing]\nplugin = "price-table"\nconfig = { models = {} }\n'
        )
        process, url, first = start(args.binary, config)
        for index in range(args.plugins):
            tenant = f"tenant-{index}"
            admin(url, "POST", "/tenants", {"name": tenant})
            uploaded = admin(
                url,
                "POST",
                f"/plugins?name=anthropic-v{index}",
                version(component, str(index)),
                "application/wasm",
            )
            admin(
                url,
                "PUT",
                f"/bindings?role=translator&protocol=anthropic&tenant={tenant}",
                {"plugin": uploaded["sha256"]},
            )
        stop(process)
        print(f"{args.plugins} bound plugin versions of {len(component)} bytes each")
        print(f"first start (shipped plugins only, cache empty): {first * 1000:.0f} ms")
        for run in range(args.runs):
            shutil.rmtree(cache, ignore_errors=True)
            process, _, cold = start(args.binary, config)
            stop(process)
            process, _, warm = start(args.binary, config)
            stop(process)
            print(f"run {run + 1}: cold {cold * 1000:.0f} ms, warm {warm * 1000:.0f} ms")


if __name__ == "__main__":
    main()
