"""A live page in a real browser: headless Chromium (Debian's chromium and chromium-driver) driven by
selenium, a writer process recording a small run, and `crucible-record view` serving it.

tests/test_view.py uses these; ``python tests/viewpage.py docs/view.png`` writes the README's
screenshot the same way (a run being written, the page as the browser draws it).
"""

from __future__ import annotations

import os
import re
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


def start_writer(run: Path, steps: int, pause: float, cwd: Path | None = None) -> subprocess.Popen:
    script = (cwd or Path()) / run.parent / "writer.py"
    script.write_text(WRITER)
    return subprocess.Popen([sys.executable, str(script), str(run), str(steps), str(pause)], env=env(), cwd=cwd,
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


def start_view(run: Path | str, port: int, cwd: Path | None = None) -> subprocess.Popen:
    """`crucible-record view RUN --no-browser --port PORT` in a new process."""
    return subprocess.Popen([sys.executable, "-m", "crucible_record", "view", str(run), "--no-browser",
                             "--port", str(port)], env=env(), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=default_sigint)


def default_sigint() -> None:
    """In the child: Ctrl-C's default action, even where this process ignores SIGINT (a shell's
    background job does), so that Python turns it into KeyboardInterrupt as at a terminal."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


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


# Every Bokeh view of the page, as `views` (Bokeh draws into shadow roots: reach them through its views)
VIEWS = """
const views = [];
const walk = (v) => { views.push(v); for (const c of (v.child_views || [])) walk(c); };
[...Bokeh.index].forEach(walk);
"""
# Per figure: its title, its glyphs' data points and whether its canvas has been painted.
FIGURES = VIEWS + """
return views.filter(v => v.model.type === 'Figure').map(f => ({title: f.model.title.text,
  points: [...f.renderer_views.values()].filter(r => r.model.data_source)
           .map(r => { const d = r.model.data_source.data; return d[Object.keys(d)[0]].length; })
           .reduce((a, b) => a + b, 0),
  painted: f.canvas_view.primary.canvas.width > 0 && f.canvas_view.primary.canvas.toDataURL().length > 5000}));
"""


def figures(driver) -> list[dict]:
    return driver.execute_script("if (!window.Bokeh || !Bokeh.index) return [];" + FIGURES)


def all_drawn(driver, count: int) -> bool:
    shown = figures(driver)
    return len(shown) == count and all(f["points"] and f["painted"] for f in shown)


def type_row(driver, text: str) -> None:
    """Type into the first row box of the page, as a user does (Enter included)."""
    driver.execute_script(VIEWS + "return views.find(v => v.model.type === 'TextInput').input_el;").send_keys(text + "\n")


def div_texts(driver) -> list[str]:
    return driver.execute_script(VIEWS + "return views.filter(v => v.model.type === 'Div').map(v => v.model.text);")


def committed_of(title: str) -> int:
    """Steps committed, from the page's title (0 if it says none)."""
    match = re.search(r"steps 0\.\.(\d+) committed", title)
    return int(match.group(1)) + 1 if match else 0


FIGURES_SHOWN = 11  # 3 statistics plots per field, a heatmap and a projection per field of 2+ axes


def screenshot(path: Path, steps: int = 120, pause: float = 0.05) -> Path:
    """The README's picture: the page of a run being written, at about two thirds of its steps."""
    import tempfile

    path = Path(path).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        run = Path("runs") / "x"  # as a user types it, from the directory of their runs
        (Path(tmp) / "runs").mkdir()
        writer, port = start_writer(run, steps, pause, cwd=Path(tmp)), free_port()
        wait_for(lambda: (Path(tmp) / run / "trajectory.zarr" / "commit.json").exists(), what="the writer's first commit")
        view = start_view(run, port, cwd=Path(tmp))
        driver = chrome(1400, 1750)
        try:
            url = f"http://127.0.0.1:{port}/"
            wait_for(lambda: serving(url), what="the server")
            driver.get(url)
            wait_for(lambda: committed_of(driver.title) >= 2 * steps // 3, what="two thirds of the steps")
            type_row(driver, "7")
            wait_for(lambda: all_drawn(driver, FIGURES_SHOWN), what="the plots")
            time.sleep(1.5)  # the last streamed points painted
            driver.save_screenshot(str(path))
        finally:
            driver.quit()
            stop(view)
            writer.kill()
            writer.wait()
    return path


if __name__ == "__main__":
    print(screenshot(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "view.png"))
