"""Drive a headless Chromium through the DevTools protocol over a pipe: no driver to install.

``--remote-debugging-pipe`` makes Chromium read NUL-terminated JSON commands on file
descriptor 3 and write replies and events on 4. :class:`Browser` opens one page and offers the
few verbs the review page's tests need: open a file, evaluate JavaScript, take a screenshot.

    with Browser(find_chromium()) as browser:
        browser.open(Path("review.html"))
        browser.evaluate("document.title")
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

_DEFAULT_DIR = Path.home() / ".cache" / "weight_mapper" / "chromium"
_UNPACKED = "root/usr/lib/chromium/chromium-headless-shell"
_LIB_DIRS = ("root/usr/lib/x86_64-linux-gnu", "root/usr/lib/x86_64-linux-gnu/pulseaudio", "root/usr/lib/chromium")
FETCH_HINT = "run benchmarks/review_page/fetch_chromium.sh (apt-get download + dpkg -x, no install) or set WM_CHROMIUM"


def find_chromium() -> tuple[str, dict[str, str]] | None:
    """``(executable, extra environment)`` of a headless Chromium, or None.

    Looked for in order: ``$WM_CHROMIUM`` (an executable), the shell unpacked by
    ``fetch_chromium.sh`` in ``$WM_CHROMIUM_DIR`` or ``~/.cache/weight_mapper/chromium``, then
    ``chromium-headless-shell``, ``chromium`` and ``google-chrome`` on the PATH.
    """
    given = os.environ.get("WM_CHROMIUM")
    if given:
        return (given, {}) if Path(given).is_file() else None
    folder = Path(os.environ.get("WM_CHROMIUM_DIR", _DEFAULT_DIR))
    if (folder / _UNPACKED).is_file():
        libs = [str(folder / d) for d in _LIB_DIRS]
        if os.environ.get("LD_LIBRARY_PATH"):
            libs.append(os.environ["LD_LIBRARY_PATH"])
        return str(folder / _UNPACKED), {"LD_LIBRARY_PATH": ":".join(libs)}
    for name in ("chromium-headless-shell", "chromium", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found, {}
    return None


class BrowserError(RuntimeError):
    """Chromium failed, or a command returned an error."""


class Browser:
    """One headless Chromium with one page, driven over ``--remote-debugging-pipe``."""

    def __init__(self, found: tuple[str, dict[str, str]], *, width: int = 1400, height: int = 900, timeout: float = 60):
        executable, env = found
        self.timeout = timeout
        self._profile = tempfile.TemporaryDirectory(prefix="wm-chromium-")
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()

        def wire() -> None:  # in the child: the pipe ends on fds 3 and 4
            os.dup2(to_chrome_r, 3)
            os.dup2(from_chrome_w, 4)

        flags = ["--headless", "--remote-debugging-pipe", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio",
                 f"--user-data-dir={self._profile.name}", f"--window-size={width},{height}"]
        self._log = tempfile.TemporaryFile()  # a file, not a pipe: nobody reads it while it runs
        self.proc = subprocess.Popen([executable, *flags, "about:blank"], env={**os.environ, **env},
                                     stdout=subprocess.DEVNULL, stderr=self._log, pass_fds=(3, 4),
                                     preexec_fn=wire)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buffer = b""
        self._next_id = 0
        self._events: list[dict] = []
        target = self._send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self._send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self.command("Page.enable")
        self.command("Runtime.enable")
        self.command("Emulation.setDeviceMetricsOverride",
                     {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})

    # ------------------------------------------------------------------ protocol
    def _read_message(self, deadline: float) -> dict:
        import select

        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_chrome], [], [], left)[0]:
                raise BrowserError("chromium did not answer in time")
            chunk = os.read(self._from_chrome, 1 << 20)
            if not chunk:
                self._log.seek(0)
                raise BrowserError(f"chromium exited: {self._log.read().decode(errors='replace')[-2000:]}")
            self._buffer += chunk
        message, _, self._buffer = self._buffer.partition(b"\0")
        return json.loads(message)

    def _send(self, method: str, params: dict | None = None, *, session: str | None = None) -> dict:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            if "method" in reply:
                self._events.append(reply)

    def command(self, method: str, params: dict | None = None) -> dict:
        """Send a command to the page's session and return its result."""
        return self._send(method, params, session=self.session)

    def wait_event(self, method: str) -> dict:
        """The next event ``method`` of the page (one already received counts)."""
        deadline = time.monotonic() + self.timeout
        while True:
            for i, event in enumerate(self._events):
                if event["method"] == method:
                    return self._events.pop(i)
            self._events.append(self._read_message(deadline))

    # ------------------------------------------------------------------ verbs
    def open(self, path: Path) -> float:
        """Load ``path`` and wait for its load event; returns the seconds it took, seen from here."""
        self._events.clear()
        start = time.perf_counter()
        self.command("Page.navigate", {"url": Path(path).resolve().as_uri()})
        self.wait_event("Page.loadEventFired")
        return time.perf_counter() - start

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (promises awaited)."""
        result = self.command("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                   "awaitPromise": True})
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise BrowserError(f"{expression[:80]}: {details.get('exception', {}).get('description', details)}")
        return result["result"].get("value")

    def screenshot(self, path: Path) -> Path:
        """A PNG of the viewport."""
        data = self.command("Page.captureScreenshot", {"format": "png"})["data"]
        Path(path).write_bytes(base64.b64decode(data))
        return Path(path)

    def close(self) -> None:
        try:
            self._send("Browser.close")
        except (BrowserError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._to_chrome, self._from_chrome):
            try:
                os.close(fd)
            except OSError:
                pass
        self._log.close()
        self._profile.cleanup()

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
