"""
Lesson: a checkpoint survives the process being killed mid-save, and loading never runs code.

1. A real child process (os.fork) saves checkpoints in a loop; we SIGKILL it at several moments (some surely inside a
   save). Afterwards the folder always loads, passes its manifest check, and is self-consistent.
2. A pickle whose unpickling would create a file is refused by every loader, and the file never appears.
3. A scan of the project's sources: no `import pickle`, and every `torch.load` passes weights_only=True.

Run:  python -m pytest tests/test_checkpoint.py
"""
import os
import pickle
import signal
import time
from pathlib import Path

import pytest
import torch

import weights
from checkpoint import CheckpointCorrupt, load_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def test_round_trip_and_manifest(tmp_path):
    net = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(net.parameters())
    net(torch.randn(2, 4)).sum().backward()
    opt.step()
    save_checkpoint(tmp_path / "ckpt", net.state_dict(), {"step": 7}, opt)
    tensors, meta, opt_tensors = load_checkpoint(tmp_path / "ckpt")
    assert meta["step"] == 7 and torch.equal(tensors["weight"], net.weight)
    assert set(opt_tensors) == {"state.0.step", "state.0.exp_avg", "state.0.exp_avg_sq", "state.1.step",
                                "state.1.exp_avg", "state.1.exp_avg_sq"}
    with open(tmp_path / "ckpt" / "model.safetensors", "r+b") as f:   # flip one byte of the weights
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 1]))
    with pytest.raises(CheckpointCorrupt, match="does not match MANIFEST"):
        load_checkpoint(tmp_path / "ckpt")


def keep_saving(directory):
    """Runs in a forked child: save forever; every checkpoint holds tensors all equal to its step."""
    import numpy as np
    step = 0
    while True:
        step += 1
        # numpy, not torch ops: no OpenMP thread pool is touched in the forked child
        tensors = {f"w{k}": torch.from_numpy(np.full((1024, 1024), step, dtype=np.float32)) for k in range(4)}
        save_checkpoint(directory, tensors, {"step": step})


def test_kill_during_save_leaves_a_loadable_checkpoint(tmp_path):
    """SIGKILL a real child process at several moments; 16 MB saves make most kills land mid-save."""
    interrupted = 0
    for delay in (0.0, 0.03, 0.07, 0.11, 0.19, 0.29, 0.41):
        pid = os.fork()
        if pid == 0:                                   # the child
            try:
                keep_saving(tmp_path / "ckpt")
            finally:
                os._exit(1)
        while not (tmp_path / "ckpt").exists() and not (tmp_path / "ckpt.old").exists():
            time.sleep(0.005)                          # wait for the first complete save
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        interrupted += (tmp_path / "ckpt.tmp").exists()   # a half-written save was left behind
        tensors, meta, _ = load_checkpoint(tmp_path / "ckpt")
        assert all(torch.all(t == meta["step"]) for t in tensors.values())
    assert interrupted >= 1, "no kill landed inside a save; the test proved nothing"


class Evil:
    """Unpickling this calls os.system: the classic pickle attack."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")   # torch's note on the hostile file's pickle
def test_a_malicious_pickle_is_refused_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(Evil(marker))
    (tmp_path / "evil.pt").write_bytes(payload)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(tmp_path / "evil.pt", weights_only=True)        # the only way torch.load is used here
    folder = weights.write_tiny_checkpoint("llama", tmp_path / "llama")
    (folder / "model.safetensors").write_bytes(payload)           # a pickle posing as weights
    with pytest.raises(weights.CheckpointError, match="not a readable safetensors file"):
        weights.load_llm(folder)
    save_checkpoint(tmp_path / "ckpt", {"w": torch.zeros(2)}, {"step": 1})
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(payload)
    with pytest.raises(CheckpointCorrupt):
        load_checkpoint(tmp_path / "ckpt")
    assert not marker.exists()


def test_sources_never_unpickle():
    for path in list(ROOT.glob("*.py")) + list(ROOT.glob("scripts/*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            assert "import pickle" not in code, f"{path.name}:{number} imports pickle"
            if "torch.load(" in code:
                assert "weights_only=True" in code, f"{path.name}:{number}: torch.load without weights_only=True"
