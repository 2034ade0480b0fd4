"""`crucible-record view`: the follower keeps up with a run written by another process, a real
browser (headless Chromium via selenium) sees the page's title advance and its plots drawn, Ctrl-C
stops the server in one line, bad input is one line; the Crucible-3 panels come from analysis.
The browser test writes a screenshot the way tests/viewpage.py writes docs/view.png."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

import crucible_record as cr
from crucible_record.reader import Run
from crucible_record.stats import stats
from crucible_record.view import Follower

from .clirun import assert_one_line_error, run_cli
from .viewpage import (CHROMEDRIVER, FIGURES_SHOWN, all_drawn, chrome, committed_of, div_texts, figures, free_port,
                       serving, start_view, start_writer, stop, type_row, wait_for)


def test_follower_keeps_up_with_a_run_written_elsewhere(tmp_path):
    run = tmp_path / "runs" / "x"
    run.parent.mkdir()
    writer = start_writer(run, steps=60, pause=0.05)
    try:
        wait_for(lambda: (run / "trajectory.zarr" / "commit.json").exists(), what="the writer's first commit")
        follower = Follower(str(run), poll=0.1).start()
        seen = []
        def finished():
            snap = follower.snapshot()
            if snap.run is not None and (not seen or seen[-1] != snap.run.committed_steps):
                seen.append(snap.run.committed_steps)
            return snap.run is not None and snap.run.committed_steps == 60 and not snap.behind
        wait_for(finished, timeout=180, what="all 60 steps", every=0.05)
    finally:
        if "follower" in locals():
            follower.stop()
        writer.wait(timeout=120)
    assert writer.returncode == 0, writer.stderr.read()
    assert len(seen) >= 3 and seen == sorted(seen), seen  # it followed the run as it grew
    snap = follower.snapshot()
    assert snap.title == f"{run} — steps 0..59 committed (60 of 60 steps)" and not snap.error
    opened = cr.open(run)
    for name in ("emb", "heads", "loss"):  # what the page shows: the numbers a notebook gets
        want = stats(opened[name])
        for key, values in snap.tables[name].items():
            np.testing.assert_array_equal(values, want[key], err_msg=f"{name} {key}")
    assert snap.row_norms["emb"].shape == (60, 50) and snap.row_norms["heads"].shape == (30, 4)
    assert set(snap.bases) == {"emb", "heads"} and len(snap.bases["emb"].rows) == 50
    xy = snap.bases["emb"].project(opened["emb"].numpy((59,)).reshape(50, -1), opened["emb"].dtype)
    assert xy.shape == (50, 2) and np.isfinite(xy).all()


# A system package, not a pip one: a machine without it skips the browser test, except under .ci/run,
# which installs it and sets CRUCIBLE_REQUIRE_BROWSER (there a missing browser fails the test).
needs_browser = pytest.mark.skipif(
    not (os.path.exists(CHROMEDRIVER) and shutil.which("chromium")) and not os.environ.get("CRUCIBLE_REQUIRE_BROWSER"),
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver; .ci/run does)")


@needs_browser
def test_page_in_a_real_browser_follows_a_run_being_written(tmp_path):
    run = tmp_path / "runs" / "x"
    run.parent.mkdir()
    # a minute of writing: the page sees it grow however slowly the browser starts (it is killed at the end)
    writer = start_writer(run, steps=600, pause=0.1)
    port = free_port()
    view = driver = None
    try:
        wait_for(lambda: (run / "trajectory.zarr" / "commit.json").exists(), what="the writer's first commit")
        view = start_view(run, port)
        url = f"http://127.0.0.1:{port}/"
        wait_for(lambda: serving(url) or view.poll() is not None, what="the server")
        assert view.poll() is None, view.communicate()
        driver = chrome()
        driver.get(url)
        titles = []
        def advanced():
            if not titles or titles[-1] != driver.title:
                titles.append(driver.title)
            return len({committed_of(t) for t in titles if committed_of(t)}) >= 3
        wait_for(advanced, what="the title to advance (no reload)", every=0.1)
        counts = [committed_of(t) for t in titles if committed_of(t)]
        assert counts == sorted(counts) and titles[-1].startswith(f"{run} — steps 0..")
        assert titles[-1].endswith(" of 600 steps)"), titles
        # every plot drawn: 3 statistics plots per field, a heatmap and a projection per 2+-axis field
        wait_for(lambda: all_drawn(driver, FIGURES_SHOWN), what="the plots drawn")
        titles_drawn = [f["title"] for f in figures(driver)]
        assert "emb: row norms (rows x steps)" in titles_drawn and "loss (value)" in titles_drawn
        assert any(t.startswith("emb: 50 of 50 rows in one PCA plane") for t in titles_drawn)
        # one row's path, by typing its index into the page's text box
        type_row(driver, "7")
        wait_for(lambda: any("row 7 over steps 0.." in text for text in div_texts(driver)), what="the row's path")
        plane = next(t for t in titles_drawn if t.startswith("emb: 50 of 50 rows"))
        wait_for(lambda: any(f["title"] == plane and f["points"] > 50 for f in figures(driver)), what="the path drawn")
        shot = tmp_path / "view.png"
        driver.save_screenshot(str(shot))
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        if driver is not None:
            driver.quit()
        code, out, err = stop(view) if view is not None else (0, "", "")
        writer.kill()
        writer.wait()
    assert code == 0 and "Traceback" not in err, err


def test_ctrl_c_stops_the_server_in_one_line(tmp_path):
    run = tmp_path / "runs" / "done"
    run.parent.mkdir()
    writer = start_writer(run, steps=5, pause=0)
    assert writer.wait(timeout=120) == 0, writer.stderr.read()
    port = free_port()
    view = start_view(run, port)
    try:
        wait_for(lambda: serving(f"http://127.0.0.1:{port}/") or view.poll() is not None, what="the server")
    finally:
        code, out, err = stop(view)
    assert code == 0, (out, err)
    assert out.splitlines() == [f"Serving {run} at http://127.0.0.1:{port}/ (Ctrl-C stops)"]
    assert err.splitlines() == [f"stopped serving {run} (Ctrl-C)"], err


def test_bad_input_is_one_line(tmp_path, capsys):
    assert_one_line_error(run_cli(capsys, "view", tmp_path / "nothing", "--no-browser"), "nothing")
    run = tmp_path / "r"
    with cr.record(run, {"x": cr.Field((3,), torch.float32)}) as rec:
        rec.record(0, x=torch.zeros(3))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert_one_line_error(run_cli(capsys, "view", run, "--no-browser", "--port", port), f"127.0.0.1:{port}", "--port")


def test_crucible3_panels(tiny_run):
    from crucible_record.cli import experiment_of
    from crucible_record.crucible3.analysis import analyze
    from crucible_record.crucible3.trajectory import Trajectory

    run = Run(tiny_run)
    follower = Follower(str(tiny_run), training=True, panels=experiment_of(run).view_panels)
    snap = follower.refresh()
    assert snap.title == f"{tiny_run} — steps 0..25 committed (25 of 25 training steps)"
    assert set(snap.panels) == {"h_mean persistence", "centroid separation", "alignment of drift with h_mean"}
    result = analyze(Trajectory(run))
    x, y = snap.panels["centroid separation"]["|c_dead - c_live|"]
    np.testing.assert_array_equal(np.asarray(y), result["centroid_separation"].numpy())
    x, y = snap.panels["h_mean persistence"]["cos(h_mean[i], h_mean[i+1])"]
    assert list(np.asarray(x)) == list(result["lag1_step"].numpy())


def test_help_does_not_import_bokeh():
    code = ("import sys; from crucible_record.cli import main\n"
            "try: main(['--help'])\nexcept SystemExit: pass\n"
            "assert 'bokeh' not in sys.modules and 'crucible_record.view' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=120)


def test_a_non_finite_value_does_not_stop_the_follower(tmp_path):
    """A diverging run (inf and NaN in a step) is when one watches: the projection is fitted on the
    finite rows, the statistics say inf/NaN, and the follower goes on publishing without an error."""
    x = torch.randn(6, 40, 8)
    x[5, 3, 0], x[4, 7, 1] = float("inf"), float("nan")
    with cr.record(tmp_path / "run", {"W": cr.Field((40, 8), torch.float32)}, layout=cr.Layout(time_chunk=2)) as rec:
        for s in range(6):
            rec.record(s, W=x[s])
    follower = Follower(str(tmp_path / "run"))
    snap = follower.refresh()
    while snap.behind:
        snap = follower.refresh()
    assert snap.error == "" and snap.title.endswith("steps 0..5 committed (6 steps, open-ended)")
    assert np.isinf(snap.tables["W"]["norm"][5]) and np.isnan(snap.tables["W"]["norm"][4])
    basis = snap.bases["W"]
    assert torch.isfinite(basis.axes).all() and np.isfinite(basis.extent).all()
    xy = basis.project(cr.open(tmp_path / "run")["W"].numpy((0,)), torch.float32)
    assert np.isfinite(xy).all()
