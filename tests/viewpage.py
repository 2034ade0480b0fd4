"""A live page in a real browser: headless Chromium (Debian's chromium and chromium-driver) driven by
selenium, a writer process recording a small run, and `crucible-record view` serving it.

tests/test_view.py uses these; ``python tests/viewpage.py docs/view.png`` writes the README's
screenshot the same way (a run being written, the page as the browser draws it).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHROMEDRIVER = "/usr/bin/chromedriver"

# A run of one's own: an embedding of 50 x 8 (bf16; every third token "dead", moving less), a
# 3-D field every 2 steps, and a loss; STEPS steps planned, one every `pause` seconds.
WRITER = textwrap.dedent("""
    import sys, time
    import torch
    import crucible_record as cr

    path, steps, pause = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    g = torch.Generator().manual_seed(0)
    dead = torch.arange(50) % 3 == 0
    emb = torch.randn(50, 8, generator=g)
    drift = torch.randn(8, generator=g) * 0.05
    fields = {"emb": cr.Field((50, 8), torch.bfloat16), "heads": cr.Field((4, 2, 3), torch.float32, every=2),
              "loss": cr.Field((), torch.float32)}
    with cr.record(path, fields, steps=steps, constants={"dead": dead},
                   layout=cr.Layout(time_chunk=8, row_chunk=16), commit_interval=0.2) as rec:
        for step in range(steps):
            if step:
                emb += torch.where(dead[:, None], -0.2, 1.0) * drift + torch.randn(50, 8, generator=g) * 0.03
            tensors = {"emb": emb.bfloat16(), "loss": torch.tensor(3.0 / (1 + step) ** 0.5)}
            if step % 2 == 0:
                tensors["heads"] = torch.randn(4, 2, 3, generator=g) + step * 0.01
            rec.record(step, **tensors)
            time.sleep(pause)
""")


def env() -> dict[str, str]:
    src = str(ROOT / "src")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}


def start_writer(run: Path, steps: int, pause: float) -> subprocess.Popen:
    script = run.parent / "writer.py"
    script.write_text(WRITER)
    return subprocess.Popen([sys.executable, str(script), str(run), str(steps), str(pause)], env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for(condition, timeout: float = 120, what: str = "condition", every: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_view(run: Path | str, port: int) -> subprocess.Popen:
    """`crucible-record view RUN --no-browser --port PORT` in a new process."""
    return subprocess.Popen([sys.executable, "-m", "crucible_record", "view", str(run), "--no-browser",
                             "--port", str(port)], env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def serving(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


def stop(process: subprocess.Popen) -> tuple[int, str, str]:
    """SIGINT (Ctrl-C) to `process`; its exit code, stdout and stderr."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
    try:
        out, err = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
    return process.returncode, out, err


def chrome(width: int = 1400, height: int = 1000):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={width},{height}"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


# What Bokeh has drawn: the plots of the document and how many of them have a rendered canvas.
DRAWN = """
const doc = window.Bokeh && Bokeh.documents && Bokeh.documents[0];
if (!doc) return null;
const views = [...Bokeh.index.values()];
const plots = [];
const walk = (v) => { if (v.model.type === 'Plot' || v.model.constructor.name === 'Figure') plots.push(v);
                      for (const c of (v.child_views || [])) walk(c); };
views.forEach(walk);
const drawn = plots.filter(p => p.canvas_view && p.canvas_view.el.isConnected && p.canvas.el.clientWidth > 0);
return {plots: plots.length, drawn: drawn.length, roots: doc.roots().length};
"""


def drawn(driver) -> dict | None:
    return driver.execute_script(DRAWN)


def screenshot(path: Path, steps: int = 120, pause: float = 0.05) -> Path:
    """The README's picture: the page of a run being written, at about two thirds of its steps."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "runs" / "x"
        run.parent.mkdir()
        writer, port = start_writer(run, steps, pause), free_port()
        wait_for(lambda: (run / "trajectory.zarr" / "commit.json").exists(), what="the writer's first commit")
        view = start_view(run, port)
        driver = chrome(1400, 1900)
        try:
            url = f"http://127.0.0.1:{port}/"
            wait_for(lambda: serving(url), what="the server")
            driver.get(url)
            wait_for(lambda: (drawn(driver) or {}).get("drawn", 0) >= 8, what="the plots")
            wait_for(lambda: f"steps 0..{2 * steps // 3}" in driver.title or "of" in driver.title and
                     int(driver.title.split("..")[1].split()[0]) >= 2 * steps // 3, what="two thirds of the steps")
            driver.find_element("css selector", "input[type=text]").send_keys("7\n") if False else None
            time.sleep(1.5)
            driver.save_screenshot(str(path))
        finally:
            driver.quit()
            stop(view)
            writer.kill()
            writer.wait()
    return path


if __name__ == "__main__":
    print(screenshot(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "view.png"))
