"""CLIP weights from files and tags: every format by its content, no file runs code, clear errors."""
import pickle
import re

import open_clip
import pytest
import torch

from so.clip.model import build_clip


class Touch:
    """A pickled object whose unpickling creates a file: what a crafted checkpoint could do."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def tiny_state():
    torch.manual_seed(1)
    return build_clip("so-tiny")[0].state_dict()


def same_weights(model, state):
    return all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


@pytest.mark.parametrize("suffix", [".bin", ".pth", ".pt"])
def test_a_state_dict_file_loads_whatever_its_name(tmp_path, tiny_state, suffix):
    path = tmp_path / f"tiny{suffix}"
    torch.save(tiny_state, path)
    assert same_weights(build_clip("so-tiny", str(path))[0], tiny_state)
    torch.save({"state_dict": {f"module.{k}": v for k, v in tiny_state.items()}}, path)  # trainer style
    assert same_weights(build_clip("so-tiny", str(path))[0], tiny_state)


def test_safetensors_loads(tmp_path, tiny_state):
    from safetensors.torch import save_file

    path = tmp_path / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_state.items()}, path)
    assert same_weights(build_clip("so-tiny", str(path))[0], tiny_state)


def test_an_openai_style_torchscript_archive_loads(tmp_path):
    torch.manual_seed(3)
    scripted = open_clip.create_model("so-tiny", jit=True)  # what OpenAI's ViT-B-16.pt is
    path = tmp_path / "ViT-B-16.pt"
    torch.jit.save(scripted, str(path))
    loaded = build_clip("so-tiny", str(path))[0]
    state = {k: v for k, v in scripted.state_dict().items()
             if k not in ("input_resolution", "context_length", "vocab_size", "attn_mask")}
    assert same_weights(loaded, state)


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin"])
@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_a_pickle_that_would_run_code_does_not(tmp_path, suffix, writer):
    touched = tmp_path / "touched"
    path = tmp_path / f"evil{suffix}"
    with open(path, "wb") as f:
        pickle.dump({"visual.proj": Touch(touched)}, f) if writer == "pickle" else \
            torch.save({"visual.proj": Touch(touched)}, f)
    with pytest.raises(ValueError, match=r"evil.*can run code.*model.allow_unsafe_pickle=true"):
        build_clip("so-tiny", str(path))
    assert not touched.exists()


def test_allow_unsafe_pickle_loads_a_trusted_file_and_says_so(tmp_path, tiny_state, caplog):
    path = tmp_path / "trusted.pt"
    torch.save({"state_dict": dict(tiny_state), "note": Touch(tmp_path / "touched")}, path)
    with pytest.raises(ValueError, match="can run code"):
        build_clip("so-tiny", str(path))
    model = build_clip("so-tiny", str(path), allow_unsafe_pickle=True)[0]
    assert same_weights(model, tiny_state) and "can run code" in caplog.text
    assert (tmp_path / "touched").exists()  # it did: the key is for files one trusts


def test_a_file_of_another_architecture_names_the_file_model_and_tensor(tmp_path):
    torch.manual_seed(4)
    path = tmp_path / "sandbox.bin"
    torch.save(build_clip("so-sandbox")[0].state_dict(), path)  # 4 blocks per tower
    with pytest.raises(ValueError, match=r"sandbox.bin does not fit model.name=so-tiny: first mismatch "
                                         r"visual.transformer.resblocks.4.*missing from the file"):
        build_clip("so-tiny", str(path))
    state = build_clip("so-tiny")[0].state_dict()
    state["text_projection"] = torch.zeros(3, 3)
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"first mismatch text_projection: file \(3, 3\), model \(64, 64\)"):
        build_clip("so-tiny", str(path))


def test_a_truncated_file_is_named(tmp_path, tiny_state):
    path = tmp_path / "partial.bin"
    torch.save(tiny_state, path)
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(ValueError, match="partial.bin: not a weights file: read as a torch.save file, it fails"):
        build_clip("so-tiny", str(path))


def _truncated_safetensors(path, state):
    from safetensors.torch import save_file

    save_file(state, path)
    path.write_bytes(path.read_bytes()[:-1000])


def _constants_zip(path, state):
    import zipfile

    with zipfile.ZipFile(path, "w") as archive:  # looks like TorchScript (constants.pkl), is not
        archive.writestr("model/constants.pkl", b"not a pickle")


@pytest.mark.parametrize("name, write, read_as", [
    ("cut.safetensors", _truncated_safetensors, "a safetensors file"),
    ("notes.pt", lambda path, state: path.write_text("these are not weights\n"), "a torch.save file"),
    ("fake.pt", _constants_zip, "a TorchScript archive"),
    ("empty.pt", lambda path, state: path.write_bytes(b""), "a torch.save file")])
def test_a_file_that_is_not_weights_is_named_with_what_it_was_read_as(tmp_path, tiny_state, name, write, read_as):
    path = tmp_path / name
    write(path, tiny_state)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: not a weights file: read as {read_as}, it fails"):
        build_clip("so-tiny", str(path))


def test_the_offline_message_says_why_it_is_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="not in the Hugging Face cache and your environment sets HF_HUB_OFFLINE=1"):
        build_clip("ViT-B-16-quickgelu", "openai")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr("so.clip.weights._hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(FileNotFoundError, match="not in the Hugging Face cache and huggingface.co cannot be reached"):
        build_clip("ViT-B-16-quickgelu", "openai")


def test_hub_tag_fails_fast_offline_naming_local_file(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="model.pretrained=/path/to/ViT-B-16.pt"):
        build_clip("ViT-B-16-quickgelu", "openai")


def test_unknown_tag_or_missing_file_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="model.pretrained='no/such/file.pt' is neither a file nor"):
        build_clip("so-tiny", "no/such/file.pt")
