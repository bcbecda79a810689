"""Progress is shown where a person watches, and nowhere else (gradbook.progress)."""
import subprocess
import sys
import textwrap

import gradbook as gb
import nbformat
from jupyter_client.manager import start_new_kernel
from nbclient import NotebookClient

FIT = textwrap.dedent("""
    import gradbook as gb
    net = gb.mlp(depth=2, width=8, activation="tanh", in_dim=4, out_dim=1)
    h = gb.fit(net, gb.data.teacher(n_train=64, n_test=16, in_dim=4, width=8), 30, lr=0.05, batch_size=8)
    print("steps run", h.steps_run)
""")


def test_default_is_silent_without_a_watcher(capfd):
    net = gb.mlp(depth=2, width=8, activation="tanh", in_dim=4, out_dim=1)
    gb.fit(net, gb.data.teacher(n_train=64, n_test=16, in_dim=4, width=8), 5, lr=0.05, batch_size=8)
    out = capfd.readouterr()
    assert out.out == "" and out.err == ""


def test_script_with_output_to_a_pipe_prints_nothing_but_its_own():
    run = subprocess.run([sys.executable, "-c", FIT], capture_output=True, text=True, check=True)
    assert run.stderr == "" and run.stdout == "steps run 30\n"


def test_executed_notebook_saves_no_progress_output():
    """nbconvert, nbgrader and Jupyter Book execute with nbclient: nothing may be written, stderr least of all."""
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(FIT)])
    NotebookClient(nb, kernel_name="python3", timeout=120).execute()
    outputs = nb.cells[0].outputs
    assert [(o.output_type, o.get("name"), o.get("text")) for o in outputs] == [("stream", "stdout", "steps run 30\n")]


def test_front_end_sees_one_line_updated_in_place():
    """A front end executes with allow_stdin=True: progress is one display output, updated, never stderr."""
    km, kc = start_new_kernel(kernel_name="python3")
    try:
        msg_id = kc.execute(FIT, allow_stdin=True)
        kinds, texts = [], []
        while True:
            msg = kc.get_iopub_msg(timeout=120)
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind = msg["msg_type"]
            if kind == "status" and msg["content"]["execution_state"] == "idle":
                break
            if kind in ("display_data", "update_display_data", "stream", "error"):
                kinds.append((kind, msg["content"].get("name")))
                if kind != "stream" and kind != "error":
                    texts.append(msg["content"]["data"]["text/plain"])
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    assert kinds[0] == ("display_data", None)                     # one output ...
    assert set(kinds[1:-1]) <= {("update_display_data", None)}    # ... updated in place
    assert kinds[-1] == ("stream", "stdout")                      # and no stderr anywhere
    assert texts[-1].startswith("gradbook.fit: 30/30")
