import pytest
import torch

from so.clip.model import build_clip, class_embeddings, encode_text, tokenize

PROMPTS = ["a photo of a cat.", "a photo of a dog.",
           "a photo of a very long and rather elaborate composite object with many words in its name."]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_clip("so-tiny")


def test_truncated_text_encoder_matches_open_clip(tiny):
    model, _, tokenizer = tiny
    full = tokenizer(PROMPTS)
    tokens = tokenize(tokenizer, PROMPTS, "cpu")
    assert tokens.shape[1] == int(full.argmax(-1).max()) + 1 < full.shape[1]
    expected = model.encode_text(full, normalize=True)
    assert torch.allclose(encode_text(model, tokens), expected, atol=1e-5)


def test_truncated_text_encoder_gradients_match(tiny):
    model, _, tokenizer = tiny
    grads = []
    for forward in (lambda: model.encode_text(tokenizer(PROMPTS), normalize=True),
                    lambda: encode_text(model, tokenize(tokenizer, PROMPTS, "cpu"))):
        model.zero_grad()
        forward().square().sum().backward()  # a nonlinear loss: all weights' grads flow
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 100
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-5, rtol=1e-4, msg=name)


def test_class_embeddings_average_templates(tiny):
    model, _, tokenizer = tiny
    tokens = tokenize(tokenizer, ["a photo of a cat.", "a drawing of a cat.", "a photo of a dog.",
                                  "a drawing of a dog."], "cpu")
    with torch.no_grad():
        emb = class_embeddings(model, tokens, num_templates=2)
        single = encode_text(model, tokens).view(2, 2, -1)
    assert emb.shape == (2, single.shape[-1])
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2))
    expected = torch.nn.functional.normalize(single.mean(1), dim=-1)
    torch.testing.assert_close(emb, expected)
