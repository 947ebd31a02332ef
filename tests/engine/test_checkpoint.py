import torch

from blindseg_dist.engine import checkpoint as ckpt


def test_atomic_save_keep_last_and_load(tmp_path):
    model = torch.nn.Linear(3, 2)
    for step in (10, 20, 30, 40):
        ckpt.save_checkpoint(tmp_path, step, model_state=model.state_dict(), state={"x": step}, keep_last=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["30", "40"]
    # a half-written checkpoint (temporary folder, or a folder without state) is never listed
    (tmp_path / "checkpoints" / ".tmp-50").mkdir()
    (tmp_path / "checkpoints" / "60").mkdir()
    assert ckpt.latest_checkpoint(tmp_path).name == "40"
    weights = ckpt.load_model_weights(ckpt.latest_checkpoint(tmp_path))
    assert torch.equal(weights["weight"], model.weight.detach())
    state, rng = ckpt.load_state(ckpt.latest_checkpoint(tmp_path))
    assert state["x"] == 40 and state["step"] == 40 and rng is not None


def test_rng_state_round_trip():
    state = ckpt.rng_state()
    a = torch.rand(3)
    ckpt.set_rng_state(state)
    assert torch.equal(torch.rand(3), a)


def test_missing_weights_error_says_what_to_pass(tmp_path):
    import pytest

    with pytest.raises(FileNotFoundError, match="checkpoint folder"):
        ckpt.load_model_weights(tmp_path / "nothing")
