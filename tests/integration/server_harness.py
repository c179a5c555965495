"""A real ComfyUI server (main.py in a subprocess) with this pack as a custom node, for the browser test.

The server runs on 127.0.0.1 at a free port with --cpu, an in-memory database, no API nodes, and a base
directory of its own (models, input, output, user, custom_nodes), so nothing touches the ComfyUI
checkout. The pack is a symlink `<base>/custom_nodes/comfyui-para` -> the repo root, loaded the way a user
installs it. The real front end (the comfyui_frontend_package pip package) is served: no --front-end-root.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

PACK_FOLDER = "comfyui-para"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    def __init__(self, comfy_root: str, base: str, repo_root: str, python: str = sys.executable):
        self.comfy_root, self.base, self.repo_root, self.python = comfy_root, base, repo_root, python
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = os.path.join(base, "server.log")
        self.proc: subprocess.Popen | None = None
        os.makedirs(os.path.join(base, "custom_nodes"), exist_ok=True)
        link = os.path.join(base, "custom_nodes", PACK_FOLDER)
        if not os.path.islink(link):
            os.symlink(repo_root, link, target_is_directory=True)

    def start(self, timeout: float = 180.0) -> None:
        cmd = [self.python, os.path.join(self.comfy_root, "main.py"), "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", self.base, "--database-url", "sqlite:///:memory:", "--disable-api-nodes"]
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONUNBUFFERED="1")
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, cwd=self.comfy_root, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode} while starting:\n{self.log_tail()}")
            try:
                self.get("/system_stats")
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        else:
            self.stop()
            raise RuntimeError(f"ComfyUI did not answer on {self.url} within {timeout:.0f}s:\n{self.log_tail()}")
        log = self.log_tail(200_000)
        if "IMPORT FAILED" in log or "Cannot import" in log:
            raise RuntimeError(f"a custom node failed to import:\n{self.log_tail()}")

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def post(self, path: str, data: dict):
        req = urllib.request.Request(self.url + path, data=json.dumps(data).encode(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            body = r.read()
            return json.loads(body) if body.strip() else None

    def log_tail(self, n: int = 4000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode("utf-8", "replace")[-n:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None
        if getattr(self, "_log", None):
            self._log.close()
            self._log = None
