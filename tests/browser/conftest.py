"""Fixtures for the real-browser tests: Debian's Chromium and a JupyterLab server.

* ``chromium_path`` -- ``/usr/bin/chromium``; if it is missing and we are
  root, ``apt-get install chromium`` is tried once; the tests are skipped with
  the reason only if that fails.  Never ``playwright install``.
* ``chromium_browser`` -- that Chromium, launched headless by Playwright.
* ``lab_server`` -- JupyterLab from this interpreter's environment on a free
  localhost port with a random token, fresh config/runtime/data/settings/
  workspace directories (so that nothing of the user's settings leaks in, and
  nothing is fetched from the network), serving a temporary copy of
  ``notebooks/03_layout_explorer.ipynb`` with its outputs cleared.  The
  server's process group and its kernels are shut down in every case.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS = REPO / "notebooks"
ARTIFACTS = REPO / "tests" / "_artifacts"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

# JupyterLab user settings for the test: no news or update checks (no
# network), no toasts over the page, and every notebook cell attached to the
# DOM (no windowing), so that the explorer can be found wherever it is.
LAB_SETTINGS = {
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
        "fetchNews": "false", "checkForUpdates": False, "doNotDisturbMode": True,
    },
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {
        "windowingMode": "none",
    },
}


def _ensure_chromium() -> tuple[Path | None, str]:
    if CHROMIUM.exists():
        return CHROMIUM, ""
    if os.name != "posix" or os.geteuid() != 0 or shutil.which("apt-get") is None:
        return None, (f"{CHROMIUM} is missing and cannot be installed here (needs root "
                      f"and apt-get): as root run `apt-get install -y chromium`")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        subprocess.run(["apt-get", "update"], check=True, env=env, timeout=300,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "chromium"],
                       check=True, env=env, timeout=600,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    except (subprocess.SubprocessError, OSError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        return None, (f"{CHROMIUM} is missing and `apt-get install chromium` failed: "
                      f"{exc} {detail.decode(errors='replace')[-500:]}")
    if CHROMIUM.exists():
        return CHROMIUM, ""
    return None, f"`apt-get install chromium` ran but {CHROMIUM} is still missing"


@pytest.fixture(scope="session")
def chromium_path() -> Path:
    pytest.importorskip("playwright.sync_api", reason="playwright (python) is not installed")
    path, reason = _ensure_chromium()
    if path is None:
        pytest.skip(reason)
    return path


@pytest.fixture(scope="module")
def chromium_browser(chromium_path):
    """Headless Debian Chromium driven by Playwright (closed after the module)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(chromium_path), headless=True,
                                     args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _clear_outputs(src: Path, dst: Path) -> None:
    """Copy a notebook without outputs and saved widget state: every widget
    in the page must then come from the live kernel."""
    nb = json.loads(src.read_text(encoding="utf-8"))
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            cell["outputs"] = []
            cell["execution_count"] = None
    nb.get("metadata", {}).pop("widgets", None)
    dst.write_text(json.dumps(nb, indent=1), encoding="utf-8")


@dataclass
class LabServer:
    url: str
    token: str
    root: Path
    process: subprocess.Popen
    env: dict
    log: Path

    def api(self, path: str, method: str = "GET"):
        req = urllib.request.Request(f"{self.url}{path}", method=method,
                                     headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            body = resp.read()
        return json.loads(body) if body else None

    def lab_url(self, notebook: str) -> str:
        return f"{self.url}/lab/tree/{notebook}?reset&token={self.token}"

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""


def _stop(server: LabServer) -> None:
    """Shut down the kernels, then the server's whole process group."""
    if server.process.poll() is None:
        try:
            for session in server.api("/api/sessions") or []:
                server.api(f"/api/sessions/{session['id']}", method="DELETE")
            for kernel in server.api("/api/kernels") or []:
                server.api(f"/api/kernels/{kernel['id']}", method="DELETE")
        except (OSError, urllib.error.URLError, ValueError):
            pass
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        if server.process.poll() is not None:
            break
        try:
            os.killpg(server.process.pid, sig)
        except ProcessLookupError:
            break
        try:
            server.process.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
    # Kernels run in the same process group; make sure none is left.
    try:
        os.killpg(server.process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _isolated_env(home: Path) -> dict:
    """This process's environment with fresh Jupyter/IPython directories under ``home``
    (none of the user's settings leak in) and the test's JupyterLab settings."""
    dirs = {name: home / name for name in ("config", "runtime", "data", "settings",
                                           "workspaces", "ipython")}
    for d in dirs.values():
        d.mkdir(parents=True)
    for rel, values in LAB_SETTINGS.items():
        f = dirs["settings"] / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps(values), encoding="utf-8")
    env = dict(os.environ)
    for var in ("JUPYTER_PATH", "JUPYTER_CONFIG_PATH", "JUPYTER_PREFER_ENV_PATH",
                "JUPYTERLAB_DIR", "MPLBACKEND"):
        env.pop(var, None)
    env.update(
        JUPYTER_CONFIG_DIR=str(dirs["config"]),
        JUPYTER_RUNTIME_DIR=str(dirs["runtime"]),
        JUPYTER_DATA_DIR=str(dirs["data"]),  # the venv's share/jupyter is still searched
        JUPYTERLAB_SETTINGS_DIR=str(dirs["settings"]),
        JUPYTERLAB_WORKSPACES_DIR=str(dirs["workspaces"]),
        IPYTHONDIR=str(dirs["ipython"]),
        JUPYTER_PLATFORM_DIRS="1",
        PYTHONUNBUFFERED="1",
    )
    return env


def _lab_command(port: int, token: str, root: Path) -> list[str]:
    """``jupyter lab`` on localhost:``port`` serving ``root``, with nothing fetched from the network."""
    cmd = [
        sys.executable, "-m", "jupyter", "lab",
        "--no-browser",
        "--ServerApp.ip=127.0.0.1",
        f"--ServerApp.port={port}",
        "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={root}",
        "--ServerApp.open_browser=False",
        "--LabApp.news_url=None",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        "--LabApp.expose_app_in_browser=True",
        "--LabApp.extension_manager=readonly",
    ]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")  # CI runs as root
    return cmd


def _wait_until_ready(server: LabServer, seconds: float = 90) -> None:
    """Poll the server's status API until it answers (``RuntimeError`` if it exits or times out)."""
    deadline = time.monotonic() + seconds
    while True:
        if server.process.poll() is not None:
            raise RuntimeError(f"jupyter lab exited with {server.process.returncode}:\n"
                               f"{server.log_tail()}")
        try:
            server.api("/api/status")
            return
        except (OSError, urllib.error.URLError, ValueError):
            if time.monotonic() > deadline:
                raise RuntimeError(f"jupyter lab did not answer within {seconds:.0f} s:\n"
                                   + server.log_tail())
            time.sleep(0.5)


@pytest.fixture
def lab_server(tmp_path) -> LabServer:
    root = tmp_path / "notebooks"
    root.mkdir()
    _clear_outputs(NOTEBOOKS / "03_layout_explorer.ipynb", root / "03_layout_explorer.ipynb")
    env = _isolated_env(tmp_path / "jupyter")

    # The widgets' frontend must come from the environment, with no manual step.
    listing = subprocess.run([sys.executable, "-m", "jupyter", "labextension", "list"],
                             env=env, capture_output=True, text=True, timeout=60)
    out = listing.stdout + listing.stderr
    assert "@jupyter-widgets/jupyterlab-manager" in out and "enabled" in out, out

    token = secrets.token_hex(16)
    port = _free_port()
    log = tmp_path / "jupyter-lab.log"
    with open(log, "wb") as fh:
        process = subprocess.Popen(_lab_command(port, token, root), cwd=root, env=env, stdout=fh,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
    server = LabServer(url=f"http://127.0.0.1:{port}", token=token, root=root,
                       process=process, env=env, log=log)
    try:
        _wait_until_ready(server)
        yield server
    finally:
        _stop(server)
